"""Offline scoring of one time series in the Numenta Anomaly Benchmark (NAB) format, and NAB's
scoring of such scores against labelled anomaly windows.

``clover models score --input series.csv --output scores.csv``: ``timestamp,value`` in, the same
plus ``anomaly_score`` out. The scorer streams: each row is scored against the rows before it
only (no look-ahead), with the same robust arithmetic as the service scorer: the median and MAD
of the last ``history`` values, the score one minus the normal two-sided tail p-value of the
robust z-score. A value judged anomalous is not learned (so a fault does not become normal),
unless the series stays anomalous for ``relearn_after`` rows: a level shift becomes the normal.

NAB's scoring (the "standard" profile): per labelled window, the first detection (score at or
above the threshold) earns ``scaled_sigmoid(position)``, from ~0.99 at the window's start to 0
at its end; a window without detection costs 1; a detection outside every window costs 0.11
times how far it is from the previous window's end (a full 0.11 if no window precedes it).
Detections in the first 15 % of a file (probation) are ignored. The normalised score is
``100 * (raw - null) / (perfect - null)``, where null never detects and perfect detects each
window at its start.
"""

from __future__ import annotations

import csv
import math
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import norm

from models.features import MAD_TO_SIGMA

A_TP, A_FP, A_FN = 1.0, 0.11, 1.0
PROBATION = 0.15


class SeriesFormatError(ValueError):
    """The input is not a ``timestamp,value`` CSV."""


@dataclass
class StreamingScorer:
    """Robust z-score of each value against the values before it (streaming, no look-ahead).

    Two baselines: the recent level (median and MAD of the last ``history`` values) and, once
    ``period`` rows (one day of the series' own spacing, see :func:`rows_per_day`) of history
    exist, the same time (+-1 row) in up to ``periods`` earlier periods (their median and
    MAD). A value is as anomalous as the *smaller* of its two departures: a daily peak is
    normal if yesterday had it too.
    """

    history: int = 288
    min_history: int = 30
    threshold: float = 0.999
    relearn_after: int = 12
    relative_floor: float = 0.02
    period: int | None = None
    periods: int = 7

    def __post_init__(self) -> None:
        self._values: deque[float] = deque(maxlen=self.history)  # normal values only
        # Every value, anomalous or not, so that "the same time yesterday" stays aligned.
        self._every: deque[float] = deque(maxlen=(self.period or 0) * self.periods + 3)
        self._anomalous_run = 0

    def _z(self, past: np.ndarray, value: float) -> float:
        median = float(np.median(past))
        mad = float(np.median(np.abs(past - median)))
        # A flat series has MAD 0; the floor keeps tiny wiggles from scoring as huge.
        scale = max(MAD_TO_SIGMA * mad, self.relative_floor * abs(median), 1e-9)
        return abs(value - median) / scale

    def _same_time(self) -> np.ndarray | None:
        """The values at (about) this time in earlier periods."""
        if not self.period or len(self._every) < self.period + 2:
            return None
        values = np.fromiter(self._every, dtype=float)
        n = len(values)
        return np.array([values[n - k * self.period + d] for k in range(1, self.periods + 1)
                         for d in (-1, 0, 1) if 0 <= n - k * self.period + d < n])

    def score_one(self, value: float) -> float:
        """The score of ``value`` (0 while there is too little history); then learns it."""
        if not math.isfinite(value):
            return 0.0
        score = 0.0
        same_time = self._same_time()
        if self.period:
            self._every.append(value)
        if len(self._values) >= self.min_history:
            z = self._z(np.fromiter(self._values, dtype=float), value)
            if same_time is not None:
                # The spread at this time of day: a busy hour is noisier than a quiet one.
                z = min(z, self._z(same_time, value))
            score = 1.0 - 2.0 * float(norm.sf(z))
        if score >= self.threshold:
            self._anomalous_run += 1
            if self._anomalous_run < self.relearn_after:
                return score
        else:
            self._anomalous_run = 0
        self._values.append(value)
        return score


def rows_per_day(times: pd.Series) -> int | None:
    """Rows in one day at the series' median spacing (None for irregular or coarse series)."""
    spacing = times.diff().median()
    if pd.isna(spacing) or spacing <= pd.Timedelta(0) or spacing > pd.Timedelta(hours=1):
        return None
    return int(round(pd.Timedelta(days=1) / spacing))


def read_series(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A NAB series: ``timestamp`` (parsed) and ``value`` (float), in file order."""
    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise SeriesFormatError(f"{path}: cannot read it as CSV: {exc}") from exc
    if list(frame.columns[:2]) != ["timestamp", "value"]:
        raise SeriesFormatError(f"{path}: expected the columns timestamp,value (NAB format), "
                                f"found {','.join(map(str, frame.columns))}")
    values = pd.to_numeric(frame["value"], errors="coerce")
    bad = frame.index[values.isna() & frame["value"].notna()].tolist()
    if bad:
        raise SeriesFormatError(f"{path}: line {bad[0] + 2}: value {frame['value'][bad[0]]!r} "
                                "is not a number")
    times = pd.to_datetime(frame["timestamp"], errors="coerce")
    if times.isna().any():
        line = int(times.isna().to_numpy().argmax()) + 2
        raise SeriesFormatError(f"{path}: line {line}: timestamp "
                                f"{frame['timestamp'][line - 2]!r} is not a date and time")
    frame["value"] = values
    frame["timestamp_parsed"] = times
    return frame


def score_series(values: np.ndarray, scorer: StreamingScorer) -> np.ndarray:
    return np.array([scorer.score_one(float(v)) for v in values])


def score_csv(input_path: str | os.PathLike[str], output_path: str | os.PathLike[str],
              scorer: StreamingScorer | None = None) -> int:
    """Score a NAB CSV into another (timestamp, value, anomaly_score); returns the row count."""
    frame = read_series(input_path)
    scorer = scorer or StreamingScorer(period=rows_per_day(frame["timestamp_parsed"]))
    scores = score_series(frame["value"].to_numpy(), scorer)
    output = Path(output_path)
    partial = output.with_name(output.name + ".partial")
    with partial.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["timestamp", "value", "anomaly_score"])
        for timestamp, value, score in zip(frame["timestamp"], frame["value"], scores,
                                           strict=True):
            writer.writerow([timestamp, value, f"{score:.6f}"])
    os.replace(partial, output)
    return len(frame)


# --------------------------------------------------------------------------------------------
# NAB scoring


def scaled_sigmoid(position: float) -> float:
    """NAB's reward curve: ~1 at a window's start (-1), 0 at its end, towards -1 after it."""
    if position > 3.0:
        return -1.0
    return 2.0 / (1.0 + math.exp(5.0 * position)) - 1.0


@dataclass
class NabResult:
    raw: float
    null: float
    perfect: float
    windows: int
    detected: int
    false_positives: int


def nab_score(times: pd.Series, detections: np.ndarray,
              windows: list[tuple[pd.Timestamp, pd.Timestamp]]) -> NabResult:
    """Raw, null and perfect NAB (standard profile) scores of one file's detections."""
    n = len(times)
    ranges = [(int(times.searchsorted(start, "left")), int(times.searchsorted(end, "right")) - 1)
              for start, end in windows]
    probation = int(math.floor(PROBATION * n))
    raw, detected, false_positives = 0.0, set(), 0
    for i in np.flatnonzero(detections):
        if i < probation:
            continue
        inside = [w for w, (a, b) in enumerate(ranges) if a <= i <= b]
        if inside:
            w = inside[0]
            if w not in detected:
                a, b = ranges[w]
                raw += A_TP * scaled_sigmoid(-(b - i + 1) / (b - a + 1))
                detected.add(w)
            continue
        false_positives += 1
        before = [(a, b) for a, b in ranges if b < i]
        if before:
            a, b = before[-1]
            raw -= A_FP * -scaled_sigmoid(abs(i - b) / (b - a + 1))
        else:
            raw -= A_FP
    raw -= A_FN * (len(ranges) - len(detected))
    perfect = sum(A_TP * scaled_sigmoid(-(b - a + 1) / (b - a + 1)) for a, b in ranges)
    return NabResult(raw, -A_FN * len(ranges), perfect, len(ranges), len(detected),
                     false_positives)


def normalised(results: list[NabResult]) -> float:
    """NAB's corpus score: 100 for perfect, 0 for never detecting."""
    raw = sum(r.raw for r in results)
    null = sum(r.null for r in results)
    perfect = sum(r.perfect for r in results)
    return 100.0 * (raw - null) / (perfect - null) if perfect != null else float("nan")
