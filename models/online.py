"""Online scoring, one ServiceMetrics window at a time (River's ``learn_one``/``score_one``).

:class:`OnlineScorer` keeps each service's recent history (:class:`ServiceBaseline`) and turns
each service window into one :class:`clover.records.Anomaly`:

* with a trained :class:`~models.detectors.AnomalyModel` that knows the service, the model's
  calibrated score (its per-service, seasonal baseline plus the forest on the departures from
  the recent history);
* otherwise it learns online. The evidence of a window is the robust z-score of each of its
  features against the service's own recent history (median, and a spread that is the larger
  of the MAD and the upper decile of the deviations; never the window itself), against the
  other revision running in the same window, and two views from the caller -> callee rows given
  to :meth:`OnlineScorer.learn_edge`, each against that edge's own history:

  - **what each caller saw** of the service (latency p50/p90/p99 of its calls to it), less what
    the caller's own slowness explains (the median z of its calls to at least ``MIN_CALLEES``
    other services). A network delay, a slow sidecar or a saturated listener show only there:
    the service's own spans time its handler;
  - **how the service's own calls went**: the median, over the services it calls (at least
    ``MIN_CALLEES``), of each call's median-latency z. One slow callee does not move it; a
    caller starved of CPU slows all its calls.

  Each z-score has a tail probability (Student's t for the length of the history, one-sided
  where only a rise hurts, except that a collapse of the service's median latency counts too:
  requests that fail fast); the window's p-value is the smallest, Bonferroni-corrected for how
  many were counted. A quantile is judged only when the window has a request beyond it (p90
  from 10 requests, p99 from 100).
* **Persistence**: one window is anomalous on its own only with decisive evidence; two
  consecutive windows of the same revision are anomalous together with the evidence one window
  alone would need without persistence. With ``p`` the window's p-value and ``p'`` the previous
  window's, ``q = min(sqrt(p), max(p', p))`` and the score is one minus ``min(1, q + q**2)``:
  P(q <= x) <= x**2 + x under any dependence between the two windows (consecutive windows of a
  real service are far from independent), so the score is still one minus a p-value. At the
  0.999 threshold: one window with p <= 1e-6, or two in a row with p <= 1e-3 each. Thin
  evidence never takes the single-window path: any from a window of fewer than
  ``min_requests`` requests (the service's own or a caller's), and a latency quantile with
  fewer than ``min_requests / 2`` requests beyond it (a p90 of fewer than 50 requests, a p99
  of fewer than 500: set by a few requests, such a tail moves further than the history's
  spread says when a caller has a hiccup).

The verdict is ``inconclusive`` with a reason until the service has ``min_windows`` windows of
history, and for a window too thin to judge: latency and errors are judged when the window has
``min_requests`` requests, or, for a service whose usual window has fewer but at least one (an
e-mail or payment service), on its median against its own equally thin windows (their spread
is the spread such windows have); otherwise a thin window is inconclusive.

A window judged anomalous is not learned, nor a suspicious one (p <= sqrt((1 - threshold) / 2),
about 0.022 at 0.999: a fault's first, not yet decisive windows would widen the baseline it is
measured against), unless the service stays so for ``relearn_after`` windows in a row: a lasting
change (more traffic, a slower release that was kept) becomes the new normal. A call's window is
learned unless its callee's or its caller's window was held back.

Revisions: the rows of one service and window arrive one by one; a revision is compared with
the other revisions already seen in that window, and the service's history learns the window
(revisions combined, weighted by requests) once a later window of the service arrives. Edges:
the callers' rows of a window may arrive before or after the callee's own row (they are keyed
by the caller, so they come from another partition), and a service's own calls come after its
own row (same key); a window is judged with each edge's window of the same time when it is
already there, else of the window before.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from clover.records import Anomaly, ServiceMetrics, Verdict
from models.detectors import AnomalyModel, contributions, feature_tails
from models.features import (
    BASE_FEATURES,
    DEPARTURE_FEATURES,
    EDGE_FEATURES,
    EDGE_SCORED,
    ServiceBaseline,
    base_vector,
    combine_revisions,
    edge_vector,
    rev_name,
    to_raw,
    z_name,
)

ONLINE_DETECTOR = "online_robust_baseline@3"
# Latency and error features mean little over a handful of requests.
_PER_REQUEST = np.array([f.startswith("latency") or f == "error_ratio" for f in BASE_FEATURES])
_EDGE_SCORED = np.array([f in EDGE_SCORED for f in EDGE_FEATURES])
# A window's q-quantile is judged only when at least one request lies beyond it
# (requests * (1 - q) >= 1): below that it is merely the slowest request, and one slow request
# in a thin window says little.
_TAIL = {"latency_p90_ms": 10, "latency_p99_ms": 100}
_TAIL_OWN = np.array([_TAIL.get(f, 0) for f in BASE_FEATURES])
_TAIL_EDGE = np.array([_TAIL.get(f, 0) for f in EDGE_SCORED])
# The share of a window's requests on the far side of each latency quantile: the requests the
# quantile rests on (a p90 of 18 calls is set by the slowest two).
_BEYOND = {"latency_p50_ms": 0.5, "latency_p90_ms": 0.1, "latency_p99_ms": 0.01}
_BEYOND_OWN = np.array([_BEYOND.get(f, 1.0) for f in BASE_FEATURES])
_BEYOND_EDGE = np.array([_BEYOND.get(f, 1.0) for f in EDGE_SCORED])
_BEYOND_CALLS = np.array([_BEYOND["latency_p50_ms"]])
_OWN_NAMES = [z_name(f) for f in BASE_FEATURES] + [rev_name(f) for f in BASE_FEATURES]
# A service's median latency that collapses says something too: requests that fail fast or
# return early (recorded spans may carry no status at all). What callers see is judged on rises.
_TWO_SIDED = frozenset({z_name("latency_p50_ms"), rev_name("latency_p50_ms")})
_KEEP_VERDICTS = 8  # recent windows per service whose learning state edges may ask about
MIN_CALLEES = 3  # a caller's own slowness is judged from its calls to at least this many


@dataclass
class _Service:
    baseline: ServiceBaseline
    window_start_us: int | None = None
    # This window's revisions so far: revision -> (base features, requests).
    revisions: dict[str, tuple[np.ndarray, float]] = field(default_factory=dict)
    # Revisions of this window held back from learning (anomalous, or nearly).
    anomalous: set[str] = field(default_factory=set)
    anomalous_run: int = 0
    # Recent windows: start -> whether it was held back (read when an edge into it closes).
    held: dict[int, bool] = field(default_factory=dict)
    # Persistence: revision -> {window start: the window's own p-value}.
    p_values: dict[str, dict[int, float]] = field(default_factory=dict)


@dataclass
class _Edge:
    """What one caller saw of one callee: its windows, and its own recent history."""

    caller: str
    baseline: ServiceBaseline
    window_start_us: int | None = None
    # This window's caller revisions: revision -> (edge features, requests).
    revisions: dict[str, tuple[np.ndarray, float]] = field(default_factory=dict)
    window_seconds: int = 10
    # The last closed window, not learned yet: (start, features, requests).
    closed: tuple[int, np.ndarray, float] | None = None

    def pending(self) -> tuple[np.ndarray, float]:
        pairs = list(self.revisions.values())
        vector = combine_revisions(pairs)
        requests = float(sum(r for _, r in pairs))
        vector[0] = np.log1p(requests / self.window_seconds)
        return vector, requests

    def view(self, start_us: int, window_us: int) -> tuple[int, np.ndarray, float] | None:
        """The edge's window starting at ``start_us``, else the one just before it."""
        candidates = []
        if self.window_start_us is not None and self.revisions:
            candidates.append((self.window_start_us, *self.pending()))
        if self.closed is not None:
            candidates.append(self.closed)
        for wanted in (start_us, start_us - window_us):
            for window in candidates:
                if window[0] == wanted:
                    return window
        return None


@dataclass
class _Evidence:
    """The z-scores of one window, with what they are named and measured against."""

    names: list[str] = field(default_factory=list)  # for the tail's direction
    labels: list[str] = field(default_factory=list)  # for contributions
    z: list[float] = field(default_factory=list)
    tails: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)  # raw units
    baselines: list[float] = field(default_factory=list)
    thin: list[bool] = field(default_factory=list)  # may not decide alone (OnlineScorer._thin)

    def add(self, names: Sequence[str], labels: Sequence[str], z: np.ndarray, history: int,
            values: Sequence[float], baselines: Sequence[float],
            thin: bool | Sequence[bool] | np.ndarray = False) -> None:
        self.names += list(names)
        self.labels += list(labels)
        self.z += [float(v) for v in z]
        self.tails += [float(t) for t in feature_tails(z, names, history, _TWO_SIDED)]
        self.values += list(values)
        self.baselines += list(baselines)
        self.thin += [thin] * len(names) if isinstance(thin, bool) else [bool(t) for t in thin]

    def p_value(self, *, thin: bool = True) -> float:
        """The smallest tail, Bonferroni-corrected for all the tails counted (NaN for none);
        without ``thin``, the smallest of the tails that do not rest on a thin window (1 when
        there are none)."""
        tails = np.array(self.tails, dtype=float)
        counted = np.isfinite(tails)
        if not counted.any():
            return float("nan")
        usable = counted if thin else counted & ~np.array(self.thin, dtype=bool)
        if not usable.any():
            return 1.0
        return float(min(1.0, np.min(tails[usable]) * counted.sum()))


def persistent_p_value(p: float, previous: float | None, decisive: float | None = None) -> float:
    """The p-value of "this window decisively, or it and the previous one together" (see the
    module's docstring); ``previous`` None when the window before was not scored;
    ``decisive`` (default ``p``) the part of the evidence that may decide alone."""
    if not np.isfinite(p):
        return p
    decisive = p if decisive is None else max(decisive, p)
    q = float(np.sqrt(decisive))
    if previous is not None and np.isfinite(previous):
        q = min(q, max(previous, p))
    return min(1.0, q + q * q)


def hold_back_p(threshold: float) -> float:
    """The p-value at or below which a scorer with this threshold does not learn a window
    (a suspicious one; see the module's docstring): about 0.022 at 0.999."""
    return float(np.sqrt((1.0 - threshold) / 2.0))


class OnlineScorer:
    """Scores service windows as they come; learns each service's normal on the way."""

    def __init__(self, model: AnomalyModel | None = None, *, threshold: float = 0.999,
                 min_windows: int = 6, baseline_windows: int = 60, min_requests: int = 10,
                 relearn_after: int = 30, top_contributions: int = 3,
                 model_name: str = "anomaly_model", persistence: bool = True) -> None:
        self.model = model
        self.threshold = model.threshold if model is not None else threshold
        self.min_windows = min_windows
        self.baseline_windows = baseline_windows
        self.min_requests = min_requests
        self.relearn_after = relearn_after
        self.top_contributions = top_contributions
        self.model_name = model_name
        self.persistence = persistence
        self._services: dict[tuple[str, str], _Service] = {}
        # callee (namespace, service) -> caller "namespace/service" -> edge
        self._edges: dict[tuple[str, str], dict[str, _Edge]] = {}
        # the same edges by caller: "namespace/service" -> callee "namespace/service" -> edge
        self._calls: dict[str, dict[str, _Edge]] = {}

    @property
    def hold_back_p(self) -> float:
        """A window with a p-value at most this is not learned (see the module's docstring)."""
        return hold_back_p(self.threshold)

    # -- River's interface ----------------------------------------------------------------

    def score_one(self, metrics: ServiceMetrics, *, now_us: int | None = None) -> Anomaly:
        """The verdict on one service window; changes nothing (see :meth:`learn_one`)."""
        return self._score(metrics, now_us)[0]

    def _score(self, metrics: ServiceMetrics, now_us: int | None) -> tuple[Anomaly, float]:
        """The verdict, and the window's own p-value (NaN when it was not judged)."""
        if metrics.peer_service is not None:
            raise ValueError(f"{metrics.namespace}/{metrics.service} -> {metrics.peer_service}: "
                             "edge rows are not scored, only a service's own rows (give them "
                             "to learn_edge)")
        state = self._state(metrics)
        values = base_vector(_frame(metrics))
        history = state.baseline if state.window_start_us in (None, metrics.window_start_us) \
            else _advanced(state, self.baseline_windows)
        medians, scales = history.stats()
        z = (values - medians) / scales
        others = [v for rev, v in state.revisions.items() if rev != metrics.revision] \
            if state.window_start_us == metrics.window_start_us else []
        rev = (values - combine_revisions(others)) / scales if others \
            else np.full(len(BASE_FEATURES), np.nan)
        usual = float(np.expm1(medians[0]) * metrics.window_seconds) \
            if np.isfinite(medians[0]) else float("nan")
        judged = self._enough(metrics.requests, usual)
        if not judged:
            z = np.where(_PER_REQUEST, np.nan, z)
            rev = np.where(_PER_REQUEST, np.nan, rev)
        z = np.where(_TAIL_OWN > metrics.requests, np.nan, z)
        rev = np.where(_TAIL_OWN > metrics.requests, np.nan, rev)
        emitted = now_us if now_us is not None else time.time_ns() // 1000
        raw_values = [to_raw(f, v) for f, v in zip(BASE_FEATURES, values, strict=True)]

        def verdict(score: float | None, reason: str | None, detector: str,
                    evidence: _Evidence | None = None) -> Anomaly:
            kind: Verdict
            if score is None or not np.isfinite(score):
                kind, score = "inconclusive", None
            else:
                kind = "anomalous" if score >= self.threshold else "normal"
            found = [] if evidence is None else contributions(
                np.array(evidence.z, dtype=float), evidence.names, evidence.values,
                evidence.baselines, self.top_contributions, _TWO_SIDED)
            if evidence is not None:
                labels = dict(zip(evidence.names, evidence.labels, strict=True))
                for c in found:
                    c.feature = labels.get(c.feature, c.feature)
            return Anomaly(
                namespace=metrics.namespace, service=metrics.service,
                revision=metrics.revision, window_start_us=metrics.window_start_us,
                window_seconds=metrics.window_seconds, detector=detector,
                threshold=float(self.threshold), verdict=kind, emitted_us=emitted,
                score=None if score is None else round(float(min(max(score, 0.0), 1.0)), 6),
                reason=reason, contributions=found)

        if len(history) < self.min_windows:
            return verdict(None, f"learning: {len(history)} of {self.min_windows} windows of "
                           "history for this service", ONLINE_DETECTOR), float("nan")
        if not judged and not usual >= self.min_requests:
            return verdict(None, f"too little traffic: {metrics.requests} requests in the window"
                           f" and ~{usual:.0f} usually (< {self.min_requests})",
                           ONLINE_DETECTOR), float("nan")
        key = f"{metrics.namespace}/{metrics.service}"
        if self.model is not None and key in self.model.baseline_.profiles_:
            row = pd.DataFrame([[metrics.namespace, metrics.service, metrics.window_start_us,
                                 *values, *z, *np.nan_to_num(rev)]],
                               columns=["namespace", "service", "window_start_us",
                                        *BASE_FEATURES, *DEPARTURE_FEATURES])
            score = float(self.model.anomaly_score(row)[0])
            evidence = _Evidence()
            evidence.add(BASE_FEATURES, BASE_FEATURES, self.model.baseline_.z_scores(row)[0],
                         len(history), raw_values,
                         [to_raw(f, m) for f, m in zip(
                             BASE_FEATURES, self.model.baseline_.baselines(row)[0][0],
                             strict=True)])
            return verdict(score, None, self.model_name, evidence), 1.0 - score
        evidence = _Evidence()
        raw_medians = [to_raw(f, m) for f, m in zip(BASE_FEATURES, medians, strict=True)]
        evidence.add(_OWN_NAMES, list(BASE_FEATURES) + [f"{f} vs other revisions"
                                                          for f in BASE_FEATURES],
                     np.concatenate([z, rev]), len(history), raw_values + raw_values,
                     raw_medians + raw_medians,
                     thin=np.tile(self._thin(metrics.requests, _BEYOND_OWN), 2))
        self._edge_evidence(metrics, evidence)
        self._call_evidence(metrics, evidence, len(history))
        p = evidence.p_value()
        if self.persistence:
            previous = state.p_values.get(metrics.revision, {}).get(
                metrics.window_start_us - metrics.window_seconds * 1_000_000)
            score = 1.0 - persistent_p_value(p, previous, evidence.p_value(thin=False))
        else:
            score = 1.0 - p
        reason = None if self.model is None else f"{key} is not in the trained model: scored " \
            "against its recent history"
        return verdict(score, reason, ONLINE_DETECTOR, evidence), p

    def _thin(self, requests: float, beyond: np.ndarray) -> np.ndarray:
        """Which evidence of a window of ``requests`` requests is thin (may not decide alone):
        all of it when the window has fewer than ``min_requests``, and a latency quantile
        with fewer than ``min_requests / 2`` requests beyond it (``beyond``: the share of
        requests past each feature's quantile, 1 for features that are not quantiles). For
        the median this is the window rule itself; a p90 decides alone from 50 requests,
        a p99 from 500. A tail quantile of fewer rests on a few requests, and a couple of
        slow ones (a caller's hiccup) moves it further than the history's spread says."""
        return (requests < self.min_requests) | (requests * beyond < self.min_requests / 2)

    def _enough(self, requests: int, usual: float) -> bool:
        """Whether latency and errors of a window of ``requests`` requests can be judged
        against a history whose windows usually hold ``usual`` requests."""
        if requests >= self.min_requests:
            return True
        return bool(1.0 <= usual < self.min_requests and requests >= 1)

    def _edge_evidence(self, metrics: ServiceMetrics, evidence: _Evidence) -> None:
        """Add what each caller saw of this service in this window (or the one before), less
        what the caller's own slowness explains: when the caller's calls to its other services
        (at least ``MIN_CALLEES``) slowed too, the median of their z-scores is taken off, so a
        caller starved of CPU does not make its callees look slow."""
        edges = self._edges.get((metrics.namespace, metrics.service), {})
        window_us = metrics.window_seconds * 1_000_000
        callee = f"{metrics.namespace}/{metrics.service}"
        for caller, edge in sorted(edges.items()):
            if len(edge.baseline) < self.min_windows:
                continue
            found = edge.view(metrics.window_start_us, window_us)
            if found is None:
                continue
            start, vector, requests = found
            history = edge.baseline
            medians, scales = history.stats()
            usual = float(np.expm1(medians[0]) * metrics.window_seconds) \
                if np.isfinite(medians[0]) else float("nan")
            if not self._enough(int(requests), usual):
                continue
            z = ((vector - medians) / scales)[_EDGE_SCORED]
            z = np.where(_TAIL_EDGE > requests, np.nan, z)
            own = self._calls_median(caller, start, window_us, leave_out=callee)
            if own is not None and own[0] > 0:
                z = z - own[0]
            evidence.add([f"{f}__from_{caller}" for f in EDGE_SCORED],
                         [f"{f} seen by {caller}"[:128] for f in EDGE_SCORED], z,
                         len(history),
                         [to_raw(f, v) for f, v in zip(EDGE_SCORED, vector[_EDGE_SCORED],
                                                       strict=True)],
                         [to_raw(f, m) for f, m in zip(EDGE_SCORED, medians[_EDGE_SCORED],
                                                       strict=True)],
                         thin=self._thin(requests, _BEYOND_EDGE))

    def _call_evidence(self, metrics: ServiceMetrics, evidence: _Evidence,
                       history: int) -> None:
        """Add how this service's own calls to others went: the median, over the services it
        calls (at least ``MIN_CALLEES``), of the z-score of the call's median latency against
        that edge's history. One slow callee does not move it; a caller starved of CPU, or
        whose own network is slow, slows all its calls. Its calls of this window come after
        its own row (same key), so they are mostly those of the window before."""
        found = self._calls_median(f"{metrics.namespace}/{metrics.service}",
                                   metrics.window_start_us, metrics.window_seconds * 1_000_000)
        if found is None:
            return
        z, value, baseline, callees, requests = found
        evidence.add(["latency_p50_ms__calls"],
                     [f"latency_p50_ms of its calls to {callees} services (median)"],
                     np.array([z]), history, [value], [baseline],
                     thin=self._thin(requests, _BEYOND_CALLS))

    def _calls_median(self, caller: str, start_us: int, window_us: int,
                      leave_out: str | None = None) -> tuple[float, float, float, int,
                                                            float] | None:
        """(z, value ms, baseline ms, callees, requests) of the median call of ``caller`` in
        the window at ``start_us`` (else the one before), over its calls to at least
        ``MIN_CALLEES`` services other than ``leave_out``; None with fewer."""
        found: list[tuple[float, float, float]] = []  # z, value, baseline (ms)
        requests = 0.0
        for callee, edge in sorted(self._calls.get(caller, {}).items()):
            if callee == leave_out or len(edge.baseline) < self.min_windows:
                continue
            view = edge.view(start_us, window_us)
            if view is None:
                continue
            _, vector, count = view
            medians, scales = edge.baseline.stats()
            z = (vector[1] - medians[1]) / scales[1]
            if np.isfinite(z):
                found.append((float(z), to_raw("latency_p50_ms", vector[1]),
                              to_raw("latency_p50_ms", medians[1])))
                requests += count
        if len(found) < MIN_CALLEES:
            return None
        z, value, baseline = sorted(found)[len(found) // 2]
        return z, value, baseline, len(found), requests

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
        state.held[metrics.window_start_us] = bool(state.anomalous) \
            and state.anomalous_run + 1 < self.relearn_after
        for start in sorted(state.held)[:-_KEEP_VERDICTS]:
            del state.held[start]

    def learn_edge(self, metrics: ServiceMetrics) -> None:
        """Take a caller -> callee row: what the caller saw of the callee in that window.

        The callee's windows are then judged with it too; the edge learns its own history as
        its windows close (unless the callee's or the caller's window was held back: either
        one's trouble makes the call's latency what it was)."""
        if metrics.peer_service is None:
            raise ValueError(f"{metrics.namespace}/{metrics.service}: not an edge row (no "
                             "peer_service); score it with process")
        callee = (metrics.peer_namespace or metrics.namespace, metrics.peer_service)
        caller = f"{metrics.namespace}/{metrics.service}"
        edges = self._edges.setdefault(callee, {})
        edge = edges.get(caller)
        if edge is None:
            edge = edges[caller] = _Edge(
                caller, ServiceBaseline(self.baseline_windows, features=EDGE_FEATURES),
                window_seconds=metrics.window_seconds)
            self._calls.setdefault(caller, {})[f"{callee[0]}/{callee[1]}"] = edge
        if edge.window_start_us is not None and metrics.window_start_us != edge.window_start_us:
            if metrics.window_start_us < edge.window_start_us:
                return  # late: the edge's history has moved on
            if edge.revisions:
                # The window closed before is learned now (its callee's verdict is in by
                # now), so a window being judged is never part of its own history.
                if edge.closed is not None and not any(
                        self._was_held(end, edge.closed[0])
                        for end in (callee, (metrics.namespace, metrics.service))):
                    edge.baseline.learn(edge.closed[1])
                edge.closed = (edge.window_start_us, *edge.pending())
            edge.revisions = {}
        edge.window_start_us = metrics.window_start_us
        edge.window_seconds = metrics.window_seconds
        edge.revisions[metrics.revision] = (
            edge_vector(metrics.requests, metrics.window_seconds, metrics.latency_p50_ms,
                        metrics.latency_p90_ms, metrics.latency_p99_ms),
            float(metrics.requests))

    def process(self, metrics: ServiceMetrics, *, now_us: int | None = None) -> Anomaly:
        """Score a window, then learn it unless it was anomalous (or nearly: see the module's
        docstring)."""
        return self.judge(metrics, now_us=now_us)[0]

    def judge(self, metrics: ServiceMetrics, *,
              now_us: int | None = None) -> tuple[Anomaly, float]:
        """:meth:`process`, also giving the window's own p-value (before persistence; NaN
        when it was not judged)."""
        anomaly, p = self._score(metrics, now_us)
        state = self._state(metrics)
        if np.isfinite(p):
            recent = state.p_values.setdefault(metrics.revision, {})
            recent[metrics.window_start_us] = p
            for start in sorted(recent)[:-2]:
                del recent[start]
        hold = anomaly.verdict == "anomalous" or (
            anomaly.detector == ONLINE_DETECTOR and np.isfinite(p) and p <= self.hold_back_p)
        self.learn_one(metrics, anomalous=hold)
        return anomaly, p

    def _was_held(self, service: tuple[str, str], start_us: int) -> bool:
        state = self._services.get(service)
        return state is not None and state.held.get(start_us, False)

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
    preview = ServiceBaseline(baseline_windows, state.baseline.history.copy(),
                              state.baseline.features)
    preview.learn(combine_revisions(normal))
    return preview


def _frame(metrics: ServiceMetrics) -> pd.DataFrame:
    return pd.DataFrame([{
        "window_seconds": metrics.window_seconds, "requests": metrics.requests,
        "errors": metrics.errors, "latency_p50_ms": metrics.latency_p50_ms,
        "latency_p90_ms": metrics.latency_p90_ms, "latency_p99_ms": metrics.latency_p99_ms,
        "bytes_in": metrics.bytes_in, "bytes_out": metrics.bytes_out,
        "connections_reset": metrics.connections_reset}])
