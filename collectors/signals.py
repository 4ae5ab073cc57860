"""Stopping cleanly: SIGTERM and SIGINT set an event the collector's loop watches, so the loop
ends and every kernel program, tc filter and producer is closed in its ``finally``."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType


def stop_on_signals(stop: threading.Event) -> Callable[[], None]:
    """Route SIGTERM and SIGINT to ``stop``; returns a function that restores the previous
    handlers. Python runs handlers in the main thread only, so elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    for sig in previous:
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore
