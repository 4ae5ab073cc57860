"""Tumbling event-time windows: flows and spans in, one ServiceMetrics per service, revision and
window (and per caller -> callee edge) out.

The same code serves the stream (streams/aggregate.py feeds spans in batches, as columns, and
flows one at a time, and closes windows as event time moves on) and offline work
(``aggregate`` over a whole recording, used for ground truth in tests and for model
evaluation), so the two cannot disagree.

What is counted where, so every number has one definition:

* A span belongs to the window in which it ends (start + duration). Server spans, consumer
  spans and spans of unknown kind (recorded traces often have none) are requests of their own
  service; client and producer spans with a known peer are requests on the caller -> callee
  edge. Internal spans are not requests.
* Latency percentiles come from a DDSketch (1% relative accuracy) that is stored with the
  window, so windows merge into minutes and hours with correct percentiles; the maximum is
  exact.
* Flow records count in the window in which the flow ended (closed, reset, or the end of a tc
  counter interval). ``open`` updates of live connections are progress reports for consumers of
  clover.flows and are not counted, because their counters are cumulative: the final record
  carries the totals. Flows count for the service the record is keyed by (the server side when
  known, else the client side), on the partition that service's spans use. When both ends of one
  connection were observed (two records), it counts once per window.
* ``connections_opened`` counts connections opened and finished in the same window; a
  connection that spans windows appears in closed/reset when it ends.
* Bytes come from flows; a window with no flow records for its service falls back to the bytes
  its spans report.
* A request's **call pattern** is the set of operations of its direct child spans (the calls
  it made, its internal steps), counted per service row and window (``call_patterns``), for
  models/structure.py. A request's children are its own service's spans, so they are on its
  partition; they are found among the spans that ended from one window before the request's
  window on (``PATTERN_LOOKBACK_WINDOWS``) up to its window's close, late ones included. A
  request whose calls began more than that before it ended has them missed.
"""

from __future__ import annotations

import base64
import math
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from ddsketch import DDSketch
from ddsketch.mapping import LogarithmicMapping
from ddsketch.pb.ddsketch_pb2 import DDSketch as DDSketchMessage
from ddsketch.pb.ddsketch_pb2 import Store as StoreMessage
from ddsketch.pb.proto import DDSketchProto, KeyMappingProto

from clover.records import FlowRecord, ServiceMetrics

UNKNOWN = "unknown"
SKETCH_ACCURACY = 0.01
_REQUEST_KINDS = frozenset({"server", "consumer", "unspecified"})
_EDGE_KINDS = frozenset({"client", "producer"})
# The sketch's key of a latency: the same mapping DDSketch(SKETCH_ACCURACY) uses, applied to a
# whole array at once (see LatencyBins).
_MAPPING = LogarithmicMapping(SKETCH_ACCURACY)
_LOG_GAMMA = math.log(_MAPPING.gamma)
_INDEX_MAPPING = KeyMappingProto.to_proto(_MAPPING)

# (namespace, service, revision, peer_namespace, peer_service); peer_service None for a service.
RowKey = tuple[str, str, str, str | None, str | None]

# Call patterns: children are looked for in the request's window and this many before it; a
# row keeps its most common patterns, the rest of its requests counted under OTHER_PATTERNS
# (a service whose operation names carry ids would otherwise write a pattern per request).
PATTERN_LOOKBACK_WINDOWS = 1
MAX_PATTERNS = 50
OTHER_PATTERNS = "*"
# A span's ids and operation are followed as their str hashes (int64 columns): only compared
# within this process, whose windows a restart rebuilds from Kafka. A parent id whose hash
# equals None's (a chance of 2^-64) reads as no parent.
_NO_PARENT = hash(None)


class SpanLike(Protocol):
    """What aggregation reads of a span: a SpanRecord, or any decoded form with these fields
    (read-only here, so a narrower type such as SpanRecord's kind literal fits)."""

    @property
    def span_id(self) -> str: ...

    @property
    def parent_span_id(self) -> str | None: ...

    @property
    def operation(self) -> str: ...

    @property
    def service(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def start_us(self) -> int: ...

    @property
    def duration_us(self) -> int: ...

    @property
    def error(self) -> bool: ...

    @property
    def namespace(self) -> str | None: ...

    @property
    def revision(self) -> str | None: ...

    @property
    def peer_namespace(self) -> str | None: ...

    @property
    def peer_service(self) -> str | None: ...

    @property
    def bytes_sent(self) -> int | None: ...

    @property
    def bytes_received(self) -> int | None: ...


@dataclass
class _Row:
    """Running totals of one row of one window."""

    requests: int = 0
    errors: int = 0
    latency_max_ms: float | None = None
    # Latencies (ms) in arrays as batches brought them; sketched when the window is written.
    latencies: list[np.ndarray] = field(default_factory=list)
    span_bytes_in: int = 0
    span_bytes_out: int = 0
    flows: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    connections_opened: int = 0
    connections_closed: int = 0
    connections_reset: int = 0
    # Connections already counted in this window, so the second side's record is not.
    connections_seen: set[tuple[object, ...]] = field(default_factory=set)
    # Span id hashes of a service row's requests, for their call patterns.
    request_ids: list[np.ndarray] = field(default_factory=list)


@dataclass
class Window:
    """One window's rows, and the lowest input position (e.g. Kafka offset per partition) each
    source contributed, so a stream knows what it may commit once the window is written."""

    start_us: int
    rows: dict[RowKey, _Row] = field(default_factory=dict)
    first_positions: dict[object, int] = field(default_factory=dict)
    # Set when the window closes: each service row's requests per call pattern.
    call_patterns: dict[RowKey, dict[str, int]] = field(default_factory=dict)

    def row(self, key: RowKey) -> _Row:
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = _Row()
        return row

    def note_position(self, source: object, position: int | None) -> None:
        _note_position(self.first_positions, source, position)


@dataclass
class _Children:
    """The spans with a parent that ended in one window, as (parent id, operation) hashes: the
    calls their parents made. Kept until the requests that may be their parents are counted,
    with the lowest input position they came from, so a stream does not commit past them."""

    parent_ids: list[np.ndarray] = field(default_factory=list)
    operations: list[np.ndarray] = field(default_factory=list)
    arrived_at: list[np.ndarray] = field(default_factory=list)  # event time when each came
    names: dict[int, str] = field(default_factory=dict)  # operation hash -> name
    first_positions: dict[object, int] = field(default_factory=dict)


def _note_position(first_positions: dict[object, int], source: object,
                   position: int | None) -> None:
    if position is not None and position < first_positions.get(source, position + 1):
        first_positions[source] = position


def _span_row(kind: str, namespace: str | None, service: str, revision: str | None,
              peer_namespace: str | None, peer_service: str | None) -> RowKey | None:
    """The row a span counts in: its service's (a request), an edge's, or none."""
    if kind in _REQUEST_KINDS:
        return (namespace or UNKNOWN, service, revision or UNKNOWN, None, None)
    if kind in _EDGE_KINDS and peer_service:
        return (namespace or UNKNOWN, service, revision or UNKNOWN, peer_namespace,
                peer_service)
    return None


# What decides a span's row: (kind, namespace, service, revision, peer_namespace, peer_service).
SpanKey = tuple[str, str | None, str, str | None, str | None, str | None]
_read_key = operator.attrgetter("kind", "namespace", "service", "revision", "peer_namespace",
                                "peer_service")


@dataclass
class SpanColumns:
    """Spans as columns, holding what aggregation reads of them, so that a batch is aggregated
    on arrays without touching each span again. ``of`` builds them from spans; the stream
    worker slices and joins them as its queues need."""

    end_us: np.ndarray  # int64: start + duration, the time a span counts at
    duration_us: np.ndarray  # int64
    error: np.ndarray  # bool
    bytes_sent: np.ndarray  # int64, 0 where unknown
    bytes_received: np.ndarray  # int64, 0 where unknown
    keys: list[SpanKey]
    # For call patterns: hashes of the span's id, its parent's (_NO_PARENT for none) and its
    # operation, and the operations' names by hash.
    span_id: np.ndarray  # int64
    parent_id: np.ndarray  # int64
    operation: np.ndarray  # int64
    operation_names: dict[int, str]

    @classmethod
    def of(cls, spans: Sequence[SpanLike]) -> SpanColumns:
        """The columns of a list of spans (SpanRecords, or decoded structs with their fields)."""
        def column(name: str) -> list[Any]:
            return list(map(operator.attrgetter(name), spans))

        def hashes(values: list[Any]) -> np.ndarray:
            return np.fromiter(map(hash, values), np.int64, len(values))

        duration = _int_column(column("duration_us"))
        operations = column("operation")
        # The distinct names first: a set hashes each once, and those hashes are kept in the
        # strings, so the column's hashes after it cost less.
        names = {hash(name): name for name in set(operations)}
        return cls(end_us=_int_column(column("start_us")) + duration, duration_us=duration,
                   error=np.array(column("error"), dtype=bool),
                   bytes_sent=_int_column(column("bytes_sent")),
                   bytes_received=_int_column(column("bytes_received")),
                   keys=list(map(_read_key, spans)),
                   span_id=hashes(column("span_id")),
                   parent_id=hashes(column("parent_span_id")), operation=hashes(operations),
                   operation_names=names)

    @classmethod
    def join(cls, parts: Sequence[SpanColumns]) -> SpanColumns:
        if len(parts) == 1:
            return parts[0]
        def joined(name: str) -> np.ndarray:
            return np.concatenate([getattr(part, name) for part in parts])

        names: dict[int, str] = {}
        for part in parts:
            names.update(part.operation_names)
        return cls(joined("end_us"), joined("duration_us"), joined("error"),
                   joined("bytes_sent"), joined("bytes_received"),
                   [key for part in parts for key in part.keys], joined("span_id"),
                   joined("parent_id"), joined("operation"), names)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, where: slice) -> SpanColumns:
        # A slice keeps all the names: a superset does no harm.
        return SpanColumns(self.end_us[where], self.duration_us[where], self.error[where],
                           self.bytes_sent[where], self.bytes_received[where],
                           self.keys[where], self.span_id[where], self.parent_id[where],
                           self.operation[where], self.operation_names)


def _int_column(values: list[int | None]) -> np.ndarray:
    """An int64 array of the values, None read as 0."""
    if None in values:
        values = [0 if value is None else value for value in values]
    return np.array(values, dtype=np.int64)


class WindowAggregator:
    """Tumbling windows over one ordered input (one partition, or a whole recording).

    Event time is the largest record time seen; a window closes once event time has passed its
    end by ``allowed_lateness_us``. A record for a window that has already closed is refused
    (``add_*`` returns False) so the caller can dead-letter it; it is never silently dropped.

    Spans are added in batches (``add_spans``) with the arithmetic on arrays, and a batch gives
    exactly what adding its spans one at a time in the same order would: each span's lateness is
    judged against the event time of the spans before it.
    """

    def __init__(self, window_seconds: int = 10, allowed_lateness_seconds: float = 5.0,
                 closed_before_us: int = 0) -> None:
        if window_seconds < 1:
            raise ValueError("window_seconds must be >= 1")
        self.window_us = window_seconds * 1_000_000
        self.window_seconds = window_seconds
        # An infinite allowance (offline input) keeps every window open until close_all().
        self.allowed_lateness_us: float = (allowed_lateness_seconds * 1e6
                                           if allowed_lateness_seconds == float("inf")
                                           else round(allowed_lateness_seconds * 1e6))
        # Windows starting before this are closed (restored from a checkpoint after a restart).
        self.closed_before_us = closed_before_us
        self.event_time_us = 0
        self.windows: dict[int, Window] = {}
        # Spans with a parent by the window they ended in, for call patterns (_add_children).
        self.children: dict[int, _Children] = {}

    # -- input ----------------------------------------------------------------------------

    def add_span(self, span: SpanLike, source: object = None,
                 position: int | None = None) -> bool:
        """Add one span (a batch of one); False if its window has closed."""
        return bool(self.add_spans([span], source,
                                   None if position is None else [position])[0])

    def add_spans(self, spans: Sequence[SpanLike] | SpanColumns, source: object = None,
                  positions: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Add spans in input order; returns, per span, whether it was accepted (False: its
        window had closed, for the caller to dead-letter)."""
        columns = spans if isinstance(spans, SpanColumns) else SpanColumns.of(spans)
        count = len(columns)
        if positions is not None:
            positions = np.asarray(positions, np.int64)
        if not count:
            return np.zeros(0, dtype=bool)
        end = columns.end_us
        starts = end - end % self.window_us
        # Event time before each span: the largest end among the spans before it.
        before = np.maximum.accumulate(np.concatenate(([self.event_time_us], end[:-1])))
        accepted = ((starts >= self.closed_before_us)
                    & (starts + self.window_us + self.allowed_lateness_us > before))
        self._add_children(columns, starts, before, source, positions)
        if not accepted.any():
            return accepted
        self.event_time_us = max(self.event_time_us, int(end[accepted].max()))
        taken = np.flatnonzero(accepted)
        window_of = starts[taken]
        where = None if positions is None else positions[taken]
        for start in np.unique(window_of).tolist():
            window = self.windows.get(start)
            if window is None:
                window = self.windows[start] = Window(start)
            if where is not None:
                window.note_position(source, int(where[window_of == start].min()))

        # The row of each span: worked out once per distinct key of the batch (a few dozen).
        # One pass in C numbers each span by the position of its key's first span, and the
        # rows are looked up by those positions; -1 for spans that are not requests.
        first_of_key: dict[SpanKey, int] = {}
        firsts = np.fromiter(map(first_of_key.setdefault, columns.keys, range(count)),
                             np.int64, count)
        row_number: dict[RowKey, int] = {}
        row_at = np.full(count, -1, dtype=np.int64)
        for key, position in first_of_key.items():
            row_key = _span_row(*key)
            if row_key is not None:
                row_at[position] = row_number.setdefault(row_key, len(row_number))
        row_keys = list(row_number)
        row_of = row_at[firsts[taken]]
        counted = row_of >= 0
        if not counted.any():
            return accepted
        picked = taken[counted]
        window_of = window_of[counted]
        # One group per (window, row), numbered in order; each group's spans summed at once.
        first = int(window_of.min())
        groups, group = np.unique((window_of - first) // self.window_us * len(row_keys)
                                  + row_of[counted], return_inverse=True)
        order = np.argsort(group, kind="stable")
        requests = np.bincount(group, minlength=groups.size)
        bounds = np.concatenate(([0], np.cumsum(requests)[:-1]))
        latency = columns.duration_us[picked][order] / 1000.0
        ids_by_group = np.split(columns.span_id[picked][order], bounds[1:])
        error_sum = np.add.reduceat(columns.error[picked][order].astype(np.int64), bounds)
        in_sum = np.add.reduceat(columns.bytes_received[picked][order], bounds)
        out_sum = np.add.reduceat(columns.bytes_sent[picked][order], bounds)
        top = np.maximum.reduceat(latency, bounds)
        by_group = np.split(latency, bounds[1:])
        for number, code in enumerate(groups.tolist()):
            window_number, row_code = divmod(code, len(row_keys))
            row_key = row_keys[row_code]
            row = self.windows[first + window_number * self.window_us].row(row_key)
            row.requests += int(requests[number])
            if row_key[4] is None:  # a service's requests (not an edge's calls)
                row.request_ids.append(ids_by_group[number])
            row.errors += int(error_sum[number])
            # A server receives the request and sends the response; a caller the other way.
            row.span_bytes_in += int(in_sum[number])
            row.span_bytes_out += int(out_sum[number])
            row.latencies.append(by_group[number])
            if row.latency_max_ms is None or top[number] > row.latency_max_ms:
                row.latency_max_ms = float(top[number])
        return accepted

    def _add_children(self, columns: SpanColumns, starts: np.ndarray, before: np.ndarray,
                      source: object, positions: np.ndarray | None) -> None:
        """Keep the batch's spans that have a parent, by the window they ended in, with the
        event time they arrived at (``before``). Late ones are kept too: a replay after a
        restart reads those again as well, so patterns come out the same as without it."""
        keep = (columns.parent_id != _NO_PARENT) & (starts >= self._children_from_us())
        if not keep.any():
            return
        where = np.flatnonzero(keep)
        window_of = starts[where]
        for start in np.unique(window_of).tolist():
            mine = where[window_of == start]
            bucket = self.children.get(start)
            if bucket is None:
                bucket = self.children[start] = _Children()
            bucket.parent_ids.append(columns.parent_id[mine])
            bucket.operations.append(columns.operation[mine])
            bucket.arrived_at.append(before[mine])
            bucket.names.update(columns.operation_names)
            if positions is not None:
                _note_position(bucket.first_positions, source, int(positions[mine].min()))

    def _children_from_us(self) -> int:
        """The earliest window whose children are still needed (by a window not yet closed)."""
        return self.closed_before_us - PATTERN_LOOKBACK_WINDOWS * self.window_us

    def add_flow(self, flow: FlowRecord, source: object = None,
                 position: int | None = None) -> bool:
        if flow.state == "open" or flow.end_us is None:
            return True  # cumulative progress report: the final record carries the totals
        window = self._window_for(flow.end_us, source, position)
        if window is None:
            return False
        server_known = bool(flow.dst.service)
        end = flow.dst if server_known else flow.src
        if not end.service:
            return True  # neither end attributed: there is no service to count it for
        row = window.row((end.namespace or UNKNOWN, end.service, end.revision or UNKNOWN,
                          None, None))
        if flow.observer == "tcp_lifecycle":
            connection = (flow.protocol, flow.src.addr, flow.src.port, flow.dst.addr,
                          flow.dst.port)
            if connection in row.connections_seen:
                return True  # the other side's record of a connection already counted
            row.connections_seen.add(connection)
            if flow.state == "reset":
                row.connections_reset += 1
            else:
                row.connections_closed += 1
            if flow.start_us >= window.start_us:
                row.connections_opened += 1
        row.flows += 1
        # bytes_sent flows src -> dst: into the server, out of the client.
        into, out_of = ((flow.bytes_sent, flow.bytes_received) if server_known
                        else (flow.bytes_received, flow.bytes_sent))
        row.bytes_in += into
        row.bytes_out += out_of
        return True

    def _window_for(self, at_us: int, source: object, position: int | None) -> Window | None:
        start = at_us - at_us % self.window_us
        if start < self.closed_before_us or self._closed(start):
            return None
        window = self.windows.get(start)
        if window is None:
            window = self.windows[start] = Window(start)
        window.note_position(source, position)
        if at_us > self.event_time_us:
            self.event_time_us = at_us
        return window

    def _closed(self, start_us: int) -> bool:
        return start_us + self.window_us + self.allowed_lateness_us <= self.event_time_us

    # -- output ---------------------------------------------------------------------------

    def advance(self, event_time_us: int) -> None:
        """Move event time forward without a record (an idle input whose clock moves on)."""
        self.event_time_us = max(self.event_time_us, event_time_us)

    def close_due(self) -> list[Window]:
        """Remove and return the windows event time has passed, oldest first."""
        return self._close(sorted(start for start in self.windows if self._closed(start)))

    def close_all(self) -> list[Window]:
        """Remove and return every open window (the end of a finite input)."""
        return self._close(sorted(self.windows))

    def _close(self, starts: list[int]) -> list[Window]:
        closed = [self.windows.pop(start) for start in starts]
        for window in closed:
            window.call_patterns = self._call_patterns(window)
        if closed:
            self.closed_before_us = max(self.closed_before_us,
                                        closed[-1].start_us + self.window_us)
            needed_from = self._children_from_us()
            for start in [start for start in self.children if start < needed_from]:
                del self.children[start]
        return closed

    def first_open_position(self, source: object) -> int | None:
        """The lowest position of ``source`` still held in an open window, or among the
        children kept for the call patterns of windows not yet closed, if any."""
        held = [window.first_positions for window in self.windows.values()]
        held += [bucket.first_positions for bucket in self.children.values()]
        positions = [first[source] for first in held if source in first]
        return min(positions) if positions else None

    def _call_patterns(self, window: Window) -> dict[RowKey, dict[str, int]]:
        """Each service row's requests per call pattern, from the children kept for them.

        A child counts if it came before event time had closed the window, as a request
        would have to: so what is counted does not depend on when the caller closes windows
        (or how a stream's batches fell).

        On arrays: each kept child is matched to a request of the window by its parent id;
        a request's pattern is identified by the sum of its distinct operations' hashes (a
        set's hash), requests are counted per (row, pattern), and only each pattern's name is
        spelled out, from one of its requests."""
        rows = [(key, np.concatenate(row.request_ids))
                for key, row in window.rows.items() if row.request_ids]
        if not rows:
            return {}
        ids = np.concatenate([row_ids for _, row_ids in rows])
        row_of = np.repeat(np.arange(len(rows)), [row_ids.size for _, row_ids in rows])
        needed_from = window.start_us - PATTERN_LOOKBACK_WINDOWS * self.window_us
        buckets = [bucket for start, bucket in self.children.items() if start >= needed_from]
        names: dict[int, str] = {}
        parents, operations, arrivals = ([np.zeros(0, np.int64)] for _ in range(3))
        for bucket in buckets:
            names.update(bucket.names)
            parents += bucket.parent_ids
            operations += bucket.operations
            arrivals += bucket.arrived_at
        in_time = (np.concatenate(arrivals)
                   < window.start_us + self.window_us + self.allowed_lateness_us)
        parent, operation = np.concatenate(parents)[in_time], np.concatenate(operations)[in_time]
        # Each child's request: its parent id among the window's requests' ids.
        by_id = np.argsort(ids, kind="stable")
        sorted_ids = ids[by_id]
        at = np.minimum(np.searchsorted(sorted_ids, parent), ids.size - 1)
        found = sorted_ids[at] == parent
        request, operation = by_id[at[found]], operation[found]
        # A pattern is a set: each (request, operation) once, in request order.
        order = np.lexsort((operation, request))
        request, operation = request[order], operation[order]
        distinct = np.ones(request.size, dtype=bool)
        distinct[1:] = (request[1:] != request[:-1]) | (operation[1:] != operation[:-1])
        request, operation = request[distinct], operation[distinct]
        pattern = np.zeros(ids.size, np.int64)  # 0: no children
        np.add.at(pattern, request, operation)  # int64 wraps around: a hash, not a number
        # Requests per (row, pattern), with one request of each to name the pattern by.
        order = np.lexsort((pattern, row_of))
        group_row, group_pattern = row_of[order], pattern[order]
        first = np.flatnonzero(np.concatenate(
            ([True], (group_row[1:] != group_row[:-1])
             | (group_pattern[1:] != group_pattern[:-1]))))
        counts = np.diff(np.append(first, ids.size))
        example = order[first]
        low = np.searchsorted(request, example, side="left")
        high = np.searchsorted(request, example, side="right")
        patterns: dict[RowKey, dict[str, int]] = {}
        for row, count, a, b in zip(group_row[first].tolist(), counts.tolist(), low.tolist(),
                                    high.tolist(), strict=True):
            name = "+".join(sorted(names[code] for code in operation[a:b].tolist()))
            of_row = patterns.setdefault(rows[row][0], {})
            # Names can coincide where operation names hold "+": their requests add up.
            of_row[name] = of_row.get(name, 0) + count
        return {key: _most_common(of_row) for key, of_row in patterns.items()}

    def metrics(self, window: Window) -> list[ServiceMetrics]:
        """The window's rows as records, in a stable order."""
        return [self._record(window.start_us, key, window.rows[key],
                             window.call_patterns.get(key))
                for key in sorted(window.rows, key=_sort_key)]

    def _record(self, start_us: int, key: RowKey, row: _Row,
                call_patterns: dict[str, int] | None) -> ServiceMetrics:
        namespace, service, revision, peer_namespace, peer_service = key
        bins = LatencyBins.of(np.concatenate(row.latencies)) if row.latencies else None
        p50, p90, p99 = bins.quantiles((0.5, 0.9, 0.99)) if bins else (None, None, None)
        has_flows = row.flows > 0
        return ServiceMetrics(
            namespace=namespace, service=service, revision=revision,
            peer_namespace=peer_namespace, peer_service=peer_service,
            window_start_us=start_us, window_seconds=self.window_seconds,
            requests=row.requests, errors=row.errors,
            error_rate=row.errors / row.requests if row.requests else None,
            latency_p50_ms=p50, latency_p90_ms=p90, latency_p99_ms=p99,
            latency_max_ms=row.latency_max_ms,
            latency_sketch=bins.encode() if bins else None,
            bytes_in=row.bytes_in if has_flows else row.span_bytes_in,
            bytes_out=row.bytes_out if has_flows else row.span_bytes_out,
            flows=row.flows, connections_opened=row.connections_opened,
            connections_closed=row.connections_closed, connections_reset=row.connections_reset,
            call_patterns=call_patterns,
        )


def aggregate(spans: Iterable[SpanLike] = (), flows: Iterable[FlowRecord] = (),
              window_seconds: int = 10) -> list[ServiceMetrics]:
    """Every window of a finite recording, with no lateness limit (the offline ground truth)."""
    aggregator = WindowAggregator(window_seconds, allowed_lateness_seconds=float("inf"))
    aggregator.add_spans(list(spans))
    for flow in flows:
        aggregator.add_flow(flow)
    return [record for window in aggregator.close_all() for record in aggregator.metrics(window)]


# -- sketches ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class LatencyBins:
    """A window row's latencies as the bins of a DDSketch (1% relative accuracy), computed on
    the array rather than value by value: each value's key is the bucket the sketch's own
    mapping puts it in, ``ceil(log(value) / log(gamma))``. Encoded, they are the DDSketch
    protobuf that ``encode_sketch`` writes (so decode_sketch and merge_sketches read them), and
    their quantiles are the ones DDSketch gives for those bins (rank ``q * (count - 1)``, the
    first bucket whose running count passes it, that bucket's value)."""

    offset: int  # key of counts[0]
    counts: np.ndarray  # float64, from the lowest to the highest key with values
    zero_count: float  # values too small for a bucket (0 ms)

    @classmethod
    def of(cls, values_ms: np.ndarray) -> LatencyBins:
        positive = values_ms[values_ms > _MAPPING.min_possible]
        zero_count = float(values_ms.size - positive.size)
        if not positive.size:
            return cls(0, np.zeros(0), zero_count)
        keys = np.ceil(np.log(positive) / _LOG_GAMMA).astype(np.int64)
        low = int(keys.min())
        return cls(low, np.bincount(keys - low).astype(np.float64), zero_count)

    def quantile(self, q: float) -> float | None:
        return self.quantiles((q,))[0]

    def quantiles(self, qs: Sequence[float]) -> list[float | None]:
        """Several quantiles from one running count of the bins."""
        running = np.cumsum(self.counts)
        count = self.zero_count + (float(running[-1]) if running.size else 0.0)
        if count == 0:
            return [None] * len(qs)
        ranks = np.array(qs, dtype=np.float64) * (count - 1)
        indexes = np.searchsorted(running, ranks - self.zero_count, side="right").tolist()
        return [0.0 if rank < self.zero_count
                else max(0.0, float(_MAPPING.value(self.offset + index)))
                for rank, index in zip(ranks.tolist(), indexes, strict=True)]

    def encode(self) -> str:
        message = DDSketchMessage(
            mapping=_INDEX_MAPPING,
            positiveValues=StoreMessage(contiguousBinCounts=self.counts.tolist(),
                                        contiguousBinIndexOffset=self.offset
                                        if self.counts.size else 0),
            negativeValues=StoreMessage(), zeroCount=self.zero_count)
        return base64.b64encode(message.SerializeToString()).decode("ascii")


def encode_sketch(sketch: DDSketch) -> str:
    """Base64 of the DDSketch protobuf, as stored in ServiceMetrics.latency_sketch.

    Canonical: the bin array is trimmed to its non-zero span, because how far a store has grown
    depends on the order values arrived in. The same values then give the same bytes, so a
    window rewritten after a replay is byte for byte the row it replaces."""
    message = DDSketchProto.to_proto(sketch)
    for store in (message.positiveValues, message.negativeValues):
        counts = list(store.contiguousBinCounts)
        nonzero = [i for i, count in enumerate(counts) if count]
        first, last = (nonzero[0], nonzero[-1] + 1) if nonzero else (0, 0)
        del store.contiguousBinCounts[:]
        store.contiguousBinCounts.extend(counts[first:last])
        store.contiguousBinIndexOffset = store.contiguousBinIndexOffset + first if nonzero else 0
    return base64.b64encode(message.SerializeToString()).decode("ascii")


def decode_sketch(text: str) -> DDSketch:
    message = DDSketchMessage()
    message.ParseFromString(base64.b64decode(text))
    return DDSketchProto.from_proto(message)


def merge_sketches(encoded: Iterable[str | None]) -> DDSketch | None:
    """One sketch holding every value of the given ones (None when there are none)."""
    merged: DDSketch | None = None
    for text in encoded:
        if not text:
            continue
        sketch = decode_sketch(text)
        if merged is None:
            merged = sketch
        else:
            merged.merge(sketch)
    return merged


def sketch_quantile(sketch: DDSketch | None, q: float) -> float | None:
    """The sketch's q-quantile in ms (None for no values); never below 0."""
    if sketch is None or sketch.count == 0:
        return None
    value = sketch.get_quantile_value(q)
    return None if value is None else max(0.0, float(value))


def _most_common(patterns: dict[str, int]) -> dict[str, int]:
    """At most MAX_PATTERNS patterns: the most common (ties by name), and the requests of the
    rest under OTHER_PATTERNS."""
    if len(patterns) <= MAX_PATTERNS:
        return patterns
    ranked = sorted(patterns.items(), key=lambda item: (-item[1], item[0]))
    kept = dict(ranked[:MAX_PATTERNS - 1])
    rest = sum(count for _, count in ranked[MAX_PATTERNS - 1:])
    kept[OTHER_PATTERNS] = kept.get(OTHER_PATTERNS, 0) + rest
    return kept


def _sort_key(key: RowKey) -> tuple[str, ...]:
    return tuple("" if part is None else part for part in key)

