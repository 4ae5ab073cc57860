"""Replay recorded traces into the pipeline as if they came from the mesh (``clover replay spans``).

Two recorded formats are read, detected from the content (never from the file name), plain or
gzipped (gzip is recognised by its magic bytes):

* **Nezha span CSV** (the OnlineBoutique data of the Nezha study), header
  ``TraceID,SpanID,ParentID,PodName,OperationName,StartTimeUnixNano,EndTimeUnixNano,Duration``.
  Read line by line, never the whole file at once.
* **Jaeger JSON export**: Jaeger UI's "Download JSON", i.e. the ``/api/traces`` response
  ``{"data": [{"traceID", "spans": [...], "processes": {...}}]}``. Such files are small and are
  parsed with :func:`json.load` in one go.

Each reader yields ``(start_us, candidate)`` in the file's own order; the candidate is a
:class:`collectors.ingest.Candidate` (a :class:`SourcedCandidate`, which also says where in the
file it came from), so the replay goes through the same :class:`~collectors.ingest.SpanSink` as
every live receiver: valid spans to ``clover.spans``, each invalid one to ``clover.deadletter``
with its reason and its original bytes (the CSV line without its line break; for Jaeger, the
span object re-serialised as compact JSON).

Mapping of a Nezha row (the data has no span kind, status or namespace; the kind is read from
the trace structure, the others are not invented):

* ``trace_id``/``span_id`` = TraceID/SpanID, lowercased; ``parent_span_id`` = ParentID, or None
  when it is ``root``. In the 2022-08-22 data every TraceID is 32 and every SpanID/ParentID 16
  lowercase hex digits, so nothing is rewritten; an id of another shape is not padded or cut but
  dead-lettered by the schema check.
* ``pod`` = PodName; ``service`` = the pod name without its two last dash-separated parts (the
  Deployment), ``revision`` = the second-to-last part (the pod template hash):
  ``cartservice-579f59597d-wc2lz`` is service ``cartservice``, revision ``579f59597d``.
* ``namespace`` = the ``namespace`` argument (None by default: the data does not say).
* ``start_us`` = StartTimeUnixNano // 1000; ``duration_us`` = Duration (already microseconds).
  EndTimeUnixNano must be an integer but is otherwise unused.
* ``kind`` from the trace structure (see "Span kinds" below): the data has no kind column, and
  the operation names are gRPC method names that the caller's client span and the callee's
  server span share, so the name alone does not tell the kind. The reader itself says
  ``unspecified``; :func:`replay_spans` gives the kinds.
* ``status_code`` = None and ``error`` = False: the data has no status column at all (the only
  signals are timing, volume and call structure), so ``error`` False means "not known to have
  failed", not "succeeded".
* ``source`` = ``nezha``.

A row that cannot be mapped (wrong number of columns, a number that is not a non-negative
integer, a pod name that is not ``<deployment>-<hash>-<suffix>``, bytes that are not UTF-8) becomes
a candidate with ``problem="line N: <what>"`` (N counts the header as line 1); a row that maps but
breaks the span schema (e.g. an id that is not hex) is explained by the sink's schema check.
:class:`ReplayStats` lists both kinds with their file and line.

Mapping of a Jaeger span: ``service``/``namespace`` from the process's ``serviceName`` split on the
first ``.`` (Istio's ``<workload>.<namespace>`` convention). A ``k8s.namespace.name`` tag, on the
process or else on the span, takes precedence for the namespace (and when the name's suffix is
not that namespace, the name is kept whole as the service); the ``namespace`` argument applies
only when neither says. ``pod`` from ``k8s.pod.name``,
``revision`` from ``k8s.replicaset.name`` or ``k8s.pod.name`` minus ``k8s.deployment.name`` when
those tags are present, else None; ``kind`` from the ``span.kind`` tag (else ``unspecified``);
``status_code`` from ``http.status_code`` (else ``rpc.grpc.status_code``/``grpc.status_code``;
integers or digit strings, as Envoy writes them); ``error`` from the ``error`` tag (true or
``"true"``); ``parent_span_id`` from the first ``CHILD_OF`` reference (a span with only a
``FOLLOWS_FROM`` reference has no parent here); ``source`` = ``jaeger``.

Span kinds (:func:`replay_spans` with ``kinds``, the default; :func:`infer_kinds`): a span of
kind ``unspecified`` gets the kind a mesh would have given it. One with a child in another
service is the ``client`` span of a call to that service (``peer_service`` that service,
``peer_namespace`` its own namespace); otherwise one whose parent is in another service, or
that is a trace's root, is a ``server`` span; one whose parent is in its own service is
``internal``. A span that has a kind (a Jaeger span with a ``span.kind`` tag) is left as it is,
though it still counts as a parent or child of the others. The unit is the file: a file's spans
are labelled from that file plus, as context, the file before and the file after it (after the
repeats are dropped), so a trace may cross a file boundary in either direction. At the edges:
a span whose parent is not in those three files stays ``unspecified`` (the aggregation then
counts it as a request of its service), and one whose only children in other services are
further away is labelled as if it had none (``server`` or ``internal`` rather than
``client``). In the Nezha day no trace crosses a boundary once the repeats are dropped: each
file alone labels every span as the whole day would (846,632 spans: 222,159 server, 203,052
client, 421,421 internal, none unspecified). The index also holds mapped spans that the sink's
schema check will dead-letter.

Order and pacing (:func:`replay_spans`):

* Each file is read completely and sorted by start time (ties keep the file's order). A
  bounded sort is needed: the Nezha files are grouped by trace, not ordered by time (about
  1,500 backward steps per file). One file is ~23,000 spans.
* Files are replayed in the order given, but merged by start time where consecutive files
  overlap: a file joins when the replay reaches its first span, and its spans interleave with
  those of files still playing. Files that do not overlap play one after the other, each in
  time order; overlapping ones play nothing late. (15 of the 42 consecutive pairs of Nezha
  minute files overlap, by up to 27 s for ``05_19``/``05_20``: 5,530 spans would otherwise be
  replayed behind later ones.) Only the overlapping files, one file of look-ahead and, for the
  span kinds, one more file of look-ahead and the ids of the file before are held in memory
  (peak RSS ~210 MB replaying all 43 Nezha files; ~160 MB with ``kinds`` off).
* Consecutive files may repeat spans: a span (same trace and span id, identical content) already
  read from the previous file is skipped and counted as a duplicate (``skip_duplicates``). The
  Nezha data has 5,788 such repeats, all between adjacent minute files; replaying them would
  count those requests twice. The same ids with different content are dead-lettered.
* With ``speed`` set, span ``i`` is submitted at ``replay_start + (start_us[i] - start_us[0]) /
  1e6 / speed``, where ``replay_start`` is the clock when the first span is reached; the
  schedule is absolute, so sleeping late never accumulates drift, and a sink that cannot keep
  up shows as ``max_lag_seconds``. Gaps between files are replayed too (at speed 1 a 6-minute
  gap between two Nezha fault windows takes 6 minutes). Spans due together are submitted in
  batches of up to ``batch_size``.
"""

from __future__ import annotations

import csv
import gzip
import heapq
import itertools
import json
import math
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Protocol

from clover.records import SCHEMA_VERSION, SpanKind
from collectors.ingest import BatchResult, Candidate

RECEIVER = "replay"
NEZHA_COLUMNS = ("TraceID", "SpanID", "ParentID", "PodName", "OperationName",
                 "StartTimeUnixNano", "EndTimeUnixNano", "Duration")
NEZHA_HEADER = ",".join(NEZHA_COLUMNS)
GZIP_MAGIC = b"\x1f\x8b"
SPAN_KINDS = frozenset({"server", "client", "producer", "consumer", "internal"})
MAX_LISTED_REJECTIONS = 100
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)  # corrupt or truncated gzip

Format = Literal["nezha", "jaeger"]


class Sink(Protocol):
    """What the replay needs of :class:`collectors.ingest.SpanSink`."""

    def request(self, receiver: str) -> None: ...

    def submit(self, receiver: str, candidates: Iterable[Candidate]) -> BatchResult: ...

    def flush(self, timeout: float = 30.0) -> int: ...


class ReplayFormatError(ValueError):
    """A file is not one the replay can read (raised before anything of it is published)."""


@dataclass
class SourcedCandidate(Candidate):
    """A :class:`Candidate` that knows where it was read: ``file`` (its name) and ``where`` in it
    (``line 12`` for a CSV row, ``trace 0, span 3`` for a Jaeger span)."""

    file: str = ""
    where: str = ""


@dataclass
class RejectedSpan:
    file: str
    where: str
    reason: str


@dataclass
class ReplayStats:
    files: int = 0
    spans_read: int = 0  # rows/spans read, duplicates included
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0  # skipped: already read from the previous file
    per_service: dict[str, int] = field(default_factory=dict)  # accepted spans by service
    wall_seconds: float = 0.0
    undelivered: int = 0  # still not acknowledged by Kafka after the final flush
    max_lag_seconds: float = 0.0  # how far behind its schedule a span was submitted (paced)
    rejections: list[RejectedSpan] = field(default_factory=list)  # the first 100

    @property
    def spans_per_second(self) -> float:
        return self.spans_read / self.wall_seconds if self.wall_seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------
# Opening and detecting


@contextmanager
def _open(path: Path) -> Iterator[IO[bytes]]:
    """The file's bytes, gunzipped when it starts with the gzip magic."""
    with open(path, "rb") as raw:
        magic = raw.read(2)
        raw.seek(0)
        if magic != GZIP_MAGIC:
            yield raw
            return
        with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
            yield unzipped  # type: ignore[misc]  # GzipFile is a binary IO


def detect_format(path: Path) -> Format:
    """``nezha`` or ``jaeger`` from the content; :class:`ReplayFormatError` otherwise."""
    path = Path(path)
    try:
        with _open(path) as stream:
            head = stream.read(8192)
    except _GZIP_ERRORS as exc:
        raise ReplayFormatError(f"{path}: not readable as gzip: {exc}") from exc
    text = head.removeprefix(b"\xef\xbb\xbf")
    if text.lstrip().startswith(b"{"):
        return "jaeger"
    first_line = text.split(b"\n", 1)[0].rstrip(b"\r")
    if first_line == NEZHA_HEADER.encode():
        return "nezha"
    found = "it is empty" if not text.strip() else \
        f"it starts with {first_line[:120].decode('utf-8', 'replace')!r}"
    raise ReplayFormatError(
        f"{path}: unknown span file format: expected a Nezha span CSV (first line "
        f"{NEZHA_HEADER!r}) or a Jaeger JSON export (an object {{\"data\": [traces]}}), "
        f"plain or gzipped, but {found}")


def read_spans(path: Path, *, namespace: str | None = None) -> Iterator[
        tuple[int | None, SourcedCandidate]]:
    """The reader for the file's detected format."""
    path = Path(path)
    if detect_format(path) == "jaeger":
        return read_jaeger(path, namespace=namespace)
    return read_nezha(path, namespace=namespace)


# --------------------------------------------------------------------------------------------
# Nezha CSV


def read_nezha(path: Path, *, namespace: str | None = None) -> Iterator[
        tuple[int | None, SourcedCandidate]]:
    """``(start_us, candidate)`` for each row of a Nezha span CSV (plain or gzipped), streamed in
    the file's order; ``start_us`` is None for a row that could not be read."""
    path = Path(path)
    with _open(path) as stream:
        header = stream.readline().removeprefix(b"\xef\xbb\xbf").rstrip(b"\r\n")
        if header != NEZHA_HEADER.encode():
            raise ReplayFormatError(
                f"{path}: not a Nezha span CSV: the first line is "
                f"{header[:120].decode('utf-8', 'replace')!r}, expected {NEZHA_HEADER!r}")
        for number, raw in enumerate(stream, start=2):
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                continue
            start_us, span, problem = _nezha_row(line, namespace)
            yield start_us, SourcedCandidate(
                span, line, None if problem is None else f"line {number}: {problem}",
                file=path.name, where=f"line {number}")


def _nezha_row(line: bytes, namespace: str | None) -> tuple[
        int | None, dict[str, Any] | None, str | None]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, None, f"not UTF-8 ({exc.reason} at byte {exc.start})"
    if '"' in text:
        try:
            fields = next(csv.reader([text], strict=True), [])
        except csv.Error as exc:
            return None, None, f"not a valid CSV row: {exc}"
    else:
        fields = text.split(",")
    if len(fields) != len(NEZHA_COLUMNS):
        return None, None, f"{len(fields)} fields, expected {len(NEZHA_COLUMNS)} ({NEZHA_HEADER})"
    trace_id, span_id, parent_id, pod, operation, start_ns, end_ns, duration = fields
    problems = [f"{name} {value!r} is not a non-negative integer"
                for name, value in (("StartTimeUnixNano", start_ns),
                                    ("EndTimeUnixNano", end_ns), ("Duration", duration))
                if not (value.isascii() and value.isdigit())]
    parts = pod.rsplit("-", 2)
    if len(parts) != 3 or not all(parts):
        problems.append(f"PodName {pod!r} is not a Deployment's pod name "
                        "(<deployment>-<pod-template-hash>-<suffix>)")
    if problems:
        return None, None, "; ".join(problems)
    start_us = int(start_ns) // 1000
    return start_us, {
        "trace_id": trace_id.lower(),
        "span_id": span_id.lower(),
        "parent_span_id": None if parent_id == "root" else parent_id.lower(),
        "namespace": namespace,
        "service": parts[0],
        "pod": pod,
        "revision": parts[1],
        "operation": operation,
        "kind": "unspecified",
        "start_us": start_us,
        "duration_us": int(duration),
        "status_code": None,
        "error": False,
        "source": "nezha",
        "schema_version": SCHEMA_VERSION,
    }, None


# --------------------------------------------------------------------------------------------
# Jaeger JSON


def read_jaeger(path: Path, *, namespace: str | None = None) -> Iterator[
        tuple[int | None, SourcedCandidate]]:
    """``(start_us, candidate)`` for each span of a Jaeger JSON export, in the file's order.
    ``namespace`` is used for spans whose process does not say."""
    path = Path(path)
    try:
        with _open(path) as stream:
            document = json.load(stream)
    except (ValueError, *_GZIP_ERRORS) as exc:  # ValueError: JSONDecodeError, UnicodeError
        raise ReplayFormatError(f"{path}: not a Jaeger JSON export: {exc}") from exc
    traces = document.get("data") if isinstance(document, dict) else None
    if not isinstance(traces, list):
        raise ReplayFormatError(
            f"{path}: not a Jaeger JSON export: expected an object with a list of traces "
            f"under \"data\" (Jaeger UI's \"Download JSON\" or the /api/traces response)")
    for t, trace in enumerate(traces):
        spans = trace.get("spans") if isinstance(trace, dict) else None
        if not isinstance(spans, list):
            yield None, SourcedCandidate(
                None, _compact(trace), f"trace {t}: not an object with a list of \"spans\"",
                file=path.name, where=f"trace {t}")
            continue
        processes = trace.get("processes")
        processes = processes if isinstance(processes, dict) else {}
        for s, span in enumerate(spans):
            where = f"trace {t}, span {s}"
            start_us, mapped, problem = _jaeger_span(span, processes, namespace)
            yield start_us, SourcedCandidate(
                mapped, _compact(span), None if problem is None else f"{where}: {problem}",
                file=path.name, where=where)


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _tags(value: Any) -> dict[str, Any]:
    """Jaeger's ``[{"key", "type", "value"}]`` as a dict (the first of a repeated key wins)."""
    tags: dict[str, Any] = {}
    if isinstance(value, list):
        for tag in value:
            if isinstance(tag, dict) and isinstance(tag.get("key"), str):
                tags.setdefault(tag["key"], tag.get("value"))
    return tags


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _jaeger_span(span: Any, processes: dict[str, Any], namespace: str | None) -> tuple[
        int | None, dict[str, Any] | None, str | None]:
    if not isinstance(span, dict):
        return None, None, "not a JSON object"
    problems = []
    ids = {}
    for name in ("traceID", "spanID"):
        value = span.get(name)
        if not isinstance(value, str):
            problems.append(f"{name} {value!r} is not a string")
        ids[name] = value.lower() if isinstance(value, str) else ""
    operation = span.get("operationName")
    if not isinstance(operation, str):
        problems.append(f"operationName {operation!r} is not a string")
    numbers = {}
    for name in ("startTime", "duration"):
        value = span.get(name)
        if type(value) is not int:
            problems.append(f"{name} {value!r} is not an integer (microseconds)")
        numbers[name] = value
    process = span.get("process")
    if not isinstance(process, dict):
        process_id = span.get("processID")
        process = processes.get(process_id) if isinstance(process_id, str) else None
    service_name = process.get("serviceName") if isinstance(process, dict) else None
    if not isinstance(process, dict):
        problems.append(f"processID {span.get('processID')!r} is not in the trace's processes")
    elif not _text(service_name):
        problems.append(f"the process has no serviceName ({service_name!r})")
    parent = None
    references = span.get("references")
    for reference in references if isinstance(references, list) else []:
        if isinstance(reference, dict) and reference.get("refType") == "CHILD_OF":
            parent = reference.get("spanID")
            if not isinstance(parent, str):
                problems.append(f"CHILD_OF reference spanID {parent!r} is not a string")
            break
    tags = _tags(span.get("tags"))
    process_tags = _tags(process.get("tags")) if isinstance(process, dict) else {}
    kind = tags.get("span.kind")
    kind = kind.lower() if isinstance(kind, str) and kind.lower() in SPAN_KINDS else "unspecified"
    status_code = None
    for name in ("http.status_code", "rpc.grpc.status_code", "grpc.status_code"):
        if name in tags:
            value = tags[name]
            if type(value) is int:
                status_code = value
            elif isinstance(value, str) and value.isascii() and value.isdigit():
                status_code = int(value)
            else:
                problems.append(f"tag {name} {value!r} is not a status code")
            break
    error_tag = tags.get("error", False)
    if isinstance(error_tag, str) and error_tag.lower() in ("true", "false"):
        error_tag = error_tag.lower() == "true"
    if not isinstance(error_tag, bool):
        problems.append(f"tag error {error_tag!r} is not a boolean")
    if problems:
        return None, None, "; ".join(problems)

    def tag(name: str) -> str | None:
        return _text(process_tags.get(name)) or _text(tags.get(name))

    assert isinstance(service_name, str)
    service, dot, suffix = service_name.partition(".")
    k8s_namespace = tag("k8s.namespace.name")
    if k8s_namespace and dot and suffix != k8s_namespace:
        service = service_name  # not "<workload>.<namespace>": keep the name whole
    pod, deployment = tag("k8s.pod.name"), tag("k8s.deployment.name")
    start_us = numbers["startTime"]
    return start_us, {
        "trace_id": ids["traceID"],
        "span_id": ids["spanID"],
        "parent_span_id": parent.lower() if isinstance(parent, str) else None,
        "namespace": k8s_namespace or (suffix if dot else None) or namespace,
        "service": service,
        "pod": pod,
        "revision": _revision(deployment, tag("k8s.replicaset.name"), pod),
        "operation": operation,
        "kind": kind,
        "start_us": start_us,
        "duration_us": numbers["duration"],
        "status_code": status_code,
        "error": error_tag,
        "source": "jaeger",
        "schema_version": SCHEMA_VERSION,
    }, None


def _revision(deployment: str | None, replicaset: str | None, pod: str | None) -> str | None:
    """The pod template hash, only where the Deployment's name is given to strip it from."""
    if not deployment:
        return None
    prefix = deployment + "-"
    if replicaset and replicaset.startswith(prefix) and "-" not in replicaset[len(prefix):]:
        return replicaset[len(prefix):] or None
    if pod and pod.startswith(prefix):
        parts = pod[len(prefix):].split("-")
        if len(parts) == 2 and all(parts):
            return parts[0]
    return None


# --------------------------------------------------------------------------------------------
# Span kinds from the trace structure

# What the kind inference reads of a span: (trace_id, span_id, parent_span_id, service, kind).
SpanShape = tuple[str, str, str | None, str, str]


def infer_kinds(spans: Sequence[SpanShape], context: Iterable[SpanShape] = ()) -> list[
        tuple[SpanKind, str | None] | None]:
    """``(kind, peer_service)`` for each of ``spans`` whose kind is ``unspecified``, from its
    trace's structure as far as ``spans`` and ``context`` (other spans, seen as parents and
    children but not labelled) show it; None for a span to leave as it is.

    A span with a child in another service is the ``client`` span of a call to that service
    (``peer_service``: the service most of those children are in, ties to the first by name);
    otherwise a span whose parent is in another service, or that is a trace's root, is the
    ``server`` span of a request; a span whose parent is in its own service is ``internal``. A
    span whose parent is not among ``spans`` and ``context`` gets None (stays ``unspecified``),
    as does a span that already has another kind."""
    known = {(trace_id, span_id): (parent_id, service)
             for trace_id, span_id, parent_id, service, _ in itertools.chain(context, spans)}
    callees: dict[tuple[str, str], Counter[str]] = {}
    for (trace_id, _), (parent_id, service) in known.items():
        if parent_id is None:
            continue
        parent = known.get((trace_id, parent_id))
        if parent is not None and parent[1] != service:
            callees.setdefault((trace_id, parent_id), Counter())[service] += 1
    labels: list[tuple[SpanKind, str | None] | None] = []
    for trace_id, span_id, parent_id, service, kind in spans:
        if kind != "unspecified":
            labels.append(None)
            continue
        called = callees.get((trace_id, span_id))
        if called:
            labels.append(("client", min(called, key=lambda s: (-called[s], s))))
        elif parent_id is None:
            labels.append(("server", None))
        else:
            parent = known.get((trace_id, parent_id))
            labels.append(None if parent is None else
                          ("server", None) if parent[1] != service else ("internal", None))
    return labels


def _shape(candidate: Candidate) -> SpanShape | None:
    span = candidate.span
    if span is None:
        return None
    return (span["trace_id"], span["span_id"], span["parent_span_id"], span["service"],
            span["kind"])


def _with_kinds(files: Iterator[list[_Entry]]) -> Iterator[list[_Entry]]:
    """Each file's entries, the mapped spans of kind ``unspecified`` given the kinds (and a
    client span its ``peer_service`` and ``peer_namespace``) that :func:`infer_kinds` reads from
    that file and, as context, the file before it and the file after it."""
    previous: list[SpanShape] = []
    current = next(files, None)
    shapes = [] if current is None else [s for e in current if (s := _shape(e[4]))]
    while current is not None:
        following = next(files, None)
        following_shapes = [] if following is None else \
            [s for e in following if (s := _shape(e[4]))]
        mapped = [e[4].span for e in current if e[4].span is not None]
        for span, label in zip(mapped, infer_kinds(
                shapes, itertools.chain(previous, following_shapes)), strict=True):
            if label is not None:
                span["kind"], peer = label
                if peer is not None:
                    span["peer_service"], span["peer_namespace"] = peer, span["namespace"]
        yield current
        previous, current, shapes = shapes, following, following_shapes


# --------------------------------------------------------------------------------------------
# Replay

# (sort key, file index, row index, start_us or None, candidate): tuples compare on the first
# three, which are unique, so candidates are never compared.
_Entry = tuple[int, int, int, int | None, SourcedCandidate]


def _load(index: int, path: Path, namespace: str | None) -> list[_Entry]:
    """One file's spans sorted by start time; a row that could not be read keeps the place of
    the row before it."""
    entries: list[_Entry] = []
    key = 0
    try:
        for row, (start_us, candidate) in enumerate(read_spans(path, namespace=namespace)):
            if start_us is not None:
                key = start_us
            entries.append((key, index, row, start_us, candidate))
    except _GZIP_ERRORS as exc:
        raise ReplayFormatError(f"{path}: not readable as gzip after {len(entries)} spans: "
                                f"{exc}") from exc
    entries.sort()
    return entries


def _span_key(candidate: Candidate) -> tuple[str, str] | None:
    span = candidate.span
    if span is None:
        return None
    return span.get("trace_id"), span.get("span_id")  # type: ignore[return-value]


def _merged(files: Iterable[list[_Entry]]) -> Iterator[_Entry]:
    """The entries of already sorted files in start-time order, opening each file only when the
    replay reaches its first span (so only overlapping files and one look-ahead are held)."""
    pending = iter(files)
    upcoming = next(pending, None)
    heap: list[tuple[_Entry, Iterator[_Entry]]] = []
    while True:
        while upcoming is not None and (not heap or not upcoming
                                        or upcoming[0][:3] <= heap[0][0][:3]):
            entries = iter(upcoming)
            first = next(entries, None)
            if first is not None:
                heapq.heappush(heap, (first, entries))
            upcoming = next(pending, None)
        if not heap:
            return
        entry, entries = heap[0]
        yield entry
        following = next(entries, None)
        if following is None:
            heapq.heappop(heap)
        else:
            heapq.heapreplace(heap, (following, entries))


def replay_spans(sink: Sink, paths: Iterable[Path], *, speed: float | None = 1.0,
                 namespace: str | None = None, batch_size: int = 1000,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = time.sleep,
                 skip_duplicates: bool = True, kinds: bool = True) -> ReplayStats:
    """Replay span files through ``sink`` (receiver ``replay``), paced at ``speed`` times the
    recorded rate, or as fast as possible when ``speed`` is None; flushes the sink at the end.
    With ``kinds``, spans of kind ``unspecified`` are given the kinds their traces' structure
    says (:func:`infer_kinds`, each file with the file before and after it).

    Every file's format is checked before anything is published (:class:`ReplayFormatError`).
    See the module docstring for the order, pacing and duplicate rules.
    """
    if speed is not None and not (math.isfinite(speed) and speed > 0):
        raise ValueError(f"speed must be a positive number or None, not {speed!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size!r}")
    paths = [Path(p) for p in paths]
    for path in paths:
        detect_format(path)
    stats = ReplayStats()
    per_service: Counter[str] = Counter()
    began = clock()

    def loaded() -> Iterator[list[_Entry]]:
        previous: dict[tuple[str, str], tuple[bytes, str]] = {}
        for index, path in enumerate(paths):
            sink.request(RECEIVER)
            stats.files += 1
            entries = _load(index, path, namespace)
            stats.spans_read += len(entries)
            if not skip_duplicates:
                yield entries
                continue
            kept: list[_Entry] = []
            current: dict[tuple[str, str], tuple[bytes, str]] = {}
            for entry in entries:
                candidate = entry[4]
                key = _span_key(candidate)
                if key is not None:
                    earlier = previous.get(key) or current.get(key)
                    if earlier is not None:
                        if earlier[0] == candidate.original:
                            stats.duplicates += 1
                            continue
                        candidate = SourcedCandidate(
                            None, candidate.original,
                            f"{candidate.where}: trace {key[0]} span {key[1]} was already "
                            f"read ({earlier[1]}) with different content",
                            file=candidate.file, where=candidate.where)
                        entry = (*entry[:4], candidate)
                    else:
                        current[key] = (candidate.original, f"{candidate.file} {candidate.where}")
                kept.append(entry)
            previous = current
            yield kept

    batch: list[SourcedCandidate] = []

    def submit() -> None:
        if not batch:
            return
        result = sink.submit(RECEIVER, batch)
        rejected = {r.index: r.reason for r in result.rejected}
        for index, candidate in enumerate(batch):
            if index in rejected:
                if len(stats.rejections) < MAX_LISTED_REJECTIONS:
                    stats.rejections.append(
                        RejectedSpan(candidate.file, candidate.where, rejected[index]))
            elif candidate.span is not None:
                per_service[candidate.span["service"]] += 1
        stats.accepted += result.accepted
        stats.rejected += len(result.rejected)
        batch.clear()

    first_us: int | None = None
    replay_start = 0.0
    for _, _, _, start_us, candidate in _merged(_with_kinds(loaded()) if kinds else loaded()):
        if speed is not None and start_us is not None:
            if first_us is None:
                first_us, replay_start = start_us, clock()
            due = replay_start + (start_us - first_us) / 1e6 / speed
            now = clock()
            if due > now:
                submit()
                now = clock()
                if due > now:
                    sleep(due - now)
            else:
                stats.max_lag_seconds = max(stats.max_lag_seconds, now - due)
        batch.append(candidate)
        if len(batch) >= batch_size:
            submit()
    submit()
    stats.undelivered = sink.flush()
    stats.per_service = dict(sorted(per_service.items()))
    stats.wall_seconds = clock() - began
    return stats
