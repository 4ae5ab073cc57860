"""The Cassandra store: connection, schema, and the writes and reads of Clover's tables.

The CQL here runs on Cassandra 2.1 (the local stack) and on 4.x/5.x: no ``date`` type, no
GROUP BY, no JSON. Rows are partitioned by service and UTC day so that a partition stays
bounded, and a window's aggregate is keyed by (revision, window start, peer) so rewriting it
after a replay replaces the row instead of adding to it. Cassandra timestamps hold
milliseconds: window starts, which fall on whole seconds, survive exactly.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import orjson
from cassandra.cluster import (
    EXEC_PROFILE_DEFAULT,
    Cluster,
    ExecutionProfile,
    NoHostAvailable,
    ResponseFuture,
    Session,
)
from cassandra.concurrent import execute_concurrent_with_args
from cassandra.policies import DCAwareRoundRobinPolicy, ExponentialReconnectionPolicy
from cassandra.query import BatchStatement, BatchType, PreparedStatement

from clover.config import Settings
from clover.records import ServiceMetrics

log = logging.getLogger(__name__)

# Columns of service_metrics that are not part of the primary key, in record field order.
_METRIC_COLUMNS = tuple(
    f.name for f in dataclasses.fields(ServiceMetrics)
    if f.name not in ("namespace", "service", "revision", "window_start_us", "peer_namespace",
                      "peer_service", "schema_version")
)
# An unlogged batch holds at most BATCH_ROWS rows and about BATCH_BYTES of values: well below
# the size at which Cassandra 4.x refuses a batch (batch_size_fail_threshold_in_kb, 50 KB by
# default). A row's latency sketch alone can be 2 KB and more (a wide spread of latencies).
BATCH_ROWS = 25
BATCH_BYTES = 20_000
_BIGINT = {"requests", "errors", "bytes_in", "bytes_out", "flows", "connections_opened",
           "connections_closed", "connections_reset"}


def _cql_type(column: str) -> str:
    if column in _BIGINT:
        return "bigint"
    if column == "window_seconds":
        return "int"
    if column == "latency_sketch":
        return "blob"
    if column == "call_patterns":
        # A JSON object as text, written as one value: a map column's overwrite leaves a
        # tombstone per row for reads of a day's partition to wade through, and 2.1 cannot
        # freeze a map.
        return "text"
    return "double"


SCHEMA = [
    """CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication =
       {{'class': 'SimpleStrategy', 'replication_factor': {replication_factor}}}""",
    # peer is '' for a service's own row and 'namespace/service' of the callee for an edge row
    # (namespace left empty when unknown).
    "CREATE TABLE IF NOT EXISTS {keyspace}.service_metrics ("
    " namespace text, service text, day text, window_start timestamp, revision text, peer text, "
    + ", ".join(f"{c} {_cql_type(c)}" for c in _METRIC_COLUMNS)
    + ", PRIMARY KEY ((namespace, service, day), window_start, revision, peer)"
    ") WITH CLUSTERING ORDER BY (window_start ASC, revision ASC, peer ASC)",
    # Where each stream worker group has durably written up to, per input partition: the
    # event time up to which its windows are closed (written), and the input offset from which
    # a restarted worker must re-read to rebuild the windows still open.
    "CREATE TABLE IF NOT EXISTS {keyspace}.stream_progress ("
    " consumer_group text, partition int, closed_before timestamp, offsets map<text, bigint>,"
    " updated timestamp, PRIMARY KEY ((consumer_group), partition))",
]


@dataclass(frozen=True)
class RowsInFlight:
    """Rows sent to Cassandra whose writes may not be acknowledged yet."""

    futures: list[ResponseFuture]
    rows: int
    # When each batch was answered (on the driver's thread), so that the write's latency can be
    # told however long after it the caller waits.
    answered: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        for future in self.futures:
            future.add_callbacks(self._answer, self._answer)

    def _answer(self, _: object) -> None:
        self.answered.append(time.monotonic())

    def result(self) -> int:
        """Wait until every row is written (raising the first write's error); the row count."""
        for future in self.futures:
            future.result()
        return self.rows

    def finished_at(self) -> float:
        """After :meth:`result`, when the last batch was answered (monotonic clock). A future
        is done before its callbacks run, so one not yet counted was answered just now."""
        if len(self.answered) < len(self.futures):
            return time.monotonic()
        return max(self.answered, default=time.monotonic())


@dataclass(frozen=True)
class StreamProgress:
    """A stream partition's checkpoint: windows before ``closed_before_us`` are written, and
    ``offsets`` (topic -> offset) is where re-reading rebuilds the windows still open."""

    partition: int
    closed_before_us: int
    offsets: dict[str, int]


@dataclass
class Store:
    """An open connection to Clover's keyspace."""

    cluster: Cluster
    session: Session
    keyspace: str
    ttl_seconds: int
    prepared: dict[str, PreparedStatement] = field(default_factory=dict)

    def close(self) -> None:
        self.cluster.shutdown()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create_schema(self, replication_factor: int) -> None:
        """Create the keyspace and tables that are missing (idempotent)."""
        for statement in SCHEMA:
            self.session.execute(
                statement.format(keyspace=self.keyspace, replication_factor=replication_factor),
                timeout=60,
            )
        self._add_missing_columns()
        self.session.set_keyspace(self.keyspace)

    def _add_missing_columns(self) -> None:
        """Add the service_metrics columns a table made by an older Clover lacks (CREATE TABLE
        IF NOT EXISTS leaves an existing table as it is)."""
        self.cluster.refresh_table_metadata(self.keyspace, "service_metrics")
        table = self.cluster.metadata.keyspaces[self.keyspace].tables["service_metrics"]
        for column in _METRIC_COLUMNS:
            if column not in table.columns:
                log.info("adding column %s to %s.service_metrics", column, self.keyspace)
                self.session.execute(f"ALTER TABLE {self.keyspace}.service_metrics ADD "
                                     f"{column} {_cql_type(column)}", timeout=60)

    def write_service_metrics(self, records: Iterable[ServiceMetrics]) -> int:
        """Write whole window aggregates (upserts); returns how many rows were written."""
        return self.start_writing_service_metrics(records).result()

    def start_writing_service_metrics(self, records: Iterable[ServiceMetrics]) -> RowsInFlight:
        """Send whole window aggregates (upserts) to Cassandra without waiting for them.

        Rows of one Cassandra partition (namespace, service, day) go in unlogged batches of up
        to BATCH_ROWS: one request and one mutation for many rows, which a stream catching up
        writes by the thousand."""
        columns = ("namespace", "service", "day", "window_start", "revision", "peer",
                   *_METRIC_COLUMNS)
        statement = self._prepared(
            f"INSERT INTO {self.keyspace}.service_metrics ({', '.join(columns)}) "
            f"VALUES ({', '.join('?' for _ in columns)}) USING TTL ?"
        )
        by_partition: dict[tuple[object, ...], list[tuple[object, ...]]] = {}
        for record in records:
            row = (*_row_of(record), self.ttl_seconds)
            by_partition.setdefault(row[:3], []).append(row)
        futures = []
        count = 0
        for rows in by_partition.values():
            for part in _batches(rows):
                batch = BatchStatement(batch_type=BatchType.UNLOGGED)
                for row in part:
                    batch.add(statement, row)
                # Not execute_concurrent_async: in this driver it waits for the results too.
                futures.append(self.session.execute_async(batch))
                count += len(batch)
        return RowsInFlight(futures, count)

    def read_service_metrics(self, namespace: str, service: str, start_us: int,
                             end_us: int) -> list[ServiceMetrics]:
        """Every row of one service whose window starts in [start_us, end_us)."""
        statement = self._prepared(
            f"SELECT * FROM {self.keyspace}.service_metrics WHERE namespace = ? AND service = ? "
            "AND day = ? AND window_start >= ? AND window_start < ?"
        )
        start, end = _utc(start_us), _utc(end_us)
        found = []
        for day in _days(start, end):
            for row in self.session.execute(statement, (namespace, service, day, start, end)):
                found.append(_record_of(row))
        return found


    def write_progress(self, consumer_group: str, *progress: StreamProgress) -> None:
        """Write the checkpoint of each partition given (one row per partition)."""
        statement = self._prepared(
            f"INSERT INTO {self.keyspace}.stream_progress (consumer_group, partition, "
            "closed_before, offsets, updated) VALUES (?, ?, ?, ?, ?)")
        now = datetime.now(UTC)
        execute_concurrent_with_args(
            self.session, statement,
            [(consumer_group, p.partition, _utc(p.closed_before_us), p.offsets, now)
             for p in progress], concurrency=64, raise_on_first_error=True)

    def read_progress(self, consumer_group: str) -> dict[int, StreamProgress]:
        statement = self._prepared(
            f"SELECT partition, closed_before, offsets FROM {self.keyspace}.stream_progress "
            "WHERE consumer_group = ?")
        return {
            row.partition: StreamProgress(
                row.partition, round(row.closed_before.replace(tzinfo=UTC).timestamp() * 1e6),
                dict(row.offsets or {}))
            for row in self.session.execute(statement, (consumer_group,))
        }

    def _prepared(self, cql: str) -> PreparedStatement:
        # Prepared once per connection: preparing is a round trip to every node.
        statement = self.prepared.get(cql)
        if statement is None:
            statement = self.prepared[cql] = self.session.prepare(cql)
        return statement


def connect(settings: Settings, *, retry_for_s: float = 60.0) -> Store:
    """Connect to Cassandra, retrying with exponential backoff while it is unreachable."""
    cassandra = settings.cassandra
    auth = None
    if cassandra.username:
        from cassandra.auth import PlainTextAuthProvider

        auth = PlainTextAuthProvider(cassandra.username, cassandra.password)
    deadline = time.monotonic() + retry_for_s
    delay = 0.5
    while True:
        cluster = Cluster(list(settings.cassandra_contact_points), port=settings.cassandra_port,
                          protocol_version=cassandra.protocol_version, auth_provider=auth,
                          execution_profiles={EXEC_PROFILE_DEFAULT: ExecutionProfile(
                              load_balancing_policy=DCAwareRoundRobinPolicy())},
                          connect_timeout=5,
                          # Back within seconds of a restarted node, not the default 10 min.
                          reconnection_policy=ExponentialReconnectionPolicy(0.5, 10.0))
        try:
            session = cluster.connect()
            return Store(cluster, session, cassandra.keyspace, cassandra.ttl_days * 86400)
        except NoHostAvailable as exc:
            cluster.shutdown()
            where = f"{','.join(settings.cassandra_contact_points)}:{settings.cassandra_port}"
            if time.monotonic() + delay > deadline:
                raise ConnectionError(
                    f"Cassandra at {where} is unreachable after {retry_for_s:.0f}s ({exc}). "
                    "Start it with `clover stack up`, or point [cassandra] contact_points/port "
                    "(CLOVER_CASSANDRA_CONTACT_POINTS) at your cluster."
                ) from None
            log.warning("Cassandra at %s unreachable, retrying in %.1fs", where, delay)
            time.sleep(delay)
            delay = min(delay * 2, 8.0)


def _batches(rows: Sequence[tuple[object, ...]]) -> Iterator[list[tuple[object, ...]]]:
    """The rows in runs of at most BATCH_ROWS rows and about BATCH_BYTES of values (a row
    larger than that alone goes in a batch of its own)."""
    part: list[tuple[object, ...]] = []
    size = 0
    for row in rows:
        # Text and blobs by their length, anything else as 8 bytes.
        row_size = sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in row)
        if part and (len(part) == BATCH_ROWS or size + row_size > BATCH_BYTES):
            yield part
            part, size = [], 0
        part.append(row)
        size += row_size
    if part:
        yield part


def _utc(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1e6, UTC)


def _days(start: datetime, end: datetime) -> Iterator[str]:
    day = start.date()
    while day <= (end - timedelta(microseconds=1)).date():
        yield day.isoformat()
        day += timedelta(days=1)


def _row_of(record: ServiceMetrics) -> tuple[object, ...]:
    start = _utc(record.window_start_us)
    peer = f"{record.peer_namespace or ''}/{record.peer_service}" if record.peer_service else ""
    values = []
    for column in _METRIC_COLUMNS:
        value = getattr(record, column)
        if column == "latency_sketch" and value is not None:
            value = base64.b64decode(value)
        elif column == "call_patterns" and value is not None:
            value = orjson.dumps(value).decode()
        values.append(value)
    return (record.namespace, record.service, start.date().isoformat(), start,
            record.revision, peer, *values)


def _record_of(row: object) -> ServiceMetrics:
    peer = row.peer  # type: ignore[attr-defined]
    peer_namespace, _, peer_service = peer.partition("/") if peer else (None, None, None)
    window_start = row.window_start.replace(tzinfo=UTC)  # type: ignore[attr-defined]
    values = {c: getattr(row, c) for c in _METRIC_COLUMNS}
    if values["latency_sketch"] is not None:
        values["latency_sketch"] = base64.b64encode(values["latency_sketch"]).decode()
    if values["call_patterns"] is not None:
        values["call_patterns"] = orjson.loads(values["call_patterns"])
    return ServiceMetrics(
        namespace=row.namespace, service=row.service,  # type: ignore[attr-defined]
        revision=row.revision,  # type: ignore[attr-defined]
        window_start_us=round(window_start.timestamp() * 1e6),
        peer_namespace=peer_namespace or None, peer_service=peer_service or None,
        **values,
    )
