"""Call structure: requests of a service whose set of calls is rare for that service.

A fault in a service's code may change neither its latency nor its traffic, only what its
requests go on to do: an early ``return`` skips the calls after it, an ``exception`` ends the
request before them (the Nezha recording has no status codes to show either). Each server span
of a service has a **call pattern**, the set of operations of its direct children (the calls
it makes, its internal steps), e.g. ``ChargeCard+EmptyUserCart+...+ShipOrder`` for an order.

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

This needs the spans themselves, which the stream's aggregation does not pass on: the window
rows (``ServiceMetrics``) have no call patterns. ``clover models evaluate`` measures it on the
Nezha spans beside the online scorer (see the README); in the stream it would need the
aggregation to count each window's patterns.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import binom

from clover.records import SpanRecord
from models.online import hold_back_p, persistent_p_value


@dataclass(frozen=True)
class PatternWindow:
    """The call patterns of one service's server spans that started in one window."""

    namespace: str
    service: str
    window_start_us: int
    window_seconds: int
    patterns: Mapping[str, int]  # pattern -> server spans with it

    @property
    def requests(self) -> int:
        return sum(self.patterns.values())


def call_patterns(spans: Iterable[SpanRecord], window_seconds: int = 10) -> list[PatternWindow]:
    """Each (service, window)'s call patterns, in window order (then service): a server span's
    pattern is the sorted set of its direct children's operations ("" for none)."""
    spans = list(spans)
    children: dict[str, set[str]] = defaultdict(set)
    for span in spans:
        if span.parent_span_id is not None:
            children[span.parent_span_id].add(span.operation)
    window_us = window_seconds * 1_000_000
    counts: dict[tuple[int, str, str], Counter[str]] = defaultdict(Counter)
    for span in spans:
        if span.kind == "server":
            start = span.start_us // window_us * window_us
            pattern = "+".join(sorted(children.get(span.span_id, ())))
            counts[(start, span.namespace or "", span.service)][pattern] += 1
    return [PatternWindow(namespace, service, start, window_seconds, dict(patterns))
            for (start, namespace, service), patterns in sorted(counts.items())]


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
                 persistence: bool = True) -> None:
        self.threshold = threshold
        self.rare_share = rare_share
        # A pattern at rare_share is then expected about twice in the history: one not seen
        # yet is rare, not merely unlucky.
        self.min_history = min_history
        self.relearn_after = relearn_after
        self.persistence = persistence
        self._history: dict[tuple[str, str], _History] = {}

    @property
    def hold_back_p(self) -> float:
        """As the online scorer's: a window this suspicious is not learned."""
        return hold_back_p(self.threshold)

    def rare_requests(self, window: PatternWindow) -> int:
        history = self._history.get((window.namespace, window.service), _History())
        limit = self.rare_share * history.requests
        return sum(n for pattern, n in window.patterns.items() if history.seen[pattern] < limit)

    def score_one(self, window: PatternWindow) -> float:
        """The window's own p-value (NaN before ``min_history`` requests of history)."""
        history = self._history.get((window.namespace, window.service))
        if history is None or history.requests < self.min_history or not window.requests:
            return float("nan")
        rare = self.rare_requests(window)
        if not rare:
            return 1.0
        share = (history.rare + 1) / (history.requests + 2)  # never 0 (Laplace)
        return float(binom.sf(rare - 1, window.requests, share))

    def learn_one(self, window: PatternWindow, *, anomalous: bool = False) -> None:
        history = self._history.setdefault((window.namespace, window.service), _History())
        history.held_run = history.held_run + 1 if anomalous else 0
        if anomalous and history.held_run < self.relearn_after:
            return
        if history.requests >= self.min_history:
            history.rare += self.rare_requests(window)
        history.seen.update(window.patterns)
        history.requests += window.requests

    def judge(self, window: PatternWindow) -> tuple[float, float]:
        """(score, the window's own p-value), then learns the window unless it is held back;
        score NaN while the service's history is too short."""
        history = self._history.setdefault((window.namespace, window.service), _History())
        p = self.score_one(window)
        previous = history.p_values.get(window.window_start_us - window.window_seconds
                                        * 1_000_000)
        score = 1.0 - (persistent_p_value(p, previous) if self.persistence else p)
        if np.isfinite(p):
            history.p_values = {window.window_start_us: p}
        self.learn_one(window, anomalous=bool(np.isfinite(p) and (
            score >= self.threshold or p <= self.hold_back_p)))
        return score, p


def judge_all(windows: Sequence[PatternWindow],
              scorer: CallPatternScorer) -> dict[tuple[str, str, int], tuple[float, float]]:
    """Every window judged in order: (namespace, service, start) -> (score, own p)."""
    return {(w.namespace, w.service, w.window_start_us): scorer.judge(w) for w in windows}
