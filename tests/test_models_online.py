"""The online scorer: inconclusive while learning, then verdicts that are valid Anomaly records."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from clover import records
from models.online import ONLINE_DETECTOR, OnlineScorer
from models.train import train_model
from tests.test_models_features import as_records, synthetic_metrics


def test_inconclusive_with_a_reason_until_enough_windows() -> None:
    scorer = OnlineScorer(min_windows=6)
    verdicts = [scorer.process(m, now_us=1) for m in as_records(
        synthetic_metrics(windows=10, services=("cart",)))]
    assert [v.verdict for v in verdicts[:6]] == ["inconclusive"] * 6
    assert all(v.score is None and "learning: " in v.reason for v in verdicts[:6])
    assert verdicts[0].reason == "learning: 0 of 6 windows of history for this service"
    assert [v.verdict for v in verdicts[6:]] == ["normal"] * 4
    for v in verdicts:
        records.encode(v)  # each one satisfies the published anomaly.v1 schema


def test_too_little_traffic_is_inconclusive_not_normal() -> None:
    # A service that usually has no request in a window (only connections, say).
    frame = synthetic_metrics(windows=20, services=("cart",))
    frame["requests"] = 0
    frame["errors"] = 0
    frame[["error_rate", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms"]] = None
    frame.loc[frame.index[-1], ["requests", "latency_p50_ms"]] = [1, 30.0]
    scorer = OnlineScorer(min_requests=10)
    verdicts = [scorer.process(m) for m in as_records(frame)]
    assert verdicts[-1].verdict == "inconclusive"
    assert verdicts[-1].reason.startswith("too little traffic: 1 requests in the window and ~0")


def test_a_thin_but_steady_service_is_judged_on_its_median_against_its_own_thin_windows(
        ) -> None:
    # A service with ~3 requests per window (an e-mail or payment service) is judged against
    # its own equally thin history; its p90/p99 (the slowest request) are not.
    frame = synthetic_metrics(windows=40, services=("email",),
                              spikes={("email", i): {"latency": 50.0} for i in (30, 31)})
    frame["requests"] = 3
    frame["errors"] = 0
    frame["error_rate"] = 0.0
    one_slow = frame["window_start_us"] == frame["window_start_us"].iloc[20]
    frame.loc[one_slow, ["latency_p90_ms", "latency_p99_ms"]] *= 40  # one slow request
    scorer = OnlineScorer(min_requests=10)
    verdicts = [scorer.process(m) for m in as_records(frame)]
    assert all(v.verdict != "inconclusive" for v in verdicts[6:])
    assert verdicts[20].verdict == "normal"
    # A thin window does not decide alone: the second one in a row confirms the first.
    assert [i for i, v in enumerate(verdicts) if v.verdict == "anomalous"] == [31]
    assert verdicts[31].contributions[0].feature == "latency_p50_ms"


def test_learns_online_and_flags_a_latency_spike_without_learning_it() -> None:
    spikes = {("cart", i): {"latency": 5.0} for i in (60, 61, 62)}
    scorer = OnlineScorer(min_windows=6)
    verdicts = [scorer.process(m, now_us=1) for m in as_records(
        synthetic_metrics(windows=80, services=("cart",), spikes=spikes))]
    flagged = [i for i, v in enumerate(verdicts) if v.verdict == "anomalous"]
    assert flagged == [60, 61, 62]
    spike = verdicts[60]
    assert spike.detector == ONLINE_DETECTOR and spike.score >= spike.threshold
    top = spike.contributions[0]
    assert top.feature.startswith("latency") and top.value == pytest.approx(
        5 * top.baseline, rel=0.2)
    # The spike stayed out of the baseline: the windows after it are normal again.
    assert all(v.verdict == "normal" for v in verdicts[63:])


def test_a_lasting_change_becomes_the_new_normal() -> None:
    spikes = {("cart", i): {"requests": 3.0} for i in range(30, 80)}
    scorer = OnlineScorer(min_windows=6, relearn_after=5)
    verdicts = [scorer.process(m) for m in as_records(
        synthetic_metrics(windows=80, services=("cart",), spikes=spikes))]
    assert verdicts[30].verdict == "anomalous"
    assert all(v.verdict == "normal" for v in verdicts[70:])


def test_a_new_revision_is_compared_with_the_old_one_in_the_same_window() -> None:
    frame = synthetic_metrics(windows=40, services=("cart",), revisions={"cart": ("old", "new")},
                              spikes={("cart@new", i): {"latency": 4.0} for i in range(30, 40)})
    scorer = OnlineScorer()
    verdicts = [scorer.process(m) for m in as_records(frame)]
    new = [v for v in verdicts if v.revision == "new"]
    assert new[30].verdict == "anomalous"


def test_with_a_trained_model_it_scores_known_services_and_learns_unknown_ones() -> None:
    model, _ = train_model(synthetic_metrics(windows=300, seed=11))
    scorer = OnlineScorer(model, min_windows=6, model_name="anomaly_model@test")
    fresh = as_records(synthetic_metrics(windows=20, seed=12,
                                         services=("cart", "checkout", "payment"),
                                         spikes={("checkout", 15): {"latency": 6.0}}))
    verdicts = [scorer.process(m) for m in fresh]
    known = [v for v in verdicts if v.service == "checkout"]
    assert known[10].detector == "anomaly_model@test" and known[10].verdict == "normal"
    assert known[15].verdict == "anomalous"
    unknown = [v for v in verdicts if v.service == "payment"]
    assert unknown[10].detector == ONLINE_DETECTOR
    assert "not in the trained model" in unknown[10].reason


def test_edge_rows_are_refused() -> None:
    edge = dataclasses.replace(as_records(synthetic_metrics(windows=1))[0], peer_service="db")
    with pytest.raises(ValueError, match="edge rows are not scored"):
        OnlineScorer().score_one(edge)


def _edges(frame, caller: str = "frontend", factor: dict[int, float] | None = None):
    """The caller -> callee rows matching a service's windows: what the caller saw of it, a few
    ms of network on top of the callee's own latency, times ``factor`` in some windows."""
    rows = []
    for i, m in enumerate(as_records(frame)):
        slower = (factor or {}).get(i, 1.0)
        rows.append(dataclasses.replace(
            m, service=caller, revision="c1", peer_namespace=m.namespace, peer_service=m.service,
            latency_p50_ms=(m.latency_p50_ms + 3) * slower,
            latency_p90_ms=(m.latency_p90_ms + 3) * slower,
            latency_p99_ms=(m.latency_p99_ms + 3) * slower, latency_sketch=None))
    return rows


def test_what_callers_see_flags_a_callee_whose_own_spans_look_fine() -> None:
    # A network delay: the callee's handler is as fast as ever, its callers wait 40 times
    # longer. The caller's rows of a window may arrive after the callee's own row.
    frame = synthetic_metrics(windows=40, services=("cart",))
    edges = _edges(frame, factor={i: 40.0 for i in (30, 31, 32)})
    scorer = OnlineScorer()
    verdicts = []
    for own, edge in zip(as_records(frame), edges, strict=True):
        verdicts.append(scorer.process(own))
        scorer.learn_edge(edge)
    flagged = [i for i, v in enumerate(verdicts) if v.verdict == "anomalous"]
    # Window 30's delay is seen with window 31 (its callers' rows came after its own row).
    assert flagged and flagged[0] in (30, 31) and set(flagged) <= {30, 31, 32, 33}
    top = verdicts[flagged[0]].contributions[0]
    assert top.feature.endswith("seen by shop/frontend") and top.value > 10 * top.baseline
    assert all(v.verdict == "normal" for v in verdicts[6:30])


def test_caller_rows_seen_first_are_used_for_the_same_window() -> None:
    frame = synthetic_metrics(windows=40, services=("cart",))
    edges = _edges(frame, factor={30: 40.0})
    scorer = OnlineScorer()
    verdicts = []
    for own, edge in zip(as_records(frame), edges, strict=True):
        scorer.learn_edge(edge)
        verdicts.append(scorer.process(own))
    assert [i for i, v in enumerate(verdicts) if v.verdict == "anomalous"] == [30]


def test_learn_edge_takes_only_edge_rows() -> None:
    with pytest.raises(ValueError, match="not an edge row"):
        OnlineScorer().learn_edge(as_records(synthetic_metrics(windows=1))[0])


def test_persistence_a_moderate_departure_needs_two_windows_in_a_row() -> None:
    # ~5 standard deviations of this service's latency: decisive in neither window alone.
    frame = synthetic_metrics(windows=60, services=("cart",), seed=3)
    moderate = {i: 1.6 for i in (30, 45, 46)}
    for i, factor in moderate.items():
        frame.loc[frame.index[i], ["latency_p50_ms", "latency_p90_ms", "latency_p99_ms"]] *= \
            factor
    scorer = OnlineScorer()
    verdicts = [scorer.process(m) for m in as_records(frame)]
    assert verdicts[30].verdict == "normal" and verdicts[30].score < 0.999
    assert verdicts[45].verdict == "normal"
    assert verdicts[46].verdict == "anomalous"
    without = OnlineScorer(persistence=False)
    alone = [without.process(m) for m in as_records(frame)]
    assert alone[30].verdict == "anomalous"  # what persistence spares


def test_persistent_p_value_is_a_p_value_under_any_dependence() -> None:
    from models.online import persistent_p_value

    rng = np.random.default_rng(5)
    p = rng.uniform(size=200_000)
    for previous in (rng.uniform(size=p.size), p):  # independent, and identical windows
        runs = np.array([persistent_p_value(a, b) for a, b in zip(p[:20_000],
                                                                 previous[:20_000],
                                                                 strict=True)])
        for level in (0.01, 0.05, 0.2):
            assert np.mean(runs <= level) <= level * 1.1
    assert persistent_p_value(1e-8, None) == pytest.approx(1e-4 + 1e-8)
    assert persistent_p_value(1e-4, 1e-4) == pytest.approx(1e-4 + 1e-8)
    assert persistent_p_value(1e-4, 0.5) > 0.01
    # Evidence that may not decide alone (a thin window) needs the previous window.
    assert persistent_p_value(1e-9, None, decisive=1.0) == 2.0 or \
        persistent_p_value(1e-9, None, decisive=1.0) == 1.0
    assert persistent_p_value(1e-4, 1e-4, decisive=1.0) < 2e-4


def test_a_thin_window_does_not_decide_alone() -> None:
    frame = synthetic_metrics(windows=40, services=("email",))
    frame["requests"] = 3
    frame["errors"] = 0
    frame["error_rate"] = 0.0
    frame.loc[frame.index[30], ["latency_p50_ms", "latency_p90_ms", "latency_p99_ms"]] *= 100
    scorer = OnlineScorer(min_requests=10)
    verdicts = [scorer.process(m) for m in as_records(frame)]
    assert verdicts[30].verdict == "normal"
    assert verdicts[30].contributions[0].feature == "latency_p50_ms"


def test_a_caller_whose_calls_all_slow_down_is_flagged_not_for_one_slow_callee() -> None:
    # checkout calls four services; its own (thin) rows show little. When all its calls slow
    # down, checkout is the common factor; when only one does, that callee is.
    callees = ("cart", "email", "payment", "shipping")
    frame = synthetic_metrics(windows=50, services=("checkout", *callees))
    own = {s: as_records(frame[frame["service"] == s]) for s in ("checkout", *callees)}
    slow_all = {i: 30.0 for i in (30, 31, 32)}
    calls = {c: _edges(frame[frame["service"] == c], caller="checkout",
                       factor={**slow_all, **({40: 30.0, 41: 30.0} if c == "cart" else {})})
             for c in callees}
    scorer = OnlineScorer()
    verdicts: dict[str, list] = {s: [] for s in own}
    for i in range(50):
        for service in ("cart", "checkout", "email", "payment", "shipping"):  # key order
            verdicts[service].append(scorer.process(own[service][i]))
            if service == "checkout":
                for c in callees:
                    scorer.learn_edge(calls[c][i])
    checkout = [i for i, v in enumerate(verdicts["checkout"]) if v.verdict == "anomalous"]
    assert checkout and checkout[0] in (31, 32) and set(checkout) <= {31, 32, 33}
    assert verdicts["checkout"][checkout[0]].contributions[0].feature == \
        "latency_p50_ms of its calls to 4 services (median)"
    assert not any(v.verdict == "anomalous" for v in verdicts["checkout"][35:])
    assert any(v.verdict == "anomalous" for v in verdicts["cart"][40:43])
    # The callees are not blamed for their caller's slowness (nor learn it as their normal).
    for callee in callees:
        assert all(v.verdict == "normal" for v in verdicts[callee][6:40]), callee
    assert all(v.verdict == "normal" for v in verdicts["cart"][44:])


@pytest.mark.parametrize("calls", [20, 200])
def test_a_tail_quantile_of_few_requests_does_not_decide_alone(calls: int) -> None:
    # What a caller saw: its p90 jumps fivefold while the median stays (a couple of slow calls:
    # a caller's hiccup). From 20 calls the p90 is set by the slowest two and needs the next
    # window to agree; from 200 (20 beyond it) one window is enough.
    frame = synthetic_metrics(windows=50, services=("cart",))
    edges = []
    for i, edge in enumerate(_edges(frame)):
        tail = 5.0 if i in (30, 40, 41) else 1.0
        edges.append(dataclasses.replace(edge, requests=calls,
                                         latency_p90_ms=edge.latency_p90_ms * tail,
                                         latency_p99_ms=edge.latency_p99_ms * tail))
    scorer = OnlineScorer(min_requests=10)
    verdicts = []
    for own, edge in zip(as_records(frame), edges, strict=True):
        scorer.learn_edge(edge)
        verdicts.append(scorer.process(own))
    flagged = [i for i, v in enumerate(verdicts) if v.verdict == "anomalous"]
    assert flagged == ([30, 40, 41] if calls == 200 else [41])
    assert verdicts[41].contributions[0].feature == "latency_p90_ms seen by shop/frontend"
    assert verdicts[30].contributions[0].feature == "latency_p90_ms seen by shop/frontend"
