"""Keep the garbage collector off what a long-running process (a collector, a receiver, the
stream worker) loaded at start.

By the time a collector is running it holds ~150k long-lived objects (imported modules, the
Kubernetes client's models, BCC, gRPC). Every record it handles allocates a few short-lived
containers, which keep triggering collections, and each full collection walked all of those
objects again: with this alone the flow collector's CPU per record fell from ~28 to ~20 µs
(measured under load, before its other changes). Freezing them moves them to a permanent
generation the collector never scans; they are not garbage anyway.
"""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Call once, after start-up and before the hot loop."""
    gc.collect()
    gc.freeze()
