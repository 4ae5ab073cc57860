"""Every SRE notebook (notebooks/*.ipynb), executed against data the real pipeline produced.

The module runs the pipeline once on names of its own: a Kubernetes namespace with a
Deployment ``cart`` rolled out from revision 1 to 2 (and the rollback agent's identity in it),
a Cassandra keyspace, consumer groups, and private anomaly and decision topics. It publishes
spans and eBPF flow records of its namespace to clover.spans and clover.flows as live traffic
(times from the wall clock): ``frontend`` calls ``cart``; ``cart`` runs revision 1, then the
new revision 2 turns slow and failing, and after the rollback revision 1 again. The real
`clover stream worker`, `clover models agent` and `clover rollback agent` turn that into windows,
verdicts and decisions. Each notebook is then executed with nbclient, pointed at that data by
CLOVER_NOTEBOOK_* and CLOVER_CASSANDRA_KEYSPACE, and must run without an error, draw its
figures and show tables with rows.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from kubernetes import client, config
from nbclient import NotebookClient

from analytics.anomalies import AnomalyTable
from analytics.store import connect
from clover import records
from clover.config import Settings, load_settings
from clover.kafka import client_config, consumer_config, producer_config
from clover.records import Endpoint, FlowRecord, RollbackDecision, SpanRecord
from clover.stack import Stack
from clover.topics import FLOWS, SERVICE_METRICS, SPANS
from tests import kube

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
WINDOW_S = 2
NORMAL_S = 26  # seconds of healthy traffic before the bad rollout (13 windows of history)
BAD_MAX_S = 50  # the bad revision's traffic, until the rollback (or this long)
AFTER_S = 8  # healthy traffic again after the rollback


class Process:
    """A `clover` command as a process, its output kept; ``ready`` waits for a log line."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path,
                 ready: str | None = None) -> None:
        self.args = args
        self.proc = subprocess.Popen([sys.executable, "-m", "clover.cli", *args], env=env,
                                     cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.log: list[str] = []
        started = threading.Event()

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.log.append(line)
                if ready and ready in line:
                    started.set()

        threading.Thread(target=read, daemon=True).start()
        if ready and not started.wait(90):
            self.stop()
            raise AssertionError(f"clover {' '.join(args)} did not start:\n"
                                 + "".join(self.log[-40:]))

    def alive(self) -> None:
        assert self.proc.poll() is None, (f"clover {' '.join(self.args)} exited "
                                          f"{self.proc.returncode}:\n" + "".join(self.log[-40:]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _start_group_at_the_end(settings: Settings, group: str, topic_names: list[str]) -> None:
    """Commit the topics' current ends for a new group: it reads only what comes next (the
    topics are shared with other tests and their history is not this test's)."""
    consumer = Consumer(consumer_config(settings, group_id=group))
    try:
        ends = []
        for topic in topic_names:
            for partition in consumer.list_topics(topic, timeout=10).topics[topic].partitions:
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), 10)
                ends.append(TopicPartition(topic, partition, high))
        consumer.commit(offsets=ends, asynchronous=False)
    finally:
        consumer.close()


@dataclass
class Traffic:
    """Live spans and flows of one namespace: frontend -> cart at a steady rate."""

    namespace: str
    producer: Producer
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    sequence: int = 0
    spans: int = 0
    flows: int = 0

    def tick(self, cart_revision: str, bad: bool, seconds: float = 0.25) -> None:
        """``seconds`` of traffic ending now: 10 requests, each a client span at frontend, a
        server span at cart and frontend's own server span, and a TCP flow per request."""
        now = time.time_ns() // 1000
        for _ in range(10):
            self.sequence += 1
            trace = f"{self.sequence:032x}"
            latency = self.rng.uniform(2_000, 9_000) * (12 if bad else 1)
            error = self.rng.random() < (0.3 if bad else 0.01)
            end = now - self.rng.randint(0, int(seconds * 1e6))
            cart = SpanRecord(trace_id=trace, span_id=f"{self.sequence:015x}1", service="cart",
                              operation="POST /cart", kind="server",
                              start_us=end - int(latency), duration_us=int(latency),
                              error=error, source="otlp", namespace=self.namespace,
                              revision=cart_revision, bytes_received=400, bytes_sent=1200)
            call = SpanRecord(trace_id=trace, span_id=f"{self.sequence:015x}2",
                              service="frontend", operation="POST /cart", kind="client",
                              start_us=end - int(latency) - 300, duration_us=int(latency) + 300,
                              error=error, source="otlp", namespace=self.namespace,
                              revision="fe1", peer_namespace=self.namespace,
                              peer_service="cart", bytes_sent=400, bytes_received=1200)
            page = SpanRecord(trace_id=trace, span_id=f"{self.sequence:015x}3",
                              service="frontend", operation="GET /", kind="server",
                              start_us=end - int(latency) - 2_000,
                              duration_us=int(latency) + 2_500, error=error, source="otlp",
                              namespace=self.namespace, revision="fe1")
            for span in (cart, call, page):
                self.producer.produce(SPANS.name, records.encode(span), span.key())
            self.spans += 3
            flow = FlowRecord(
                observer="tcp_lifecycle", node="notebook-test", protocol="tcp", ip_version=4,
                src=Endpoint(addr="10.244.0.10", port=30000 + self.sequence % 30000,
                             namespace=self.namespace, service="frontend", pod="frontend-0",
                             revision="fe1"),
                dst=Endpoint(addr="10.244.0.20", port=8080, namespace=self.namespace,
                             service="cart", pod="cart-0", revision=cart_revision),
                bytes_sent=400, bytes_received=1200, packets_sent=3, packets_received=4,
                start_us=end - int(latency) - 500, duration_us=int(latency) + 500,
                end_us=end, state="reset" if error else "closed", observed_at="src",
                srtt_us=120)
            self.producer.produce(FLOWS.name, records.encode(flow), flow.key())
            self.flows += 1
        self.producer.poll(0)


@dataclass
class Run:
    """What the pipeline produced, and where the notebooks find it."""

    env: dict[str, str]
    namespace: str
    decisions: list[RollbackDecision]
    traffic: Traffic


@pytest.fixture(scope="module")
def run(live_stack: Stack, settings: Settings, kafka_topics: dict[str, str],
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    suffix = uuid.uuid4().hex[:8]
    work = tmp_path_factory.mktemp("notebooks")
    namespace = f"clover-nb-{suffix}"
    keyspace = f"clover_nbtest_{suffix}"
    anomalies, decisions_topic = f"test-nb-anomalies-{suffix}", f"test-nb-decisions-{suffix}"
    kubeconfig = work / "rollback.kubeconfig"
    admin = config.new_client_from_config(
        config_file=str(live_stack.paths.kube / "admin.kubeconfig"))
    kafka_admin = AdminClient(client_config(settings))
    for future in kafka_admin.create_topics(
            [NewTopic(t, 1, 1) for t in (anomalies, decisions_topic)]).values():
        future.result(30)
    processes: list[Process] = []
    identity = kube.rollback_identity(live_stack.paths.kube / "admin.kubeconfig",
                                      live_stack.paths.pki / "ca.crt", namespace, kubeconfig)
    try:
        apps = client.AppsV1Api(admin)
        apps.create_namespaced_deployment(namespace, kube.deployment("cart", "cart:v1"))
        kube.wait_revisions(apps, namespace, "cart", 1)
        kube.set_image(apps, "cart", namespace, "cart:v2")
        revisions = kube.wait_revisions(apps, namespace, "cart", 2)
        good, bad = revisions[1][0], revisions[2][0]

        base = {**os.environ, "CLOVER_CASSANDRA_KEYSPACE": keyspace}
        stream_group = f"test-nb-stream-{suffix}"
        score_group = f"test-nb-score-{suffix}"
        _start_group_at_the_end(settings, stream_group, [SPANS.name, FLOWS.name])
        _start_group_at_the_end(settings, score_group, [SERVICE_METRICS.name])
        processes.append(Process(["stream", "worker"], {
            **base, "CLOVER_STREAMS_APP_ID": stream_group,
            "CLOVER_STREAMS_WINDOW_SECONDS": str(WINDOW_S),
            "CLOVER_STREAMS_ALLOWED_LATENESS_SECONDS": "1",
            "CLOVER_STREAMS_IDLE_CLOSE_SECONDS": "2", "CLOVER_STREAMS_METRICS_PORT": "0"}, work))
        processes.append(Process(
            ["models", "agent", "--anomalies-topic", anomalies], {
                **base, "CLOVER_MODELS_GROUP_ID": score_group,
                "CLOVER_MODELS_MODEL_PATH": str(work / "no-model.joblib"),
                "CLOVER_MODELS_MIN_WINDOWS": "4",
                "CLOVER_MODELS_METRICS_PORT": "0"}, work,  # not scraped here
            ready="scoring agent ready"))
        processes.append(Process(
            ["rollback", "agent", "--anomalies-topic", anomalies, "--decisions-topic",
             decisions_topic], {
                **base, "CLOVER_ROLLBACK_KUBECONFIG": str(kubeconfig),
                "CLOVER_ROLLBACK_ALLOWED_NAMESPACES": namespace,
                "CLOVER_ROLLBACK_GROUP_ID": f"test-nb-rollback-{suffix}",
                "CLOVER_ROLLBACK_CONSECUTIVE_WINDOWS": "2",
                "CLOVER_ROLLBACK_METRICS_PORT": "0"}, work,
            ready="rollback agent ready"))

        decisions = _DecisionReader(settings, decisions_topic)
        traffic = Traffic(namespace, Producer(producer_config(settings)))
        started = time.time()
        found: list[RollbackDecision] = []
        phases = [(good, False, NORMAL_S, None), (bad, True, BAD_MAX_S, "rollback"),
                  (good, False, AFTER_S, None)]
        for revision, is_bad, seconds, until in phases:
            phase_end = time.monotonic() + seconds
            while time.monotonic() < phase_end:
                traffic.tick(revision, is_bad)
                time.sleep(0.25)
                found += decisions.poll()
                if until and any(d.action == until for d in found):
                    break
                for process in processes:
                    process.alive()
        assert traffic.producer.flush(30) == 0
        # The last windows close once the partitions have been idle; the scorer then judges
        # them. Wait until the verdicts of the last healthy windows are stored.
        with connect(load_settings(environ=base)) as store:
            table = AnomalyTable(store)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                stored = table.read(namespace, "cart", int(started * 1e6) - 60_000_000,
                                    time.time_ns() // 1000 + 60_000_000)
                if stored and stored[-1].window_start_us >= (time.time() - 2 * WINDOW_S - 3) * 1e6:
                    break
                time.sleep(1)
        found += decisions.poll()
        decisions.close()
        env = {**base, "CLOVER_NOTEBOOK_NAMESPACE": namespace,
               "CLOVER_NOTEBOOK_SERVICES": "frontend,cart",
               "CLOVER_NOTEBOOK_START": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                      time.gmtime(started - 30)),
               "CLOVER_NOTEBOOK_END": "+1min", "CLOVER_NOTEBOOK_RESOLUTION": "4s"}
        yield Run(env, namespace, found, traffic)
    finally:
        for process in processes:
            process.stop()
            print(f"--- clover {' '.join(process.args)}\n" + "".join(process.log[-30:]))
        identity.close()
        client.CoreV1Api(admin).delete_namespace(namespace)
        admin.close()
        kafka_admin.delete_topics([anomalies, decisions_topic])
        with connect(settings) as store:
            store.session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=60)


class _DecisionReader:
    def __init__(self, settings: Settings, topic: str) -> None:
        self.consumer = Consumer(consumer_config(settings, group_id=f"test-{uuid.uuid4()}"))
        self.consumer.assign([TopicPartition(topic, 0, 0)])

    def poll(self) -> list[RollbackDecision]:
        # A tombstone (no value) is undecodable, like any value that is not JSON.
        return [records.decode(RollbackDecision, m.value() or b"")
                for m in self.consumer.consume(100, timeout=0.01) if m.error() is None]

    def close(self) -> None:
        self.consumer.close()


def execute(name: str, env: dict[str, str], tmp_path: Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    # Stored without outputs, and each begins by saying what it answers.
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
    assert notebook.cells[0].cell_type == "markdown"
    assert "Question" in notebook.cells[0].source
    assert "parameters" in notebook.cells[1].metadata.get("tags", [])
    NotebookClient(notebook, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute(env=env)
    return notebook


def outputs(notebook: nbformat.NotebookNode) -> list[dict]:
    return [output for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.outputs]


def images(notebook: nbformat.NotebookNode) -> int:
    return sum(1 for o in outputs(notebook) if "image/png" in o.get("data", {}))


def text(notebook: nbformat.NotebookNode) -> str:
    parts = []
    for o in outputs(notebook):
        parts.append(o.get("text", ""))
        data = o.get("data", {})
        parts.append(data.get("text/plain", "") + data.get("text/markdown", "")
                     + data.get("text/html", ""))
    return "\n".join(parts)


def tables(notebook: nbformat.NotebookNode) -> list[str]:
    """The HTML tables the notebook displayed."""
    return [o["data"]["text/html"] for o in outputs(notebook)
            if "text/html" in o.get("data", {}) and "<table" in o["data"]["text/html"]]


def assert_drew_and_listed(notebook: nbformat.NotebookNode, figures: int) -> str:
    shown = text(notebook)
    assert "**No " not in shown, shown[:2000]  # the notebooks' "nothing found" message
    assert images(notebook) >= figures
    assert tables(notebook) and all("<tbody>\n    <tr>" in t for t in tables(notebook))
    return shown


def test_the_pipeline_made_a_rollback_to_audit(run: Run) -> None:
    actions = [(d.action, d.reason) for d in run.decisions]
    assert ("rollback", "anomalous_after_rollout") in actions, actions


def test_service_overview(run: Run, tmp_path: Path) -> None:
    shown = assert_drew_and_listed(execute("service_overview.ipynb", run.env, tmp_path), 1)
    assert "frontend" in shown and "cart" in shown


def test_latency_heatmap(run: Run, tmp_path: Path) -> None:
    assert_drew_and_listed(execute("latency_heatmap.ipynb", run.env, tmp_path), 1)


def test_anomaly_review(run: Run, tmp_path: Path) -> None:
    shown = assert_drew_and_listed(execute("anomaly_review.ipynb", run.env, tmp_path), 2)
    assert "anomalous" in shown and "latency" in shown


def test_rollback_audit(run: Run, tmp_path: Path) -> None:
    shown = assert_drew_and_listed(execute("rollback_audit.ipynb", run.env, tmp_path), 1)
    assert "anomalous_after_rollout" in shown


def test_flow_matrix(run: Run, tmp_path: Path) -> None:
    shown = assert_drew_and_listed(execute("flow_matrix.ipynb", run.env, tmp_path), 1)
    # Every flow the test published, once: frontend -> cart.
    assert f"{run.namespace}/frontend" in shown and f"{run.namespace}/cart" in shown
    assert f"{run.traffic.flows} flows of {run.namespace}" in shown
