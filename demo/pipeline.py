"""Clover's own components for the demo, each as the subprocess an operator would run: the
span receivers, the eBPF flow collector (root only), the aggregation worker, the scoring agent
and the rollback agent.

Settings reach them as ``CLOVER_<SECTION>_<KEY>`` environment variables (clover/config.py), so
each runs exactly as ``clover ...`` does. :data:`DEMO_TUNING` is every setting the demo changes
from the defaults, and why; the README's "The demo" section repeats it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from clover.config import Settings
from clover.ports import free_port, port_is_free

# Every setting the demo changes, and why (the README lists them too). Windows stay 10 s.
DEMO_TUNING: dict[str, tuple[str, str]] = {
    "CLOVER_STREAMS_ALLOWED_LATENESS_SECONDS": (
        "2", "default 5: the demo's sidecars export every 0.5 s and the collector drains every "
             "0.1 s on one machine, so nothing arrives 2 s late; each second here is a second "
             "of detection delay"),
    "CLOVER_STREAMS_IDLE_CLOSE_SECONDS": (
        "2", "default 5: a partition that holds no demo service closes its windows sooner"),
    "CLOVER_STREAMS_NEW_GROUP_STARTS_AT": (
        "latest", "default earliest: the demo's consumer groups are new, and the topics' "
                  "history is not the demo's traffic"),
    "CLOVER_MODELS_MIN_WINDOWS": (
        "5", "default 6: one window less of learning before the scorer judges (50 s)"),
    "CLOVER_ROLLBACK_CONSECUTIVE_WINDOWS": (
        "2", "default 3: two anomalous 10 s windows of the new revision in a row are enough "
             "evidence for a rollout that happened seconds ago"),
}


@dataclass(frozen=True)
class Ports:
    """The ports the demo's components listen on (configured ones, or free ones if taken)."""

    mixer: int
    otlp: int
    zipkin: int
    receivers_metrics: int
    collector_metrics: int
    worker_metrics: int
    scorer_metrics: int
    rollback_metrics: int


def choose_ports(settings: Settings) -> tuple[Ports, list[str]]:
    """The configured ports where they are free, else free ones; and notes on each change."""
    notes: list[str] = []
    taken: set[int] = set()

    def pick(setting: str, configured: int) -> int:
        if configured and configured not in taken and port_is_free(configured):
            taken.add(configured)
            return configured
        port = free_port(taken)
        taken.add(port)
        notes.append(f"{setting} {configured} is in use; the demo uses {port}")
        return port

    r = settings.receivers
    ports = Ports(
        mixer=pick("receivers.mixer_port", r.mixer_port),
        otlp=pick("receivers.otlp_port", r.otlp_port),
        zipkin=pick("receivers.zipkin_port", r.zipkin_port),
        receivers_metrics=pick("receivers.metrics_port", r.metrics_port),
        collector_metrics=pick("collectors.metrics_port", settings.collectors.metrics_port),
        worker_metrics=pick("streams.metrics_port", settings.streams.metrics_port),
        scorer_metrics=pick("models.metrics_port", settings.models.metrics_port),
        rollback_metrics=pick("rollback.metrics_port", settings.rollback.metrics_port))
    return ports, notes


@dataclass
class Component:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    ready_when: Callable[[str], bool]  # given the log so far
    proc: subprocess.Popen[bytes] | None = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class Pipeline:
    """Starts the components in order, waits for each to be ready, stops them in reverse."""

    settings: Settings
    run_dir: Path
    namespace: str
    ports: Ports
    pipeline_kubeconfig: Path
    rollback_kubeconfig: Path
    run_id: str
    with_flows: bool
    components: list[Component] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        s = self.settings
        return {
            **os.environ,
            # The settings this process was given, for processes that load their own.
            "CLOVER_KAFKA_BOOTSTRAP_SERVERS": s.kafka_bootstrap,
            "CLOVER_CASSANDRA_KEYSPACE": s.cassandra.keyspace,
            "CLOVER_STACK_HOME": str(s.stack.home),
            **{key: value for key, (value, _) in DEMO_TUNING.items()},
            **extra,
        }

    def plan(self) -> list[Component]:
        clover = [sys.executable, "-m", "clover.cli"]
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        p, run = self.ports, self.run_id
        planned = [Component(
            "receivers", [*clover, "receive", "spans"],
            self.env(CLOVER_RECEIVERS_MIXER_PORT=str(p.mixer),
                     CLOVER_RECEIVERS_OTLP_PORT=str(p.otlp),
                     CLOVER_RECEIVERS_ZIPKIN_PORT=str(p.zipkin),
                     CLOVER_RECEIVERS_METRICS_PORT=str(p.receivers_metrics)),
            logs / "receivers.log", lambda text: text.count("receiver listening on") >= 3)]
        if self.with_flows:
            planned.append(Component(
                "collector", [*clover, "collect", "flows"],
                self.env(CLOVER_KUBERNETES_KUBECONFIG=str(self.pipeline_kubeconfig),
                         CLOVER_KUBERNETES_NAMESPACE=self.namespace,
                         CLOVER_COLLECTORS_ATTRIBUTION_NAMESPACES=self.namespace,
                         CLOVER_COLLECTORS_METRICS_PORT=str(p.collector_metrics)),
                logs / "collector.log", lambda text: "collecting flows" in text))
        planned += [
            Component("worker", [*clover, "stream", "worker"],
                      self.env(CLOVER_STREAMS_APP_ID=f"clover-demo-{run}-aggregate",
                               CLOVER_STREAMS_METRICS_PORT=str(p.worker_metrics)),
                      logs / "worker.log", _worker_ready),
            Component("scorer", [*clover, "models", "agent"],
                      self.env(CLOVER_MODELS_GROUP_ID=f"clover-demo-{run}-score",
                               # No trained model: the scorer learns the demo's services online.
                               CLOVER_MODELS_MODEL_PATH=str(self.run_dir / "no-model.joblib"),
                               CLOVER_MODELS_METRICS_PORT=str(p.scorer_metrics)),
                      logs / "scorer.log", _faust_ready),
            Component("rollback", [*clover, "rollback", "agent"],
                      self.env(CLOVER_ROLLBACK_GROUP_ID=f"clover-demo-{run}-rollback",
                               CLOVER_ROLLBACK_KUBECONFIG=str(self.rollback_kubeconfig),
                               CLOVER_ROLLBACK_ALLOWED_NAMESPACES=self.namespace,
                               CLOVER_ROLLBACK_METRICS_PORT=str(p.rollback_metrics)),
                      logs / "rollback.log", _faust_ready),
        ]
        return planned

    def start(self, say: Callable[[str], None], timeout_s: float = 120.0) -> list[str]:
        """Start every component; returns the names of optional ones that could not start
        (the flow collector). A required one that fails raises RuntimeError with its log."""
        skipped: list[str] = []
        for component in self.plan():
            started = time.monotonic()
            log = open(component.log, "wb")  # noqa: SIM115 - closed by the child's exit
            component.proc = subprocess.Popen(component.argv, env=component.env,
                                              cwd=self.run_dir, stdout=log,
                                              stderr=subprocess.STDOUT)
            log.close()
            self.components.append(component)
            problem = self._wait_ready(component, timeout_s)
            if problem is None:
                say(f"  {component.name:<10} ready in {time.monotonic() - started:4.1f}s "
                    f"(pid {component.proc.pid}, log {component.log})")
                continue
            if component.name == "collector":
                say(f"  collector  eBPF flow collection is unavailable here ({problem}); the "
                    "demo continues with spans alone")
                skipped.append(component.name)
                self._stop(component)
                continue
            raise RuntimeError(f"{component.name} did not start: {problem}\n"
                               f"{component.log_tail()}")
        return skipped

    def running(self) -> list[str]:
        return [c.name for c in self.components if c.proc is not None and c.proc.poll() is None]

    def died(self) -> list[Component]:
        return [c for c in self.components if c.proc is not None and c.proc.poll() is not None
                and c.proc.returncode not in (0, -15)]

    def stop(self) -> None:
        for component in reversed(self.components):
            self._stop(component)

    @property
    def kafka_prefix(self) -> str:
        """The start of the name of every consumer group and topic this run's components
        made in Kafka."""
        return f"clover-demo-{self.run_id}-"

    def remove_from_kafka(self, timeout_s: float = 30.0) -> list[str]:
        """Delete this run's consumer groups and the topics Faust made for its agents (a
        leader topic per app), once the components have stopped: no later run uses them, and
        topics, unlike idle groups, never expire. Returns what could not be removed, and why."""
        from confluent_kafka import KafkaException

        from clover.kafka import admin_client

        try:
            admin = admin_client(self.settings, timeout_s)
            groups = [g.group_id for g in admin.list_consumer_groups(
                request_timeout=timeout_s).result().valid
                      if g.group_id.startswith(self.kafka_prefix)]
            topics = [t for t in admin.list_topics(timeout=timeout_s).topics
                      if t.startswith(self.kafka_prefix)]
        except (ConnectionError, KafkaException) as exc:
            return [f"Kafka could not be asked what this run left ({exc})"]
        futures = {**(admin.delete_consumer_groups(groups, request_timeout=timeout_s)
                      if groups else {}),
                   **(admin.delete_topics(topics, operation_timeout=timeout_s)
                      if topics else {})}
        problems = []
        for name, future in futures.items():
            try:
                future.result()
            except KafkaException as exc:
                problems.append(f"{name}: {exc.args[0] if exc.args else exc}")
        return problems

    def _wait_ready(self, component: Component, timeout_s: float) -> str | None:
        assert component.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = component.log.read_text(errors="replace") if component.log.exists() else ""
            if component.ready_when(text):
                return None
            if component.proc.poll() is not None:
                last = [line for line in text.splitlines() if line.strip()]
                return (f"exited with {component.proc.returncode}: "
                        f"{last[-1] if last else 'no output'}")
            time.sleep(0.2)
        return f"not ready within {timeout_s:.0f}s"

    @staticmethod
    def _stop(component: Component) -> None:
        proc = component.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            # A Faust worker waits for events it still holds; the demo's state is in Kafka and
            # Cassandra already, and its consumer groups are not reused.
            proc.kill()
            proc.wait(10)


def _faust_ready(text: str) -> bool:
    return "[^Worker]: Ready" in text


def _worker_ready(text: str) -> bool:
    """The aggregation worker has joined its group and holds partitions."""
    return "clover.streams.aggregate: assigned" in text
