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
