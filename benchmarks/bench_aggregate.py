"""Aggregation worker throughput: spans/s through one worker process end to end (Kafka in, every
window written to Cassandra and clover.service-metrics), against the raw confluent-kafka consume
rate of the same records in this process (issue 5's goals: 100k/s and 30% of the raw rate).
A third figure is the ceiling of any worker that checks its input: the same consume with each
batch decoded and validated as the worker does it and turned into columns, and nothing more (no
windows, no writes, no commits).

The spans are on the topic before the clock starts, so the worker, not the producer, sets the
pace; its CPU time is reported too."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from statistics import median

import psutil
from confluent_kafka import Consumer, Message, Producer, TopicPartition

from analytics.store import connect
from analytics.windows import SpanColumns
from benchmarks.common import Result
from clover import records
from clover.config import load_settings
from clover.kafka import consumer_config, produce_waiting, producer_config
from clover.records import SpanRecord
from clover.topics import SPANS
from tests.test_aggregate import _start_group_at_the_end, make_spans

N = 300_000
ROUNDS = 3
METRICS_PORT = 9598
SESSION_TIMEOUT_S = 10  # the worker's session.timeout.ms


def run() -> list[Result]:
    """Rounds of (worker, raw consume of the same spans), each side reporting its median, so a
    busy moment of the machine does not land on one side only."""
    worker_rates, raw_rates, decode_rates = [], [], []
    for _ in range(ROUNDS):
        settings = load_settings(environ=dict(
            os.environ, CLOVER_CASSANDRA_KEYSPACE=f"bench_aggregate_{uuid.uuid4().hex[:8]}"))
        try:
            worker_rate, starts = _worker_round(settings.cassandra.keyspace)
            worker_rates.append(worker_rate)
            raw_rates.append(_consume_rate(settings, starts))
            decode_rates.append(_consume_rate(settings, starts, _decode_only))
        finally:  # after the baseline: dropping a keyspace keeps Cassandra busy for a while
            with connect(settings) as store:
                store.session.execute(
                    f"DROP KEYSPACE IF EXISTS {settings.cassandra.keyspace}", timeout=60)
    print("stream worker spans/s by round: " + ", ".join(f"{r:,.0f}" for r in worker_rates)
          + "; raw consume: " + ", ".join(f"{r:,.0f}" for r in raw_rates)
          + "; consume and decode only: " + ", ".join(f"{r:,.0f}" for r in decode_rates))
    return [Result("stream worker spans/s, one process (Kafka -> windows in Cassandra)",
                   median(worker_rates), median(raw_rates),
                   "raw confluent-kafka consume of the same topic"),
            Result("consume + decode and validate + columns only (a checking worker's ceiling)",
                   median(decode_rates), median(raw_rates),
                   "raw confluent-kafka consume of the same topic")]


def _worker_round(keyspace: str) -> tuple[float, list[TopicPartition]]:
    """One worker in a new group reads N spans put on the topic while it was suspended."""
    group = f"bench-aggregate-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, CLOVER_STREAMS_APP_ID=group, CLOVER_CASSANDRA_KEYSPACE=keyspace,
               CLOVER_STREAMS_METRICS_PORT=str(METRICS_PORT))
    settings = load_settings(environ=env)
    _start_group_at_the_end(settings, group)
    spans = make_spans(f"bench-{uuid.uuid4().hex[:6]}", N, services=12)
    # Encoded before the worker is suspended: encoding and checking 300k spans takes longer
    # than the group's session timeout (10 s), and a worker suspended that long is taken out of
    # the group, so its clock would start with a rejoin and a new assignment.
    messages = [(span.key(), records.encode(span)) for span in spans]
    starts = _end_offsets(settings)
    worker = subprocess.Popen([sys.executable, "-m", "clover.cli", "stream", "worker",
                               "--loglevel", "warning"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        process = psutil.Process(worker.pid)
        _wait_for(lambda: _records_in() is not None, 120, "the worker's metrics endpoint")
        time.sleep(5)  # group joined, partitions assigned, Cassandra schema created
        process.suspend()  # the input is all there before the worker reads any of it
        suspended = time.monotonic()
        producer = Producer(producer_config(settings))
        for key, value in messages:
            produce_waiting(producer, SPANS.name, value, key)
        assert producer.flush(60) == 0
        if time.monotonic() - suspended > SESSION_TIMEOUT_S:
            print("stream worker: suspended longer than its session timeout: the figure "
                  "includes rejoining the group")
        cpu_before, started = _cpu(process), time.monotonic()
        process.resume()
        _wait_for(lambda: (_records_in() or 0) >= N, 600, f"the worker to read {N} spans")
        # Every window but the last few is written by now (at most WRITE_EVERY_S after it
        # closed); those close by the idle rule once the stream has gone quiet, which is
        # waiting, not work: not counted.
        elapsed = time.monotonic() - started
        print(f"stream worker: {N} spans in {elapsed:.1f} s wall, "
              f"{_cpu(process) - cpu_before:.1f} s CPU")
    finally:
        worker.terminate()
        worker.wait(30)
    return N / elapsed, starts


def _decode_only(messages: list[Message]) -> None:
    """What the worker does to every span before aggregating it, and nothing after."""
    decoded = records.batch_decoder(SpanRecord)(list(map(Message.value, messages)))
    assert decoded is not None, "the bench's spans are all valid"
    SpanColumns.of(decoded)


def _consume_rate(settings: object, starts: list[TopicPartition],
                  work: Callable[[list[Message]], None] | None = None) -> float:
    """Records/s of one consumer reading the topic from ``starts``, doing ``work`` with each
    batch (nothing: the raw consume rate)."""
    consumer = Consumer(consumer_config(settings, group_id=f"bench-{uuid.uuid4()}"))  # type: ignore[arg-type]
    # Connected before the clock starts, as the worker was: at ~1M records/s, a connection
    # set-up inside the measured time would be a large part of it.
    consumer.list_topics(SPANS.name, timeout=10)
    consumer.assign(starts)
    read = 0
    started = last = time.monotonic()
    deadline = started + 120
    while read < N and time.monotonic() < deadline:
        # A short timeout: consume() waits that long for a full batch, and the last one is
        # never full (with 1 s, a fifth of runs measured the wait instead of the reading).
        batch = consumer.consume(1000, timeout=0.05)
        if work is None:  # as little as reading takes
            got = sum(1 for m in batch if m.error() is None)
        else:
            messages = [m for m in batch if m.error() is None]
            if messages:
                work(messages)
            got = len(messages)
        if got:
            read, last = read + got, time.monotonic()
    consumer.close()
    return read / (last - started)


def _end_offsets(settings: object) -> list[TopicPartition]:
    consumer = Consumer(consumer_config(settings, group_id=f"bench-{uuid.uuid4()}"))  # type: ignore[arg-type]
    partitions = consumer.list_topics(SPANS.name, timeout=10).topics[SPANS.name].partitions
    ends = [TopicPartition(SPANS.name, p, consumer.get_watermark_offsets(
        TopicPartition(SPANS.name, p), 10)[1]) for p in partitions]
    consumer.close()
    return ends


def _metric(name: str) -> float | None:
    try:
        # Only the one metric: rendering them all (the process collector reads /proc) on
        # every poll took about a tenth of the worker's CPU, and its GIL, from the run.
        text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics?name[]={name}",
                                      timeout=2).read().decode()
    except OSError:
        return None
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name) and not line.startswith(name + "_created")]
    return sum(values) if values else 0.0


def _records_in() -> float | None:
    return _metric("clover_stream_records_in_total")


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _wait_for(check: object, timeout: float, what: str, every_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(every_s)
