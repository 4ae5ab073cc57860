"""Produce throughput of Clover's producer settings (idempotent, acks=all, lz4) through the real
broker, against librdkafka's defaults (acks=all, no idempotence, no compression)."""

from __future__ import annotations

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from benchmarks.common import Result, best_rate
from clover import records, topics
from clover.config import load_settings
from clover.kafka import client_config, producer_config
from tests import samples

N = 100_000


def run() -> list[Result]:
    settings = load_settings()
    topics.create_topics(AdminClient(client_config(settings)))
    payloads = []
    for i in range(N):
        span = samples.sample_span()
        span.start_us += i
        payloads.append((records.encode(span), span.key()))

    def produce_with(config: dict) -> int:
        producer = Producer(config)
        for value, key in payloads:
            while True:
                try:
                    producer.produce(topics.SPANS.name, value, key=key)
                    break
                except BufferError:
                    producer.poll(0.05)
            producer.poll(0)
        if producer.flush(60) != 0:
            raise RuntimeError("undelivered messages")
        return N

    ours = best_rate(lambda: produce_with(producer_config(settings)), repeats=2)
    default = best_rate(lambda: produce_with(client_config(settings)), repeats=2)
    return [Result("kafka produce, clover producer settings", ours, default,
                   "librdkafka defaults, same broker")]
