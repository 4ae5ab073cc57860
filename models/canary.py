"""Canary judge: is a new revision worse than the old one over the same windows?

Like Kayenta, per metric a Mann-Whitney U test between the two revisions' windows, with an
effect size so that a tiny but "significant" difference does not fail a release: the common
language effect size ``P(canary > baseline)`` (U / n1 n2), and the ratio of medians. A metric
fails only when the canary is worse in the direction that hurts (higher latency or error ratio;
for request rate, either way), the test is significant and the effect is at least
``min_effect``. Windows where either revision is missing are dropped so that both are compared
over the same time; with fewer than ``min_windows`` paired windows, or no finite values, the
metric (and the judgement) is ``inconclusive``: NaN never fails a release.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from scipy.stats import mannwhitneyu

from models.features import DIRECTION

Outcome = Literal["pass", "fail", "inconclusive"]
CANARY_METRICS: tuple[str, ...] = ("latency_p50_ms", "latency_p90_ms", "latency_p99_ms",
                                   "error_rate")


@dataclass
class MetricJudgement:
    metric: str
    outcome: Outcome
    reason: str
    windows: int
    p_value: float | None = None
    effect: float | None = None  # P(canary > baseline): 0.5 means no difference
    baseline_median: float | None = None
    canary_median: float | None = None


@dataclass
class CanaryJudgement:
    outcome: Outcome
    reason: str
    metrics: list[MetricJudgement] = field(default_factory=list)


def judge(metrics: pd.DataFrame, *, baseline: str, canary: str,
          features: Sequence[str] = CANARY_METRICS, alpha: float = 0.01,
          min_effect: float = 0.7, min_windows: int = 10) -> CanaryJudgement:
    """Compare revision ``canary`` with ``baseline`` in ``metrics`` (ServiceMetrics columns,
    one service; edge rows are ignored). ``fail`` if any metric fails, ``pass`` if every metric
    could be judged and none failed, ``inconclusive`` otherwise."""
    if "peer_service" in metrics.columns:
        metrics = metrics[metrics["peer_service"].isna()]
    old = metrics[metrics["revision"] == baseline].set_index("window_start_us")
    new = metrics[metrics["revision"] == canary].set_index("window_start_us")
    shared = old.index.intersection(new.index)
    judged = [_judge_metric(name, old.loc[shared, name] if name in old else pd.Series(dtype=float),
                            new.loc[shared, name] if name in new else pd.Series(dtype=float),
                            alpha, min_effect, min_windows) for name in features]
    failed = [j for j in judged if j.outcome == "fail"]
    if failed:
        return CanaryJudgement("fail", "; ".join(j.reason for j in failed), judged)
    unsure = [j for j in judged if j.outcome == "inconclusive"]
    if unsure:
        return CanaryJudgement("inconclusive", "; ".join(j.reason for j in unsure), judged)
    return CanaryJudgement("pass", f"{canary} is not worse than {baseline} on "
                           f"{', '.join(features)} over {len(shared)} shared windows", judged)


def _judge_metric(name: str, old: pd.Series, new: pd.Series, alpha: float, min_effect: float,
                  min_windows: int) -> MetricJudgement:
    pairs = pd.DataFrame({"old": old.to_numpy(dtype=float), "new": new.to_numpy(dtype=float)})
    pairs = pairs[np.isfinite(pairs["old"]) & np.isfinite(pairs["new"])]
    n = len(pairs)
    if n < min_windows:
        return MetricJudgement(name, "inconclusive", f"{name}: {n} windows with data for both "
                               f"revisions, fewer than the {min_windows} needed", n)
    result = mannwhitneyu(pairs["new"], pairs["old"], alternative="two-sided")
    effect = float(result.statistic) / (n * n)  # P(canary > baseline) + half the ties
    old_median, new_median = float(pairs["old"].median()), float(pairs["new"].median())
    judged = MetricJudgement(name, "pass", "", n, float(result.pvalue), round(effect, 4),
                             old_median, new_median)
    base_name = "error_ratio" if name == "error_rate" else name
    worse = effect if DIRECTION.get(base_name, 0) == 1 else max(effect, 1.0 - effect)
    if result.pvalue < alpha and worse >= min_effect:
        judged.outcome = "fail"
        judged.reason = (f"{name}: canary median {new_median:.4g} vs baseline {old_median:.4g}, "
                         f"P(canary > baseline) = {effect:.2f}, p = {result.pvalue:.2g} over "
                         f"{n} windows")
    else:
        judged.reason = f"{name}: no harmful difference (p = {result.pvalue:.2g}, " \
                        f"P(canary > baseline) = {effect:.2f})"
    return judged
