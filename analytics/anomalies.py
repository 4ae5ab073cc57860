"""The scorer's verdicts in Cassandra: the anomalies table, its write and read.

One row per scored window, detector and revision, partitioned by ((namespace, service, day))
like service_metrics, so rewriting a window's verdict after a replay replaces the row. Window
starts are kept as bigint microseconds (exact, and the row's identity). The contributions are a
list of frozen UDTs. The CQL runs on Cassandra 2.1 and on 4.x/5.x (no date type, no JSON).

Usage::

    store = connect(settings)
    store.create_schema(settings.cassandra.replication_factor)
    table = AnomalyTable(store)
    table.create()
    table.write([anomaly, ...])
    table.read("shop", "cart", start_us, end_us)   # oldest first
"""

from __future__ import annotations

from collections.abc import Iterable

from cassandra.concurrent import execute_concurrent_with_args

from analytics.rollbacks import _days, day_of
from analytics.store import Store
from clover.records import Anomaly, Contribution

SCHEMA = [
    "CREATE TYPE IF NOT EXISTS {keyspace}.contribution ("
    " feature text, weight double, value double, baseline double)",
    "CREATE TABLE IF NOT EXISTS {keyspace}.anomalies ("
    " namespace text, service text, day text, window_start_us bigint, revision text,"
    " detector text, window_seconds int, score double, threshold double, verdict text,"
    " reason text, contributions list<frozen<contribution>>, emitted_us bigint,"
    " PRIMARY KEY ((namespace, service, day), window_start_us, revision, detector)"
    ") WITH CLUSTERING ORDER BY (window_start_us ASC, revision ASC, detector ASC)",
]
_COLUMNS = ("namespace", "service", "day", "window_start_us", "revision", "detector",
            "window_seconds", "score", "threshold", "verdict", "reason", "contributions",
            "emitted_us")


class AnomalyTable:
    """The anomalies table of a Store's keyspace."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._insert = None
        self._select = None

    def create(self) -> None:
        """Create the type and table if missing (the keyspace must exist)."""
        for statement in SCHEMA:
            self.store.session.execute(statement.format(keyspace=self.store.keyspace),
                                       timeout=60)
        # The driver maps the UDT to a plain tuple-like class; registering Contribution makes
        # reads return our dataclass directly.
        self.store.cluster.register_user_type(self.store.keyspace, "contribution", Contribution)

    def write(self, anomalies: Iterable[Anomaly]) -> int:
        """Upsert verdicts (with the store's TTL); returns how many rows were written."""
        if self._insert is None:
            self._insert = self.store.session.prepare(
                f"INSERT INTO {self.store.keyspace}.anomalies ({', '.join(_COLUMNS)}) "
                f"VALUES ({', '.join('?' for _ in _COLUMNS)}) USING TTL ?")
        rows = [(a.namespace, a.service, day_of(a.window_start_us), a.window_start_us,
                 a.revision, a.detector, a.window_seconds, a.score, a.threshold, a.verdict,
                 a.reason, list(a.contributions), a.emitted_us, self.store.ttl_seconds)
                for a in anomalies]
        results = execute_concurrent_with_args(self.store.session, self._insert, rows,
                                               concurrency=32, raise_on_first_error=True)
        return sum(1 for ok, _ in results if ok)

    def read(self, namespace: str, service: str, start_us: int, end_us: int) -> list[Anomaly]:
        """Verdicts on one service's windows starting in [start_us, end_us), oldest first."""
        if self._select is None:
            self._select = self.store.session.prepare(
                f"SELECT * FROM {self.store.keyspace}.anomalies WHERE namespace = ? AND "
                "service = ? AND day = ? AND window_start_us >= ? AND window_start_us < ?")
        found: list[Anomaly] = []
        for day in _days(start_us, end_us):
            for row in self.store.session.execute(
                    self._select, (namespace, service, day, start_us, end_us)):
                found.append(Anomaly(
                    namespace=row.namespace, service=row.service, revision=row.revision,
                    window_start_us=row.window_start_us, window_seconds=row.window_seconds,
                    detector=row.detector, threshold=row.threshold, verdict=row.verdict,
                    emitted_us=row.emitted_us, score=row.score, reason=row.reason,
                    contributions=[Contribution(c.feature, c.weight, c.value, c.baseline)
                                   for c in row.contributions or []]))
        return found
