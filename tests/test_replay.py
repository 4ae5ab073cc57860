"""Trace replay (collectors/replay.py): real Nezha OnlineBoutique spans and a Jaeger export go
through a real SpanSink to the real Kafka of the local stack and are read back; pacing, ordering
and format detection are unit-tested with a stub sink (it stands in for our own SpanSink class,
not for an external server, so nothing about Kafka is faked)."""

from __future__ import annotations

import base64
import csv
import gzip
import itertools
import json
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from clover import records
from clover.config import Settings
from clover.records import DeadLetter, SpanRecord
from clover.topics import DEADLETTER, SPANS
from collectors.ingest import BatchResult, Candidate, Rejection, SpanSink
from collectors.replay import (
    NEZHA_HEADER,
    ReplayFormatError,
    ReplayStats,
    detect_format,
    read_jaeger,
    read_nezha,
    replay_spans,
)
from tests.conftest import SHARED_DATA, TopicReader

NEZHA_TRACES = SHARED_DATA / "nezha-onlineboutique-2022-08-22" / "trace"
# Three consecutive minutes; 03_54 and 03_55 overlap in time and repeat 373 spans.
NEZHA_FILES = ["03_53_trace.csv.gz", "03_54_trace.csv.gz", "03_55_trace.csv.gz"]
needs_nezha = pytest.mark.skipif(
    not all((NEZHA_TRACES / name).is_file() for name in NEZHA_FILES),
    reason=f"the Nezha OnlineBoutique traces are not at {NEZHA_TRACES} (they live in the shared "
           "data folder next to the project, which a clone of the project does not have)")

T0_NS = 1_661_140_374_351_773_094  # a start time from the Nezha data


class StubSink:
    """Records what the replay submits, and when (by the fake clock); like SpanSink, rejects a
    candidate with a problem or without a span, but accepts every mapped span unchecked."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.clock = clock
        self.requests = 0
        self.batches: list[tuple[float | None, list[Candidate]]] = []

    def request(self, receiver: str) -> None:
        assert receiver == "replay"
        self.requests += 1

    def submit(self, receiver: str, candidates: Iterable[Candidate]) -> BatchResult:
        batch = list(candidates)
        self.batches.append((self.clock.now if self.clock else None, batch))
        rejected = [Rejection(i, c.problem or "no span") for i, c in enumerate(batch)
                    if c.problem is not None or c.span is None]
        return BatchResult(accepted=len(batch) - len(rejected), rejected=rejected)

    def flush(self, timeout: float = 30.0) -> int:
        return 0

    def submitted(self) -> list[Candidate]:
        return [c for _, batch in self.batches for c in batch]


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds


def nezha_row(trace: str, span: str, parent: str, start_ns: int, duration_us: int = 1500,
              pod: str = "cartservice-579f59597d-wc2lz",
              operation: str = "hipstershop.CartService/GetCart") -> str:
    end_ns = start_ns + duration_us * 1000
    return f"{trace},{span},{parent},{pod},{operation},{start_ns},{end_ns},{duration_us}"


def write_csv(path: Path, rows: list[str], *, gzipped: bool = False) -> Path:
    data = "\n".join([NEZHA_HEADER, *rows]).encode() + b"\n"
    path.write_bytes(gzip.compress(data) if gzipped else data)
    return path


def new_trace() -> str:
    return uuid.uuid4().hex


def new_span() -> str:
    return uuid.uuid4().hex[:16]


# --------------------------------------------------------------------------------------------
# Real Nezha data through real Kafka


def expected_from_csv(paths: list[Path]) -> tuple[Counter[str], int, dict[tuple[str, str], list]]:
    """Per-service counts of distinct spans, the number of repeats, and every row by its ids,
    computed with the csv module alone."""
    rows: dict[tuple[str, str], list[str]] = {}
    repeats = 0
    for path in paths:
        with gzip.open(path, "rt", newline="") as stream:
            reader = csv.reader(stream)
            assert next(reader) == NEZHA_HEADER.split(",")
            for row in reader:
                key = (row[0], row[1])
                if key in rows:
                    assert rows[key] == row  # a repeat is the identical row
                    repeats += 1
                else:
                    rows[key] = row
    services = Counter("-".join(row[3].split("-")[:-2]) for row in rows.values())
    return services, repeats, rows


@pytest.fixture(scope="module")
def nezha_replay(settings: Settings, kafka_topics: Any) -> Iterator[dict[str, Any]]:
    """The three Nezha files replayed once, as fast as possible, and everything read back."""
    if not all((NEZHA_TRACES / name).is_file() for name in NEZHA_FILES):
        pytest.skip(f"the Nezha traces are not at {NEZHA_TRACES}")
    paths = [NEZHA_TRACES / name for name in NEZHA_FILES]
    spans_reader, dead_reader = TopicReader(settings, SPANS.name), \
        TopicReader(settings, DEADLETTER.name)
    sink = SpanSink(settings)
    try:
        stats = replay_spans(sink, paths, speed=None)
        services, repeats, rows = expected_from_csv(paths)
        published: dict[tuple[str, str], list[SpanRecord]] = {}
        for message in spans_reader.read_all(timeout=120):
            record = records.decode(SpanRecord, message.value())
            if record.source == "nezha" and (record.trace_id, record.span_id) in rows:
                published.setdefault((record.trace_id, record.span_id), []).append(record)
        letters = [records.decode(DeadLetter, m.value()) for m in dead_reader.read_all()]
        ours = [d for d in letters if d.source_topic == "receiver.replay"
                and base64.b64decode(d.value_b64).split(b",")[0].decode(errors="replace")
                in {trace for trace, _ in rows}]
        yield {"stats": stats, "services": services, "repeats": repeats, "rows": rows,
               "published": published, "dead_letters": ours, "sink": sink}
    finally:
        sink.close()
        spans_reader.close()
        dead_reader.close()


@needs_nezha
def test_nezha_replay_publishes_every_span_once_per_service(nezha_replay: dict) -> None:
    stats: ReplayStats = nezha_replay["stats"]
    published = nezha_replay["published"]
    expected: Counter[str] = nezha_replay["services"]
    assert nezha_replay["dead_letters"] == []  # the data has no malformed row
    assert stats.rejected == 0 and stats.rejections == []
    # Every distinct span exactly once: the rows the next minute's file repeats are skipped.
    assert all(len(copies) == 1 for copies in published.values())
    assert set(published) == set(nezha_replay["rows"])
    assert Counter(r[0].service for r in published.values()) == expected
    assert stats.per_service == dict(expected)
    assert stats.duplicates == nezha_replay["repeats"] == 373
    assert stats.files == 3 and stats.undelivered == 0
    assert stats.spans_read == sum(expected.values()) + stats.duplicates
    assert stats.accepted == sum(expected.values())
    sink = nezha_replay["sink"]
    assert sink.registry.get_sample_value(
        "clover_receiver_requests_total", {"receiver": "replay"}) == 3
    assert sink.registry.get_sample_value(
        "clover_receiver_spans_accepted_total", {"receiver": "replay"}) == stats.accepted


def structure(rows: dict[tuple[str, str], list[str]], key: tuple[str, str]) -> tuple[
        str, str | None]:
    """(kind, peer service) of a CSV row by the rule, from the rows themselves (a slow scan)."""
    def service(row: list[str]) -> str:
        return "-".join(row[3].split("-")[:-2])

    row = rows[key]
    callees = Counter(service(r) for k, r in rows.items()
                      if k[0] == key[0] and r[2] == key[1] and service(r) != service(row))
    if callees:
        [(peer, _)] = callees.most_common(1)
        return "client", peer
    if row[2] == "root":
        return "server", None
    parent = rows.get((key[0], row[2]))
    if parent is None:
        return "unspecified", None
    return ("server" if service(parent) != service(row) else "internal"), None


@needs_nezha
def test_a_replayed_nezha_span_matches_its_csv_row(nezha_replay: dict) -> None:
    rows = nezha_replay["rows"]
    root = next(key for key, row in rows.items() if row[2] == "root")
    child = next(key for key, row in rows.items()
                 if row[3].startswith("cartservice-") and row[2] != "root")
    caller = next(key for key, row in rows.items() if row[3].startswith("frontend-")
                  and row[4] == "hipstershop.CartService/GetCart")
    internal = next(key for key, row in rows.items() if row[4] == "sql.conn.query")
    kinds = {}
    for key in (root, child, caller, internal):
        trace_id, span_id, parent, pod, operation, start_ns, end_ns, duration = rows[key]
        [record] = nezha_replay["published"][key]
        kind, peer = structure(rows, key)
        assert record == SpanRecord(
            trace_id=trace_id, span_id=span_id,
            parent_span_id=None if parent == "root" else parent,
            namespace=None, service="-".join(pod.split("-")[:-2]), pod=pod,
            revision=pod.split("-")[-2], operation=operation, kind=kind,  # type: ignore[arg-type]
            start_us=int(start_ns) // 1000, duration_us=int(duration), status_code=None,
            error=False, source="nezha", peer_service=peer)
        assert int(duration) == (int(end_ns) - int(start_ns)) // 1000
        kinds[key] = kind, peer
    assert kinds[root] == ("server", None)
    assert kinds[caller] == ("client", "cartservice")
    assert kinds[internal] == ("internal", None)
    [child_record] = nezha_replay["published"][child]
    assert child_record.service == "cartservice" and child_record.revision == "579f59597d"
    # Every span got a kind: no trace of these minutes lacks a parent.
    assert not any(r[0].kind == "unspecified" for r in nezha_replay["published"].values())


# --------------------------------------------------------------------------------------------
# Pacing and order (stub sink, fake clock)


def test_pacing_keeps_the_recorded_inter_arrival_times_divided_by_speed(tmp_path: Path) -> None:
    offsets_ms = [0, 40, 40, 250, 1000, 1000, 1000, 3200, 3205, 9000]
    rows = [nezha_row(new_trace(), new_span(), "root", T0_NS + ms * 1_000_000)
            for ms in offsets_ms]
    # Shuffled in the file (the Nezha files are grouped by trace, not ordered by time).
    order = [3, 0, 9, 1, 5, 2, 8, 4, 7, 6]
    first = write_csv(tmp_path / "a.csv", [rows[i] for i in order[:6]])
    second = write_csv(tmp_path / "b.csv", [rows[i] for i in order[6:]], gzipped=True)
    clock = FakeClock()
    sink = StubSink(clock)
    stats = replay_spans(sink, [first, second], speed=10, clock=clock, sleep=clock.sleep,
                         batch_size=2)

    start_us = [T0_NS // 1000 + ms * 1000 for ms in offsets_ms]
    submitted = [(at, c.span["start_us"]) for at, batch in sink.batches for c in batch
                 if c.span is not None]
    assert [s for _, s in submitted] == start_us  # in time order across files
    for at, span_start in submitted:
        assert at == pytest.approx(1000.0 + (span_start - start_us[0]) / 1e6 / 10)
    due = sorted({(s - start_us[0]) / 1e6 / 10 for s in start_us})
    assert clock.sleeps == pytest.approx([b - a for a, b in zip(due[:-1], due[1:], strict=True)])
    assert all(len(batch) <= 2 for _, batch in sink.batches)
    assert sink.requests == 2 and stats.files == 2 and stats.accepted == 10
    assert stats.wall_seconds == pytest.approx(0.9) and stats.max_lag_seconds == 0


def test_as_fast_as_possible_never_sleeps_and_batches(tmp_path: Path) -> None:
    rows = [nezha_row(new_trace(), new_span(), "root", T0_NS + i * 10**9) for i in range(25)]
    path = write_csv(tmp_path / "spans.csv", rows)
    clock = FakeClock()
    sink = StubSink(clock)
    stats = replay_spans(sink, [path], speed=None, batch_size=10, clock=clock, sleep=clock.sleep)
    assert clock.sleeps == []
    assert [len(batch) for _, batch in sink.batches] == [10, 10, 5]
    assert stats.spans_read == stats.accepted == 25


def test_a_slow_sink_shows_as_lag_without_drift(tmp_path: Path) -> None:
    rows = [nezha_row(new_trace(), new_span(), "root", T0_NS + i * 10**8) for i in range(5)]
    path = write_csv(tmp_path / "spans.csv", rows)
    clock = FakeClock()

    class SlowSink(StubSink):
        def submit(self, receiver: str, candidates: Iterable[Candidate]) -> BatchResult:
            result = super().submit(receiver, candidates)
            clock.now += 0.25  # each submit takes 0.25 s; spans are due every 0.1 s
            return result

    sink = SlowSink(clock)
    stats = replay_spans(sink, [path], speed=1, clock=clock, sleep=clock.sleep, batch_size=1)
    assert clock.sleeps == []  # always behind: no sleep, and the schedule stays absolute
    assert stats.max_lag_seconds == pytest.approx(4 * 0.25 - 0.4)


def test_overlapping_files_merge_in_time_order_and_repeats_are_skipped(tmp_path: Path) -> None:
    trace = new_trace()
    spans = [new_span() for _ in range(6)]
    at = [T0_NS + s * 10**9 for s in range(6)]
    repeated = nezha_row(trace, spans[3], "root", at[3])
    first = write_csv(tmp_path / "03_53.csv", [
        nezha_row(trace, spans[4], spans[3], at[4]), repeated,
        nezha_row(trace, spans[0], spans[3], at[0]), nezha_row(trace, spans[2], spans[3], at[2])])
    changed = nezha_row(trace, spans[2], spans[3], at[2], duration_us=7)
    second = write_csv(tmp_path / "03_54.csv", [
        nezha_row(trace, spans[5], spans[3], at[5]), repeated, changed,
        nezha_row(trace, spans[1], spans[3], at[1])])
    sink = StubSink()
    stats = replay_spans(sink, [first, second], speed=None)
    submitted = sink.submitted()
    readable = [c.span["span_id"] for c in submitted if c.span is not None]
    assert readable == [spans[i] for i in (0, 1, 2, 3, 4, 5)]  # merged by start time
    [conflict] = [c for c in submitted if c.span is None]
    assert conflict.original == changed.encode()
    assert conflict.problem == (f"line 4: trace {trace} span {spans[2]} was already read "
                                "(03_53.csv line 5) with different content")
    assert stats.duplicates == 1 and stats.spans_read == 8 and stats.files == 2

    again = StubSink()
    stats = replay_spans(again, [first, second], speed=None, skip_duplicates=False)
    assert stats.duplicates == 0 and len(again.submitted()) == 8


# --------------------------------------------------------------------------------------------
# Span kinds from the trace structure (stub sink)


def test_span_kinds_come_from_the_trace_across_file_boundaries(tmp_path: Path) -> None:
    trace = new_trace()
    ids = {name: new_span() for name in ("R", "C", "D", "X1", "X2", "S", "I", "J", "Y")}

    def row(name: str, parent: str | None, service: str, second: int) -> str:
        return nezha_row(trace, ids[name], "root" if parent is None else ids[parent],
                         T0_NS + second * 10**9, pod=f"{service}-579f59597d-abcde",
                         operation=f"op-{name}")

    # Three minute files that do not overlap in time; the trace runs through all three.
    first = write_csv(tmp_path / "03_53.csv", [
        row("R", None, "frontend", 0),             # root; its child Y is two files on
        row("C", "R", "frontend", 1),              # calls cartservice: S is in the next file
        row("D", "R", "frontend", 2),              # calls currencyservice (here) and adservice
        row("X1", "D", "currencyservice", 3),      # (next file): a tie, the first by name wins
    ])
    second = write_csv(tmp_path / "03_54.csv", [
        row("S", "C", "cartservice", 60),          # its parent is in the previous file
        row("X2", "D", "adservice", 61),
        row("I", "S", "cartservice", 62),
    ])
    third = write_csv(tmp_path / "03_55.csv", [
        row("J", "I", "cartservice", 120),         # parent in the previous file: internal
        row("Y", "R", "cartservice", 121),         # parent two files back: not known
    ])
    sink = StubSink()
    stats = replay_spans(sink, [first, second, third], speed=None, namespace="shop")
    assert stats.accepted == 9
    by_id = {c.span["span_id"]: c.span for c in sink.submitted() if c.span is not None}
    got = {name: (by_id[i]["kind"], by_id[i].get("peer_service"),
                  by_id[i].get("peer_namespace")) for name, i in ids.items()}
    assert got == {
        "R": ("server", None, None), "C": ("client", "cartservice", "shop"),
        "D": ("client", "adservice", "shop"), "X1": ("server", None, None),
        "X2": ("server", None, None), "S": ("server", None, None),
        "I": ("internal", None, None), "J": ("internal", None, None),
        "Y": ("unspecified", None, None),
    }
    # The mapped spans are valid records with those kinds.
    assert records.from_dict(SpanRecord, by_id[ids["C"]]).peer_service == "cartservice"

    plain = StubSink()
    replay_spans(plain, [first, second, third], speed=None, namespace="shop", kinds=False)
    assert {c.span["kind"] for c in plain.submitted() if c.span is not None} == {"unspecified"}
    assert not any("peer_service" in c.span for c in plain.submitted() if c.span is not None)

    # All of the trace in one unit (as the evaluation's infer_span_kinds reads spans in
    # memory): the edges above then resolve, R calls cartservice and Y serves it.
    from models.evaluate import infer_span_kinds

    whole = {s.span_id: s for s in infer_span_kinds(
        [records.from_dict(SpanRecord, c.span) for c in plain.submitted() if c.span])}
    assert (whole[ids["R"]].kind, whole[ids["R"]].peer_service) == ("client", "cartservice")
    assert whole[ids["Y"]].kind == "server"
    assert {n: whole[i].kind for n, i in ids.items() if n not in ("R", "Y")} == \
        {n: k for n, (k, _, _) in got.items() if n not in ("R", "Y")}


def test_spans_with_a_real_kind_are_left_as_they_are(tmp_path: Path) -> None:
    trace, t0 = new_trace(), T0_NS // 1000

    def span(span_id: str, parent: str | None, process: str, kind: str | None) -> dict[str, Any]:
        return {"traceID": trace, "spanID": span_id, "operationName": f"op-{span_id[0]}",
                "references": [] if parent is None else
                [{"refType": "CHILD_OF", "traceID": trace, "spanID": parent}],
                "startTime": t0 + int(span_id[0]), "duration": 100, "processID": process,
                "tags": [] if kind is None else [{"key": "span.kind", "type": "string",
                                                  "value": kind}]}

    p, q, r, w = "1" * 16, "2" * 16, "3" * 16, "4" * 16
    export = {"data": [{"traceID": trace, "spans": [
        span(p, None, "front", "server"),  # the structure says client (child in cart): kept
        span(q, p, "cart", "client"),      # the structure says server: kept
        span(r, q, "cart", None),          # no kind: calls redis, so client
        span(w, r, "redis", None),         # no kind: parent in cart, so server
    ], "processes": {"front": {"serviceName": "frontend.shop"},
                     "cart": {"serviceName": "cartservice.shop"},
                     "redis": {"serviceName": "redis.shop"}}}]}
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export))
    sink = StubSink()
    replay_spans(sink, [path], speed=None)
    got = {c.span["span_id"]: (c.span["kind"], c.span.get("peer_service"))
           for c in sink.submitted() if c.span is not None}
    assert got == {p: ("server", None), q: ("client", None), r: ("client", "redis"),
                   w: ("server", None)}


# --------------------------------------------------------------------------------------------
# Malformed rows, formats, gzip


def test_malformed_csv_rows_are_dead_lettered_with_their_line_numbers(
        tmp_path: Path, settings: Settings, topic_reader: Any) -> None:
    trace = new_trace()
    good = [nezha_row(trace, new_span(), "root", T0_NS + i * 1000) for i in range(3)]
    bad_id = nezha_row(trace, "not-a-span-id!!!", "root", T0_NS + 5000)
    rows = [
        good[0],
        nezha_row(trace, new_span(), "root", T0_NS)[:-5],  # line 3: a truncated row
        good[1],
        nezha_row(trace, new_span(), "root", T0_NS).replace(",1500", ",1.5e3"),  # line 5
        f"{trace},{new_span()},root,cartservice,op,{T0_NS},{T0_NS},5",  # line 6: bad pod
        bad_id,  # line 7: maps, but the schema refuses the span id
        good[2],
    ]
    path = write_csv(tmp_path / "bad.csv", rows)
    spans_reader, dead_reader = topic_reader(SPANS.name), topic_reader(DEADLETTER.name)
    sink = SpanSink(settings)
    stats = replay_spans(sink, [path], speed=None)
    sink.close()

    assert stats.accepted == 3 and stats.rejected == 4
    published = [records.decode(SpanRecord, m.value()) for m in spans_reader.read_all()]
    assert sorted(s.span_id for s in published if s.trace_id == trace) == \
        sorted(row.split(",")[1] for row in good)
    letters = {base64.b64decode(d.value_b64): d
               for d in (records.decode(DeadLetter, m.value()) for m in dead_reader.read_all())
               if d.source_topic == "receiver.replay"}
    ours = {value: d for value, d in letters.items() if value.startswith(trace.encode())}
    assert set(ours) == {rows[1].encode(), rows[3].encode(), rows[4].encode(), bad_id.encode()}
    assert ours[rows[1].encode()].reason.startswith("line 3: 7 fields, expected 8")
    assert ours[rows[3].encode()].reason == \
        "line 5: Duration '1.5e3' is not a non-negative integer"
    assert ours[rows[4].encode()].reason.startswith("line 6: PodName 'cartservice' is not")
    assert "span_id" in ours[bad_id.encode()].reason
    assert ours[bad_id.encode()].component == "replay-receiver"
    # The stats locate every rejected row, the schema's refusals included.
    assert [(r.file, r.where) for r in stats.rejections] == \
        [("bad.csv", f"line {n}") for n in (3, 5, 6, 7)]


def test_an_unknown_format_is_a_clear_error(tmp_path: Path) -> None:
    unknown = tmp_path / "spans.csv"
    unknown.write_text("trace,span,service\n1,2,cart\n")
    with pytest.raises(ReplayFormatError) as error:
        detect_format(unknown)
    message = str(error.value)
    assert str(unknown) in message and "unknown span file format" in message
    assert NEZHA_HEADER in message and "Jaeger JSON" in message
    assert "'trace,span,service'" in message

    zipped = tmp_path / "spans.csv.gz"
    zipped.write_bytes(gzip.compress(b"\x00\x01binary"))
    empty = tmp_path / "empty.json"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.gz"
    corrupt.write_bytes(gzip.compress(NEZHA_HEADER.encode() * 100)[:40])
    with pytest.raises(ReplayFormatError, match="spans.csv.gz: unknown span file format"):
        detect_format(zipped)
    with pytest.raises(ReplayFormatError, match="but it is empty"):
        detect_format(empty)
    with pytest.raises(ReplayFormatError, match="corrupt.gz: not readable as gzip"):
        detect_format(corrupt)
    not_jaeger = tmp_path / "other.json"
    not_jaeger.write_text('{"traces": []}')
    with pytest.raises(ReplayFormatError, match="list of traces under \"data\""):
        list(read_jaeger(not_jaeger))

    # Every file is checked before anything is published.
    good = write_csv(tmp_path / "good.csv", [nezha_row(new_trace(), new_span(), "root", T0_NS)])
    sink = StubSink()
    with pytest.raises(ReplayFormatError, match="spans.csv"):
        replay_spans(sink, [good, unknown], speed=None)
    assert sink.batches == [] and sink.requests == 0


def test_plain_and_gzipped_csv_give_the_same_result(tmp_path: Path) -> None:
    rows: list[str] = []
    if (NEZHA_TRACES / NEZHA_FILES[0]).is_file():  # real rows too when the data is there
        with gzip.open(NEZHA_TRACES / NEZHA_FILES[0], "rt") as stream:
            rows = [line.rstrip("\n") for line in itertools.islice(stream, 1, 2001)]
    trace = new_trace()
    rows += [nezha_row(trace, new_span(), "root", T0_NS + i) for i in range(50)]
    rows.append("a,broken,row")
    plain = write_csv(tmp_path / "plain.csv", rows)
    zipped = write_csv(tmp_path / "plain.csv.txt", rows, gzipped=True)  # the name says nothing
    assert zipped.read_bytes()[:2] == b"\x1f\x8b"
    assert detect_format(plain) == detect_format(zipped) == "nezha"

    def read(path: Path) -> list:
        return [(start, c.span, c.original, c.problem, c.where) for start, c in read_nezha(path)]

    assert read(plain) == read(zipped)
    assert len(read(plain)) == len(rows)
    results = []
    for path in (plain, zipped):
        sink = StubSink()
        stats = replay_spans(sink, [path], speed=None)
        results.append(([(c.span, c.original, c.problem) for c in sink.submitted()],
                        stats.per_service, stats.accepted, stats.spans_read))
    assert results[0] == results[1]


def test_crlf_lines_and_a_bom_are_read(tmp_path: Path) -> None:
    row = nezha_row(new_trace(), new_span(), "root", T0_NS)
    path = tmp_path / "windows.csv"
    path.write_bytes(b"\xef\xbb\xbf" + f"{NEZHA_HEADER}\r\n{row}\r\n\r\n".encode())
    [(start_us, candidate)] = list(read_nezha(path))
    assert candidate.problem is None and candidate.original == row.encode()
    assert start_us == T0_NS // 1000
    assert candidate.span is not None and candidate.span["duration_us"] == 1500


# --------------------------------------------------------------------------------------------
# Jaeger JSON through real Kafka


def jaeger_export(first: str, second: str, bad_span_id: str) -> dict[str, Any]:
    """Two traces, four spans, the shape of Jaeger UI's "Download JSON"."""
    t0 = T0_NS // 1000

    def tag(key: str, value: Any) -> dict[str, Any]:
        kind = {bool: "bool", int: "int64", str: "string"}[type(value)]
        return {"key": key, "type": kind, "value": value}

    return {"data": [
        {"traceID": first, "spans": [
            {"traceID": first, "spanID": "A1B2C3D4E5F60718", "flags": 1,
             "operationName": "GET /cart", "references": [], "startTime": t0,
             "duration": 5400, "tags": [tag("span.kind", "server"),
                                        tag("http.status_code", "200"),
                                        tag("component", "proxy")],
             "logs": [], "processID": "p1", "warnings": None},
            {"traceID": first, "spanID": "1111222233334444", "flags": 1,
             "operationName": "cart.shop.svc.cluster.local:7070/*",
             "references": [{"refType": "CHILD_OF", "traceID": first,
                             "spanID": "A1B2C3D4E5F60718"}],
             "startTime": t0 + 300, "duration": 4800,
             "tags": [tag("span.kind", "client"), tag("http.status_code", 503),
                      tag("error", True)],
             "logs": [], "processID": "p1", "warnings": None},
        ], "processes": {
            "p1": {"serviceName": "frontend.shop", "tags": [tag("ip", "10.1.2.3")]},
        }, "warnings": None},
        {"traceID": second, "spans": [
            {"traceID": second, "spanID": "5555666677778888", "flags": 1,
             "operationName": "hipstershop.CartService/GetCart", "references": [],
             "startTime": t0 + 1000, "duration": 900, "tags": [tag("span.kind", "server")],
             "processID": "p1"},
            {"traceID": second, "spanID": bad_span_id, "flags": 1,
             "operationName": "redis GET", "references": [
                 {"refType": "FOLLOWS_FROM", "traceID": second, "spanID": "9999999999999999"},
                 {"refType": "CHILD_OF", "traceID": second, "spanID": "5555666677778888"}],
             "startTime": t0 + 1100, "duration": 300, "tags": [tag("error", "false")],
             "processID": "p2"},
        ], "processes": {
            "p1": {"serviceName": "cartservice", "tags": [
                tag("k8s.namespace.name", "boutique"),
                tag("k8s.pod.name", "cartservice-579f59597d-wc2lz"),
                tag("k8s.deployment.name", "cartservice")]},
            "p2": {"serviceName": "cartservice", "tags": []},
        }},
    ]}


def test_jaeger_export_is_mapped_and_its_invalid_span_dead_lettered(
        tmp_path: Path, settings: Settings, topic_reader: Any) -> None:
    first, second = new_trace(), new_trace()[:16]  # a 128-bit and a 64-bit trace id
    bad_span_id = "not-hex-span-id!"
    export = jaeger_export(first, second, bad_span_id)
    path = tmp_path / "jaeger-download.json"
    path.write_text("\n  " + json.dumps(export, indent=2))
    assert detect_format(path) == "jaeger"
    spans_reader, dead_reader = topic_reader(SPANS.name), topic_reader(DEADLETTER.name)
    sink = SpanSink(settings)
    stats = replay_spans(sink, [path], speed=None, namespace="default")
    sink.close()

    assert (stats.accepted, stats.rejected, stats.spans_read) == (3, 1, 4)
    assert stats.per_service == {"cartservice": 1, "frontend": 2}
    published = {s.span_id: s for s in (records.decode(SpanRecord, m.value())
                                        for m in spans_reader.read_all())
                 if s.trace_id in (first, second)}
    t0 = T0_NS // 1000
    assert published == {
        "a1b2c3d4e5f60718": SpanRecord(
            trace_id=first, span_id="a1b2c3d4e5f60718", parent_span_id=None,
            namespace="shop", service="frontend", pod=None, revision=None,
            operation="GET /cart", kind="server", start_us=t0, duration_us=5400,
            status_code=200, error=False, source="jaeger"),
        "1111222233334444": SpanRecord(
            trace_id=first, span_id="1111222233334444", parent_span_id="a1b2c3d4e5f60718",
            namespace="shop", service="frontend", pod=None, revision=None,
            operation="cart.shop.svc.cluster.local:7070/*", kind="client", start_us=t0 + 300,
            duration_us=4800, status_code=503, error=True, source="jaeger"),
        "5555666677778888": SpanRecord(
            trace_id=second, span_id="5555666677778888", parent_span_id=None,
            namespace="boutique", service="cartservice", pod="cartservice-579f59597d-wc2lz",
            revision="579f59597d", operation="hipstershop.CartService/GetCart",
            kind="server", start_us=t0 + 1000, duration_us=900, status_code=None,
            error=False, source="jaeger"),
    }
    [letter] = [d for d in (records.decode(DeadLetter, m.value()) for m in dead_reader.read_all())
                if d.source_topic == "receiver.replay"
                and second in base64.b64decode(d.value_b64).decode(errors="replace")]
    assert json.loads(base64.b64decode(letter.value_b64)) == export["data"][1]["spans"][1]
    assert "span_id" in letter.reason and "(rule: pattern)" in letter.reason
    assert letter.key() == b"default/cartservice"  # no namespace in p2: the argument's
    assert [(r.file, r.where) for r in stats.rejections] == \
        [("jaeger-download.json", "trace 1, span 1")]


def test_jaeger_spans_that_cannot_be_mapped_say_where_they_are(tmp_path: Path) -> None:
    trace = new_trace()
    export = {"data": [
        {"traceID": trace, "spans": [
            {"traceID": trace, "spanID": "1111222233334444", "operationName": "x",
             "startTime": "soon", "duration": 5, "processID": "p1"},
            {"traceID": trace, "spanID": "1111222233334445", "operationName": "x",
             "startTime": 5, "duration": 5, "processID": "p9"},
            "not a span",
        ], "processes": {"p1": {"serviceName": "cart"}}},
        {"traceID": trace},
    ]}
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export))
    problems = [c.problem for _, c in read_jaeger(path)]
    assert problems == [
        "trace 0, span 0: startTime 'soon' is not an integer (microseconds)",
        "trace 0, span 1: processID 'p9' is not in the trace's processes",
        "trace 0, span 2: not a JSON object",
        "trace 1: not an object with a list of \"spans\"",
    ]
