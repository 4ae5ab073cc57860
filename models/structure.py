"""Call structure: requests of a service whose set of calls is rare for that service.

A fault in a service's code may change neither its latency nor its traffic, only what its
requests go on to do: an early ``return`` skips the calls after it, an ``exception`` ends the
request before them (the Nezha recording has no status codes to show either). Each request
of a service has a **call pattern**, the set of operations of its span's direct children (the
calls it makes, its internal steps), e.g. ``ChargeCard+EmptyUserCart+...+ShipOrder`` for an
order.

:class:`CallPatternScorer` learns, per service, how often each pattern has been seen, and judges
a window by its **rare** requests: those whose pattern is so far below ``rare_share`` of the
service's past requests. Some requests of a real service are rare (a page seldom visited, a
call that spilled into the next window); the share of requests that were rare when they were
judged is learned too, and a window's p-value is the binomial tail of its rare requests at that
share. The count test accounts for the window's size itself: one rare request among three says
little, three among three say much, whatever the service's usual traffic.

Windows are judged as the online scorer judges a service window (River's ``learn_one``/
``score_one``): not before ``min_history`` requests of history, persistence as in
:func:`models.online.persistent_p_value`, and a window with p at most ``hold_back_p`` is not
learned unless that lasts ``relearn_after`` windows (a new release's new patterns become normal).

The patterns come with the window rows: the stream's aggregation counts them per service
window (``ServiceMetrics.call_patterns``, analytics/windows.py), and the scoring agent
(streams/score.py) and ``clover models evaluate`` both judge them with
:func:`flag_rare_patterns` beside the online scorer.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import binom

from clover.records import Anomaly, Contribution, ServiceMetrics
from models.online import OnlineScorer, hold_back_p, persistent_p_value

DETECTOR = "call_patterns"
TOP_PATTERNS = 3  # rare patterns named in a verdict


@dataclass(frozen=True)
class PatternWindow:
    """The call patterns of one service row's requests in one window."""

    namespace: str
    service: str
    window_start_us: int
    window_seconds: int
    patterns: Mapping[str, int]  # pattern -> requests with it

    @classmethod
    def of(cls, metrics: ServiceMetrics) -> PatternWindow | None:
        """The row's patterns (None for an edge row or a row without them)."""
        if metrics.peer_service is not None or not metrics.call_patterns:
            return None
        return cls(metrics.namespace, metrics.service, metrics.window_start_us,
                   metrics.window_seconds, metrics.call_patterns)

    @property
    def requests(self) -> int:
        return sum(self.patterns.values())


@dataclass(frozen=True)
class RarePattern:
    """A pattern of a judged window that was rare for the service."""

    pattern: str
    requests: int  # in the window
    past_share: float  # of the service's past requests that had it


@dataclass(frozen=True)
class PatternJudgement:
    """The verdict of :meth:`CallPatternScorer.judge` on one window."""

    score: float  # NaN while the service's history is too short
    p_value: float
    rare: list[RarePattern]  # the window's rare patterns, most requests first
    threshold: float  # the judging scorer's: a score at or above it is anomalous


@dataclass
class _History:
    seen: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    rare: int = 0  # of those requests, how many were rare when they were judged
    held_run: int = 0
    p_values: dict[int, float] = field(default_factory=dict)  # window start -> own p


class CallPatternScorer:
    """Scores each service window by its requests with a rare call pattern (module docstring)."""

    def __init__(self, *, threshold: float = 0.999, rare_share: float = 0.01,
                 min_history: int = 200, relearn_after: int = 30,
                 persistence: bool = True, max_patterns: int = 1000) -> None:
        self.threshold = threshold
        self.rare_share = rare_share
        # A pattern at rare_share is then expected about twice in the history: one not seen
        # yet is rare, not merely unlucky.
        self.min_history = min_history
        self.relearn_after = relearn_after
        self.persistence = persistence
        # Patterns remembered per service: beyond it the least common half is forgotten (they
        # are rare anyway), so a long-running agent's memory stays bounded.
        self.max_patterns = max_patterns
        self._history: dict[tuple[str, str], _History] = {}

    @classmethod
    def beside(cls, scorer: OnlineScorer) -> CallPatternScorer:
        """A scorer to judge windows beside ``scorer``: at its threshold, relearning a lasting
        change after as many windows."""
        return cls(threshold=scorer.threshold, relearn_after=scorer.relearn_after)

    @property
    def hold_back_p(self) -> float:
        """As the online scorer's: a window this suspicious is not learned."""
        return hold_back_p(self.threshold)

    def rare_patterns(self, window: PatternWindow) -> list[RarePattern]:
        """The window's patterns seen in less than ``rare_share`` of the service's past
        requests, most requests first."""
        history = self._history.get((window.namespace, window.service), _History())
        limit = self.rare_share * history.requests
        rare = [RarePattern(pattern, n, history.seen[pattern] / max(history.requests, 1))
                for pattern, n in window.patterns.items() if history.seen[pattern] < limit]
        return sorted(rare, key=lambda r: (-r.requests, r.pattern))

    def rare_requests(self, window: PatternWindow) -> int:
        return sum(r.requests for r in self.rare_patterns(window))

    def score_one(self, window: PatternWindow) -> float:
        """The window's own p-value (NaN before ``min_history`` requests of history)."""
        return self._p_value(window, self.rare_requests(window))

    def _p_value(self, window: PatternWindow, rare: int) -> float:
        """score_one, given the window's rare requests."""
        history = self._history.get((window.namespace, window.service))
        if history is None or history.requests < self.min_history or not window.requests:
            return float("nan")
        if not rare:
            return 1.0
        share = (history.rare + 1) / (history.requests + 2)  # never 0 (Laplace)
        return float(binom.sf(rare - 1, window.requests, share))

    def learn_one(self, window: PatternWindow, *, anomalous: bool = False) -> None:
        self._learn(window, self.rare_requests(window), anomalous=anomalous)

    def _learn(self, window: PatternWindow, rare: int, *, anomalous: bool) -> None:
        """learn_one, given the window's rare requests (as the history was before it)."""
        history = self._history.setdefault((window.namespace, window.service), _History())
        history.held_run = history.held_run + 1 if anomalous else 0
        if anomalous and history.held_run < self.relearn_after:
            return
        if history.requests >= self.min_history:
            history.rare += rare
        history.seen.update(window.patterns)
        history.requests += window.requests
        if len(history.seen) > self.max_patterns:
            history.seen = Counter(dict(history.seen.most_common(self.max_patterns // 2)))

    def judge(self, window: PatternWindow) -> PatternJudgement:
        """The window's verdict, then learns the window unless it is held back; the score is
        NaN while the service's history is too short."""
        history = self._history.setdefault((window.namespace, window.service), _History())
        # Measured once against the history as it is, for the p-value, the verdict's
        # explanation and the learning.
        rare = self.rare_patterns(window)
        rare_requests = sum(r.requests for r in rare)
        p = self._p_value(window, rare_requests)
        previous = history.p_values.get(window.window_start_us - window.window_seconds
                                        * 1_000_000)
        score = 1.0 - (persistent_p_value(p, previous) if self.persistence else p)
        if np.isfinite(p):
            history.p_values = {window.window_start_us: p}
        self._learn(window, rare_requests, anomalous=bool(np.isfinite(p) and (
            score >= self.threshold or p <= self.hold_back_p)))
        return PatternJudgement(score, p, rare if np.isfinite(p) else [], self.threshold)


def judge_all(windows: Sequence[PatternWindow], scorer: CallPatternScorer
              ) -> dict[tuple[str, str, int], PatternJudgement]:
    """Every window judged in order: (namespace, service, start) -> judgement."""
    return {(w.namespace, w.service, w.window_start_us): scorer.judge(w) for w in windows}


def flag_rare_patterns(anomaly: Anomaly, judgement: PatternJudgement) -> Anomaly:
    """The online scorer's verdict on a window, made anomalous when its call patterns are
    (at the judgement's threshold), naming the rare patterns: the pattern as the feature, the
    window's requests with it as the value, and its share of the service's past requests as
    the baseline. A window both scorers flag keeps the online scorer's explanation."""
    score, threshold = judgement.score, judgement.threshold
    if not (score >= threshold) or anomaly.verdict == "anomalous":  # NaN: not judged
        return anomaly
    shown = judgement.rare[:TOP_PATTERNS]
    total = sum(r.requests for r in shown) or 1
    names = "; ".join(f"{r.pattern or '(no calls)'} in {r.requests} requests" for r in shown)
    return dataclasses.replace(
        anomaly, verdict="anomalous", detector=DETECTOR, score=round(min(score, 1.0), 6),
        threshold=float(threshold),
        reason=f"rare call patterns: {names}"[:1000],
        contributions=[Contribution(feature=f"call pattern {r.pattern or '(no calls)'}"[:128],
                                    weight=round(r.requests / total, 6),
                                    value=float(r.requests), baseline=round(r.past_share, 6))
                       for r in shown])
