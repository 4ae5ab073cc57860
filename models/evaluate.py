"""``clover models evaluate``: the detectors on real labelled data.

(a) **NAB**: every series of the NAB sample scored by :class:`models.nab.StreamingScorer` (no
look-ahead) and scored by NAB's standard profile against ``labels/combined_windows.json``.

(b) **Nezha OnlineBoutique day**: the recorded spans are read by the replay's own reader
(``collectors.replay.replay_spans``, which merges overlapping minute files and drops the spans
they repeat and gives the spans the kinds the recording lost), aggregated
into 10 s windows by ``analytics.windows.aggregate`` (the stream's own code), and the rows are
given in the aggregation's order (window by window, each window's rows sorted by key) to
:class:`models.online.OnlineScorer`, learning online from nothing, as a fresh deployment would:
service rows are scored, caller -> callee rows are what callers saw of their callees
(:meth:`~models.online.OnlineScorer.learn_edge`). Then, per injected fault, was the
injected service flagged in a window that ends after ``inject_time`` and starts within two
minutes of it, and how long after ``inject_time`` did that window end (data time)? A fault with
no scorable window of its service in those two minutes is "no data" (the day has no trace files
for some faults). Every anomalous window outside ``[inject_time, inject_time + 150 s]`` of
every fault is a false alarm; consecutive ones of one service are one alarm episode.

**Shifted windows**: where the 10 s windows happen to fall on the day's events is an accident
of the recording, so reading the day from its directory scores it again with every span and
fault moved later by each of ``SHIFTS`` seconds (a fresh copy of the scorer each time); the
report gives each shift's figures and the worst case over them, so that a result does not rest
on one lucky phase of the windows.

**Calibration**: a score is one minus a p-value, so on fault-free windows the share scoring at
least ``1 - a`` should be at most about ``a``. The report gives that share for ``a`` = 0.1,
0.01 and 0.001 beside the nominal rate, for the final score (after persistence) and for the
windows' own p-values (before it).

**Call patterns**: the same windows are also judged with :class:`models.structure.
CallPatternScorer`'s verdicts added (a window is anomalous when either says so), in
``with_patterns``, as the scoring agent judges them: faults in a service's code that change
only which calls its requests make (an early return, an exception) show only in the windows'
call patterns (``ServiceMetrics.call_patterns``).

The recording is a set of minute files with gaps between them, so the first and last window of
each stretch of data hold only part of their ten seconds; they are not scored (a live stream
has no such edges).

Span kinds: the Nezha export has no kind column, so its reader says ``unspecified``, which the
aggregation counts as a request of the span's own service. Without the kinds, a service's
"requests" were every span of its pod: its handler, each call it made to another service and
each internal step (``sql.conn.query``, ``CurrencyService/Carry``), so its latency quantiles
were mostly of those, and there were no caller -> callee rows at all. The trace structure
says what a mesh would have said: a span with a child in another service is a client span of
a call to that service, a span whose parent is in another service (or a trace's root) is a
server span, and a span whose parent is in its own service is internal. The replay gives
these kinds (``collectors.replay.infer_kinds``, each minute file with its neighbours as
context); :func:`infer_span_kinds` applies the same rule to spans held in memory.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from clover import records
from clover.records import Anomaly, ServiceMetrics, SpanRecord
from models.nab import (
    NabResult,
    StreamingScorer,
    nab_score,
    normalised,
    read_series,
    rows_per_day,
    score_series,
)
from models.online import OnlineScorer
from models.structure import CallPatternScorer, PatternWindow, flag_rare_patterns, judge_all

if TYPE_CHECKING:
    from collectors.ingest import BatchResult, Candidate

DETECTION_S = 120
FAULT_S = 150
STRETCH_GAP_S = 30
SHIFTS = (0, 3, 5, 7)  # seconds: the day's spans and faults moved by each (see the docstring)
CALIBRATION_LEVELS = (0.1, 0.01, 0.001)


# --------------------------------------------------------------------------------------------
# (a) NAB


@dataclass
class NabFile:
    name: str
    rows: int
    result: NabResult


def evaluate_nab(directory: Path, threshold: float) -> tuple[list[NabFile], float]:
    """Per-file NAB results and the normalised standard-profile score of the whole sample."""
    labels_path = directory / "labels" / "combined_windows.json"
    labels: dict[str, list[list[str]]] = json.loads(labels_path.read_text())
    files = []
    for name, windows in sorted(labels.items()):
        path = directory / "data" / name
        if not path.is_file():
            continue
        frame = read_series(path)
        scorer = StreamingScorer(threshold=threshold,
                                 period=rows_per_day(frame["timestamp_parsed"]))
        scores = score_series(frame["value"].to_numpy(), scorer)
        result = nab_score(frame["timestamp_parsed"], scores >= threshold,
                           [(pd.Timestamp(a), pd.Timestamp(b)) for a, b in windows])
        files.append(NabFile(name, len(frame), result))
    return files, normalised([f.result for f in files])


# --------------------------------------------------------------------------------------------
# (b) Nezha


class _Collector:
    """A replay sink that keeps the valid spans in memory (the replay's ``Sink`` protocol), so
    that the evaluation reads the files exactly as ``clover replay spans`` does."""

    def __init__(self) -> None:
        self.spans: list[SpanRecord] = []
        self.rejected = 0

    def request(self, receiver: str) -> None:
        pass

    def submit(self, receiver: str, candidates: Iterable[Candidate]) -> BatchResult:
        from collectors.ingest import BatchResult, Rejection

        result = BatchResult()
        for index, candidate in enumerate(candidates):
            try:
                if candidate.span is None:
                    problem = candidate.problem or "unreadable row"
                    raise records.RecordError(SpanRecord, [("", "row", problem)])
                self.spans.append(records.from_dict(SpanRecord, candidate.span))
                result.accepted += 1
            except records.RecordError as exc:
                result.rejected.append(Rejection(index, str(exc)))
                self.rejected += 1
        return result

    def flush(self, timeout: float = 30.0) -> int:
        return 0


@dataclass
class Fault:
    inject_us: int
    service: str
    kind: str
    detected: bool = False
    delay_s: float | None = None
    scorable_windows: int = 0

    @property
    def outcome(self) -> str:
        if self.detected:
            return f"detected after {self.delay_s:.0f} s"
        return "missed" if self.scorable_windows else "no data"


@dataclass
class NezhaResult:
    faults: list[Fault]
    windows_scored: int
    inconclusive: int
    fault_free_hours: float
    false_alarm_windows: int
    false_alarm_episodes: int
    false_alarms: list[Anomaly] = field(default_factory=list)
    # The fault-free window judged normal with the highest score: how near the threshold the
    # day's normal came (one day's zero false alarms says little when this is close).
    nearest_normal: Anomaly | None = None
    # Fault-free judged windows: their final scores, and their own p-values (before
    # persistence; NaN where the scorer does not give one).
    fault_free_scores: list[float] = field(default_factory=list)
    fault_free_p_values: list[float] = field(default_factory=list)
    shift_s: int = 0
    # The same day with the windows shifted (see the module's docstring): (seconds, result).
    shifted: list[NezhaResult] = field(default_factory=list)
    # The same windows with the call-pattern scorer's verdicts added (models.structure): a
    # window is anomalous when either says so.
    with_patterns: NezhaResult | None = None

    @property
    def detected(self) -> int:
        return sum(f.detected for f in self.faults)

    @property
    def faults_with_data(self) -> list[Fault]:
        """The faults with at least one scorable window of their service in fault time."""
        return [f for f in self.faults if f.scorable_windows]

    def recall(self, with_data_only: bool = False) -> float:
        faults = self.faults_with_data if with_data_only else self.faults
        return sum(f.detected for f in faults) / len(faults) if faults else float("nan")

    @property
    def precision(self) -> float:
        flagged = self.detected + self.false_alarm_episodes
        return self.detected / flagged if flagged else float("nan")

    def f1(self, with_data_only: bool = False) -> float:
        p, r = self.precision, self.recall(with_data_only)
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def median_delay_s(self) -> float | None:
        delays = [f.delay_s for f in self.faults if f.delay_s is not None]
        return statistics.median(delays) if delays else None

    @property
    def alarms_per_hour(self) -> float:
        return self.false_alarm_episodes / self.fault_free_hours if self.fault_free_hours \
            else float("nan")

    def calibration(self, levels: Sequence[float] = CALIBRATION_LEVELS, *,
                    p_values: bool = False) -> list[tuple[float, int, int]]:
        """Per level ``a``: (a, fault-free windows scoring at least ``1 - a`` (with
        ``p_values``: whose own p-value is at most ``a``), fault-free windows judged)."""
        if p_values:
            values = [p for p in self.fault_free_p_values if p == p]
            return [(a, sum(p <= a for p in values), len(values)) for a in levels]
        return [(a, sum(s >= 1.0 - a for s in self.fault_free_scores),
                 len(self.fault_free_scores)) for a in levels]


def read_faults(directory: Path) -> list[Fault]:
    grouped = json.loads((directory / "fault_list.json").read_text())
    return sorted((Fault(int(f["inject_timestamp"]) * 1_000_000,
                         f["inject_pod"].rsplit("-", 2)[0], f["inject_type"])
                   for hour in grouped.values() for f in hour), key=lambda f: f.inject_us)


def infer_span_kinds(spans: Sequence[SpanRecord]) -> list[SpanRecord]:
    """The spans with the kinds (and callee) their traces' structure gives, all of ``spans``
    read as one unit: the replay's own rule (:func:`collectors.replay.infer_kinds`), which
    leaves a span that already has a kind other than ``unspecified`` as it is, and a span
    whose parent is not in ``spans`` ``unspecified``."""
    from collectors.replay import infer_kinds

    labels = infer_kinds([(s.trace_id, s.span_id, s.parent_span_id, s.service, s.kind)
                          for s in spans])
    out = []
    for span, label in zip(spans, labels, strict=True):
        if label is None:
            out.append(span)
            continue
        kind, peer = label
        out.append(dataclasses.replace(span, kind=kind) if peer is None else
                   dataclasses.replace(span, kind=kind, peer_service=peer,
                                       peer_namespace=span.namespace))
    return out


def nezha_spans(directory: Path, *, kinds: bool = True) -> list[SpanRecord]:
    """The day's spans through the replay's reader; with ``kinds``, given the kinds their
    traces' structure says, by the replay itself (``replay_spans(kinds=True)``)."""
    from collectors.replay import replay_spans

    collector = _Collector()
    paths = sorted((directory / "trace").glob("*_trace.csv*"))
    replay_spans(collector, paths, speed=None, namespace="hipstershop", kinds=kinds)
    return collector.spans


def nezha_metrics(directory: Path, window_seconds: int = 10, *,
                  kinds: bool = True) -> list[ServiceMetrics]:
    """The day's windows (service and caller -> callee rows, in the aggregation's order),
    through the replay's reader and the stream's aggregation, without the partial windows at
    the edges of each stretch of recorded data."""
    return whole_windows(nezha_spans(directory, kinds=kinds), window_seconds)


def whole_windows(spans: Sequence[SpanRecord], window_seconds: int = 10) -> list[ServiceMetrics]:
    """The spans aggregated by the stream's code, without the partial windows at the edges of
    each stretch of recorded data (a gap of more than ``STRETCH_GAP_S`` ends a stretch).

    A stretch is measured by the start times of the traces' root spans (of all spans when
    there are no roots): a recording holds whole traces whose root started in its time (a
    Nezha file ``HH_MM`` holds the traces begun from ``HH:(MM-1):19`` to ``HH:MM:19``, their
    last spans up to seconds later), so a window is whole only when roots were recorded up to
    its end; one that ends later lacks the requests of the traces begun after, and its request
    rates fall for every service at once."""
    from analytics.windows import aggregate

    roots = [s.start_us for s in spans if s.parent_span_id is None]
    starts = sorted(roots or [s.start_us for s in spans])
    stretches: list[list[int]] = []
    for start in starts:
        if stretches and start - stretches[-1][1] <= STRETCH_GAP_S * 1_000_000:
            stretches[-1][1] = start
        else:
            stretches.append([start, start])
    window_us = window_seconds * 1_000_000

    def whole(metrics: ServiceMetrics) -> bool:
        start = metrics.window_start_us
        return any(a <= start and start + window_us <= b for a, b in stretches)

    metrics = aggregate(spans, window_seconds=window_seconds)
    return [m for m in metrics if whole(m)]


def shift_spans(spans: Sequence[SpanRecord], seconds: int) -> list[SpanRecord]:
    """The spans moved ``seconds`` later (the windows then fall differently on them)."""
    if not seconds:
        return list(spans)
    return [dataclasses.replace(s, start_us=s.start_us + seconds * 1_000_000) for s in spans]


def evaluate_nezha(directory: Path, scorer: OnlineScorer, window_seconds: int = 10, *,
                   metrics: Sequence[ServiceMetrics] | None = None,
                   shift_s: int = 0, shifts: Sequence[int] = SHIFTS) -> NezhaResult:
    """Score the day's windows (``metrics``, else :func:`nezha_metrics` of ``directory``) in
    their order and count each fault and each false alarm (see the module's docstring);
    ``shift_s``: the seconds ``metrics`` were shifted by (the faults are moved as much). When
    the windows have call patterns, also the result with the call-pattern scorer's verdicts
    added, in ``with_patterns``.

    Without ``metrics``, the day is read from ``directory`` and also scored with its spans and
    faults shifted by each of the other ``shifts``, by fresh copies of ``scorer`` (given
    unused); those results are in ``shifted``."""
    if metrics is None:
        fresh = copy.deepcopy(scorer)
        spans = nezha_spans(directory)
        result = evaluate_nezha(directory, scorer, window_seconds,
                                metrics=whole_windows(spans, window_seconds))
        for seconds in shifts:
            if seconds:
                result.shifted.append(evaluate_nezha(
                    directory, copy.deepcopy(fresh), window_seconds, shift_s=seconds,
                    metrics=whole_windows(shift_spans(spans, seconds), window_seconds)))
        return result
    anomalies, p_values, patterns = [], [], []
    for m in metrics:
        if m.peer_service is not None:
            scorer.learn_edge(m)
        else:
            anomaly, p = scorer.judge(m, now_us=m.window_start_us + window_seconds * 1_000_000)
            anomalies.append(anomaly)
            p_values.append(p)
            window = PatternWindow.of(m)
            if window is not None:
                patterns.append(window)
    result = _tally(directory, anomalies, p_values, window_seconds, shift_s)
    if patterns:
        result.with_patterns = _tally(
            directory, _with_patterns(anomalies, patterns, CallPatternScorer.beside(scorer)),
            p_values, window_seconds, shift_s)
    return result


def _with_patterns(anomalies: Sequence[Anomaly], patterns: Sequence[PatternWindow],
                   scorer: CallPatternScorer) -> list[Anomaly]:
    """The online scorer's verdicts, each made anomalous where the call-pattern scorer flags
    that service window (as the scoring agent does, streams/score.py)."""
    judgements = judge_all(patterns, scorer)
    return [flag_rare_patterns(a, judgement)
            if (judgement := judgements.get((a.namespace, a.service, a.window_start_us)))
            else a for a in anomalies]


def _tally(directory: Path, anomalies: Sequence[Anomaly], p_values: Sequence[float],
           window_seconds: int, shift_s: int) -> NezhaResult:
    """Each fault found or not, and the false alarms, of the day's verdicts."""
    faults = read_faults(directory)
    for fault in faults:
        fault.inject_us += shift_s * 1_000_000
    window_us = window_seconds * 1_000_000
    for fault in faults:
        late = fault.inject_us + DETECTION_S * 1_000_000
        for a in anomalies:
            end = a.window_start_us + window_us
            if a.service != fault.service or end <= fault.inject_us or a.window_start_us > late:
                continue
            if a.verdict != "inconclusive":
                fault.scorable_windows += 1
            if a.verdict == "anomalous" and not fault.detected:
                fault.detected, fault.delay_s = True, (end - fault.inject_us) / 1e6

    def fault_time(a: Anomaly) -> bool:
        end = a.window_start_us + window_us
        return any(end > f.inject_us and a.window_start_us < f.inject_us + FAULT_S * 1_000_000
                   for f in faults)

    free_windows = {a.window_start_us for a in anomalies if not fault_time(a)}
    free_judged = [(a, p) for a, p in zip(anomalies, p_values, strict=True)
                   if a.verdict != "inconclusive" and not fault_time(a)]
    normal = [a for a in anomalies if a.verdict == "normal" and not fault_time(a)]
    false_alarms = [a for a in anomalies if a.verdict == "anomalous" and not fault_time(a)]
    episodes, last = 0, dict[str, int]()
    for a in false_alarms:
        if last.get(a.service) != a.window_start_us - window_us:
            episodes += 1
        last[a.service] = a.window_start_us
    return NezhaResult(
        faults=faults, windows_scored=len(anomalies),
        inconclusive=sum(a.verdict == "inconclusive" for a in anomalies),
        fault_free_hours=len(free_windows) * window_seconds / 3600,
        false_alarm_windows=len(false_alarms), false_alarm_episodes=episodes,
        false_alarms=false_alarms,
        nearest_normal=max(normal, key=lambda a: a.score or 0.0, default=None),
        fault_free_scores=[float(a.score or 0.0) for a, _ in free_judged],
        fault_free_p_values=[p for _, p in free_judged], shift_s=shift_s)


# --------------------------------------------------------------------------------------------
# Report


def nab_report(files: list[NabFile], score: float, threshold: float) -> str:
    lines = [f"NAB sample (standard profile, threshold {threshold}): score {score:.1f}",
             f"  {'file':<52} {'rows':>6} {'windows':>7} {'found':>5} {'false+':>6} {'raw':>7}"]
    for f in files:
        r = f.result
        lines.append(f"  {f.name:<52} {f.rows:>6} {r.windows:>7} {r.detected:>5} "
                     f"{r.false_positives:>6} {r.raw:>7.2f}")
    return "\n".join(lines)


def _clock_time(us: int) -> str:
    return pd.Timestamp(us, unit="us").strftime("%H:%M:%S")


def nezha_report(result: NezhaResult) -> str:
    lines = ["Nezha OnlineBoutique 2022-08-22 (10 s windows, learning online from nothing)",
             f"  {'inject':<9} {'service':<22} {'fault':<15} outcome"]
    for f in result.faults:
        lines.append(f"  {_clock_time(f.inject_us):<9} {f.service:<22} {f.kind:<15} {f.outcome}")
    with_data = len(result.faults_with_data)
    delay = result.median_delay_s
    alarms_per_hour = result.alarms_per_hour
    lines += [
        f"  windows scored {result.windows_scored}, inconclusive {result.inconclusive}",
        f"  faults detected {result.detected} of {len(result.faults)} "
        f"({with_data} with scorable data)",
        f"  recall {result.recall():.2f} (all faults), {result.recall(True):.2f} "
        "(faults with data)",
        f"  false alarms in fault-free time: {result.false_alarm_episodes} episodes "
        f"({result.false_alarm_windows} windows) in {result.fault_free_hours:.2f} h = "
        f"{alarms_per_hour:.1f} per hour",
        f"  precision {result.precision:.2f}, F1 {result.f1():.2f} (all faults), "
        f"{result.f1(True):.2f} (faults with data)",
        "  median detection delay " + ("-" if delay is None else f"{delay:.0f} s of data time"),
    ]
    if result.nearest_normal is not None:
        a = result.nearest_normal
        lines.append(f"  highest score of a normal fault-free window: {a.score} "
                     f"({a.service} {_clock_time(a.window_start_us)}; threshold {a.threshold})")
    lines += [f"    {false_alarm_line(a, result.faults)}" for a in result.false_alarms[:10]]
    for name, rows in (("final score >= 1 - a", result.calibration()),
                       ("window's own p <= a", result.calibration(p_values=True))):
        if rows and rows[0][2]:
            lines.append(f"  calibration on fault-free windows, {name}: " + ", ".join(
                f"a={a:g}: {k}/{n} = {k / n:.4f}" for a, k, n in rows))
    if result.shifted:
        lines.append(shifts_report([result, *result.shifted]))
    if result.with_patterns is not None:
        lines.append("  with the call-pattern scorer's verdicts added (models.structure, as the "
                     "scoring agent judges the windows' call patterns):")
        lines.append(shifts_report([r.with_patterns for r in (result, *result.shifted)
                                    if r.with_patterns is not None]))
    return "\n".join(lines)


def false_alarm_line(alarm: Anomaly, faults: Sequence[Fault]) -> str:
    """A false alarm, its evidence, and the fault label nearest to it: a hand-injected fault's
    label is written by the person injecting it, and an alarm just before one may be its effect
    seen early, which the reader should be able to tell from an alarm in quiet time."""
    start, end = alarm.window_start_us, alarm.window_start_us + alarm.window_seconds * 1_000_000
    evidence = ", ".join(f"{c.feature} {c.value:.4g} vs {c.baseline:.4g}"
                         for c in alarm.contributions
                         if c.value is not None and c.baseline is not None)
    line = (f"false alarm {_clock_time(start)} {alarm.service} ({alarm.detector}): score "
            f"{alarm.score} ({evidence})")
    nearest = min(faults, key=lambda f: min(abs(f.inject_us - end), abs(f.inject_us - start)),
                  default=None)
    if nearest is None:
        return line
    if nearest.inject_us >= end:
        gap = f"ends {(nearest.inject_us - end) / 1e6:.0f} s before"
    else:
        gap = f"starts {(start - nearest.inject_us) / 1e6:.0f} s after"
    return (f"{line}; {gap} the label of {nearest.service} {nearest.kind} "
            f"({_clock_time(nearest.inject_us)})")


def shifts_report(results: Sequence[NezhaResult]) -> str:
    """One line per shift of the day's windows, and the worst case over them."""
    lines = ["  the same day with the windows shifted (spans and faults moved together):",
             f"  {'shift':>5} {'found':>7} {'recall':>6} {'false alarms':>12} {'per hour':>8} "
             f"{'fault-free':>10} {'delay':>6} {'nearest normal':>14}"]

    for r in results:
        with_data = len(r.faults_with_data)
        found = sum(f.detected for f in r.faults_with_data)
        delay = "-" if r.median_delay_s is None else f"{r.median_delay_s:.0f} s"
        nearest = "-" if r.nearest_normal is None else f"{r.nearest_normal.score}"
        lines.append(f"  {r.shift_s:>4}s {found:>3}/{with_data:<3} {r.recall(True):>6.2f} "
                     f"{r.false_alarm_episodes:>12} {r.alarms_per_hour:>8.1f} "
                     f"{r.fault_free_hours:>8.3f} h {delay:>6} {nearest:>14}")
        missed = [f"{f.service} {f.kind}" for f in r.faults_with_data if not f.detected]
        if missed:
            lines.append(f"        missed: {', '.join(missed)}")
        lines += [f"        {false_alarm_line(a, r.faults)}" for a in r.false_alarms[:5]]
    delays = [r.median_delay_s for r in results if r.median_delay_s is not None]
    lines.append(
        f"  worst case: recall {min(r.recall(True) for r in results):.2f} (faults with data), "
        f"{max(r.false_alarm_episodes for r in results)} false-alarm episodes "
        f"({max(r.alarms_per_hour for r in results):.1f} per hour), median delay "
        + (f"{max(delays):.0f} s" if delays else "-"))
    return "\n".join(lines)
