"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Result:
    name: str
    rate: float
    baseline_rate: float
    baseline: str
    unit: str = "/s"


def publisher_rate_per_core(topic: Any, record: Any, n: int = 50_000) -> float:
    """Baseline: Clover's publisher producing ready-made copies of ``record`` (a FlowRecord or
    SpanRecord) to ``topic``, per CPU-second of this process."""
    from clover.config import load_settings
    from collectors.publish import Publisher

    publisher = Publisher(load_settings(), topic)
    start = time.process_time()
    for i in range(n):
        record.start_us += 1  # distinct records, as a collector would produce
        publisher.publish(record)
        if i % 1000 == 0:
            publisher.poll()
    assert publisher.flush(60) == 0
    return n / (time.process_time() - start)


def best_rate(work: Callable[[], int], repeats: int = 3) -> float:
    """Items per second of the fastest of several runs (the least disturbed by the machine)."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        items = work()
        best = max(best, items / (time.perf_counter() - start))
    return best
