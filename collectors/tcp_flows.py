"""TCP flow collector: one FlowRecord per connection when it closes, and periodic updates of
long-lived connections, from the tracepoint ``sock:inet_sock_set_state`` (no kprobes: this
kernel has none).

The BPF program (bpf/tcp_flows.c) keeps one entry per live connection and sends one ring-buffer
event per closed connection; counters come straight from the socket at offsets read from the
running kernel's BTF, because the headers BCC compiles against do not match its layouts.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clover.records import Endpoint, FlowRecord
from collectors.btf import Btf, as_cflags
from collectors.environment import bpf_environment

PROGRAM = Path(__file__).with_name("bpf") / "tcp_flows.c"

# Kernel fields the program reads, by the macro it reads them with.
OFFSETS: dict[str, tuple[str, str]] = {
    "TCP_BYTES_ACKED": ("tcp_sock", "bytes_acked"),
    "TCP_BYTES_RECEIVED": ("tcp_sock", "bytes_received"),
    "TCP_SEGS_IN": ("tcp_sock", "segs_in"),
    "TCP_SEGS_OUT": ("tcp_sock", "segs_out"),
    "TCP_SRTT_US": ("tcp_sock", "srtt_us"),
    "SKC_NET": ("sock", "__sk_common.skc_net"),
    "NET_NS_INUM": ("net", "ns.inum"),
}

Attribute = Callable[[str, int | None], Endpoint]


def _unattributed(addr: str, port: int | None) -> Endpoint:
    return Endpoint(addr=addr, port=port)


@dataclass
class TcpLoss:
    ring_buffer_full: int = 0  # closed connections whose event could not be delivered
    table_full: int = 0  # connections not tracked because the live table was full


class TcpFlowCollector:
    """Loads the program, then hands out FlowRecords from ``poll`` and ``snapshots``."""

    def __init__(self, *, node: str | None = None, snapshot_interval_s: float = 10.0,
                 max_connections: int = 65536, ring_buffer_pages: int = 256,
                 attribute: Attribute = _unattributed, headers_dir: Path | None = None,
                 btf: Btf | None = None) -> None:
        self.node = node or socket.gethostname()
        self.snapshot_interval_s = snapshot_interval_s
        self.max_connections = max_connections
        self.ring_buffer_pages = ring_buffer_pages
        self.attribute = attribute
        self.headers_dir = headers_dir
        self._btf = btf
        self._bpf: Any = None
        self._event_type: Any = None
        self._closed: list[FlowRecord] = []
        self._reported: dict[int, int] = {}  # live socket -> snapshot_ns last reported
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC; this turns it into Unix time.
        self._wall_offset_ns = time.time_ns() - time.monotonic_ns()
        self.events = 0

    def start(self) -> None:
        from bcc import BPF

        bpf_environment(self.headers_dir)
        btf = self._btf or Btf.load()
        cflags = [
            *as_cflags(btf.offsets(OFFSETS)),
            f"-DMAX_CONNS={self.max_connections}",
            f"-DRINGBUF_PAGES={self.ring_buffer_pages}",
            f"-DSNAPSHOT_NS={int(self.snapshot_interval_s * 1e9)}",
        ]
        self._bpf = BPF(src_file=str(PROGRAM).encode(), cflags=cflags)

        # struct event_t, built on the live table's value type (struct conn_t) that BCC made.
        class Event(ctypes.Structure):
            _fields_ = [("conn", self._bpf[b"live"].Leaf), ("end_ns", ctypes.c_uint64),
                        ("oldstate", ctypes.c_uint32)]

        self._event_type = ctypes.POINTER(Event)
        self._bpf[b"events"].open_ring_buffer(self._on_event)

    def __enter__(self) -> TcpFlowCollector:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Detach the program (tracepoints go with it) and free its maps."""
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None

    def poll(self, timeout_ms: int = 100) -> list[FlowRecord]:
        """Records of the connections that closed since the last call."""
        self._bpf.ring_buffer_poll(timeout_ms)
        closed, self._closed = self._closed, []
        return closed

    def snapshots(self) -> list[FlowRecord]:
        """A state="open" update for each live connection whose counters were refreshed since
        its last update and that has lived at least one snapshot interval."""
        now_ns = time.monotonic_ns()
        interval_ns = int(self.snapshot_interval_s * 1e9)
        updates = []
        live = self._bpf[b"live"]
        seen = set()
        for key, conn in live.items():
            sk = key.value
            seen.add(sk)
            if (not conn.established or now_ns - conn.start_ns < interval_ns
                    or conn.snapshot_ns <= self._reported.get(sk, 0)):
                continue
            self._reported[sk] = conn.snapshot_ns
            updates.append(self._record(conn, None, "open", now_ns))
        # Forget connections that have closed.
        self._reported = {sk: ns for sk, ns in self._reported.items() if sk in seen}
        return updates

    def live_connections(self) -> int:
        return len(self._bpf[b"live"])

    def loss(self) -> TcpLoss:
        counts = self._bpf[b"lost"]
        return TcpLoss(sum(counts[ctypes.c_int(0)]), sum(counts[ctypes.c_int(1)]))

    def _on_event(self, _ctx: Any, data: Any, _size: int) -> None:
        event = ctypes.cast(data, self._event_type).contents
        self.events += 1
        state = "reset" if event.conn.reset else "closed"
        self._closed.append(self._record(event.conn, event.end_ns, state))

    def _record(self, conn: Any, end_ns: int | None, state: str,
                now_ns: int | None = None) -> FlowRecord:
        """A record of a closed connection (``end_ns``), or of an open one as of ``now_ns``
        with the counters of its latest snapshot."""
        local = _address(conn.family, bytes(conn.saddr))
        remote = _address(conn.family, bytes(conn.daddr))
        here = self.attribute(str(local), conn.sport)
        there = self.attribute(str(remote), conn.dport)
        # Payload bytes: the counters also count the SYN the opener sent (once acknowledged)
        # and each FIN exchanged, one sequence number each.
        acked = conn.bytes_acked - (conn.active and conn.established) - conn.fin_out_acked
        received = conn.bytes_received - conn.fin_in
        # src is the side that opened the connection; sent/received are from src's view.
        if conn.active:
            src, dst = here, there
            sent, received = acked, received
            packets_sent, packets_received = conn.segs_out, conn.segs_in
        else:
            src, dst = there, here
            sent, received = received, acked
            packets_sent, packets_received = conn.segs_in, conn.segs_out
        last_ns = end_ns if end_ns is not None else (now_ns or conn.snapshot_ns)
        return FlowRecord(
            observer="tcp_lifecycle", node=self.node, protocol="tcp",
            ip_version=local.version, src=src, dst=dst,
            bytes_sent=max(0, sent), bytes_received=max(0, received),
            packets_sent=packets_sent, packets_received=packets_received,
            start_us=(conn.start_ns + self._wall_offset_ns) // 1000,
            end_us=None if end_ns is None else (end_ns + self._wall_offset_ns) // 1000,
            duration_us=max(0, last_ns - conn.start_ns) // 1000,
            state=state,  # type: ignore[arg-type]
            observed_at="src" if conn.active else "dst",
            pid=conn.pid or None, comm=conn.comm.decode(errors="replace") or None,
            cgroup_id=conn.cgroup_id or None, netns_ino=conn.netns or None,
            srtt_us=conn.srtt_us if conn.established else None,
        )


def _address(family: int, raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if family == socket.AF_INET6:
        address = ipaddress.IPv6Address(raw)
        # A dual-stack socket talking IPv4 reports ::ffff:a.b.c.d: it is an IPv4 flow.
        return address.ipv4_mapped or address
    return ipaddress.IPv4Address(raw[:4])
