"""Attribution of IP addresses and cgroup ids to Kubernetes workloads.

The eBPF flow collectors see addresses and cgroup ids; the span receivers see addresses. A
:class:`PodIndex` turns those into namespace, pod, workload (the Deployment) and revision (the
pod-template-hash) by listing and watching Pods and ReplicaSets on the API server. Lookups are
dict reads against a local cache; what the cache does not know is reported as unknown (``None``),
never guessed from names.

Usage::

    api = kubernetes.config.new_client_from_config(config_file=settings.kubeconfig)
    index = PodIndex(api, namespaces=[settings.kubernetes.namespace])
    index.start()
    index.wait_synced(30)
    index.endpoint("10.1.2.3", 8080)   # Endpoint(addr=..., namespace=..., service=..., ...)
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from clover.records import Endpoint

log = logging.getLogger(__name__)

TEMPLATE_HASH_LABEL = "pod-template-hash"
# A watch ends after this long (plus jitter, as client-go does) and resumes from its last
# resourceVersion; the client-side read timeout catches connections that died silently.
WATCH_SECONDS = 300
BACKOFF_MAX_S = 30.0
LIST_PAGE = 500
_TERMINAL_PHASES = ("Succeeded", "Failed")
# Container runtimes name a container's cgroup after its 64-hex-digit ID:
# cri-containerd-<id>.scope, docker-<id>.scope, crio-<id>.scope, or just <id> (cgroupfs driver).
_CONTAINER_ID = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Workload:
    """What an address or cgroup belongs to."""

    namespace: str
    pod: str
    # The Deployment; for a pod controlled directly by something else (StatefulSet, DaemonSet,
    # Job, a bare ReplicaSet) that controller's name; None for a bare pod or while unknown.
    service: str | None
    # The pod-template-hash label: which ReplicaSet, i.e. which rollout, the pod came from.
    revision: str | None


@dataclass(frozen=True)
class _Pod:
    """The few fields of a Pod that attribution needs."""

    uid: str
    namespace: str
    name: str
    owner: tuple[str, str, str] | None  # the controller ownerReference: (kind, name, uid)
    revision: str | None
    ips: tuple[str, ...]  # empty for hostNetwork pods and finished pods
    container_ids: tuple[str, ...]


@dataclass(frozen=True)
class _ReplicaSet:
    namespace: str
    name: str
    uid: str
    workload: str  # its controlling Deployment's name, or its own name when it has none


def default_cgroup_root() -> str:
    """The cgroup2 mount: /sys/fs/cgroup on a pure v2 host, /sys/fs/cgroup/unified on hybrid.

    bpf_get_current_cgroup_id() returns v2 ids; a v1 hierarchy's inode numbers are unrelated.
    """
    for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if os.path.exists(os.path.join(root, "cgroup.controllers")):  # only at a cgroup2 root
            return root
    return "/sys/fs/cgroup"


def container_id(raw: str | None) -> str | None:
    """The bare ID from a containerStatuses[].containerID such as ``containerd://<64 hex>``."""
    if not raw:
        return None
    return raw.rpartition("://")[2].lower() or None


def scan_cgroups(root: str | os.PathLike[str], container_ids: Iterable[str],
                 max_depth: int = 8) -> dict[int, str]:
    """Map cgroup inode -> container ID for every cgroup directory of a known container.

    A directory whose name contains a known ID belongs to that container, and so do the
    directories below it (a container may create sub-cgroups). The walk stops at ``max_depth``.
    """
    known = set(container_ids)
    found: dict[int, str] = {}
    if not known:
        return found

    def walk(path: str, depth: int, owner: str | None) -> None:
        try:
            entries = os.scandir(path)
        except OSError:  # the cgroup went away while walking, or is not readable
            return
        with entries:
            for entry in entries:
                try:
                    if not entry.is_dir(follow_symlinks=False):
                        continue
                    cid = owner
                    if cid is None:
                        cid = next((m for m in _CONTAINER_ID.findall(entry.name) if m in known),
                                   None)
                    if cid is not None:
                        # The cgroup id eBPF sees is the directory's inode number.
                        found[entry.stat(follow_symlinks=False).st_ino] = cid
                    if depth < max_depth:
                        walk(entry.path, depth + 1, cid)
                except OSError:
                    continue

    walk(os.fspath(root), 1, None)
    return found


def _canonical_ip(addr: str) -> str | None:
    """One spelling per address: compressed IPv6, and IPv4-mapped IPv6 as plain IPv4."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return ip.compressed


def _meta(obj: client.V1Pod | client.V1ReplicaSet) -> tuple[client.V1ObjectMeta, str, str, str]:
    # Objects from the API server always have a namespace, a name and a uid.
    meta = obj.metadata or client.V1ObjectMeta()
    return meta, meta.namespace or "", meta.name or "", meta.uid or ""


def _parse_pod(pod: client.V1Pod) -> _Pod:
    meta, namespace, name, uid = _meta(pod)
    spec, status = pod.spec, pod.status
    owner = next(((ref.kind, ref.name, ref.uid) for ref in meta.owner_references or []
                  if ref.controller), None)
    ips: list[str] = []
    # A hostNetwork pod's IP is its node's, shared by every hostNetwork pod and the node itself;
    # a finished pod's IP may already belong to a new pod.
    if status is not None and not (spec is not None and spec.host_network) \
            and status.phase not in _TERMINAL_PHASES:
        raw: list[str | None] = [p.ip for p in status.pod_ips or []] or [status.pod_ip]
        for addr in raw:
            canonical = _canonical_ip(addr) if addr else None
            if canonical and canonical not in ips:
                ips.append(canonical)
    cids: list[str] = []
    if status is not None:
        for statuses in (status.init_container_statuses, status.container_statuses,
                         status.ephemeral_container_statuses):
            for cs in statuses or []:
                cid = container_id(cs.container_id)
                if cid:
                    cids.append(cid)
    return _Pod(uid=uid, namespace=namespace, name=name, owner=owner,
                revision=(meta.labels or {}).get(TEMPLATE_HASH_LABEL), ips=tuple(ips),
                container_ids=tuple(cids))


def _parse_replica_set(rs: client.V1ReplicaSet) -> _ReplicaSet:
    meta, namespace, name, uid = _meta(rs)
    owner = next((ref.name for ref in meta.owner_references or [] if ref.controller), None)
    return _ReplicaSet(namespace=namespace, name=name, uid=uid, workload=owner or name)


class PodIndex:
    """Pods and ReplicaSets from the API server, indexed by pod IP and container cgroup.

    ``namespaces=None`` watches the whole cluster (needs cluster-wide list/watch); a list runs
    one watch per namespace, which a namespaced Role allows. Errors are logged and counted in
    ``watch_errors`` (the latest in ``last_error``), never raised into the collector;
    ``relists`` counts lists after the first (after 410 Gone or an error), ``cgroup_scans``
    the scans of the cgroup tree.
    """

    def __init__(self, api_client: client.ApiClient, namespaces: list[str] | None = None, *,
                 cgroup_root: str | os.PathLike[str] | None = None,
                 cgroup_rescan_s: float = 5.0, cgroup_max_depth: int = 8,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._core = client.CoreV1Api(api_client)
        self._apps = client.AppsV1Api(api_client)
        self._scopes: list[str | None] = list(namespaces) if namespaces is not None else [None]
        self.cgroup_root = Path(cgroup_root if cgroup_root is not None else default_cgroup_root())
        self._rescan_s = cgroup_rescan_s
        self._max_depth = cgroup_max_depth
        self._clock = clock

        self.watch_errors = 0
        self.relists = 0
        self.cgroup_scans = 0
        self.last_error: str | None = None

        # One lock guards everything below; writers hold it briefly, readers for one dict read.
        self._lock = threading.Lock()
        self._pods: dict[tuple[str, str], _Pod] = {}
        self._replica_sets: dict[tuple[str, str], _ReplicaSet] = {}
        self._by_ip: dict[str, Workload] = {}
        self._by_container: dict[str, Workload] = {}
        self._by_cgroup: dict[int, str] = {}  # inode -> container ID, from the last scan
        self._last_scan = float("-inf")

        self._stopping = threading.Event()
        self._synced: dict[tuple[str, str | None], threading.Event] = {}
        self._watches: set[watch.Watch] = set()
        self._threads: list[threading.Thread] = []

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """List then watch Pods and ReplicaSets, each namespace in its own daemon threads."""
        if self._threads:
            return
        self._stopping.clear()
        for scope in self._scopes:
            for kind in ("pods", "replicasets"):
                self._synced[(kind, scope)] = threading.Event()
                thread = threading.Thread(target=self._run, args=(kind, scope), daemon=True,
                                          name=f"pod-index-{kind}-{scope or 'all'}")
                self._threads.append(thread)
                thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop watching; waits up to ``timeout`` for the threads (they are daemons anyway)."""
        self._stopping.set()
        with self._lock:
            watches = list(self._watches)
        for w in watches:
            w.stop()  # shuts the socket down, which unblocks the reading thread
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]

    def wait_synced(self, timeout: float) -> bool:
        """True once the initial list of every watched namespace has been loaded."""
        deadline = time.monotonic() + timeout
        for event in list(self._synced.values()):
            if not event.wait(max(0.0, deadline - time.monotonic())):
                return False
        return bool(self._synced)

    # ---------------------------------------------------------------- lookups

    def by_ip(self, addr: str) -> Workload | None:
        """The workload whose pod has this IP, or None."""
        with self._lock:
            found = self._by_ip.get(addr)
        if found is None and ":" in addr:  # IPv6 has many spellings; IPv4-mapped is IPv4
            canonical = _canonical_ip(addr)
            if canonical is not None and canonical != addr:
                with self._lock:
                    found = self._by_ip.get(canonical)
        return found

    def by_cgroup(self, cgroup_id: int) -> Workload | None:
        """The workload of the container whose cgroup v2 id (inode) this is, or None.

        A miss rescans the cgroup tree, at most once per ``cgroup_rescan_s`` seconds, so that
        traffic from cgroups that are not containers cannot cause a storm of scans.
        """
        found = self._cgroup_lookup(cgroup_id)
        if found is None and self._rescan():
            found = self._cgroup_lookup(cgroup_id)
        return found

    def endpoint(self, addr: str, port: int | None) -> Endpoint:
        """An Endpoint for ``addr``, with namespace/service/pod/revision when known."""
        found = self.by_ip(addr)
        if found is None:
            return Endpoint(addr=addr, port=port)
        return Endpoint(addr=addr, port=port, namespace=found.namespace, service=found.service,
                        pod=found.pod, revision=found.revision)

    def _cgroup_lookup(self, cgroup_id: int) -> Workload | None:
        with self._lock:
            cid = self._by_cgroup.get(cgroup_id)
            return self._by_container.get(cid) if cid is not None else None

    def _rescan(self) -> bool:
        now = self._clock()
        with self._lock:
            if now - self._last_scan < self._rescan_s:
                return False
            self._last_scan = now  # claimed before scanning: concurrent misses do not scan too
            known = list(self._by_container)
        if not known:
            return False
        found = scan_cgroups(self.cgroup_root, known, self._max_depth)
        with self._lock:
            self._by_cgroup = found
            self.cgroup_scans += 1
        return True

    # ---------------------------------------------------------------- list and watch

    def _run(self, kind: str, namespace: str | None) -> None:
        failures = 0
        resource_version: str | None = None
        while not self._stopping.is_set():
            try:
                if resource_version is None:
                    resource_version = self._list(kind, namespace)
                    self._synced[(kind, namespace)].set()
                    failures = 0
                resource_version = self._watch(kind, namespace, resource_version)
            except ApiException as exc:
                if self._stopping.is_set():
                    break
                resource_version = None
                with self._lock:
                    self.relists += 1
                if exc.status == 410:  # our resourceVersion is too old: normal, list again now
                    log.info("%s watch in %s expired (410 Gone); listing again", kind,
                             namespace or "all namespaces")
                    continue
                failures += 1
                self._error(kind, namespace, f"HTTP {exc.status} {exc.reason}", failures)
            except Exception as exc:  # network errors, bad data: never crash the collector
                if self._stopping.is_set():
                    break
                resource_version = None
                with self._lock:
                    self.relists += 1
                failures += 1
                self._error(kind, namespace, f"{type(exc).__name__}: {exc}", failures)

    def _error(self, kind: str, namespace: str | None, message: str, failures: int) -> None:
        where = f"namespace {namespace}" if namespace else "all namespaces"
        with self._lock:
            self.watch_errors += 1
            self.last_error = f"{kind} in {where}: {message}"
        delay = min(BACKOFF_MAX_S, 0.5 * 2 ** (failures - 1)) * random.uniform(0.8, 1.0)
        log.warning("pod index: list/watch of %s in %s failed (%s); retrying in %.1f s",
                    kind, where, message, delay)
        self._stopping.wait(delay)

    def _list_call(self, kind: str, namespace: str | None) -> tuple[Callable[..., Any], tuple]:
        if kind == "pods":
            if namespace is None:
                return self._core.list_pod_for_all_namespaces, ()
            return self._core.list_namespaced_pod, (namespace,)
        if namespace is None:
            return self._apps.list_replica_set_for_all_namespaces, ()
        return self._apps.list_namespaced_replica_set, (namespace,)

    def _list(self, kind: str, namespace: str | None) -> str:
        """Load the current state, replacing what we had; returns the list's resourceVersion."""
        func, args = self._list_call(kind, namespace)
        items: list[Any] = []
        token: str | None = None
        while True:
            page = func(*args, limit=LIST_PAGE, _continue=token, _request_timeout=60)
            items.extend(page.items)
            token = page.metadata._continue
            if not token:
                break
        with self._lock:
            if kind == "pods":
                self._replace_pods(namespace, [_parse_pod(p) for p in items])
            else:
                self._replace_replica_sets(namespace, [_parse_replica_set(r) for r in items])
        resource_version: str = page.metadata.resource_version
        return resource_version

    def _watch(self, kind: str, namespace: str | None, resource_version: str) -> str:
        """Apply events until the server ends the watch; returns where to resume."""
        func, args = self._list_call(kind, namespace)
        w = watch.Watch()
        with self._lock:
            self._watches.add(w)
        try:
            seconds = WATCH_SECONDS + random.randint(0, WATCH_SECONDS)
            for event in w.stream(func, *args, resource_version=resource_version,
                                  allow_watch_bookmarks=True, timeout_seconds=seconds,
                                  _request_timeout=(10, seconds + 30)):
                if self._stopping.is_set():
                    break
                self.apply_event(kind, event["type"], event["object"])
        finally:
            with self._lock:
                self._watches.discard(w)
        return w.resource_version or resource_version

    # ---------------------------------------------------------------- cache updates

    def apply_event(self, kind: str, event_type: str, obj: Any) -> None:
        """Apply one watch event (``kind`` "pods" or "replicasets") to the cache."""
        if event_type == "BOOKMARK":  # only moves the resourceVersion on
            return
        if kind == "pods":
            pod = _parse_pod(obj)
            with self._lock:
                if event_type == "DELETED":
                    self._remove_pod(pod.namespace, pod.name, pod.uid)
                else:
                    self._put_pod(pod)
            return
        rs = _parse_replica_set(obj)
        key = (rs.namespace, rs.name)
        with self._lock:
            if event_type == "DELETED":
                changed = self._replica_sets.pop(key, None) is not None
            else:
                changed = self._replica_sets.get(key) != rs
                self._replica_sets[key] = rs
            if changed:  # pods that arrived before their ReplicaSet get their service now
                self._reresolve(lambda p: p.namespace == rs.namespace and p.owner is not None
                                and p.owner[:2] == ("ReplicaSet", rs.name))

    # The methods below run with self._lock held.

    def _workload(self, pod: _Pod) -> Workload:
        service: str | None = None
        if pod.owner is not None:
            kind, name, uid = pod.owner
            if kind == "ReplicaSet":
                # Resolve through the ReplicaSet's own ownerReference, not its name: unknown
                # until the ReplicaSet is seen.
                rs = self._replica_sets.get((pod.namespace, name))
                service = rs.workload if rs is not None and rs.uid == uid else None
            else:
                service = name
        return Workload(namespace=pod.namespace, pod=pod.name, service=service,
                        revision=pod.revision)

    def _put_pod(self, pod: _Pod) -> None:
        key = (pod.namespace, pod.name)
        old = self._pods.get(key)
        if old is not None:
            self._unindex(old)
        self._pods[key] = pod
        found = self._workload(pod)
        for addr in pod.ips:
            self._by_ip[addr] = found
        for cid in pod.container_ids:
            self._by_container[cid] = found

    def _remove_pod(self, namespace: str, name: str, uid: str | None = None) -> None:
        old = self._pods.get((namespace, name))
        if old is not None and (uid is None or old.uid == uid):
            del self._pods[(namespace, name)]
            self._unindex(old)

    def _unindex(self, pod: _Pod) -> None:
        # Only drop entries still pointing at this pod: an IP may already belong to a new pod.
        for table, keys in ((self._by_ip, pod.ips), (self._by_container, pod.container_ids)):
            for k in keys:
                current = table.get(k)
                if current is not None and (current.namespace, current.pod) == (
                        pod.namespace, pod.name):
                    del table[k]

    def _reresolve(self, which: Callable[[_Pod], bool]) -> None:
        for pod in [p for p in self._pods.values() if which(p)]:
            self._put_pod(pod)

    def _replace_pods(self, namespace: str | None, pods: list[_Pod]) -> None:
        fresh = {(p.namespace, p.name) for p in pods}
        for key in [k for k in self._pods if namespace in (None, k[0]) and k not in fresh]:
            self._remove_pod(*key)
        for pod in pods:
            self._put_pod(pod)

    def _replace_replica_sets(self, namespace: str | None, sets: list[_ReplicaSet]) -> None:
        for key in [k for k in self._replica_sets if namespace in (None, k[0])]:
            del self._replica_sets[key]
        for rs in sets:
            self._replica_sets[(rs.namespace, rs.name)] = rs
        self._reresolve(lambda p: namespace in (None, p.namespace))
