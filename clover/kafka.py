"""Kafka client settings shared by every producer and consumer in Clover (confluent-kafka)."""

from __future__ import annotations

from typing import Any

from clover.config import Settings


def client_config(settings: Settings) -> dict[str, Any]:
    """Bootstrap servers plus the user's extra librdkafka settings (security, SASL, TLS)."""
    return {"bootstrap.servers": settings.kafka_bootstrap, **settings.kafka.client}


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """An idempotent, acks=all, compressed producer that batches."""
    return {
        **client_config(settings),
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": "lz4",
        "linger.ms": 20,
        # Java/aiokafka's partitioner, so records land where Faust's tables expect them.
        "partitioner": "murmur2_random",
        **overrides,
    }


def consumer_config(settings: Settings, group_id: str, **overrides: Any) -> dict[str, Any]:
    """A consumer that commits explicitly, after its work is done."""
    return {
        **client_config(settings),
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        **overrides,
    }
