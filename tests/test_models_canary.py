"""The canary judge: rank test with effect size; inconclusive, never fail, on thin or no data."""

from __future__ import annotations

import numpy as np

from models.canary import judge
from tests.test_models_features import synthetic_metrics


def _two_revisions(windows: int, slower: float = 1.0):
    return synthetic_metrics(windows=windows, services=("cart",),
                             revisions={"cart": ("old", "new")},
                             spikes={("cart@new", i): {"latency": slower}
                                     for i in range(windows)})


def test_a_slower_canary_fails_with_the_numbers() -> None:
    verdict = judge(_two_revisions(30, slower=1.5), baseline="old", canary="new")
    assert verdict.outcome == "fail"
    p50 = next(m for m in verdict.metrics if m.metric == "latency_p50_ms")
    assert p50.outcome == "fail" and p50.effect > 0.9 and p50.p_value < 0.01
    assert p50.canary_median > 1.4 * p50.baseline_median
    assert "latency_p50_ms" in verdict.reason


def test_an_equal_canary_passes() -> None:
    verdict = judge(_two_revisions(30), baseline="old", canary="new")
    assert verdict.outcome == "pass", verdict.reason


def test_a_faster_canary_does_not_fail() -> None:
    verdict = judge(_two_revisions(30, slower=0.5), baseline="old", canary="new")
    assert verdict.outcome == "pass", verdict.reason


def test_thin_or_missing_data_is_inconclusive() -> None:
    thin = judge(_two_revisions(5, slower=3.0), baseline="old", canary="new")
    assert thin.outcome == "inconclusive"
    assert "5 windows with data for both revisions, fewer than the 10 needed" in thin.reason
    missing = judge(_two_revisions(30, slower=3.0), baseline="old", canary="absent")
    assert missing.outcome == "inconclusive"
    frame = _two_revisions(30, slower=3.0)
    frame.loc[frame["revision"] == "new", ["latency_p50_ms", "latency_p90_ms",
                                           "latency_p99_ms", "error_rate"]] = np.nan
    no_values = judge(frame, baseline="old", canary="new")
    assert no_values.outcome == "inconclusive"
    assert all(m.outcome == "inconclusive" for m in no_values.metrics)
