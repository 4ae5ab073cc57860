"""The Cassandra store against the real server: keyspace, tables, whole-window upserts."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

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
