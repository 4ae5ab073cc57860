"""The online scorer: inconclusive while learning, then verdicts that are valid Anomaly records."""

from __future__ import annotations

import dataclasses

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
    frame = synthetic_metrics(windows=20, services=("cart",))
    frame["requests"] = 1
    frame["errors"] = 0
    frame["error_rate"] = 0.0
    scorer = OnlineScorer(min_requests=10)
    verdicts = [scorer.process(m) for m in as_records(frame)]
    assert verdicts[-1].verdict == "inconclusive"
    assert verdicts[-1].reason.startswith("too little traffic: 1 requests")


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
    assert [i for i, v in enumerate(verdicts) if v.verdict == "anomalous"] == [30, 31]
    assert verdicts[30].contributions[0].feature == "latency_p50_ms"


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
