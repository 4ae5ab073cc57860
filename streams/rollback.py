"""The rollback agent: anomalies in, rollback decisions out (`clover rollback agent`).

A Faust agent on clover.anomalies (the app of streams/app.py, under its own id and consumer
group, [rollback] group_id). For each verdict a :class:`RollbackController`

1. counts consecutive anomalous windows and screens the verdict (streams/rollback_policy.py);
2. reads the Deployment and its revisions through the actuator (k8s/rollback.py), judges;
3. patches the Deployment back to the previous revision, unless in dry-run mode;
4. records the decision: clover.rollbacks (Kafka), Cassandra (analytics/rollbacks.py) and an
   Event on the Deployment; and counts it in Prometheus.

Kubernetes calls block, so they run in one worker thread: decisions are made one at a time,
which is also what makes two simultaneous anomalies for one Deployment a single rollback (the
second finds the first in its cooldown). Decisions about namespaces outside [rollback]
allowed_namespaces are counted but not recorded: another agent may be responsible for them,
and this one has no rights there. Undecodable anomaly records go to clover.deadletter.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from prometheus_client import CollectorRegistry, Counter, Histogram

from analytics.rollbacks import RollbackTable
from clover import records
from clover.config import ConfigError, Settings
from clover.kafka import producer_config
from clover.metrics_endpoint import serve_metrics
from clover.records import Anomaly, RollbackDecision
from clover.topics import ANOMALIES, DEADLETTER, ROLLBACKS
from k8s.rollback import Actuator, ApiUnreachable, DeploymentChanged, DeploymentGone, Rollout
from streams.deadletter import letter_for
from streams.rollback_policy import Streaks, judge, screen

log = logging.getLogger(__name__)

COMPONENT = "rollback"
_EVENT_REASONS = {"rollback": "CloverRollback", "dry_run": "CloverRollbackDryRun",
                  "alert_only": "CloverAnomaly", "skip": "CloverRollbackSkipped",
                  "failed": "CloverRollbackFailed"}


def _now_us() -> int:
    return time.time_ns() // 1000


class RollbackMetrics:
    """The agent's Prometheus counters, in a registry of its own."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.decisions = Counter("clover_rollback_decisions", "Decisions, by action and reason",
                                 ["action", "reason"], registry=registry)
        self.rollbacks = Counter("clover_rollbacks", "Deployments rolled back (patched)",
                                 registry=registry)
        self.skips = Counter("clover_rollback_skips",
                             "Anomalies not acted on (skip and alert_only), by reason",
                             ["reason"], registry=registry)
        self.failures = Counter("clover_rollback_failures", "Rollbacks that failed, by reason",
                                ["reason"], registry=registry)
        self.record_errors = Counter("clover_rollback_record_errors",
                                     "Decisions that could not be recorded, by where",
                                     ["sink"], registry=registry)
        self.latency = Histogram("clover_rollback_patch_seconds",
                                 "From the anomaly record's Kafka timestamp to the completed "
                                 "rollback patch", registry=registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

    def count(self, decision: RollbackDecision) -> None:
        self.decisions.labels(decision.action, decision.reason).inc()
        if decision.action == "rollback":
            self.rollbacks.inc()
        elif decision.action in ("skip", "alert_only"):
            self.skips.labels(decision.reason).inc()
        elif decision.action == "failed":
            self.failures.labels(decision.reason).inc()


class RollbackController:
    """Policy + actuator + recording, for one anomaly at a time (see the module docstring)."""

    def __init__(self, settings: Settings, actuator: Actuator, producer: Producer,
                 table: RollbackTable | None, metrics: RollbackMetrics, *,
                 decisions_topic: str = ROLLBACKS.name) -> None:
        self.settings = settings
        self.config = settings.rollback
        self.allowed = settings.rollback_namespaces
        self.actuator = actuator
        self.producer = producer
        self.table = table
        self.metrics = metrics
        self.decisions_topic = decisions_topic
        self.streaks = Streaks()
        # When this agent last acted (rolled back, or would have in dry-run mode) per Deployment.
        self.last_action: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def handle(self, anomaly: Anomaly, arrived_us: int | None = None) -> RollbackDecision | None:
        """Decide about one verdict, act, record; None for a verdict that needs no decision."""
        with self._lock:
            streak = self.streaks.update(anomaly)
            decision, rollout = self.decide(anomaly, streak)
            if decision is None:
                return None
            final = self.execute(decision, rollout)
            if final.reason == "deployment_changed":
                # Someone else changed the Deployment between our read and our patch (another
                # agent's rollback, a new rollout): look again, once.
                decision, rollout = self.decide(anomaly, streak)
                if decision is None:
                    return None
                final = self.execute(decision, rollout)
            if final.patched_us is not None and arrived_us is not None:
                self.metrics.latency.observe(max(0, final.patched_us - arrived_us) / 1e6)
            self.record(final, rollout)
            return final

    def decide(self, anomaly: Anomaly,
               streak: int) -> tuple[RollbackDecision | None, Rollout | None]:
        """The decision (not yet acted on) and the Deployment it was made on."""
        now = _now_us()
        decision = screen(anomaly, streak, self.config, self.allowed, now)
        if decision is not None or anomaly.verdict == "normal":
            return decision, None
        try:
            rollout = self.actuator.find(anomaly.namespace, anomaly.service)
        except (ApiUnreachable, ApiException) as exc:
            reason, message = self._api_failure(exc)
            return self._failed(anomaly, streak, now, reason,
                                f"{anomaly.namespace}/{anomaly.service}: could not read the "
                                f"Deployment: {message}"), None
        key = (anomaly.namespace, anomaly.service)
        return judge(anomaly, streak, rollout, self.config, _now_us(),
                     self.last_action.get(key)), rollout

    def execute(self, decision: RollbackDecision, rollout: Rollout | None) -> RollbackDecision:
        """Patch the Deployment for a "rollback" decision; the decision as it turned out."""
        key = (decision.namespace, decision.service)
        if decision.action == "dry_run":
            self.last_action[key] = decision.decided_us
        if decision.action != "rollback" or rollout is None:
            return decision
        try:
            patched_us = self.actuator.roll_back(rollout)
        except DeploymentGone as exc:
            return self._turned_failed(decision, "deployment_deleted", str(exc))
        except DeploymentChanged as exc:
            return self._turned_failed(decision, "deployment_changed", str(exc))
        except (ApiUnreachable, ApiException) as exc:
            reason, message = self._api_failure(exc)
            return self._turned_failed(decision, reason, message)
        self.last_action[key] = patched_us
        return dataclasses.replace(decision, patched_us=patched_us)

    def record(self, decision: RollbackDecision, rollout: Rollout | None) -> None:
        """Count the decision; unless it is about a namespace not ours, send it to Kafka,
        Cassandra and an Event. A sink that fails is logged and counted, never raised."""
        self.metrics.count(decision)
        log.info("%s %s/%s: %s (%s)", decision.action, decision.namespace, decision.service,
                 decision.reason, decision.message)
        if decision.reason == "namespace_not_allowed":
            return
        try:
            self.producer.produce(self.decisions_topic, records.encode(decision),
                                  decision.key(), on_delivery=self._delivered)
            self.producer.poll(0)
        except Exception as exc:  # BufferError, KafkaException: keep deciding
            self._record_error("kafka", exc)
        if self.table is not None:
            try:
                self.table.write(decision)
            except Exception as exc:  # Cassandra unavailable or timing out
                self._record_error("cassandra", exc)
        kind = "Normal" if decision.action == "skip" else "Warning"
        try:
            self.actuator.post_event(
                decision.namespace, decision.deployment or decision.service,
                rollout.uid if rollout is not None else None, _EVENT_REASONS[decision.action],
                kind, f"{decision.reason}: {decision.message}")
        except Exception as exc:  # e.g. the API server went away meanwhile
            self._record_error("event", exc)

    def flush(self, timeout: float = 10.0) -> int:
        """Wait for Kafka deliveries; returns how many are still undelivered."""
        return int(self.producer.flush(timeout))

    # ---------------------------------------------------------------- helpers

    def _delivered(self, error: Any, message: Any) -> None:
        if error is not None:
            self._record_error("kafka", error)

    def _record_error(self, sink: str, exc: object) -> None:
        self.metrics.record_errors.labels(sink).inc()
        log.warning("could not record a rollback decision in %s: %s", sink, exc)

    @staticmethod
    def _api_failure(exc: Exception) -> tuple[str, str]:
        if isinstance(exc, ApiUnreachable):
            return "api_unreachable", str(exc)
        assert isinstance(exc, ApiException)
        if exc.status == 403:
            return "forbidden", (f"the agent's identity may not do this (HTTP 403: "
                                 f"{exc.reason}); apply k8s/manifests/rollback-rbac.yaml in "
                                 "this namespace")
        return "api_error", f"HTTP {exc.status} {exc.reason}"

    def _failed(self, anomaly: Anomaly, streak: int, now: int, reason: str,
                message: str) -> RollbackDecision:
        return RollbackDecision(
            namespace=anomaly.namespace, service=anomaly.service, decided_us=now,
            action="failed", reason=reason, message=message, consecutive_anomalous=streak,
            dry_run=self.config.dry_run, score=anomaly.score, threshold=anomaly.threshold,
            anomaly_window_start_us=anomaly.window_start_us)

    @staticmethod
    def _turned_failed(decision: RollbackDecision, reason: str,
                       message: str) -> RollbackDecision:
        return dataclasses.replace(decision, action="failed", reason=reason,
                                   message=f"{message}; was: {decision.message}"[:2048])


def api_client(settings: Settings) -> client.ApiClient:
    """The agent's Kubernetes identity: [rollback] kubeconfig, else [kubernetes] kubeconfig."""
    path = settings.rollback_kubeconfig
    if path == "in-cluster":
        config.load_incluster_config()
        return client.ApiClient()
    if not Path(path).is_file():
        raise ConfigError(
            f"rollback.kubeconfig: no kubeconfig at {path}; start the local stack with `clover "
            "stack up`, or set [rollback] kubeconfig (CLOVER_ROLLBACK_KUBECONFIG) to a kubeconfig "
            "for the clover-rollback ServiceAccount, or to in-cluster")
    return config.new_client_from_config(config_file=path)


def build_controller(settings: Settings, *, registry: CollectorRegistry | None = None,
                     decisions_topic: str = ROLLBACKS.name,
                     store: bool = True) -> RollbackController:
    """A controller wired to the configured Kafka, Cassandra (unless ``store`` is False) and
    API server."""
    from analytics.store import connect

    api = api_client(settings)  # first: a missing kubeconfig is a configuration error
    table = None
    if store:
        cassandra = connect(settings)
        cassandra.create_schema(settings.cassandra.replication_factor)
        table = RollbackTable(cassandra)
        table.create()
    return RollbackController(
        settings, Actuator(api, retry_for_s=settings.rollback.api_retry_s),
        Producer(producer_config(settings, **{"linger.ms": 0})), table,
        RollbackMetrics(registry or CollectorRegistry()), decisions_topic=decisions_topic)


def install(controller: RollbackController, *, anomalies_topic: str = ANOMALIES.name) -> Any:
    """Attach the rollback agent to the Faust app (streams/app.py)."""
    from streams.app import app

    # One thread: Kubernetes calls block, and decisions must not overlap.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollback")
    topic = app.topic(anomalies_topic)

    async def rollback_agent(stream: Any) -> None:
        loop = asyncio.get_running_loop()
        log.info("rollback agent ready: %s -> %s (dry run: %s, namespaces: %s)",
                 anomalies_topic, controller.decisions_topic, controller.config.dry_run,
                 ", ".join(controller.allowed))
        async for event in stream.events():
            message = event.message
            arrived_us = round(message.timestamp * 1e6) if message.timestamp else None
            try:
                anomaly = records.decode(Anomaly, event.value)
            except records.RecordError as exc:
                letter = letter_for(message, str(exc)[:2000], COMPONENT)
                controller.producer.produce(DEADLETTER.name, records.encode(letter),
                                            letter.key(), on_delivery=controller._delivered)
                controller.producer.poll(0)
                continue
            await loop.run_in_executor(executor, controller.handle, anomaly, arrived_us)

    return app.agent(topic, name="clover-rollback")(rollback_agent)


def run_agent(settings: Settings, *, dry_run: bool = False,
              anomalies_topic: str = ANOMALIES.name, decisions_topic: str = ROLLBACKS.name,
              loglevel: str = "info") -> int:
    """Run the rollback agent as a Faust worker in this process until SIGINT/SIGTERM."""
    import faust

    from streams.app import configure

    if dry_run and not settings.rollback.dry_run:
        settings = dataclasses.replace(
            settings, rollback=dataclasses.replace(settings.rollback, dry_run=True))
    registry = CollectorRegistry()
    controller = build_controller(settings, registry=registry, decisions_topic=decisions_topic)
    app = configure(settings, id=settings.rollback.group_id)
    install(controller, anomalies_topic=anomalies_topic)
    serve_metrics(settings.rollback.metrics_port, "rollback.metrics_port", registry=registry)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    try:
        worker.execute_from_commandline()
    finally:
        undelivered = controller.flush()
        if undelivered:
            log.error("%d rollback decisions were not delivered to Kafka", undelivered)
    return 0
