"""`clover collect flows` end to end, as root on the real kernel: two network namespaces joined
by a veth pair, known TCP and UDP traffic between them, and the records read back from real
Kafka, attributed through the real API server.

The tracepoint sees every TCP socket on the machine (it has unrelated loopback traffic), so the
assertions pick this test's records by their addresses, which exist only in these namespaces.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client, config

from clover import records
from clover.config import ConfigError, Settings
from clover.records import FlowRecord, SpanRecord
from clover.stack import Stack
from clover.topics import FLOWS, SPANS
from collectors.flows import CollectSummary, collect_flows
from tests import kube
from tests.netns import VethPair, veth_pair

pytestmark = pytest.mark.root

# A server that accepts one connection, reads exactly REQUEST bytes, answers REPLY bytes and
# closes; with "reset" it instead aborts the connection (SO_LINGER 0 sends a RST).
SERVER = """
import socket, struct, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
srv = socket.socket(family)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen()
print("listening", flush=True)
conn, _ = srv.accept()
if sys.argv[5] == "reset":
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close(); sys.exit(0)
got = 0
while got < int(sys.argv[3]):
    got += len(conn.recv(65536))
conn.sendall(b"r" * int(sys.argv[4])); conn.close()
"""
# A client that sends REQUEST bytes (in two halves PAUSE seconds apart), reads until the server
# closes, then closes; it prints its own port and PID.
CLIENT = """
import os, socket, sys, time
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
c = socket.socket(family); c.connect((sys.argv[1], int(sys.argv[2])))
print(c.getsockname()[1], os.getpid(), flush=True)
half = int(sys.argv[3]) // 2
try:
    c.sendall(b"q" * half); time.sleep(float(sys.argv[4]))
    c.sendall(b"q" * (int(sys.argv[3]) - half))
    while c.recv(65536):
        pass
except (ConnectionResetError, BrokenPipeError):  # the server aborted the connection
    pass
c.close()
"""


class RunningCollector:
    """collect_flows in a thread, stopped (and its records flushed) by ``stop``."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        self.stop_event, ready = threading.Event(), threading.Event()
        self.result: list[CollectSummary | BaseException] = []

        def target() -> None:
            try:
                self.result.append(collect_flows(settings, stop=self.stop_event, ready=ready,
                                                 **kwargs))
            except BaseException as exc:  # handed to the test thread
                self.result.append(exc)
                ready.set()

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()
        assert ready.wait(60), "the collector did not attach within 60 s"
        if self.result and isinstance(self.result[0], BaseException):
            raise self.result[0]

    def stop(self) -> CollectSummary:
        self.stop_event.set()
        self.thread.join(60)
        [summary] = self.result
        if isinstance(summary, BaseException):
            raise summary
        return summary


@pytest.fixture
def pair() -> Iterator[VethPair]:
    with veth_pair() as pair:
        yield pair


@pytest.fixture
def flow_settings(settings: Settings, live_stack: Stack, kafka_topics: Any) -> Settings:
    collectors = dataclasses.replace(settings.collectors, metrics_port=0,
                                     flow_update_interval_s=1)
    return dataclasses.replace(settings, collectors=collectors)


@pytest.fixture
def server_pod(live_stack: Stack, settings: Settings, pair: VethPair) -> Iterator[dict[str, str]]:
    """A Deployment whose pod has ns_b's addresses, as if it ran there."""
    api = config.new_client_from_config(str(live_stack.paths.kube / "admin.kubeconfig"))
    namespace = settings.kubernetes.namespace
    name = f"flowsrv-{uuid.uuid4().hex[:6]}"
    client.AppsV1Api(api).create_namespaced_deployment(namespace, kube.deployment(name))
    try:
        [pod] = kube.eventually(lambda: kube.pods_of(api, namespace, name))
        kube.patch_pod_status(client.CoreV1Api(api), kube.name_of(pod), namespace,
                              kube.pod_status(pair.ip_b, pair.ip6_b))
        yield {"namespace": namespace, "service": name, "pod": kube.name_of(pod),
               "revision": kube.template_hash(pod)}
    finally:
        client.AppsV1Api(api).delete_namespaced_deployment(name, namespace)
        api.close()


def _converse(pair: VethPair, server_addr: str, request: int, reply: int, *,
              mode: str = "normal", pause: float = 0.0) -> tuple[int, int, int, int]:
    """One connection from ns_a to ns_b; returns the client's port and PID, the server's PID
    and port."""
    port = 20000 + int(uuid.uuid4().int % 20000)
    server = pair.popen(pair.ns_b, [sys.executable, "-c", SERVER, server_addr, str(port),
                                    str(request), str(reply), mode])
    assert server.stdout is not None and server.stdout.readline().strip() == "listening"
    out = pair.run(pair.ns_a, [sys.executable, "-c", CLIENT, server_addr, str(port),
                               str(request), str(pause)], check=True)
    assert server.wait(30) == 0
    client_port, client_pid = map(int, out.stdout.split())
    return client_port, client_pid, server.pid, port


def _flows(reader: Any, *addrs: str) -> list[FlowRecord]:
    decoded = [records.decode(FlowRecord, m.value()) for m in reader.read_all()]
    return [r for r in decoded if r.src.addr in addrs and r.dst.addr in addrs]


def _netns_inode(name: str) -> int:
    return os.stat(f"/run/netns/{name}").st_ino


@pytest.mark.parametrize("version", [4, 6])
def test_tcp_connection_is_published_exactly_from_both_ends(
        version: int, pair: VethPair, flow_settings: Settings, topic_reader: Any,
        server_pod: dict[str, str]) -> None:
    client_addr, server_addr = (pair.ip_a, pair.ip_b) if version == 4 else (pair.ip6_a,
                                                                             pair.ip6_b)
    reader = topic_reader(FLOWS.name)
    collector = RunningCollector(flow_settings)
    try:
        client_port, client_pid, server_pid, port = _converse(pair, server_addr, 70_000, 1234)
    finally:
        summary = collector.stop()
    assert summary.undelivered == 0 and summary.lost == 0

    flows = sorted(_flows(reader, client_addr, server_addr), key=lambda r: r.observed_at or "")
    assert [r.observed_at for r in flows] == ["dst", "src"], flows
    server_side, client_side = flows
    for record in flows:
        records.validate(FlowRecord, records.to_dict(record))
        assert (record.protocol, record.ip_version, record.state) == ("tcp", version, "closed")
        assert (record.src.addr, record.src.port) == (client_addr, client_port)
        assert (record.dst.addr, record.dst.port) == (server_addr, port)
        assert (record.bytes_sent, record.bytes_received) == (70_000, 1234)
        assert record.packets_sent > 0 and record.packets_received > 0
        assert record.end_us is not None and record.end_us >= record.start_us
        # Attributed through the API server: the server's address is its pod's; the client's
        # is no pod's, and stays unknown.
        assert (record.dst.namespace, record.dst.service, record.dst.pod,
                record.dst.revision) == tuple(server_pod.values())
        assert record.src.service is None and record.src.namespace is None
        assert record.key() == f"{server_pod['namespace']}/{server_pod['service']}".encode()
    assert (client_side.pid, client_side.netns_ino) == (client_pid, _netns_inode(pair.ns_a))
    assert (server_side.pid, server_side.netns_ino) == (server_pid, _netns_inode(pair.ns_b))
    assert client_side.comm and client_side.comm.startswith("python")


def test_reset_connection_is_reported_as_reset(pair: VethPair, flow_settings: Settings,
                                               topic_reader: Any) -> None:
    reader = topic_reader(FLOWS.name)
    collector = RunningCollector(flow_settings)
    try:
        _converse(pair, pair.ip_b, 10, 0, mode="reset")
    finally:
        collector.stop()
    flows = _flows(reader, pair.ip_a, pair.ip_b)
    assert sorted(r.observed_at or "" for r in flows) == ["dst", "src"]
    assert {r.state for r in flows} == {"reset"}


def test_long_lived_connection_gets_periodic_updates(pair: VethPair, flow_settings: Settings,
                                                     topic_reader: Any) -> None:
    reader = topic_reader(FLOWS.name)
    collector = RunningCollector(flow_settings)
    try:
        # The client pauses 3.5 s halfway through its request; updates are due every second.
        client_port, client_pid, _, _ = _converse(pair, pair.ip_b, 4000, 100, pause=3.5)
    finally:
        collector.stop()
    flows = _flows(reader, pair.ip_a, pair.ip_b)
    updates = [r for r in flows if r.state == "open"]
    final = [r for r in flows if r.state == "closed"]
    assert sorted(r.observed_at or "" for r in final) == ["dst", "src"]
    assert updates, "no periodic update of a connection that lived 3.5 s"
    for update in updates:
        assert update.end_us is None
        assert update.src.port == client_port
        assert 0 < update.bytes_sent <= 4000
        assert update.duration_us >= 1_000_000
    # Counters are read from the socket when the update is due: during the pause each end has
    # seen exactly the first half. An end's counters stay put through the pause, so it is
    # reported once then, not every second.
    paused = [r for r in updates if (r.bytes_sent, r.bytes_received) == (2000, 0)]
    assert sorted(r.observed_at or "" for r in paused) == ["dst", "src"]
    # The connecting end's process is known from connect(); the accepting end learns its
    # process only when its owner closes it.
    assert [r.pid for r in paused if r.observed_at == "src"] == [client_pid]
    assert [r.pid for r in paused if r.observed_at == "dst"] == [None]
    assert all((r.bytes_sent, r.bytes_received) == (4000, 100) for r in final)


def test_udp_counters_on_an_interface_are_published(pair: VethPair, flow_settings: Settings,
                                                    topic_reader: Any) -> None:
    sizes = [10, 100, 1000]
    reader = topic_reader(FLOWS.name)
    collector = RunningCollector(flow_settings, interfaces=[pair.veth_a], netns=pair.ns_a)
    try:
        send = ("import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                "s.bind((sys.argv[1], 40001))\n"
                f"for n in {sizes}: s.sendto(b'u'*n, (sys.argv[2], 40002))\n")
        pair.run(pair.ns_a, [sys.executable, "-c", send, pair.ip_a, pair.ip_b], check=True)
    finally:
        summary = collector.stop()
    assert summary.undelivered == 0
    udp = [r for r in _flows(reader, pair.ip_a, pair.ip_b) if r.protocol == "udp"]
    assert len(udp) == 1, udp
    [record] = udp
    assert (record.observer, record.state, record.interface) == ("tc_counter", "counter",
                                                                 pair.veth_a)
    assert (record.src.addr, record.src.port, record.dst.addr, record.dst.port) == (
        pair.ip_a, 40001, pair.ip_b, 40002)
    assert record.packets_sent == len(sizes)
    # L2 frame bytes: payload + UDP 8 + IPv4 20 + Ethernet 14.
    assert record.bytes_sent == sum(n + 8 + 20 + 14 for n in sizes)
    assert record.packets_received == 0 and record.bytes_received == 0


# An HTTP/1.1 server that takes DELAY seconds over each answer: /fail answers 503, anything
# else 200; it serves until killed.
HTTP_SERVER = """
import http.server, socketserver, sys, time
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def answer(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(float(sys.argv[3]))
        self.send_response(503 if self.path.startswith("/fail") else 200)
        self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok")
    do_GET = do_POST = answer
    def log_message(self, *args): pass
class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    address_family = __import__("socket").AF_INET
srv = Server((sys.argv[1], int(sys.argv[2])), Handler)
print("listening", flush=True)
srv.serve_forever()
"""
# Three requests on one kept-alive connection; prints the client's port and each request's
# time as the client saw it, in microseconds.
HTTP_CLIENT = """
import http.client, sys, time
conn = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=30)
conn.connect()
print(conn.sock.getsockname()[1])
for method, path in (("GET", "/ok?token=secret"), ("POST", "/fail/now"), ("GET", "/ok")):
    began = time.monotonic()
    conn.request(method, path, body=b"x" * 10 if method == "POST" else None)
    conn.getresponse().read()
    print(int((time.monotonic() - began) * 1e6))
"""


def test_http_exchanges_become_server_spans(pair: VethPair, flow_settings: Settings,
                                            topic_reader: Any,
                                            server_pod: dict[str, str]) -> None:
    reader = topic_reader(SPANS.name)
    port = 20000 + int(uuid.uuid4().int % 20000)
    server = pair.popen(pair.ns_b, [sys.executable, "-c", HTTP_SERVER, pair.ip_b, str(port),
                                    "0.05"])
    collector = None
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        collector = RunningCollector(flow_settings, interfaces=[pair.veth_a], netns=pair.ns_a,
                                     http=True)
        out = pair.run(pair.ns_a, [sys.executable, "-c", HTTP_CLIENT, pair.ip_b, str(port)])
    finally:
        server.kill()
        server.wait(10)
        summary = collector.stop() if collector is not None else None
    assert summary is not None and summary.undelivered == 0 and summary.http_spans == 3
    client_port, *seen_us = map(int, out.stdout.split())
    spans = [span for span in (records.decode(SpanRecord, m.value()) for m in reader.read_all())
             if span.service == server_pod["service"]]
    spans.sort(key=lambda span: span.start_us)
    # The query string is left out; the status decides the error flag.
    assert [(s.operation, s.status_code, s.error) for s in spans] == [
        ("GET /ok", 200, False), ("POST /fail/now", 503, True), ("GET /ok", 200, False)]
    for span, client_us in zip(spans, seen_us, strict=True):
        assert (span.kind, span.source) == ("server", "other")
        assert (span.namespace, span.pod, span.revision) == (
            server_pod["namespace"], server_pod["pod"], server_pod["revision"])
        assert span.peer_service is None  # the client is no pod
        # Request out to response back at the client's interface: at least the server's delay,
        # at most what the client measured around it.
        assert 50_000 <= span.duration_us <= client_us
    assert spans[0].start_us < spans[1].start_us < spans[2].start_us
    assert client_port > 0


def test_collector_serves_its_own_prometheus_metrics(pair: VethPair, flow_settings: Settings,
                                                     topic_reader: Any) -> None:
    import urllib.request

    from clover.ports import free_port

    # A port free a moment ago can be taken before the collector binds it (CI saw this once):
    # that is the collector's clear "in use" error, and the test tries another port.
    for attempt in range(5):
        port = free_port()
        settings = dataclasses.replace(flow_settings, collectors=dataclasses.replace(
            flow_settings.collectors, metrics_port=port))
        try:
            collector = RunningCollector(settings, interfaces=[pair.veth_a], netns=pair.ns_a)
            break
        except ConfigError:
            if attempt == 4:
                raise
    try:
        _converse(pair, pair.ip_b, 1000, 10)
        scrape = ""
        for _ in range(50):  # until the collector has drained and counted the connection
            scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
            # The connection's records are counted, and the periodic gauges are set.
            if ('clover_collector_map_entries{collector="tc"}' in scrape
                    and 'clover_collector_events_total{collector="tcp"} 0.0' not in scrape):
                break
            time.sleep(0.2)
    finally:
        summary = collector.stop()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in scrape.splitlines() if line and not line.startswith("#")}
    assert values['clover_collector_events_total{collector="tcp"}'] >= 2
    assert 'clover_collector_map_entries{collector="tcp"}' in values
    assert 'clover_collector_map_entries{collector="tc"}' in values
    assert values[f'clover_interface_packets_total{{direction="tx",interface="{pair.veth_a}",'
                  'protocol="tcp"}'] > 0
    published = 'clover_records_published_total{component="flow-collector",topic="clover.flows"}'
    assert 0 < values[published] <= summary.published
    assert not any(k.startswith("clover_delivery_errors_total") and v for k, v in values.items())
    assert not any(k.startswith("clover_collector_events_lost_total") and v
                   for k, v in values.items())


def test_unreachable_kafka_is_a_clear_error_before_anything_attaches() -> None:
    out = subprocess.run([sys.executable, "-m", "clover.cli", "collect", "flows",
                          "--duration", "1"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CLOVER_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
                              "CLOVER_COLLECTORS_METRICS_PORT": "0"})
    assert out.returncode == 1
    assert out.stderr.startswith("clover: Kafka at 127.0.0.1:1 is unreachable")
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--duration", "0"], "expected a number of seconds > 0, got '0'"),
    (["--iface", "nosuch0", "--duration", "1"], "interface 'nosuch0' does not exist"),
    (["--http", "--duration", "1"], "--http reads HTTP on the packet counter's interfaces"),
])
def test_bad_arguments_name_the_problem(args: list[str], message: str, live_stack: Stack,
                                        kafka_topics: Any) -> None:
    out = subprocess.run([sys.executable, "-m", "clover.cli", "collect", "flows", *args],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CLOVER_COLLECTORS_METRICS_PORT": "0"})
    assert out.returncode in (1, 2), out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
