"""Call patterns: requests of a service whose set of calls is rare for it (models.structure)."""

from __future__ import annotations

import dataclasses

import numpy as np

from analytics.windows import aggregate
from clover import records
from clover.records import Anomaly, SpanRecord
from models.structure import CallPatternScorer, PatternWindow, flag_rare_patterns

WINDOW_US = 10_000_000
START_US = 1_700_000_000_000_000


def _span(span_id: str, service: str, operation: str, kind: str, start_us: int,
          parent: str | None = None) -> SpanRecord:
    return SpanRecord(trace_id="t" + span_id, span_id=span_id, service=service,
                      operation=operation, kind=kind, start_us=start_us,  # type: ignore[arg-type]
                      duration_us=1_000, error=False, source="other", parent_span_id=parent,
                      namespace="shop")


def test_a_windows_patterns_are_read_from_its_service_rows() -> None:
    spans = [
        _span("a", "checkout", "PlaceOrder", "server", START_US),
        _span("b", "checkout", "GetCart", "client", START_US + 10, parent="a"),
        _span("c", "checkout", "GetCart", "client", START_US + 20, parent="a"),
        _span("d", "checkout", "prepare", "internal", START_US + 30, parent="a"),
        _span("e", "checkout", "Charge", "client", START_US + 40, parent="d"),  # grandchild
        _span("f", "checkout", "PlaceOrder", "server", START_US + 50),
        _span("g", "checkout", "PlaceOrder", "server", START_US + WINDOW_US),
        _span("h", "cart", "GetCart", "server", START_US + 15, parent="b"),
    ]
    rows = aggregate(spans)
    windows = [w for w in map(PatternWindow.of, rows) if w is not None]
    assert [(w.service, w.window_start_us - START_US, dict(w.patterns)) for w in windows] == [
        ("cart", 0, {"": 1}),
        ("checkout", 0, {"GetCart+prepare": 1, "": 1}),
        ("checkout", WINDOW_US, {"": 1}),
    ]
    assert windows[1].requests == 2
    assert PatternWindow.of(dataclasses.replace(rows[1], peer_service="cart")) is None  # edge


def _windows(count: int, rng: np.random.Generator, *, requests: float = 50.0,
             broken: dict[int, float] | None = None, service: str = "frontend",
             mix: dict[str, float] | None = None) -> list[PatternWindow]:
    """Windows of a service with a steady mix of request types (Poisson traffic); in window
    i of ``broken`` that share of requests lose the calls after the first one."""
    mix = mix or {"a+b+c": 0.6, "a+d": 0.3, "e": 0.1}
    out = []
    for i in range(count):
        patterns: dict[str, int] = {}
        for pattern, n in zip(mix, rng.multinomial(max(1, rng.poisson(requests)),
                                                   list(mix.values())), strict=True):
            cut = rng.binomial(n, (broken or {}).get(i, 0.0))
            if n - cut:
                patterns[pattern] = patterns.get(pattern, 0) + int(n - cut)
            if cut:
                first = pattern.split("+")[0] + "!"
                patterns[first] = patterns.get(first, 0) + int(cut)
        out.append(PatternWindow("shop", service, START_US + i * WINDOW_US, 10, patterns))
    return out


def test_requests_that_stop_making_their_calls_are_flagged_and_normal_windows_are_not() -> None:
    rng = np.random.default_rng(3)
    windows = _windows(130, rng, broken={i: 0.3 for i in range(100, 112)})
    scorer = CallPatternScorer()
    scores = [scorer.judge(w).score for w in windows]
    assert all(np.isnan(s) for s in scores[:4])  # fewer than min_history requests yet
    flagged = [i for i, s in enumerate(scores) if s >= scorer.threshold]
    # The broken windows are held back, so the truncated patterns stay rare to the end.
    assert flagged == list(range(100, 112))


def test_a_rare_request_type_now_and_then_is_normal() -> None:
    rng = np.random.default_rng(4)
    windows = _windows(300, rng, mix={"a+b": 0.6, "a+c": 0.395, "x": 0.005})
    scorer = CallPatternScorer()
    scores = np.array([scorer.judge(w).score for w in windows])
    assert np.nanmax(scores) < scorer.threshold


def test_a_thin_service_is_judged_by_the_count_one_rare_order_says_little() -> None:
    # Three orders a window, each with the same calls. One order without them, once, is a
    # call that fell into the next window; every order without them, twice in a row, is not.
    rng = np.random.default_rng(5)
    windows = _windows(200, rng, requests=3.0, service="checkout",
                       mix={"charge+email+ship": 1.0},
                       broken={150: 1 / 3, 180: 1.0, 181: 1.0})
    scorer = CallPatternScorer()
    judged = [scorer.judge(w) for w in windows]
    flagged = [i for i, j in enumerate(judged) if j.score >= scorer.threshold]
    assert 150 not in flagged
    assert flagged == [181] or flagged == [180, 181]
    assert judged[180].p_value < 1e-3 and judged[181].p_value < 1e-3


def test_a_lasting_change_of_patterns_becomes_normal() -> None:
    rng = np.random.default_rng(6)
    windows = _windows(160, rng, broken={i: 0.5 for i in range(60, 160)})
    scorer = CallPatternScorer(relearn_after=10)
    scores = [scorer.judge(w).score for w in windows]
    assert scores[60] >= scorer.threshold or scores[61] >= scorer.threshold
    assert all(s < scorer.threshold for s in scores[100:])


def test_a_service_whose_requests_often_have_a_pattern_of_their_own_is_not_flagged() -> None:
    # A search page calls the catalogue once per result: many patterns, each one rare. How
    # often a request is rare is learned, so such requests are this service's normal.
    rng = np.random.default_rng(7)
    windows = _windows(200, rng)
    for i, window in enumerate(windows):
        own = {f"search*{i}-{k}": 1 for k in range(int(rng.poisson(2.0)))}
        windows[i] = PatternWindow("shop", "frontend", window.window_start_us, 10,
                                   {**window.patterns, **own})
    scorer = CallPatternScorer()
    scores = np.array([scorer.judge(w).score for w in windows])
    assert np.nanmax(scores) < scorer.threshold


def test_a_flagged_window_names_its_rare_patterns_and_a_normal_one_is_left_as_it_was() -> None:
    rng = np.random.default_rng(8)
    windows = _windows(120, rng, broken={i: 0.4 for i in range(110, 112)})
    scorer = CallPatternScorer()
    judged = [scorer.judge(w) for w in windows]
    online = Anomaly(namespace="shop", service="frontend", revision="r1",
                     window_start_us=windows[111].window_start_us, window_seconds=10,
                     detector="online", threshold=0.999, verdict="normal", emitted_us=1,
                     score=0.5)
    flagged = flag_rare_patterns(online, judged[111])
    assert flagged.verdict == "anomalous" and flagged.detector == "call_patterns"
    assert flagged.score is not None and flagged.score >= scorer.threshold
    features = [c.feature for c in flagged.contributions]
    assert features and set(features) <= {"call pattern a!", "call pattern e!"}
    assert all(c.value and c.value >= 1 and c.baseline == 0.0 for c in flagged.contributions)
    assert flagged.reason is not None and flagged.reason.startswith("rare call patterns: a!")
    records.validate(Anomaly, records.to_dict(flagged))
    assert flag_rare_patterns(online, judged[100]) is online
    inconclusive = flag_rare_patterns(online, judged[0])  # NaN score
    assert inconclusive is online


def test_a_service_with_ever_new_patterns_is_remembered_within_bounds() -> None:
    scorer = CallPatternScorer(max_patterns=100)
    for i in range(300):
        scorer.judge(PatternWindow("shop", "search", START_US + i * WINDOW_US, 10,
                                   {"list": 20, f"item-{i}": 1}))
    history = scorer._history[("shop", "search")]
    assert len(history.seen) <= 100 and history.seen["list"] == 300 * 20
