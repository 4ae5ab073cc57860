"""The aggregation agent: clover.flows + clover.spans -> per-service windows -> Cassandra and
clover.service-metrics, exact under crashes, restarts and outages.

How exactness works (no transactions needed):

* Both topics are keyed by service and have the same partition count, so partition *i* of each
  holds the same services; Faust gives both to the same worker. Each partition index has one
  ``WindowAggregator`` (analytics/windows.py).
* A window is written whole, keyed by (namespace, service, day, window, revision, peer), so
  writing it again after a replay replaces the row with the same values.
* A record's Kafka offset is acknowledged (and so may be committed) only once every window it
  went into is written, or it was dead-lettered. Offsets are acknowledged strictly in order, so
  the committed offset never passes a record whose window is still open.
* After the windows are written, a checkpoint row in Cassandra (stream_progress) records the
  event time before which windows are closed and the offset after the last record processed.
  A restarted worker re-reads from the committed offset; records it already counted or
  dead-lettered (window closed, offset before the checkpoint) are skipped, and the windows that
  were open are rebuilt from their records. So a kill -9 at any point neither loses nor double
  counts.
* Cassandra down: the write is retried with backoff while the agent waits, so nothing new is
  read, nothing is acknowledged, and the worker catches up when Cassandra returns.

A record for a window that closed before it arrived (later than the allowed lateness) goes to
clover.deadletter with the reason, as does one that does not decode or validate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Producer
from faust.types import TP
from prometheus_client import Counter, Gauge, Histogram

from analytics.store import Store, StreamProgress, connect
from analytics.windows import Window, WindowAggregator
from clover import records, topics
from clover.config import Settings
from clover.kafka import producer_config
from clover.records import FlowRecord, RecordError, SpanRecord
from streams.app import app
from streams.deadletter import letter_for

log = logging.getLogger("clover.streams.aggregate")
COMPONENT = "streams.aggregate"

RECORDS_IN = Counter("clover_stream_records_in_total", "Records read", ["topic"])
RECORDS_SKIPPED = Counter("clover_stream_records_replayed_total",
                          "Records re-read after a restart that were already counted")
WINDOWS_EMITTED = Counter("clover_stream_windows_emitted_total",
                          "Windows written (rows of services and edges)")
DEAD_LETTERED = Counter("clover_stream_dead_lettered_total", "Records sent to the dead-letter "
                        "topic", ["reason"])
LAG = Gauge("clover_stream_lag_records", "Records on the partition not yet read",
            ["topic", "partition"])
OPEN_WINDOWS = Gauge("clover_stream_open_windows", "Windows being aggregated", ["partition"])
WRITE_SECONDS = Histogram("clover_stream_cassandra_write_seconds",
                          "Time to write one closed batch of windows to Cassandra")
GAPS = Counter("clover_stream_offset_gaps_total",
               "Times a partition's offsets jumped and it was read again from the last "
               "acknowledged offset")
WRITE_RETRIES = Counter("clover_stream_cassandra_retries_total",
                        "Cassandra writes retried after a failure")

_TYPES = {topics.SPANS.name: SpanRecord, topics.FLOWS.name: FlowRecord}


@dataclass
class _Partition:
    """What the worker holds for one partition index of both input topics."""

    aggregator: WindowAggregator
    # Offset after the last record the checkpoint saw, per topic: records before it whose
    # window is closed were already counted (or dead-lettered) before a restart.
    replayed_before: dict[str, int]
    # Events read but not yet acknowledged, per topic, in offset order.
    held: dict[str, deque[Any]] = field(default_factory=dict)
    next_offset: dict[str, int] = field(default_factory=dict)
    last_arrival: float = field(default_factory=time.monotonic)


class Aggregation:
    """The agent's state and its side effects (Cassandra, Kafka), one per worker process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.group = settings.streams.app_id
        self.partitions: dict[int, _Partition] = {}
        self.store: Store | None = None
        self.producer = Producer(producer_config(settings))
        self.lock = asyncio.Lock()

    # -- records in -------------------------------------------------------------------------

    async def handle(self, events: list[Any]) -> None:
        """Aggregate a batch of events, then write what closed and acknowledge what may be."""
        async with self.lock:
            touched: dict[int, _Partition] = {}
            letters = 0
            for event in events:
                message = event.message
                topic, index, offset = message.topic, message.partition, message.offset
                if app.rebalancing or message.generation_id != app.consumer_generation_id:
                    # Fetched before (or during) a rebalance: the partition's owner, maybe this
                    # worker again, re-reads it from the committed offset.
                    continue
                part = self.partitions.get(index) or await self._open(index)
                expected = part.next_offset.get(topic, offset)
                if offset < expected:
                    continue  # delivered again after a seek: already in this partition's state
                if offset > expected:  # records were skipped (the fetch position moved on)
                    await self._rewind(index, part, topic, expected, offset)
                    continue
                RECORDS_IN.labels(topic).inc()
                touched[index] = part
                part.held.setdefault(topic, deque()).append(event)
                part.next_offset[topic] = offset + 1
                record: SpanRecord | FlowRecord
                try:
                    record = records.decode(_TYPES[topic], message.value)
                except (RecordError, ValueError) as exc:
                    letters += self._dead_letter(message, f"undecodable {topic} record: {exc}")
                    continue
                if isinstance(record, SpanRecord):
                    accepted = part.aggregator.add_span(record, topic, offset)
                else:
                    accepted = part.aggregator.add_flow(record, topic, offset)
                if not accepted:
                    if offset < part.replayed_before.get(topic, 0):
                        RECORDS_SKIPPED.inc()
                    else:
                        letters += self._dead_letter(message, self._late_reason(part, record))
            if letters:  # delivered before the offsets they came from are acknowledged
                await self._retry("deliver dead letters to Kafka", self._flush_producer)
            now = time.monotonic()
            for index, part in touched.items():
                part.last_arrival = now
                await self._flush(index, part)

    async def tick(self) -> None:
        """Close windows of partitions that went quiet, and report lag.

        A quiet partition's event time moves on with the clock only when everything on it has
        been read: silence while records wait in Kafka or in the stream's buffer (a slow or
        blocked agent, an unreachable broker) is not the end of the traffic."""
        async with self.lock:
            reachable = await _in_thread(self._broker_reachable)
            highwaters = await self._highwaters() if reachable else None
            now = time.monotonic()
            idle = self.settings.streams.idle_close_seconds
            for index, part in list(self.partitions.items()):
                if not reachable:
                    # Producers hold their records while the broker is away: silence then
                    # says nothing, and only counts again once the broker is back.
                    part.last_arrival = now
                lag = await self._lag(index, part, highwaters)
                silent = now - part.last_arrival
                if lag == 0 and silent > idle and part.aggregator.event_time_us:
                    part.aggregator.advance(part.aggregator.event_time_us + round(silent * 1e6))
                    part.last_arrival = now  # advance by the silence once, then again
                await self._flush(index, part)

    async def _rewind(self, index: int, part: _Partition, topic: str, expected: int,
                      got: int) -> None:
        """Offsets jumped from ``expected`` to ``got``: counting on would lose the records in
        between. Drop the partition's open windows and read both topics again from the first
        record not yet acknowledged, as a new owner would."""
        GAPS.inc()
        log.warning("partition %d of %s jumped from offset %d to %d; re-reading it from the "
                    "last acknowledged offsets", index, topic, expected, got)
        self.partitions.pop(index, None)
        for name, held in part.held.items():
            restart = held[0].message.offset if held else part.next_offset[name]
            await app.consumer.seek(TP(name, index), restart)

    def _broker_reachable(self) -> bool:
        try:
            self.producer.list_topics(topics.SPANS.name, timeout=2)
        except Exception:  # noqa: BLE001 - any failure to get metadata: not reachable
            return False
        return True

    async def _highwaters(self) -> dict[Any, int] | None:
        """The end offset of every assigned input partition, from the broker (None if it cannot
        be asked)."""
        assigned = [tp for tp in app.consumer.assignment() if tp.topic in _TYPES]
        try:
            return dict(await asyncio.wait_for(app.consumer.highwaters(*assigned), 5))
        except Exception as exc:  # noqa: BLE001 - an unreachable broker: nothing is idle
            log.debug("could not read the end offsets (%s)", exc)
            return None

    async def _lag(self, index: int, part: _Partition,
                   highwaters: dict[Any, int] | None) -> int | None:
        """Records on the partition index's topics not yet handled (None if unknown)."""
        if highwaters is None:
            return None
        total = 0
        for tp, high in highwaters.items():
            if tp.partition != index:
                continue
            read = part.next_offset.get(tp.topic)
            if read is None:  # nothing handled from this topic yet: where the fetch stands
                read = await app.consumer.position(tp)
                if read is None:
                    return None
            LAG.labels(tp.topic, index).set(max(0, high - read))
            total += max(0, high - read)
        return total

    async def forget(self, revoked: set[Any]) -> None:
        """Drop partitions given to another worker: it rebuilds their open windows itself.
        Under the lock, so a batch being handled finishes (or has not started) first."""
        async with self.lock:
            for index in {tp.partition for tp in revoked}:
                if self.partitions.pop(index, None) is not None:
                    OPEN_WINDOWS.labels(index).set(0)
                    log.info("partition %d revoked; its open windows are left to the new "
                             "owner", index)

    # -- windows out ------------------------------------------------------------------------

    async def _open(self, index: int) -> _Partition:
        store = await self._store()
        progress = (await _in_thread(store.read_progress, self.group)).get(index)
        streams = self.settings.streams
        aggregator = WindowAggregator(
            streams.window_seconds, streams.allowed_lateness_seconds,
            closed_before_us=progress.closed_before_us if progress else 0)
        if progress:
            log.info("partition %d resumes: windows before %d closed, replayed offsets %s",
                     index, progress.closed_before_us, progress.offsets)
        part = _Partition(aggregator, dict(progress.offsets) if progress else {})
        self.partitions[index] = part
        return part

    async def _flush(self, index: int, part: _Partition) -> None:
        closed = part.aggregator.close_due()
        OPEN_WINDOWS.labels(index).set(len(part.aggregator.windows))
        if closed:
            await self._write(index, part, closed)
        self._acknowledge(part)

    async def _write(self, index: int, part: _Partition, closed: list[Window]) -> None:
        rows = [row for window in closed for row in part.aggregator.metrics(window)]
        store = await self._store()
        started = time.monotonic()
        await self._retry("write windows to Cassandra",
                          lambda: store.write_service_metrics(rows))
        WRITE_SECONDS.observe(time.monotonic() - started)
        for row in rows:
            self.producer.produce(topics.SERVICE_METRICS.name, key=row.key(),
                                  value=records.encode(row, validate=False))
        await self._retry("deliver service metrics to Kafka", self._flush_producer)
        progress = StreamProgress(index, part.aggregator.closed_before_us,
                                  dict(part.next_offset))
        await self._retry("write the checkpoint to Cassandra",
                          lambda: store.write_progress(self.group, progress))
        WINDOWS_EMITTED.inc(len(rows))
        log.info("partition %d: wrote %d rows of %d windows from %d (event time %d)", index,
                 len(rows), len(closed), closed[0].start_us, part.aggregator.event_time_us)

    def _acknowledge(self, part: _Partition) -> None:
        """Acknowledge, in order, every held event no open window still needs."""
        for topic, held in part.held.items():
            needed = part.aggregator.first_open_position(topic)
            while held and (needed is None or held[0].message.offset < needed):
                held.popleft().ack()

    def _dead_letter(self, message: Any, reason: str) -> int:
        """Queue a dead letter for the message (delivered by the caller's producer flush)."""
        letter = letter_for(message, reason, COMPONENT)
        self.producer.produce(topics.DEADLETTER.name, key=letter.key(),
                              value=records.encode(letter))
        DEAD_LETTERED.labels(reason.split(":")[0]).inc()
        return 1

    def _late_reason(self, part: _Partition, record: SpanRecord | FlowRecord) -> str:
        aggregator = part.aggregator
        return (f"late: the record's window closed before it arrived (event time "
                f"{aggregator.event_time_us} us, windows before {aggregator.closed_before_us} "
                f"us are written; allowed lateness {aggregator.allowed_lateness_us / 1e6:g} s)")

    def _flush_producer(self) -> None:
        remaining = self.producer.flush(30)
        if remaining:
            raise ConnectionError(f"{remaining} messages not delivered to Kafka within 30 s")

    async def _store(self) -> Store:
        if self.store is None:
            self.store = await self._retry("connect to Cassandra", self._connect)
        return self.store

    def _connect(self) -> Store:
        store = connect(self.settings, retry_for_s=10)
        store.create_schema(self.settings.cassandra.replication_factor)
        return store

    async def _retry(self, what: str, call: Any) -> Any:
        """Run a blocking call off the event loop, retrying with backoff until it succeeds.

        Waiting here is what keeps the stream exact during an outage: nothing further is read or
        acknowledged until the write has happened."""
        delay = 0.5
        while True:
            try:
                return await _in_thread(call)
            except Exception as exc:  # noqa: BLE001 - any failure of the server is retried
                WRITE_RETRIES.inc()
                log.warning("could not %s (%s); retrying in %.1fs", what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)


async def _in_thread(call: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, call, *args)


def install(settings: Settings) -> Aggregation:
    """Attach the agent, its timer and its rebalance hook to the app for these settings."""
    aggregation = Aggregation(settings)
    # Declared here, after streams.app.configure(): Faust binds a topic to the app's settings.
    source_topic = app.topic(topics.FLOWS.name, topics.SPANS.name)

    @app.agent(source_topic, name="aggregate")
    async def aggregate(stream: Any) -> None:
        # Batches keep the per-record cost down; 0.2 s bounds the wait of a slow trickle.
        async for events in stream.noack().take_events(1000, within=0.2):
            await aggregation.handle(list(events))

    @app.timer(interval=1.0)
    async def close_quiet_windows() -> None:
        await aggregation.tick()

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked(sender: Any, revoked: set[Any], **kwargs: Any) -> None:
        await aggregation.forget(revoked)

    return aggregation
