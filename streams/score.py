"""The scoring agent: service windows in, verdicts out (`clover models agent`).

A Faust agent on clover.service-metrics (the app of streams/app.py, under its own id and
consumer group, [models] group_id). Each service window goes through
:class:`models.online.OnlineScorer`, and its call patterns through
:class:`models.structure.CallPatternScorer` (a window whose requests stopped making their
usual calls is anomalous though its metrics look usual); the verdict, an
:class:`~clover.records.Anomaly`, goes to clover.anomalies and to Cassandra
(analytics/anomalies.py). Caller -> callee rows get no
verdict of their own: they tell the scorer what callers saw of the callee (a network delay
shows only there), and the callee's windows are judged with them.

The model: the file at [models] model_path when it exists (a file that exists but cannot be
used stops the agent with the reason: silently scoring without the model an operator trained
would be worse); without one the scorer learns each service online and says "inconclusive"
until it has [models] min_windows windows of it. Records that cannot be decoded go to
clover.deadletter with the reason. Scoring is CPU work and Cassandra writes block, so both run
in one worker thread, which also keeps each service's windows in order.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from confluent_kafka import Producer
from prometheus_client import CollectorRegistry, Counter

from analytics.anomalies import AnomalyTable
from clover import records
from clover.config import Settings
from clover.kafka import producer_config
from clover.metrics_endpoint import serve_metrics
from clover.records import Anomaly, DeadLetter, ServiceMetrics
from clover.topics import ANOMALIES, DEADLETTER, SERVICE_METRICS
from models.online import OnlineScorer
from models.structure import CallPatternScorer, PatternWindow, flag_rare_patterns
from streams.deadletter import letter_for

log = logging.getLogger(__name__)

COMPONENT = "score"


def _now_us() -> int:
    return time.time_ns() // 1000


class ScoreMetrics:
    """The agent's Prometheus counters, in a registry of its own."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.verdicts = Counter("clover_score_verdicts", "Scored service windows, by verdict",
                                ["verdict"], registry=registry)
        self.pattern_flags = Counter("clover_score_call_pattern_flags",
                                     "Windows judged anomalous for their rare call patterns "
                                     "(not their metrics)", registry=registry)
        self.edges = Counter("clover_score_edges_learned",
                             "Caller -> callee rows taken as what callers saw of the callee "
                             "(no verdict of their own)", registry=registry)
        self.deadletters = Counter("clover_score_deadletters",
                                   "Records that could not be decoded (sent to clover.deadletter)",
                                   registry=registry)
        self.record_errors = Counter("clover_score_record_errors",
                                     "Verdicts that could not be recorded, by where", ["sink"],
                                     registry=registry)


class ScoringService:
    """Scorers + recording, one window at a time."""

    def __init__(self, scorer: OnlineScorer, producer: Producer, table: AnomalyTable | None,
                 metrics: ScoreMetrics, *, anomalies_topic: str = ANOMALIES.name,
                 patterns: CallPatternScorer | None = None) -> None:
        self.scorer = scorer
        self.patterns = patterns or CallPatternScorer.beside(scorer)
        self.producer = producer
        self.table = table
        self.metrics = metrics
        self.anomalies_topic = anomalies_topic
        self._lock = threading.Lock()

    def handle(self, window: ServiceMetrics) -> Anomaly | None:
        """Score one window and record the verdict; None for an edge row, which the scorer
        learns as what the caller saw of the callee."""
        if window.peer_service is not None:
            with self._lock:
                self.scorer.learn_edge(window)
            self.metrics.edges.inc()
            return None
        pattern_window = PatternWindow.of(window)
        with self._lock:
            anomaly = self.scorer.process(window, now_us=_now_us())
            if pattern_window is not None:
                judged = flag_rare_patterns(anomaly, self.patterns.judge(pattern_window))
                if judged is not anomaly:
                    self.metrics.pattern_flags.inc()
                anomaly = judged
        self.metrics.verdicts.labels(anomaly.verdict).inc()
        if anomaly.verdict == "anomalous":
            log.info("anomalous %s/%s %s window %d: score %s (%s)", anomaly.namespace,
                     anomaly.service, anomaly.revision, anomaly.window_start_us, anomaly.score,
                     ", ".join(f"{c.feature} {c.value} vs {c.baseline}"
                               for c in anomaly.contributions))
        try:
            self.producer.produce(self.anomalies_topic, records.encode(anomaly), anomaly.key(),
                                  on_delivery=self._delivered)
            self.producer.poll(0)
        except Exception as exc:  # BufferError, KafkaException: keep scoring
            self._record_error("kafka", exc)
        if self.table is not None:
            try:
                self.table.write([anomaly])
            except Exception as exc:  # Cassandra unavailable or timing out
                self._record_error("cassandra", exc)
        return anomaly

    def dead_letter(self, letter: DeadLetter) -> None:
        self.metrics.deadletters.inc()
        try:
            self.producer.produce(DEADLETTER.name, records.encode(letter), letter.key(),
                                  on_delivery=self._delivered)
            self.producer.poll(0)
        except Exception as exc:
            self._record_error("kafka", exc)

    def flush(self, timeout: float = 10.0) -> int:
        """Wait for Kafka deliveries; returns how many are still undelivered."""
        return int(self.producer.flush(timeout))

    def _delivered(self, error: Any, message: Any) -> None:
        if error is not None:
            self._record_error("kafka", error)

    def _record_error(self, sink: str, exc: object) -> None:
        self.metrics.record_errors.labels(sink).inc()
        log.warning("could not record a verdict in %s: %s", sink, exc)


def build_scorer(settings: Settings) -> OnlineScorer:
    """The online scorer, with the trained model at [models] model_path when there is one
    (:class:`models.persistence.ModelFileError` when that file cannot be used)."""
    from models import persistence

    config = settings.models
    model, name = None, "anomaly_model"
    path = settings.model_path
    if path.exists():
        model, metadata = persistence.load(path)
        trained = time.gmtime(metadata.created_us / 1e6)
        name = f"anomaly_model@{time.strftime('%Y-%m-%dT%H:%M:%SZ', trained)}"
        log.info("scoring with the model %s (trained on %d windows of %s)", path,
                 metadata.training_windows, ", ".join(metadata.services))
    else:
        log.info("no model at %s: learning each service online", path)
    return OnlineScorer(model, threshold=config.threshold, min_windows=config.min_windows,
                        baseline_windows=config.baseline_windows,
                        min_requests=config.min_requests, relearn_after=config.relearn_after,
                        model_name=name)


def build_service(settings: Settings, *, registry: CollectorRegistry | None = None,
                  anomalies_topic: str = ANOMALIES.name, store: bool = True) -> ScoringService:
    """A scoring service wired to the configured model, Kafka and Cassandra (unless ``store``
    is False)."""
    from analytics.store import connect

    scorer = build_scorer(settings)
    table = None
    if store:
        cassandra = connect(settings)
        cassandra.create_schema(settings.cassandra.replication_factor)
        table = AnomalyTable(cassandra)
        table.create()
    return ScoringService(scorer, Producer(producer_config(settings, **{"linger.ms": 5})),
                          table, ScoreMetrics(registry or CollectorRegistry()),
                          anomalies_topic=anomalies_topic)


def install(service: ScoringService, *, metrics_topic: str = SERVICE_METRICS.name) -> Any:
    """Attach the scoring agent to the Faust app (streams/app.py)."""
    from streams.app import app

    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="score")
    topic = app.topic(metrics_topic)

    async def score_agent(stream: Any) -> None:
        loop = asyncio.get_running_loop()
        log.info("scoring agent ready: %s -> %s", metrics_topic, service.anomalies_topic)
        async for event in stream.events():
            message = event.message
            try:
                window = records.decode(ServiceMetrics, event.value)
            except records.RecordError as exc:
                service.dead_letter(letter_for(message, str(exc)[:2000], COMPONENT))
                continue
            await loop.run_in_executor(executor, service.handle, window)

    return app.agent(topic, name="clover-score")(score_agent)


def run_agent(settings: Settings, *, metrics_topic: str = SERVICE_METRICS.name,
              anomalies_topic: str = ANOMALIES.name, loglevel: str = "info") -> int:
    """Run the scoring agent as a Faust worker in this process until SIGINT/SIGTERM."""
    import faust

    from streams.app import configure

    registry = CollectorRegistry()
    service = build_service(settings, registry=registry, anomalies_topic=anomalies_topic)
    app = configure(settings, id=settings.models.group_id)
    install(service, metrics_topic=metrics_topic)
    serve_metrics(settings.models.metrics_port, "models.metrics_port", registry=registry)
    logging.getLogger("clover").setLevel(loglevel.upper())
    logging.getLogger("streams").setLevel(loglevel.upper())
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    try:
        worker.execute_from_commandline()
    finally:
        undelivered = service.flush()
        if undelivered:
            log.error("%d verdicts were not delivered to Kafka", undelivered)
    return 0

