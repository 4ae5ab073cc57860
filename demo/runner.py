"""The demo's kubelet: runs one service process per pod of the demo namespace, the build the
pod's image tag names, so a rollout or a rollback in the API server really changes the code
that serves.

There is no kubelet or scheduler in the local stack: the Deployment and ReplicaSet controllers
create and delete Pod objects, and they stay Pending. The runner watches them (by listing every
``POLL_S``) and, for each new pod, allocates a loopback address, starts ``python -m
demo.service`` on it and, once it accepts connections, reports the pod Running and Ready with
that address through the status subresource, as a kubelet would. That is what lets a rolling
update proceed (the controller waits for the new pod to be available) and what lets the flow
collector attribute addresses to pods. A pod that is deleted has its process stopped (SIGTERM,
then SIGKILL after ``STOP_GRACE_S``). The Ready pods of each service are written to a routes
file that the services read to find each other, like a Service's endpoints.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from kubernetes import client

from demo.mesh import PORT, SERVICES, version_of

log = logging.getLogger("demo.runner")

POLL_S = 0.2
STOP_GRACE_S = 5.0


@dataclass(frozen=True)
class PodEvent:
    """A pod started serving ("ready") or its process ended ("stopped")."""

    at: float  # time.time()
    kind: str
    service: str
    pod: str
    tag: str
    revision: str


@dataclass
class _Process:
    service: str
    pod: str
    tag: str
    revision: str
    ip: str
    proc: subprocess.Popen[bytes]
    log_file: IO[bytes]
    ready: bool = False
    stopping_since: float | None = None


@dataclass
class ReceiverPorts:
    otlp: int
    zipkin: int
    mixer: int


@dataclass
class MeshRunner:
    """Runs the pods of ``namespace`` as processes until :meth:`stop`."""

    core: client.CoreV1Api
    namespace: str
    run_dir: Path
    receivers: ReceiverPorts
    address_prefix: str  # e.g. "127.93.0": pods get <prefix>.2, <prefix>.3, ...
    events: list[PodEvent] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _processes: dict[str, _Process] = field(default_factory=dict)  # by pod uid
    _next_host: int = 2
    _routes: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def routes_file(self) -> Path:
        return self.run_dir / "routes.json"

    def start(self) -> None:
        (self.run_dir / "pods").mkdir(parents=True, exist_ok=True)
        self._write_routes({})
        self._thread = threading.Thread(target=self._loop, name="demo-runner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for process in self._processes.values():
            if process.proc.poll() is None:
                process.proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for process in self._processes.values():
            try:
                process.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.proc.kill()
                process.proc.wait(5)
            process.log_file.close()

    def serving(self, service: str) -> list[tuple[str, str]]:
        """(tag, revision) of each Ready pod of ``service`` whose process is running."""
        with self._lock:
            return [(p.tag, p.revision) for p in self._processes.values()
                    if p.service == service and p.ready and p.stopping_since is None]

    def pod_events(self) -> list[PodEvent]:
        with self._lock:
            return list(self.events)

    # ------------------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self._sync()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - the API server may be restarting
                failures += 1
                log.warning("runner: %s (retrying)", exc)
                if failures == 1:
                    self.errors.append(str(exc))
                self._stop.wait(min(5.0, 0.2 * 2 ** failures))
                continue
            self._stop.wait(POLL_S)

    def _sync(self) -> None:
        pods = self.core.list_namespaced_pod(self.namespace).items
        alive: set[str] = set()
        for pod in pods:
            meta = pod.metadata
            assert meta is not None  # the API server sets it, and the uid, on every pod
            service = (meta.labels or {}).get("app")
            if service not in SERVICES or meta.deletion_timestamp is not None:
                continue
            assert meta.uid is not None
            alive.add(meta.uid)
            process = self._processes.get(meta.uid)
            if process is None:
                process = self._start(pod, service)
                if process is None:
                    continue
            if process.proc.poll() is not None:
                if process.stopping_since is None:
                    self._record("stopped", process)
                    self.errors.append(f"pod {process.pod} exited with "
                                       f"{process.proc.returncode}; see "
                                       f"{self.run_dir / 'pods' / (process.pod + '.log')}")
                    process.stopping_since = time.monotonic()
                continue
            if not process.ready and _accepts(process.ip, PORT):
                self._report_ready(process)
        for uid, process in list(self._processes.items()):
            if uid not in alive:
                self._stop_process(uid, process)
        routes: dict[str, list[tuple[str, int]]] = {}
        for process in self._processes.values():
            if process.ready and process.stopping_since is None:
                routes.setdefault(process.service, []).append((process.ip, PORT))
        if routes != self._routes:
            self._write_routes(routes)

    def _start(self, pod: client.V1Pod, service: str) -> _Process | None:
        meta, spec = pod.metadata, pod.spec
        # The API server sets these on every pod, and refuses a container without an image.
        assert meta is not None and meta.uid is not None and meta.name is not None
        assert spec is not None
        image = spec.containers[0].image
        assert image is not None
        try:
            tag = version_of(image).tag
        except ValueError as exc:  # a pod nobody can run: say so once, like ErrImagePull
            if meta.uid not in {e.split(" ", 1)[0] for e in self.errors}:
                self.errors.append(f"{meta.uid} {meta.name}: {exc}")
            return None
        revision = (meta.labels or {}).get("pod-template-hash", "")
        ip = f"{self.address_prefix}.{self._next_host}"
        self._next_host += 1
        log_file = open(self.run_dir / "pods" / f"{meta.name}.log", "ab")  # noqa: SIM115
        argv = [sys.executable, "-m", "demo.service", "--service", service, "--tag", tag,
                "--namespace", self.namespace, "--pod", meta.name, "--revision", revision,
                "--ip", ip, "--port", str(PORT), "--routes", str(self.routes_file),
                "--otlp-port", str(self.receivers.otlp),
                "--zipkin-port", str(self.receivers.zipkin),
                "--mixer-port", str(self.receivers.mixer)]
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT,
                                cwd=self.run_dir, env=_child_env())
        process = _Process(service, meta.name, tag, revision, ip, proc, log_file)
        with self._lock:
            self._processes[meta.uid] = process
        log.info("started %s (%s %s) on %s", meta.name, service, tag, ip)
        return process

    def _report_ready(self, process: _Process) -> None:
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        status = {"status": {
            "phase": "Running", "hostIP": "127.0.0.1", "podIP": process.ip,
            "podIPs": [{"ip": process.ip}], "startTime": now,
            "conditions": [{"type": kind, "status": "True", "lastTransitionTime": now}
                           for kind in ("PodScheduled", "Initialized", "ContainersReady",
                                        "Ready")],
            "containerStatuses": [{
                "name": "app", "image": f"{process.service}:{process.tag}", "imageID": "",
                "ready": True, "restartCount": 0, "started": True,
                "state": {"running": {"startedAt": now}}}],
        }}
        # A merge patch replaces the lists (podIPs, conditions) instead of merging them.
        self.core.patch_namespaced_pod_status(process.pod, self.namespace, status,
                                              _content_type="application/merge-patch+json")
        with self._lock:
            process.ready = True
        self._record("ready", process)

    def _stop_process(self, uid: str, process: _Process) -> None:
        if process.stopping_since is None:
            with self._lock:
                process.stopping_since = time.monotonic()
            if process.proc.poll() is None:
                process.proc.terminate()
            return
        if process.proc.poll() is None:
            if time.monotonic() - process.stopping_since > STOP_GRACE_S:
                process.proc.kill()
            return
        process.log_file.close()
        with self._lock:
            del self._processes[uid]
        if process.proc.returncode in (0, -15):
            self._record("stopped", process)

    def _record(self, kind: str, process: _Process) -> None:
        with self._lock:
            self.events.append(PodEvent(time.time(), kind, process.service, process.pod,
                                        process.tag, process.revision))
        log.info("%s %s (%s %s)", kind, process.pod, process.service, process.tag)

    def _write_routes(self, routes: dict[str, list[tuple[str, int]]]) -> None:
        temporary = self.routes_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(routes))
        os.replace(temporary, self.routes_file)  # readers never see half a file
        self._routes = routes


def _accepts(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=0.2):
            return True
    except OSError:
        return False


def _child_env() -> dict[str, str]:
    """The service processes import demo/ from this checkout, wherever they run."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else root}
