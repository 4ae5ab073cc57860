"""Clover's Kafka topics: names, partition counts, retention and keys, defined once.

Every record about a service is keyed ``namespace/service`` (see
:func:`service_key`), so one service's records stay on one partition, in
order. Six partitions leave room for six parallel stream workers.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from typing import Any

from clover.records import (
    Anomaly,
    DeadLetter,
    FlowRecord,
    RollbackDecision,
    ServiceMetrics,
    SpanRecord,
    service_key,
)

__all__ = [
    "ALL_TOPICS",
    "ANOMALIES",
    "DEADLETTER",
    "FLOWS",
    "ROLLBACKS",
    "SERVICE_METRICS",
    "SPANS",
    "Topic",
    "TopicCreationError",
    "create_topics",
    "service_key",
    "topic_for",
]

DAY_MS = 24 * 60 * 60 * 1000


@dataclass(frozen=True)
class Topic:
    name: str
    partitions: int
    record_type: type
    description: str
    retention_ms: int = 7 * DAY_MS

    def config(self) -> dict[str, str]:
        """Topic-level Kafka configuration used when creating the topic."""
        return {"cleanup.policy": "delete", "retention.ms": str(self.retention_ms)}


FLOWS = Topic(
    "clover.flows",
    6,
    FlowRecord,
    "L3/L4 flows from the eBPF collectors (flow.v1.json).",
)
SPANS = Topic(
    "clover.spans",
    6,
    SpanRecord,
    "Normalised spans from the mesh and tracers (span.v1.json).",
)
SERVICE_METRICS = Topic(
    "clover.service-metrics",
    6,
    ServiceMetrics,
    "Per-window service and edge aggregates (service-metrics.v1.json).",
)
ANOMALIES = Topic(
    "clover.anomalies",
    6,
    Anomaly,
    "Anomaly detector verdicts per window (anomaly.v1.json).",
)
ROLLBACKS = Topic(
    "clover.rollbacks",
    3,
    RollbackDecision,
    "Rollback controller decisions (rollback.v1.json).",
)
DEADLETTER = Topic(
    "clover.deadletter",
    3,
    DeadLetter,
    "Messages a component could not process, kept verbatim (deadletter.v1.json).",
    retention_ms=30 * DAY_MS,
)

ALL_TOPICS: tuple[Topic, ...] = (
    FLOWS,
    SPANS,
    SERVICE_METRICS,
    ANOMALIES,
    ROLLBACKS,
    DEADLETTER,
)


def topic_for(record_type: type) -> Topic:
    """The topic that carries ``record_type``."""
    for topic in ALL_TOPICS:
        if topic.record_type is record_type:
            return topic
    raise KeyError(
        f"no Clover topic carries {getattr(record_type, '__name__', record_type)!r}"
    )


class TopicCreationError(RuntimeError):
    """One or more topics could not be created; ``failures`` maps name -> reason."""

    def __init__(self, failures: dict[str, str]) -> None:
        self.failures = dict(failures)
        details = "; ".join(
            f"{name}: {reason}" for name, reason in sorted(failures.items())
        )
        super().__init__(f"could not create Kafka topic(s) {details}")


def create_topics(
    admin_client: Any, replication_factor: int = 1, timeout: float = 30.0
) -> dict[str, str]:
    """Create every missing Clover topic with a ``confluent_kafka.admin.AdminClient``.

    Returns ``{topic name: "created" | "exists"}``. A topic that already
    exists is not an error (its settings are left as they are). Any other
    failure raises :class:`TopicCreationError` naming each failed topic,
    after all topics have been attempted.
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic

    if replication_factor < 1:
        raise ValueError(f"replication_factor must be >= 1, got {replication_factor}")
    new_topics = [
        NewTopic(
            topic.name,
            num_partitions=topic.partitions,
            replication_factor=replication_factor,
            config=topic.config(),
        )
        for topic in ALL_TOPICS
    ]
    futures = admin_client.create_topics(
        new_topics, operation_timeout=timeout, request_timeout=timeout
    )
    results: dict[str, str] = {}
    failures: dict[str, str] = {}
    for name, future in futures.items():
        try:
            future.result(timeout=timeout)
            results[name] = "created"
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if (
                isinstance(error, KafkaError)
                and error.code() == KafkaError.TOPIC_ALREADY_EXISTS
            ):
                results[name] = "exists"
            else:
                failures[name] = str(error if error is not None else exc)
        except concurrent.futures.TimeoutError:
            failures[name] = f"no answer from the broker within {timeout}s"
    if failures:
        raise TopicCreationError(failures)
    return results
