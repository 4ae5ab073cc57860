"""Online scoring, one ServiceMetrics window at a time (River's ``learn_one``/``score_one``).

:class:`OnlineScorer` keeps each service's recent history (:class:`ServiceBaseline`) and turns
each service window into one :class:`clover.records.Anomaly`:

* with a trained :class:`~models.detectors.AnomalyModel` that knows the service, the model's
  calibrated score (its per-service, seasonal baseline plus the forest on the departures from
  the recent history);
* otherwise it learns online: the score is one minus the Bonferroni tail p-value of the window's
  robust z-scores against the service's recent history (and against the other revision running
  in the same window), and the verdict is ``inconclusive`` with a reason until the service has
  ``min_windows`` windows of history, or while its traffic is below ``min_requests`` per window.

A window judged anomalous is not learned, so a fault does not become the baseline it is
measured against, unless the service stays anomalous for ``relearn_after`` windows in a row: a
lasting change (more traffic, a slower release that was kept) becomes the new normal.

Revisions: the rows of one service and window arrive one by one; a revision is compared with
the other revisions already seen in that window, and the service's history learns the window
(revisions combined, weighted by requests) once a later window of the service arrives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from clover.records import Anomaly, ServiceMetrics
from models.detectors import AnomalyModel, contributions, tail_p_value
from models.features import (
    BASE_FEATURES,
    DEPARTURE_FEATURES,
    ServiceBaseline,
    base_vector,
    combine_revisions,
    rev_name,
    to_raw,
    z_name,
)

ONLINE_DETECTOR = "online_robust_baseline@1"
# Latency and error features mean little over a handful of requests.
_PER_REQUEST = np.array([f.startswith("latency") or f == "error_ratio" for f in BASE_FEATURES])


@dataclass
class _Service:
    baseline: ServiceBaseline
    window_start_us: int | None = None
    # This window's revisions so far: revision -> (base features, requests).
    revisions: dict[str, tuple[np.ndarray, float]] = field(default_factory=dict)
    # Revisions of this window judged anomalous (not learned).
    anomalous: set[str] = field(default_factory=set)
    anomalous_run: int = 0


class OnlineScorer:
    """Scores service windows as they come; learns each service's normal on the way."""

    def __init__(self, model: AnomalyModel | None = None, *, threshold: float = 0.999,
                 min_windows: int = 6, baseline_windows: int = 60, min_requests: int = 10,
                 relearn_after: int = 30, top_contributions: int = 3,
                 model_name: str = "anomaly_model") -> None:
        self.model = model
        self.threshold = model.threshold if model is not None else threshold
        self.min_windows = min_windows
        self.baseline_windows = baseline_windows
        self.min_requests = min_requests
        self.relearn_after = relearn_after
        self.top_contributions = top_contributions
        self.model_name = model_name
        self._services: dict[tuple[str, str], _Service] = {}

    # -- River's interface ----------------------------------------------------------------

    def score_one(self, metrics: ServiceMetrics, *, now_us: int | None = None) -> Anomaly:
        """The verdict on one service window; changes nothing (see :meth:`learn_one`)."""
        if metrics.peer_service is not None:
            raise ValueError(f"{metrics.namespace}/{metrics.service} -> {metrics.peer_service}: "
                             "edge rows are not scored, only a service's own rows")
        state = self._state(metrics)
        values = base_vector(_frame(metrics))
        history = state.baseline if state.window_start_us in (None, metrics.window_start_us) \
            else _advanced(state, self.baseline_windows)
        medians, scales = history.stats()
        z = (values - medians) / scales
        others = [v for rev, v in state.revisions.items() if rev != metrics.revision] \
            if state.window_start_us == metrics.window_start_us else []
        rev = (values - combine_revisions(others)) / scales if others \
            else np.zeros(len(BASE_FEATURES))
        few_requests = metrics.requests < self.min_requests
        if few_requests:
            z = np.where(_PER_REQUEST, np.nan, z)
            rev = np.where(_PER_REQUEST, np.nan, rev)
        emitted = now_us if now_us is not None else time.time_ns() // 1000

        def verdict(score: float | None, reason: str | None, detector: str,
                    explain: np.ndarray | None = None) -> Anomaly:
            if score is None or not np.isfinite(score):
                kind, score = "inconclusive", None
            else:
                kind = "anomalous" if score >= self.threshold else "normal"
            found = [] if explain is None else contributions(
                explain, BASE_FEATURES, [to_raw(f, v) for f, v in zip(BASE_FEATURES, values,
                                                                       strict=True)],
                [to_raw(f, m) for f, m in zip(BASE_FEATURES, medians, strict=True)],
                self.top_contributions)
            return Anomaly(
                namespace=metrics.namespace, service=metrics.service,
                revision=metrics.revision, window_start_us=metrics.window_start_us,
                window_seconds=metrics.window_seconds, detector=detector,
                threshold=float(self.threshold), verdict=kind, emitted_us=emitted,
                score=None if score is None else round(float(min(max(score, 0.0), 1.0)), 6),
                reason=reason, contributions=found)

        if len(history) < self.min_windows:
            return verdict(None, f"learning: {len(history)} of {self.min_windows} windows of "
                           "history for this service", ONLINE_DETECTOR)
        typical_requests = float(np.expm1(medians[0]) * metrics.window_seconds)
        if typical_requests < self.min_requests and few_requests:
            return verdict(None, f"too little traffic: {metrics.requests} requests in the window"
                           f" and ~{typical_requests:.0f} usually (< {self.min_requests})",
                           ONLINE_DETECTOR)
        key = f"{metrics.namespace}/{metrics.service}"
        if self.model is not None and key in self.model.baseline_.profiles_:
            row = pd.DataFrame([[metrics.namespace, metrics.service, metrics.window_start_us,
                                 *values, *z, *rev]],
                               columns=["namespace", "service", "window_start_us",
                                        *BASE_FEATURES, *DEPARTURE_FEATURES])
            score = float(self.model.anomaly_score(row)[0])
            trained_z = self.model.baseline_.z_scores(row)[0]
            medians = self.model.baseline_.baselines(row)[0][0]
            return verdict(score, None, self.model_name, trained_z)
        p = float(tail_p_value(np.concatenate([z, rev])[None, :],
                               [z_name(f) for f in BASE_FEATURES]
                               + [rev_name(f) for f in BASE_FEATURES], len(history))[0])
        reason = None if self.model is None else f"{key} is not in the trained model: scored " \
            "against its recent history"
        return verdict(1.0 - p, reason, ONLINE_DETECTOR, np.where(np.isfinite(z), z, np.nan))

    def learn_one(self, metrics: ServiceMetrics, *, anomalous: bool = False) -> None:
        """Add one window to its service's history (``anomalous`` windows are held back)."""
        state = self._state(metrics)
        if state.window_start_us is not None and metrics.window_start_us != state.window_start_us:
            if metrics.window_start_us < state.window_start_us:
                return  # a late window: the history has moved on; learning it would reorder it
            _close_window(state, self.relearn_after)
        state.window_start_us = metrics.window_start_us
        state.revisions[metrics.revision] = (base_vector(_frame(metrics)),
                                             float(metrics.requests))
        if anomalous:
            state.anomalous.add(metrics.revision)
        else:
            state.anomalous.discard(metrics.revision)

    def process(self, metrics: ServiceMetrics, *, now_us: int | None = None) -> Anomaly:
        """Score a window, then learn it unless it was anomalous."""
        anomaly = self.score_one(metrics, now_us=now_us)
        self.learn_one(metrics, anomalous=anomaly.verdict == "anomalous")
        return anomaly

    def history_windows(self, namespace: str, service: str) -> int:
        state = self._services.get((namespace, service))
        return 0 if state is None else len(state.baseline)

    def _state(self, metrics: ServiceMetrics) -> _Service:
        key = (metrics.namespace, metrics.service)
        state = self._services.get(key)
        if state is None:
            state = self._services[key] = _Service(ServiceBaseline(self.baseline_windows))
        return state


def _close_window(state: _Service, relearn_after: int) -> None:
    """Learn the finished window (unless it was anomalous) and start a new one."""
    if state.revisions:
        normal = [v for rev, v in state.revisions.items() if rev not in state.anomalous]
        if state.anomalous:
            state.anomalous_run += 1
        else:
            state.anomalous_run = 0
        if state.anomalous_run >= relearn_after:
            normal = list(state.revisions.values())  # a lasting change is the new normal
        if normal:
            state.baseline.learn(combine_revisions(normal))
    state.revisions = {}
    state.anomalous = set()


def _advanced(state: _Service, baseline_windows: int) -> ServiceBaseline:
    """The history as it will be once the pending window is learned (score_one sees the
    previous window even though learn_one closes it only when the next one arrives)."""
    normal = [v for rev, v in state.revisions.items() if rev not in state.anomalous]
    if not normal:
        return state.baseline
    preview = ServiceBaseline(baseline_windows, state.baseline.history.copy())
    preview.learn(combine_revisions(normal))
    return preview


def _frame(metrics: ServiceMetrics) -> pd.DataFrame:
    return pd.DataFrame([{
        "window_seconds": metrics.window_seconds, "requests": metrics.requests,
        "errors": metrics.errors, "latency_p50_ms": metrics.latency_p50_ms,
        "latency_p90_ms": metrics.latency_p90_ms, "latency_p99_ms": metrics.latency_p99_ms,
        "bytes_in": metrics.bytes_in, "bytes_out": metrics.bytes_out,
        "connections_reset": metrics.connections_reset}])
