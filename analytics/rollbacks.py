"""The rollback agent's decisions in Cassandra: table, write and read.

One row per decision, taken or not, partitioned by service and UTC day like service_metrics,
newest first. The CQL runs on Cassandra 2.1 and on 4.x/5.x. ``decided_us`` is kept as a bigint
(microseconds) because a ``timestamp`` would drop the microseconds and the row's identity.

Usage::

    store = connect(settings)
    store.create_schema(settings.cassandra.replication_factor)
    table = RollbackTable(store)
    table.create()
    table.write(decision)
    table.read("shop", "cart", start_us, end_us)   # newest first
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

from analytics.store import Store
from clover.records import RollbackDecision

# Record fields stored as plain columns (the key columns and schema_version aside).
_COLUMNS = tuple(f.name for f in dataclasses.fields(RollbackDecision)
                 if f.name not in ("namespace", "service", "decided_us", "schema_version"))
_TYPES = {"consecutive_anomalous": "int", "from_revision": "int", "to_revision": "int",
          "score": "double", "threshold": "double", "anomaly_window_start_us": "bigint",
          "patched_us": "bigint", "dry_run": "boolean"}

TABLE = (
    "CREATE TABLE IF NOT EXISTS {keyspace}.rollback_decisions ("
    " namespace text, service text, day text, decided_us bigint, "
    + ", ".join(f"{c} {_TYPES.get(c, 'text')}" for c in _COLUMNS)
    + ", PRIMARY KEY ((namespace, service, day), decided_us)"
    ") WITH CLUSTERING ORDER BY (decided_us DESC)"
)


class RollbackTable:
    """The rollback_decisions table of a Store's keyspace."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._insert = None
        self._select = None

    def create(self) -> None:
        """Create the table if it is missing (the keyspace must exist: Store.create_schema)."""
        self.store.session.execute(TABLE.format(keyspace=self.store.keyspace), timeout=60)

    def write(self, decision: RollbackDecision) -> None:
        if self._insert is None:
            columns = ("namespace", "service", "day", "decided_us", *_COLUMNS)
            self._insert = self.store.session.prepare(
                f"INSERT INTO {self.store.keyspace}.rollback_decisions ({', '.join(columns)}) "
                f"VALUES ({', '.join('?' for _ in columns)}) USING TTL ?")
        day = day_of(decision.decided_us)
        values = [getattr(decision, c) for c in _COLUMNS]
        self.store.session.execute(self._insert, (
            decision.namespace, decision.service, day, decision.decided_us, *values,
            self.store.ttl_seconds))

    def read(self, namespace: str, service: str, start_us: int,
             end_us: int) -> list[RollbackDecision]:
        """Decisions about one service made in [start_us, end_us), newest first."""
        if self._select is None:
            self._select = self.store.session.prepare(
                f"SELECT * FROM {self.store.keyspace}.rollback_decisions WHERE namespace = ? "
                "AND service = ? AND day = ? AND decided_us >= ? AND decided_us < ?")
        found: list[RollbackDecision] = []
        for day in reversed(_days(start_us, end_us)):
            for row in self.store.session.execute(
                    self._select, (namespace, service, day, start_us, end_us)):
                found.append(RollbackDecision(
                    namespace=row.namespace, service=row.service, decided_us=row.decided_us,
                    **{c: getattr(row, c) for c in _COLUMNS}))
        return found


def day_of(us: int) -> str:
    """The partition day of a time (UTC), as the table spells it."""
    return datetime.fromtimestamp(us / 1e6, UTC).date().isoformat()


def _days(start_us: int, end_us: int) -> list[str]:
    """The partition days that [start_us, end_us) touches, oldest first."""
    day = datetime.fromtimestamp(start_us / 1e6, UTC).date()
    last = datetime.fromtimestamp(max(start_us, end_us - 1) / 1e6, UTC).date()
    days = []
    while day <= last:
        days.append(day.isoformat())
        day += timedelta(days=1)
    return days
