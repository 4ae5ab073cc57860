"""Detectors on synthetic service windows with known anomalies."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

from models.detectors import (
    AnomalyModel,
    MultivariateDetector,
    RobustBaselineDetector,
    tail_p_value,
)
from models.features import build_features
from models.train import TrainingError, train_model
from tests.test_models_features import WINDOW_US, synthetic_metrics

ANOMALIES = {("cart", 40): {"latency": 4.0}, ("checkout", 60): {"requests": 0.2},
             ("cart", 80): {"errors": 60.0}}


@pytest.fixture(scope="module")
def trained() -> AnomalyModel:
    model, _ = train_model(synthetic_metrics(windows=400, seed=1), threshold=0.999)
    return model


@pytest.fixture(scope="module")
def scored(trained: AnomalyModel) -> pd.DataFrame:
    history = synthetic_metrics(windows=100, seed=2, spikes=ANOMALIES)
    features = build_features(history)
    features = features[features["history"] >= 6].copy()
    features["score"] = trained.anomaly_score(features)
    features["step"] = (features["window_start_us"] - features["window_start_us"].min()) \
        // WINDOW_US + 6
    return features


def test_known_anomalies_are_flagged_and_normal_windows_are_not(
        trained: AnomalyModel, scored: pd.DataFrame) -> None:
    flagged = scored[scored["score"] >= trained.threshold]
    assert {(s, int(i)) for s, i in zip(flagged["service"], flagged["step"], strict=True)} \
        == set(ANOMALIES)
    assert 0.0 <= scored["score"].min() and scored["score"].max() <= 1.0


def test_scikit_learn_conventions(trained: AnomalyModel, scored: pd.DataFrame) -> None:
    predicted = trained.predict(scored)
    decision = trained.decision_function(scored)
    assert set(np.unique(predicted)) == {-1, 1}
    assert ((decision < 0) == (predicted == -1)).all()
    np.testing.assert_allclose(trained.score_samples(scored), -scored["score"])
    assert clone(trained).get_params() == trained.get_params()
    assert not hasattr(clone(trained), "baseline_")


def test_contributions_name_the_feature_with_its_value_and_baseline(
        trained: AnomalyModel, scored: pd.DataFrame) -> None:
    row = scored[(scored["service"] == "cart") & (scored["step"] == 40)]
    top = trained.explain(row)[0][0]
    assert top.feature.startswith("latency")
    assert top.baseline is not None
    assert top.value == pytest.approx(4 * top.baseline, rel=0.2)
    errors = scored[(scored["service"] == "cart") & (scored["step"] == 80)]
    assert trained.explain(errors)[0][0].feature == "error_ratio"


def test_an_unknown_service_scores_nan_not_normal(trained: AnomalyModel) -> None:
    other = build_features(synthetic_metrics(windows=20, services=("payment",)))
    assert np.isnan(trained.anomaly_score(other)).all()


def test_the_score_is_calibrated_on_normal_data() -> None:
    model, features = train_model(synthetic_metrics(windows=400, seed=3))
    fresh = build_features(synthetic_metrics(windows=400, seed=4))
    fresh = fresh[fresh["history"] >= 6]
    rate = float((model.anomaly_score(fresh) >= 0.99).mean())
    assert rate <= 0.02  # a threshold of 0.99 flags about 1 % of normal windows, not more


def test_seasonal_profile_when_history_covers_two_days() -> None:
    hour_us = 3_600_000_000
    rows = []
    for i in range(0, 3 * 24 * 360, 6):  # one window a minute for three days
        t = 1_700_000_000_000_000 + i * WINDOW_US
        busy = 9 <= (t // hour_us) % 24 < 17
        rows.append({"namespace": "shop", "service": "cart", "window_start_us": t,
                     "request_rate": np.log1p(100.0 if busy else 10.0)})
    frame = pd.DataFrame(rows)
    detector = RobustBaselineDetector(features=("request_rate",), min_windows=10).fit(frame)
    assert detector.profiles_["shop/cart"]["hourly_median"] is not None
    assert np.nanmax(detector.anomaly_score(frame)) < 0.999  # busy hours are normal by day
    night = frame[((frame["window_start_us"] // hour_us) % 24) == 3].head(1).copy()
    night["request_rate"] = np.log1p(100.0)
    assert detector.anomaly_score(night)[0] >= 0.999  # ... but not at 3 am


def test_multivariate_detector_alone_flags_a_joint_departure() -> None:
    features = build_features(synthetic_metrics(windows=300, seed=5))
    features = features[features["history"] >= 6]
    detector = MultivariateDetector(threshold=0.99).fit(features)
    odd = features.head(1).copy()
    for column in ("latency_p50_ms__z", "latency_p90_ms__z", "latency_p99_ms__z"):
        odd[column] = 12.0
    assert detector.predict(odd)[0] == -1
    assert (detector.predict(features) == -1).mean() <= 0.02


def test_tail_p_value_is_one_sided_for_latency() -> None:
    p = tail_p_value(np.array([[-8.0, np.nan], [8.0, np.nan], [np.nan, np.nan]]),
                     ["latency_p99_ms__z", "request_rate__z"])
    assert p[0] > 0.99 and p[1] < 1e-9 and np.isnan(p[2])


def test_training_on_too_little_history_is_a_clear_error() -> None:
    with pytest.raises(TrainingError, match="windows of history"):
        train_model(synthetic_metrics(windows=20))
    with pytest.raises(TrainingError, match="no service-metric windows"):
        train_model(synthetic_metrics(windows=0))


def _heavy_tailed(windows: int, seed: int) -> pd.DataFrame:
    """Normal windows whose latency noise has Student's t(2) tails, heavier than the normal
    tail the baseline detector's raw p-value assumes."""
    frame = synthetic_metrics(windows=windows, seed=seed, services=("cart", "checkout", "email"))
    noise = np.exp(0.1 * np.random.default_rng(seed + 100).standard_t(2, len(frame)))
    for column in ("latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "latency_max_ms"):
        frame[column] = frame[column] * noise
    return frame


def test_calibration_gives_the_nominal_false_alarm_rate_on_heavy_tailed_normal_data() -> None:
    model, _ = train_model(_heavy_tailed(1500, seed=3))
    assert len(model.calibration_pooled_) > 1000  # one window in four of 3 x 1500, held out
    fresh = build_features(_heavy_tailed(1500, seed=5))
    fresh = fresh[fresh["history"] >= 6]
    score = model.anomaly_score(fresh)
    raw = model._combined_p(model.baseline_, model.multivariate_, fresh)
    # Uncalibrated, the normal tail flags three times the nominal share at 0.99 ...
    assert float((raw <= 0.01).mean()) > 0.02
    # ... calibrated on held-out training windows, about the nominal share.
    assert 0.005 <= float((score >= 0.99).mean()) <= 0.015
    assert 0.07 <= float((score >= 0.9).mean()) <= 0.13


def test_calibrated_p_counts_within_the_data_and_extends_a_power_law_beyond_it() -> None:
    from models.detectors import calibrated_p

    rng = np.random.default_rng(0)
    # Raw p-values of normal windows that are far too small: P(raw <= t) = sqrt(t).
    calibration = np.sort(rng.uniform(size=4000) ** 2)
    p = calibrated_p(np.array([0.25, 1e-2, 1e-4, 1e-6, np.nan]), calibration)
    np.testing.assert_allclose(p[:2], [0.5, 0.1], rtol=0.1)  # counted
    np.testing.assert_allclose(p[2:4], [1e-2, 1e-3], rtol=0.5)  # beyond the 10 smallest
    assert np.isnan(p[4])
    # A raw p-value that is right stays about as it is (beyond the data, within what a slope
    # through the 10th and 40th smallest of 4000 can say), and too few values change nothing.
    uniform = np.sort(rng.uniform(size=4000))
    within, beyond = calibrated_p(np.array([0.1, 1e-5]), uniform)
    assert within == pytest.approx(0.1, rel=0.1) and 0.5e-5 <= beyond <= 5e-5
    np.testing.assert_array_equal(calibrated_p(np.array([1e-5]), calibration[:39]), [1e-5])
