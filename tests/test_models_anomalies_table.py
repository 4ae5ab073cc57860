"""The anomalies table against the real Cassandra: round trip, upsert, partition days, TTL."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from analytics.anomalies import AnomalyTable
from analytics.store import Store, connect
from clover.config import Settings
from clover.records import Anomaly, Contribution

DAY_US = 86_400_000_000


@pytest.fixture(scope="module")
def table(live_stack, settings: Settings):
    # A keyspace of its own, so nothing collides with other tests.
    keyspace = f"test_anomalies_{uuid.uuid4().hex[:8]}"
    own = dataclasses.replace(settings, cassandra=dataclasses.replace(
        settings.cassandra, keyspace=keyspace, ttl_days=1))
    store: Store = connect(own)
    store.create_schema(1)
    table = AnomalyTable(store)
    table.create()
    yield table
    store.session.execute(f"DROP KEYSPACE {keyspace}", timeout=60)
    store.close()


def _anomaly(start_us: int, **changes) -> Anomaly:
    anomaly = Anomaly(
        namespace="shop", service="cart", revision="abc123", window_start_us=start_us,
        window_seconds=10, detector="online_robust_baseline@1", threshold=0.999,
        verdict="anomalous", emitted_us=start_us + 11_000_000, score=0.99995,
        contributions=[Contribution("latency_p99_ms", 8.5, 420.0, 35.0),
                       Contribution("request_rate", -2.0, 10.0, None)])
    return dataclasses.replace(anomaly, **changes)


def test_round_trip_across_days_and_rewrite_replaces(table: AnomalyTable) -> None:
    midnight = 1_700_006_400_000_000  # 2023-11-15 00:00 UTC
    written = [_anomaly(midnight - 10_000_000), _anomaly(midnight),
               _anomaly(midnight + 10_000_000, verdict="inconclusive", score=None,
                        reason="learning: 2 of 6 windows", contributions=[])]
    assert table.write(written) == 3
    assert table.write([written[1]]) == 1  # a replay rewrites the same row
    found = table.read("shop", "cart", midnight - DAY_US, midnight + DAY_US)
    assert found == written
    assert table.read("shop", "cart", midnight, midnight + 10_000_000) == [written[1]]
    assert table.read("shop", "other", midnight - DAY_US, midnight + DAY_US) == []


def test_rows_carry_the_configured_ttl(table: AnomalyTable) -> None:
    start = 1_700_100_000_000_000
    table.write([_anomaly(start)])
    row = table.store.session.execute(
        f"SELECT TTL(verdict) AS ttl FROM {table.store.keyspace}.anomalies WHERE namespace = "
        "'shop' AND service = 'cart' AND day = '2023-11-16'").one()
    assert row is not None and 0 < row.ttl <= 86_400
