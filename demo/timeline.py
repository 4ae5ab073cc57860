"""What the pipeline said about the demo namespace: verdicts (clover.anomalies) and rollback
decisions (clover.rollbacks), read back from Kafka as any consumer of those topics would.

The watcher starts at the topics' current end offsets and keeps the records of one namespace
(records are keyed ``namespace/service``), so other traffic on the shared topics is skipped.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field

from confluent_kafka import Consumer, TopicPartition

from clover import records
from clover.config import Settings
from clover.kafka import consumer_config
from clover.records import Anomaly, RecordError, RollbackDecision
from clover.topics import ANOMALIES, ROLLBACKS


@dataclass
class VerdictWatcher:
    settings: Settings
    namespace: str
    anomalies: list[Anomaly] = field(default_factory=list)
    decisions: list[RollbackDecision] = field(default_factory=list)
    undecodable: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        consumer = Consumer(consumer_config(self.settings,
                                            group_id=f"clover-demo-watch-{uuid.uuid4().hex}"))
        start = []
        for topic in (ANOMALIES.name, ROLLBACKS.name):
            partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            for partition in partitions:
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), 10)
                start.append(TopicPartition(topic, partition, high))
        consumer.assign(start)
        self._thread = threading.Thread(target=self._read, args=(consumer,),
                                        name="demo-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def verdicts(self, service: str | None = None) -> list[Anomaly]:
        with self._lock:
            return [a for a in self.anomalies if service is None or a.service == service]

    def rollback_decisions(self) -> list[RollbackDecision]:
        with self._lock:
            return list(self.decisions)

    def _read(self, consumer: Consumer) -> None:
        prefix = f"{self.namespace}/".encode()
        try:
            while not self._stop.is_set():
                for message in consumer.consume(500, timeout=0.5):
                    if message.error() is not None or not (message.key() or b"").startswith(
                            prefix):
                        continue
                    try:  # a tombstone (no value) is undecodable, like any value not JSON
                        if message.topic() == ANOMALIES.name:
                            anomaly = records.decode(Anomaly, message.value() or b"")
                            with self._lock:
                                self.anomalies.append(anomaly)
                        else:
                            decision = records.decode(RollbackDecision, message.value() or b"")
                            with self._lock:
                                self.decisions.append(decision)
                    except RecordError:
                        self.undecodable += 1  # the pipeline dead-letters these itself
        finally:
            consumer.close()
