"""pandas views over Cassandra: windows merged to a coarser resolution equal the aggregate
computed directly at that resolution."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pandas as pd
import pytest

from analytics.store import Store, connect
from analytics.views import (
    call_pattern_table,
    load_edges,
    load_service_metrics,
    merge_windows,
    to_frame,
)
from analytics.windows import aggregate
from clover.config import Settings, load_settings
from clover.stack import Stack
from tests.test_aggregate import DAY_US, make_spans


@pytest.fixture
def store(live_stack: Stack, settings: Settings) -> Iterator[Store]:
    keyspace = f"test_views_{uuid.uuid4().hex[:10]}"
    with connect(load_settings(environ={"CLOVER_CASSANDRA_KEYSPACE": keyspace})) as store:
        store.create_schema(1)
        yield store
        store.session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=60)


def _frame_key(frame: pd.DataFrame) -> list[tuple]:
    columns = ["window_start", "service", "revision", "peer_service", "requests", "errors",
               "bytes_in", "bytes_out", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms",
               "latency_max_ms"]
    # Percentiles are compared to 9 significant digits: merging sketches adds their bin
    # counts exactly, but float sums in a different order may differ in the last bit.
    return sorted(tuple(None if pd.isna(v) else float(f"{v:.9g}") if isinstance(v, float)
                        else v for v in row)
                  for row in frame[columns].itertuples(index=False))


def test_minutes_merged_from_stored_windows_equal_the_direct_minute_aggregate(
        store: Store) -> None:
    spans = make_spans("views", 20_000, services=3, seed=11)  # about 80 s of traffic
    store.write_service_metrics(aggregate(spans, window_seconds=2))
    services = [f"views/svc{i}" for i in range(3)]
    first = min(s.start_us for s in spans)
    start, end = (pd.Timestamp(first - DAY_US, unit="us", tz="UTC"),
                  pd.Timestamp(first + DAY_US, unit="us", tz="UTC"))
    minutes = load_service_metrics(store, services, start, end, resolution="60s")
    direct = to_frame(aggregate(spans, window_seconds=60))
    assert _frame_key(minutes) == _frame_key(direct[direct["peer_service"].isna()])
    assert minutes["requests"].sum() == sum(1 for s in spans if s.kind == "server")
    edges = load_edges(store, services, start, end, resolution="60s")
    assert _frame_key(edges) == _frame_key(direct[direct["peer_service"].notna()])
    raw = load_service_metrics(store, services, start, end)
    assert set(raw["window_seconds"]) == {2}
    # Patterns add up over a minute's windows: as many as the minute's requests.
    assert [sum(p.values()) for p in minutes["call_patterns"]] == minutes["requests"].tolist()
    table = call_pattern_table(minutes)
    assert len(table) == sum(len(p) for p in minutes["call_patterns"])
    by_row = table.groupby(["window_start", "service", "revision"])
    assert by_row["share"].sum().round(9).eq(1.0).all()
    assert set(table["pattern"]) == {"", "call svc1", "call svc2", "call svc0"}


def test_a_resolution_finer_than_the_windows_and_a_bad_service_name_are_refused() -> None:
    frame = to_frame(aggregate(make_spans("views", 100, seed=1), window_seconds=10))
    with pytest.raises(ValueError, match="finer than the stored windows"):
        merge_windows(frame, "2s")
    with pytest.raises(ValueError, match="namespace/service"):
        load_service_metrics(None, ["cart"], "2024-01-01", "2024-01-02")  # type: ignore[arg-type]
