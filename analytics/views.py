"""pandas views over the stored windows, for notebooks, training and evaluation.

``load_service_metrics`` and ``load_edges`` read the rows of the given services in [start, end)
and, when ``resolution`` is coarser than the stored window, merge windows: counts and bytes
(and requests per call pattern) add up, the maximum is the maximum, and the percentiles come
from the merged DDSketches, so a minute's p99 is the p99 of the minute's requests, not an
average of window p99s.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime

import pandas as pd

from analytics.store import Store
from analytics.windows import encode_sketch, merge_sketches, sketch_quantile
from clover.records import ServiceMetrics, to_dict

_KEYS = ["namespace", "service", "revision", "peer_namespace", "peer_service"]
_SUMS = ["requests", "errors", "bytes_in", "bytes_out", "flows", "connections_opened",
         "connections_closed", "connections_reset"]
COLUMNS = ["window_start", *_KEYS, "window_seconds", *_SUMS, "error_rate", "latency_p50_ms",
           "latency_p90_ms", "latency_p99_ms", "latency_max_ms", "latency_sketch", "call_patterns"]

Service = str | tuple[str, str]
"""A service as ``"namespace/service"`` or ``(namespace, service)``."""


def load_service_metrics(store: Store, services: Iterable[Service], start: datetime | str,
                         end: datetime | str, resolution: str | None = None) -> pd.DataFrame:
    """Service rows (not edges): one per service, revision and period of ``resolution``
    (a pandas offset such as ``"1min"``; None keeps the stored windows)."""
    frame = _load(store, services, start, end)
    return merge_windows(frame[frame["peer_service"].isna()], resolution)


def load_edges(store: Store, services: Iterable[Service], start: datetime | str,
               end: datetime | str, resolution: str | None = None) -> pd.DataFrame:
    """Caller -> callee rows whose caller is one of ``services``."""
    frame = _load(store, services, start, end)
    return merge_windows(frame[frame["peer_service"].notna()], resolution)


def to_frame(rows: Iterable[ServiceMetrics]) -> pd.DataFrame:
    """Records as a DataFrame with a UTC ``window_start`` column, ordered by time."""
    frame = pd.DataFrame([to_dict(r) for r in rows], columns=[*COLUMNS, "window_start_us"])
    frame["window_start"] = pd.to_datetime(frame["window_start_us"], unit="us", utc=True)
    frame = frame.drop(columns=["window_start_us"])
    return frame.sort_values(["window_start", *_KEYS], na_position="first",
                             ignore_index=True)[COLUMNS]


def merge_windows(frame: pd.DataFrame, resolution: str | None) -> pd.DataFrame:
    """Windows merged into periods of ``resolution`` per service, revision and peer."""
    if resolution is None or frame.empty:
        return frame.reset_index(drop=True)
    period = pd.Timedelta(resolution)
    if period.total_seconds() < frame["window_seconds"].max():
        raise ValueError(f"resolution {resolution} is finer than the stored windows "
                         f"({frame['window_seconds'].max()} s); use None or a coarser one")
    merged = []
    keyed = frame.assign(window_start=frame["window_start"].dt.floor(period))
    for key, group in keyed.groupby(["window_start", *_KEYS], dropna=False, sort=True):
        row = dict(zip(["window_start", *_KEYS], key, strict=True))
        row["window_seconds"] = int(period.total_seconds())
        for column in _SUMS:
            row[column] = int(group[column].sum())
        requests = row["requests"]
        row["error_rate"] = row["errors"] / requests if requests else None
        sketch = merge_sketches(group["latency_sketch"])
        for q, column in ((0.5, "latency_p50_ms"), (0.9, "latency_p90_ms"),
                          (0.99, "latency_p99_ms")):
            row[column] = sketch_quantile(sketch, q)
        row["latency_max_ms"] = group["latency_max_ms"].max()
        row["latency_sketch"] = encode_sketch(sketch) if sketch is not None else None
        row["call_patterns"] = _add_patterns(group["call_patterns"])
        merged.append(row)
    return pd.DataFrame(merged, columns=COLUMNS)


def call_pattern_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The service rows' call patterns in long form, one row per (window, service, revision,
    pattern) with its requests and their share of the row's requests: what a flagged window's
    requests did, beside what they usually do (``pivot_table`` it by pattern over time)."""
    rows = [
        {"window_start": row.window_start, "namespace": row.namespace, "service": row.service,
         "revision": row.revision, "pattern": pattern, "requests": count,
         "share": count / total}
        for row in frame[frame["peer_service"].isna()].itertuples(index=False)
        if isinstance(row.call_patterns, dict) and (total := sum(row.call_patterns.values()))
        for pattern, count in sorted(row.call_patterns.items(), key=lambda item: -item[1])]
    return pd.DataFrame(rows, columns=["window_start", "namespace", "service", "revision",
                                       "pattern", "requests", "share"])


def _add_patterns(windows: Iterable[dict[str, int] | None]) -> dict[str, int] | None:
    """Requests per call pattern over several windows (None when none has patterns)."""
    total: Counter[str] | None = None
    for patterns in windows:
        if isinstance(patterns, dict):  # not None or NaN
            total = (total or Counter()) + Counter(patterns)
    return None if total is None else dict(total)


def _load(store: Store, services: Iterable[Service], start: datetime | str,
          end: datetime | str) -> pd.DataFrame:
    start_us, end_us = _micros(start), _micros(end)
    rows: list[ServiceMetrics] = []
    for namespace, service in _parse(services):
        rows += store.read_service_metrics(namespace, service, start_us, end_us)
    return to_frame(rows)


def _parse(services: Iterable[Service]) -> Sequence[tuple[str, str]]:
    parsed = []
    for item in [services] if isinstance(services, str) else services:
        if isinstance(item, tuple):
            parsed.append(item)
            continue
        namespace, slash, service = item.partition("/")
        if not slash or not namespace or not service:
            raise ValueError(f"service {item!r}: write it as 'namespace/service'")
        parsed.append((namespace, service))
    return parsed


def _micros(moment: datetime | str) -> int:
    stamp = pd.Timestamp(moment)
    if stamp.tzinfo is None:
        stamp = stamp.tz_localize("UTC")
    return int(stamp.value // 1000)
