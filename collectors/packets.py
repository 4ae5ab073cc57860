"""Packet and byte counters per 5-tuple from tc (clsact ingress and egress), with BCC.

One small BPF program (``collectors/bpf/packet_counter.c``) counts every packet on the chosen
interfaces (e.g. pod veths) into a hash map in the kernel; :meth:`PacketCounter.drain` reads
and deletes the map periodically. Nothing is sent to user space per packet.

    with PacketCounter(["veth1a2b3c"]) as counter:
        while True:
            time.sleep(10)
            for record in counter.drain().flows:
                producer.produce(..., encode(record))

or :func:`run`, which also turns SIGTERM into a clean stop. A caller with its own loop must
make sure :meth:`PacketCounter.close` runs (``with`` or ``finally``): the tc filters outlive
the process otherwise.

What a drain reports:

* ``flows``: one :class:`FlowRecord` (observer ``tc_counter``, state ``counter``) per UDP,
  ICMP or ICMPv6 5-tuple and interface, both directions (ingress and egress entries that are
  each other's reverse) merged into one record; ``src`` is the likely client (see
  :func:`_orient`), ``*_sent`` counts src -> dst and ``*_received`` dst -> src. TCP is left
  to the TCP lifecycle collector, which knows the owning process; here it is only counted per
  interface. (On ``lo`` every packet passes egress and then ingress, so it counts twice.)
* ``interfaces``: per interface, received (tc ingress) and transmitted (tc egress) packets and
  bytes for tcp, udp, icmp (ICMP and ICMPv6) and other (non-IP, other L4 protocols, IPv6 whose
  first next-header is an extension header), for Prometheus counters.
* ``dropped_updates``: packets the kernel could not count because a map was full.

With ``http=True`` the same program also pairs plaintext HTTP/1.x requests with their responses
in the kernel (see packet_counter.c); :meth:`PacketCounter.exchanges` returns them, one
:class:`HttpExchange` per request: method, path (query string left out: it can carry secrets,
and every value would be an operation of its own), status, and the time from the request's
first segment to the response's first segment as it passed the interface. Only the first 96
bytes of a request are read, so a longer path is cut there.

Bytes are ``skb->len``: the L2 frame length as tc sees it (Ethernet header included, no FCS),
e.g. a UDP datagram of n payload bytes over IPv4 is n + 8 + 20 + 14. Packets are wire packets
(the segments of a GSO/GRO aggregate). Since FlowRecord has no fields for ICMP type and code,
ICMP records carry no ports and aggregate all types between two addresses.

Draining uses BPF_MAP_LOOKUP_AND_DELETE_BATCH (kernel 5.6+; key-by-key lookup and delete
otherwise). A packet that a CPU counts in the instant between the kernel copying an entry and
deleting it is lost: deleting is what keeps the map small, and the window is microseconds.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from errno import ENODEV, ENOENT
from pathlib import Path
from types import TracebackType
from typing import Any

from clover.records import Endpoint, FlowRecord, Protocol
from collectors.environment import CollectorError, bpf_environment
from collectors.signals import stop_on_signals

log = logging.getLogger(__name__)

PROGRAM = Path(__file__).with_name("bpf") / "packet_counter.c"

# Our filters' priority on clsact ingress and egress; it identifies them for deletion. Filters
# run in priority order (lower first): ours returns TC_ACT_UNSPEC so the next ones still run,
# but a filter before it that drops or redirects hides those packets from us.
TC_PRIO = 0xC10
TC_HANDLE = 1
INGRESS, EGRESS = 0xFFFFFFF2, 0xFFFFFFF3  # clsact's ffff:fff2 and ffff:fff3
HOOKS = ((INGRESS, "ingress", b"clover_ingress"), (EGRESS, "egress", b"clover_egress"))

PROTOCOLS = ("tcp", "udp", "icmp", "other")  # the per-interface counter groups
_L4: dict[int, Protocol] = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
_ECHO_REQUEST = {"icmp": 8, "icmpv6": 128}
# Request methods (RFC 9110); the kernel checks only their first four bytes.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                          "PATCH"})
HTTP_RING_PAGES = 64  # 256 KiB: ~1,500 exchanges between two reads


@dataclass
class Counts:
    packets: int = 0
    bytes: int = 0

    def add(self, packets: int, nbytes: int) -> None:
        self.packets += packets
        self.bytes += nbytes


@dataclass
class HttpExchange:
    """One HTTP/1.x request and its response, as they passed an interface."""

    interface: str
    ip_version: int
    client: tuple[str, int]  # (address, port)
    server: tuple[str, int]
    method: str
    path: str
    status: int
    start_us: int  # Unix time of the request's first segment
    duration_us: int  # from it to the response's first segment


def _by_protocol() -> dict[str, Counts]:
    return {name: Counts() for name in PROTOCOLS}


@dataclass
class InterfaceCounters:
    """One interface's traffic in one drain, keyed by ``PROTOCOLS``."""

    rx: dict[str, Counts] = field(default_factory=_by_protocol)  # tc ingress
    tx: dict[str, Counts] = field(default_factory=_by_protocol)  # tc egress


@dataclass
class Drain:
    """Everything counted between two drains, ``start_us`` to ``end_us``."""

    flows: list[FlowRecord]
    interfaces: dict[str, InterfaceCounters]
    dropped_updates: int  # map updates that failed (map full) in this window
    entries: int  # 5-tuple map entries drained
    start_us: int
    end_us: int


def _now_us() -> int:
    return time.time_ns() // 1000


class PacketCounter:
    """Counts packets per 5-tuple on tc ingress and egress of ``interfaces``.

    ``netns`` names the network namespace (``ip netns``: /run/netns/NAME) the interfaces live
    in; None means this process's. The BPF program and maps are global; only the tc
    attachment is per namespace. ``max_entries`` bounds the 5-tuple map (updates beyond it
    are counted in ``Drain.dropped_updates``). ``headers_dir`` is the kernel header tree BCC
    compiles against (default: :func:`collectors.environment.default_headers_dir`).
    """

    def __init__(
        self,
        interfaces: list[str],
        *,
        max_entries: int = 65536,
        node: str = socket.gethostname(),
        headers_dir: str | None = None,
        netns: str | None = None,
        http: bool = False,
        max_http_requests: int = 16384,
    ) -> None:
        if not interfaces:
            raise ValueError("PacketCounter needs at least one interface")
        if max_entries < 1:
            raise ValueError(f"max_entries must be positive, not {max_entries}")
        self.interfaces = list(interfaces)
        self.max_entries = max_entries
        self.node = node
        self.headers_dir = headers_dir
        self.netns = netns
        self.http = http
        self.max_http_requests = max_http_requests
        self.batch_delete: bool | None = None  # known after start()
        self._exchanges: list[HttpExchange] = []  # filled by _on_http during exchanges()
        self._http_event: Any = None  # ctypes type of struct http_event, once loaded
        self._http_error: BaseException | None = None  # raised by _on_http during a drain
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC; this turns it into Unix time.
        self._wall_offset_ns = time.time_ns() - time.monotonic_ns()
        self._bpf: Any = None
        self._ipr: Any = None
        self._names: dict[int, str] = {}  # ifindex -> name
        self._filters: list[tuple[int, int, str]] = []  # (ifindex, parent, hook) we added
        self._qdiscs: list[int] = []  # ifindexes whose clsact qdisc we created
        self._last_us = 0
        self._dropped_seen = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> PacketCounter:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Compile and load the program, attach it to every interface; on failure undo all."""
        if self._bpf is not None:
            return
        headers = bpf_environment(Path(self.headers_dir) if self.headers_dir else None)
        from bcc import BPF
        from pyroute2 import IPRoute

        # Checked here: pyroute2 leaks its event loop when the namespace is missing.
        if self.netns and not (Path("/run/netns") / self.netns).exists():
            raise CollectorError(f"network namespace {self.netns!r} does not exist (ip netns)")
        try:
            self._ipr = IPRoute(netns=self.netns, flags=0) if self.netns else IPRoute()
        except OSError as exc:
            raise CollectorError(f"cannot open network namespace {self.netns!r}: {exc}") from exc
        self._names = {}
        try:
            for name in self.interfaces:
                found = self._ipr.link_lookup(ifname=name)
                if not found:
                    where = f" in network namespace {self.netns}" if self.netns else ""
                    raise CollectorError(f"interface {name!r} does not exist{where}")
                self._names[found[0]] = name
            cflags = [f"-DMAX_ENTRIES={self.max_entries}"]
            if self.http:
                cflags += ["-DHTTP", f"-DMAX_HTTP={self.max_http_requests}",
                           f"-DHTTP_PAGES={HTTP_RING_PAGES}"]
            try:
                self._bpf = BPF(src_file=str(PROGRAM).encode(), cflags=cflags)
            except Exception as exc:
                raise CollectorError(
                    f"BCC could not compile/load {PROGRAM.name} against {headers} ({exc}); "
                    "see the compiler output above"
                ) from exc
            self.batch_delete = self._probe_batch_delete()
            if self.http:
                # struct http_event, from the types BCC derived for the table's key and value.
                table = self._bpf[b"http_requests"]
                self._http_event = type("http_event", (ctypes.Structure,), {"_fields_": [
                    ("key", table.Key), ("request", table.Leaf),
                    ("response_ns", ctypes.c_uint64), ("status", ctypes.c_uint32)]})
                self._bpf[b"http_events"].open_ring_buffer(self._on_http)
            functions = {hook: self._bpf.load_func(fn, BPF.SCHED_CLS) for _, hook, fn in HOOKS}
            for index, name in self._names.items():
                self._attach(index, name, functions)
            self._last_us = _now_us()
        except BaseException:
            self.close()
            raise

    def _probe_batch_delete(self) -> bool:
        """Whether the kernel has BPF_MAP_LOOKUP_AND_DELETE_BATCH (5.6+) for hash maps."""
        try:
            list(self._bpf[b"flows"].items_lookup_and_delete_batch())  # empty: ENOENT, fine
            return True
        except Exception as exc:  # BCC raises a bare Exception with strerror
            log.warning("batch lookup-and-delete unsupported (%s): draining key by key", exc)
            return False

    def _attach(self, index: int, name: str, functions: dict[str, Any]) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        kinds = {q.get_attr("TCA_KIND") for q in self._ipr.get_qdiscs(index)
                 if q["index"] == index}
        if "ingress" in kinds:
            raise CollectorError(
                f"{name} has an 'ingress' qdisc, which excludes clsact: replace it with "
                f"clsact (tc qdisc del dev {name} ingress) and move its filters"
            )
        if "clsact" not in kinds:
            self._ipr.tc("add", "clsact", index)
            self._qdiscs.append(index)
        for parent, hook, _ in HOOKS:
            fn = functions[hook]
            try:
                self._ipr.tc("add-filter", "bpf", index, TC_HANDLE, fd=fn.fd,
                             name=fn.name.decode(), parent=parent, prio=TC_PRIO,
                             classid=1, direct_action=True)
            except NetlinkError as exc:
                raise CollectorError(
                    f"cannot attach to {name} {hook} ({exc}); if a filter from a crashed "
                    f"counter is left, remove it: tc filter del dev {name} {hook} prio {TC_PRIO}"
                ) from exc
            self._filters.append((index, parent, hook))

    def close(self) -> None:
        """Detach every filter we added, delete clsact qdiscs we created, unload. Idempotent.

        A qdisc we created is kept if someone else attached filters to it meanwhile. An
        interface that vanished (pod deleted) took our filters with it: not an error.
        """
        failures: list[str] = []
        if self._ipr is not None:
            from pyroute2.netlink.exceptions import NetlinkError

            while self._filters:
                index, parent, hook = self._filters.pop()
                try:
                    self._ipr.tc("del-filter", "bpf", index, TC_HANDLE, parent=parent,
                                 prio=TC_PRIO)
                except NetlinkError as exc:
                    if exc.code not in (ENODEV, ENOENT):
                        failures.append(f"{self._names.get(index)} {hook} filter: {exc}")
            while self._qdiscs:
                index = self._qdiscs.pop()
                try:
                    if any(self._ipr.get_filters(index=index, parent=p) for p, _, _ in HOOKS):
                        log.info("keeping clsact on %s: other filters use it",
                                 self._names.get(index))
                        continue
                    self._ipr.tc("del", "clsact", index)
                except NetlinkError as exc:
                    if exc.code not in (ENODEV, ENOENT):
                        failures.append(f"{self._names.get(index)} clsact qdisc: {exc}")
            self._ipr.close()
            self._ipr = None
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
        if failures:
            raise CollectorError("could not remove: " + "; ".join(failures))

    # -- draining ----------------------------------------------------------------------------
    def _take(self, table: Any) -> list[tuple[Any, int, int]]:
        """Read and delete every entry: (key, packets, bytes)."""
        if self.batch_delete:
            items = table.items_lookup_and_delete_batch()
        else:  # key by key: an update between lookup and delete is lost
            def one_by_one() -> Any:
                for key in list(table.keys()):
                    try:
                        value = table[key]
                        del table[key]
                    except KeyError:
                        continue
                    yield key, value
            items = one_by_one()
        return [(key, int(value.packets), int(value.bytes)) for key, value in items]

    def drain(self) -> Drain:
        """Read and delete the counts: everything since the last drain (or start)."""
        if self._bpf is None:
            raise CollectorError("PacketCounter is not started: call start() or use `with`")
        start_us, end_us = self._last_us, _now_us()
        self._last_us = end_us
        entries = self._take(self._bpf[b"flows"])
        others = self._take(self._bpf[b"other"])
        # The per-CPU counter is never reset (no lost increments): report the difference.
        dropped_total = int(self._bpf[b"dropped_updates"].sum(0).value)
        dropped, self._dropped_seen = dropped_total - self._dropped_seen, dropped_total

        interfaces = {name: InterfaceCounters() for name in self._names.values()}

        def counters(ifindex: int, direction: int) -> dict[str, Counts]:
            iface = interfaces.setdefault(self._names.get(ifindex, f"if{ifindex}"),
                                          InterfaceCounters())
            return iface.rx if direction == 0 else iface.tx

        for key, packets, nbytes in others:
            counters(key.ifindex, key.direction)["other"].add(packets, nbytes)
        pairs: dict[tuple[Any, ...], _Pair] = {}
        for key, packets, nbytes in entries:
            proto = _L4[key.proto]
            group = "icmp" if proto == "icmpv6" else proto
            counters(key.ifindex, key.direction)[group].add(packets, nbytes)
            if proto == "tcp":
                continue
            version = 4 if key.family == socket.AF_INET else 6
            size = 4 if version == 4 else 16
            icmp = proto != "udp"
            sender = (ipaddress.ip_address(bytes(key.saddr)[:size]),
                      None if icmp else int(key.sport))
            receiver = (ipaddress.ip_address(bytes(key.daddr)[:size]),
                        None if icmp else int(key.dport))
            ends = tuple(sorted((sender, receiver), key=_order))
            iface = self._names.get(key.ifindex, f"if{key.ifindex}")
            pair = pairs.setdefault((iface, proto, version, ends), _Pair())
            pair.sent.setdefault(sender, Counts()).add(packets, nbytes)
            if icmp and key.sport == _ECHO_REQUEST[proto]:
                pair.requesters.add(sender)
        flows = [
            self._record(iface, proto, version, ends, pair, start_us, end_us)
            for (iface, proto, version, ends), pair in sorted(
                pairs.items(), key=lambda item: (item[0][:3], [_order(e) for e in item[0][3]]))
        ]
        return Drain(flows=flows, interfaces=interfaces, dropped_updates=dropped,
                     entries=len(entries), start_us=start_us, end_us=end_us)

    def exchanges(self) -> list[HttpExchange]:
        """The HTTP exchanges completed since the last call (needs ``http=True``)."""
        if self._bpf is None or not self.http:
            raise CollectorError("exchanges() needs a started PacketCounter(http=True)")
        self._exchanges, self._http_error = [], None
        self._bpf.ring_buffer_consume()
        if self._http_error is not None:
            raise self._http_error
        return self._exchanges

    def http_lost(self) -> int:
        """Exchanges the kernel could not hand over (ring buffer full), since start."""
        return int(self._bpf[b"http_lost"].sum(0).value) if self.http else 0

    def _on_http(self, _ctx: Any, data: int, _size: int) -> int:
        """libbpf's callback, one completed exchange at a time."""
        try:
            exchange = self._exchange(ctypes.cast(data, ctypes.POINTER(self._http_event)).contents)
        except BaseException as exc:
            # ctypes would print and swallow it: stop the drain and raise it from exchanges().
            self._http_error = exc
            return -1
        if exchange is not None:
            self._exchanges.append(exchange)
        return 0

    def _exchange(self, event: Any) -> HttpExchange | None:
        request = event.request
        line = bytes(request.line[:request.line_len]).split(b"\r\n", 1)[0]
        method, _, rest = line.partition(b" ")
        target = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        name = method.decode("ascii", "replace")
        if name not in HTTP_METHODS or not target:
            return None  # began like a method but is not a request line
        key = event.key
        version = 4 if key.family == socket.AF_INET else 6
        size = 4 if version == 4 else 16
        return HttpExchange(
            interface=self._names.get(request.ifindex, f"if{request.ifindex}"),
            ip_version=version,
            client=(str(ipaddress.ip_address(bytes(key.client)[:size])), int(key.client_port)),
            server=(str(ipaddress.ip_address(bytes(key.server)[:size])), int(key.server_port)),
            method=name, path=target.decode("utf-8", "replace"), status=int(event.status),
            start_us=(request.request_ns + self._wall_offset_ns) // 1000,
            duration_us=(event.response_ns - request.request_ns) // 1000)

    def _record(self, iface: str, proto: Protocol, version: int, ends: tuple[Any, ...],
                pair: _Pair, start_us: int, end_us: int) -> FlowRecord:
        src, dst = _orient(ends, pair.requesters, set(pair.sent))
        out = pair.sent.get(src, Counts())
        # Talking to itself (src == dst): no direction to tell apart, all counts are "sent".
        back = pair.sent.get(dst, Counts()) if dst != src else Counts()
        return FlowRecord(
            observer="tc_counter", node=self.node, interface=iface, protocol=proto,
            ip_version=version,
            src=Endpoint(addr=str(src[0]), port=src[1]),
            dst=Endpoint(addr=str(dst[0]), port=dst[1]),
            bytes_sent=out.bytes, bytes_received=back.bytes,
            packets_sent=out.packets, packets_received=back.packets,
            start_us=start_us, end_us=end_us, duration_us=end_us - start_us,
            state="counter",
        )


Address = ipaddress.IPv4Address | ipaddress.IPv6Address
End = tuple[Address, int | None]  # (address, port); port None for ICMP


@dataclass
class _Pair:
    """Both directions of one 5-tuple on one interface."""

    sent: dict[End, Counts] = field(default_factory=dict)  # by sending endpoint
    requesters: set[End] = field(default_factory=set)  # ICMP echo request senders


def _order(end: End) -> tuple[Address, int]:
    return (end[0], -1 if end[1] is None else end[1])


def _orient(ends: tuple[End, ...], requesters: set[End],
            senders: set[End] | None = None) -> tuple[End, End]:
    """(src, dst): a counter does not see who started, so src is the likely client.

    Traffic in one direction only: its sender. Otherwise, UDP: the endpoint with the higher
    port (servers listen on low, well-known ports; clients send from ephemeral ones). ICMP:
    the side that sent echo requests. When that does not decide (equal ports, both or neither
    pinged), the lower address, then port.
    """
    low, high = ends
    if senders is not None and len(senders) == 1:
        (sender,) = senders
        return (sender, high if sender == low else low)
    if low[1] is not None and high[1] is not None and low[1] != high[1]:  # UDP
        return (low, high) if low[1] > high[1] else (high, low)
    if len(requesters) == 1:
        (requester,) = requesters
        return (requester, high if requester == low else low)
    return low, high


def run(counter: PacketCounter, on_drain: Callable[[Drain], None], *,
        interval_s: float = 10.0, stop: threading.Event | None = None) -> None:
    """Start ``counter``, hand a drain to ``on_drain`` every ``interval_s`` until ``stop`` is
    set or SIGTERM arrives (then one last drain), and always close the counter.

    SIGTERM is handled only when called from the main thread (where Python runs handlers);
    the previous handler is restored on return.
    """
    stop = stop or threading.Event()
    restore = stop_on_signals(stop)
    try:
        counter.start()
        while not stop.wait(interval_s):
            on_drain(counter.drain())
        on_drain(counter.drain())
    finally:
        try:
            counter.close()
        finally:
            restore()
