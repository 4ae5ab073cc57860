"""Aggregation worker throughput: spans/s per worker core, from Kafka to windows written in
Cassandra and clover.service-metrics, against a bare consumer that reads and decodes (with
validation) the same records in this process: what windowing, sketches, writes and exactness
bookkeeping cost on top of reading the input."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
import uuid

import psutil
from confluent_kafka import Consumer, TopicPartition

from benchmarks.common import Result
from clover import records
from clover.config import load_settings
from clover.kafka import consumer_config
from clover.records import SpanRecord
from clover.topics import SPANS
from tests.test_aggregate import _start_group_at_the_end, make_spans, produce

N = 60_000
METRICS_PORT = 9598


def run() -> list[Result]:
    group = f"bench-aggregate-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, CLOVER_STREAMS_APP_ID=group,
               CLOVER_CASSANDRA_KEYSPACE=group.replace("-", "_"),
               CLOVER_STREAMS_METRICS_PORT=str(METRICS_PORT))
    settings = load_settings(environ=env)
    _start_group_at_the_end(settings, group)
    spans = make_spans(f"bench-{uuid.uuid4().hex[:6]}", N, services=12)
    starts = _end_offsets(settings)
    worker = subprocess.Popen([sys.executable, "-m", "clover.cli", "stream", "worker",
                               "--loglevel", "warning"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        process = psutil.Process(worker.pid)
        _wait_for(lambda: _records_in() is not None, 120, "the worker's metrics endpoint")
        time.sleep(5)  # group joined, partitions assigned, Cassandra schema created
        cpu_before = _cpu(process)
        produce(settings, spans)
        _wait_for(lambda: (_records_in() or 0) >= N, 300, f"the worker to read {N} spans")
        _wait_for(lambda: _open_windows() == 0, 120, "the worker to write every window")
        worker_rate = N / (_cpu(process) - cpu_before)
    finally:
        worker.terminate()
        worker.wait(30)
    baseline_rate = _bare_decode_rate(settings, starts)
    return [Result("stream worker spans/s per core (Kafka -> windows in Cassandra)",
                   worker_rate, baseline_rate, "bare consume + validated decode, per core")]


def _bare_decode_rate(settings: object, starts: list[TopicPartition]) -> float:
    consumer = Consumer(consumer_config(settings, group_id=f"bench-{uuid.uuid4()}"))  # type: ignore[arg-type]
    consumer.assign(starts)
    read = 0
    started = time.process_time()
    deadline = time.monotonic() + 120
    while read < N and time.monotonic() < deadline:
        for message in consumer.consume(1000, timeout=1):
            if message.error() is None:
                records.decode(SpanRecord, message.value())
                read += 1
    elapsed = time.process_time() - started
    consumer.close()
    return read / elapsed


def _end_offsets(settings: object) -> list[TopicPartition]:
    consumer = Consumer(consumer_config(settings, group_id=f"bench-{uuid.uuid4()}"))  # type: ignore[arg-type]
    partitions = consumer.list_topics(SPANS.name, timeout=10).topics[SPANS.name].partitions
    ends = [TopicPartition(SPANS.name, p, consumer.get_watermark_offsets(
        TopicPartition(SPANS.name, p), 10)[1]) for p in partitions]
    consumer.close()
    return ends


def _metric(name: str) -> float | None:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics",
                                      timeout=2).read().decode()
    except OSError:
        return None
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name) and not line.startswith(name + "_created")]
    return sum(values) if values else 0.0


def _records_in() -> float | None:
    return _metric("clover_stream_records_in_total")


def _open_windows() -> float | None:
    return _metric("clover_stream_open_windows")


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _wait_for(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.5)
