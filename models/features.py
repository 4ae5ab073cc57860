"""Features of a service's metric windows, and their departure from what is normal for it.

Input is a DataFrame with the columns of :class:`clover.records.ServiceMetrics`, one row per
(namespace, service, revision, window); edge rows (``peer_service`` set) are dropped: only a
service's own rows are scored.

For every row we compute

* the **base features** (:data:`BASE_FEATURES`): request rate, error ratio, latency quantiles,
  byte rates and the reset rate, all on a log scale (``log1p``) except the error ratio, because
  rates and latencies are heavy-tailed and their changes are multiplicative;
* ``<feature>__z``: the robust z-score of the window against the service's **own recent
  baseline**: the median and spread of the previous ``baseline_windows`` windows of that
  (namespace, service), all revisions together, never including the window itself (no
  look-ahead). The spread is the larger of the MAD and the upper decile of the absolute
  deviations (each as a normal's standard deviation: real latency quantiles have heavier tails
  than a normal's), floored (:data:`SCALE_FLOOR`) so that a very steady service does not turn
  noise into huge scores;
* ``<feature>__rev``: when two revisions run in the same window, this revision's value minus the
  request-weighted mean of the other revisions' values (0 when it runs alone), also divided by
  the baseline scale.

The same arithmetic is done one window at a time by :class:`ServiceBaseline` for the online
scorer; ``tests/test_models_features.py`` checks that both give the same numbers.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

KEY = ["namespace", "service"]
BASE_FEATURES: tuple[str, ...] = (
    "request_rate", "error_ratio", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms",
    "bytes_in_rate", "bytes_out_rate", "reset_rate",
)
# What callers see of a service: the caller -> callee rows (edges) into it, one set per caller.
# A network delay or a slow sidecar shows only here: the callee's own spans time the handler.
EDGE_FEATURES: tuple[str, ...] = ("request_rate", "latency_p50_ms", "latency_p90_ms",
                                  "latency_p99_ms")
EDGE_SCORED: tuple[str, ...] = ("latency_p50_ms", "latency_p90_ms", "latency_p99_ms")
# Which way is bad: a latency or error rise hurts users, a fall does not; traffic that drops or
# surges both say something changed.
DIRECTION: Mapping[str, int] = {
    "request_rate": 0, "error_ratio": 1, "latency_p50_ms": 1, "latency_p90_ms": 1,
    "latency_p99_ms": 1, "bytes_in_rate": 0, "bytes_out_rate": 0, "reset_rate": 1,
}
# Smallest baseline scale per feature (log1p units are ~relative changes: 0.1 is ~10 %).
SCALE_FLOOR: Mapping[str, float] = {
    "request_rate": 0.1, "error_ratio": 0.02, "latency_p50_ms": 0.1, "latency_p90_ms": 0.1,
    "latency_p99_ms": 0.15, "bytes_in_rate": 0.1, "bytes_out_rate": 0.1, "reset_rate": 0.1,
}
MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation
DECILE_TO_SIGMA = 1.6449  # the 0.9 quantile of |x - median| of a normal, in standard deviations


def z_name(feature: str) -> str:
    return f"{feature}__z"


def rev_name(feature: str) -> str:
    return f"{feature}__rev"


DEPARTURE_FEATURES: tuple[str, ...] = tuple(
    [z_name(f) for f in BASE_FEATURES] + [rev_name(f) for f in BASE_FEATURES])


def service_rows(metrics: pd.DataFrame) -> pd.DataFrame:
    """Only the service-level rows (no caller -> callee edges)."""
    if "peer_service" in metrics.columns:
        metrics = metrics[metrics["peer_service"].isna()]
    return metrics


def base_features(metrics: pd.DataFrame) -> pd.DataFrame:
    """The base features of each row (same index), on their modelling scale."""
    seconds = metrics["window_seconds"].astype(float)
    requests = metrics["requests"].astype(float)
    out = pd.DataFrame(index=metrics.index)
    out["request_rate"] = np.log1p(requests / seconds)
    # No requests: no error ratio and no latency (NaN), not zero.
    out["error_ratio"] = (metrics["errors"].astype(float) / requests.where(requests > 0))
    for quantile in ("latency_p50_ms", "latency_p90_ms", "latency_p99_ms"):
        out[quantile] = np.log1p(metrics[quantile].astype(float))
    out["bytes_in_rate"] = np.log1p(metrics["bytes_in"].astype(float) / seconds)
    out["bytes_out_rate"] = np.log1p(metrics["bytes_out"].astype(float) / seconds)
    out["reset_rate"] = np.log1p(metrics["connections_reset"].astype(float) / seconds)
    return out


def to_raw(feature: str, value: float) -> float:
    """A base feature back on the scale the SRE knows (per second, ms, ratio)."""
    if feature == "error_ratio" or value is None or not np.isfinite(value):
        return value
    return float(np.expm1(value))


def _service_series(rows: pd.DataFrame, base: pd.DataFrame) -> pd.DataFrame:
    """One row per (namespace, service, window): revisions combined, weighted by requests."""
    weights = rows["requests"].astype(float).clip(lower=1.0)
    frame = base.mul(weights, axis=0)
    frame[KEY + ["window_start_us"]] = rows[KEY + ["window_start_us"]]
    frame["_w"] = weights
    has = base.notna().astype(float).mul(weights, axis=0)
    has.columns = [f"_n_{c}" for c in base.columns]
    frame = pd.concat([frame, has], axis=1)
    summed = frame.groupby(KEY + ["window_start_us"], sort=True).sum(min_count=1)
    combined = pd.DataFrame(index=summed.index)
    for feature in base.columns:
        combined[feature] = summed[feature] / summed[f"_n_{feature}"].where(
            summed[f"_n_{feature}"] > 0)
    return combined.reset_index()


def build_features(metrics: pd.DataFrame, *, baseline_windows: int = 60,
                   min_windows: int = 6) -> pd.DataFrame:
    """Features of every service row of ``metrics``, sorted by service and time.

    Returns the key columns (namespace, service, revision, window_start_us, requests), the base
    features, their departures (:data:`DEPARTURE_FEATURES`), ``baseline_<feature>`` (the median
    they depart from) and ``history`` (how many earlier windows the baseline rests on).
    """
    rows = service_rows(metrics).reset_index(drop=True)
    base = base_features(rows)
    series = _service_series(rows, base)
    grouped = series.groupby(KEY, sort=False)
    stats = pd.DataFrame(index=series.index)
    stats["history"] = grouped.cumcount().clip(upper=baseline_windows)
    keys = [series[k] for k in KEY]
    for feature in BASE_FEATURES:
        previous = grouped[feature].shift(1)  # the window itself never counts
        rolling = previous.groupby(keys, sort=False).rolling(baseline_windows, min_periods=1)
        unkeyed = list(range(len(KEY)))
        stats[f"baseline_{feature}"] = rolling.median().reset_index(level=unkeyed, drop=True)
        stats[f"scale_{feature}"] = rolling.apply(
            _scale, raw=True, kwargs={"feature": feature}).reset_index(level=unkeyed, drop=True)
        # A service's first window has no history at all: the floor, as ServiceBaseline says.
        stats[f"scale_{feature}"] = stats[f"scale_{feature}"].fillna(SCALE_FLOOR[feature])
    stats[KEY + ["window_start_us"]] = series[KEY + ["window_start_us"]]
    merged = rows[KEY + ["revision", "window_start_us", "requests"]].join(base).merge(
        stats, on=KEY + ["window_start_us"], how="left")
    for feature in BASE_FEATURES:
        scale = merged[f"scale_{feature}"]
        merged[z_name(feature)] = ((merged[feature] - merged[f"baseline_{feature}"]) / scale
                                   ).where(merged["history"] >= min_windows)
        merged[rev_name(feature)] = _versus_other_revisions(merged, feature) / scale
    return merged.sort_values(KEY + ["window_start_us", "revision"]).reset_index(drop=True)


def _scale(history: np.ndarray, feature: str) -> float:
    """The robust spread of a history as a standard deviation, floored: the larger of the MAD
    and the upper decile of the absolute deviations, each scaled to a normal's standard
    deviation. Latency quantiles of real services stray from window to window with heavier
    tails than a normal's: the MAD measures only the calm half, while the upper decile also
    sees how far the usual bad windows go (and is still untouched by up to a tenth of the
    history being a fault that slipped in)."""
    history = history[np.isfinite(history)]
    if history.size == 0:
        return SCALE_FLOOR[feature]
    deviations = np.abs(history - np.median(history))
    mad = float(np.median(deviations))
    decile = float(np.quantile(deviations, 0.9))
    return max(MAD_TO_SIGMA * mad, decile / DECILE_TO_SIGMA, SCALE_FLOOR[feature])


def _versus_other_revisions(frame: pd.DataFrame, feature: str) -> pd.Series:
    """Value minus the request-weighted mean of the other revisions in the same window."""
    weights = frame["requests"].astype(float).clip(lower=1.0).where(frame[feature].notna(), 0.0)
    weighted = (frame[feature].fillna(0.0) * weights)
    keys = [frame[k] for k in KEY + ["window_start_us"]]
    total_w = weights.groupby(keys).transform("sum")
    total_v = weighted.groupby(keys).transform("sum")
    other_w = total_w - weights
    other_mean = (total_v - weighted) / other_w.where(other_w > 0)
    return (frame[feature] - other_mean).fillna(0.0)


# --------------------------------------------------------------------------------------------
# The same, one window at a time (online scoring)


@dataclass
class ServiceBaseline:
    """The recent history of one (namespace, service): the last ``baseline_windows`` windows'
    base features, with revisions combined as :func:`build_features` combines them (or, with
    ``features``, any other vector of features: the online scorer keeps one per edge too)."""

    baseline_windows: int = 60
    history: deque[np.ndarray] = field(default_factory=deque)
    features: tuple[str, ...] = BASE_FEATURES

    def __len__(self) -> int:
        return len(self.history)

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(median, scale) per feature over the history (NaN median when none)."""
        if not self.history:
            return (np.full(len(self.features), np.nan),
                    np.array([SCALE_FLOOR[f] for f in self.features]))
        matrix = np.vstack(self.history)
        medians = np.full(len(self.features), np.nan)
        scales = np.empty(len(self.features))
        for j, feature in enumerate(self.features):
            column = matrix[:, j][np.isfinite(matrix[:, j])]
            if column.size:
                medians[j] = np.median(column)
            scales[j] = _scale(column, feature)
        return medians, scales

    def learn(self, combined: np.ndarray) -> None:
        """Add one window (all revisions combined) to the history."""
        self.history.append(np.asarray(combined, dtype=float))
        while len(self.history) > self.baseline_windows:
            self.history.popleft()


def combine_revisions(values: Iterable[tuple[np.ndarray, float]]) -> np.ndarray:
    """Request-weighted mean of several revisions' base features in one window."""
    pairs = list(values)
    matrix = np.vstack([v for v, _ in pairs])
    weights = np.array([max(w, 1.0) for _, w in pairs])[:, None] * np.isfinite(matrix)
    total = np.nansum(np.where(np.isfinite(matrix), matrix, 0.0) * weights, axis=0)
    sums = weights.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sums > 0, total / np.where(sums > 0, sums, 1.0), np.nan)


def base_vector(metrics: pd.DataFrame) -> np.ndarray:
    """Base features of a one-row ServiceMetrics frame as a vector in BASE_FEATURES order."""
    return base_features(metrics).iloc[0][list(BASE_FEATURES)].to_numpy(dtype=float)


def edge_vector(requests: int, window_seconds: int, p50: float | None, p90: float | None,
                p99: float | None) -> np.ndarray:
    """An edge row's :data:`EDGE_FEATURES` on the modelling scale (log1p), NaN for none."""
    def scaled(value: float | None) -> float:
        return float(np.log1p(value)) if value is not None else np.nan

    return np.array([np.log1p(requests / window_seconds), scaled(p50), scaled(p90),
                     scaled(p99)])
