"""The Cassandra store against the real server: keyspace, tables, whole-window upserts."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from analytics.store import SCHEMA as STORE_SCHEMA
from analytics.store import Store, connect
from clover.config import Settings
from tests import samples


@pytest.fixture(scope="module")
def store(live_stack, settings: Settings):
    with connect(settings) as store:
        store.create_schema(settings.cassandra.replication_factor)
        yield store


def test_keyspace_and_tables_are_created(store: Store, settings: Settings) -> None:
    store.create_schema(settings.cassandra.replication_factor)  # idempotent: runs twice
    store.cluster.refresh_schema_metadata()
    keyspace = store.cluster.metadata.keyspaces[settings.cassandra.keyspace]
    assert "service_metrics" in keyspace.tables
    table = keyspace.tables["service_metrics"]
    assert [c.name for c in table.partition_key] == ["namespace", "service", "day"]
    assert [c.name for c in table.clustering_key] == ["window_start", "revision", "peer"]


def test_service_metrics_round_trip_and_rewrite_is_harmless(store: Store) -> None:
    service = f"svc-{uuid.uuid4().hex[:8]}"
    base = dataclasses.replace(samples.sample_service_metrics(), service=service)
    edge = dataclasses.replace(base, peer_namespace="shop", peer_service="payment",
                               requests=7, errors=0, error_rate=0.0)
    later = dataclasses.replace(base, window_start_us=base.window_start_us + 10_000_000)
    assert store.write_service_metrics([base, edge, later]) == 3

    window = (base.window_start_us, base.window_start_us + 3_600_000_000)
    rows = store.read_service_metrics(base.namespace, service, *window)
    assert sorted(rows, key=lambda r: (r.window_start_us, r.peer_service or "")) == [
        base, edge, later]

    # A replay writes the same window again: the row is replaced, not added to.
    replayed = dataclasses.replace(base, requests=base.requests)
    store.write_service_metrics([replayed, replayed])
    assert len(store.read_service_metrics(base.namespace, service, *window)) == 3


def test_a_table_made_before_a_column_was_added_gets_it(store: Store,
                                                        settings: Settings) -> None:
    """An install whose service_metrics table predates call_patterns: create_schema adds the
    column, and the rows written before read back with none."""
    keyspace = f"clover_old_{uuid.uuid4().hex[:8]}"
    old = dataclasses.replace(settings, cassandra=dataclasses.replace(
        settings.cassandra, keyspace=keyspace))
    session = store.session
    try:
        session.execute(STORE_SCHEMA[0].format(keyspace=keyspace, replication_factor=1))
        table = STORE_SCHEMA[1].format(keyspace=keyspace)
        assert ", call_patterns text" in table
        session.execute(table.replace(", call_patterns text", ""), timeout=60)
        before = dataclasses.replace(samples.sample_service_metrics(), call_patterns=None)
        with connect(old) as older:
            older.session.set_keyspace(keyspace)
            older.session.execute(  # a row as the older Clover wrote it
                f"INSERT INTO {keyspace}.service_metrics (namespace, service, day, "
                "window_start, revision, peer, requests) VALUES ('shop', 'cart', "
                "'1970-01-01', 0, 'r1', '', 5)")
            older.create_schema(1)
            older.cluster.refresh_table_metadata(keyspace, "service_metrics")
            columns = older.cluster.metadata.keyspaces[keyspace].tables["service_metrics"].columns
            assert columns["call_patterns"].cql_type == "text"
            rows = older.read_service_metrics("shop", "cart", 0, 86_400_000_000)
            assert [(r.requests, r.call_patterns) for r in rows] == [(5, None)]
            now = samples.sample_service_metrics()
            later = now.window_start_us + 10_000_000
            older.write_service_metrics([now])
            older.write_service_metrics([before])
            got = older.read_service_metrics(now.namespace, now.service, now.window_start_us,
                                             later)
            assert [r.call_patterns for r in got] == [None]  # `before` replaced `now`
            older.write_service_metrics([now])
            got = older.read_service_metrics(now.namespace, now.service, now.window_start_us,
                                             later)
            assert got == [now] and now.call_patterns and "" in now.call_patterns
    finally:
        session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=60)


def test_rows_go_in_batches_bounded_in_rows_and_bytes() -> None:
    from analytics.store import BATCH_BYTES, BATCH_ROWS, _batches

    small = [("shop", "cart", 1, b"x" * 100)] * 60
    assert [len(b) for b in _batches(small)] == [BATCH_ROWS, BATCH_ROWS, 10]
    wide = [("shop", "cart", 1, b"x" * 3000, "{}")] * 20  # wide latency sketches
    batches = list(_batches(wide))
    assert sum(map(len, batches)) == 20 and len(batches) > 1
    assert all(sum(len(v) if isinstance(v, (str, bytes)) else 8 for row in batch for v in row)
               <= BATCH_BYTES for batch in batches)
    huge = [("shop", "cart", b"x" * (BATCH_BYTES + 1))] * 2
    assert [len(b) for b in _batches(huge)] == [1, 1]  # alone, not dropped


def test_unreachable_cassandra_is_a_clear_error(settings: Settings) -> None:
    wrong = dataclasses.replace(settings, cassandra=dataclasses.replace(
        settings.cassandra, contact_points=("127.0.0.1",), port=1))
    with pytest.raises(ConnectionError, match=r"127\.0\.0\.1:1 is unreachable.*contact_points"):
        connect(wrong, retry_for_s=1.0)


def test_rows_in_flight_tell_when_they_were_written(store: Store) -> None:
    import time

    service = f"svc-{uuid.uuid4().hex[:8]}"
    rows = [dataclasses.replace(samples.sample_service_metrics(), service=service,
                                window_start_us=samples.sample_service_metrics().window_start_us
                                + i * 10_000_000) for i in range(3)]
    sent = time.monotonic()
    in_flight = store.start_writing_service_metrics(rows)
    time.sleep(0.5)  # the caller reads on; the write's time is its own, not this wait's
    assert in_flight.result() == 3
    assert sent < in_flight.finished_at() < sent + 0.5
    window = (rows[0].window_start_us, rows[-1].window_start_us + 10_000_000)
    assert len(store.read_service_metrics(rows[0].namespace, service, *window)) == 3
