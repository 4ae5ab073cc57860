"""When to roll a Deployment back: the rollback agent's policy, pure and unit-testable.

Conservative and explainable: every anomaly verdict that needs a decision gets one, with a
machine-readable reason and the numbers behind it. The checks, in order:

before looking at the cluster (:func:`screen`)
  namespace_not_allowed  skip        the namespace is not in [rollback] allowed_namespaces
  inconclusive           skip        "no data" is not evidence of a bad rollout
  too_few_windows        skip        fewer than N consecutive anomalous windows of this revision
  unknown_revision       alert_only  the anomaly is not attributed to a revision
after reading the Deployment (:func:`judge`)
  no_deployment          skip        no Deployment of that name
  cooldown               skip        Clover acted on this Deployment less than cooldown_s ago
  not_settled            skip        the Deployment controller has not caught up with its spec
  not_current_revision   skip        the anomalous revision is no longer the current one
  no_previous_revision   alert_only  nothing to roll back to
  no_recent_rollout      alert_only  the revision changed (or was promoted) outside the window
  anomalous_after_rollout rollback, or dry_run in dry-run mode

A "normal" verdict needs no decision; it only ends a streak.
"""

from __future__ import annotations

from dataclasses import dataclass

from clover.config import RollbackSettings
from clover.records import Anomaly, RollbackDecision
from k8s.rollback import Rollout

# Decisions that count as "acted" for the cooldown.
ACTED = ("rollback", "dry_run")
# Keep at most this many streaks; the oldest half goes when it is reached.
MAX_STREAKS = 10_000


@dataclass
class _Streak:
    count: int
    last_window_us: int


class Streaks:
    """Consecutive anomalous windows per (namespace, service, revision).

    Revisions are counted apart because during a rollout the old and the new one are scored
    side by side. A window is counted once (a replayed or duplicated verdict does not lengthen
    the streak); "normal" ends the streak; "inconclusive" leaves it as it is.
    """

    def __init__(self) -> None:
        self._streaks: dict[tuple[str, str, str], _Streak] = {}

    def update(self, anomaly: Anomaly) -> int:
        key = (anomaly.namespace, anomaly.service, anomaly.revision)
        streak = self._streaks.get(key)
        if streak is None:
            if len(self._streaks) >= MAX_STREAKS:
                oldest = sorted(self._streaks, key=lambda k: self._streaks[k].last_window_us)
                for stale in oldest[: MAX_STREAKS // 2]:
                    del self._streaks[stale]
            streak = self._streaks[key] = _Streak(0, -1)
        if anomaly.verdict == "inconclusive" or anomaly.window_start_us <= streak.last_window_us:
            return streak.count
        streak.last_window_us = anomaly.window_start_us
        streak.count = streak.count + 1 if anomaly.verdict == "anomalous" else 0
        return streak.count


def _decision(anomaly: Anomaly, streak: int, dry_run: bool, now_us: int, action: str,
              reason: str, message: str, rollout: Rollout | None = None) -> RollbackDecision:
    current = rollout.current if rollout is not None else None
    previous = rollout.previous if rollout is not None else None
    anomalous = rollout.revision_of(anomaly.revision) if rollout is not None else None
    # From: the revision the anomaly is about, else the current one.
    source = anomalous or current
    return RollbackDecision(
        namespace=anomaly.namespace, service=anomaly.service,
        deployment=rollout.deployment if rollout is not None else None,
        decided_us=now_us, action=action,  # type: ignore[arg-type]
        reason=reason, message=message, consecutive_anomalous=streak, dry_run=dry_run,
        from_revision=source.number if source is not None else None,
        to_revision=previous.number if previous is not None else None,
        score=anomaly.score, threshold=anomaly.threshold,
        anomaly_window_start_us=anomaly.window_start_us,
    )


def _allowed(namespace: str, allowed: tuple[str, ...]) -> bool:
    return "*" in allowed or namespace in allowed


def screen(anomaly: Anomaly, streak: int, config: RollbackSettings,
           allowed_namespaces: tuple[str, ...], now_us: int) -> RollbackDecision | None:
    """The decision that needs no API call, or None when the Deployment must be looked at.

    Returns None for a "normal" verdict as well: the caller tells the two apart by the verdict.
    """
    def decide(action: str, reason: str, message: str) -> RollbackDecision:
        return _decision(anomaly, streak, config.dry_run, now_us, action, reason, message)

    what = f"{anomaly.namespace}/{anomaly.service} revision {anomaly.revision}"
    if not _allowed(anomaly.namespace, allowed_namespaces):
        return decide("skip", "namespace_not_allowed",
                      f"{what}: namespace {anomaly.namespace} is not in [rollback] "
                      f"allowed_namespaces ({', '.join(allowed_namespaces)})")
    if anomaly.verdict == "normal":
        return None
    if anomaly.verdict == "inconclusive":
        return decide("skip", "inconclusive",
                      f"{what}: the detector's verdict is inconclusive "
                      f"({anomaly.reason or 'no reason given'}); that never triggers a rollback")
    needed = config.consecutive_windows
    if streak < needed:
        return decide("skip", "too_few_windows",
                      f"{what}: {streak} of {needed} consecutive anomalous windows "
                      f"(score {anomaly.score} >= threshold {anomaly.threshold})")
    if anomaly.revision == "unknown":
        return decide("alert_only", "unknown_revision",
                      f"{what}: {streak} consecutive anomalous windows, but the anomaly is not "
                      "attributed to a revision, so no rollout can be blamed")
    return None


def judge(anomaly: Anomaly, streak: int, rollout: Rollout | None, config: RollbackSettings,
          now_us: int, last_action_us: int | None = None) -> RollbackDecision:
    """The decision for an anomaly that passed :func:`screen`, given its Deployment.

    ``last_action_us`` is when this agent last acted on the Deployment (rollback or dry run);
    the Deployment's own clover.dev/rolled-back-at annotation counts too.
    """
    def decide(action: str, reason: str, message: str) -> RollbackDecision:
        return _decision(anomaly, streak, config.dry_run, now_us, action, reason, message,
                         rollout)

    what = f"{anomaly.namespace}/{anomaly.service}"
    if rollout is None:
        return decide("skip", "no_deployment",
                      f"{what}: no Deployment named {anomaly.service} in namespace "
                      f"{anomaly.namespace}")
    acted = max((t for t in (last_action_us, rollout.last_rollback_us) if t is not None),
                default=None)
    if acted is not None and config.cooldown_s and now_us - acted < config.cooldown_s * 1e6:
        return decide("skip", "cooldown",
                      f"{what}: Clover acted on this Deployment {(now_us - acted) / 1e6:.1f}s "
                      f"ago, inside the {config.cooldown_s}s cooldown")
    if not rollout.settled:
        return decide("skip", "not_settled",
                      f"{what}: the Deployment controller has not yet caught up with generation "
                      f"{rollout.generation}, so its current revision is not known")
    current = rollout.current
    anomalous = rollout.revision_of(anomaly.revision)
    if current is None or anomalous is None or anomalous.number != current.number:
        seen = f"revision {anomalous.number}" if anomalous else "a revision it no longer keeps"
        now = f"revision {current.number} ({current.template_hash})" if current else "unknown"
        return decide("skip", "not_current_revision",
                      f"{what}: the anomalous pod template {anomaly.revision} is {seen}; the "
                      f"Deployment's current revision is {now}")
    previous = rollout.previous
    if previous is None:
        return decide("alert_only", "no_previous_revision",
                      f"{what}: {streak} consecutive anomalous windows of revision "
                      f"{current.number}, but there is no previous revision to roll back to")
    changed_ago = (now_us - rollout.changed_us) / 1e6 if rollout.changed_us else None
    promoted_ago = (now_us - rollout.promoted_us) / 1e6 if rollout.promoted_us else None
    recent = changed_ago is not None and changed_ago <= config.watch_window_s
    promoted = (promoted_ago is not None and config.post_promotion_watch_s > 0
                and promoted_ago <= config.post_promotion_watch_s)
    timing = (f"revision {current.number} rolled out "
              + (f"{changed_ago:.0f}s ago" if changed_ago is not None else "at an unknown time")
              + (f", promoted {promoted_ago:.0f}s ago" if promoted_ago is not None else ""))
    if not (recent or promoted):
        return decide("alert_only", "no_recent_rollout",
                      f"{what}: {streak} consecutive anomalous windows, but {timing}: outside "
                      f"the {config.watch_window_s}s watch window and the "
                      f"{config.post_promotion_watch_s}s post-promotion watch")
    evidence = (f"{streak} consecutive anomalous windows (score {anomaly.score} >= threshold "
                f"{anomaly.threshold}, detector {anomaly.detector}); {timing}")
    if config.dry_run:
        return decide("dry_run", "anomalous_after_rollout",
                      f"{what}: would roll back from revision {current.number} to "
                      f"{previous.number} (dry run): {evidence}")
    return decide("rollback", "anomalous_after_rollout",
                  f"{what}: rolling back from revision {current.number} to {previous.number}: "
                  f"{evidence}")
