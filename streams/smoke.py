"""A smoke run of the spine: records of every type through real Kafka, metrics into Cassandra.

It produces one record of each type (and a batch of service metrics) to Clover's topics,
reads them back from exactly the offsets it wrote, stores the metrics in Cassandra, reads
them back from there, and prints what arrived. Exit code 0 only when everything arrived.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from analytics.store import connect
from clover import records, topics
from clover.config import Settings
from clover.kafka import admin_client, consumer_config, producer_config

SERVICES = ("frontend", "cart", "checkout")
NAMESPACE = "clover-smoke"


def example_records(count: int, now_us: int) -> list[Any]:
    """A batch of ServiceMetrics windows for a few services, and one record of each other type."""
    window = 10
    start = (now_us // 1_000_000 // window) * window * 1_000_000
    metrics = []
    for i in range(count):
        service = SERVICES[i % len(SERVICES)]
        requests = 100 + i
        metrics.append(records.ServiceMetrics(
            namespace=NAMESPACE, service=service, revision="5d9c7b8f4",
            window_start_us=start - (i // len(SERVICES)) * window * 1_000_000,
            window_seconds=window, requests=requests, errors=i % 3,
            error_rate=(i % 3) / requests, latency_p50_ms=12.5, latency_p90_ms=30.0,
            latency_p99_ms=80.0, latency_max_ms=120.0, bytes_in=2048 * requests,
            bytes_out=4096 * requests, flows=5, connections_opened=5, connections_closed=4,
            connections_reset=0,
        ))
    endpoint = records.Endpoint(addr="127.0.0.1", port=8080, namespace=NAMESPACE,
                                service="cart", pod="cart-5d9c7b8f4-x2x9q", revision="5d9c7b8f4")
    client = records.Endpoint(addr="127.0.0.1", port=40000, namespace=NAMESPACE,
                              service="frontend")
    others = [
        records.FlowRecord(observer="tcp_lifecycle", node="smoke", interface=None,
                           protocol="tcp", ip_version=4, src=client, dst=endpoint, pid=1,
                           comm="frontend", cgroup_id=1, netns_ino=4026531840, bytes_sent=512,
                           bytes_received=1024, packets_sent=4, packets_received=5,
                           start_us=now_us - 2000, end_us=now_us, duration_us=2000,
                           srtt_us=50, state="closed"),
        records.SpanRecord(trace_id="4bf92f3577b34da6a3ce929d0e0e4736", span_id="00f067aa0ba902b7",
                           parent_span_id=None, namespace=NAMESPACE, service="frontend",
                           pod=None, revision=None, operation="GET /cart", kind="server",
                           start_us=now_us - 2000, duration_us=1500, status_code=200,
                           error=False, peer_namespace=None, peer_service=None,
                           bytes_sent=None, bytes_received=None, source="other"),
        records.Anomaly(namespace=NAMESPACE, service="cart", revision="5d9c7b8f4",
                        window_start_us=start, window_seconds=window, detector="smoke",
                        score=None, threshold=0.9, verdict="inconclusive",
                        reason="smoke test record", emitted_us=now_us),
        records.RollbackDecision(namespace=NAMESPACE, service="cart", deployment="cart",
                                 decided_us=now_us, action="skip", reason="smoke_test",
                                 message="a smoke-test record; nothing was decided",
                                 from_revision=None, to_revision=None,
                                 consecutive_anomalous=0, score=None, threshold=None,
                                 anomaly_window_start_us=None, patched_us=None, dry_run=True),
    ]
    return metrics + others


def _high_watermarks(consumer: Consumer, names: list[str]) -> list[TopicPartition]:
    positions = []
    metadata = consumer.list_topics(timeout=10)
    for name in names:
        for partition in metadata.topics[name].partitions:
            _, high = consumer.get_watermark_offsets(TopicPartition(name, partition), timeout=10)
            positions.append(TopicPartition(name, partition, high))
    return positions


def run_smoke(settings: Settings, count: int = 12) -> int:
    created = topics.create_topics(admin_client(settings),
                                   replication_factor=settings.kafka.replication_factor)
    print(f"topics: {sum(v == 'created' for v in created.values())} created, "
          f"{sum(v == 'exists' for v in created.values())} already there")
    now_us = time.time_ns() // 1000
    batch = example_records(count, now_us)
    names = sorted({topics.topic_for(type(r)).name for r in batch})

    consumer = Consumer(consumer_config(settings, group_id=f"clover-smoke-{now_us}"))
    start_positions = _high_watermarks(consumer, names)

    failures: list[str] = []

    def on_delivery(err: KafkaError | None, _message: Message) -> None:
        if err is not None:
            failures.append(str(err))

    producer = Producer(producer_config(settings))
    for record in batch:
        producer.produce(topics.topic_for(type(record)).name, records.encode(record),
                         key=record.key(), on_delivery=on_delivery)
    remaining = producer.flush(30)
    if failures or remaining:
        raise KafkaException(f"{len(failures)} delivery failures, {remaining} undelivered: "
                             f"{failures[:3]}")
    print(f"produced {len(batch)} records to {', '.join(names)}")

    end_positions = {(tp.topic, tp.partition): tp.offset
                     for tp in _high_watermarks(consumer, names)}
    consumer.assign(start_positions)
    arrived: dict[str, list[Any]] = {name: [] for name in names}
    by_name = {t.name: t for t in topics.ALL_TOPICS}
    expected = sum(end - tp.offset for tp in start_positions
                   for end in [end_positions[(tp.topic, tp.partition)]])
    deadline = time.monotonic() + 30
    received = 0
    while received < expected and time.monotonic() < deadline:
        for message in consumer.consume(500, timeout=1.0):
            if message.error():
                raise KafkaException(message.error())
            topic = by_name[str(message.topic())]
            arrived[topic.name].append(records.decode(topic.record_type, message.value() or b""))
            received += 1
    consumer.close()
    print(f"read back {received} of {expected} records from Kafka")

    metrics = arrived[topics.SERVICE_METRICS.name]
    with connect(settings) as store:
        store.create_schema(settings.cassandra.replication_factor)
        written = store.write_service_metrics(metrics)
        stored = []
        earliest = min(m.window_start_us for m in metrics)
        for service in SERVICES:
            stored += store.read_service_metrics(NAMESPACE, service, earliest, now_us + 10**7)
    print(f"wrote {written} service-metrics rows to Cassandra keyspace "
          f"{settings.cassandra.keyspace!r}; read back {len(stored)}:")
    print(f"  {'service':<10} {'window start (UTC)':<22} {'requests':>8} {'errors':>6} "
          f"{'p99 ms':>7}")
    for row in sorted(stored, key=lambda r: (r.service, r.window_start_us)):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row.window_start_us / 1e6))
        print(f"  {row.service:<10} {when:<22} {row.requests:>8} {row.errors:>6} "
              f"{row.latency_p99_ms:>7}")
    ok = received == expected == len(batch) and sorted(
        (m.service, m.window_start_us, m.requests) for m in stored
    ) == sorted((m.service, m.window_start_us, m.requests) for m in metrics)
    print("smoke run: OK" if ok else "smoke run: FAILED (see above)", file=sys.stderr)
    return 0 if ok else 1
