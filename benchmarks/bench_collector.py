"""The TCP flow collector: records/s into Kafka per core of its own process, and what it costs
the traffic it watches (loopback bulk throughput and connection rate, with and without it).

Needs root and eBPF; says why and measures nothing otherwise.
"""

from __future__ import annotations

import subprocess
import sys
import time
from statistics import median

from benchmarks.common import CliProcess, Result, publisher_rate_per_core
from clover.topics import FLOWS
from collectors.environment import CollectorError, bpf_environment
from tests import samples

ROUNDS = 6
SECONDS = 2.0
SETTLE_S = 1.0

# Load generators run in their own processes, so the collector's CPU is its own.
BULK = """
import socket, sys, threading, time
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
def sink():
    conn, _ = srv.accept()
    while conn.recv(1 << 20):
        pass
threading.Thread(target=sink, daemon=True).start()
c = socket.create_connection(srv.getsockname()); chunk = b"x" * (1 << 16); sent = 0
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    c.sendall(chunk); sent += len(chunk)
print(sent / float(sys.argv[1]))
"""
CHURN = """
import socket, sys, threading, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(1024)
def serve():
    while True:
        conn, _ = srv.accept(); conn.recv(100); conn.sendall(b"r" * 100); conn.close()
threading.Thread(target=serve, daemon=True).start()
n, end = 0, time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    c = socket.create_connection(srv.getsockname()); c.sendall(b"q" * 100)
    while c.recv(100):
        pass
    c.close(); n += 1
print(n / float(sys.argv[1]))
"""


def _load(script: str, seconds: float) -> float:
    out = subprocess.run([sys.executable, "-c", script, str(seconds)], capture_output=True,
                         text=True, check=True, timeout=seconds + 60)
    return float(out.stdout)


def run() -> list[Result]:
    try:
        bpf_environment()
    except CollectorError as exc:
        print(f"collector benchmarks skipped: {exc}", file=sys.stderr)
        return []
    # Rounds alternate the order (off then on, on then off, ...), so that drift of the machine
    # (other servers, the TIME_WAIT sockets a churn run leaves for the next one) does not land
    # on one side; each side reports its median.
    off: dict[str, list[float]] = {"bulk": [], "churn": []}
    on: dict[str, list[float]] = {"bulk": [], "churn": []}
    cpu = 0.0
    published = 0

    def measure(into: dict[str, list[float]]) -> None:
        into["bulk"].append(_load(BULK, SECONDS))
        into["churn"].append(_load(CHURN, SECONDS))

    for round_ in range(ROUNDS):
        if round_ % 2 == 0:
            measure(off)
        # The collector in its own process: its CPU time is measured while it runs.
        collector = CliProcess(["collect", "flows"], {"CLOVER_COLLECTORS_METRICS_PORT": "0"},
                               ready="collecting flows")
        try:
            # Steady state only: let its start-up work (the pod index's first list, Kafka
            # connections) finish rather than compete with the load it is measured against.
            time.sleep(SETTLE_S)
            cpu_before = collector.cpu_seconds()
            measure(on)
            time.sleep(1.0)  # let it publish what the load left in the ring buffer
            cpu += collector.cpu_seconds() - cpu_before
        finally:
            published += int(collector.stop().split()[1])  # "published N flow records; ..."
        if round_ % 2 == 1:
            measure(off)
    return [
        Result("collector: flow records into Kafka per core", published / cpu,
               publisher_rate_per_core(FLOWS, samples.sample_flow()),
               "the same publisher producing ready-made records"),
        Result("loopback TCP bulk throughput, collector on", median(on["bulk"]) / 1e6,
               median(off["bulk"]) / 1e6, "collector off, same run", unit="MB/s"),
        Result("loopback TCP connections/s, collector on", median(on["churn"]),
               median(off["churn"]), "collector off, same run"),
    ]
