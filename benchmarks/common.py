"""Timing helpers shared by the benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil


@dataclass(frozen=True)
class Result:
    name: str
    rate: float
    baseline_rate: float
    baseline: str
    unit: str = "/s"


class CliProcess:
    """A `clover` command in its own process, so that its CPU time is its own: started, waited
    for until its log has said ``ready`` ``ready_count`` times, and stopped with SIGTERM."""

    def __init__(self, args: list[str], env: dict[str, str], ready: str,
                 ready_count: int = 1) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "clover.cli", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **env})
        assert self.proc.stderr is not None
        seen = 0
        for line in self.proc.stderr:
            seen += ready in line
            if seen == ready_count:
                break
        else:
            raise RuntimeError(f"clover {' '.join(args)} did not start: {self.proc.wait()}")
        # Keep reading its log, so that a full pipe never blocks it.
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()
        self.ps = psutil.Process(self.proc.pid)

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def stop(self) -> str:
        """SIGTERM, then its standard output."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=120)
        return str(out)


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
