"""Records of every type round-trip through the real Kafka broker, keyed by service."""

from __future__ import annotations

import pytest

from clover import records, topics
from tests import samples

SAMPLES = [samples.sample_flow, samples.sample_span, samples.sample_service_metrics,
           samples.sample_anomaly, samples.sample_rollback, samples.sample_deadletter]


@pytest.mark.parametrize("make", SAMPLES, ids=lambda f: f.__name__)
def test_record_round_trips_through_kafka(make, producer, topic_reader) -> None:
    record = make()
    topic = topics.topic_for(type(record))
    reader = topic_reader(topic.name)
    errors: list = []
    producer.produce(topic.name, records.encode(record), key=record.key(),
                     on_delivery=lambda err, msg: errors.append(err))
    assert producer.flush(10) == 0
    assert errors == [None]

    [message] = reader.read(1)
    assert message.key() == record.key()
    assert records.decode(type(record), message.value()) == record


def test_one_service_lands_on_one_partition(producer, topic_reader) -> None:
    """All windows of a service share its key, so they stay in order on one partition."""
    reader = topic_reader(topics.SERVICE_METRICS.name)
    sent = []
    for i, service in enumerate(["cart", "cart", "frontend", "cart", "frontend", "checkout"]):
        record = samples.sample_service_metrics()
        record.service = service
        record.window_start_us += i * 10_000_000
        sent.append(record)
        producer.produce(topics.SERVICE_METRICS.name, records.encode(record), key=record.key())
    assert producer.flush(10) == 0

    messages = reader.read(len(sent))
    assert len(messages) == len(sent)
    partitions: dict[str, set[int]] = {}
    for message in messages:
        decoded = records.decode(records.ServiceMetrics, message.value())
        partitions.setdefault(decoded.service, set()).add(message.partition())
    assert all(len(p) == 1 for p in partitions.values()), partitions
    cart = [records.decode(records.ServiceMetrics, m.value()).window_start_us
            for m in messages if m.key() == b"shop/cart"]
    assert cart == sorted(cart) and len(cart) == 3
