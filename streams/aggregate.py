"""The aggregation worker (`clover stream worker`): clover.flows + clover.spans -> per-service
windows -> Cassandra and clover.service-metrics, exact under crashes, restarts and outages.

Why not a Faust agent: Faust hands an agent one event at a time through its conductor, channel
queues and futures, and that machinery alone held a worker to ~5k records/s on these machines
(py-spy: ~89% of the time), whatever the agent did. This worker reads the same consumer group
with confluent-kafka in batches of thousands, decodes and checks them in C
(clover.records.fast_decoder) and aggregates spans on arrays (analytics/windows.py). The
scoring and rollback agents, which see one record per service and window, stay Faust agents
(streams/app.py).

How exactness works (no transactions needed):

* Both topics are keyed by service and have the same partition count, so partition *i* of each
  holds the same services; the range assignor gives both to the same worker. Each partition
  index has one ``WindowAggregator``.
* A window is written whole, keyed by (namespace, service, day, window, revision, peer), so
  writing it again after a replay replaces the row with the same values.
* The committed offset of a partition never passes a record whose window is still open: it is
  the lowest offset any open window holds (or, with none open, the offset after the last record
  read), committed only after what closed is written and the dead letters are delivered.
* After the windows are written, a checkpoint row in Cassandra (stream_progress) records the
  event time before which windows are closed and the offset after the last record processed.
  A restarted worker re-reads from the committed offset; records it already counted or
  dead-lettered (window closed, offset before the checkpoint) are skipped, and the windows that
  were open are rebuilt from their records. So a kill -9 at any point neither loses nor double
  counts.
* Offsets are followed per partition: a record before the expected offset was delivered twice
  and is skipped; a jump past it (a fetch position that moved) is read again from the expected
  offset, so no record is skipped unseen.
* The windows closed by one flush are written while the worker reads on; the next flush (or a
  rebalance, or the stop) waits for that write before it checkpoints and commits their
  offsets, and before it starts another write.
* Cassandra down: the write is retried with backoff while the worker waits, so nothing new is
  read, nothing is committed, and the worker catches up when Cassandra returns.

A record for a window that closed before it arrived (later than the allowed lateness) goes to
clover.deadletter with the reason, as does one that does not decode or validate.
"""

from __future__ import annotations

import functools
import gc
import itertools
import logging
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from prometheus_client import Counter, Gauge, Histogram

from analytics.store import RowsInFlight, Store, StreamProgress, connect
from analytics.windows import SpanColumns, Window, WindowAggregator
from clover import records, topics
from clover.config import Settings
from clover.heap import freeze_startup_objects
from clover.kafka import consumer_config, produce_waiting, producer_config
from clover.metrics_endpoint import serve_metrics
from clover.records import INT64_MAX, FlowRecord, RecordError, ServiceMetrics, SpanRecord
from streams.deadletter import letter_for_kafka

log = logging.getLogger("clover.streams.aggregate")
COMPONENT = "streams.aggregate"
T = TypeVar("T")

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
               "Times a partition's offsets jumped and it was read again from the expected "
               "offset")
WRITE_RETRIES = Counter("clover_stream_cassandra_retries_total",
                        "Cassandra writes and Kafka deliveries retried after a failure")

INPUTS = (topics.SPANS.name, topics.FLOWS.name)
_TOPIC_NUMBER: dict[str | None, int] = {topic: number for number, topic in enumerate(INPUTS)}
BATCH = 10_000  # records per consume(): large enough that per-batch costs vanish
POLL_S = 0.2  # the longest a consume() waits for a trickle
# While catching up (full batches), closed windows are written and offsets committed at most
# this often, so the waits for Cassandra and Kafka are shared by many batches. A worker that
# has caught up writes after every batch.
WRITE_EVERY_S = 0.5
TICK_S = 1.0  # how often quiet partitions are looked at and lag is reported
HELD_UP_S = 1.0  # a write that took longer was held up by a server (see tick)


class Stopping(Exception):
    """Raised out of a wait when the worker is asked to stop."""


@dataclass
class _Chunk:
    """Decoded records of one topic from one batch, waiting to be aggregated; ``start`` is the
    first not yet taken."""

    times: np.ndarray  # the time each record counts at (us)
    messages: list[Any]
    offsets: np.ndarray  # the messages' offsets
    records: list[Any] | SpanColumns  # spans as columns, flows as records
    start: int = 0

    def head(self) -> int:
        return int(self.times[self.start])

    def first_offset(self) -> int:
        return int(self.offsets[self.start])


@dataclass
class _Partition:
    """What the worker holds for one partition index of both input topics."""

    aggregator: WindowAggregator
    # Offset after the last record the checkpoint saw, per topic: records before it whose
    # window is closed were already counted (or dead-lettered) before a restart.
    replayed_before: dict[str, int]
    # The offset of the next record expected, per topic (starts at the assigned position).
    next_offset: dict[str, int] = field(default_factory=dict)
    committed: dict[str, int] = field(default_factory=dict)
    last_arrival: float = field(default_factory=time.monotonic)
    # Decoded records waiting to be aggregated in time order across the topics, per topic.
    queued: dict[str, deque[_Chunk]] = field(
        default_factory=lambda: {topic: deque() for topic in INPUTS})


@dataclass
class _Writing:
    """Closed windows being written: their rows, the Cassandra write (None once it has
    failed), the checkpoint and offsets that follow it, and when it started."""

    rows: list[ServiceMetrics]
    in_flight: RowsInFlight | None
    progress: list[StreamProgress]
    offsets: list[tuple[_Partition, TopicPartition]]
    started: float


class AggregationWorker:
    """One worker process: a member of the consumer group, its partitions' windows, and the
    writes to Cassandra and Kafka."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.group = settings.streams.app_id
        self.consumer = Consumer(consumer_config(
            settings, self.group,
            **{"auto.offset.reset": settings.streams.new_group_starts_at,
               # Both topics' partition i to one worker (see the module docstring).
               "partition.assignment.strategy": "range",
               # A dead worker's partitions move within seconds.
               "session.timeout.ms": 10_000, "heartbeat.interval.ms": 3_000,
               # Waiting out a Cassandra outage is not a hung consumer.
               "max.poll.interval.ms": 600_000}))
        self.producer = Producer(producer_config(settings))
        self.store: Store | None = None
        self.partitions: dict[int, _Partition] = {}
        # Where each assigned input partition starts: its committed offset, or where a new
        # group starts.
        self.assigned: dict[tuple[str, int], int] = {}
        # Partitions that took records since the last _flush, and dead letters queued since.
        self.touched: dict[int, _Partition] = {}
        self.letters = 0
        self.first_letter = ""
        # When the worker last had trouble reaching Kafka or Cassandra (see tick).
        self.disturbed_at = 0.0
        self.stopping = False
        # The windows whose Cassandra write is under way (see _flush).
        self.writing: _Writing | None = None
        self.fast_span = records.fast_decoder(SpanRecord)
        self.fast_flow = records.fast_decoder(FlowRecord)
        self.batch_span = records.batch_decoder(SpanRecord)
        self.batch_flow = records.batch_decoder(FlowRecord)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Consume until stopped (SIGTERM/SIGINT), then leave the group cleanly."""
        try:
            # Connected (schema created) before taking partitions, not when their first records
            # arrive: a worker that cannot write has no use for them.
            self._store()
            self.consumer.subscribe(list(INPUTS), on_assign=self._on_assign,
                                    on_revoke=self._on_revoke, on_lost=self._on_lost)
            _quiet_collector()
            next_tick = time.monotonic() + TICK_S
            next_write = time.monotonic() + WRITE_EVERY_S
            while not self.stopping:
                messages = self.consumer.consume(BATCH, POLL_S)
                if messages:
                    self.handle(messages)
                now = time.monotonic()
                if self.touched and (len(messages) < BATCH or now >= next_write):
                    self._flush(list(self.touched.items()))
                    next_write = now + WRITE_EVERY_S
                if now >= next_tick:
                    self.tick()
                    next_tick = time.monotonic() + TICK_S
            self._settle()  # the last windows' offsets committed before leaving
        except Stopping:
            pass
        finally:
            log.info("stopping: leaving the consumer group")
            # Open windows are left to the partitions' next owner, which re-reads them from the
            # committed offsets; nothing more is written here.
            self.partitions.clear()
            self.consumer.close()
            self.producer.flush(10)
            if self.store is not None:
                self.store.close()

    def stop(self, *_: Any) -> None:
        self.stopping = True

    # -- records in -------------------------------------------------------------------------

    def handle(self, messages: list[Any]) -> None:
        """Decode a batch into each partition's queues, then aggregate what may go in (what
        closed is written by the next _flush)."""
        # Each field of the messages is read for the whole batch (loops in C), and the batch
        # is taken in runs of one partition and topic, as the fetches bring them.
        errors = list(map(Message.error, messages))
        if errors.count(None) < len(errors):
            messages = self._without_errors(messages, errors)
        count = len(messages)
        if not count:
            return
        partitions = np.fromiter(map(Message.partition, messages), np.int64, count)
        names = list(map(Message.topic, messages))
        offsets = np.fromiter(map(Message.offset, messages), np.int64, count)
        which = partitions * len(INPUTS) + np.fromiter(map(_TOPIC_NUMBER.__getitem__, names),
                                                       np.int64, count)
        cuts = [0, *(np.flatnonzero(which[1:] != which[:-1]) + 1).tolist(), count]
        fed: dict[int, _Partition] = {}
        jumped: set[tuple[int, str]] = set()
        for first, stop in itertools.pairwise(cuts):
            index, topic = int(partitions[first]), str(names[first])
            part = self.partitions.get(index) or self._open(index)
            if part is None or (index, topic) in jumped:
                continue  # no longer assigned here, or to be read again
            run, run_offsets, jump = self._in_order(index, part, topic, messages[first:stop],
                                                    offsets[first:stop])
            if jump:
                jumped.add((index, topic))
            if run:
                RECORDS_IN.labels(topic).inc(len(run))
                self._queue(part, topic, run, run_offsets)
                fed[index] = part
        now = time.monotonic()
        for index, part in fed.items():
            self.touched[index] = part
            part.last_arrival = now
            self._aggregate(index, part)

    def _without_errors(self, messages: list[Any], errors: list[Any]) -> list[Any]:
        for error in errors:
            if error is not None and error.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error: %s", error)
                self.disturbed_at = time.monotonic()
        return [message for message, error in zip(messages, errors, strict=True)
                if error is None]

    def _in_order(self, index: int, part: _Partition, topic: str, run: list[Any],
                  offsets: np.ndarray) -> tuple[list[Any], np.ndarray, bool]:
        """The records of a run of one partition and topic that come next, with their
        offsets, and whether the offsets jumped. A record before the expected offset is a
        redelivery (skipped); a jump past it means records would go unseen, so the partition
        is read again from the expected offset, and the rest of the run is left."""
        expected = part.next_offset.get(topic, int(offsets[0]))
        if offsets[0] == expected and (np.diff(offsets) == 1).all():
            # The usual case: the run follows on, offset by offset.
            part.next_offset[topic] = int(offsets[-1]) + 1
            return run, offsets, False
        kept: list[Any] = []
        kept_offsets: list[int] = []
        for message, offset in zip(run, offsets.tolist(), strict=True):
            expected = part.next_offset.get(topic, offset)
            if offset == expected:
                part.next_offset[topic] = offset + 1
                kept.append(message)
                kept_offsets.append(offset)
            elif offset > expected:
                GAPS.inc()
                log.warning("partition %d of %s jumped from offset %d to %d; reading it again "
                            "from %d", index, topic, expected, offset, expected)
                self.consumer.seek(TopicPartition(topic, index, expected))
                return kept, np.array(kept_offsets, dtype=np.int64), True
        return kept, np.array(kept_offsets, dtype=np.int64), False

    def _queue(self, part: _Partition, topic: str, run: list[Any],
               offsets: np.ndarray) -> None:
        """Decode records into the topic's queue, with the time each counts at; a record
        that does not decode or validate is dead-lettered here."""
        spans = topic == topics.SPANS.name
        # The whole run at once: the usual case, where every record is valid.
        decoded = (self.batch_span if spans else self.batch_flow)(
            list(map(Message.value, run)))
        queued = None if decoded is None else _queued(spans, run, offsets, decoded)
        if queued is None:  # some record is refused: one at a time, to find and explain it
            run, offsets, decoded = self._decode_each(topic, run, offsets)
            if not decoded:
                return
            queued = _queued(spans, run, offsets, decoded)
            assert queued is not None  # _decode_each let only records that fit through
        part.queued[topic].append(queued)

    def _decode_each(self, topic: str, run: list[Any],
                     offsets: np.ndarray) -> tuple[list[Any], np.ndarray, list[Any]]:
        """The run's records decoded one by one, with their messages and offsets; a record
        that does not decode or validate is dead-lettered."""
        fast, record_type = ((self.fast_span, SpanRecord) if topic == topics.SPANS.name
                             else (self.fast_flow, FlowRecord))
        decoded: list[Any] = []
        kept: list[Any] = []
        kept_offsets: list[int] = []
        for message, offset in zip(run, offsets.tolist(), strict=True):
            value = message.value()
            try:
                decoded.append(fast(value))
            except (ValueError, TypeError):
                # Refused by the fast check: decode() confirms, and explains, or accepts a
                # corner the fast check reads more strictly.
                try:
                    decoded.append(records.decode(record_type, value or b""))
                except RecordError as exc:
                    self.letters += self._dead_letter(
                        message, f"undecodable {topic} record: {exc}")
                    continue
            too_large = _beyond_int64(decoded[-1])
            if too_large:
                decoded.pop()
                self.letters += self._dead_letter(
                    message, f"{topic} record out of range: {too_large} exceeds 2^63-1, the "
                             "most the aggregates (64-bit, as Cassandra's bigint) can hold")
                continue
            kept.append(message)
            kept_offsets.append(offset)
        return kept, np.array(kept_offsets, dtype=np.int64), decoded

    def _aggregate(self, index: int, part: _Partition) -> None:
        """Aggregate the queued records of both topics in time order, as far as it is known.

        Kafka keeps no order between the two topics, and a worker catching up may fetch one
        far ahead of the other: taken as fetched, the first would move event time on and make
        the other's records late. So records go in by time across the topics (within half the
        allowed lateness: a topic's own disorder is what the lateness is for), and a topic's
        records wait while the other topic has unread records that may be older."""
        spans, flows = part.queued[topics.SPANS.name], part.queued[topics.FLOWS.name]
        slack = part.aggregator.allowed_lateness_us / 2
        while spans or flows:
            if spans and flows:
                if spans[0].head() <= flows[0].head():
                    self._take(part, topics.SPANS.name, flows[0].head() + slack)
                else:
                    self._take(part, topics.FLOWS.name, spans[0].head() + slack)
            elif spans and self._caught_up(index, part, topics.FLOWS.name):
                self._take(part, topics.SPANS.name, float("inf"))
            elif flows and self._caught_up(index, part, topics.SPANS.name):
                self._take(part, topics.FLOWS.name, float("inf"))
            else:
                break  # the other topic's next records are not read yet

    def _caught_up(self, index: int, part: _Partition, topic: str) -> bool:
        """Whether every record of the topic's partition has been read (by the end offset
        the last fetch brought)."""
        return self._topic_lag(index, part, topic, cached=True) == 0

    def _take(self, part: _Partition, topic: str, until: float) -> None:
        """Aggregate the topic's queued records up to the first one later than ``until``."""
        messages: list[Any] = []
        parts: list[Any] = []
        offsets: list[np.ndarray] = []
        times: list[np.ndarray] = []
        chunks = part.queued[topic]
        while chunks:
            chunk = chunks[0]
            later = np.flatnonzero(chunk.times[chunk.start:] > until)
            stop = chunk.start + int(later[0]) if later.size else len(chunk.records)
            messages += chunk.messages[chunk.start:stop]
            parts.append(chunk.records[chunk.start:stop])
            offsets.append(chunk.offsets[chunk.start:stop])
            times.append(chunk.times[chunk.start:stop])
            if stop < len(chunk.records):
                chunk.start = stop
                break
            chunks.popleft()
        positions = np.concatenate(offsets)
        if topic == topics.SPANS.name:
            accepted = part.aggregator.add_spans(SpanColumns.join(parts), topic, positions)
            refused = np.flatnonzero(~accepted).tolist()
        else:
            flows = [flow for chunk_flows in parts for flow in chunk_flows]
            refused = [i for i, (flow, offset) in enumerate(zip(flows, positions.tolist(),
                                                                strict=True))
                       if not part.aggregator.add_flow(flow, topic, offset)]
        at_us = np.concatenate(times)
        for i in refused:
            self.letters += self._refused(part, messages[i], int(at_us[i]))

    def _refused(self, part: _Partition, message: Any, at_us: int) -> int:
        """A record whose window had closed: counted before a restart, or late."""
        if message.offset() < part.replayed_before.get(message.topic(), 0):
            RECORDS_SKIPPED.inc()
            return 0
        aggregator = part.aggregator
        return self._dead_letter(message, (
            f"late: the record's window closed before it arrived (record time {at_us} us, "
            f"event time {aggregator.event_time_us} us, windows before "
            f"{aggregator.closed_before_us} us are written; allowed lateness "
            f"{aggregator.allowed_lateness_us / 1e6:g} s)"))

    def _dead_letter(self, message: Any, reason: str) -> int:
        """Queue a dead letter for the message (delivered by the caller's producer flush)."""
        letter = letter_for_kafka(message, reason, COMPONENT)
        self._produce(topics.DEADLETTER.name, letter.key(), records.encode(letter))
        DEAD_LETTERED.labels(reason.split(":")[0]).inc()
        if not self.first_letter:  # one log line per write, not one per record
            self.first_letter = (f"{message.topic()}[{message.partition()}] offset "
                                 f"{message.offset()}: {reason}")
        return 1

    # -- quiet partitions -------------------------------------------------------------------

    def tick(self) -> None:
        """Close windows of partitions that went quiet, and report lag.

        A quiet partition's event time moves on with the clock only when the broker confirms
        that everything on it has been read: silence while records wait in Kafka or while the
        broker is unreachable is not the end of the traffic."""
        now = time.monotonic()
        idle = self.settings.streams.idle_close_seconds
        for index, part in self.partitions.items():
            self._aggregate(index, part)  # records that waited for the other topic
            # Silence counts from the last record, or from the end of the last trouble with
            # the servers: while the broker was away or the worker was held up retrying a
            # write, it read nothing, and producers were holding their records back.
            silent = now - max(part.last_arrival, self.disturbed_at)
            waiting = any(part.queued.values())
            if silent > idle and part.aggregator.windows and not waiting:
                lag = self._lag(index, part, cached=False)
                if lag is None:  # the broker did not answer: silence says nothing yet
                    self.disturbed_at = now
                elif lag == 0 and part.aggregator.event_time_us:
                    part.aggregator.advance(part.aggregator.event_time_us
                                            + round(silent * 1e6))
                    part.last_arrival = now  # advance by the silence once, then again
            else:
                self._lag(index, part, cached=True)
        self._flush(list(self.partitions.items()))

    def _lag(self, index: int, part: _Partition, *, cached: bool) -> int | None:
        """Records on the partition index's topics not yet read (None if the broker cannot
        say). ``cached`` uses the end offsets the last fetches brought, without asking."""
        total = 0
        for topic in INPUTS:
            lag = self._topic_lag(index, part, topic, cached=cached)
            if lag is None:
                return None
            total += lag
        return total

    def _topic_lag(self, index: int, part: _Partition, topic: str, *,
                   cached: bool) -> int | None:
        """Records on one topic's partition not yet read (None if unknown)."""
        try:
            _, high = self.consumer.get_watermark_offsets(TopicPartition(topic, index),
                                                          timeout=2, cached=cached)
        except KafkaException:
            return None
        read = part.next_offset.get(topic, self.assigned.get((topic, index), -1))
        if high < 0 or read < 0:
            return None
        LAG.labels(topic, index).set(max(0, high - read))
        return max(0, high - read)

    # -- windows out ------------------------------------------------------------------------

    def _open(self, index: int) -> _Partition | None:
        starts = {topic: self.assigned.get((topic, index)) for topic in INPUTS}
        if all(start is None for start in starts.values()):
            return None
        store = self._store()
        progress = self._retry("read the checkpoint from Cassandra",
                               lambda: store.read_progress(self.group)).get(index)
        streams = self.settings.streams
        aggregator = WindowAggregator(
            streams.window_seconds, streams.allowed_lateness_seconds,
            closed_before_us=progress.closed_before_us if progress else 0)
        if progress:
            log.info("partition %d resumes at offsets %s: windows before %d closed, records "
                     "before offsets %s counted", index, starts, progress.closed_before_us,
                     progress.offsets)
        part = _Partition(aggregator, dict(progress.offsets) if progress else {},
                          next_offset={t: o for t, o in starts.items() if o is not None and
                                       o >= 0})
        self.partitions[index] = part
        return part

    def _flush(self, partitions: list[tuple[int, _Partition]]) -> None:
        """Start writing the windows that closed on these partitions, and commit what may be.

        The write of the windows closed by one flush is waited for by the next one (or by a
        rebalance or the stop), and only then are their offsets committed: the worker reads
        and aggregates on while Cassandra writes, and no offset is committed past a window
        that is not written."""
        self._settle()
        if self.letters:  # delivered before the offsets they came from are committed
            self._retry("deliver dead letters to Kafka", self._flush_producer)
            log.warning("%d records dead-lettered to %s; the first: %s", self.letters,
                        topics.DEADLETTER.name, self.first_letter)
            self.letters, self.first_letter = 0, ""
        self.touched.clear()
        closed = []
        for index, part in partitions:
            windows = part.aggregator.close_due()
            OPEN_WINDOWS.labels(index).set(len(part.aggregator.windows))
            if windows:
                closed.append((index, part, windows))
        offsets = self._safe_offsets(partitions)
        if closed:
            self.writing = self._start_write(closed, offsets)
        else:  # every closed window is written: nothing to wait for
            self._commit(offsets)

    def _start_write(self, closed: list[tuple[int, _Partition, list[Window]]],
                     offsets: list[tuple[_Partition, TopicPartition]]) -> _Writing:
        rows = [row for _, part, windows in closed for window in windows
                for row in part.aggregator.metrics(window)]
        started = time.monotonic()
        in_flight = self._retry("write windows to Cassandra",
                                lambda: self._store().start_writing_service_metrics(rows))
        for row in rows:
            self._produce(topics.SERVICE_METRICS.name, row.key(),
                          records.encode(row, validate=False))
        progress = [StreamProgress(index, part.aggregator.closed_before_us,
                                   dict(part.next_offset)) for index, part, _ in closed]
        for index, part, windows in closed:
            log.info("partition %d: writing the windows from %d to %d (event time %d)", index,
                     windows[0].start_us, windows[-1].start_us, part.aggregator.event_time_us)
        return _Writing(rows, in_flight, progress, offsets, started)

    def _settle(self) -> None:
        """Wait for the windows being written (writing them again while Cassandra fails), then
        checkpoint and commit the offsets they held."""
        writing, self.writing = self.writing, None
        if writing is None:
            return
        store = self._store()

        def written() -> float:
            """When the rows were written."""
            in_flight, writing.in_flight = writing.in_flight, None
            if in_flight is not None:
                in_flight.result()
                return in_flight.finished_at()
            # The first try failed: the rows again (upserts), waited for.
            store.write_service_metrics(writing.rows)
            return time.monotonic()

        # From sending to the last answer, not to this wait (the worker read on meanwhile).
        WRITE_SECONDS.observe(self._retry("write windows to Cassandra", written)
                              - writing.started)
        self._retry("deliver service metrics to Kafka", self._flush_producer)
        self._retry("write the checkpoint to Cassandra",
                    lambda: store.write_progress(self.group, *writing.progress))
        WINDOWS_EMITTED.inc(len(writing.rows))
        self._commit(writing.offsets)

    def _safe_offsets(self, partitions: list[tuple[int, _Partition]]
                      ) -> list[tuple[_Partition, TopicPartition]]:
        """Per partition and topic, the offset before which no open window or queued record
        needs a record, where it differs from the last one committed."""
        offsets = []
        for index, part in partitions:
            for topic, read in part.next_offset.items():
                needed = [position for position in (
                    part.aggregator.first_open_position(topic),
                    part.queued[topic][0].first_offset() if part.queued[topic] else None)
                    if position is not None]
                safe = min(needed) if needed else read
                if part.committed.get(topic) != safe:
                    offsets.append((part, TopicPartition(topic, index, safe)))
        return offsets

    def _commit(self, offsets: list[tuple[_Partition, TopicPartition]], *,
                wait: bool = False) -> None:
        # Not for partitions revoked or lost since the offsets were taken: another worker
        # may own them now.
        offsets = [(part, tp) for part, tp in offsets if self.partitions.get(tp.partition) is part]
        if not offsets:
            return
        try:
            # Two spelled-out calls: confluent-kafka's stubs type `asynchronous` per overload
            # as a literal, so `asynchronous=not wait` does not type-check.
            if wait:
                self.consumer.commit(offsets=[tp for _, tp in offsets], asynchronous=False)
            else:
                self.consumer.commit(offsets=[tp for _, tp in offsets], asynchronous=True)
        except KafkaException as exc:  # no longer the owner, or the broker is away: the
            log.info("commit not taken (%s)", exc)  # next commit covers it
            return
        for part, tp in offsets:
            part.committed[tp.topic] = tp.offset

    # -- rebalances -------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, assigned: list[TopicPartition]) -> None:
        """Note where each new partition starts: its committed offset, or where a new group
        starts reading."""
        committed = self._retry("read the committed offsets",
                                lambda: consumer.committed(assigned, timeout=10))
        for tp in committed:
            offset = tp.offset
            if offset < 0:  # no committed offset: where auto.offset.reset puts a new group
                low, high = self._retry("read the partition's offsets",
                                        functools.partial(self._watermarks, tp))
                offset = low if self.settings.streams.new_group_starts_at == "earliest" \
                    else high
            self.assigned[(tp.topic, tp.partition)] = offset
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))
        consumer.assign([TopicPartition(tp.topic, tp.partition, self.assigned[
            (tp.topic, tp.partition)]) for tp in assigned])

    def _watermarks(self, tp: TopicPartition) -> tuple[int, int]:
        low, high = self.consumer.get_watermark_offsets(tp, timeout=10)
        return low, high

    def _on_revoke(self, consumer: Consumer, revoked: list[TopicPartition]) -> None:
        """Commit what is safe, then drop the partitions: their next owner rebuilds the open
        windows from the committed offsets."""
        indexes = {tp.partition for tp in revoked}
        self._settle()
        if self.producer.flush(10) == 0:  # dead letters out before their offsets commit
            self._commit(self._safe_offsets([(i, p) for i, p in self.partitions.items()
                                             if i in indexes]), wait=True)
        self._forget(revoked)

    def _on_lost(self, consumer: Consumer, lost: list[TopicPartition]) -> None:
        self._forget(lost)

    def _forget(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.assigned.pop((tp.topic, tp.partition), None)
        for index in {tp.partition for tp in partitions}:
            self.touched.pop(index, None)
            if self.partitions.pop(index, None) is not None:
                OPEN_WINDOWS.labels(index).set(0)
                log.info("partition %d revoked; its open windows are left to the next owner",
                         index)

    # -- servers ----------------------------------------------------------------------------

    def _produce(self, topic: str, key: bytes | str, value: bytes) -> None:
        produce_waiting(self.producer, topic, value, key, poll_s=0.5)

    def _flush_producer(self) -> None:
        remaining = self.producer.flush(30)
        if remaining:
            raise ConnectionError(f"{remaining} messages not delivered to Kafka within 30 s")

    def _store(self) -> Store:
        if self.store is None:
            self.store = self._retry("connect to Cassandra", self._connect)
        return self.store

    def _connect(self) -> Store:
        store = connect(self.settings, retry_for_s=10)
        store.create_schema(self.settings.cassandra.replication_factor)
        return store

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        """Run a call, retrying with backoff until it succeeds (or the worker is stopped).

        Waiting here is what keeps the stream exact during an outage: nothing further is read or
        committed until the write has happened."""
        delay = 0.5
        started = time.monotonic()
        while True:
            try:
                result = call()
                if time.monotonic() - started > HELD_UP_S:  # e.g. a flush while Kafka was away
                    self.disturbed_at = time.monotonic()
                return result
            except Exception as exc:  # noqa: BLE001 - any failure of the server is retried
                if self.stopping:
                    raise Stopping from exc
                WRITE_RETRIES.inc()
                log.warning("could not %s (%s); retrying in %.1fs", what, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)


def _quiet_collector() -> None:
    """Fewer cyclic garbage collections, over fewer objects. Each batch makes tens of thousands
    of short-lived container objects (messages, row keys), which with the default thresholds
    set off several collections per batch, some of them over the whole heap: measured at
    about half the worker's CPU time. The objects of startup (modules, the Kafka and Cassandra
    clients) live as long as the process, so they are frozen out of collections."""
    freeze_startup_objects()
    gc.set_threshold(50_000, 20, 10)


# A record's integers that aggregation adds up or counts time by.
_COUNTED = ("start_us", "duration_us", "end_us", "bytes_sent", "bytes_received", "packets_sent",
            "packets_received")


def _beyond_int64(record: Any) -> str | None:
    """Which of a record's counted integers (the schemas bound them only below) no 64-bit
    aggregate can hold, if any: such a record is dead-lettered, where it would otherwise stop
    the worker each time it is read."""
    for name in _COUNTED:
        value = getattr(record, name, None)
        if value is not None and value > INT64_MAX:
            return f"{name} {value}"
    if record.start_us + record.duration_us > INT64_MAX:
        return "start_us + duration_us"
    return None


def _queued(spans: bool, run: list[Any], offsets: np.ndarray, decoded: list[Any]) -> _Chunk | None:
    """The queue entry of a decoded run, or None if some record's integers do not fit 64 bits
    (the caller then goes record by record to dead-letter it)."""
    try:
        if spans:
            columns = SpanColumns.of(decoded)
            # start + duration wraps around silently where each fits on its own.
            if (columns.end_us < columns.duration_us).any():
                return None
            return _Chunk(columns.end_us, run, offsets, columns)
        if any(map(_beyond_int64, decoded)):
            return None
        times = np.fromiter((r.end_us or r.start_us + r.duration_us for r in decoded),
                            np.int64, len(decoded))
        return _Chunk(times, run, offsets, decoded)
    except OverflowError:
        return None


def run_worker(settings: Settings, *, loglevel: str = "info") -> int:
    """Run one aggregation worker in this process until SIGTERM or SIGINT."""
    logging.basicConfig(level=loglevel.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve_metrics(settings.streams.metrics_port, "streams.metrics_port")
    worker = AggregationWorker(settings)
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    worker.run()
    return 0

