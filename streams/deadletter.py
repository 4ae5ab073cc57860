"""Dead letters for the stream agents: a consumed message that cannot be used, kept verbatim."""

from __future__ import annotations

import time
from typing import Any

from clover.records import DeadLetter


def letter_for(message: Any, reason: str, component: str) -> DeadLetter:
    """The dead letter of a consumed Faust message (its raw key and value, topic, partition and
    offset), with the reason it could not be used."""
    return letter_of(message.topic, message.partition, message.offset, message.key,
                     message.value, reason, component)


def letter_for_kafka(message: Any, reason: str, component: str) -> DeadLetter:
    """The same for a message consumed with confluent-kafka (whose fields are methods)."""
    return letter_of(message.topic(), message.partition(), message.offset(), message.key(),
                     message.value(), reason, component)


def letter_of(topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
              reason: str, component: str) -> DeadLetter:
    return DeadLetter.wrap(source_topic=topic, key=key, value=value, reason=reason,
                           component=component, at_us=time.time_ns() // 1000,
                           partition=partition, offset=offset)
