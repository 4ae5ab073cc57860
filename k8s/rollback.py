"""The rollback actuator: small, explicit Kubernetes API calls, nothing decided here.

It finds the Deployment behind an anomalous service (the anomaly names namespace, the workload
and the pod-template-hash), its ReplicaSets and their revisions, rolls it back the way
``kubectl rollout undo`` does (the pod template of the previous revision's ReplicaSet, minus
its pod-template-hash label), and posts Events on it. What to do is the policy's job
(streams/rollback_policy.py).

Usage::

    api = kubernetes.config.new_client_from_config(config_file=settings.rollback_kubeconfig)
    actuator = Actuator(api, retry_for_s=20)
    rollout = actuator.find("shop", "cart")                  # None: no such Deployment
    patched_us = actuator.roll_back(rollout)                 # DeploymentGone, ApiUnreachable, ...
    actuator.post_event(rollout.namespace, rollout.deployment, rollout.uid, "CloverRollback",
                        "Warning", "rolled back from revision 2 to 1: ...")

An unreachable API server (refused or dropped connections, timeouts, 429 and 5xx answers) is
retried with exponential backoff for ``retry_for_s`` seconds, then raised as
:class:`ApiUnreachable`. Other API errors (403, 404, ...) are raised at once.
"""

from __future__ import annotations

import logging
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import urllib3
from kubernetes import client
from kubernetes.client.rest import ApiException

from k8s.metadata import TEMPLATE_HASH_LABEL

log = logging.getLogger(__name__)

REVISION_ANNOTATION = "deployment.kubernetes.io/revision"
# Written by every rollback Clover applies, so that a cooldown survives an agent restart and is
# shared by several agents.
ROLLED_BACK_AT_ANNOTATION = "clover.dev/rolled-back-at"
ROLLED_BACK_FROM_ANNOTATION = "clover.dev/rolled-back-from-revision"
EVENT_COMPONENT = "clover-rollback"
# Requests give up after this long; the retry loop around them decides whether to try again.
REQUEST_TIMEOUT = (3.0, 10.0)
# The Deployment controller records a spec change (observedGeneration) within ~0.1 s.
SETTLE_S = 2.0
# Progressing-condition reasons of the Deployment controller that name the ReplicaSet rolling out.
_IN_PROGRESS = ("NewReplicaSetCreated", "FoundNewReplicaSet", "ReplicaSetUpdated")
_COMPLETE = "NewReplicaSetAvailable"

T = TypeVar("T")


class ApiUnreachable(ConnectionError):
    """The API server did not answer (or only with 429/5xx) for the whole retry budget."""


class DeploymentGone(RuntimeError):
    """The Deployment was deleted, or deleted and recreated, while Clover was deciding."""


class DeploymentChanged(RuntimeError):
    """The Deployment's spec changed between reading it and patching it (someone else acted)."""


@dataclass(frozen=True)
class Revision:
    """One ReplicaSet of a Deployment: one revision of its pod template."""

    number: int
    replica_set: str
    template_hash: str | None
    created_us: int
    template: dict[str, Any]  # the pod template as the API serves it (camelCase keys)


@dataclass(frozen=True)
class Rollout:
    """A Deployment and its revisions, as read from the API server: all the policy needs."""

    namespace: str
    deployment: str
    uid: str
    generation: int
    # The controller has seen the latest spec: revision annotations are up to date.
    settled: bool
    current: Revision | None
    # Every revision still kept (revisionHistoryLimit), newest first.
    revisions: tuple[Revision, ...]
    # When the current revision's rollout was last seen under way: the ReplicaSet's creation, or
    # later progress the Deployment controller recorded for it (e.g. an older ReplicaSet scaled
    # back up by a rollback).
    changed_us: int | None
    # When the current revision's rollout completed (all replicas updated and available).
    promoted_us: int | None
    # When Clover last rolled this Deployment back (its annotation), if ever.
    last_rollback_us: int | None

    @property
    def previous(self) -> Revision | None:
        """The newest revision older than the current one: what ``rollout undo`` goes back to."""
        if self.current is None:
            return None
        older = [r for r in self.revisions if r.number < self.current.number]
        return older[0] if older else None

    def revision_of(self, template_hash: str) -> Revision | None:
        return next((r for r in self.revisions if r.template_hash == template_hash), None)


def _us(when: datetime | None) -> int | None:
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return round(when.timestamp() * 1e6)


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _selector(selector: client.V1LabelSelector | None) -> str:
    """A label selector as the list call's query string (matchLabels and matchExpressions)."""
    if selector is None:
        return ""
    parts = [f"{k}={v}" for k, v in sorted((selector.match_labels or {}).items())]
    for expr in selector.match_expressions or []:
        values = ",".join(expr.values or [])
        if expr.operator == "In":
            parts.append(f"{expr.key} in ({values})")
        elif expr.operator == "NotIn":
            parts.append(f"{expr.key} notin ({values})")
        elif expr.operator == "Exists":
            parts.append(expr.key)
        elif expr.operator == "DoesNotExist":
            parts.append(f"!{expr.key}")
    return ",".join(parts)


def _unreachable(exc: Exception) -> bool:
    """Errors worth retrying: no answer, or an answer that says "later"."""
    if isinstance(exc, ApiException):
        return exc.status in (0, 429) or exc.status >= 500
    return isinstance(exc, urllib3.exceptions.HTTPError | OSError | socket.timeout)


class Actuator:
    """Reads Deployments and ReplicaSets, patches Deployments, creates Events: nothing else.

    The identity behind ``api`` needs exactly k8s/manifests/rollback-rbac.yaml's Role.
    """

    def __init__(self, api: client.ApiClient, *, retry_for_s: float = 20.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._api = api
        self._apps = client.AppsV1Api(api)
        self._core = client.CoreV1Api(api)
        self.retry_for_s = retry_for_s
        self._clock = clock
        self.instance = socket.gethostname()

    # ---------------------------------------------------------------- reads

    def find(self, namespace: str, service: str, settle_s: float = SETTLE_S) -> Rollout | None:
        """The Deployment named ``service`` with its revisions; None when there is none.

        Waits up to ``settle_s`` for the Deployment controller to catch up with the latest spec,
        so that the current revision is the one the spec asks for.
        """
        deadline = time.monotonic() + settle_s
        while True:
            try:
                deployment = self._retry(self._apps.read_namespaced_deployment, service,
                                         namespace)
            except ApiException as exc:
                if exc.status == 404:
                    return None
                raise
            meta = deployment.metadata or client.V1ObjectMeta()
            status = deployment.status
            settled = (status is not None and status.observed_generation is not None
                       and status.observed_generation >= (meta.generation or 0))
            if settled or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        sets = self._retry(self._apps.list_namespaced_replica_set, namespace,
                           label_selector=_selector(deployment.spec.selector))
        # Ownership, not labels alone, says which ReplicaSets are this Deployment's revisions.
        owned = [rs for rs in sets.items
                 if any(ref.controller and ref.uid == meta.uid
                        for ref in (rs.metadata or client.V1ObjectMeta()).owner_references or [])]
        revisions = sorted((r for r in map(self._revision, owned) if r is not None),
                           key=lambda r: r.number, reverse=True)
        current_number = _int((meta.annotations or {}).get(REVISION_ANNOTATION))
        current = next((r for r in revisions if r.number == current_number), None)
        changed_us, promoted_us = self._rollout_times(deployment, current)
        return Rollout(
            namespace=namespace, deployment=meta.name or service, uid=meta.uid or "",
            generation=meta.generation or 0, settled=settled, current=current,
            revisions=tuple(revisions), changed_us=changed_us, promoted_us=promoted_us,
            last_rollback_us=_int((meta.annotations or {}).get(ROLLED_BACK_AT_ANNOTATION)),
        )

    def _revision(self, rs: client.V1ReplicaSet) -> Revision | None:
        meta = rs.metadata or client.V1ObjectMeta()
        number = _int((meta.annotations or {}).get(REVISION_ANNOTATION))
        if number is None or rs.spec.template is None:
            return None
        template = self._api.sanitize_for_serialization(rs.spec.template)
        return Revision(number=number, replica_set=meta.name or "",
                        template_hash=(meta.labels or {}).get(TEMPLATE_HASH_LABEL),
                        created_us=_us(meta.creation_timestamp) or 0, template=template)

    @staticmethod
    def _rollout_times(deployment: client.V1Deployment,
                       current: Revision | None) -> tuple[int | None, int | None]:
        if current is None:
            return None, None
        changed, promoted = current.created_us, None
        for cond in (deployment.status.conditions or []) if deployment.status else []:
            # The controller's messages name the ReplicaSet: 'ReplicaSet "cart-5d9c" is ...'.
            if cond.type != "Progressing" or f'"{current.replica_set}"' not in (cond.message
                                                                                  or ""):
                continue
            when = _us(cond.last_update_time)
            if when is None:
                continue
            if cond.reason == _COMPLETE:
                promoted = when
            elif cond.reason in _IN_PROGRESS:
                changed = max(changed, when)
        return changed, promoted

    # ---------------------------------------------------------------- writes

    def roll_back(self, rollout: Rollout, to: Revision | None = None) -> int:
        """Patch the Deployment's pod template to ``to`` (default: the previous revision).

        A JSON patch that first tests the Deployment's uid and generation, so it applies only to
        the Deployment as it was read. Returns when the patch was applied (µs since the epoch).
        Raises DeploymentGone (deleted or recreated), DeploymentChanged (its spec moved on),
        ApiUnreachable, or ApiException.
        """
        target = to or rollout.previous
        if target is None or rollout.current is None:
            raise ValueError(f"{rollout.namespace}/{rollout.deployment} has no revision to roll "
                             "back to")
        template = {**target.template}
        labels = dict(template.get("metadata", {}).get("labels") or {})
        labels.pop(TEMPLATE_HASH_LABEL, None)  # the controller adds the hash of the new template
        template["metadata"] = {**template.get("metadata", {}), "labels": labels}
        now_us = round(self._clock() * 1e6)
        patch = [
            {"op": "test", "path": "/metadata/uid", "value": rollout.uid},
            {"op": "test", "path": "/metadata/generation", "value": rollout.generation},
            {"op": "replace", "path": "/spec/template", "value": template},
            {"op": "add", "path": "/metadata/annotations/clover.dev~1rolled-back-at",
             "value": str(now_us)},
            {"op": "add", "path": "/metadata/annotations/clover.dev~1rolled-back-from-revision",
             "value": str(rollout.current.number)},
        ]
        try:
            self._retry(self._apps.patch_namespaced_deployment, rollout.deployment,
                        rollout.namespace, patch)
        except ApiException as exc:
            if exc.status == 422:  # a failed test says only "Invalid": look at what changed
                self._why_rejected(rollout)
            if exc.status == 404:
                raise DeploymentGone(f"Deployment {rollout.namespace}/{rollout.deployment} was "
                                     "deleted before the rollback patch") from None
            raise
        return round(self._clock() * 1e6)

    def _why_rejected(self, rollout: Rollout) -> None:
        """Raise DeploymentGone or DeploymentChanged when that is why the patch's tests failed."""
        where = f"Deployment {rollout.namespace}/{rollout.deployment}"
        try:
            now = self._retry(self._apps.read_namespaced_deployment, rollout.deployment,
                              rollout.namespace)
        except ApiException as exc:
            if exc.status == 404:
                raise DeploymentGone(f"{where} was deleted before the rollback patch") from None
            raise
        meta = now.metadata or client.V1ObjectMeta()
        if meta.uid != rollout.uid:
            raise DeploymentGone(f"{where} was deleted and recreated before the rollback patch")
        if meta.generation != rollout.generation:
            raise DeploymentChanged(f"{where} changed (generation {rollout.generation} -> "
                                    f"{meta.generation}) before the rollback patch")

    def post_event(self, namespace: str, deployment: str, uid: str | None, reason: str,
                   kind: str, message: str) -> None:
        """Create an Event on the Deployment (``kind`` is "Normal" or "Warning")."""
        now = datetime.fromtimestamp(self._clock(), UTC)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{deployment}.", namespace=namespace),
            involved_object=client.V1ObjectReference(
                api_version="apps/v1", kind="Deployment", name=deployment, namespace=namespace,
                uid=uid),
            reason=reason, type=kind, message=message[:1024],
            source=client.V1EventSource(component=EVENT_COMPONENT),
            reporting_component=EVENT_COMPONENT, reporting_instance=self.instance,
            first_timestamp=now, last_timestamp=now, count=1,
        )
        self._retry(self._core.create_namespaced_event, namespace, event)

    # ---------------------------------------------------------------- retries

    def _retry(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        deadline = time.monotonic() + self.retry_for_s
        delay = 0.2
        while True:
            try:
                return call(*args, _request_timeout=REQUEST_TIMEOUT, **kwargs)
            except Exception as exc:
                if not _unreachable(exc):
                    raise
                if time.monotonic() + delay > deadline:
                    raise ApiUnreachable(
                        f"the Kubernetes API server at {self._api.configuration.host} did not "
                        f"answer for {self.retry_for_s:.0f}s ({type(exc).__name__}: "
                        f"{str(exc)[:200]})") from None
                log.warning("Kubernetes API unreachable (%s); retrying in %.1fs",
                            type(exc).__name__, delay)
                time.sleep(delay * random.uniform(0.8, 1.0))
                delay = min(delay * 2, 5.0)
