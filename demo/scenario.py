"""The demo from start to end: a mesh on the local stack, steady traffic, a rollout, and what
the pipeline did about it, as a timeline.

:func:`run_demo` does it all and returns a :class:`DemoReport`; ``clover demo`` prints it as it
goes. Steps:

1. the demo namespace (deleted first if a previous run left it) with the pipeline's and the
   rollback agent's least-privilege identities (k8s/manifests/*-rbac.yaml), and one Deployment
   per service at ``v1``;
2. Clover's components as subprocesses (demo/pipeline.py), the runner that plays the kubelet
   (demo/runner.py) and the load generator (demo/loadgen.py);
3. warm-up: until the scoring agent judges every service (it learns them online first);
4. the rollout of ``v2-latency``, ``v2-errors`` or (``healthy``) the harmless ``v2`` of one
   service, as ``kubectl set image`` would do it;
5. watch until the rollback has been applied and the restored revision is judged normal again,
   or until ``duration_s`` has passed since the rollout; then the timeline.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from clover.config import Settings
from clover.records import Anomaly, RollbackDecision
from demo.loadgen import LoadGenerator, TrafficStats
from demo.mesh import MESH, SERVICES, VERSIONS, image, rollout_tag
from demo.pipeline import DEMO_TUNING, Pipeline, Ports, choose_ports
from demo.runner import MeshRunner, ReceiverPorts
from demo.service import Routes
from demo.timeline import VerdictWatcher

Say = Callable[[str], None]
REVISION_ANNOTATION = "deployment.kubernetes.io/revision"


class DemoError(RuntimeError):
    """The demo cannot run or did not get through a step; the message says what to do."""


@dataclass(frozen=True)
class DemoOptions:
    service: str = "payment"
    fault: str = "latency"  # "latency" or "errors"
    healthy: bool = False  # roll out the harmless v2 instead of a faulty build
    duration_s: float = 90.0  # the longest the demo watches after the rollout
    keep_running: bool = False
    namespace: str = "clover-demo"
    rate: float = 20.0  # requests per second into the frontend
    warmup_timeout_s: float = 300.0

    def check(self) -> None:
        if self.service not in SERVICES:
            raise DemoError(f"--service {self.service}: no such service; the mesh has "
                            f"{', '.join(SERVICES)}")
        if self.fault not in ("latency", "errors"):
            raise DemoError(f"--fault {self.fault}: expected latency or errors")
        if self.duration_s < 30:
            raise DemoError(f"--duration {self.duration_s:g}: give the pipeline at least 30 s "
                            "after the rollout (three 10 s windows)")

    @property
    def tag(self) -> str:
        return rollout_tag(None if self.healthy else self.fault)


@dataclass(frozen=True)
class Moment:
    name: str
    at: float  # time.time()
    detail: str


@dataclass
class DemoReport:
    namespace: str
    service: str
    rollout_tag: str
    run_dir: Path
    keyspace: str
    flows: bool  # the eBPF collector ran
    ports: Ports
    timeline: list[Moment] = field(default_factory=list)
    decisions: list[RollbackDecision] = field(default_factory=list)
    verdicts: list[Anomaly] = field(default_factory=list)
    traffic: dict[str, TrafficStats] = field(default_factory=dict)
    revisions: dict[str, str] = field(default_factory=dict)  # tag -> pod-template-hash
    started_at: float = 0.0
    ended_at: float = 0.0
    window_seconds: int = 10  # [streams] window_seconds (the demo keeps what is configured)
    # Verdicts on windows of another length: another aggregation worker on the shared topics.
    foreign_windows: int = 0
    run_id: str = ""  # in the names of the run's directory, consumer groups and Faust topics

    def rollbacks(self) -> list[RollbackDecision]:
        return [d for d in self.decisions if d.action == "rollback"]

    def moment(self, name: str) -> Moment | None:
        return next((m for m in self.timeline if m.name == name), None)

    @property
    def fault_to_patch_s(self) -> float | None:
        onset, patch = self.moment("fault onset"), self.moment("rollback patch")
        return patch.at - onset.at if onset and patch else None


def run_demo(settings: Settings, options: DemoOptions, say: Say = print) -> DemoReport:
    """Run the whole demo (see the module docstring); raises DemoError when it cannot."""
    from clover.kafka import admin_client
    from clover.stack import Stack
    from clover.topics import create_topics

    options.check()
    stack = Stack(settings)
    down = [f"{row.name} ({row.health})" for row in stack.status()
            if not row.healthy and row.name != "bcc"]
    if down:
        raise DemoError(f"the local stack is not up: {'; '.join(down)}. Run `clover stack up` "
                        "(or `make demo`, which does) and try again")
    create_topics(admin_client(settings), replication_factor=settings.kafka.replication_factor)
    run_id = uuid.uuid4().hex[:8]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    run_dir = settings.stack.home / "demo" / f"{options.namespace}-{stamp}-{run_id}"
    run_dir.mkdir(parents=True)
    admin = config.new_client_from_config(
        config_file=str(stack.paths.kube / "admin.kubeconfig"))
    core, apps = client.CoreV1Api(admin), client.AppsV1Api(admin)
    ports, port_notes = choose_ports(settings)
    with_flows, why_not = _ebpf_available(settings)
    report = DemoReport(options.namespace, options.service, options.tag, run_dir,
                        settings.cassandra.keyspace, with_flows, ports, started_at=time.time(),
                        window_seconds=settings.streams.window_seconds, run_id=run_id)

    say(f"Clover demo: {len(MESH)} services in namespace {options.namespace}; rolling out "
        f"{options.service}:{options.tag} ({VERSIONS[options.tag].description}). "
        f"Files: {run_dir}")
    for note in port_notes:
        say(f"  note: {note}")
    say("Kubernetes: namespace, identities and Deployments")
    _fresh_namespace(core, options.namespace, say)
    pipeline_kubeconfig, rollback_kubeconfig = _identities(stack, options.namespace, run_dir)
    for spec in MESH:
        apps.create_namespaced_deployment(options.namespace, _deployment(spec.name, "v1"))

    pipeline = Pipeline(settings, run_dir, options.namespace, ports, pipeline_kubeconfig,
                        rollback_kubeconfig, run_id, with_flows)
    watcher = VerdictWatcher(settings, options.namespace)
    octet = 100 + int(run_id[:4], 16) % 150
    runner = MeshRunner(core, options.namespace, run_dir,
                        ReceiverPorts(ports.otlp, ports.zipkin, ports.mixer), f"127.{octet}.0")
    load = LoadGenerator(Routes(runner.routes_file), options.rate)
    try:
        say("Clover's pipeline (each one a `clover` command, as an operator would run it):")
        if not with_flows:
            say(f"  collector  eBPF flow collection is unavailable here ({why_not}); the demo "
                "continues with spans alone")
        skipped = pipeline.start(say)
        report.flows = with_flows and "collector" not in skipped
        watcher.start()
        say(f"The mesh: the runner starts each pod's process (pod addresses 127.{octet}.0.x)")
        runner.start()
        _wait_pods_ready(runner, say)
        load.start()
        say(f"Steady traffic: {options.rate:g} requests/s into frontend. Warm-up: the scorer "
            "learns each service online before it judges it")
        _warm_up(watcher, pipeline, runner, options, say)

        rollout_at = time.time()
        _set_image(apps, options.namespace, options.service, options.tag)
        report.timeline.append(Moment("rollout", rollout_at,
                                      f"{options.service} v1 -> {options.tag}"))
        say(f"Rollout: {options.service} v1 -> {options.tag} at {_clock(rollout_at)}")
        _watch(report, watcher, runner, pipeline, apps, options, rollout_at, say)
        report.ended_at = time.time()
        _summarise(report, watcher, runner, load, apps, options, rollout_at)
        _print_report(report, settings, say)
        if options.keep_running:
            say("Everything keeps running (--keep-running): Ctrl-C stops the mesh and the "
                "pipeline")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                say("stopping")
        return report
    finally:
        load.stop()
        _scale_to_zero(apps, options.namespace)
        runner.stop()
        pipeline.stop()
        watcher.stop()
        admin.close()
        for problem in pipeline.remove_from_kafka():
            say(f"  note: this run's Kafka groups and topics (named {pipeline.kafka_prefix}*) "
                f"are not all removed: {problem}")


# ----------------------------------------------------------------------------- Kubernetes


def _deployment(service: str, tag: str) -> client.V1Deployment:
    labels = {"app": service}
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=service, labels={**labels, "clover.dev/demo": "mesh"}),
        spec=client.V1DeploymentSpec(
            replicas=1, selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(containers=[client.V1Container(
                    name="app", image=image(service, tag))]))))


def _set_image(apps: client.AppsV1Api, namespace: str, service: str, tag: str) -> None:
    """What `kubectl set image deployment/<service> app=<image>` does: a new pod template."""
    apps.patch_namespaced_deployment(service, namespace, {"spec": {"template": {"spec": {
        "containers": [{"name": "app", "image": image(service, tag)}]}}}})


def _fresh_namespace(core: client.CoreV1Api, namespace: str, say: Say) -> None:
    try:
        core.delete_namespace(namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise
        return
    say(f"  namespace {namespace} exists from an earlier run: deleting it first")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            core.read_namespace(namespace)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        time.sleep(0.5)
    raise DemoError(f"namespace {namespace} was not deleted within 120 s; pass --namespace "
                    "with another name")


def _identities(stack: object, namespace: str, run_dir: Path) -> tuple[Path, Path]:
    """The pipeline's and the rollback agent's ServiceAccounts and Roles in the namespace (it
    is created by the first), and a kubeconfig with a fresh token for each."""
    from clover.stack.kube import bootstrap_pipeline_identity

    paths = stack.paths  # type: ignore[attr-defined]
    admin, ca = paths.kube / "admin.kubeconfig", paths.pki / "ca.crt"
    pipeline, rollback = run_dir / "pipeline.kubeconfig", run_dir / "rollback.kubeconfig"
    bootstrap_pipeline_identity(admin, pipeline, ca, namespace, "clover-pipeline")
    bootstrap_pipeline_identity(admin, rollback, ca, namespace, "clover-rollback",
                                manifest="rollback-rbac.yaml")
    return pipeline, rollback


def _scale_to_zero(apps: client.AppsV1Api, namespace: str) -> None:
    """Stop the mesh the Kubernetes way; the Deployments and their revisions stay to inspect."""
    for spec in MESH:
        try:
            apps.patch_namespaced_deployment_scale(spec.name, namespace,
                                                   {"spec": {"replicas": 0}})
        except Exception:  # noqa: BLE001 - best effort while shutting down
            pass


def revisions(apps: client.AppsV1Api, namespace: str,
              service: str) -> dict[int, client.V1ReplicaSet]:
    """The Deployment's ReplicaSets by revision number."""
    found = {}
    for rs in apps.list_namespaced_replica_set(namespace, label_selector=f"app={service}").items:
        assert rs.metadata is not None  # the API server sets it on every object
        number = (rs.metadata.annotations or {}).get(REVISION_ANNOTATION)
        if number:
            found[int(number)] = rs
    return found


# ---------------------------------------------------------------------------------- waiting


def _ebpf_available(settings: Settings) -> tuple[bool, str]:
    from clover.stack.install import kernel_headers_dir
    from collectors.environment import CollectorError, bpf_environment

    try:
        bpf_environment(kernel_headers_dir(settings.stack.cache_dir))
    except CollectorError as exc:
        return False, str(exc)
    return True, ""


def _wait_pods_ready(runner: MeshRunner, say: Say, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        missing = [s.name for s in MESH if not runner.serving(s.name)]
        if not missing:
            say(f"  {len(MESH)} pods Ready: " + ", ".join(
                f"{e.pod} ({e.tag})" for e in runner.pod_events() if e.kind == "ready"))
            return
        time.sleep(0.2)
    raise DemoError(f"pods of {', '.join(missing)} did not become Ready within "
                    f"{timeout_s:.0f}s: {'; '.join(runner.errors) or 'no error seen'}; pod "
                    f"logs in {runner.run_dir / 'pods'}")


def _check_alive(pipeline: Pipeline) -> None:
    dead = pipeline.died()
    if dead:
        raise DemoError("; ".join(f"{c.name} exited with {c.proc.returncode if c.proc else '?'}"
                                  f":\n{c.log_tail()}" for c in dead))


def _warm_up(watcher: VerdictWatcher, pipeline: Pipeline, runner: MeshRunner,
             options: DemoOptions, say: Say) -> None:
    started = time.monotonic()
    shown = ""
    while time.monotonic() - started < options.warmup_timeout_s:
        _check_alive(pipeline)
        learning: dict[str, list[str]] = {}  # reason -> services
        for spec in MESH:
            verdicts = watcher.verdicts(spec.name)
            if not any(v.verdict != "inconclusive" for v in verdicts):
                reason = (verdicts[-1].reason or "inconclusive").split(" for ")[0] \
                    if verdicts else "no window closed yet"
                learning.setdefault(reason, []).append(spec.name)
        if not learning:
            say(f"  every service is judged after {time.monotonic() - started:.0f}s of traffic")
            return
        line = "; ".join(f"{', '.join(names)}: {reason}" for reason, names in learning.items())
        if line != shown:
            say(f"  {time.monotonic() - started:4.0f}s  {line}")
            shown = line
        time.sleep(1)
    raise DemoError(f"the scorer did not judge every service within "
                    f"{options.warmup_timeout_s:.0f}s (still learning: {shown}); see the logs "
                    f"in {pipeline.run_dir / 'logs'}")


def _watch(report: DemoReport, watcher: VerdictWatcher, runner: MeshRunner, pipeline: Pipeline,
           apps: client.AppsV1Api, options: DemoOptions, rollout_at: float, say: Say) -> None:
    """Follow the rollout until it is rolled back and judged normal again, or the duration."""
    said: set[str] = set()
    deadline = rollout_at + options.duration_s
    while time.time() < deadline:
        _check_alive(pipeline)
        if not report.revisions.get(options.tag):
            report.revisions.update(_tag_revisions(apps, options.namespace, options.service))
        new_revision = report.revisions.get(options.tag)
        for event in runner.pod_events():
            key = f"{event.kind} {event.pod}"
            if event.service == options.service and event.at >= rollout_at and key not in said:
                said.add(key)
                say(f"  {event.at - rollout_at:5.1f}s  pod {event.pod} ({event.tag}) "
                    f"{'serving' if event.kind == 'ready' else 'stopped'}")
        for verdict in watcher.verdicts(options.service):
            key = f"verdict {verdict.revision} {verdict.window_start_us} " \
                f"{verdict.window_seconds}"
            if verdict.window_start_us / 1e6 >= rollout_at - 10 and key not in said:
                said.add(key)
                tag = next((t for t, h in report.revisions.items() if h == verdict.revision),
                           verdict.revision)
                say(f"  {verdict.emitted_us / 1e6 - rollout_at:5.1f}s  window "
                    f"{_clock(verdict.window_start_us / 1e6)}"
                    + ("" if verdict.window_seconds == report.window_seconds
                       else f" ({verdict.window_seconds} s: another worker's)")
                    + f" of {options.service} {tag}: "
                    f"{verdict.verdict}" + (f" (score {verdict.score})" if verdict.score
                                            is not None else ""))
        for decision in watcher.rollback_decisions():
            key = f"decision {decision.service} {decision.decided_us}"
            if decision.reason in _ROUTINE or decision.action == "alert_only":
                key = f"decision {decision.service} {decision.reason}"  # once per service
            if decision.reason not in _QUIET and key not in said:
                said.add(key)
                say(f"  {decision.decided_us / 1e6 - rollout_at:5.1f}s  rollback agent: "
                    f"{decision.action} {decision.service} ({decision.reason})")
        if new_revision and _recovered(watcher, runner, options, new_revision):
            return
        time.sleep(0.5)


# Decisions not worth a line while watching: "inconclusive" and a streak that is still short
# come with every window; a cooldown skip follows every rollback.
_QUIET = ("inconclusive", "too_few_windows", "namespace_not_allowed")
_ROUTINE = ("cooldown",)


def _tag_revisions(apps: client.AppsV1Api, namespace: str, service: str) -> dict[str, str]:
    """image tag -> pod-template-hash of the service's ReplicaSets."""
    from demo.mesh import tag_of

    found = {}
    for rs in revisions(apps, namespace, service).values():
        # A Deployment's ReplicaSet has its pod template, with the image the Deployment names,
        # and the template's hash among its labels.
        template, meta = rs.spec.template, rs.metadata
        assert template is not None and template.spec is not None
        assert meta is not None and meta.labels is not None
        image = template.spec.containers[0].image
        assert image is not None
        found[tag_of(image)] = meta.labels.get("pod-template-hash", "")
    return found


def _recovered(watcher: VerdictWatcher, runner: MeshRunner, options: DemoOptions,
               new_revision: str) -> bool:
    """Rolled back, the faulty build no longer serving, and a later window judged normal."""
    patched = [d for d in watcher.rollback_decisions()
               if d.action == "rollback" and d.service == options.service and d.patched_us]
    if not patched or any(tag == options.tag for tag, _ in runner.serving(options.service)):
        return False
    stopped = [e.at for e in runner.pod_events() if e.kind == "stopped"
               and e.service == options.service and e.tag == options.tag]
    if not stopped:
        return False
    return any(v.verdict == "normal" and v.revision != new_revision
               and v.window_start_us / 1e6 >= max(stopped)
               for v in watcher.verdicts(options.service))


# --------------------------------------------------------------------------------- reporting


def _summarise(report: DemoReport, watcher: VerdictWatcher, runner: MeshRunner,
               load: LoadGenerator, apps: client.AppsV1Api, options: DemoOptions,
               rollout_at: float) -> None:
    service, tag = options.service, options.tag
    report.revisions.update(_tag_revisions(apps, options.namespace, service))
    new_revision = report.revisions.get(tag)
    report.decisions = watcher.rollback_decisions()
    report.verdicts = watcher.verdicts()
    report.foreign_windows = sum(1 for v in report.verdicts
                                 if v.window_seconds != report.window_seconds)
    events = [e for e in runner.pod_events() if e.service == service and e.at >= rollout_at]
    onset = next((e for e in events if e.kind == "ready" and e.tag == tag), None)
    if onset is not None:
        report.timeline.append(Moment("fault onset" if not options.healthy else "new pod serving",
                                      onset.at, f"pod {onset.pod} ({tag}) serving traffic"))
    # Only this pipeline's windows (another worker's, of another length, are counted apart).
    own = [v for v in watcher.verdicts(service) if v.window_seconds == report.window_seconds]
    anomalous = [v for v in own if v.verdict == "anomalous" and v.revision == new_revision]
    if anomalous:
        first = min(anomalous, key=lambda v: v.window_start_us)
        top = ", ".join(f"{c.feature} {c.value:.3g} vs {c.baseline:.3g}"
                        for c in first.contributions if c.value is not None
                        and c.baseline is not None)
        report.timeline.append(Moment(
            "first anomalous window", first.emitted_us / 1e6,
            f"window {_clock(first.window_start_us / 1e6)}-"
            f"{_clock(first.window_start_us / 1e6 + first.window_seconds)} judged anomalous "
            f"(score {first.score}; {top})"))
    rollbacks = [d for d in report.decisions if d.action == "rollback" and d.service == service]
    if rollbacks:
        decision = rollbacks[0]
        report.timeline.append(Moment(
            "rollback decision", decision.decided_us / 1e6,
            f"revision {decision.from_revision} -> {decision.to_revision}: {decision.reason}, "
            f"{decision.consecutive_anomalous} anomalous windows in a row"))
        if decision.patched_us:
            report.timeline.append(Moment("rollback patch", decision.patched_us / 1e6,
                                          "Deployment patched back to the previous template"))
            stopped = [e for e in events if e.kind == "stopped" and e.tag == tag
                       and e.at >= decision.patched_us / 1e6]
            if stopped:
                report.timeline.append(Moment(
                    "recovery", max(e.at for e in stopped),
                    f"the previous build serves again; pod {stopped[-1].pod} ({tag}) stopped"))
            normal = [v for v in own if v.verdict == "normal"
                      and v.revision != new_revision and stopped
                      and v.window_start_us / 1e6 >= max(e.at for e in stopped)]
            if normal:
                first_normal = min(normal, key=lambda v: v.window_start_us)
                report.timeline.append(Moment(
                    "judged normal again", first_normal.emitted_us / 1e6,
                    f"window {_clock(first_normal.window_start_us / 1e6)} of the restored "
                    "revision judged normal"))
    report.timeline.sort(key=lambda m: m.at)
    recovery = report.moment("recovery")
    fault_from = onset.at if onset else rollout_at
    report.traffic["before the rollout"] = load.stats(rollout_at - 30, rollout_at)
    report.traffic["after the rollout" if options.healthy or not recovery
                   else "during the fault"] = load.stats(
                       fault_from, recovery.at if recovery else report.ended_at)
    if recovery:
        report.traffic["after the rollback"] = load.stats(recovery.at + 1, report.ended_at)


def _print_report(report: DemoReport, settings: Settings, say: Say) -> None:
    say("")
    say(f"Timeline ({report.namespace}/{report.service}, rollout of {report.rollout_tag}):")
    start = report.timeline[0].at if report.timeline else report.started_at
    previous = start
    for moment in report.timeline:
        say(f"  {_clock(moment.at)}  +{moment.at - start:5.1f}s  (+{moment.at - previous:4.1f}s)"
            f"  {moment.name:<23} {moment.detail}")
        previous = moment.at
    rollbacks = report.rollbacks()
    if report.fault_to_patch_s is not None:
        verdict = "within" if report.fault_to_patch_s <= 30 else "OVER"
        say(f"Fault onset to rollback patch: {report.fault_to_patch_s:.1f} s ({verdict} the 30 s "
            "goal, with 10 s windows)")
    elif report.rollout_tag == "v2":
        say(f"Harmless rollout: {len(rollbacks)} rollbacks (expected none)")
    else:
        say("No rollback was applied within the demo's duration; see the decisions below and "
            f"the logs in {report.run_dir / 'logs'}")
    for name, stats in report.traffic.items():
        say(f"  traffic {name:<20} {stats.describe()}")
    counts: dict[tuple[str, str, str], int] = {}
    for d in report.decisions:
        counts[(d.service, d.action, d.reason)] = counts.get((d.service, d.action, d.reason),
                                                             0) + 1
    if counts:
        say("Rollback agent decisions about the mesh (service: action/reason x count):")
        for (service, action, reason), count in sorted(counts.items()):
            say(f"  {service:<9} {action}/{reason} x{count}")
    for d in rollbacks:
        say(f"  {_clock(d.decided_us / 1e6)}  {d.message}")
    if report.foreign_windows:
        say(f"WARNING: {report.foreign_windows} verdicts were about windows of another length "
            f"than {report.window_seconds} s: another aggregation worker on this machine (other "
            "window settings) also publishes windows of this namespace to "
            "clover.service-metrics, so the scorer saw both; the timings above are not clean")
    p = report.ports
    ks = report.keyspace
    say("")
    say("Where to look:")
    say(f"  Cassandra (keyspace {ks}): {ks}.service_metrics (10 s windows per service and "
        f"revision), {ks}.anomalies (every verdict), {ks}.rollback_decisions (every decision); "
        "from Python: analytics.views.load_service_metrics(store, "
        f"['{report.namespace}/{report.service}'], start, end)")
    say("  Kafka topics (keyed namespace/service): clover.spans, clover.flows, "
        "clover.service-metrics, clover.anomalies, clover.rollbacks, clover.deadletter")
    endpoints = [("receivers", p.receivers_metrics), ("worker", p.worker_metrics),
                 ("scorer", p.scorer_metrics), ("rollback agent", p.rollback_metrics)]
    if report.flows:
        endpoints.insert(1, ("flow collector", p.collector_metrics))
    say("  Prometheus: " + ", ".join(f"{name} http://127.0.0.1:{port}/metrics"
                                     for name, port in endpoints)
        + ("" if report.ended_at and not report.flows else ""))
    kubeconfig = settings.stack.home / "kube" / "admin.kubeconfig"
    say(f"  Kubernetes: KUBECONFIG={kubeconfig} kubectl -n {report.namespace} get "
        f"deploy,rs,events; kubectl -n {report.namespace} rollout history "
        f"deployment/{report.service}")
    say("  Notebooks: notebooks/service_overview.ipynb (traffic, latency and errors per "
        "service and revision) and notebooks/rollback_audit.ipynb (each decision with its "
        "evidence)")
    say(f"  Logs: {report.run_dir / 'logs'} (pipeline), {report.run_dir / 'pods'} (services)")
    say("Demo settings (changed from the defaults): " + ", ".join(
        f"{key.removeprefix('CLOVER_').lower().replace('_', '.', 1)}={value}"
        for key, (value, _) in DEMO_TUNING.items()))


def _clock(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%H:%M:%S")


def run_dirs(home: Path) -> list[Path]:
    """Earlier runs' directories, oldest first."""
    root = home / "demo"
    return sorted(root.iterdir(), key=os.path.getmtime) if root.is_dir() else []
