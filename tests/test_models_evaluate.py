"""The Nezha evaluation's own steps: span kinds from the trace structure, and what is counted."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from analytics.windows import aggregate
from clover.records import SpanRecord
from models.evaluate import evaluate_nezha, infer_span_kinds
from models.online import OnlineScorer

T0 = 1_661_140_000_000_000
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NEZHA = SHARED_DATA / "nezha-onlineboutique-2022-08-22"


def span(span_id: str, service: str, parent: str | None, start_ms: int, duration_ms: int,
         operation: str = "op", trace: str = "a" * 32, kind: str = "unspecified") -> SpanRecord:
    return SpanRecord(trace_id=trace, span_id=span_id * 16, service=service,
                      operation=operation, kind=kind,  # type: ignore[arg-type]
                      start_us=T0 + start_ms * 1000, duration_us=duration_ms * 1000,
                      error=False, source="nezha",
                      parent_span_id=None if parent is None else parent * 16,
                      namespace="shop", revision="r1")


def test_kinds_from_the_trace_structure() -> None:
    spans = [
        span("1", "frontend", None, 0, 100, "Frontend/Recv"),          # root: server
        span("2", "frontend", "1", 5, 40, "Cart/GetCart"),             # calls cart: client
        span("3", "cart", "2", 10, 30, "Cart/GetCart"),                # parent elsewhere: server
        span("4", "cart", "3", 12, 5, "redis.get"),                    # same service: internal
        span("5", "cart", "9", 50, 5, "orphan"),                       # parent not recorded
        span("6", "frontend", "1", 60, 8, "Ads/Get", kind="client"),   # kind known: kept
    ]
    kinds = {s.span_id[0]: (s.kind, s.peer_service) for s in infer_span_kinds(spans)}
    assert kinds == {"1": ("server", None), "2": ("client", "cart"), "3": ("server", None),
                     "4": ("internal", None), "5": ("unspecified", None),
                     "6": ("client", None)}


def test_with_kinds_a_service_counts_its_requests_and_callers_get_edge_rows() -> None:
    spans = infer_span_kinds([
        span("1", "frontend", None, 0, 100),
        span("2", "frontend", "1", 5, 60),
        span("3", "cart", "2", 10, 30),
        span("4", "cart", "3", 12, 5),
    ])
    rows = {(m.service, m.peer_service): m for m in aggregate(spans)}
    assert set(rows) == {("frontend", None), ("cart", None), ("frontend", "cart")}
    assert rows[("cart", None)].requests == 1  # its handler, not its internal step
    assert rows[("cart", None)].latency_max_ms == pytest.approx(30, rel=0.01)
    assert rows[("frontend", "cart")].latency_max_ms == pytest.approx(60, rel=0.01)
    assert rows[("frontend", None)].requests == 1


@pytest.mark.skipif(not NEZHA.is_dir(), reason=f"the Nezha data set is not at {NEZHA}")
def test_nezha_faults_without_trace_files_have_no_data_and_the_rest_are_scored() -> None:
    # One stretch of the day is enough to check the counting: 05:51:19-05:53:19 (the payment
    # network delay at 05:52:54), from the evaluation's own reader.
    from collectors.replay import replay_spans
    from models.evaluate import _Collector, read_faults, whole_windows

    collector = _Collector()
    replay_spans(collector, [NEZHA / "trace" / "05_52_trace.csv.gz",
                             NEZHA / "trace" / "05_53_trace.csv.gz"], speed=None,
                 namespace="hipstershop")
    metrics = whole_windows(collector.spans)  # the replay gave the kinds: edge rows
    assert any(m.peer_service == "paymentservice" for m in metrics)
    result = evaluate_nezha(NEZHA, OnlineScorer(), metrics=metrics)
    by_time = {f.inject_us: f for f in result.faults}
    assert len(by_time) == len(read_faults(NEZHA)) == 24
    payment = by_time[1661147574_000_000]
    assert payment.service == "paymentservice" and payment.scorable_windows > 0
    # No file covers the checkout network delay at 04:52:55.
    assert by_time[1661143975_000_000].outcome == "no data"


def test_false_alarms_and_the_nearest_normal_are_counted_in_fault_free_time_only(
        tmp_path: Path) -> None:
    import json

    from models.evaluate import nezha_report
    from tests.test_models_features import as_records, synthetic_metrics

    # 60 windows of cart; one fault at window 40 (its 150 s cover windows 39-55). A decisive
    # spike at 20 is a false alarm; a moderate bump at 30 stays normal but comes nearest; the
    # spike at 45 is the fault's, not a false alarm.
    frame = synthetic_metrics(windows=60, services=("cart",), seed=3,
                              spikes={("cart", 20): {"latency": 8.0},
                                      ("cart", 45): {"latency": 8.0}})
    frame.loc[frame.index[30], ["latency_p50_ms", "latency_p90_ms", "latency_p99_ms"]] *= 1.3
    start_s = int(frame["window_start_us"].iloc[0]) // 1_000_000
    (tmp_path / "fault_list.json").write_text(json.dumps({"00": [{
        "inject_time": "", "inject_timestamp": str(start_s + 400),
        "inject_pod": "cart-5f6585d649-fnmft", "inject_type": "cpu_contention"}]}))
    result = evaluate_nezha(tmp_path, OnlineScorer(), metrics=as_records(frame))
    assert [a.window_start_us for a in result.false_alarms] == \
        [int(frame["window_start_us"].iloc[20])]
    assert result.false_alarm_episodes == 1 and result.faults[0].detected
    nearest = result.nearest_normal
    assert nearest is not None and nearest.verdict == "normal"
    assert nearest.window_start_us == int(frame["window_start_us"].iloc[30])
    assert nearest.score < nearest.threshold
    report = nezha_report(result)
    assert f"highest score of a normal fault-free window: {nearest.score}" in report
    # The alarm (window 20, 200-210 s) is listed with its evidence and the nearest label.
    alarm = next(line for line in report.splitlines() if "false alarm " in line)
    assert "cart (online" in alarm and "latency_p" in alarm
    assert alarm.endswith("ends 190 s before the label of cart cpu_contention "
                          f"({pd.Timestamp((start_s + 400) * 10**6, unit='us'):%H:%M:%S})")


def test_a_window_past_the_last_recorded_trace_start_is_not_whole() -> None:
    from models.evaluate import whole_windows

    # Traces begun every second from 1 to 35 s (frontend's root calls cart for 2 s); the
    # recording ends with the trace begun at 35 s, a slow one whose spans end at 41.5 and 42 s.
    # The window 30-40 s lacks the traces begun after 35 s, and 0-10 s those begun before 1 s:
    # neither is whole, though spans end in both and after them.
    spans = []
    for second in range(1, 36):
        root, call = f"{2 * second + 1:x}", f"{2 * second + 2:x}"
        trace, slow = f"{second:032x}", 4500 if second == 35 else 0
        spans += [span(root, "frontend", None, second * 1000, 2500 + slow, trace=trace),
                  span(call, "cart", root, second * 1000 + 500, 2000 + slow, trace=trace)]
    cart = {m.window_start_us - T0: m.requests
            for m in whole_windows(infer_span_kinds(spans)) if m.service == "cart"}
    assert cart == {10_000_000: 10, 20_000_000: 10}


def test_calibration_and_shifts_are_counted_and_the_worst_case_reported(
        tmp_path: Path) -> None:
    import json

    from models.evaluate import shifts_report
    from tests.test_models_features import as_records, synthetic_metrics

    # The day of the test above: a false alarm at window 20, the fault at 40 found at 45.
    frame = synthetic_metrics(windows=60, services=("cart",), seed=3,
                              spikes={("cart", 20): {"latency": 8.0},
                                      ("cart", 45): {"latency": 8.0}})
    start_s = int(frame["window_start_us"].iloc[0]) // 1_000_000
    (tmp_path / "fault_list.json").write_text(json.dumps({"00": [{
        "inject_time": "", "inject_timestamp": str(start_s + 400),
        "inject_pod": "cart-5f6585d649-fnmft", "inject_type": "cpu_contention"}]}))
    result = evaluate_nezha(tmp_path, OnlineScorer(), metrics=as_records(frame))
    judged = [(a, p) for a, p in zip(result.fault_free_scores, result.fault_free_p_values,
                                     strict=True)]
    assert len(judged) == 60 - 6 - 15  # learning, and the fault's windows 40-54, left out
    calibration = dict((a, (k, n)) for a, k, n in result.calibration())
    assert calibration[0.001] == (1, len(judged))  # the false alarm, and only it
    p_calibration = dict((a, (k, n)) for a, k, n in result.calibration(p_values=True))
    assert p_calibration[0.001][0] >= 1 and p_calibration[0.1][1] == len(judged)
    # Shifted by 3 s (windows and fault moved together), the same fault and false alarm.
    shifted = frame.copy()
    shifted["window_start_us"] += 3_000_000
    later = evaluate_nezha(tmp_path, OnlineScorer(), metrics=as_records(shifted), shift_s=3)
    assert later.faults[0].inject_us == result.faults[0].inject_us + 3_000_000
    assert later.faults[0].delay_s == result.faults[0].delay_s
    assert later.false_alarm_episodes == 1
    # The worst case is over the shifts: a clean shift does not hide the one with an alarm.
    clean = evaluate_nezha(tmp_path, OnlineScorer(), metrics=as_records(
        synthetic_metrics(windows=60, services=("cart",), seed=3,
                          spikes={("cart", 45): {"latency": 8.0}})), shift_s=5)
    assert clean.false_alarm_episodes == 0
    report = shifts_report([clean, later])
    assert "worst case: recall 1.00 (faults with data), 1 false-alarm episodes" in report
    assert report.splitlines()[2].split()[:4] == ["5s", "1/1", "1.00", "0"]
    # Each shift's false alarms are listed under its line.
    assert report.splitlines()[4].split()[:2] == ["false", "alarm"]
    assert "ends 190 s before the label of cart" in report.splitlines()[4]


def test_a_fault_seen_only_in_call_patterns_is_found_with_them(tmp_path: Path) -> None:
    import dataclasses
    import json

    from tests.test_models_features import as_records, synthetic_metrics

    # cart's windows look as usual throughout; in the fault's first 100 s (windows 40-49) a
    # third of its requests stop after their first call (an early return): only its call
    # patterns show it.
    frame = synthetic_metrics(windows=60, services=("cart",), seed=3)
    start_s = int(frame["window_start_us"].iloc[0]) // 1_000_000
    (tmp_path / "fault_list.json").write_text(json.dumps({"00": [{
        "inject_time": "", "inject_timestamp": str(start_s + 400),
        "inject_pod": "cart-5f6585d649-fnmft", "inject_type": "return"}]}))
    metrics = [dataclasses.replace(m, call_patterns={
        "get+set": m.requests - m.requests // 3, "get": m.requests // 3}
        if 40 <= i < 50 else {"get+set": m.requests}) for i, m in enumerate(as_records(frame))]
    result = evaluate_nezha(tmp_path, OnlineScorer(), metrics=metrics)
    assert not result.faults[0].detected
    with_patterns = result.with_patterns
    assert with_patterns is not None and with_patterns.faults[0].detected
    assert with_patterns.faults[0].delay_s == 10 and with_patterns.false_alarm_episodes == 0
    # The online scorer's own result is unchanged by them.
    assert evaluate_nezha(tmp_path, OnlineScorer(), metrics=as_records(frame)).detected == 0
