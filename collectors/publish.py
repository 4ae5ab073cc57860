"""The Kafka publisher the collectors share: batched, idempotent, acks=all, compressed.

Nothing is dropped silently. librdkafka batches and retries on its own (idempotence keeps the
retries free of duplicates and in order); a record it finally gives up on comes back through
the delivery report, is counted as a delivery error, and is produced again. Only failures are
reported (``delivery.report.only.error``): a Python call per success would cost more than the
produce itself, so successes are counted as queued minus pending minus failed. When Kafka is
down for long, librdkafka's queue fills and ``publish`` blocks: the collector falls behind and
the loss, if any, happens where it is counted (the kernel's ring buffer).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Protocol

from confluent_kafka import KafkaError, Message, Producer
from prometheus_client import CollectorRegistry, Counter

from clover import records
from clover.config import Settings
from clover.kafka import produce_waiting, producer_config
from clover.topics import Topic

log = logging.getLogger(__name__)


class Record(Protocol):
    def key(self) -> bytes: ...


class PublisherMetrics:
    """Prometheus counters of one publisher, in the collector's own registry."""

    def __init__(self, registry: CollectorRegistry, component: str) -> None:
        labels = ["component", "topic"]
        self.published = Counter("clover_records_published", "Records acknowledged by Kafka",
                                 labels, registry=registry)
        self.delivery_errors = Counter(
            "clover_delivery_errors", "Deliveries that failed and were produced again", labels,
            registry=registry)
        self.component = component


class Publisher:
    """Publishes records to one topic; call ``poll`` often and ``close`` at the end."""

    def __init__(self, settings: Settings, topic: Topic, metrics: PublisherMetrics | None = None,
                 **producer_overrides: Any) -> None:
        self.topic = topic
        self._topic_name = topic.name
        # One delivery callback for the producer rather than one per produce() call: cheaper,
        # and it is the same function for every record anyway.
        self._producer = Producer(producer_config(
            settings, **{"delivery.report.only.error": True, "on_delivery": self._on_delivery,
                         **producer_overrides}))
        self._retry: deque[tuple[bytes | None, bytes]] = deque()
        self._metrics = metrics
        self._queued = 0  # produce() calls, retries included
        self._failed = 0  # deliveries that failed (each was queued again)
        self._counted = 0  # successes already added to the Prometheus counter
        self.delivery_errors = 0

    @property
    def published(self) -> int:
        """Records Kafka has acknowledged."""
        return self._queued - len(self._producer) - len(self._retry) - self._failed

    def publish(self, record: Any, *, validate: bool = False) -> None:
        """Queue one record. Collectors build records themselves, so validation is optional."""
        self._produce(record.key(), records.encode(record, validate=validate))

    def publish_encoded(self, key: bytes | None, value: bytes) -> None:
        """Queue a record a collector has encoded itself (its hot path: no validation, no
        dataclass, one produce call)."""
        try:
            self._producer.produce(self._topic_name, value, key)
            self._queued += 1
        except BufferError:
            self._produce(key, value)  # the local queue is full: wait for room

    def _produce(self, key: bytes | None, value: bytes) -> None:
        produce_waiting(self._producer, self.topic.name, value, key)
        self._queued += 1

    def _on_delivery(self, err: KafkaError | None, message: Message) -> None:
        if err is None:  # not reported with delivery.report.only.error, unless overridden
            return
        self._failed += 1
        self.delivery_errors += 1
        if self._metrics:
            self._metrics.delivery_errors.labels(self._metrics.component, self.topic.name).inc()
        if not err.retriable() and err.code() not in (KafkaError._MSG_TIMED_OUT,
                                                      KafkaError._TIMED_OUT):
            log.error("Kafka refused a record for %s (%s); producing it again", self.topic.name,
                      err)
        self._retry.append((message.key(), message.value() or b""))

    def poll(self, timeout: float = 0.0) -> None:
        """Serve delivery reports and produce again what failed."""
        self._producer.poll(timeout)
        while self._retry:
            key, value = self._retry.popleft()
            self._produce(key, value)
        if self._metrics:
            published = self.published
            self._metrics.published.labels(self._metrics.component, self.topic.name).inc(
                published - self._counted)
            self._counted = published

    def pending(self) -> int:
        return len(self._producer) + len(self._retry)

    def flush(self, timeout: float = 30.0) -> int:
        """Wait until everything queued is delivered; returns how many records are still not."""
        deadline = time.monotonic() + timeout
        while self.pending() and time.monotonic() < deadline:
            self._producer.flush(min(1.0, max(0.0, deadline - time.monotonic())))
            self.poll()
        return self.pending()

    def close(self, timeout: float = 30.0) -> int:
        remaining = self.flush(timeout)
        if remaining:
            log.error("%d records for %s were not delivered before shutdown", remaining,
                      self.topic.name)
        return remaining
