"""Kubernetes objects and polling shared by the tests against the local API server.

There is no kubelet: the tests patch pod status the way a kubelet would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from kubernetes import client

T = TypeVar("T")


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
