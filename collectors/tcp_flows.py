"""TCP flow collector: one FlowRecord per connection when it closes, and periodic updates of
long-lived connections, from the tracepoint ``sock:inet_sock_set_state`` (no kprobes: this
kernel has none).

The BPF program (bpf/tcp_flows.c) keeps one entry per live connection and sends one ring-buffer
event per closed connection; counters come straight from the socket at offsets read from the
running kernel's BTF, because the headers BCC compiles against do not match its layouts. Its
programs are raw tracepoints on state changes only (the tracepoint's arguments only, no perf
record filled in; nothing per send or receive), and fields used together are copied in one
read. A long-lived connection's counters are read from its socket when its periodic update is
due, by a program user space runs for that connection (collectors/testrun.py).

Records leave as ready-encoded Kafka messages (key, flow.v1 JSON), built from plain dicts in
FlowRecord's field order: at 100k+ records/s the dataclasses, a per-record attribution
lookup and text conversions of the same addresses were most of what a profile of the collector
showed (with the garbage collector's scans, see clover/heap.py). The
collector is trusted, typed code, so its output is not validated again on the hot path; the
root tests read every record back from Kafka through the validating ``records.decode``.
"""

from __future__ import annotations

import ctypes
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from clover.records import SCHEMA_VERSION, Endpoint, service_key
from collectors import ringbuf
from collectors.btf import Btf, as_cflags
from collectors.environment import CollectorError, bpf_environment
from collectors.testrun import RawTracepointRunner

PROGRAM = Path(__file__).with_name("bpf") / "tcp_flows.c"

# Kernel fields the program reads, by the macro it reads them with.
OFFSETS: dict[str, tuple[str, str]] = {
    "SK_PROTOCOL": ("sock", "sk_protocol"),
    "SKC_DADDR": ("sock", "__sk_common.skc_daddr"),
    "SKC_RCV_SADDR": ("sock", "__sk_common.skc_rcv_saddr"),
    "SKC_DPORT": ("sock", "__sk_common.skc_dport"),
    "SKC_FAMILY": ("sock", "__sk_common.skc_family"),
    "SKC_STATE": ("sock", "__sk_common.skc_state"),
    "SKC_NET": ("sock", "__sk_common.skc_net"),
    "SKC_V6_DADDR": ("sock", "__sk_common.skc_v6_daddr"),
    "SKC_V6_RCV_SADDR": ("sock", "__sk_common.skc_v6_rcv_saddr"),
    "INET_SPORT": ("inet_sock", "inet_sport"),
    "TCP_BYTES_ACKED": ("tcp_sock", "bytes_acked"),
    "TCP_BYTES_RECEIVED": ("tcp_sock", "bytes_received"),
    "TCP_SEGS_IN": ("tcp_sock", "segs_in"),
    "TCP_SEGS_OUT": ("tcp_sock", "segs_out"),
    "TCP_SRTT_US": ("tcp_sock", "srtt_us"),
    "NET_NS_INUM": ("net", "ns.inum"),
}
# Fields the program reads together, in one copy of the span of the struct that holds them
# (SKC_WINDOW_START/_LEN, TCP_WINDOW_START/_LEN): one helper call instead of one per field.
WINDOWS = {"SKC": ("SKC_",), "TCP": ("TCP_",)}
MAX_WINDOW = 320  # bytes of BPF stack a window may take; wider, the fields are read one by one


def window_cflags(btf: Btf) -> list[str]:
    """-D macros: each field's offset, and the 8-aligned start and length of each window."""
    offsets = btf.offsets(OFFSETS)
    macros = {**offsets, "MAX_WINDOW": MAX_WINDOW}
    for window, prefixes in WINDOWS.items():
        fields = [m for m in OFFSETS if m.startswith(prefixes)]
        start = min(offsets[m] for m in fields) // 8 * 8
        end = max(offsets[m] + btf.member_size(*OFFSETS[m]) for m in fields)
        macros[f"{window}_WINDOW_START"] = start
        macros[f"{window}_WINDOW_LEN"] = -(-(end - start) // 8) * 8
    return as_cflags(macros)


Attribute = Callable[[str, int | None], Endpoint]
Emit = Callable[[bytes, bytes], None]  # takes (Kafka key, flow.v1 JSON value)

# struct conn_t's fields in declaration order (bpf/tcp_flows.c); _Unpacker checks that the
# layout BCC derived from the compiled program has exactly these, so the two cannot drift.
CONN_FIELDS = ("start_ns", "snapshot_ns", "bytes_acked", "bytes_received", "segs_in",
               "segs_out", "cgroup_id", "srtt_us", "pid", "netns", "active", "reset",
               "established", "fin_in", "fin_out_acked", "comm", "saddr", "daddr", "sport",
               "dport", "family")


def unattributed(addr: str, port: int | None) -> Endpoint:
    """The endpoint as seen, with no Kubernetes identity (there is no attribution)."""
    return Endpoint(addr=addr, port=port)


@dataclass
class TcpLoss:
    ring_buffer_full: int = 0  # closed connections whose event could not be delivered
    table_full: int = 0  # connections not tracked because the live table was full


class TcpFlowCollector:
    """Loads the program, then hands encoded flow records to the ``emit`` callable given to
    ``poll`` and ``snapshots``, one call each: handing each over as soon as it is encoded, rather
    than collecting a batch, lets its memory be reused at once (growing and trimming the heap for
    every batch cost more page faults than the encoding itself)."""

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
        self._ring: ringbuf.RingReader | None = None  # where supported; else libbpf's consumer
        self._emit: Emit | None = None  # poll's, while it runs
        self._error: BaseException | None = None  # raised by _emit during a drain
        self._refresh: RawTracepointRunner | None = None  # runs bpf/tcp_flows.c's refresh
        # live socket -> its counters when last reported
        self._reported: dict[int, tuple[int, ...]] = {}
        # Per drain: raw address -> (text, IP version, attribution), and comm bytes -> text.
        # Cleared on every poll, so attribution is never staler than one drain.
        self._ends: dict[bytes, tuple[Any, ...]] = {}
        self._comms: dict[bytes, str | None] = {}
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC; this turns it into Unix time.
        self._wall_offset_ns = time.time_ns() - time.monotonic_ns()
        self.events = 0

    def start(self) -> None:
        from bcc import BPF

        bpf_environment(self.headers_dir)
        btf = self._btf or Btf.load()
        cflags = [
            *window_cflags(btf),
            f"-DMAX_CONNS={self.max_connections}",
            f"-DRINGBUF_PAGES={self.ring_buffer_pages}",
        ]
        self._bpf = BPF(src_file=str(PROGRAM).encode(), cflags=cflags)

        # struct event_t is struct conn_t (whose layout BCC computed for the live table) plus
        # two fields; both are read with one struct.unpack each instead of field by field.
        conn_type = self._bpf[b"live"].Leaf
        self._conn = _Unpacker(conn_type, CONN_FIELDS)
        self._event = _Unpacker(conn_type, CONN_FIELDS,
                                [("end_ns", "Q", 8), ("oldstate", "I", 4)])
        events = self._bpf[b"events"]
        if ringbuf.supported():
            self._ring = ringbuf.RingReader(events.map_fd, events.max_entries,
                                            self._event.format)
        else:
            events.open_ring_buffer(self._on_event)
        # Attached nowhere: snapshots() runs it for each long-lived connection it reports.
        refresh = self._bpf.load_func(b"refresh", BPF.RAW_TRACEPOINT)
        self._refresh = RawTracepointRunner(refresh.fd)
        try:
            self._refresh.run(0)  # no such socket: says whether the kernel can run it at all
        except OSError as exc:
            self.close()
            raise CollectorError(
                f"this kernel cannot run a BPF program on demand ({exc}); the flow collector "
                "needs BPF_PROG_TEST_RUN for raw tracepoints (Linux 5.10 or later) to update "
                "live connections") from None

    def __enter__(self) -> TcpFlowCollector:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Detach the program (tracepoints go with it) and free its maps."""
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None

    def poll(self, emit: Emit) -> int:
        """Emit the records of the connections that closed since the last call, and say how
        many (never blocks: the program does not wake user space, so callers drain on their own
        clock)."""
        self._ends.clear()
        self._comms.clear()
        if self._ring is not None:
            taken, message = 0, self._message
            # Each record: the ring buffer header's length word, struct conn_t, end_ns, oldstate.
            for event in self._ring.drain():
                emit(*message(event, 1, event[22], "reset" if event[12] else "closed"))
                taken += 1
            self.events += taken
            return taken
        events, self._emit, self._error = self.events, emit, None
        try:
            self._bpf.ring_buffer_consume()
        finally:
            self._emit = None
        if self._error is not None:
            raise self._error
        return self.events - events

    def snapshots(self, emit: Emit) -> int:
        """Emit a state="open" update for each live connection that has lived at least one
        snapshot interval and whose counters moved since its last update, with its counters
        read from the socket now; say how many."""
        now_ns = time.monotonic_ns()
        interval_ns = int(self.snapshot_interval_s * 1e9)
        live, refresh = self._bpf[b"live"], self._refresh
        if refresh is None:
            raise RuntimeError("snapshots() before start()")
        reported: dict[int, tuple[int, ...]] = {}
        updates = 0
        for key, leaf in live.items():
            if now_ns - leaf.start_ns < interval_ns:
                continue
            sk = key.value
            if refresh.run(sk) != 0:
                continue  # closed meanwhile, or not established yet
            try:
                leaf = live[key]  # held: the memory read below is the leaf's
            except KeyError:
                continue  # closed since the refresh
            conn = self._conn.read(ctypes.addressof(leaf))
            counters = conn[2:6]  # bytes_acked, bytes_received, segs_in, segs_out
            reported[sk] = counters
            if counters != self._reported.get(sk):
                emit(*self._message(conn, 0, None, "open"))
                updates += 1
        # Connections that have closed are forgotten.
        self._reported = reported
        return updates

    def live_connections(self) -> int:
        return len(self._bpf[b"live"])

    def loss(self) -> TcpLoss:
        counts = self._bpf[b"lost"]
        return TcpLoss(sum(counts[ctypes.c_int(0)]), sum(counts[ctypes.c_int(1)]))

    def _on_event(self, _ctx: Any, data: int, _size: int) -> int:
        """libbpf's callback, one event at a time (where RingReader is not supported)."""
        event = self._event.read(data)
        self.events += 1
        try:
            self._emit(*self._message(event, 0, event[21],  # type: ignore[misc]
                                      "reset" if event[11] else "closed"))
        except BaseException as exc:
            # ctypes would print and swallow it: stop the drain and raise it from poll.
            self._error = exc
            return -1
        return 0

    def _end(self, family: int, raw: bytes) -> tuple[Any, ...]:
        """(address text, IP version, namespace, service, pod, revision, key) of an address,
        from this drain's cache or attributed now."""
        end = self._ends.get(raw)
        if end is None:
            addr, version = _address(family, raw)
            # Attribution depends on the address only; the port is filled in per record.
            found = self.attribute(addr, None)
            key = (service_key(found.namespace, found.service) if found.service
                   else f"unknown/{addr}".encode())
            end = (addr, version, found.namespace, found.service, found.pod, found.revision,
                   key)
            self._ends[raw] = end
        return end

    def _message(self, fields: tuple[Any, ...], first: int, end_ns: int | None,
                 state: str) -> tuple[bytes, bytes]:
        """The record of a closed connection (``end_ns``), or of an open one as of its latest
        snapshot (``snapshot_ns``, when refresh read its counters): its key and flow.v1 JSON,
        fields in
        FlowRecord's order. ``fields[first:]`` starts with struct conn_t's, in CONN_FIELDS
        order."""
        (start_ns, snapshot_ns, bytes_acked, bytes_received, segs_in, segs_out, cgroup_id,
         srtt_us, pid, netns, active, _reset, established, fin_in, fin_out_acked, comm, saddr,
         daddr, sport, dport, family) = fields[first:first + 21]
        here, there = self._end(family, saddr), self._end(family, daddr)
        # Payload bytes: the counters also count the SYN the opener sent (once acknowledged)
        # and each FIN exchanged, one sequence number each.
        acked = bytes_acked - (active and established) - fin_out_acked
        received = bytes_received - fin_in
        # src is the side that opened the connection; sent/received are from src's view.
        if active:
            src, src_port, dst, dst_port = here, sport, there, dport
            sent, packets_sent, packets_received = acked, segs_out, segs_in
        else:
            src, src_port, dst, dst_port = there, dport, here, sport
            sent, received = received, acked
            packets_sent, packets_received = segs_in, segs_out
        name = self._comms.get(comm)
        if name is None:
            name = self._comms[comm] = comm.split(b"\0", 1)[0].decode(errors="replace") or None
        last_ns = end_ns if end_ns is not None else snapshot_ns
        wall = self._wall_offset_ns
        # The server side's service when known, else the client's, else its address.
        key = dst[6] if dst[3] or not src[3] else src[6]
        return key, _dumps({
            "observer": "tcp_lifecycle", "node": self.node, "protocol": "tcp",
            "ip_version": here[1],
            "src": {"addr": src[0], "port": src_port, "namespace": src[2], "service": src[3],
                    "pod": src[4], "revision": src[5]},
            "dst": {"addr": dst[0], "port": dst_port, "namespace": dst[2], "service": dst[3],
                    "pod": dst[4], "revision": dst[5]},
            "bytes_sent": sent if sent > 0 else 0,
            "bytes_received": received if received > 0 else 0,
            "packets_sent": packets_sent, "packets_received": packets_received,
            "start_us": (start_ns + wall) // 1000,
            "duration_us": max(0, last_ns - start_ns) // 1000,
            "state": state, "interface": None,
            "observed_at": "src" if active else "dst",
            "pid": pid or None, "comm": name,
            "cgroup_id": cgroup_id or None, "netns_ino": netns or None,
            "end_us": None if end_ns is None else (end_ns + wall) // 1000,
            "srtt_us": srtt_us if established else None,
            "schema_version": SCHEMA_VERSION,
        })


_dumps = orjson.dumps


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
    """Reads a C struct from memory in one struct.unpack, into a plain tuple.

    The format follows the ctypes layout BCC derived from the compiled program (field offsets,
    padding, arrays as bytes), plus ``extra`` trailing fields (name, struct code, size), so it
    cannot drift from the C definition; the fields must be ``expected``, in that order.
    """

    def __init__(self, ctype: Any, expected: tuple[str, ...],
                 extra: list[tuple[str, str, int]] | None = None) -> None:
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
        # C rounds a struct's size up to its strictest member's alignment (the ring buffer
        # record of struct event_t has that tail padding too).
        tail = -position % max([ctypes.alignment(ctype), *(size for _, _, size in extra or [])])
        fmt += f"{tail}x" if tail else ""
        if tuple(names[:len(expected)]) != expected:
            raise RuntimeError(f"struct layout {names} does not start with {list(expected)}: "
                               "CONN_FIELDS must follow struct conn_t in bpf/tcp_flows.c")
        self._struct = struct.Struct(fmt)
        self._size = self._struct.size
        self.format = fmt

    def read(self, address: int) -> tuple[Any, ...]:
        return self._struct.unpack(ctypes.string_at(address, self._size))


_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}  # every scalar in the program is unsigned
