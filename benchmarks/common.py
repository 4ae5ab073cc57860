"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Result:
    name: str
    rate: float
    baseline_rate: float
    baseline: str
    unit: str = "/s"


def best_rate(work: Callable[[], int], repeats: int = 3) -> float:
    """Items per second of the fastest of several runs (the least disturbed by the machine)."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        items = work()
        best = max(best, items / (time.perf_counter() - start))
    return best
