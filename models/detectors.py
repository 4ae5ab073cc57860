"""Anomaly detectors over service-metric features, with scikit-learn's outlier-detector API.

Every detector here has ``fit``, ``score_samples`` (higher is more normal, as in scikit-learn),
``decision_function`` (negative means anomalous), ``predict`` (-1 anomalous, 1 normal) and
``anomaly_score``: a **calibrated score in [0, 1]**, one minus a p-value, so that a threshold of
0.999 means "one normal window in a thousand scores this high". Rows a detector cannot judge
(a service it has never seen, no history) score NaN, never 0 or 1.

* :class:`RobustBaselineDetector`: per service, the median and MAD of each base feature, by
  hour of day when the training history covers at least two days with enough windows per hour
  (seasonality), else over all of it. Its p-value is the normal tail of the largest robust
  z-score, one-sided where only a rise hurts (latency, errors), Bonferroni-corrected for the
  number of features.
* :class:`MultivariateDetector`: an IsolationForest on the departure features (which are
  already relative to each service's own baseline, so one forest serves all services); its
  p-value is the rank of the score among the training windows' scores.
* :class:`AnomalyModel`: both together. Their combined p-value (twice the smaller one,
  Bonferroni) rests on a normal tail that real latencies do not have, so the model
  **calibrates** it on normal windows it was not fitted on (split conformal): it fits the two
  detectors again on three windows in four of each service's training history, scores the
  fourth, and a window's calibrated p-value is the share of those held-out windows whose
  combined p-value is at most its own, ``(1 + count) / (n + 1)``; the service's own held-out
  windows when it has ``min_calibration_windows`` of them, else all services' together. The
  deployed detectors are fitted on all of the history. Beyond the ``CALIBRATION_TAIL`` most
  extreme held-out windows there is no data to count, and the tail is extended as a power
  law fitted on the held-out windows' own tail (:func:`calibrated_p`). So a threshold of
  0.999 flags about one normal window in a thousand of the service's training history,
  whatever the shape of its tails, as far as the held-out windows can tell (at 0.001 that
  takes some thousands of them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import norm
from scipy.stats import t as student_t
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.ensemble import IsolationForest
from sklearn.utils.validation import check_is_fitted

from clover.records import Contribution
from models.features import (
    BASE_FEATURES,
    DEPARTURE_FEATURES,
    DIRECTION,
    KEY,
    MAD_TO_SIGMA,
    SCALE_FLOOR,
    to_raw,
)

HOUR_US = 3_600_000_000
DAY_US = 24 * HOUR_US
CALIBRATION_EVERY = 4  # one training window in this many is held out to calibrate
CALIBRATION_TAIL = 10  # held-out windows the tail is extended from (see calibrated_p)


def calibrated_p(raw: np.ndarray, calibration: np.ndarray,
                 tail: int = CALIBRATION_TAIL) -> np.ndarray:
    """The conformal p-value of each ``raw`` p-value against ``calibration`` (the sorted raw
    p-values of normal windows the detectors were not fitted on): ``(1 + count) / (n + 1)``
    with ``count`` the calibration values at most ``raw``.

    Below the ``tail``-th smallest calibration value nothing is left to count, and the tail
    is extended as a power law through the ``tail``-th and ``4 * tail``-th smallest values:
    ``F(raw) = F(edge) * (raw / edge) ** b``, ``b`` the slope between them in log-log scale,
    at most 1 (never a tail thinner than the raw p-values say) and at least 0.1. Real
    latencies have heavy tails: a raw p-value that is 10 times off at 1 % is further off at
    0.1 %, and a constant factor would miss that. With fewer than ``4 * tail`` calibration
    values, ``raw`` as it is. NaN stays NaN."""
    raw = np.asarray(raw, dtype=float)
    n = len(calibration)
    if n < 4 * tail:
        return raw
    within = (1.0 + np.searchsorted(calibration, raw, side="right")) / (n + 1)
    edge, inner = float(calibration[tail - 1]), float(calibration[4 * tail - 1])
    at_edge = tail / (n + 1)
    if edge <= 0:
        return np.where(np.isnan(raw), np.nan, np.where(raw < edge, at_edge, within))
    slope = np.log(4.0) / np.log(inner / edge) if inner > edge else 1.0
    slope = float(min(1.0, max(0.1, slope)))
    with np.errstate(divide="ignore", invalid="ignore"):
        beyond = at_edge * (np.clip(raw, 0.0, edge) / edge) ** slope
    return np.where(np.isnan(raw), np.nan, np.where(raw < edge, beyond, within))


def direction_of(feature: str) -> int:
    """1 when only a rise is bad, 0 when both ways are (departure names map to their base)."""
    return DIRECTION[feature.split("__")[0]]


def tail_p_value(z: np.ndarray, features: Sequence[str],
                 history: int | None = None) -> np.ndarray:
    """Per row, the Bonferroni-corrected tail p-value of its most extreme z-score.

    ``z`` is (rows, features); NaN entries are ignored, and a row with none left is NaN. With
    ``history`` (how many windows the baseline was estimated from) the tail is Student's t
    with ``history - 1`` degrees of freedom rather than the normal one: a baseline from a
    handful of windows is uncertain, and its z-scores must be larger to mean as much.
    """
    z = np.atleast_2d(np.asarray(z, dtype=float))
    tails = feature_tails(z, features, history)
    counted = np.isfinite(z).sum(axis=1)
    with np.errstate(invalid="ignore"):
        smallest = np.nanmin(np.where(counted[:, None] > 0, tails, 1.0), axis=1)
    p = np.minimum(1.0, smallest * np.maximum(counted, 1))
    return np.where(counted > 0, p, np.nan)


def feature_tails(z: np.ndarray, features: Sequence[str], history: int | None = None,
                  two_sided: frozenset[str] = frozenset()) -> np.ndarray:
    """The tail probability of each z-score on its own (NaN where z is NaN): one-sided where
    only a rise hurts (unless the feature is in ``two_sided``), two-sided otherwise; Student's
    t with ``history - 1`` degrees of freedom when ``history`` is given (see
    :func:`tail_p_value`)."""
    z = np.asarray(z, dtype=float)
    one_sided = np.array([direction_of(f) == 1 and f not in two_sided for f in features],
                         dtype=bool)
    sf = norm.sf if history is None else student_t(max(history - 1, 1)).sf
    with np.errstate(invalid="ignore"):
        tails = np.where(one_sided, sf(z), 2.0 * sf(np.abs(z)))
    return np.where(np.isfinite(z), tails, np.nan)


def contributions(z: np.ndarray, features: Sequence[str], values: Sequence[float],
                  baselines: Sequence[float], top: int = 3,
                  two_sided: frozenset[str] = frozenset()) -> list[Contribution]:
    """The ``top`` features that pushed one row's score most, with their values and baselines.

    ``weight`` is the robust z-score (how many standard deviations from the baseline, signed);
    a fall of a feature where only a rise hurts (and that is not in ``two_sided``) does not
    count.
    """
    weight = np.where([direction_of(f) == 1 and f not in two_sided for f in features],
                      np.clip(z, 0, None), np.abs(z))
    order = [i for i in np.argsort(-np.nan_to_num(weight, nan=-1.0)) if np.isfinite(z[i])]
    found = []
    for i in order[:top]:
        if weight[i] <= 0:
            break
        found.append(Contribution(feature=features[i], weight=round(float(z[i]), 3),
                                  value=_finite_or_none(values[i]),
                                  baseline=_finite_or_none(baselines[i])))
    return found


def _finite_or_none(value: Any) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


class _Scored(OutlierMixin, BaseEstimator):
    """The scikit-learn side shared by the detectors: all follow from ``anomaly_score``."""

    threshold: float

    def anomaly_score(self, X: pd.DataFrame) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def score_samples(self, X: pd.DataFrame) -> np.ndarray:
        """Higher is more normal (scikit-learn's convention): minus the anomaly score."""
        return -self.anomaly_score(X)

    def decision_function(self, X: pd.DataFrame) -> np.ndarray:
        """Negative for anomalous windows; NaN where the detector cannot judge."""
        return self.score_samples(X) - self.offset_

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        """-1 for anomalous, 1 for normal (a window that cannot be judged counts as normal;
        use :meth:`anomaly_score` to tell those apart: it is NaN for them)."""
        return np.where(self.decision_function(X) < 0, -1, 1)

    @property
    def offset_(self) -> float:
        return -float(self.threshold)


class RobustBaselineDetector(_Scored):
    """Per-service median/MAD baseline of the base features, by hour of day when history allows.

    ``X`` holds the key columns (namespace, service, window_start_us) and the base features
    (as made by :func:`models.features.build_features`).
    """

    def __init__(self, features: Sequence[str] = BASE_FEATURES, threshold: float = 0.999,
                 min_windows: int = 30, seasonal_min_days: float = 2.0,
                 seasonal_min_windows: int = 20) -> None:
        self.features = features
        self.threshold = threshold
        self.min_windows = min_windows
        self.seasonal_min_days = seasonal_min_days
        self.seasonal_min_windows = seasonal_min_windows

    def fit(self, X: pd.DataFrame, y: Any = None) -> RobustBaselineDetector:
        features = list(self.features)
        self.feature_names_in_ = np.array(features, dtype=object)
        self.n_features_in_ = len(features)
        self.profiles_: dict[str, dict[str, np.ndarray | None]] = {}
        for (namespace, service), group in X.groupby(KEY, sort=True):
            if len(group) < self.min_windows:
                continue  # too little history: the service stays unknown (NaN scores)
            values = group[features].to_numpy(dtype=float)
            median, scale = _robust(values, features)
            profile: dict[str, np.ndarray | None] = {
                "median": median, "scale": scale, "hourly_median": None, "hourly_scale": None}
            times = group["window_start_us"].to_numpy()
            hours = (times // HOUR_US) % 24
            counts = np.bincount(hours, minlength=24)
            if (times.max() - times.min() >= self.seasonal_min_days * DAY_US
                    and counts.min() >= self.seasonal_min_windows):
                hourly = [_robust(values[hours == h], features) for h in range(24)]
                profile["hourly_median"] = np.vstack([m for m, _ in hourly])
                profile["hourly_scale"] = np.vstack([s for _, s in hourly])
            self.profiles_[f"{namespace}/{service}"] = profile
        return self

    def baselines(self, X: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(median, scale) per row and feature; NaN for services without a profile."""
        check_is_fitted(self, "profiles_")
        rows = len(X)
        medians = np.full((rows, self.n_features_in_), np.nan)
        scales = np.full((rows, self.n_features_in_), np.nan)
        keys = (X["namespace"].astype(str) + "/" + X["service"].astype(str)).to_numpy()
        hours = ((X["window_start_us"].to_numpy() // HOUR_US) % 24).astype(int)
        for i, key in enumerate(keys):
            profile = self.profiles_.get(key)
            if profile is None:
                continue
            hourly_median, hourly_scale = profile["hourly_median"], profile["hourly_scale"]
            if hourly_median is not None and hourly_scale is not None:
                medians[i] = hourly_median[hours[i]]
                scales[i] = hourly_scale[hours[i]]
            else:
                medians[i], scales[i] = profile["median"], profile["scale"]
        return medians, scales

    def z_scores(self, X: pd.DataFrame) -> np.ndarray:
        medians, scales = self.baselines(X)
        return (X[list(self.features)].to_numpy(dtype=float) - medians) / scales

    def anomaly_score(self, X: pd.DataFrame) -> np.ndarray:
        return 1.0 - tail_p_value(self.z_scores(X), list(self.features))


def _robust(values: np.ndarray, features: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
            median = np.nanmedian(values, axis=0)
            mad = np.nanmedian(np.abs(values - median), axis=0)
    floor = np.array([SCALE_FLOOR[f] for f in features])
    return median, np.fmax(MAD_TO_SIGMA * mad, floor)


class MultivariateDetector(_Scored):
    """An IsolationForest on the departure features, calibrated on its training windows."""

    def __init__(self, features: Sequence[str] = DEPARTURE_FEATURES, threshold: float = 0.999,
                 n_estimators: int = 200, max_samples: int | str = "auto",
                 random_state: int | None = 0) -> None:
        self.features = features
        self.threshold = threshold
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self.random_state = random_state

    def _matrix(self, X: pd.DataFrame) -> np.ndarray:
        # A departure that cannot be computed (no history yet) is "no departure" to the forest;
        # the baseline detector reports such rows as NaN instead.
        return np.nan_to_num(X[list(self.features)].to_numpy(dtype=float), nan=0.0)

    def fit(self, X: pd.DataFrame, y: Any = None) -> MultivariateDetector:
        matrix = self._matrix(X)
        self.feature_names_in_ = np.array(list(self.features), dtype=object)
        self.n_features_in_ = matrix.shape[1]
        self.forest_ = IsolationForest(n_estimators=self.n_estimators,
                                       max_samples=self.max_samples,
                                       random_state=self.random_state).fit(matrix)
        # The forest's own anomaly measure (higher is more anomalous) of each training window.
        self.training_scores_ = np.sort(-self.forest_.score_samples(matrix))
        return self

    def anomaly_score(self, X: pd.DataFrame) -> np.ndarray:
        check_is_fitted(self, "forest_")
        raw = -self.forest_.score_samples(self._matrix(X))
        n = len(self.training_scores_)
        # Empirical p-value: the share of training windows at least as anomalous.
        at_least = n - np.searchsorted(self.training_scores_, raw, side="left")
        return 1.0 - (at_least + 1) / (n + 1)


class AnomalyModel(_Scored):
    """The baseline and multivariate detectors combined into one calibrated score."""

    def __init__(self, threshold: float = 0.999, min_windows: int = 30,
                 n_estimators: int = 200, random_state: int | None = 0,
                 min_calibration_windows: int = 1000) -> None:
        self.threshold = threshold
        self.min_windows = min_windows
        self.n_estimators = n_estimators
        self.random_state = random_state
        self.min_calibration_windows = min_calibration_windows

    def _fit_parts(self, X: pd.DataFrame) -> tuple[RobustBaselineDetector,
                                                   MultivariateDetector]:
        return (RobustBaselineDetector(threshold=self.threshold,
                                       min_windows=self.min_windows).fit(X),
                MultivariateDetector(threshold=self.threshold, n_estimators=self.n_estimators,
                                     random_state=self.random_state).fit(X))

    @staticmethod
    def _combined_p(baseline: RobustBaselineDetector, forest: MultivariateDetector,
                    X: pd.DataFrame) -> np.ndarray:
        """Twice the smaller of the two detectors' p-values (NaN for a service the baseline
        has never seen: its departures would mean nothing to the forest either)."""
        p_baseline = 1.0 - baseline.anomaly_score(X)
        p_forest = 1.0 - forest.anomaly_score(X)
        combined = np.minimum(1.0, 2.0 * np.fmin(p_baseline, p_forest))
        return np.where(np.isfinite(p_baseline), combined, np.nan)

    def fit(self, X: pd.DataFrame, y: Any = None) -> AnomalyModel:
        self.baseline_, self.multivariate_ = self._fit_parts(X)
        self.feature_names_in_ = np.array(list(BASE_FEATURES) + list(DEPARTURE_FEATURES),
                                          dtype=object)
        self.n_features_in_ = len(self.feature_names_in_)
        self.services_ = sorted(self.baseline_.profiles_)
        # Split conformal calibration (see the module's docstring): every CALIBRATION_EVERY-th
        # window of each service, in time order, is scored by detectors fitted without it.
        order = X.sort_values("window_start_us", kind="stable")
        held = (order.groupby(KEY, sort=False).cumcount() % CALIBRATION_EVERY
                == CALIBRATION_EVERY - 1).to_numpy()
        self.calibration_: dict[str, np.ndarray] = {}
        self.calibration_pooled_ = np.empty(0)
        if held.any() and not held.all():
            baseline, forest = self._fit_parts(order[~held])
            raw = self._combined_p(baseline, forest, order[held])
            keys = _keys(order[held])
            finite = np.isfinite(raw)
            self.calibration_pooled_ = np.sort(raw[finite])
            for key in np.unique(keys[finite]):
                self.calibration_[str(key)] = np.sort(raw[finite & (keys == key)])
        return self

    def calibration_for(self, key: str) -> np.ndarray:
        """The held-out p-values a service's windows are calibrated against: its own when it
        has ``min_calibration_windows`` of them, else all services' together."""
        check_is_fitted(self, "calibration_")
        own = self.calibration_.get(key)
        if own is not None and len(own) >= self.min_calibration_windows:
            return own
        return self.calibration_pooled_

    def anomaly_score(self, X: pd.DataFrame) -> np.ndarray:
        check_is_fitted(self, "baseline_")
        raw = self._combined_p(self.baseline_, self.multivariate_, X)
        keys = _keys(X)
        p = raw.copy()
        for key in np.unique(keys):
            rows = keys == key
            p[rows] = calibrated_p(raw[rows], self.calibration_for(str(key)))
        return 1.0 - p

    def explain(self, X: pd.DataFrame, top: int = 3) -> list[list[Contribution]]:
        """Per row, the base features furthest from the service's baseline (raw units)."""
        z = self.baseline_.z_scores(X)
        medians, _ = self.baseline_.baselines(X)
        values = X[list(BASE_FEATURES)].to_numpy(dtype=float)
        out = []
        for i in range(len(X)):
            raw_values = [to_raw(f, v) for f, v in zip(BASE_FEATURES, values[i], strict=True)]
            raw_base = [to_raw(f, v) for f, v in zip(BASE_FEATURES, medians[i], strict=True)]
            out.append(contributions(z[i], BASE_FEATURES, raw_values, raw_base, top))
        return out


def _keys(X: pd.DataFrame) -> np.ndarray:
    return (X["namespace"].astype(str) + "/" + X["service"].astype(str)).to_numpy()
