"""Ports for the servers the tests start."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 20_000


def free_port() -> int:
    """A port free on every address now, below the kernel's ephemeral range.

    bind(0) hands out a port from the ephemeral range, where the outgoing connections of every
    Kafka and Cassandra client take their local ports too: between the check and the server's
    own bind, one of them can take it (seen in CI and in a test run). Below that range only
    another explicit bind can."""
    first_ephemeral = (int(_EPHEMERAL_RANGE.read_text().split()[0])
                       if _EPHEMERAL_RANGE.exists() else 32_768)
    for _ in range(200):
        port = random.randrange(_LOWEST, first_ephemeral)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port between {_LOWEST} and {first_ephemeral}")
