"""The tc packet counter on a real veth pair between two network namespaces (root only).

Known traffic goes between the namespaces (UDP with chosen ports and payload sizes, ICMP and
ICMPv6 echo, a TCP transfer) and the drain must report exactly those 5-tuples, packets and
L2 byte counts. The namespaces are quiet (tests/netns.py): no ARP, neighbour discovery or
router solicitations interleave with the test's packets.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from clover.records import FlowRecord, encode, to_dict, validate
from collectors.environment import CollectorError, default_headers_dir
from collectors.packets import (
    TC_PRIO,
    Counts,
    End,
    PacketCounter,
    _orient,
)
from tests.netns import VethPair, veth_pair

root = pytest.mark.root

ETH, IPV4, IPV6, UDP, ICMP = 14, 20, 40, 8, 8
PING_PAYLOAD = 56  # like ping(8)
SIZES = [0, 1, 100, 1000, 1400]  # UDP payloads; 1400 + headers fits the 1500 MTU
REPLY = b"ack\n"  # the UDP server answers every datagram with these 4 bytes
CLIENT_PORT, SERVER_PORT, TCP_PORT = 40000, 9999, 8080
TCP_BYTES = 200_000

# Answers `count` datagrams on addr:port with REPLY; prints "ready" once bound.
UDP_SERVER = """
import socket, sys
addr, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((addr, port))
s.settimeout(20)
print("ready", flush=True)
for _ in range(count):
    data, peer = s.recvfrom(65535)
    s.sendto(b"ack\\n", peer)
"""

# From src:sport, sends one datagram per size to dst:dport and waits for each answer.
UDP_CLIENT = """
import socket, sys
src, sport, dst, dport = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.socket(socket.AF_INET6 if ":" in src else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, sport))
s.settimeout(10)
for size in map(int, sys.argv[5:]):
    s.sendto(b"x" * size, (dst, dport))
    assert s.recv(65535) == b"ack\\n"
"""

# ping(8) is not installed: echo requests over a raw socket, each reply awaited.
PINGER = """
import os, socket, struct, sys
dst, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
v6 = ":" in dst
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                  socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
s.settimeout(10)
ident = os.getpid() & 0xFFFF

def checksum(data):
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF

for seq in range(count):
    payload = bytes(range(size % 256)) + bytes(size - size % 256)
    header = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, ident, seq)
    if not v6:  # the kernel computes ICMPv6 checksums of raw sockets itself
        header = struct.pack("!BBHHH", 8, 0, checksum(header + payload), ident, seq)
    s.sendto(header + payload, (dst, 0))
    while True:
        data = s.recv(65535)
        icmp = data if v6 else data[(data[0] & 0x0F) * 4:]
        if icmp[0] == (129 if v6 else 0) and struct.unpack("!HH", icmp[4:8]) == (ident, seq):
            break
"""

# Receives a TCP stream to EOF and prints its length.
TCP_SINK = """
import socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
conn, _ = s.accept()
total = 0
while chunk := conn.recv(65536):
    total += len(chunk)
conn.close()
print(total, flush=True)
"""

TCP_SOURCE = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as c:
    c.sendall(b"t" * int(sys.argv[3]))
"""

# Runs the counter with run() until SIGTERM.
RUNNER = """
import sys
from collectors.packets import PacketCounter, run
counter = PacketCounter([sys.argv[1]], netns=sys.argv[2], headers_dir=sys.argv[3])
run(counter, lambda drain: None, interval_s=0.1)
print("stopped", flush=True)
"""


# Writes each hex frame as is to the interface (argv[1]) through a packet socket.
FRAME_SENDER = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
for frame in sys.argv[2:]:
    s.send(bytes.fromhex(frame))
"""
NOBODY = bytes.fromhex("02c10e000001")  # a MAC address on neither end


def eth_frame(ethertype: int, payload: bytes, vlan: int | None = None) -> bytes:
    tag = b"" if vlan is None else struct.pack("!HH", 0x8100, vlan)
    return NOBODY + bytes.fromhex("02c10e000002") + tag + struct.pack("!H", ethertype) + payload


def ipv4(src: str, dst: str, proto: int, payload: bytes, options: bytes = b"",
         frag: int = 0) -> bytes:
    ihl = (20 + len(options)) // 4
    return struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(payload), 0, frag, 64,
                       proto, 0, socket.inet_aton(src), socket.inet_aton(dst)) \
        + options + payload


def ipv6(src: str, dst: str, next_header: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, 64,
                       socket.inet_pton(socket.AF_INET6, src),
                       socket.inet_pton(socket.AF_INET6, dst)) + payload


def udp(sport: int, dport: int, data: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def headers() -> str:
    """The kernel header tree for BCC; skips when eBPF cannot run here."""
    if os.geteuid() != 0:
        pytest.skip("eBPF and network namespaces need root: run the tests as root")
    try:
        import bcc  # noqa: F401
        import pyroute2  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"eBPF unavailable: {exc.name} is not importable (run `clover stack up`)")
    found = default_headers_dir()
    if found is None or not found.is_dir():
        pytest.skip("eBPF unavailable: no kernel headers for BCC (run `clover stack up` as "
                    "root, or set BCC_KERNEL_SOURCE)")
    return str(found)


@pytest.fixture
def pair() -> Iterator[VethPair]:
    with veth_pair() as created:
        yield created


def tc_show(pair: VethPair, *args: str) -> str:
    """`tc ARGS` in ns_a, e.g. tc_show(pair, "filter", "show", "dev", dev, "ingress")."""
    return pair.run(pair.ns_a, ["tc", *args]).stdout.strip()


def our_filters(pair: VethPair) -> dict[str, str]:
    return {hook: tc_show(pair, "filter", "show", "dev", pair.veth_a, hook)
            for hook in ("ingress", "egress")}


def has_clsact(pair: VethPair) -> bool:
    return "clsact" in tc_show(pair, "qdisc", "show", "dev", pair.veth_a)


def start_server(pair: VethPair, ns: str, script: str, *args: object) -> subprocess.Popen[str]:
    server = pair.popen(ns, [sys.executable, "-c", script, *map(str, args)])
    assert server.stdout is not None
    line = server.stdout.readline().strip()
    if line != "ready":
        server.kill()
        raise AssertionError(f"server did not start: {line!r} {server.communicate()}")
    return server


def finish(server: subprocess.Popen[str]) -> str:
    out, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    return out


def run_python(pair: VethPair, ns: str, script: str, *args: object) -> None:
    pair.run(ns, [sys.executable, "-c", script, *map(str, args)])


def udp_bytes(payload: int, v6: bool) -> int:
    """L2 length of a UDP datagram as tc sees it."""
    return payload + UDP + (IPV6 if v6 else IPV4) + ETH


def echo_bytes(v6: bool) -> int:
    return PING_PAYLOAD + ICMP + (IPV6 if v6 else IPV4) + ETH


def flow_tuple(record: FlowRecord) -> tuple[object, ...]:
    return (record.protocol, record.ip_version, record.src.addr, record.src.port,
            record.dst.addr, record.dst.port, record.packets_sent, record.bytes_sent,
            record.packets_received, record.bytes_received)


# -- the counts -------------------------------------------------------------------------------


@root
def test_counts_exact_5_tuples_then_drain_is_empty(headers: str, pair: VethPair) -> None:
    n = len(SIZES)
    with PacketCounter([pair.veth_a], netns=pair.ns_a, headers_dir=headers,
                       node="test-node", max_entries=1024) as counter:
        counter.drain()  # start from an empty map
        before_us = time.time_ns() // 1000

        # UDP over IPv4: client in ns_a -> server in ns_b. Over IPv6 the other way round, so
        # the record's "sent" direction is tc ingress on veth_a.
        udp4 = start_server(pair, pair.ns_b, UDP_SERVER, pair.ip_b, SERVER_PORT, n)
        run_python(pair, pair.ns_a, UDP_CLIENT, pair.ip_a, CLIENT_PORT, pair.ip_b,
                   SERVER_PORT, *SIZES)
        finish(udp4)
        udp6 = start_server(pair, pair.ns_a, UDP_SERVER, pair.ip6_a, SERVER_PORT, n)
        run_python(pair, pair.ns_b, UDP_CLIENT, pair.ip6_b, CLIENT_PORT, pair.ip6_a,
                   SERVER_PORT, *SIZES)
        finish(udp6)
        # ICMP echo a -> b; ICMPv6 echo b -> a (the requester is the record's src).
        run_python(pair, pair.ns_a, PINGER, pair.ip_b, 3, PING_PAYLOAD)
        run_python(pair, pair.ns_b, PINGER, pair.ip6_a, 3, PING_PAYLOAD)
        # TCP a -> b: counted per interface, never as a flow record.
        sink = start_server(pair, pair.ns_b, TCP_SINK, pair.ip_b, TCP_PORT)
        run_python(pair, pair.ns_a, TCP_SOURCE, pair.ip_b, TCP_PORT, TCP_BYTES)
        assert int(finish(sink)) == TCP_BYTES  # traffic passed unchanged
        time.sleep(0.3)  # the last ACKs of the TCP teardown

        drain = counter.drain()
        after_us = time.time_ns() // 1000
        again = counter.drain()

    sent4 = sum(udp_bytes(size, v6=False) for size in SIZES)
    sent6 = sum(udp_bytes(size, v6=True) for size in SIZES)
    reply4, reply6 = udp_bytes(len(REPLY), v6=False), udp_bytes(len(REPLY), v6=True)
    ping4, ping6 = echo_bytes(v6=False), echo_bytes(v6=True)
    expected = {
        ("udp", 4, pair.ip_a, CLIENT_PORT, pair.ip_b, SERVER_PORT, n, sent4, n, n * reply4),
        ("udp", 6, pair.ip6_b, CLIENT_PORT, pair.ip6_a, SERVER_PORT, n, sent6, n, n * reply6),
        ("icmp", 4, pair.ip_a, None, pair.ip_b, None, 3, 3 * ping4, 3, 3 * ping4),
        ("icmpv6", 6, pair.ip6_b, None, pair.ip6_a, None, 3, 3 * ping6, 3, 3 * ping6),
    }
    assert {flow_tuple(record) for record in drain.flows} == expected
    assert len(drain.flows) == len(expected)  # one record per 5-tuple, both directions merged
    # Entries in the kernel map: UDP 2 per direction-pair; ICMP echo request + reply each;
    # TCP a->b and b->a. Anything else would be traffic the test did not make.
    assert drain.entries == 2 + 2 + 2 + 2 + 2
    assert drain.dropped_updates == 0

    assert drain.start_us <= before_us <= after_us and drain.end_us <= after_us
    for record in drain.flows:
        validate(FlowRecord, to_dict(record))
        encode(record)
        assert (record.observer, record.state, record.node) == ("tc_counter", "counter",
                                                                 "test-node")
        assert record.interface == pair.veth_a
        assert (record.start_us, record.end_us) == (drain.start_us, drain.end_us)
        assert record.duration_us == drain.end_us - drain.start_us
        assert (record.pid, record.comm, record.cgroup_id, record.netns_ino) == (None,) * 4
        for end in (record.src, record.dst):
            assert (end.namespace, end.service, end.pod, end.revision) == (None,) * 4
            assert str(ipaddress.ip_address(end.addr)) == end.addr

    # Per interface: rx is tc ingress on veth_a (from ns_b), tx egress (to ns_b).
    iface = drain.interfaces[pair.veth_a]
    assert list(drain.interfaces) == [pair.veth_a]
    assert iface.tx["udp"] == Counts(2 * n, sent4 + n * reply6)
    assert iface.rx["udp"] == Counts(2 * n, n * reply4 + sent6)
    assert iface.tx["icmp"] == Counts(6, 3 * ping4 + 3 * ping6)
    assert iface.rx["icmp"] == Counts(6, 3 * ping4 + 3 * ping6)
    # TCP: the data went a -> b (at least the payload plus headers), ACKs came back.
    assert iface.tx["tcp"].packets > 0 and iface.tx["tcp"].bytes > TCP_BYTES
    assert 0 < iface.rx["tcp"].packets and iface.rx["tcp"].bytes < TCP_BYTES
    assert all(record.protocol != "tcp" for record in drain.flows)

    # The drain deleted what it read: nothing again without traffic.
    assert again.flows == [] and again.entries == 0 and again.dropped_updates == 0
    for side in (again.interfaces[pair.veth_a].rx, again.interfaces[pair.veth_a].tx):
        assert all(side[proto] == Counts() for proto in ("tcp", "udp", "icmp"))
    assert again.start_us == drain.end_us


@root
def test_parser_vlan_ip_options_fragments_and_other(headers: str, pair: VethPair) -> None:
    """Hand-made frames, sent from ns_a with a packet socket to a MAC nobody has (so ns_b
    drops them without answering): each exercises one branch of the parser."""
    a, b = pair.ip_a, pair.ip_b
    frames = [
        # 802.1Q tag in the frame (the egress path keeps it in band for a packet socket)
        eth_frame(0x0800, ipv4(a, b, 17, udp(50000, 53, b"v" * 10)), vlan=100),
        # IPv4 header with 4 bytes of options: the ports are after IHL * 4, not 20
        eth_frame(0x0800, ipv4(a, b, 17, udp(50001, 54, b"o" * 10), options=b"\x01" * 4)),
        # a non-first fragment has no UDP header: ports 0
        eth_frame(0x0800, ipv4(a, b, 17, b"f" * 16, frag=185)),
        # IPv6 starting with a hop-by-hop header, GRE, and a non-IP EtherType: "other"
        eth_frame(0x86DD, ipv6(pair.ip6_a, pair.ip6_b, 0, bytes([17, 0]) + bytes(6))),
        eth_frame(0x0800, ipv4(a, b, 47, bytes(4))),
        eth_frame(0x88B5, bytes(46)),
    ]
    with PacketCounter([pair.veth_a], netns=pair.ns_a, headers_dir=headers) as counter:
        # MLD reports ("other") repeat at random intervals of up to 1 s for a few seconds
        # after the links come up: wait for 1.5 s without any.
        deadline, quiet = time.monotonic() + 15, 0
        while quiet < 3:
            assert time.monotonic() < deadline, "ns_a keeps sending"
            time.sleep(0.5)
            noisy = counter.drain().interfaces[pair.veth_a].tx["other"].packets
            quiet = 0 if noisy else quiet + 1
        run_python(pair, pair.ns_a, FRAME_SENDER, pair.veth_a, *(f.hex() for f in frames))
        drain = counter.drain()

    lengths = [len(frame) for frame in frames]
    assert lengths == [56, 56, 50, 62, 38, 60]
    assert {flow_tuple(record) for record in drain.flows} == {
        ("udp", 4, a, 50000, b, 53, 1, 56, 0, 0),
        ("udp", 4, a, 50001, b, 54, 1, 56, 0, 0),
        ("udp", 4, a, 0, b, 0, 1, 50, 0, 0),
    }
    iface = drain.interfaces[pair.veth_a]
    assert iface.tx["udp"] == Counts(3, 56 + 56 + 50)
    assert iface.tx["other"] == Counts(3, 62 + 38 + 60)
    assert iface.rx["udp"] == iface.rx["icmp"] == iface.tx["icmp"] == Counts()


@root
def test_a_full_map_counts_dropped_updates_and_key_by_key_drain(
    headers: str, pair: VethPair
) -> None:
    n = len(SIZES)
    with PacketCounter([pair.veth_a], netns=pair.ns_a, headers_dir=headers,
                       max_entries=2) as counter:
        counter.drain()
        run_python(pair, pair.ns_a, PINGER, pair.ip_b, 3, PING_PAYLOAD)  # 2 entries: full
        server = start_server(pair, pair.ns_b, UDP_SERVER, pair.ip_b, SERVER_PORT, n)
        run_python(pair, pair.ns_a, UDP_CLIENT, pair.ip_a, CLIENT_PORT, pair.ip_b,
                   SERVER_PORT, *SIZES)
        finish(server)
        full = counter.drain()

        # The same again with the fallback for kernels without batch lookup-and-delete.
        counter.batch_delete = False
        run_python(pair, pair.ns_a, PINGER, pair.ip_b, 3, PING_PAYLOAD)
        key_by_key = counter.drain()
        empty = counter.drain()

    ping4 = echo_bytes(v6=False)
    icmp = ("icmp", 4, pair.ip_a, None, pair.ip_b, None, 3, 3 * ping4, 3, 3 * ping4)
    assert [flow_tuple(record) for record in full.flows] == [icmp]
    assert full.entries == 2
    assert full.dropped_updates == 2 * n  # every UDP datagram and answer, none silently
    assert [flow_tuple(record) for record in key_by_key.flows] == [icmp]
    assert key_by_key.dropped_updates == 0
    assert empty.flows == [] and empty.entries == 0


# -- clean detach -----------------------------------------------------------------------------


@root
def test_close_removes_filters_and_qdisc_even_when_the_body_raises(
    headers: str, pair: VethPair
) -> None:
    assert not has_clsact(pair)
    counter = PacketCounter([pair.veth_a], netns=pair.ns_a, headers_dir=headers)
    with pytest.raises(RuntimeError, match="boom"), counter:
        filters = our_filters(pair)
        assert "clover_ingress" in filters["ingress"] and "direct-action" in filters["ingress"]
        assert "clover_egress" in filters["egress"] and f"pref {TC_PRIO}" in filters["egress"]
        assert has_clsact(pair)
        raise RuntimeError("boom")
    assert our_filters(pair) == {"ingress": "", "egress": ""}
    assert not has_clsact(pair)  # we created it, so we removed it
    counter.close()  # idempotent
    with pytest.raises(CollectorError, match="not started"):
        counter.drain()


@root
def test_keeps_a_qdisc_and_filters_it_did_not_create(headers: str, pair: VethPair) -> None:
    dev = pair.veth_a
    tc_show(pair, "qdisc", "add", "dev", dev, "clsact")
    # (This kernel has no matchall classifier and no gact action: a bare u32 it is.)
    tc_show(pair, "filter", "add", "dev", dev, "ingress", "prio", "7", "protocol", "all",
            "u32", "match", "u32", "0", "0", "flowid", ":1")
    with PacketCounter([dev], netns=pair.ns_a, headers_dir=headers):
        assert "clover_ingress" in our_filters(pair)["ingress"]
    filters = our_filters(pair)
    assert "u32" in filters["ingress"] and "clover" not in filters["ingress"]
    assert filters["egress"] == ""
    assert has_clsact(pair)


@root
def test_failed_start_undoes_the_interfaces_already_attached(
    headers: str, pair: VethPair
) -> None:
    # lo gets an "ingress" qdisc, which excludes clsact: attaching veth_a works, lo fails.
    pair.run(pair.ns_a, ["tc", "qdisc", "add", "dev", "lo", "ingress"])
    counter = PacketCounter([pair.veth_a, "lo"], netns=pair.ns_a, headers_dir=headers)
    with pytest.raises(CollectorError, match="lo has an 'ingress' qdisc"):
        counter.start()
    assert our_filters(pair) == {"ingress": "", "egress": ""}
    assert not has_clsact(pair)


@root
def test_sigterm_stops_run_and_detaches(headers: str, pair: VethPair) -> None:
    runner = subprocess.Popen(
        [sys.executable, "-c", RUNNER, pair.veth_a, pair.ns_a, headers],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while "clover_egress" not in our_filters(pair)["egress"]:
            assert runner.poll() is None, runner.communicate()
            assert time.monotonic() < deadline, "the counter never attached"
            time.sleep(0.1)
        runner.send_signal(signal.SIGTERM)
        out, err = runner.communicate(timeout=30)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    assert runner.returncode == 0, err
    assert out.strip() == "stopped"
    assert our_filters(pair) == {"ingress": "", "egress": ""}
    assert not has_clsact(pair)


# -- clear errors -----------------------------------------------------------------------------


@root
def test_a_missing_interface_is_named(headers: str, pair: VethPair) -> None:
    counter = PacketCounter(["nosuch0"], netns=pair.ns_a, headers_dir=headers)
    with pytest.raises(CollectorError, match=f"'nosuch0' does not exist in .*{pair.ns_a}"):
        counter.start()


@root
def test_a_missing_namespace_is_named(headers: str) -> None:
    counter = PacketCounter(["eth0"], netns="clv-no-such-netns", headers_dir=headers)
    with pytest.raises(CollectorError, match="network namespace 'clv-no-such-netns'"):
        counter.start()


def test_not_root_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake non-root user: the suite runs as root, so this fault cannot be caused for real."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(CollectorError, match=r"eBPF needs root \(CAP_BPF, CAP_PERFMON, "
                                             r"CAP_NET_ADMIN\): run the collector as root"):
        PacketCounter(["eth0"]).start()


def test_missing_headers_say_how_to_get_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    counter = PacketCounter(["eth0"], headers_dir="/nonexistent/linux-headers")
    with pytest.raises(CollectorError, match="run `clover stack up` as root to fetch kernel"):
        counter.start()


# -- which end is src -------------------------------------------------------------------------


def test_orientation_rules() -> None:
    a, b = ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.0.2")
    # UDP: the higher (ephemeral) port is the client, whichever address is lower.
    assert _orient(((a, 53), (b, 53211)), set()) == ((b, 53211), (a, 53))
    assert _orient(((a, 40000), (b, 9999)), set()) == ((a, 40000), (b, 9999))
    assert _orient(((a, 5000), (b, 5000)), set()) == ((a, 5000), (b, 5000))
    # ICMP: the echo requester; otherwise the lower address.
    assert _orient(((a, None), (b, None)), {(b, None)}) == ((b, None), (a, None))
    assert _orient(((a, None), (b, None)), set()) == ((a, None), (b, None))
    both: set[End] = {(a, None), (b, None)}
    assert _orient(((a, None), (b, None)), both) == ((a, None), (b, None))
    # Traffic in one direction only: the sender, whatever the ports say.
    assert _orient(((a, 40001), (b, 40002)), set(), {(a, 40001)}) == ((a, 40001), (b, 40002))
    assert _orient(((a, 53), (b, 53211)), set(), {(a, 53)}) == ((a, 53), (b, 53211))
    assert _orient(((a, 53), (b, 53211)), set(), {(a, 53), (b, 53211)}) == (
        (b, 53211), (a, 53))
