"""The local API server and the pipeline's least-privilege ServiceAccount, for real."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from clover.config import Settings
from clover.stack import Stack
from tests import kube


def _api(kubeconfig: str) -> client.ApiClient:
    return config.new_client_from_config(config_file=kubeconfig)


@pytest.fixture(scope="module")
def admin(live_stack: Stack) -> Iterator[client.ApiClient]:
    api = _api(str(live_stack.paths.kube / "admin.kubeconfig"))
    yield api
    api.close()


@pytest.fixture(scope="module")
def pipeline(live_stack: Stack, settings: Settings) -> Iterator[client.ApiClient]:
    api = _api(settings.kubeconfig)
    yield api
    api.close()


@pytest.fixture(scope="module")
def other_namespace(admin: client.ApiClient) -> Iterator[str]:
    name = f"clover-test-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(admin)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


def test_pipeline_identity_is_the_service_account(pipeline: client.ApiClient,
                                                  settings: Settings) -> None:
    # 1.20 has no SelfSubjectReview; ask the authorizer what this identity may do instead.
    access = client.AuthorizationV1Api(pipeline).create_self_subject_access_review(
        client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
            resource_attributes=client.V1ResourceAttributes(
                namespace=settings.kubernetes.namespace, verb="patch", group="apps",
                resource="deployments"))))
    assert access.status is not None and access.status.allowed
    denied = client.AuthorizationV1Api(pipeline).create_self_subject_access_review(
        client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
            resource_attributes=client.V1ResourceAttributes(
                namespace=settings.kubernetes.namespace, verb="delete", group="apps",
                resource="deployments"))))
    assert denied.status is not None and not denied.status.allowed


def test_service_account_reads_and_patches_deployments_in_its_namespace(
        admin: client.ApiClient, pipeline: client.ApiClient, settings: Settings) -> None:
    namespace = settings.kubernetes.namespace
    name = f"demo-{uuid.uuid4().hex[:6]}"
    client.AppsV1Api(admin).create_namespaced_deployment(namespace, kube.deployment(name))
    try:
        apps = client.AppsV1Api(pipeline)
        names = [kube.name_of(d) for d in apps.list_namespaced_deployment(namespace).items]
        assert name in names
        apps.patch_namespaced_deployment(name, namespace, {"metadata": {"annotations": {
            "clover.dev/checked": "yes"}}})
        patched = apps.read_namespaced_deployment(name, namespace).metadata
        assert patched is not None and patched.annotations is not None
        assert patched.annotations["clover.dev/checked"] == "yes"
        # It may not delete what it can patch.
        with pytest.raises(ApiException) as denied:
            apps.delete_namespaced_deployment(name, namespace)
        assert denied.value.status == 403
    finally:
        client.AppsV1Api(admin).delete_namespaced_deployment(name, namespace)


def test_service_account_gets_403_in_another_namespace(
        admin: client.ApiClient, pipeline: client.ApiClient, other_namespace: str) -> None:
    name = "elsewhere"
    client.AppsV1Api(admin).create_namespaced_deployment(other_namespace, kube.deployment(name))
    apps = client.AppsV1Api(pipeline)
    for call in (lambda: apps.list_namespaced_deployment(other_namespace),
                 lambda: apps.read_namespaced_deployment(name, other_namespace),
                 lambda: apps.patch_namespaced_deployment(
                     name, other_namespace, {"metadata": {"labels": {"x": "y"}}})):
        with pytest.raises(ApiException) as denied:
            call()
        assert denied.value.status == 403


def test_controller_manager_records_revisions(admin: client.ApiClient,
                                              settings: Settings) -> None:
    """Rollouts need ReplicaSets with revision annotations: the controller-manager makes them."""
    import time

    namespace = settings.kubernetes.namespace
    name = f"rev-{uuid.uuid4().hex[:6]}"
    apps = client.AppsV1Api(admin)
    apps.create_namespaced_deployment(namespace, kube.deployment(name))
    try:
        apps.patch_namespaced_deployment(name, namespace, {"spec": {"template": {"spec": {
            "containers": [{"name": "app", "image": "registry.local/demo:v2"}]}}}})
        deadline = time.monotonic() + 20
        revisions: dict[str, str] = {}
        while time.monotonic() < deadline and len(revisions) < 2:
            sets = apps.list_namespaced_replica_set(namespace, label_selector=f"app={name}")
            revisions = {}
            for rs in sets.items:
                meta = rs.metadata
                assert meta is not None  # the API server sets it on every object
                if meta.annotations:
                    number = meta.annotations.get("deployment.kubernetes.io/revision", "")
                    revisions[number] = kube.template_image(rs)
            time.sleep(0.2)
        assert revisions == {"1": "registry.local/demo:v1", "2": "registry.local/demo:v2"}
    finally:
        apps.delete_namespaced_deployment(name, namespace)
