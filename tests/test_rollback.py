"""The rollback agent against the real API server, Kafka and Cassandra.

Each test has its own namespace with the agent's ServiceAccount and Role
(k8s/manifests/rollback-rbac.yaml), and the agent runs under that ServiceAccount's token. The
agent tests run `clover rollback agent` as a process, on topics and a consumer group of their
own, and publish anomaly records to real Kafka.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from analytics.rollbacks import RollbackTable
from analytics.store import Store, connect
from clover import records
from clover.config import Settings
from clover.kafka import client_config, producer_config
from clover.ports import free_port
from clover.records import Anomaly, RollbackDecision, Verdict
from clover.stack import Stack
from k8s.rollback import ROLLED_BACK_AT_ANNOTATION, Actuator
from streams.rollback import build_controller
from tests import kube

NAME = "cart"
V1, V2 = "registry.local/cart:v1", "registry.local/cart:v2"


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def admin(live_stack: Stack) -> Iterator[client.ApiClient]:
    api = config.new_client_from_config(
        config_file=str(live_stack.paths.kube / "admin.kubeconfig"))
    yield api
    api.close()


@dataclasses.dataclass
class Namespace:
    name: str
    kubeconfig: Path
    api: client.ApiClient  # the rollback agent's identity

    @property
    def apps(self) -> client.AppsV1Api:
        return client.AppsV1Api(self.api)


@pytest.fixture
def namespace(live_stack: Stack, admin: client.ApiClient, tmp_path: Path) -> Iterator[Namespace]:
    """A fresh namespace with the rollback agent's identity in it."""
    name = f"clover-rb-{uuid.uuid4().hex[:8]}"
    kubeconfig = tmp_path / "rollback.kubeconfig"
    api = kube.rollback_identity(live_stack.paths.kube / "admin.kubeconfig",
                                 live_stack.paths.pki / "ca.crt", name, kubeconfig)
    yield Namespace(name, kubeconfig, api)
    api.close()
    client.CoreV1Api(admin).delete_namespace(name)


@pytest.fixture(scope="module")
def keyspace(live_stack: Stack, settings: Settings) -> Iterator[Store]:
    """A Cassandra keyspace of this module's own, with the decisions table."""
    cassandra = dataclasses.replace(settings.cassandra,
                                    keyspace=f"clover_rbtest_{uuid.uuid4().hex[:8]}")
    store = connect(dataclasses.replace(settings, cassandra=cassandra))
    store.create_schema(1)
    RollbackTable(store).create()
    yield store
    store.session.execute(f"DROP KEYSPACE {store.keyspace}", timeout=60)
    store.close()


@dataclasses.dataclass
class Topics:
    anomalies: str
    decisions: str


@pytest.fixture
def topics(live_stack: Stack, settings: Settings) -> Iterator[Topics]:
    suffix = uuid.uuid4().hex[:8]
    made = Topics(f"test-rb-anomalies-{suffix}", f"test-rb-decisions-{suffix}")
    admin = AdminClient(client_config(settings))
    for future in admin.create_topics([NewTopic(t, 1, 1) for t in (made.anomalies,
                                                                     made.decisions)]).values():
        future.result(30)
    yield made
    admin.delete_topics([made.anomalies, made.decisions])


def with_rollback(settings: Settings, store: Store, ns: Namespace, **rollback: Any) -> Settings:
    return dataclasses.replace(
        settings,
        cassandra=dataclasses.replace(settings.cassandra, keyspace=store.keyspace),
        rollback=dataclasses.replace(settings.rollback, kubeconfig=str(ns.kubeconfig),
                                     allowed_namespaces=(ns.name,), api_retry_s=3,
                                     **rollback))


class Agent:
    """`clover rollback agent` as a process; its log is kept for failure messages."""

    def __init__(self, settings: Settings, store: Store, ns: Namespace, topics: Topics,
                 *args: str, **rollback: Any) -> None:
        self.metrics_port = free_port()
        allowed = rollback.pop("allowed", ns.name)
        env = {
            **os.environ,
            "CLOVER_CASSANDRA_KEYSPACE": store.keyspace,
            "CLOVER_ROLLBACK_KUBECONFIG": str(ns.kubeconfig),
            "CLOVER_ROLLBACK_ALLOWED_NAMESPACES": allowed,
            "CLOVER_ROLLBACK_GROUP_ID": f"test-rollback-{uuid.uuid4().hex[:8]}",
            "CLOVER_ROLLBACK_METRICS_PORT": str(self.metrics_port),
            "CLOVER_ROLLBACK_API_RETRY_S": "3",
            **{f"CLOVER_ROLLBACK_{k.upper()}": str(v) for k, v in rollback.items()},
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "clover.cli", "rollback", "agent", "--anomalies-topic",
             topics.anomalies, "--decisions-topic", topics.decisions, *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.log: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.log.append(line)
                if "rollback agent ready" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(90):
            self.stop()
            raise AssertionError("the agent did not start:\n" + "".join(self.log[-40:]))

    def metric(self, text: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as r:
            body = r.read().decode()
        return next((line for line in body.splitlines() if line.startswith(text)), "")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def agents(settings: Settings, keyspace: Store, topics: Topics) -> Iterator[Callable[..., Agent]]:
    started: list[Agent] = []

    def start(ns: Namespace, *args: str, **rollback: Any) -> Agent:
        started.append(Agent(settings, keyspace, ns, topics, *args, **rollback))
        return started[-1]

    yield start
    for agent in started:
        agent.stop()
        print("".join(agent.log[-80:]))  # shown when the test failed


@pytest.fixture
def publish(settings: Settings, topics: Topics) -> Iterator[Callable[..., None]]:
    producer = Producer(producer_config(settings))

    def send(*anomalies: Anomaly) -> None:
        for a in anomalies:
            producer.produce(topics.anomalies, records.encode(a), a.key())
        assert producer.flush(10) == 0

    yield send


@pytest.fixture
def decisions(topic_reader: Callable[[str], Any], topics: Topics) -> Any:
    return topic_reader(topics.decisions)


def verdict(ns: str, revision: str, window: int, kind: Verdict = "anomalous") -> Anomaly:
    now = time.time_ns() // 1000
    return Anomaly(namespace=ns, service=NAME, revision=revision,
                   window_start_us=(now // 10_000_000 - 100 + window) * 10_000_000,
                   window_seconds=10, detector="test@1", threshold=0.8,
                   score=0.97 if kind == "anomalous" else 0.1, verdict=kind, emitted_us=now)


def read_decisions(reader: Any, count: int, timeout: float = 30.0) -> list[RollbackDecision]:
    messages = reader.read(count, timeout)
    found = [records.decode(RollbackDecision, m.value()) for m in messages]
    seen = [(d.action, d.reason) for d in found]
    assert len(found) == count, f"expected {count} decisions, got {seen}"
    return found


def no_more_than(reader: Any, count: int) -> None:
    """Nothing after the first ``count`` decisions (a TopicReader reads from its start)."""
    assert len(reader.read(count + 1, timeout=3)) == count


def rolled_out(ns: Namespace, admin: client.ApiClient) -> dict[int, tuple[str, str]]:
    """Deployment NAME at V1, then rolled out to V2: revisions 1 and 2."""
    apps = client.AppsV1Api(admin)
    apps.create_namespaced_deployment(ns.name, kube.deployment(NAME, V1))
    kube.wait_revisions(apps, ns.name, NAME, 1)
    kube.set_image(apps, NAME, ns.name, V2)
    return kube.wait_revisions(apps, ns.name, NAME, 2)


def image_of(admin: client.ApiClient, ns: Namespace) -> str:
    deployment = client.AppsV1Api(admin).read_namespaced_deployment(NAME, ns.name)
    return kube.template_image(deployment)


def events_of(admin: client.ApiClient, ns: Namespace) -> list[client.CoreV1Event]:
    return [e for e in client.CoreV1Api(admin).list_namespaced_event(ns.name).items
            if e.source is not None and e.source.component == "clover-rollback"]


# ------------------------------------------------------------------------------- agent tests


def test_healthy_rollout_is_not_rolled_back(admin: client.ApiClient, namespace: Namespace,
                                            agents: Callable[..., Agent], publish: Any,
                                            decisions: Any, topics: Topics, settings: Settings,
                                            topic_reader: Callable[[str], Any]) -> None:
    revs = rolled_out(namespace, admin)
    new = revs[2][0]
    deadletters = topic_reader("clover.deadletter")
    agents(namespace, consecutive_windows=2)
    # A record that is not an anomaly is kept as a dead letter, and the agent goes on.
    producer = Producer(producer_config(settings))
    producer.produce(topics.anomalies, b"{not json", b"x/y")
    assert producer.flush(10) == 0
    # Healthy windows with the odd anomalous one: the streak never reaches two.
    kinds: list[Verdict] = ["normal", "anomalous", "normal", "normal", "anomalous", "normal"]
    publish(*(verdict(namespace.name, new, w, k) for w, k in enumerate(kinds)))
    found = read_decisions(decisions, 2)
    assert [(d.action, d.reason, d.consecutive_anomalous) for d in found] == [
        ("skip", "too_few_windows", 1)] * 2
    no_more_than(decisions, 2)  # normal windows need no decision
    letters = [records.decode(records.DeadLetter, m.value()) for m in deadletters.read(50, 5)]
    ours = [d for d in letters if d.source_topic == topics.anomalies]
    assert len(ours) == 1 and ours[0].component == "rollback" and "JSON" in ours[0].reason
    assert image_of(admin, namespace) == V2
    assert kube.revisions(client.AppsV1Api(admin), namespace.name, NAME) == revs


def test_bad_rollout_is_rolled_back_once_to_the_previous_template(
        admin: client.ApiClient, namespace: Namespace, agents: Callable[..., Agent],
        publish: Any, decisions: Any, keyspace: Store) -> None:
    revs = rolled_out(namespace, admin)
    old, new = revs[1][0], revs[2][0]
    agent = agents(namespace, consecutive_windows=2)
    # Window 1 arrives twice (two anomalies for one Deployment at once), window 2 after it.
    publish(verdict(namespace.name, new, 0), verdict(namespace.name, new, 1),
            verdict(namespace.name, new, 1), verdict(namespace.name, new, 2))
    found = read_decisions(decisions, 4)
    assert [(d.action, d.reason) for d in found] == [
        ("skip", "too_few_windows"), ("rollback", "anomalous_after_rollout"),
        ("skip", "cooldown"), ("skip", "cooldown")]
    rollback = found[1]
    assert (rollback.from_revision, rollback.to_revision, rollback.deployment) == (2, 1, NAME)
    assert rollback.consecutive_anomalous == 2 and rollback.score == 0.97
    assert rollback.patched_us is not None and rollback.patched_us >= rollback.decided_us

    # The Deployment runs the previous template again: as `kubectl rollout undo`, the old
    # ReplicaSet (same pod-template-hash) becomes revision 3; the bad one stays revision 2.
    apps = client.AppsV1Api(admin)
    after = kube.wait_revisions(apps, namespace.name, NAME, 2)
    assert after == {2: (new, V2), 3: (old, V1)}
    deployment = apps.read_namespaced_deployment(NAME, namespace.name)
    assert kube.template_image(deployment) == V1
    template_meta, meta = deployment.spec.template.metadata, deployment.metadata
    assert template_meta is not None and template_meta.labels is not None
    assert "pod-template-hash" not in template_meta.labels
    assert meta is not None and meta.annotations is not None
    marked = int(meta.annotations[ROLLED_BACK_AT_ANNOTATION])
    assert rollback.decided_us <= marked <= rollback.patched_us
    assert meta.annotations["deployment.kubernetes.io/revision"] == "3"

    # Recorded everywhere: Kafka (above), an Event per decision, Cassandra, Prometheus.
    events = kube.eventually(lambda: len(events_of(admin, namespace)) == 4 and events_of(
        admin, namespace))
    assert events, "expected 4 events"
    assert sorted(e.reason or "" for e in events) == ["CloverRollback", "CloverRollbackSkipped",
                                                 "CloverRollbackSkipped", "CloverRollbackSkipped"]
    assert all(e.involved_object.name == NAME and e.involved_object.kind == "Deployment"
               for e in events)
    stored = RollbackTable(keyspace).read(namespace.name, NAME, found[0].decided_us,
                                          found[-1].decided_us + 1)
    assert stored == list(reversed(found))
    assert agent.metric("clover_rollbacks_total") == "clover_rollbacks_total 1.0"
    assert agent.metric('clover_rollback_skips_total{reason="cooldown"}').endswith(" 2.0")


def test_anomaly_without_recent_rollout_is_alert_only(
        admin: client.ApiClient, namespace: Namespace, agents: Callable[..., Agent],
        publish: Any, decisions: Any) -> None:
    revs = rolled_out(namespace, admin)
    agents(namespace, consecutive_windows=1, watch_window_s=1, post_promotion_watch_s=0)
    time.sleep(2.5)  # the revision change falls out of the one-second watch window
    publish(verdict(namespace.name, revs[2][0], 0))
    (found,) = read_decisions(decisions, 1)
    assert (found.action, found.reason) == ("alert_only", "no_recent_rollout")
    assert "outside the 1s watch window" in found.message
    assert image_of(admin, namespace) == V2


def test_flapping_anomalies_inside_the_cooldown_give_one_action(
        admin: client.ApiClient, namespace: Namespace, agents: Callable[..., Agent],
        publish: Any, decisions: Any) -> None:
    revs = rolled_out(namespace, admin)
    old, new = revs[1][0], revs[2][0]
    agents(namespace, consecutive_windows=1, cooldown_s=600)
    publish(verdict(namespace.name, new, 0))
    (first,) = read_decisions(decisions, 1)
    assert first.action == "rollback"
    kube.wait_revisions(client.AppsV1Api(admin), namespace.name, NAME, 2)
    # The restored revision flaps, and late verdicts about the bad one keep coming.
    kinds: list[Verdict] = ["anomalous", "normal", "anomalous", "anomalous", "normal",
                            "anomalous"]
    publish(*(verdict(namespace.name, old, w, k) for w, k in enumerate(kinds, start=1)),
            verdict(namespace.name, new, 1))
    found = read_decisions(decisions, 6)[1:]  # the reader starts at the first decision again
    assert [d.action for d in found] == ["skip"] * 5
    assert {d.reason for d in found} == {"cooldown"}  # inside it, nothing else is looked at
    no_more_than(decisions, 6)  # the rollback, then these five
    assert image_of(admin, namespace) == V1
    assert max(kube.revisions(client.AppsV1Api(admin), namespace.name, NAME)) == 3


def test_dry_run_decides_and_records_without_patching(
        admin: client.ApiClient, namespace: Namespace, agents: Callable[..., Agent],
        publish: Any, decisions: Any) -> None:
    revs = rolled_out(namespace, admin)
    agents(namespace, "--dry-run", consecutive_windows=1)
    publish(verdict(namespace.name, revs[2][0], 0), verdict(namespace.name, revs[2][0], 1))
    found = read_decisions(decisions, 2)
    assert [(d.action, d.reason, d.dry_run) for d in found] == [
        ("dry_run", "anomalous_after_rollout", True), ("skip", "cooldown", True)]
    assert (found[0].from_revision, found[0].to_revision, found[0].patched_us) == (2, 1, None)
    assert image_of(admin, namespace) == V2
    assert kube.revisions(client.AppsV1Api(admin), namespace.name, NAME) == revs
    assert any(e.reason == "CloverRollbackDryRun" for e in kube.eventually(
        lambda: events_of(admin, namespace)))


def test_agent_records_a_403_in_a_namespace_its_token_does_not_cover(
        admin: client.ApiClient, namespace: Namespace, agents: Callable[..., Agent],
        publish: Any, decisions: Any) -> None:
    other = f"clover-rb-other-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(admin)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other)))
    try:
        client.AppsV1Api(admin).create_namespaced_deployment(other, kube.deployment(NAME, V1))
        kube.set_image(client.AppsV1Api(admin), NAME, other, V2)
        revs = kube.wait_revisions(client.AppsV1Api(admin), other, NAME, 2)
        # Misconfigured on purpose: allowed everywhere, but its token only covers its own.
        agents(namespace, consecutive_windows=1, allowed="*")
        publish(verdict(other, revs[2][0], 0))
        (found,) = read_decisions(decisions, 1)
        assert (found.action, found.reason) == ("failed", "forbidden")
        assert "rollback-rbac.yaml" in found.message
        assert image_of_in(admin, other) == V2
    finally:
        core.delete_namespace(other)


def image_of_in(admin: client.ApiClient, namespace: str) -> str:
    deployment = client.AppsV1Api(admin).read_namespaced_deployment(NAME, namespace)
    return kube.template_image(deployment)


# ------------------------------------------------------------------ identity and fault tests


def test_token_cannot_read_or_patch_deployments_in_another_namespace(
        admin: client.ApiClient, namespace: Namespace) -> None:
    other = f"clover-rb-other-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(admin)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=other)))
    try:
        client.AppsV1Api(admin).create_namespaced_deployment(other, kube.deployment(NAME))
        apps = namespace.apps
        for call in (lambda: apps.list_namespaced_deployment(other),
                     lambda: apps.read_namespaced_deployment(NAME, other),
                     lambda: apps.patch_namespaced_deployment(
                         NAME, other, {"metadata": {"labels": {"x": "y"}}}),
                     lambda: apps.list_namespaced_replica_set(other)):
            with pytest.raises(ApiException) as denied:
                call()
            assert denied.value.status == 403
        # In its own namespace it may read and patch, but not delete or read pods.
        client.AppsV1Api(admin).create_namespaced_deployment(namespace.name,
                                                             kube.deployment(NAME))
        assert kube.name_of(apps.read_namespaced_deployment(NAME, namespace.name)) == NAME
        with pytest.raises(ApiException) as denied:
            apps.delete_namespaced_deployment(NAME, namespace.name)
        assert denied.value.status == 403
        with pytest.raises(ApiException) as denied:
            client.CoreV1Api(namespace.api).list_namespaced_pod(namespace.name)
        assert denied.value.status == 403
    finally:
        core.delete_namespace(other)


def test_deployment_deleted_mid_decision_is_a_recorded_failure(
        admin: client.ApiClient, namespace: Namespace, settings: Settings, keyspace: Store,
        topics: Topics, decisions: Any) -> None:
    revs = rolled_out(namespace, admin)
    controller = build_controller(with_rollback(settings, keyspace, namespace,
                                                consecutive_windows=1),
                                  decisions_topic=topics.decisions)
    anomaly = verdict(namespace.name, revs[2][0], 0)
    decision, rollout = controller.decide(anomaly, controller.streaks.update(anomaly))
    assert decision is not None and decision.action == "rollback"
    # Deleted between reading it and patching it.
    client.AppsV1Api(admin).delete_namespaced_deployment(NAME, namespace.name)
    final = controller.execute(decision, rollout)
    controller.record(final, rollout)
    assert (final.action, final.reason) == ("failed", "deployment_deleted")
    assert controller.flush() == 0
    (sent,) = read_decisions(decisions, 1)
    assert sent == final
    # The next verdict finds no Deployment at all: a skip, still no crash.
    later = controller.handle(verdict(namespace.name, revs[2][0], 1))
    assert later is not None and (later.action, later.reason) == ("skip", "no_deployment")
    stored = RollbackTable(keyspace).read(namespace.name, NAME, final.decided_us,
                                          later.decided_us + 1)
    assert [(d.action, d.reason) for d in stored] == [("skip", "no_deployment"),
                                                      ("failed", "deployment_deleted")]
    controller.table.store.close()  # type: ignore[union-attr]


def test_unreachable_api_server_is_retried_then_recorded_as_failed(
        admin: client.ApiClient, namespace: Namespace, settings: Settings, keyspace: Store,
        topics: Topics, decisions: Any, caplog: pytest.LogCaptureFixture) -> None:
    revs = rolled_out(namespace, admin)
    controller = build_controller(with_rollback(settings, keyspace, namespace,
                                                consecutive_windows=1),
                                  decisions_topic=topics.decisions, store=False)
    # The same identity, pointed at a port where no API server listens: connections are
    # refused for real.
    dead = yaml.safe_load(namespace.kubeconfig.read_text())
    dead["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{free_port()}"
    dead_kubeconfig = namespace.kubeconfig.with_name("dead.kubeconfig")
    dead_kubeconfig.write_text(yaml.safe_dump(dead))
    api = config.new_client_from_config(config_file=str(dead_kubeconfig))
    controller.actuator = Actuator(api, retry_for_s=1.5)
    caplog.set_level("WARNING", logger="k8s.rollback")
    decision = controller.handle(verdict(namespace.name, revs[2][0], 0))
    assert decision is not None and (decision.action, decision.reason) == (
        "failed", "api_unreachable")
    assert "did not answer for 2s" in decision.message
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) >= 2, "expected retries with backoff before giving up"
    assert controller.flush() == 0
    (sent,) = read_decisions(decisions, 1)
    assert (sent.action, sent.reason) == ("failed", "api_unreachable")
    registry = controller.metrics.registry
    assert registry.get_sample_value("clover_rollback_failures_total",
                                     {"reason": "api_unreachable"}) == 1
    # The Event could not be posted either (same dead server): counted, not raised.
    assert registry.get_sample_value("clover_rollback_record_errors_total",
                                     {"sink": "event"}) == 1
    assert image_of(admin, namespace) == V2


def test_two_agents_deciding_at_once_roll_back_once(
        admin: client.ApiClient, namespace: Namespace, settings: Settings, keyspace: Store,
        topics: Topics) -> None:
    revs = rolled_out(namespace, admin)
    configured = with_rollback(settings, keyspace, namespace, consecutive_windows=1)
    first, second = (build_controller(configured, decisions_topic=topics.decisions, store=False)
                     for _ in range(2))
    anomaly = verdict(namespace.name, revs[2][0], 0)
    # Both read the Deployment before either patches it.
    plans = [c.decide(anomaly, c.streaks.update(anomaly)) for c in (first, second)]
    assert [p[0].action for p in plans if p[0] is not None] == ["rollback", "rollback"]
    (first_decision, first_rollout), (second_decision, second_rollout) = plans
    assert first_decision is not None and second_decision is not None  # both "rollback" above
    done = first.execute(first_decision, first_rollout)
    assert done.action == "rollback" and done.patched_us is not None
    # The second patch's generation test fails: it does not apply to the changed Deployment.
    late = second.execute(second_decision, second_rollout)
    assert (late.action, late.reason) == ("failed", "deployment_changed")
    # Looking again (as handle() does), the second agent sees the first one's rollback
    # annotation: cooldown, although it never acted itself.
    again = second.handle(verdict(namespace.name, revs[2][0], 1))
    assert again is not None and (again.action, again.reason) == ("skip", "cooldown")
    assert image_of(admin, namespace) == V1
    assert max(kube.wait_revisions(client.AppsV1Api(admin), namespace.name, NAME, 2)) == 3
    for c in (first, second):
        assert c.flush() == 0
