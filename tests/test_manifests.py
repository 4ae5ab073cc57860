"""The cluster manifests (k8s/manifests/): rendered, and checked by the real API server.

`kubectl kustomize` is not available here (the local stack builds only the API server and the
controller-manager, and kubectl 1.20 carries kustomize 2.0, which predates `patches`), so
``render`` below is a small kustomize for exactly the fields these kustomizations use
(resources, patches as strategic merge, images, configMapGenerator with kustomize's name hash);
any other field is refused rather than ignored. Every rendered object whose kind the local
1.20 API server serves is sent to it as a server-side apply with dryRun=All (so admission and
validation run, nothing is stored); the Istio objects, whose CRDs it does not have, are
validated against k8s/manifests/schemas/istio.json.
"""

from __future__ import annotations

import copy
import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator, ValidationError
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ResourceNotFoundError

from clover.cli import _parser
from clover.config import load_settings
from clover.stack import Stack

MANIFESTS = Path(__file__).resolve().parents[1] / "k8s" / "manifests"
TARGETS = ["base", "overlays/dev", "overlays/production"]
SCHEMAS = json.loads((MANIFESTS / "schemas" / "istio.json").read_text())

# -- a small kustomize ------------------------------------------------------------------------

_FIELDS = {"apiVersion", "kind", "resources", "patches", "images", "configMapGenerator"}
# Strategic-merge keys of the lists the patches touch (Kubernetes' patchMergeKey).
_MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name",
               "volumes": "name", "volumeMounts": "mountPath", "ports": "containerPort"}
_GENERATED = "__generated_name__"


def render(directory: Path) -> list[dict[str, Any]]:
    """`kustomize build directory`, for the fields above."""
    objects = _build(directory)
    names = {}
    for obj in objects:
        if obj.pop(_GENERATED, False):
            original = obj["metadata"]["name"]
            obj["metadata"]["name"] = f"{original}-{configmap_hash(original, obj['data'])}"
            names[(obj["metadata"].get("namespace"), original)] = obj["metadata"]["name"]
    for obj in objects:
        spec = _pod_spec(obj)
        if spec is not None:
            _rename_config_refs(spec, obj["metadata"].get("namespace"), names)
    return objects


def _build(directory: Path) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - _FIELDS
    assert not unknown, f"{directory}: this renderer does not implement {sorted(unknown)}"
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        assert path.is_relative_to(MANIFESTS), f"{entry} is outside k8s/manifests"
        if path.is_dir():
            objects += _build(path)
        else:
            assert path.is_relative_to(directory), f"{entry}: kustomize loads no file above it"
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for generator in kustomization.get("configMapGenerator", []):
        _generate(directory, generator, objects)
    for patch in kustomization.get("patches", []):
        assert set(patch) == {"path"}, f"only file patches are implemented: {patch}"
        (body,) = [d for d in yaml.safe_load_all((directory / patch["path"]).read_text()) if d]
        target = _find(objects, body["kind"], body["metadata"]["name"],
                       body["metadata"].get("namespace"))
        assert target is not None, f"{patch['path']}: no {body['kind']} {body['metadata']['name']}"
        _merge(target, body)
    for image in kustomization.get("images", []):
        for obj in objects:
            spec = _pod_spec(obj)
            for container in (spec or {}).get("containers", []) + (spec or {}).get(
                    "initContainers", []):
                _set_image(container, image)
    return objects


def _generate(directory: Path, generator: dict[str, Any], objects: list[dict[str, Any]]) -> None:
    data = {}
    for entry in generator.get("files", []):
        key, _, file = entry.rpartition("=")
        data[key or Path(file).name] = (directory / file).read_text()
    for literal in generator.get("literals", []):
        key, _, value = literal.partition("=")
        data[key] = value
    name, namespace = generator["name"], generator.get("namespace")
    existing = _find(objects, "ConfigMap", name, namespace)
    behavior = generator.get("behavior", "create")
    if behavior == "create":
        assert existing is None, f"ConfigMap {name} exists: use behavior merge or replace"
        metadata = {"name": name, **({"namespace": namespace} if namespace else {})}
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata,
                        "data": data, _GENERATED: True})
    else:
        assert existing is not None, f"no ConfigMap {name} to {behavior}"
        existing["data"] = data if behavior == "replace" else {**existing["data"], **data}


def configmap_hash(name: str, data: dict[str, str]) -> str:
    """kustomize's (and kubectl's) ConfigMap name suffix: sha256 of the JSON of kind, name and
    data, its first 10 hex digits with 0, 1, 3, a, e swapped for letters."""
    encoded = json.dumps({"data": data, "kind": "ConfigMap", "name": name}, sort_keys=True,
                         separators=(",", ":"), ensure_ascii=False)
    encoded = encoded.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))


def _find(objects: list[dict[str, Any]], kind: str, name: str,
          namespace: str | None) -> dict[str, Any] | None:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name
             and o["metadata"].get("namespace") == namespace]
    assert len(found) <= 1, f"{kind} {namespace}/{name} is defined twice"
    return found[0] if found else None


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        elif isinstance(value, list) and key in _MERGE_KEYS and isinstance(target.get(key), list):
            merge_key = _MERGE_KEYS[key]
            for item in value:
                match = next((t for t in target[key] if t.get(merge_key) == item[merge_key]),
                             None)
                if match is None:
                    target[key].append(copy.deepcopy(item))
                else:
                    _merge(match, item)
        else:
            target[key] = copy.deepcopy(value)


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] in ("Deployment", "DaemonSet", "StatefulSet", "Job"):
        return obj["spec"]["template"]["spec"]
    return None


def _set_image(container: dict[str, Any], image: dict[str, str]) -> None:
    name = container["image"].split("@")[0]
    tagless = name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name
    if tagless != image["name"]:
        return
    new = image.get("newName", tagless)
    if "digest" in image:
        container["image"] = f"{new}@{image['digest']}"
    elif "newTag" in image:
        container["image"] = f"{new}:{image['newTag']}"
    else:
        container["image"] = new + container["image"][len(tagless):]


def _rename_config_refs(spec: dict[str, Any], namespace: str | None,
                        names: dict[tuple[str | None, str], str]) -> None:
    def rename(holder: dict[str, Any] | None) -> None:
        if holder and (namespace, holder.get("name")) in names:
            holder["name"] = names[(namespace, holder["name"])]

    for volume in spec.get("volumes", []):
        rename(volume.get("configMap"))
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        for source in container.get("envFrom", []):
            rename(source.get("configMapRef"))
        for env in container.get("env", []):
            rename(env.get("valueFrom", {}).get("configMapKeyRef"))


# -- rendering --------------------------------------------------------------------------------

def _by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _container(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return _by_kind(objects, kind)[name]["spec"]["template"]["spec"]["containers"][0]


def test_configmap_hash_is_kubectls() -> None:
    # Test vectors of kubectl's hash_test.go (the same function kustomize uses).
    assert configmap_hash("", {}) == "42745tchd9"
    assert configmap_hash("", {"one": ""}) == "9g67k2htb6"
    assert configmap_hash("", {"two": "2", "one": "", "three": "3"}) == "f5h7t85m9b"


@pytest.mark.parametrize("target", TARGETS)
def test_renders_every_component(target: str) -> None:
    objects = render(MANIFESTS / target)
    ids = [(o["apiVersion"], o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])
           for o in objects]
    assert len(ids) == len(set(ids))
    assert _by_kind(objects, "DaemonSet").keys() == {"clover-collector"}
    assert _by_kind(objects, "Deployment").keys() == {
        "clover-adapter", "clover-stream-worker", "clover-scoring-agent",
        "clover-rollback-agent"}
    commands = {name: obj["spec"]["template"]["spec"]["containers"][0]["command"]
                for kind in ("DaemonSet", "Deployment")
                for name, obj in _by_kind(objects, kind).items()}
    assert sorted(commands.values()) == sorted([
        ["clover", "collect", "flows"], ["clover", "receive", "spans"],
        ["clover", "stream", "worker"], ["clover", "models", "agent"],
        ["clover", "rollback", "agent"]])
    # Each is a command the `clover` CLI knows (argparse exits on an unknown one).
    for command in commands.values():
        assert callable(_parser().parse_args(command[1:]).run)
    # The settings: one generated ConfigMap, with the content hash in its name, mounted by
    # every component, and accepted by clover/config.py.
    (configmap,) = _by_kind(objects, "ConfigMap").values()
    name = configmap["metadata"]["name"]
    assert name == f"clover-config-{configmap_hash('clover-config', configmap['data'])}"
    for kind in ("DaemonSet", "Deployment"):
        for obj in _by_kind(objects, kind).values():
            spec = obj["spec"]["template"]["spec"]
            assert {"name": "config", "configMap": {"name": name}} in spec["volumes"]
            env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
            assert env["CLOVER_CONFIG"] == "/etc/clover/clover.toml"


@pytest.mark.parametrize("target", TARGETS)
def test_settings_are_valid_and_address_kafka_and_cassandra_by_configuration(
        target: str, tmp_path: Path) -> None:
    (configmap,) = _by_kind(render(MANIFESTS / target), "ConfigMap").values()
    path = tmp_path / "clover.toml"
    path.write_text(configmap["data"]["clover.toml"])
    settings = load_settings(path, environ={})
    assert settings.kafka.bootstrap_servers and settings.cassandra.contact_points
    assert settings.kubeconfig == settings.rollback_kubeconfig == "in-cluster"
    assert settings.collectors.attribution_namespaces == ("*",)


def test_overlays_change_what_they_say() -> None:
    base, dev, prod = (render(MANIFESTS / t) for t in TARGETS)
    assert _container(base, "Deployment", "clover-adapter")["image"] == "clover-pipeline"
    assert _container(dev, "Deployment", "clover-adapter")["image"] == "clover-pipeline:dev"
    assert {c["image"] for o in prod for c in (_pod_spec(o) or {}).get("containers", [])} == {
        "registry.example.com/clover/clover-pipeline:0.1.0"}
    replicas = {t: _by_kind(o, "Deployment")["clover-stream-worker"]["spec"]["replicas"]
                for t, o in zip(TARGETS, (base, dev, prod), strict=True)}
    # Up to one worker per partition of the input topics.
    assert replicas == {"base": 2, "overlays/dev": 1, "overlays/production": 6}
    dry_run = _container(dev, "Deployment", "clover-rollback-agent")["env"]
    assert {"name": "CLOVER_ROLLBACK_DRY_RUN", "value": "true"} in dry_run
    assert len(dry_run) == len(_container(base, "Deployment", "clover-rollback-agent")["env"]) + 1
    models = _by_kind(prod, "Deployment")["clover-scoring-agent"]["spec"]["template"]["spec"]
    assert {"name": "models", "persistentVolumeClaim": {
        "claimName": "clover-models", "readOnly": True}} in models["volumes"]
    assert _by_kind(dev, "ConfigMap") != _by_kind(base, "ConfigMap")


def test_collector_has_only_the_capabilities_it_needs() -> None:
    collector = _by_kind(render(MANIFESTS / "base"), "DaemonSet")["clover-collector"]
    spec = collector["spec"]["template"]["spec"]
    assert spec["hostPID"] is True and spec["hostNetwork"] is True
    security = spec["containers"][0]["securityContext"]
    assert security["privileged"] is False and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"],
                                        "add": ["BPF", "PERFMON", "NET_ADMIN", "SYS_RESOURCE"]}
    mounts = {m["mountPath"]: m.get("readOnly") for m in spec["containers"][0]["volumeMounts"]}
    assert mounts["/sys/kernel/btf"] is True and mounts["/sys/kernel/tracing"] is True


def test_adapter_service_is_where_the_mesh_sends_telemetry() -> None:
    objects = render(MANIFESTS / "base")
    service = _by_kind(objects, "Service")["clover-adapter"]
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports == {"grpc-mixer": 9091, "grpc-otlp": 4317, "http-zipkin": 9411}
    deployment = _by_kind(objects, "Deployment")["clover-adapter"]
    container_ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0][
        "ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    settings = load_settings(environ={})
    assert (settings.receivers.mixer_port, settings.receivers.otlp_port,
            settings.receivers.zipkin_port) == (9091, 4317, 9411)
    handler = _by_kind(objects, "handler")["clover"]
    assert handler["spec"]["connection"]["address"] == (
        f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc:9091")
    mesh = yaml.safe_load((MANIFESTS / "istio-mesh-config.yaml").read_text())
    providers = {p["name"]: p for p in mesh["spec"]["meshConfig"]["extensionProviders"]}
    telemetry = _by_kind(objects, "Telemetry")["clover"]
    (used,) = telemetry["spec"]["tracing"][0]["providers"]
    assert providers[used["name"]]["opentelemetry"] == {
        "service": "clover-adapter.clover.svc.cluster.local", "port": 4317}
    assert providers["clover-zipkin"]["zipkin"]["port"] == 9411


def test_copies_match_the_files_the_stack_and_tests_use() -> None:
    objects = render(MANIFESTS / "base")

    def load(name: str) -> list[dict[str, Any]]:
        return [d for d in yaml.safe_load_all((MANIFESTS / name).read_text()) if d]

    rollback = [d for d in load("rollback-rbac.yaml") if d["kind"] != "Namespace"]
    for original in rollback:
        assert _find(objects, original["kind"], original["metadata"]["name"],
                     original["metadata"].get("namespace")) == original
    mixer = load("istio-mixer-adapter.yaml")
    assert [o for o in objects if o["apiVersion"] == "config.istio.io/v1alpha2"] == mixer
    (role,) = [d for d in rollback if d["kind"] == "Role"]
    shop = _find(render(MANIFESTS / "overlays/production"), "Role", "clover-rollback", "shop")
    assert shop is not None and shop["rules"] == role["rules"]


# -- the API server and the schemas -----------------------------------------------------------

def _schema_check(obj: dict[str, Any]) -> None:
    schema = SCHEMAS.get(f"{obj['apiVersion']}/{obj['kind']}")
    assert schema is not None, f"no schema for {obj['apiVersion']} {obj['kind']}"
    Draft202012Validator({**schema, "$defs": SCHEMAS["$defs"]}).validate(obj)


def test_istio_objects_match_their_schemas_and_a_typo_does_not() -> None:
    objects = render(MANIFESTS / "base")
    istio = [o for o in objects if o["apiVersion"].split("/")[0].endswith("istio.io")]
    assert sorted(o["kind"] for o in istio) == [
        "Telemetry", "adapter", "handler", "instance", "instance", "rule", "rule"]
    for obj in istio:
        _schema_check(obj)
    _schema_check(yaml.safe_load((MANIFESTS / "istio-mesh-config.yaml").read_text()))
    typo = copy.deepcopy(_by_kind(objects, "Telemetry")["clover"])
    typo["spec"]["tracing"][0]["randomSamplingPercent"] = 100
    with pytest.raises(ValidationError):
        _schema_check(typo)


@pytest.fixture(scope="module")
def api(live_stack: Stack) -> Iterator[client.ApiClient]:
    admin = config.new_client_from_config(
        config_file=str(live_stack.paths.kube / "admin.kubeconfig"))
    yield admin
    admin.close()


def _into(objects: list[dict[str, Any]], renamed: dict[str, str]) -> list[dict[str, Any]]:
    """The objects moved to the test's own namespaces (the only change)."""
    moved = copy.deepcopy(objects)
    for obj in moved:
        metadata = obj["metadata"]
        if obj["kind"] == "Namespace":
            metadata["name"] = renamed[metadata["name"]]
        if metadata.get("namespace") in renamed:
            metadata["namespace"] = renamed[metadata["namespace"]]
        for subject in obj.get("subjects", []):
            if subject.get("namespace") in renamed:
                subject["namespace"] = renamed[subject["namespace"]]
    return moved


def _dry_run(dynamic: DynamicClient, obj: dict[str, Any]) -> None:
    resource = dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    dynamic.server_side_apply(resource, body=obj, name=obj["metadata"]["name"],
                              namespace=obj["metadata"].get("namespace"),
                              field_manager="clover-manifest-test", dry_run="All")


@pytest.mark.parametrize("target", TARGETS)
def test_the_api_server_accepts_every_object_it_knows(target: str,
                                                       api: client.ApiClient) -> None:
    objects = render(MANIFESTS / target)
    suffix = uuid.uuid4().hex[:6]
    namespaces = {o["metadata"]["namespace"] for o in objects
                  if o["metadata"].get("namespace") not in (None, "istio-system")}
    renamed = {ns: f"{ns}-manifests-{suffix}" for ns in namespaces}
    core = client.CoreV1Api(api)
    for name in renamed.values():
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    dynamic = DynamicClient(api)
    checked: dict[str, list[str]] = {"dry-run": [], "schema": []}
    try:
        for obj in _into(objects, renamed):
            try:
                dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
            except ResourceNotFoundError:
                _schema_check(obj)  # an Istio CRD this API server does not have
                checked["schema"].append(obj["kind"])
                continue
            try:
                _dry_run(dynamic, obj)
            except ApiException as exc:
                pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {exc.status} {exc.body}")
            checked["dry-run"].append(obj["kind"])
        # Nothing was stored: the Deployments exist only in the dry run.
        apps = client.AppsV1Api(api)
        for name in renamed.values():
            assert apps.list_namespaced_deployment(name).items == []
        # And the dry run does refuse what is invalid.
        broken = copy.deepcopy(_by_kind(_into(objects, renamed), "DaemonSet")["clover-collector"])
        broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = 70000
        with pytest.raises(ApiException) as refused:
            _dry_run(dynamic, broken)
        body = refused.value.body
        assert refused.value.status == 422 and body is not None and "containerPort" in body
    finally:
        for name in renamed.values():
            core.delete_namespace(name)
    assert {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
            "RoleBinding", "DaemonSet", "Deployment", "Service",
            "ConfigMap"} <= set(checked["dry-run"])
    assert sorted(set(checked["schema"])) == ["Telemetry", "adapter", "handler", "instance",
                                              "rule"]
    assert len(checked["dry-run"]) + len(checked["schema"]) == len(objects)
