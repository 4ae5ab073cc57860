"""The end-to-end demo against the real stack: a mesh of five service processes, Clover's
pipeline as subprocesses, a rollout in the real API server.

Each scenario runs in a namespace of its own, with consumer groups of its own (the demo makes
them per run) and a Cassandra keyspace of this module's; the assertions read the API server and
Cassandra directly, not the demo's report. The aggregation worker publishes to the shared
clover.service-metrics, so another test's worker running at the same time also publishes
windows of these namespaces (of its own length); the demo counts those verdicts
(``foreign_windows``) and the test prints the count.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client, config

from analytics.rollbacks import RollbackTable
from analytics.store import Store, connect
from clover.config import Settings
from clover.kafka import admin_client
from clover.stack import Stack
from demo.mesh import MESH, image
from demo.scenario import DemoOptions, DemoReport, revisions, run_demo
from k8s.rollback import ROLLED_BACK_AT_ANNOTATION
from tests import kube

DAY_US = 86_400_000_000


@pytest.fixture(scope="module")
def demo_settings(live_stack: Stack, settings: Settings) -> Iterator[Settings]:
    keyspace = f"clover_demo_test_{uuid.uuid4().hex[:8]}"
    yield dataclasses.replace(settings, cassandra=dataclasses.replace(settings.cassandra,
                                                                      keyspace=keyspace))
    with connect(settings) as store:
        store.session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=60)


@pytest.fixture(scope="module")
def apps(live_stack: Stack) -> Iterator[client.AppsV1Api]:
    api = config.new_client_from_config(
        config_file=str(live_stack.paths.kube / "admin.kubeconfig"))
    yield client.AppsV1Api(api)
    api.close()


@pytest.fixture
def namespace(live_stack: Stack) -> Iterator[str]:
    name = f"clover-demo-t-{uuid.uuid4().hex[:8]}"
    yield name
    api = config.new_client_from_config(
        config_file=str(live_stack.paths.kube / "admin.kubeconfig"))
    try:
        client.CoreV1Api(api).delete_namespace(name)
    finally:
        api.close()


def decisions(store: Store, namespace: str, since_us: int) -> list:
    table = RollbackTable(store)
    found = []
    for spec in MESH:
        found += table.read(namespace, spec.name, since_us, since_us + DAY_US)
    return found


def assert_flows_and_spans_reached_cassandra(store: Store, report: DemoReport) -> None:
    start = int(report.started_at * 1e6) - 60_000_000
    for spec in MESH:
        rows = [r for r in store.read_service_metrics(report.namespace, spec.name, start,
                                                      start + DAY_US)
                if r.peer_service is None]
        assert sum(r.requests for r in rows) > 0, f"no spans of {spec.name} in Cassandra"
        if report.flows:
            assert sum(r.flows for r in rows) > 0, f"no flows of {spec.name} in Cassandra"


def ebpf_expected() -> bool:
    return os.geteuid() == 0 and os.path.exists("/sys/kernel/btf/vmlinux")


def test_a_faulty_rollout_is_rolled_back_once_to_the_previous_revision(
        demo_settings: Settings, apps: client.AppsV1Api, namespace: str) -> None:
    started_us = time.time_ns() // 1000
    service = "checkout"
    report = run_demo(demo_settings, DemoOptions(service=service, fault="errors",
                                                 duration_s=90, namespace=namespace))
    print(f"fault onset to rollback patch: {report.fault_to_patch_s} s; verdicts on other "
          f"workers' windows: {report.foreign_windows}")

    # The API server: the Deployment is back on v1's template, as revision 3, and Clover's
    # annotation says it acted.
    deployment = apps.read_namespaced_deployment(service, namespace)
    assert kube.template_image(deployment) == image(service, "v1")
    assert deployment.metadata is not None  # the API server sets it on every object
    annotations = deployment.metadata.annotations or {}
    assert annotations.get("deployment.kubernetes.io/revision") == "3"
    assert ROLLED_BACK_AT_ANNOTATION in annotations
    sets = revisions(apps, namespace, service)
    assert sorted(sets) == [2, 3]  # revision 1's ReplicaSet became revision 3
    assert kube.template_image(sets[3]) == image(service, "v1")
    assert kube.template_hash(sets[3]) == report.revisions["v1"]
    assert kube.template_image(sets[2]) == image(service, "v2-errors")
    for other in MESH:  # nobody else was touched
        if other.name != service:
            assert sorted(revisions(apps, namespace, other.name)) == [1]

    # Cassandra: exactly one rollback, of the faulty service, from revision 2 to 1.
    with connect(demo_settings) as store:
        found = decisions(store, namespace, started_us)
        rollbacks = [d for d in found if d.action == "rollback"]
        assert len(rollbacks) == 1, rollbacks
        (decision,) = rollbacks
        assert (decision.service, decision.from_revision, decision.to_revision) == (
            service, 2, 1)
        assert decision.reason == "anomalous_after_rollout"
        assert decision.patched_us is not None
        assert not [d for d in found if d.action == "failed"], found
        if ebpf_expected():
            assert report.flows, "the eBPF collector did not run although this machine has it"
        assert_flows_and_spans_reached_cassandra(store, report)
    # Kafka (clover.rollbacks, read by the demo) says the same.
    assert [(d.service, d.from_revision, d.to_revision) for d in report.rollbacks()] == [
        (service, 2, 1)]
    assert_nothing_left_in_kafka(demo_settings, report)


def test_a_harmless_rollout_is_not_rolled_back(
        demo_settings: Settings, apps: client.AppsV1Api, namespace: str) -> None:
    started_us = time.time_ns() // 1000
    service = "checkout"
    report = run_demo(demo_settings, DemoOptions(service=service, healthy=True, duration_s=40,
                                                 namespace=namespace))
    # The scorer judged the new revision during those 40 s (so "no rollback" means something).
    new = report.revisions["v2"]
    judged = [v for v in report.verdicts if v.service == service and v.revision == new
              and v.verdict != "inconclusive"]
    assert len(judged) >= 2, judged

    deployment = apps.read_namespaced_deployment(service, namespace)
    assert kube.template_image(deployment) == image(service, "v2")
    assert deployment.metadata is not None  # the API server sets it on every object
    assert (deployment.metadata.annotations or {}).get(
        "deployment.kubernetes.io/revision") == "2"
    with connect(demo_settings) as store:
        found = decisions(store, namespace, started_us)
        assert not [d for d in found if d.action in ("rollback", "failed")], found
        assert_flows_and_spans_reached_cassandra(store, report)
    assert report.rollbacks() == []
    assert_nothing_left_in_kafka(demo_settings, report)


def assert_nothing_left_in_kafka(settings: Settings, report: DemoReport) -> None:
    """The run's consumer groups and Faust's topics for its agents are deleted at its end
    (the broker may take a moment to stop listing a deleted topic)."""
    prefix = f"clover-demo-{report.run_id}-"
    assert report.run_id
    admin = admin_client(settings)
    groups = [g.group_id for g in admin.list_consumer_groups().result().valid
              if g.group_id.startswith(prefix)]
    assert groups == []
    def topics_left() -> list[str]:
        return [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix)]

    assert kube.eventually(lambda: not topics_left(), timeout=30), topics_left()


def test_a_bad_option_is_refused_with_what_is_allowed(live_stack: Stack) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "clover.cli", "demo", "--service", "nosuch"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--service nosuch: no such service; the mesh has frontend, cart" in done.stderr
