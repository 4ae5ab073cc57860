"""Two network namespaces joined by a veth pair, for tests that need real traffic (root only).

    with veth_pair() as pair:
        pair.run(pair.ns_b, ["ip", "addr"])
        server = pair.popen(pair.ns_b, [sys.executable, "-c", SERVER])

Everything is made with iproute2 (``ip``) through subprocess. Both veth ends are created
directly inside their namespaces, so nothing ever appears in the root namespace, and the
addresses (169.254.<x>.1/.2, fd42:c10e:<x>::1/::2) exist only on this pair: traffic can only
go between the two namespaces. Deleting the namespaces deletes the veths.

The namespaces are made quiet so that tests can count packets exactly: permanent neighbour
entries (no ARP or neighbour discovery between the two ends), and no IPv6 router
solicitations or duplicate address detection. (MLD reports for the IPv6 multicast groups
still go out when the links come up.)

Names carry the creating process's PID (``clv-<pid>-<hex>-a``); the first ``veth_pair()`` of a
process deletes namespaces left by crashed runs, i.e. those whose process no longer exists.
"""

from __future__ import annotations

import functools
import os
import secrets
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "clv-"
NETNS_DIR = Path("/run/netns")

# Set in each namespace before its veth exists, so the veth inherits them as its defaults.
QUIET_SYSCTLS = (
    "net.ipv6.conf.default.accept_dad=0",
    "net.ipv6.conf.default.accept_ra=0",
    "net.ipv6.conf.default.router_solicitations=0",
)


def ip(*args: str) -> str:
    """Run ``ip ARGS`` in the root namespace; raise with ip's own message on failure."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@dataclass(frozen=True)
class VethPair:
    ns_a: str
    ns_b: str
    veth_a: str  # lives in ns_a
    veth_b: str  # lives in ns_b
    ip_a: str
    ip_b: str
    ip6_a: str
    ip6_b: str
    mac_a: str
    mac_b: str

    def run(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside namespace ``ns``; by default checked, text, output captured."""
        kw.setdefault("check", True)
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        return subprocess.run(["ip", "netns", "exec", ns, *argv], **kw)

    def popen(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[str]:
        """Start ``argv`` inside ``ns``; stdout and stderr are pipes of text by default."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        return subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)


def _owner_pid(name: str) -> int | None:
    """The PID in a ``clv-<pid>-<hex>-<side>`` name, or None for names not made here."""
    parts = name.split("-")
    if len(parts) == 4 and parts[0] + "-" == PREFIX and parts[1].isdigit():
        return int(parts[1])
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@functools.cache
def remove_stale_namespaces() -> list[str]:
    """Delete the namespaces of crashed runs (their PID is gone); once per process."""
    removed = []
    for path in sorted(NETNS_DIR.glob(PREFIX + "*")) if NETNS_DIR.is_dir() else []:
        pid = _owner_pid(path.name)
        if pid is not None and pid != os.getpid() and not _alive(pid):
            subprocess.run(["ip", "netns", "delete", path.name], capture_output=True)
            removed.append(path.name)
    return removed


@contextmanager
def veth_pair() -> Iterator[VethPair]:
    """Create two quiet namespaces joined by a veth pair; delete them on exit, whatever happens."""
    remove_stale_namespaces()
    tag = secrets.token_hex(2)
    x = secrets.randbelow(254) + 1  # third octet / IPv6 subnet; the prefix is only ever here
    mac = secrets.token_hex(3)
    pair = VethPair(
        ns_a=f"{PREFIX}{os.getpid()}-{tag}-a",
        ns_b=f"{PREFIX}{os.getpid()}-{tag}-b",
        veth_a=f"cv{tag}{mac}a",  # 13 characters (interface names: at most 15)
        veth_b=f"cv{tag}{mac}b",
        ip_a=f"169.254.{x}.1",
        ip_b=f"169.254.{x}.2",
        ip6_a=f"fd42:c10e:{x:x}::1",
        ip6_b=f"fd42:c10e:{x:x}::2",
        # Locally administered unicast MACs, fixed up front for the permanent neighbours.
        mac_a=f"02:c1:{mac[0:2]}:{mac[2:4]}:{mac[4:6]}:0a",
        mac_b=f"02:c1:{mac[0:2]}:{mac[2:4]}:{mac[4:6]}:0b",
    )
    created: list[str] = []
    try:
        for ns in (pair.ns_a, pair.ns_b):
            ip("netns", "add", ns)
            created.append(ns)
            for setting in QUIET_SYSCTLS:
                pair.run(ns, ["sysctl", "-q", "-w", setting])
        ip("link", "add", pair.veth_a, "address", pair.mac_a, "netns", pair.ns_a,
           "type", "veth", "peer", "name", pair.veth_b, "address", pair.mac_b,
           "netns", pair.ns_b)
        ends = (
            (pair.ns_a, pair.veth_a, pair.ip_a, pair.ip6_a, pair.ip_b, pair.ip6_b, pair.mac_b),
            (pair.ns_b, pair.veth_b, pair.ip_b, pair.ip6_b, pair.ip_a, pair.ip6_a, pair.mac_a),
        )
        for ns, dev, addr, addr6, _, _, _ in ends:
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "addr", "add", f"{addr6}/64", "dev", dev, "nodad")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", dev, "up")
        # After "up": taking a link down flushes its neighbour entries, permanent ones too.
        for ns, dev, _, _, peer, peer6, peer_mac in ends:
            for neighbour in (peer, peer6):
                ip("-n", ns, "neigh", "replace", neighbour, "lladdr", peer_mac, "dev", dev,
                   "nud", "permanent")
        yield pair
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
