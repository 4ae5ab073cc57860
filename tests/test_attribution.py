"""Attribution of addresses and cgroups to workloads (k8s/metadata.py).

Against the local API server: the admin creates Deployments and Pods (the controller-manager
makes the ReplicaSets and Pods; nothing runs them, so they stay Pending) and patches pod status
with addresses and container IDs the way a kubelet would. The index under test uses the
pipeline's least-privilege kubeconfig. Addresses are link-local 169.254.0.0/16 and ULA
fd42:c10e::/64 labels; no traffic is sent to them.
"""

from __future__ import annotations

import json
import os
import random
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client, config

from clover.config import Settings
from clover.stack import Stack
from k8s.metadata import PodIndex, Workload, container_id, scan_cgroups
from tests import kube

T = TypeVar("T")
_used: set[str] = set()


def _ipv4() -> str:
    while True:
        addr = f"169.254.{random.randint(1, 254)}.{random.randint(1, 254)}"
        if addr not in _used:
            _used.add(addr)
            return addr


def _ipv6() -> str:
    addr = f"fd42:c10e::{random.getrandbits(16):x}:{random.getrandbits(16):x}"
    _used.add(addr)
    return addr


def _cid() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex  # 64 hex digits, like a containerd ID


def _bare_pod(name: str, host_network: bool = False) -> client.V1Pod:
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels={"clover-test": "attribution"}),
        spec=client.V1PodSpec(host_network=host_network or None,
                              containers=[client.V1Container(name="app", image="x")]))


@pytest.fixture(scope="module")
def admin(live_stack: Stack) -> Iterator[client.ApiClient]:
    api = config.new_client_from_config(config_file=str(live_stack.paths.kube /
                                                        "admin.kubeconfig"))
    yield api
    api.close()


@pytest.fixture(scope="module")
def pipeline(live_stack: Stack, settings: Settings) -> Iterator[client.ApiClient]:
    api = config.new_client_from_config(config_file=settings.kubeconfig)
    yield api
    api.close()


@pytest.fixture(scope="module")
def cgroup_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cgroup")


@pytest.fixture(scope="module")
def index(pipeline: client.ApiClient, settings: Settings, cgroup_root: Path) -> Iterator[PodIndex]:
    index = PodIndex(pipeline, namespaces=[settings.kubernetes.namespace],
                     cgroup_root=cgroup_root, cgroup_rescan_s=0.1)
    index.start()
    try:
        assert index.wait_synced(30), index.last_error
        yield index
    finally:
        index.stop()


@pytest.fixture
def ns(settings: Settings) -> str:
    return settings.kubernetes.namespace


@pytest.fixture
def pods(admin: client.ApiClient, ns: str) -> Iterator[Callable[[client.V1Pod], str]]:
    """Creates bare pods as admin; deletes them afterwards."""
    core = client.CoreV1Api(admin)
    created: list[str] = []

    def create(pod: client.V1Pod) -> str:
        core.create_namespaced_pod(ns, pod)
        name = kube.name_of(pod)
        created.append(name)
        return name

    yield create
    for name in created:
        try:
            core.delete_namespaced_pod(name, ns, grace_period_seconds=0)
        except client.ApiException as exc:
            if exc.status != 404:
                raise


@pytest.fixture
def deployment(admin: client.ApiClient, ns: str) -> Iterator[str]:
    name = f"attr-{uuid.uuid4().hex[:6]}"
    apps = client.AppsV1Api(admin)
    apps.create_namespaced_deployment(ns, kube.deployment(name))
    try:
        yield name
    finally:
        # The garbage collector in the controller-manager removes its ReplicaSets and Pods.
        apps.delete_namespaced_deployment(name, ns, propagation_policy="Background")


def test_deployment_pod_is_attributed_to_deployment_and_revision(
        admin: client.ApiClient, index: PodIndex, deployment: str, ns: str) -> None:
    core = client.CoreV1Api(admin)
    pod = kube.eventually(lambda: next(iter(kube.pods_of(admin, ns, deployment)), None))
    assert pod is not None, "the controller-manager made no pod"
    name, pod_hash = kube.name_of(pod), kube.template_hash(pod)
    replica_set = client.AppsV1Api(admin).list_namespaced_replica_set(
        ns, label_selector=f"app={deployment}").items[0]
    assert kube.template_hash(replica_set) == pod_hash
    ipv4, ipv6, cid = _ipv4(), _ipv6(), _cid()
    kube.patch_pod_status(core, name, ns, kube.pod_status(ipv4, ipv6, cid))

    expected = Workload(namespace=ns, pod=name, service=deployment, revision=pod_hash)
    assert kube.eventually(lambda: index.by_ip(ipv4)) == expected
    assert index.by_ip(ipv6) == expected
    # Collectors may spell addresses differently: uncompressed IPv6, IPv4-mapped IPv6.
    head, _, tail = ipv6.partition("::")
    assert index.by_ip(f"{head}:0:0::{tail}") == expected
    assert index.by_ip(f"::ffff:{ipv4}") == expected
    endpoint = index.endpoint(ipv4, 8080)
    assert (endpoint.addr, endpoint.port, endpoint.namespace, endpoint.service, endpoint.pod,
            endpoint.revision) == (ipv4, 8080, ns, deployment, name, pod_hash)
    unknown = _ipv4()
    assert index.by_ip(unknown) is None
    assert index.endpoint(unknown, None) == type(endpoint)(addr=unknown)
    assert index.by_ip("not an address") is None

    # The controller-manager replaces the deleted pod; the old pod's addresses are gone.
    core.delete_namespaced_pod(name, ns, grace_period_seconds=0)
    assert kube.eventually(lambda: index.by_ip(ipv4) is None, timeout=5)
    assert index.by_ip(ipv6) is None


def test_rollout_gives_the_new_pod_the_new_revision(
        admin: client.ApiClient, index: PodIndex, deployment: str, ns: str) -> None:
    core = client.CoreV1Api(admin)
    first = kube.eventually(lambda: next(iter(kube.pods_of(admin, ns, deployment)), None))
    assert first is not None
    old_name, old_hash = kube.name_of(first), kube.template_hash(first)
    old_ip = _ipv4()
    kube.patch_pod_status(core, old_name, ns, kube.pod_status(old_ip))
    assert kube.eventually(lambda: index.by_ip(old_ip)) == Workload(
        ns, old_name, deployment, old_hash)

    client.AppsV1Api(admin).patch_namespaced_deployment(deployment, ns, {"spec": {"template": {
        "spec": {"containers": [{"name": "app", "image": "registry.local/demo:v2"}]}}}})
    new = kube.eventually(lambda: next((p for p in kube.pods_of(admin, ns, deployment)
                                        if kube.template_hash(p) != old_hash), None))
    assert new is not None, "the rollout made no new pod"
    new_name, new_hash = kube.name_of(new), kube.template_hash(new)
    new_ip = _ipv4()
    kube.patch_pod_status(core, new_name, ns, kube.pod_status(new_ip))
    assert kube.eventually(lambda: index.by_ip(new_ip)) == Workload(
        namespace=ns, pod=new_name, service=deployment, revision=new_hash)


def test_bare_pod_has_no_service_and_finished_pod_is_dropped(
        admin: client.ApiClient, index: PodIndex, pods: Callable[[client.V1Pod], str],
        ns: str) -> None:
    core = client.CoreV1Api(admin)
    # The name looks like a Deployment's pod; it must not be taken for one.
    name = pods(_bare_pod(f"web-{uuid.uuid4().hex[:10]}-{uuid.uuid4().hex[:5]}"))
    ipv4 = _ipv4()
    kube.patch_pod_status(core, name, ns, kube.pod_status(ipv4))
    assert kube.eventually(lambda: index.by_ip(ipv4)) == Workload(ns, name, None, None)

    kube.patch_pod_status(core, name, ns, kube.pod_status(ipv4, phase="Succeeded"))
    assert kube.eventually(lambda: index.by_ip(ipv4) is None, timeout=5)


def test_pod_ip_change_drops_the_old_address(
        admin: client.ApiClient, index: PodIndex, pods: Callable[[client.V1Pod], str],
        ns: str) -> None:
    core = client.CoreV1Api(admin)
    name = pods(_bare_pod(f"moving-{uuid.uuid4().hex[:6]}"))
    old, new = _ipv4(), _ipv4()
    kube.patch_pod_status(core, name, ns, kube.pod_status(old))
    assert kube.eventually(lambda: index.by_ip(old))
    kube.patch_pod_status(core, name, ns, kube.pod_status(new))
    assert kube.eventually(lambda: index.by_ip(new)) == Workload(ns, name, None, None)
    assert index.by_ip(old) is None


def test_host_network_pod_address_is_not_indexed(
        admin: client.ApiClient, index: PodIndex, pods: Callable[[client.V1Pod], str],
        ns: str) -> None:
    core = client.CoreV1Api(admin)
    host = pods(_bare_pod(f"hostnet-{uuid.uuid4().hex[:6]}", host_network=True))
    marker = pods(_bare_pod(f"marker-{uuid.uuid4().hex[:6]}"))
    node_ip, marker_ip = _ipv4(), _ipv4()
    kube.patch_pod_status(core, host, ns, kube.pod_status(node_ip))
    # A namespace's pod events arrive in order: once the later change is visible, the
    # hostNetwork pod's change has been processed too.
    kube.patch_pod_status(core, marker, ns, kube.pod_status(marker_ip))
    assert kube.eventually(lambda: index.by_ip(marker_ip))
    assert index.by_ip(node_ip) is None


def test_cgroup_id_maps_to_the_container_in_pod_status(
        admin: client.ApiClient, index: PodIndex, deployment: str, ns: str,
        cgroup_root: Path) -> None:
    """The container ID comes from real pod status; the cgroup tree is a fake in a temporary
    directory laid out like containerd's systemd driver, because this machine runs no container
    runtime. The inode numbers of its directories play the cgroup ids."""
    core = client.CoreV1Api(admin)
    pod = kube.eventually(lambda: next(iter(kube.pods_of(admin, ns, deployment)), None))
    assert pod is not None
    cid, ipv4 = _cid(), _ipv4()
    name = kube.name_of(pod)
    kube.patch_pod_status(core, name, ns, kube.pod_status(ipv4, cid=cid))
    expected = Workload(ns, name, deployment, kube.template_hash(pod))
    assert kube.eventually(lambda: index.by_ip(ipv4)) == expected

    assert pod.metadata is not None and pod.metadata.uid is not None  # set by the API server
    pod_slice = (cgroup_root / "kubepods.slice" / "kubepods-burstable.slice"
                 / f"kubepods-burstable-pod{pod.metadata.uid.replace('-', '_')}.slice")
    container = pod_slice / f"cri-containerd-{cid}.scope"
    container.mkdir(parents=True)
    assert kube.eventually(lambda: index.by_cgroup(container.stat().st_ino)) == expected
    assert index.by_cgroup(pod_slice.stat().st_ino) is None  # the pod's slice: no container
    assert index.by_cgroup(1) is None


def test_cluster_wide_watch_without_permission_is_reported(pipeline: client.ApiClient) -> None:
    """The pipeline's Role is namespaced, so listing all namespaces is forbidden: the index
    says so through its counters and keeps retrying quietly; it neither raises nor hangs."""
    index = PodIndex(pipeline, namespaces=None)
    index.start()
    try:
        assert not index.wait_synced(3)
        assert kube.eventually(lambda: index.watch_errors >= 2, timeout=10)
        assert index.last_error is not None and "403" in index.last_error
        assert index.by_ip("169.254.1.1") is None
    finally:
        started = time.monotonic()
        index.stop()
    assert time.monotonic() - started < 5
    assert not index._threads, "watch threads still running after stop()"


def _compact_etcd(stack: Stack) -> None:
    """Compact the stack's etcd to its current revision (its v3 JSON gateway), as the API
    server itself does every five minutes, so that old resourceVersions are really gone."""
    base = f"http://127.0.0.1:{stack.settings.stack.etcd_port}/v3/kv"

    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(f"{base}/{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return dict(json.load(response))

    revision = post("range", {"key": "AA=="})["header"]["revision"]
    try:
        post("compaction", {"revision": revision})
    except urllib.error.HTTPError as exc:  # compacted to this revision already: as wanted
        if "compacted" not in exc.read().decode():
            raise


def _expired(api: client.ApiClient, namespace: str, version: str) -> bool:
    """Whether the server answers a pod watch from ``version`` with 410 Gone."""
    from kubernetes import watch

    try:
        for event in watch.Watch().stream(client.CoreV1Api(api).list_namespaced_pod, namespace,
                                          resource_version=version, timeout_seconds=1):
            return bool(event["type"] == "ERROR" and event["raw_object"].get("code") == 410)
    except client.ApiException as exc:
        return exc.status == 410
    return False


def test_expired_resource_version_lists_again(pipeline: client.ApiClient, ns: str,
                                              live_stack: Stack) -> None:
    """A watch from a compacted resourceVersion gets 410 Gone from the server: the index lists
    again and carries on, and that is not counted as an error.

    The 410 is the server's own. A young etcd cannot give it: the API server's watch cache
    (which resizes itself with the event rate) still replays from resourceVersion 1 there, so
    the test skips, saying so; on a stack with some history it runs.
    """
    _compact_etcd(live_stack)  # the API server compacts only every five minutes
    if not _expired(pipeline, ns, "1"):
        pytest.skip("this API server still serves resourceVersion 1 from its watch cache (a "
                    "young etcd), so no 410 can be caused for real")
    index = PodIndex(pipeline, namespaces=[ns])
    real_list = index._list
    listed: list[str] = []

    def list_then_hand_out_an_expired_version(kind: str, namespace: str | None) -> str:
        version = real_list(kind, namespace)
        listed.append(kind)
        return "1" if listed.count(kind) == 1 else version

    index._list = list_then_hand_out_an_expired_version  # type: ignore[method-assign]
    index.start()
    try:
        assert index.wait_synced(10)
        assert kube.eventually(lambda: sorted(listed) == ["pods", "pods", "replicasets",
                                                      "replicasets"], timeout=10), listed
        assert index.relists == 2
        assert index.watch_errors == 0, index.last_error
    finally:
        index.stop()


# ---------------------------------------------------------------------------- no server needed


def _pod(name: str, *, owner: tuple[str, str, str] | None = None, pod_hash: str | None = None,
         ip: str | None = None, cid: str | None = None) -> client.V1Pod:
    refs = [client.V1OwnerReference(api_version="apps/v1", kind=owner[0], name=owner[1],
                                    uid=owner[2], controller=True)] if owner else None
    statuses = [client.V1ContainerStatus(name="app", image="x", image_id="", ready=True,
                                         restart_count=0, container_id=f"containerd://{cid}")
                ] if cid else None
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, namespace="shop", uid=f"uid-{name}",
                                     labels={"pod-template-hash": pod_hash} if pod_hash else {},
                                     owner_references=refs),
        spec=client.V1PodSpec(containers=[client.V1Container(name="app")]),
        status=client.V1PodStatus(phase="Running", pod_ip=ip, container_statuses=statuses))


def _replica_set(name: str, uid: str, deployment: str) -> client.V1ReplicaSet:
    return client.V1ReplicaSet(metadata=client.V1ObjectMeta(
        name=name, namespace="shop", uid=uid, owner_references=[client.V1OwnerReference(
            api_version="apps/v1", kind="Deployment", name=deployment, uid="d-uid",
            controller=True)]),
        spec=client.V1ReplicaSetSpec(selector=client.V1LabelSelector()))


def test_pod_seen_before_its_replica_set_gets_its_service_later() -> None:
    index = PodIndex(client.ApiClient(), namespaces=["shop"])
    index.apply_event("pods", "ADDED", _pod("cart-7d4b9-x2k", owner=("ReplicaSet", "cart-7d4b9",
                                                                      "rs-uid"),
                                            pod_hash="7d4b9", ip="10.0.0.7"))
    assert index.by_ip("10.0.0.7") == Workload("shop", "cart-7d4b9-x2k", None, "7d4b9")
    index.apply_event("replicasets", "ADDED", _replica_set("cart-7d4b9", "rs-uid", "cart"))
    assert index.by_ip("10.0.0.7") == Workload("shop", "cart-7d4b9-x2k", "cart", "7d4b9")
    # A ReplicaSet of the same name but another uid is not the pod's owner.
    index.apply_event("replicasets", "MODIFIED", _replica_set("cart-7d4b9", "other", "cart"))
    assert index.by_ip("10.0.0.7") == Workload("shop", "cart-7d4b9-x2k", None, "7d4b9")
    # A StatefulSet's pod: the StatefulSet is the workload, and there is no pod-template-hash.
    index.apply_event("pods", "ADDED", _pod("db-0", owner=("StatefulSet", "db", "s"),
                                            ip="10.0.0.8"))
    assert index.by_ip("10.0.0.8") == Workload("shop", "db-0", "db", None)
    index.apply_event("pods", "DELETED", _pod("db-0", ip="10.0.0.8"))
    assert index.by_ip("10.0.0.8") is None


def test_container_id_parsing() -> None:
    cid = _cid()
    for runtime in ("containerd", "docker", "cri-o"):
        assert container_id(f"{runtime}://{cid}") == cid
    assert container_id("") is None
    assert container_id(None) is None


def test_scan_cgroups_finds_containers_under_every_driver_layout(tmp_path: Path) -> None:
    """A fake cgroup tree (no container runtime here); inode numbers play the cgroup ids."""
    ids = [_cid() for _ in range(5)]
    layouts = {
        ids[0]: "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podA.slice/"
                f"cri-containerd-{ids[0]}.scope",
        ids[1]: f"system.slice/docker-{ids[1]}.scope",
        ids[2]: f"kubepods/burstable/podB/{ids[2]}",                        # cgroupfs driver
        ids[3]: f"kubepods.slice/kubepods-podC.slice/crio-{ids[3]}.scope",
        ids[4]: "a/b/c/d/e/f/g/h/i/" + ids[4],                              # too deep
    }
    for path in layouts.values():
        (tmp_path / path).mkdir(parents=True)
    nested = tmp_path / layouts[ids[0]] / "init.scope"  # a sub-cgroup inside the container
    nested.mkdir()
    unknown = tmp_path / "kubepods" / "burstable" / "podB" / _cid()  # not a known container
    unknown.mkdir()
    (tmp_path / "cgroup.procs").write_text("")

    found = scan_cgroups(tmp_path, ids, max_depth=8)
    expected = {os.stat(tmp_path / layouts[cid]).st_ino: cid for cid in ids[:4]}
    expected[nested.stat().st_ino] = ids[0]
    assert found == expected
    assert scan_cgroups(tmp_path, []) == {}
    assert scan_cgroups(tmp_path / "missing", ids) == {}


def test_unknown_cgroup_cannot_cause_a_scan_storm(tmp_path: Path) -> None:
    """Fake cgroup tree, fake clock: misses rescan at most once per interval."""
    now = [1000.0]
    index = PodIndex(client.ApiClient(), namespaces=["shop"], cgroup_root=tmp_path,
                     cgroup_rescan_s=5, clock=lambda: now[0])
    first, second = _cid(), _cid()
    index.apply_event("pods", "ADDED", _pod("a", owner=("DaemonSet", "agent", "u"), cid=first))
    (tmp_path / f"docker-{first}.scope").mkdir()
    assert index.by_cgroup((tmp_path / f"docker-{first}.scope").stat().st_ino) == Workload(
        "shop", "a", "agent", None)
    assert index.cgroup_scans == 1
    for cgroup in range(10_000, 10_100):
        assert index.by_cgroup(cgroup) is None
    assert index.cgroup_scans == 1

    # A container that starts later is found at the next allowed rescan.
    index.apply_event("pods", "ADDED", _pod("b", owner=("Job", "backup", "u"), cid=second))
    (tmp_path / f"docker-{second}.scope").mkdir()
    inode = (tmp_path / f"docker-{second}.scope").stat().st_ino
    assert index.by_cgroup(inode) is None
    now[0] += 5
    assert index.by_cgroup(inode) == Workload("shop", "b", "backup", None)
    assert index.cgroup_scans == 2
