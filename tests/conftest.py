"""Fixtures for tests against the real local stack (`make test` brings it up)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from hypothesis import settings as hypothesis_settings

from clover import topics
from clover.config import Settings, load_settings
from clover.kafka import client_config, consumer_config, producer_config
from clover.stack import Stack

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Property tests check behaviour, not speed: no per-example deadline, which a busy 2-core
# machine (servers, other tests) overran now and then.
hypothesis_settings.register_profile("clover", deadline=None)
hypothesis_settings.load_profile("clover")


@pytest.fixture(scope="session")
def settings() -> Settings:
    return load_settings()


@pytest.fixture(scope="session")
def live_stack(settings: Settings) -> Stack:
    """The running local stack; fails (does not skip) when a server is down."""
    stack = Stack(settings)
    down = [f"{row.name}: {row.health}" for row in stack.status() if not row.healthy
            and row.name != "bcc"]
    if down:
        pytest.fail("the local stack is not up (run `make test`, or `clover stack up` first): "
                    + "; ".join(down))
    return stack


@pytest.fixture(scope="session")
def kafka_topics(live_stack: Stack, settings: Settings) -> dict[str, str]:
    return topics.create_topics(AdminClient(client_config(settings)))


@pytest.fixture
def sink(kafka_topics: dict[str, str], settings: Settings) -> Iterator[Any]:
    """A span sink on the real Kafka, closed (everything delivered) after the test."""
    from collectors.ingest import SpanSink

    sink = SpanSink(settings)
    yield sink
    sink.close()


@pytest.fixture
def producer(kafka_topics: dict[str, str], settings: Settings) -> Iterator[Producer]:
    producer = Producer(producer_config(settings))
    yield producer
    producer.flush(10)


class TopicReader:
    """Reads back exactly what a test wrote: remembers the end offsets, then reads from there."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.topic = topic
        self.consumer = Consumer(consumer_config(settings, group_id=f"test-{uuid.uuid4()}"))
        metadata = self.consumer.list_topics(topic, timeout=10)
        self.start = []
        for partition in metadata.topics[topic].partitions:
            _, high = self.consumer.get_watermark_offsets(TopicPartition(topic, partition), 10)
            self.start.append(TopicPartition(topic, partition, high))

    def read(self, count: int, timeout: float = 20.0) -> list:
        self.consumer.assign(self.start)
        messages: list = []
        deadline = time.monotonic() + timeout
        while len(messages) < count and time.monotonic() < deadline:
            for message in self.consumer.consume(count - len(messages), timeout=0.5):
                assert message.error() is None, message.error()
                messages.append(message)
        return messages

    def read_all(self, timeout: float = 20.0) -> list:
        """Everything written since this reader was made, up to the end offsets as of now."""
        end = {}
        for tp in self.start:
            _, high = self.consumer.get_watermark_offsets(tp, 10)
            end[tp.partition] = high
        expected = sum(end[tp.partition] - tp.offset for tp in self.start)
        messages = self.read(expected, timeout)
        assert len(messages) == expected, f"read {len(messages)} of {expected} messages"
        return messages

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture
def topic_reader(kafka_topics: dict[str, str], settings: Settings) -> Iterator:
    readers: list[TopicReader] = []

    def make(topic: str) -> TopicReader:
        readers.append(TopicReader(settings, topic))
        return readers[-1]

    yield make
    for reader in readers:
        reader.close()
