"""BCC as `clover stack up` prepares it: the header tree, tracefs and Debian's bcc compile and
load a real tracepoint program on the running kernel, which then sees a real TCP connection."""

from __future__ import annotations

import ctypes
import os
import socket

import pytest

from clover.stack import Stack, install

pytestmark = pytest.mark.root

# Counts TCP state changes on one local port, as the flow collector's tracepoint will.
PROGRAM = """
BPF_ARRAY(transitions, u64, 1);

TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    if (args->protocol != 6 /* IPPROTO_TCP */ || args->dport != PORT)
        return 0;
    int zero = 0;
    u64 *count = transitions.lookup(&zero);
    if (count)
        __sync_fetch_and_add(count, 1);
    return 0;
}
"""


@pytest.fixture
def bpf_environment(live_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("eBPF needs root (CAP_BPF, CAP_PERFMON); run the tests as root")
    headers = install.kernel_headers_dir(live_stack.paths.cache)
    assert headers is not None, "clover stack up (as root) should have fetched kernel headers"
    assert (install.TRACEFS / "events" / "sock" / "inet_sock_set_state").is_dir()
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(headers))


def test_tracepoint_program_sees_a_real_connection(bpf_environment: None) -> None:
    from bcc import BPF

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        bpf = BPF(text=PROGRAM.encode(), cflags=[f"-DPORT={port}"])
        try:
            with socket.create_connection(("127.0.0.1", port)) as client:
                conn, _ = server.accept()
                client.sendall(b"hello")
                assert conn.recv(5) == b"hello"
                conn.close()
            count = bpf[b"transitions"][ctypes.c_int(0)].value
        finally:
            bpf.cleanup()
    # connect() alone takes the client CLOSE -> SYN_SENT -> ESTABLISHED before it returns;
    # the closing transitions follow, some of them asynchronously.
    assert count >= 2


@pytest.mark.parametrize("batched,windows", [(True, True), (False, True), (True, False)],
                         ids=["ring-reader", "libbpf-consumer", "field-by-field"])
def test_flow_collector_reads_its_ring_buffer_exactly_both_ways(
        bpf_environment: None, live_stack: Stack, monkeypatch: pytest.MonkeyPatch,
        batched: bool, windows: bool) -> None:
    """The collector's own batch reader of the ring buffer (collectors/ringbuf.py) and libbpf's
    per-event consumer, its fallback off x86, give the same exact, schema-valid records; so
    does the program when it reads socket fields one by one (its way on a kernel that spreads
    them wider than MAX_WINDOW) instead of in windows."""
    import time

    from clover import records
    from clover.records import FlowRecord
    from collectors import ringbuf, tcp_flows
    from collectors.tcp_flows import TcpFlowCollector

    monkeypatch.setattr(ringbuf, "supported", lambda: batched)
    if not windows:
        monkeypatch.setattr(tcp_flows, "MAX_WINDOW", 0)
    published: list[tuple[bytes, bytes]] = []
    with TcpFlowCollector(headers_dir=install.kernel_headers_dir(live_stack.paths.cache)) as tcp:
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            port = server.getsockname()[1]
            client = socket.create_connection(("127.0.0.1", port))
            conn, _ = server.accept()
            client.sendall(b"q" * 1000)
            got = 0
            while got < 1000:
                got += len(conn.recv(4096))
            conn.sendall(b"r" * 10)
            conn.close()
            while client.recv(4096):
                pass
            client.close()
        ours: list[FlowRecord] = []
        deadline = time.monotonic() + 10
        while len(ours) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            tcp.poll(lambda key, value: published.append((key, value)))
            decoded = [records.decode(FlowRecord, value) for _, value in published]
            ours = [r for r in decoded if r.dst.port == port]
    assert sorted(r.observed_at or "" for r in ours) == ["dst", "src"], ours
    for record in ours:
        assert (record.src.addr, record.dst.addr, record.dst.port) == ("127.0.0.1", "127.0.0.1",
                                                                       port)
        assert (record.bytes_sent, record.bytes_received, record.state) == (1000, 10, "closed")
    # No attribution here: every key is the server's address.
    for key, value in published:
        assert key == f"unknown/{records.decode(FlowRecord, value).dst.addr}".encode()


def test_a_program_run_from_user_space_gets_its_arguments(bpf_environment: None) -> None:
    """collectors/testrun.py: what the flow collector uses to refresh a live connection."""
    from bcc import BPF

    from collectors.testrun import RawTracepointRunner

    bpf = BPF(text=b"""
    BPF_ARRAY(seen, u64, 2);
    int echo(struct bpf_raw_tracepoint_args *ctx) {
        int first = 0, second = 1;
        u64 a = ctx->args[0], b = ctx->args[1];
        seen.update(&first, &a);
        seen.update(&second, &b);
        return (int)(a + b);
    }
    """)
    try:
        runner = RawTracepointRunner(bpf.load_func(b"echo", BPF.RAW_TRACEPOINT).fd, nargs=2)
        assert runner.run(1 << 40 | 5, 7) == 12
        seen = bpf[b"seen"]
        assert [seen[ctypes.c_int(i)].value for i in (0, 1)] == [1 << 40 | 5, 7]
        with pytest.raises(OSError, match="BPF_PROG_TEST_RUN"):
            RawTracepointRunner(-1).run(0)
    finally:
        bpf.cleanup()
