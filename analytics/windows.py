"""Tumbling event-time windows: flows and spans in, one ServiceMetrics per service, revision and
window (and per caller -> callee edge) out.

The same code serves the stream (streams/aggregate.py feeds records one at a time and closes
windows as event time moves on) and offline work (``aggregate`` over a whole recording, used
for ground truth in tests and for model evaluation), so the two cannot disagree.

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
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass, field

from ddsketch import DDSketch
from ddsketch.pb.ddsketch_pb2 import DDSketch as DDSketchMessage
from ddsketch.pb.proto import DDSketchProto

from clover.records import FlowRecord, ServiceMetrics, SpanRecord

UNKNOWN = "unknown"
SKETCH_ACCURACY = 0.01
_REQUEST_KINDS = frozenset({"server", "consumer", "unspecified"})
_EDGE_KINDS = frozenset({"client", "producer"})

# (namespace, service, revision, peer_namespace, peer_service); peer_service None for a service.
RowKey = tuple[str, str, str, str | None, str | None]


@dataclass
class _Row:
    """Running totals of one row of one window."""

    requests: int = 0
    errors: int = 0
    latency_max_ms: float | None = None
    sketch: DDSketch | None = None
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

    def add_latency(self, latency_ms: float) -> None:
        if self.sketch is None:
            self.sketch = DDSketch(SKETCH_ACCURACY)
        self.sketch.add(latency_ms)
        if self.latency_max_ms is None or latency_ms > self.latency_max_ms:
            self.latency_max_ms = latency_ms


@dataclass
class Window:
    """One window's rows, and the lowest input position (e.g. Kafka offset per partition) each
    source contributed, so a stream knows what it may commit once the window is written."""

    start_us: int
    rows: dict[RowKey, _Row] = field(default_factory=dict)
    first_positions: dict[object, int] = field(default_factory=dict)

    def row(self, key: RowKey) -> _Row:
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = _Row()
        return row

    def note_position(self, source: object, position: int | None) -> None:
        if position is not None and position < self.first_positions.get(source, position + 1):
            self.first_positions[source] = position


class WindowAggregator:
    """Tumbling windows over one ordered input (one partition, or a whole recording).

    Event time is the largest record time seen; a window closes once event time has passed its
    end by ``allowed_lateness_us``. A record for a window that has already closed is refused
    (``add_*`` returns False) so the caller can dead-letter it; it is never silently dropped.
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

    # -- input ----------------------------------------------------------------------------

    def add_span(self, span: SpanRecord, source: object = None,
                 position: int | None = None) -> bool:
        end_us = span.start_us + span.duration_us
        window = self._window_for(end_us, source, position)
        if window is None:
            return False
        namespace = span.namespace or UNKNOWN
        revision = span.revision or UNKNOWN
        if span.kind in _REQUEST_KINDS:
            key: RowKey = (namespace, span.service, revision, None, None)
        elif span.kind in _EDGE_KINDS and span.peer_service:
            key = (namespace, span.service, revision, span.peer_namespace, span.peer_service)
        else:
            return True
        row = window.row(key)
        row.requests += 1
        row.errors += span.error
        row.add_latency(span.duration_us / 1000.0)
        # A server receives the request and sends the response; a caller the other way round.
        received, sent = span.bytes_received or 0, span.bytes_sent or 0
        row.span_bytes_in += received
        row.span_bytes_out += sent
        return True

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
        due = sorted(start for start in self.windows if self._closed(start))
        closed = [self.windows.pop(start) for start in due]
        if closed:
            self.closed_before_us = max(self.closed_before_us, due[-1] + self.window_us)
        return closed

    def close_all(self) -> list[Window]:
        """Remove and return every open window (the end of a finite input)."""
        closed = [self.windows.pop(start) for start in sorted(self.windows)]
        if closed:
            self.closed_before_us = max(self.closed_before_us,
                                        closed[-1].start_us + self.window_us)
        return closed

    def first_open_position(self, source: object) -> int | None:
        """The lowest position of ``source`` still held in an open window, if any."""
        positions = [w.first_positions[source] for w in self.windows.values()
                     if source in w.first_positions]
        return min(positions) if positions else None

    def metrics(self, window: Window) -> list[ServiceMetrics]:
        """The window's rows as records, in a stable order."""
        return [self._record(window.start_us, key, window.rows[key])
                for key in sorted(window.rows, key=_sort_key)]

    def _record(self, start_us: int, key: RowKey, row: _Row) -> ServiceMetrics:
        namespace, service, revision, peer_namespace, peer_service = key
        sketch = row.sketch
        has_flows = row.flows > 0
        return ServiceMetrics(
            namespace=namespace, service=service, revision=revision,
            peer_namespace=peer_namespace, peer_service=peer_service,
            window_start_us=start_us, window_seconds=self.window_seconds,
            requests=row.requests, errors=row.errors,
            error_rate=row.errors / row.requests if row.requests else None,
            latency_p50_ms=sketch_quantile(sketch, 0.5),
            latency_p90_ms=sketch_quantile(sketch, 0.9),
            latency_p99_ms=sketch_quantile(sketch, 0.99), latency_max_ms=row.latency_max_ms,
            latency_sketch=encode_sketch(sketch) if sketch is not None else None,
            bytes_in=row.bytes_in if has_flows else row.span_bytes_in,
            bytes_out=row.bytes_out if has_flows else row.span_bytes_out,
            flows=row.flows, connections_opened=row.connections_opened,
            connections_closed=row.connections_closed, connections_reset=row.connections_reset,
        )


def aggregate(spans: Iterable[SpanRecord] = (), flows: Iterable[FlowRecord] = (),
              window_seconds: int = 10) -> list[ServiceMetrics]:
    """Every window of a finite recording, with no lateness limit (the offline ground truth)."""
    aggregator = WindowAggregator(window_seconds, allowed_lateness_seconds=float("inf"))
    for span in spans:
        aggregator.add_span(span)
    for flow in flows:
        aggregator.add_flow(flow)
    return [record for window in aggregator.close_all() for record in aggregator.metrics(window)]


# -- sketches ---------------------------------------------------------------------------------

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


def _sort_key(key: RowKey) -> tuple[str, ...]:
    return tuple("" if part is None else part for part in key)

