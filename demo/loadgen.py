"""Steady traffic into the mesh's entry service, and what the users saw.

An open-loop generator (requests start on schedule, whether or not earlier ones finished, as
independent users do) at ``rate`` requests per second, each on a new connection to a Ready pod
of the entry service. Every result is kept, so the demo can say what latency and error ratio
users saw before the rollout, during the fault and after the rollback.
"""

from __future__ import annotations

import asyncio
import bisect
import threading
import time
from dataclasses import dataclass, field
from statistics import median

import aiohttp

from demo.mesh import ENTRY
from demo.service import Routes

TIMEOUT_S = 5.0


@dataclass(frozen=True)
class TrafficStats:
    requests: int
    error_ratio: float | None
    p50_ms: float | None
    p90_ms: float | None

    def describe(self) -> str:
        if not self.requests:
            return "no requests"
        return (f"{self.requests} requests, p50 {self.p50_ms:.0f} ms, p90 {self.p90_ms:.0f} ms, "
                f"{self.error_ratio:.0%} errors")


@dataclass
class LoadGenerator:
    routes: Routes
    rate: float
    # (finished at, latency ms, ok), in finishing order.
    results: list[tuple[float, float, bool]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()),
                                        name="demo-load", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(TIMEOUT_S + 5)

    def stats(self, since: float, until: float) -> TrafficStats:
        """What the requests that finished in [since, until) saw."""
        with self._lock:
            ends = [r[0] for r in self.results]
            chosen = self.results[bisect.bisect_left(ends, since):bisect.bisect_left(ends, until)]
        if not chosen:
            return TrafficStats(0, None, None, None)
        latencies = sorted(r[1] for r in chosen)
        errors = sum(1 for r in chosen if not r[2])
        return TrafficStats(len(chosen), errors / len(chosen), median(latencies),
                            latencies[min(len(latencies) - 1, int(0.9 * len(latencies)))])

    async def _run(self) -> None:
        connector = aiohttp.TCPConnector(force_close=True, limit=0)
        async with aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as session:
            interval = 1.0 / self.rate
            next_at = time.monotonic()
            pending: set[asyncio.Task[None]] = set()
            while not self._stop.is_set():
                task = asyncio.create_task(self._request(session))
                pending.add(task)
                task.add_done_callback(pending.discard)
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            if pending:
                await asyncio.wait(pending, timeout=TIMEOUT_S)

    async def _request(self, session: aiohttp.ClientSession) -> None:
        target = self.routes.pick(ENTRY)
        started = time.monotonic()
        ok = False
        if target is not None:
            try:
                async with session.get(f"http://{target[0]}:{target[1]}/") as response:
                    await response.read()
                    ok = response.status < 500
            except (TimeoutError, aiohttp.ClientError):
                ok = False
        latency_ms = (time.monotonic() - started) * 1000
        with self._lock:
            self.results.append((time.time(), latency_ms, ok))
