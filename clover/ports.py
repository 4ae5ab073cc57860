"""Free ports for the servers Clover starts itself (the demo's components, tests, benchmarks)."""

from __future__ import annotations

import random
import socket
from collections.abc import Collection
from pathlib import Path


def port_is_free(port: int) -> bool:
    """Whether ``port`` can be bound on every address now."""
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port(taken: Collection[int] = ()) -> int:
    """A free port below the kernel's ephemeral range, not in ``taken``: a port the kernel
    handed out as free (bind to 0) comes from that range, and before the server binds it, any
    outgoing connection (to Kafka, Cassandra) may be given it as its local port."""
    high = _ephemeral_range()[0]
    low = min(20_000, high // 2)
    for port in random.sample(range(low, high), high - low):
        if port not in taken and port_is_free(port):
            return port
    raise RuntimeError(f"no free port between {low} and {high}")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
