"""Kubernetes objects and polling shared by the tests against the local API server.

There is no kubelet: the tests patch pod status the way a kubelet would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from kubernetes import client

T = TypeVar("T")


class _Object(Protocol):
    """An API object: the API server sets its metadata on every one it returns."""
    metadata: client.V1ObjectMeta | None


def name_of(obj: _Object) -> str:
    """The object's name (the API server's objects all have one)."""
    assert obj.metadata is not None and obj.metadata.name is not None
    return obj.metadata.name


def template_hash(obj: _Object) -> str:
    """The pod-template-hash label of a Deployment's ReplicaSet or pod."""
    assert obj.metadata is not None and obj.metadata.labels is not None
    return obj.metadata.labels["pod-template-hash"]


def template_image(obj: client.V1Deployment | client.V1ReplicaSet) -> str:
    """The image of the first container of a Deployment's or ReplicaSet's pod template (the
    API server refuses a Deployment without them)."""
    template = obj.spec.template
    assert template is not None and template.spec is not None
    image = template.spec.containers[0].image
    assert image is not None
    return image


def eventually(check: Callable[[], T], timeout: float = 20.0) -> T:
    """Poll ``check`` until it returns something truthy, or return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def deployment(name: str, image: str = "registry.local/demo:v1") -> client.V1Deployment:
    """A one-replica Deployment labelled app=<name>, with one container named "app"."""
    labels = {"app": name}
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1DeploymentSpec(
            replicas=1,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(containers=[client.V1Container(name="app", image=image)]),
            ),
        ),
    )


def pod_status(ipv4: str, ipv6: str | None = None, cid: str | None = None,
               phase: str | None = None) -> dict[str, Any]:
    """What a kubelet reports for a started pod (dual-stack when ``ipv6`` is given)."""
    status: dict[str, Any] = {
        "podIP": ipv4,
        "podIPs": [{"ip": ipv4}] + ([{"ip": ipv6}] if ipv6 else []),
    }
    if cid:
        status["containerStatuses"] = [{
            "name": "app", "image": "x", "imageID": "", "ready": True, "restartCount": 0,
            "started": True, "containerID": f"containerd://{cid}",
            "state": {"running": {"startedAt": "2024-01-01T00:00:00Z"}},
        }]
    if phase:
        status["phase"] = phase
    return {"status": status}


def patch_pod_status(core: client.CoreV1Api, name: str, namespace: str,
                     body: dict[str, Any]) -> None:
    # A JSON merge patch replaces lists; a strategic merge would add the new podIPs to the old.
    core.patch_namespaced_pod_status(name, namespace, body,
                                     _content_type="application/merge-patch+json")


def pods_of(api: client.ApiClient, namespace: str, app: str) -> list[client.V1Pod]:
    return list(client.CoreV1Api(api).list_namespaced_pod(
        namespace, label_selector=f"app={app}").items)


def rollback_identity(admin_kubeconfig: Path, ca: Path, namespace: str,
                      kubeconfig: Path) -> client.ApiClient:
    """The rollback agent's ServiceAccount, Role and RoleBinding (k8s/manifests/rollback-rbac.yaml)
    applied in ``namespace`` (created too), and a kubeconfig with a fresh TokenRequest token for
    it written to ``kubeconfig``; returns a client with that identity."""
    from kubernetes import config

    from clover.stack.kube import bootstrap_pipeline_identity

    bootstrap_pipeline_identity(admin_kubeconfig, kubeconfig, ca, namespace, "clover-rollback",
                                manifest="rollback-rbac.yaml")
    return config.new_client_from_config(config_file=str(kubeconfig))


def set_image(apps: client.AppsV1Api, name: str, namespace: str, image: str) -> None:
    """Roll the Deployment out to a new image: a new pod template, so a new revision."""
    apps.patch_namespaced_deployment(name, namespace, {"spec": {"template": {"spec": {
        "containers": [{"name": "app", "image": image}]}}}})


def revisions(apps: client.AppsV1Api, namespace: str, name: str) -> dict[int, tuple[str, str]]:
    """revision -> (pod-template-hash, image) of the Deployment's ReplicaSets."""
    found = {}
    for rs in apps.list_namespaced_replica_set(namespace, label_selector=f"app={name}").items:
        meta = rs.metadata
        assert meta is not None
        number = (meta.annotations or {}).get("deployment.kubernetes.io/revision")
        if number:
            found[int(number)] = (template_hash(rs), template_image(rs))
    return found


def wait_revisions(apps: client.AppsV1Api, namespace: str, name: str,
                   count: int) -> dict[int, tuple[str, str]]:
    """The revisions, once there are ``count`` of them and the Deployment names the newest."""
    def ready() -> dict[int, tuple[str, str]]:
        found = revisions(apps, namespace, name)
        deployment = apps.read_namespaced_deployment(name, namespace)
        assert deployment.metadata is not None
        current = (deployment.metadata.annotations or {}).get(
            "deployment.kubernetes.io/revision")
        return found if len(found) == count and current == str(max(found)) else {}

    found = eventually(ready)
    assert found, f"{namespace}/{name} did not reach {count} revisions"
    return found
