"""Rollback latency: from producing an anomaly record to the completed rollback patch, through
`clover rollback agent` (a process of its own, under the rollback ServiceAccount's token),
against a bare patch of the same Deployment with the same identity. Goal: under 1 s.

Each round the agent rolls the Deployment back to its previous template (cooldown 0, one
anomalous window suffices), so the Deployment alternates between two templates; the round
starts once the Deployment controller has caught up, as it would have long before a real
anomaly. Latency = the decision's patched_us - the time just before the anomaly was produced.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from kubernetes import client, config

from analytics.store import connect
from benchmarks.common import CliProcess, Result
from clover import records
from clover.config import load_settings
from clover.kafka import client_config, consumer_config, producer_config
from clover.records import Anomaly, RollbackDecision
from tests import kube

ROUNDS = 15
NAME = "bench"


def _current_hash(apps: client.AppsV1Api, namespace: str) -> str:
    """The current revision's pod-template-hash, once the controller has caught up."""
    def settled() -> str:
        d = apps.read_namespaced_deployment(NAME, namespace)
        meta, status = d.metadata, d.status
        # The API server sets these on a Deployment it returns.
        assert meta is not None and meta.generation is not None and status is not None
        if (status.observed_generation or 0) < meta.generation:
            return ""
        assert meta.annotations is not None  # the controller has annotated the revision
        revision = int(meta.annotations["deployment.kubernetes.io/revision"])
        return kube.revisions(apps, namespace, NAME).get(revision, ("", ""))[0]

    found = kube.eventually(settled)
    assert found, "the Deployment controller did not catch up"
    return found


def _anomaly(namespace: str, revision: str, window: int) -> Anomaly:
    now = time.time_ns() // 1000
    return Anomaly(namespace=namespace, service=NAME, revision=revision,
                   window_start_us=(now // 10_000_000 + window) * 10_000_000, window_seconds=10,
                   detector="bench@1", threshold=0.8, score=0.99, verdict="anomalous",
                   emitted_us=now)


def run() -> list[Result]:
    settings = load_settings()
    home = settings.stack.home
    suffix = uuid.uuid4().hex[:8]
    namespace, keyspace = f"clover-bench-rb-{suffix}", f"clover_bench_rb_{suffix}"
    anomalies, decisions = f"bench-rb-anomalies-{suffix}", f"bench-rb-decisions-{suffix}"
    admin_api = config.new_client_from_config(config_file=str(home / "kube" / "admin.kubeconfig"))
    kafka = AdminClient(client_config(settings))
    for future in kafka.create_topics([NewTopic(t, 1, 1) for t in (anomalies,
                                                                     decisions)]).values():
        future.result(30)
    workdir = tempfile.TemporaryDirectory()
    kubeconfig = Path(workdir.name) / "rollback.kubeconfig"
    api = kube.rollback_identity(home / "kube" / "admin.kubeconfig", home / "pki" / "ca.crt",
                                 namespace, kubeconfig)
    admin_apps, apps = client.AppsV1Api(admin_api), client.AppsV1Api(api)
    agent = None
    try:
        admin_apps.create_namespaced_deployment(namespace, kube.deployment(NAME, "bench:v1"))
        kube.wait_revisions(admin_apps, namespace, NAME, 1)
        kube.set_image(admin_apps, NAME, namespace, "bench:v2")
        revisions = kube.wait_revisions(admin_apps, namespace, NAME, 2)
        templates: dict[str, Any] = {}
        for rs in admin_apps.list_namespaced_replica_set(namespace).items:
            assert rs.metadata is not None and rs.metadata.labels is not None
            template_hash = rs.metadata.labels["pod-template-hash"]
            templates[template_hash] = api.sanitize_for_serialization(rs.spec.template)
        for template in templates.values():
            template["metadata"]["labels"].pop("pod-template-hash")

        # Baseline: the same kind of patch (the pod template, back to the other one), bare.
        bare = []
        current = revisions[2][0]
        for _ in range(ROUNDS):
            other = next(h for h in templates if h != current)
            start = time.perf_counter()
            apps.patch_namespaced_deployment(NAME, namespace, [
                {"op": "replace", "path": "/spec/template", "value": templates[other]}])
            bare.append(time.perf_counter() - start)
            current = _current_hash(apps, namespace)

        env = {"CLOVER_ROLLBACK_KUBECONFIG": str(kubeconfig),
               "CLOVER_ROLLBACK_ALLOWED_NAMESPACES": namespace,
               "CLOVER_ROLLBACK_CONSECUTIVE_WINDOWS": "1", "CLOVER_ROLLBACK_COOLDOWN_S": "0",
               "CLOVER_ROLLBACK_METRICS_PORT": "0",
               "CLOVER_ROLLBACK_GROUP_ID": f"bench-rollback-{suffix}",
               "CLOVER_CASSANDRA_KEYSPACE": keyspace}
        agent = CliProcess(["rollback", "agent", "--anomalies-topic", anomalies,
                            "--decisions-topic", decisions], env, ready="rollback agent ready")
        producer = Producer(producer_config(settings, **{"linger.ms": 0}))
        consumer = Consumer(consumer_config(settings, f"bench-rb-reader-{suffix}"))
        consumer.assign([TopicPartition(decisions, 0, 0)])

        def one_round(window: int) -> float:
            revision = _current_hash(apps, namespace)
            anomaly = _anomaly(namespace, revision, window)
            start = time.time()
            producer.produce(anomalies, records.encode(anomaly), anomaly.key())
            producer.flush(10)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                message = consumer.poll(0.5)
                if message is None or message.error():
                    continue
                decision = records.decode(RollbackDecision, message.value() or b"")
                if decision.action != "rollback" or decision.patched_us is None:
                    raise RuntimeError(f"expected a rollback, got {decision}")
                return decision.patched_us / 1e6 - start
            raise RuntimeError("no decision from the agent within 60 s")

        one_round(0)  # warm-up: first fetch, first API connection, Cassandra statements
        latencies = [one_round(i) for i in range(1, ROUNDS + 1)]
        consumer.close()
    finally:
        if agent is not None:
            agent.stop()
        client.CoreV1Api(admin_api).delete_namespace(namespace)
        kafka.delete_topics([anomalies, decisions, f"bench-rollback-{suffix}-__assignor-__leader"])
        with connect(settings) as store:
            store.session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=60)
        api.close()
        admin_api.close()
        workdir.cleanup()

    median, bare_median = statistics.median(latencies), statistics.median(bare)
    print(f"rollback: anomaly produced -> Deployment patched: median {median * 1e3:.0f} ms, "
          f"max {max(latencies) * 1e3:.0f} ms over {ROUNDS} rollbacks (goal < 1000 ms); "
          f"bare patch median {bare_median * 1e3:.0f} ms")
    return [Result("rollback latency (rollbacks/s = 1/median)", 1 / median, 1 / bare_median,
                   "a bare patch of the same Deployment, same identity")]
