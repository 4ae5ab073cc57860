"""TCP flow collector: one FlowRecord per connection when it closes, and periodic updates of
long-lived connections, from the tracepoint ``sock:inet_sock_set_state`` (no kprobes: this
kernel has none).

The BPF program (bpf/tcp_flows.c) keeps one entry per live connection and sends one ring-buffer
event per closed connection; counters come straight from the socket at offsets read from the
running kernel's BTF, because the headers BCC compiles against do not match its layouts.
"""

from __future__ import annotations

import collections
import ctypes
import socket
import struct
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


def unattributed(addr: str, port: int | None) -> Endpoint:
    """The endpoint as seen, with no Kubernetes identity (there is no attribution)."""
    return Endpoint(addr=addr, port=port)


@dataclass
class TcpLoss:
    ring_buffer_full: int = 0  # closed connections whose event could not be delivered
    table_full: int = 0  # connections not tracked because the live table was full


class TcpFlowCollector:
    """Loads the program, then hands out FlowRecords from ``poll`` and ``snapshots``."""

    def __init__(self, *, node: str | None = None, snapshot_interval_s: float = 10.0,
                 max_connections: int = 65536, ring_buffer_pages: int = 1024,
                 attribute: Attribute = unattributed, headers_dir: Path | None = None,
                 btf: Btf | None = None) -> None:
        self.node = node or socket.gethostname()
        self.snapshot_interval_s = snapshot_interval_s
        self.max_connections = max_connections
        self.ring_buffer_pages = ring_buffer_pages
        self.attribute = attribute
        self.headers_dir = headers_dir
        self._btf = btf
        self._bpf: Any = None
        self._conn: Any = None  # _Unpacker of struct conn_t, once loaded
        self._event: Any = None  # _Unpacker of struct event_t
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

        # struct event_t is struct conn_t (whose layout BCC computed for the live table) plus
        # two fields; both are read with one struct.unpack each instead of field by field.
        conn_type = self._bpf[b"live"].Leaf
        self._conn = _Unpacker(conn_type)
        self._event = _Unpacker(conn_type, [("end_ns", "Q", 8), ("oldstate", "I", 4)])
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

    def poll(self) -> list[FlowRecord]:
        """Records of the connections that closed since the last call (never blocks: the
        program does not wake user space, so callers drain on their own clock)."""
        self._bpf.ring_buffer_consume()
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
        for key, leaf in live.items():
            sk = key.value
            seen.add(sk)
            conn = self._conn.read(ctypes.addressof(leaf))
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

    def _on_event(self, _ctx: Any, data: int, _size: int) -> None:
        event = self._event.read(data)
        self.events += 1
        self._closed.append(self._record(event, event.end_ns,
                                         "reset" if event.reset else "closed"))

    def _record(self, conn: Any, end_ns: int | None, state: str,
                now_ns: int | None = None) -> FlowRecord:
        """A record of a closed connection (``end_ns``), or of an open one as of ``now_ns``
        with the counters of its latest snapshot."""
        local, version = _address(conn.family, conn.saddr)
        remote, _ = _address(conn.family, conn.daddr)
        here = self.attribute(local, conn.sport)
        there = self.attribute(remote, conn.dport)
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
            ip_version=version, src=src, dst=dst,
            bytes_sent=max(0, sent), bytes_received=max(0, received),
            packets_sent=packets_sent, packets_received=packets_received,
            start_us=(conn.start_ns + self._wall_offset_ns) // 1000,
            end_us=None if end_ns is None else (end_ns + self._wall_offset_ns) // 1000,
            duration_us=max(0, last_ns - conn.start_ns) // 1000,
            state=state,  # type: ignore[arg-type]
            observed_at="src" if conn.active else "dst",
            pid=conn.pid or None,
            comm=conn.comm.split(b"\0", 1)[0].decode(errors="replace") or None,
            cgroup_id=conn.cgroup_id or None, netns_ino=conn.netns or None,
            srtt_us=conn.srtt_us if conn.established else None,
        )


_V4_MAPPED = bytes(10) + b"\xff\xff"


def _address(family: int, raw: bytes) -> tuple[str, int]:
    """The address as text, and its IP version (inet_ntop: the fast path for every record)."""
    if family == socket.AF_INET6:
        # A dual-stack socket talking IPv4 reports ::ffff:a.b.c.d: it is an IPv4 flow.
        if raw[:12] == _V4_MAPPED:
            return socket.inet_ntop(socket.AF_INET, raw[12:16]), 4
        return socket.inet_ntop(socket.AF_INET6, raw), 6
    return socket.inet_ntop(socket.AF_INET, raw[:4]), 4


class _Unpacker:
    """Reads a C struct from memory in one struct.unpack, into a named tuple.

    The format follows the ctypes layout BCC derived from the compiled program (field offsets,
    padding, arrays as bytes), plus ``extra`` trailing fields (name, struct code, size), so it
    cannot drift from the C definition.
    """

    def __init__(self, ctype: Any, extra: list[tuple[str, str, int]] | None = None) -> None:
        fmt, names, position = "=", [], 0
        for name, field_type in ctype._fields_:
            offset = getattr(ctype, name).offset
            fmt += f"{offset - position}x" if offset > position else ""
            size = ctypes.sizeof(field_type)
            position = offset + size
            if name.startswith("__pad"):  # BCC spells out the compiler's padding
                fmt += f"{size}x"
                continue
            fmt += f"{size}s" if hasattr(field_type, "_length_") else _CODES[size]
            names.append(name)
        for name, code, size in extra or []:
            align = (size - position % size) % size
            fmt += f"{align}x{code}" if align else code
            names.append(name)
            position += align + size
        self._struct = struct.Struct(fmt)
        self._tuple: Any = collections.namedtuple("Fields", names)  # type: ignore[misc]

    def read(self, address: int) -> Any:
        return self._tuple._make(self._struct.unpack(
            ctypes.string_at(address, self._struct.size)))


_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}  # every scalar in the program is unsigned
