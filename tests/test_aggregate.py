"""The aggregation worker (`clover stream worker`) against the real Kafka and Cassandra.

Every test runs real worker processes in their own consumer group, writing to their own
Cassandra keyspace, on records of their own namespace; the expected rows are computed offline
by analytics.windows.aggregate over exactly the records the test produced.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
from cassandra import InvalidRequest
from cassandra.cluster import NoHostAvailable
from confluent_kafka import Consumer, Producer, TopicPartition

from analytics.store import connect
from analytics.windows import aggregate
from clover import records
from clover.config import Settings, load_settings
from clover.kafka import consumer_config, producer_config
from clover.records import DeadLetter, Endpoint, FlowRecord, ServiceMetrics, SpanRecord
from clover.stack import Stack
from clover.topics import DEADLETTER, FLOWS, SPANS
from tests.conftest import SHARED_DATA, TopicReader

WINDOW_S = 2
DAY_US = 86_400_000_000


def now_base_us() -> int:
    """A window boundary half a minute ahead of the wall clock: the test's records then have
    event times like live traffic's (a little ahead), so records that other producers put on the
    shared topics meanwhile do not move a partition's event time past the test's windows."""
    return (time.time_ns() // 1000 // 10_000_000 + 3) * 10_000_000


NEZHA_FILE = SHARED_DATA / "nezha-onlineboutique-2022-08-22" / "trace" / "03_54_trace.csv.gz"


@dataclass
class Pipeline:
    """One test's consumer group and keyspace, and its worker processes."""

    settings: Settings
    env: dict[str, str]
    logs: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_worker(self) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"worker-{len(self.workers)}.log", "wb")  # noqa: SIM115
        worker = subprocess.Popen([sys.executable, "-m", "clover.cli", "stream", "worker"],
                                  env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.workers.append(worker)
        return worker

    def rows(self, namespace: str, services: set[str],
             around_us: int | None = None) -> list[ServiceMetrics]:
        """The stored rows of these services within a day of ``around_us`` (default: now)."""
        around_us = time.time_ns() // 1000 if around_us is None else around_us
        with connect(self.settings) as store:
            keyspace = store.session.cluster.metadata.keyspaces.get(store.keyspace)
            if keyspace is None or "service_metrics" not in keyspace.tables:
                return []  # the worker has not created its tables yet
            found = []
            try:
                for service in sorted(services):
                    found += store.read_service_metrics(namespace, service, around_us - DAY_US,
                                                        around_us + DAY_US)
            except (InvalidRequest, NoHostAvailable):
                # The worker's new table is not in every part of Cassandra's schema yet
                # (2.1 answers "unconfigured columnfamily" or "Unknown CF" for a moment).
                return []
            return found

    def wait_for_rows(self, namespace: str, expected: list[ServiceMetrics],
                      timeout: float = 90.0) -> list[ServiceMetrics]:
        """The rows once they equal the expected ones (or whatever is there at the timeout)."""
        services = {r.service for r in expected}
        around_us = expected[0].window_start_us
        deadline = time.monotonic() + timeout
        while True:
            found = self.rows(namespace, services, around_us)
            if _comparable(found) == _comparable(expected) or time.monotonic() > deadline:
                return found
            self.assert_workers_alive()
            time.sleep(1)

    def assert_workers_alive(self) -> None:
        for worker in self.workers:
            if worker.poll() is not None and worker.returncode != -signal.SIGKILL:
                pytest.fail(f"a worker exited with {worker.returncode}; see {self.logs}")

    def stop(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                worker.terminate()
        for worker in self.workers:
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()


@pytest.fixture
def pipeline(kafka_topics: dict[str, str], tmp_path: Path) -> Iterator[Pipeline]:
    group = f"test-aggregate-{uuid.uuid4().hex[:10]}"
    env = dict(os.environ, CLOVER_STREAMS_APP_ID=group,
               CLOVER_CASSANDRA_KEYSPACE=group.replace("-", "_"),
               CLOVER_STREAMS_WINDOW_SECONDS=str(WINDOW_S),
               CLOVER_STREAMS_ALLOWED_LATENESS_SECONDS="1",
               CLOVER_STREAMS_IDLE_CLOSE_SECONDS="2", CLOVER_STREAMS_METRICS_PORT="0")
    settings = load_settings(environ=env)
    _start_group_at_the_end(settings, group)
    pipeline = Pipeline(settings, env, tmp_path)
    yield pipeline
    pipeline.stop()
    with connect(settings) as store:
        store.session.execute(f"DROP KEYSPACE IF EXISTS {settings.cassandra.keyspace}",
                              timeout=60)


def _start_group_at_the_end(settings: Settings, group: str) -> None:
    """Commit the topics' current end offsets for the new group, so its workers read exactly
    what the test produces from here on (the topics are shared with other tests)."""
    consumer = Consumer(consumer_config(settings, group_id=group))
    try:
        ends = []
        for topic in (SPANS.name, FLOWS.name):
            partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            for partition in partitions:
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), 10)
                ends.append(TopicPartition(topic, partition, high))
        consumer.commit(offsets=ends, asynchronous=False)
    finally:
        consumer.close()


def make_spans(namespace: str, count: int, services: int = 6, seed: int = 1) -> list[SpanRecord]:
    """Spans over many windows, mostly in time order with some disorder within the lateness."""
    rng = random.Random(seed)
    base_us = now_base_us()
    spans = []
    for i in range(count):
        end_us = base_us + i * 4_000 + rng.randint(0, 300_000)
        duration = rng.randint(500, 80_000)
        # Client spans are calls of an earlier server span of their service (which ends
        # before or after them, in the same window or another), so requests have call
        # patterns.
        parent = i - services if i % 5 == 0 and i >= services else None
        spans.append(SpanRecord(
            trace_id=f"{(i if parent is None else parent) + 1:032x}", span_id=f"{i + 1:016x}",
            parent_span_id=None if parent is None else f"{parent + 1:016x}",
            service=f"svc{i % services}",
            operation=f"call svc{(i + 1) % services}" if i % 5 == 0 else "GET /",
            kind="server" if i % 5 else "client",
            start_us=end_us - duration, duration_us=duration, error=rng.random() < 0.05,
            source="otlp", namespace=namespace, revision=f"rev{i % 2}",
            peer_namespace=namespace if i % 5 == 0 else None,
            peer_service=f"svc{(i + 1) % services}" if i % 5 == 0 else None,
            bytes_sent=rng.randint(0, 5000), bytes_received=rng.randint(0, 5000)))
    # Out of order by less than a second: within the tests' allowed lateness.
    spans.sort(key=lambda s: s.start_us + s.duration_us + rng.randint(0, 500_000))
    return spans


def make_flows(namespace: str, spans: list[SpanRecord], seed: int = 1) -> list[FlowRecord]:
    """TCP connections to the spans' services within the spans' time range: closed and reset
    ones, both sides of some (two records, one connection), and open updates (not counted)."""
    rng = random.Random(seed)
    first = min(s.start_us + s.duration_us for s in spans)
    last = max(s.start_us + s.duration_us for s in spans)
    flows = []
    for i in range(len(spans) // 10):
        end_us = first + (last - first) * i // (len(spans) // 10)
        duration = rng.randint(100, 3_000_000)
        states: list[Literal["closed", "reset", "open"]] = ["closed", "closed", "reset", "open"]
        state = rng.choice(states)
        service = f"svc{i % 6}"
        for side in (("src", "dst") if i % 3 == 0 else ("src",)):
            flows.append(FlowRecord(
                observer="tcp_lifecycle", node="n1", protocol="tcp", ip_version=4,
                src=Endpoint("10.1.0.1", 30000 + i, namespace, "client", "client-1", "c1"),
                dst=Endpoint("10.1.0.2", 8080, namespace, service, f"{service}-1", "rev0"),
                bytes_sent=rng.randint(0, 10_000), bytes_received=rng.randint(0, 10_000),
                packets_sent=3, packets_received=4, start_us=end_us - duration,
                duration_us=duration, end_us=None if state == "open" else end_us,
                state=state, observed_at=side))
    return flows


def produce(settings: Settings, spans: list[SpanRecord],
            flows: Sequence[FlowRecord] = ()) -> None:
    """Spans in their order, with the flows among them by the time they ended, as live
    traffic would bring them."""
    producer = Producer(producer_config(settings))
    ends = [s.start_us + s.duration_us for s in spans]
    flows = sorted(flows, key=lambda f: f.end_us or f.start_us + f.duration_us)
    at = 0
    for span, end_us in zip(spans, ends, strict=True):
        while at < len(flows) and (flows[at].end_us or flows[at].start_us) <= end_us:
            producer.produce(FLOWS.name, key=flows[at].key(), value=records.encode(flows[at]))
            at += 1
        producer.produce(SPANS.name, key=span.key(), value=records.encode(span))
        producer.poll(0)
    for flow in flows[at:]:
        producer.produce(FLOWS.name, key=flow.key(), value=records.encode(flow))
    assert producer.flush(30) == 0


def _comparable(rows: list[ServiceMetrics]) -> list[tuple[Any, ...]]:
    """Rows as sortable tuples; floats rounded to what Cassandra's doubles and JSON keep."""
    out = []
    for row in rows:
        values = records.to_dict(row)
        out.append(tuple((k, round(v, 9) if isinstance(v, float) else v)
                         for k, v in sorted(values.items())))
    return sorted(out, key=repr)


def assert_rows_equal(found: list[ServiceMetrics], expected: list[ServiceMetrics]) -> None:
    """Equal row sets; on a difference, name the rows and fields that differ."""
    def keyed(rows: list[ServiceMetrics]) -> dict[tuple[Any, ...], dict[str, Any]]:
        out = {}
        for key, row in zip(_keys(rows), _comparable(rows), strict=True):
            out[key] = dict(row)
        return out

    got, want = keyed(found), keyed(expected)
    missing = sorted(set(want) - set(got), key=repr)[:5]
    extra = sorted(set(got) - set(want), key=repr)[:5]
    differing = [(key, {f: (got[key][f], want[key][f]) for f in want[key]
                        if f != "latency_sketch" and got[key][f] != want[key][f]})
                 for key in want if key in got and got[key] != want[key]][:5]
    assert not missing and not extra and not differing, (
        f"{len(found)} rows found, {len(expected)} expected; missing {missing}; "
        f"unexpected {extra}; differing (found, expected) {differing}")


def _keys(rows: list[ServiceMetrics]) -> list[tuple[Any, ...]]:
    # In the order _comparable returns the rows.
    return [tuple(dict(row)[f] for f in ("service", "revision", "peer_service",
                                         "window_start_us")) for row in _comparable(rows)]


def test_worker_writes_exactly_the_offline_aggregate(pipeline: Pipeline) -> None:
    namespace = f"agg-{uuid.uuid4().hex[:8]}"
    spans = make_spans(namespace, 6000)
    flows = make_flows(namespace, spans)
    pipeline.start_worker()
    produce(pipeline.settings, spans, flows)
    expected = aggregate(spans, flows, window_seconds=WINDOW_S)
    assert sum(r.requests for r in expected if r.peer_service is None) == 4800
    assert sum(r.connections_closed + r.connections_reset for r in expected) > 100
    assert_rows_equal(pipeline.wait_for_rows(namespace, expected), expected)


def test_kill_9_mid_stream_then_restart_neither_loses_nor_double_counts(
        pipeline: Pipeline) -> None:
    namespace = f"agg-{uuid.uuid4().hex[:8]}"
    spans = make_spans(namespace, 8000, seed=2)
    expected = aggregate(spans, window_seconds=WINDOW_S)
    worker = pipeline.start_worker()
    produce(pipeline.settings, spans[:5000])
    services = {r.service for r in expected}
    deadline = time.monotonic() + 60
    while not pipeline.rows(namespace, services):  # some windows written, others still open
        assert time.monotonic() < deadline, "the worker wrote nothing within 60 s"
        pipeline.assert_workers_alive()
        time.sleep(0.2)
    worker.send_signal(signal.SIGKILL)
    worker.wait(10)
    partial = pipeline.rows(namespace, services)
    assert 0 < len(partial) < len(expected)
    produce(pipeline.settings, spans[5000:])
    pipeline.start_worker()
    assert_rows_equal(pipeline.wait_for_rows(namespace, expected, timeout=120), expected)


def test_two_workers_share_the_partitions_and_give_the_same_totals(pipeline: Pipeline) -> None:
    namespace = f"agg-{uuid.uuid4().hex[:8]}"
    spans = make_spans(namespace, 6000, services=12, seed=3)
    pipeline.start_worker()
    pipeline.start_worker()
    time.sleep(5)  # let the group settle on two members before the data arrives
    produce(pipeline.settings, spans)
    expected = aggregate(spans, window_seconds=WINDOW_S)
    assert_rows_equal(pipeline.wait_for_rows(namespace, expected, timeout=120), expected)


def test_undecodable_and_late_records_are_dead_lettered_and_the_worker_goes_on(
        pipeline: Pipeline) -> None:
    namespace = f"agg-{uuid.uuid4().hex[:8]}"
    dead = TopicReader(pipeline.settings, DEADLETTER.name)
    try:
        spans = make_spans(namespace, 2000, services=1, seed=4)
        late = make_spans(namespace, 1, services=1, seed=5)[0]  # ends at the very start
        late.span_id = "f" * 16
        pipeline.start_worker()
        key = f"{namespace}/svc0".encode()
        producer = Producer(producer_config(pipeline.settings))
        producer.produce(SPANS.name, key=key, value=b'{"not": "a span"')
        producer.flush(10)
        produce(pipeline.settings, spans)
        # After a window beyond its own is written, the early span is late.
        expected = aggregate(spans, window_seconds=WINDOW_S)
        assert_rows_equal(pipeline.wait_for_rows(namespace, expected), expected)
        produce(pipeline.settings, [late])
        letters: list[DeadLetter] = []
        deadline = time.monotonic() + 30
        while len(letters) < 3 and time.monotonic() < deadline:
            time.sleep(1)
            ours = {(m.partition(), m.offset()): records.decode(DeadLetter, m.value())
                    for m in dead.read_all() if m.key() == key}
            letters = [letter for letter in ours.values()
                       if letter.component == "streams.aggregate"]
        reasons = sorted(letter.reason.split(":")[0] for letter in letters)
        assert reasons == ["late", "undecodable clover.spans record"], letters
        # The rows are unchanged by the late span: it was not counted twice or half.
        assert_rows_equal(pipeline.rows(namespace, {"svc0"}), expected)
    finally:
        dead.close()


def test_bad_records_among_good_ones_in_one_batch_are_dead_lettered_and_nothing_valid_lost(
        pipeline: Pipeline) -> None:
    """All on the topic before the worker starts, so the bad records are read in one batch
    with good ones: the batch decoder refuses the run, which is then decoded record by
    record."""
    namespace = f"agg-{uuid.uuid4().hex[:8]}"
    dead = TopicReader(pipeline.settings, DEADLETTER.name)
    try:
        spans = make_spans(namespace, 3000, services=1, seed=6)
        zero_id = records.to_dict(spans[0]) | {"span_id": "0" * 16}  # valid JSON, bad id
        # Valid by the schema (no upper bound), but no 64-bit aggregate can count it.
        huge = records.to_dict(spans[0]) | {"span_id": "f" * 16, "bytes_sent": 2**63}
        key = f"{namespace}/svc0".encode()
        produce(pipeline.settings, spans[:1500])
        producer = Producer(producer_config(pipeline.settings))
        for value in (json.dumps(zero_id).encode(), b'{"not": "a span"',
                      json.dumps(huge).encode()):
            producer.produce(SPANS.name, key=key, value=value)
        assert producer.flush(10) == 0
        produce(pipeline.settings, spans[1500:])
        pipeline.start_worker()
        expected = aggregate(spans, window_seconds=WINDOW_S)
        assert_rows_equal(pipeline.wait_for_rows(namespace, expected), expected)
        letters: list[DeadLetter] = []
        deadline = time.monotonic() + 30
        while len(letters) < 3 and time.monotonic() < deadline:
            time.sleep(1)
            letters = [letter for letter in (records.decode(DeadLetter, m.value())
                                             for m in dead.read_all() if m.key() == key)
                       if letter.component == "streams.aggregate"]
        reasons = sorted(letter.reason for letter in letters)
        assert len(reasons) == 3, letters
        assert reasons[0] == ("clover.spans record out of range: bytes_sent "
                              f"{2**63} exceeds 2^63-1, the most the aggregates (64-bit, as "
                              "Cassandra's bigint) can hold"), reasons[0]
        assert reasons[1].startswith("undecodable clover.spans record: SpanRecord.span_id: "
                                     "'0000000000000000' does not match"), reasons[1]
        assert reasons[2].startswith("undecodable clover.spans record: SpanRecord: "), reasons[2]
    finally:
        dead.close()


@pytest.mark.skipif(not NEZHA_FILE.is_file(), reason=f"the Nezha sample is not at {NEZHA_FILE}")
def test_nezha_replay_aggregates_to_the_offline_computation(pipeline: Pipeline) -> None:
    from collectors.ingest import SpanSink
    from collectors.replay import read_nezha, replay_spans
    from models.evaluate import infer_span_kinds

    namespace = f"nezha-{uuid.uuid4().hex[:8]}"
    # Replay publishes spans in order of their start; a span counts when it ends, so the stream
    # is out of order by up to the longest span (2.5 s in this file): allow that much lateness.
    pipeline.env["CLOVER_STREAMS_ALLOWED_LATENESS_SECONDS"] = "5"
    # A quiet partition's event time moves on by the silence, as live traffic's would; in a
    # replay at full speed a stall of the replay (a loaded machine) is no such time, and a few
    # seconds of it would close windows the spans still to come belong to: wait out longer
    # stalls than the other tests do.
    pipeline.env["CLOVER_STREAMS_IDLE_CLOSE_SECONDS"] = "6"
    pipeline.start_worker()
    sink = SpanSink(pipeline.settings)
    try:
        replay_spans(sink, [NEZHA_FILE], speed=None, namespace=namespace)
    finally:
        sink.close()
    unique: dict[tuple[str, str], SpanRecord] = {}
    for _, candidate in read_nezha(NEZHA_FILE, namespace=namespace):
        assert candidate.span is not None
        span = records.from_dict(SpanRecord, candidate.span)
        unique.setdefault((span.trace_id, span.span_id), span)
    # The replay gives the spans the kinds their traces say, from this one file: the same
    # rule on the same unit (a file with no neighbours) here.
    spans = infer_span_kinds(list(unique.values()))
    assert not any(s.kind == "unspecified" for s in spans)
    expected = aggregate(spans, window_seconds=WINDOW_S)
    assert len({r.service for r in expected}) >= 5
    assert any(r.peer_service == "cartservice" for r in expected)  # caller -> callee rows
    assert_rows_equal(pipeline.wait_for_rows(namespace, expected, timeout=120), expected)


def produce_paced(settings: Settings, spans: list[SpanRecord]) -> threading.Thread:
    """Produce in the background, 300 spans every 0.3 s, as live traffic keeps coming during an
    outage (event time then runs about 4x the wall clock, never silent long enough to look
    idle). The producer buffers and retries while the broker is away."""
    def run() -> None:
        producer = Producer(producer_config(settings), on_delivery=report)
        for start in range(0, len(spans), 300):
            for span in spans[start:start + 300]:
                producer.produce(SPANS.name, key=span.key(), value=records.encode(span))
            producer.poll(0)
            time.sleep(0.3)
        assert producer.flush(180) == 0
        if failed:
            print(f"{len(failed)} of {len(spans)} spans not delivered: {failed[0]}")

    failed: list[str] = []

    def report(error: Any, message: Any) -> None:
        if error is not None:
            failed.append(str(error))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _wait_for_first_rows(pipeline: Pipeline, namespace: str,
                         expected: list[ServiceMetrics]) -> None:
    services = {r.service for r in expected}
    deadline = time.monotonic() + 60
    while not pipeline.rows(namespace, services):
        assert time.monotonic() < deadline, "the worker wrote nothing within 60 s"
        pipeline.assert_workers_alive()
        time.sleep(0.2)


@pytest.mark.outage
def test_cassandra_outage_is_waited_out_and_nothing_is_lost(
        pipeline: Pipeline, live_stack: Stack) -> None:
    namespace = f"agg-{uuid.uuid4().hex[:8]}"
    spans = make_spans(namespace, 9000, seed=6)
    expected = aggregate(spans, window_seconds=WINDOW_S)
    pipeline.start_worker()
    producing = produce_paced(pipeline.settings, spans)
    _wait_for_first_rows(pipeline, namespace, expected)
    live_stack.down(only=["cassandra"])
    try:
        time.sleep(10)  # windows close while Cassandra is down: the worker must wait
        pipeline.assert_workers_alive()
    finally:
        live_stack.up()
    producing.join(240)
    assert_rows_equal(pipeline.wait_for_rows(namespace, expected, timeout=180), expected)


@pytest.mark.outage
def test_kafka_broker_restart_is_resumed_without_loss(
        pipeline: Pipeline, live_stack: Stack) -> None:
    namespace = f"agg-{uuid.uuid4().hex[:8]}"
    spans = make_spans(namespace, 9000, seed=7)
    reader = TopicReader(pipeline.settings, SPANS.name)
    try:
        pipeline.start_worker()
        producing = produce_paced(pipeline.settings, spans)
        _wait_for_first_rows(pipeline, namespace, spans_expected := aggregate(
            spans, window_seconds=WINDOW_S))
        live_stack.down(only=["kafka"])
        time.sleep(3)
        live_stack.up()
        producing.join(240)
        # The ground truth is what the topic holds: a producer may lose messages it had in
        # flight when the broker went down (librdkafka reports them as failed deliveries).
        on_topic = [records.decode(SpanRecord, m.value()) for m in reader.read_all(timeout=60)
                    if m.key().startswith(f"{namespace}/".encode())]
    finally:
        reader.close()
    assert len(on_topic) >= len(spans) * 0.9
    expected = aggregate(on_topic, window_seconds=WINDOW_S)
    assert spans_expected  # the test data spans many windows
    assert_rows_equal(pipeline.wait_for_rows(namespace, expected, timeout=180), expected)
