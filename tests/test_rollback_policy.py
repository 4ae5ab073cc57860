"""The rollback policy on its own: pure functions over records, no servers needed."""

from __future__ import annotations

import dataclasses

from clover.config import RollbackSettings
from clover.records import Anomaly, Verdict, encode
from k8s.rollback import Revision, Rollout
from streams.rollback_policy import Streaks, judge, screen

NOW = 1_800_000_000_000_000
S = 1_000_000
CONFIG = RollbackSettings(watch_window_s=600, post_promotion_watch_s=300, consecutive_windows=3,
                          cooldown_s=900)
ALLOWED = ("shop",)


def anomaly(verdict: Verdict = "anomalous", window: int = 0, revision: str = "bbb",
            namespace: str = "shop") -> Anomaly:
    return Anomaly(namespace=namespace, service="cart", revision=revision,
                   window_start_us=NOW - 600 * S + window * 10 * S, window_seconds=10,
                   detector="iforest@1", threshold=0.8,
                   score=None if verdict == "inconclusive" else 0.95, verdict=verdict,
                   emitted_us=NOW)


def revision(number: int, template_hash: str, created_ago_s: float) -> Revision:
    return Revision(number=number, replica_set=f"cart-{template_hash}",
                    template_hash=template_hash, created_us=NOW - round(created_ago_s * S),
                    template={"metadata": {"labels": {"app": "cart"}}})


def rollout(*revisions: Revision, current: int = 2, changed_ago_s: float = 60,
            promoted_ago_s: float | None = None, last_rollback_ago_s: float | None = None,
            settled: bool = True) -> Rollout:
    by_number = sorted(revisions, key=lambda r: r.number, reverse=True)
    return Rollout(
        namespace="shop", deployment="cart", uid="u-1", generation=2, settled=settled,
        current=next((r for r in by_number if r.number == current), None),
        revisions=tuple(by_number), changed_us=NOW - round(changed_ago_s * S),
        promoted_us=None if promoted_ago_s is None else NOW - round(promoted_ago_s * S),
        last_rollback_us=(None if last_rollback_ago_s is None
                          else NOW - round(last_rollback_ago_s * S)))


TWO = (revision(1, "aaa", 3600), revision(2, "bbb", 60))


def test_streaks_count_consecutive_anomalous_windows_per_revision() -> None:
    streaks = Streaks()
    assert [streaks.update(anomaly(window=w)) for w in range(3)] == [1, 2, 3]
    # Another revision scored side by side has its own streak.
    assert streaks.update(anomaly(window=3, revision="aaa", verdict="normal")) == 0
    # Inconclusive leaves the streak as it is; normal ends it.
    assert streaks.update(anomaly(window=3, verdict="inconclusive")) == 3
    assert streaks.update(anomaly(window=4, verdict="normal")) == 0
    assert streaks.update(anomaly(window=5)) == 1


def test_a_window_counts_once_even_when_its_verdict_arrives_twice() -> None:
    streaks = Streaks()
    assert streaks.update(anomaly(window=0)) == 1
    assert streaks.update(anomaly(window=0)) == 1  # duplicate delivery
    assert streaks.update(anomaly(window=1)) == 2


def test_screen_namespace_inconclusive_and_too_few_windows() -> None:
    outside = screen(anomaly(namespace="other"), 5, CONFIG, ALLOWED, NOW)
    assert outside is not None and (outside.action, outside.reason) == (
        "skip", "namespace_not_allowed")
    assert screen(anomaly(namespace="other"), 5, CONFIG, ("*",), NOW) is None
    inconclusive = screen(anomaly(verdict="inconclusive"), 10, CONFIG, ALLOWED, NOW)
    assert inconclusive is not None and (inconclusive.action, inconclusive.reason) == (
        "skip", "inconclusive")
    few = screen(anomaly(), 2, CONFIG, ALLOWED, NOW)
    assert few is not None and (few.action, few.reason, few.consecutive_anomalous) == (
        "skip", "too_few_windows", 2)
    assert "2 of 3" in few.message
    unknown = screen(anomaly(revision="unknown"), 3, CONFIG, ALLOWED, NOW)
    assert unknown is not None and (unknown.action, unknown.reason) == (
        "alert_only", "unknown_revision")
    # Enough evidence, or a normal verdict: the cluster decides.
    assert screen(anomaly(), 3, CONFIG, ALLOWED, NOW) is None
    assert screen(anomaly(verdict="normal"), 0, CONFIG, ALLOWED, NOW) is None


def test_judge_rolls_back_a_recent_rollout_to_the_previous_revision() -> None:
    decision = judge(anomaly(), 3, rollout(*TWO), CONFIG, NOW)
    assert (decision.action, decision.reason) == ("rollback", "anomalous_after_rollout")
    assert (decision.from_revision, decision.to_revision) == (2, 1)
    assert (decision.score, decision.threshold, decision.deployment) == (0.95, 0.8, "cart")
    assert not decision.dry_run and decision.patched_us is None
    encode(decision)  # a valid record


def test_judge_in_dry_run_mode_decides_without_acting() -> None:
    decision = judge(anomaly(), 3, rollout(*TWO), dataclasses.replace(CONFIG, dry_run=True), NOW)
    assert (decision.action, decision.dry_run) == ("dry_run", True)
    encode(decision)


def test_judge_alerts_only_without_a_recent_rollout_or_previous_revision() -> None:
    old = judge(anomaly(), 3, rollout(*TWO, changed_ago_s=601), CONFIG, NOW)
    assert (old.action, old.reason) == ("alert_only", "no_recent_rollout")
    # The post-promotion watch covers a rollout that completed recently...
    promoted = judge(anomaly(), 3, rollout(*TWO, changed_ago_s=900, promoted_ago_s=200),
                     CONFIG, NOW)
    assert promoted.action == "rollback"
    # ...but not when it is turned off.
    off = judge(anomaly(), 3, rollout(*TWO, changed_ago_s=900, promoted_ago_s=200),
                dataclasses.replace(CONFIG, post_promotion_watch_s=0), NOW)
    assert off.reason == "no_recent_rollout"
    first = judge(anomaly(revision="aaa"), 3, rollout(TWO[0], current=1), CONFIG, NOW)
    assert (first.action, first.reason) == ("alert_only", "no_previous_revision")


def test_judge_skips_in_cooldown_from_memory_or_from_the_deployment_annotation() -> None:
    remembered = judge(anomaly(), 3, rollout(*TWO), CONFIG, NOW, last_action_us=NOW - 100 * S)
    assert (remembered.action, remembered.reason) == ("skip", "cooldown")
    annotated = judge(anomaly(), 3, rollout(*TWO, last_rollback_ago_s=899), CONFIG, NOW)
    assert annotated.reason == "cooldown"
    expired = judge(anomaly(), 3, rollout(*TWO, last_rollback_ago_s=901), CONFIG, NOW)
    assert expired.action == "rollback"
    no_cooldown = judge(anomaly(), 3, rollout(*TWO), dataclasses.replace(CONFIG, cooldown_s=0),
                        NOW, last_action_us=NOW - S)
    assert no_cooldown.action == "rollback"


def test_judge_skips_an_anomaly_of_a_revision_that_is_no_longer_current() -> None:
    # After a rollback the old template is back as revision 3; late verdicts about "bbb" must
    # not roll back again.
    back = (revision(2, "bbb", 60), revision(3, "aaa", 3600))
    decision = judge(anomaly(revision="bbb"), 5, rollout(*back, current=3), CONFIG, NOW)
    assert (decision.action, decision.reason) == ("skip", "not_current_revision")
    assert decision.from_revision == 2
    gone = judge(anomaly(revision="zzz"), 5, rollout(*TWO), CONFIG, NOW)
    assert gone.reason == "not_current_revision"


def test_judge_without_deployment_or_while_the_controller_catches_up() -> None:
    missing = judge(anomaly(), 3, None, CONFIG, NOW)
    assert (missing.action, missing.reason, missing.deployment) == (
        "skip", "no_deployment", None)
    unsettled = judge(anomaly(), 3, rollout(*TWO, settled=False), CONFIG, NOW)
    assert unsettled.reason == "not_settled"
