"""Dead letters for the stream agents: a consumed message that cannot be used, kept verbatim."""

from __future__ import annotations

import time
from typing import Any

from clover.records import DeadLetter


def letter_for(message: Any, reason: str, component: str) -> DeadLetter:
    """The dead letter of a consumed Faust message (its raw key and value, topic, partition and
    offset), with the reason it could not be used."""
    return DeadLetter.wrap(source_topic=message.topic, key=message.key, value=message.value,
                           reason=reason, component=component, at_us=time.time_ns() // 1000,
                           partition=message.partition, offset=message.offset)
