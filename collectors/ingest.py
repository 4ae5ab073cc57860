"""Where every span source delivers: the Mixer adapter, the OTLP and Zipkin receivers and trace
replay all map their input to span dicts (span.v1 field names) and hand them here.

Valid spans go to ``clover.spans``; each invalid one goes to ``clover.deadletter`` with its
reason and its original content, so nothing is lost silently. Every receiver is counted:
requests, spans accepted, spans rejected by reason.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter

from clover import records
from clover.config import Settings
from clover.records import DeadLetter, RecordError, SpanRecord
from clover.topics import DEADLETTER, SPANS
from collectors.publish import Publisher, PublisherMetrics


@dataclass
class Candidate:
    """One span as a source gave it: ``span`` is the mapped dict (span.v1 field names), or
    None when mapping failed with ``problem``; ``original`` is the source's own bytes for it
    (what goes to the dead-letter topic)."""

    span: dict[str, Any] | None
    original: bytes
    problem: str | None = None


@dataclass
class Rejection:
    index: int  # position in the submitted batch
    reason: str


@dataclass
class BatchResult:
    accepted: int = 0
    rejected: list[Rejection] = field(default_factory=list)

    def summary(self, limit: int = 5) -> str:
        """A message for the client: how many were rejected, and the first reasons."""
        shown = "; ".join(f"span {r.index}: {r.reason}" for r in self.rejected[:limit])
        more = f" (and {len(self.rejected) - limit} more)" if len(self.rejected) > limit else ""
        return f"{len(self.rejected)} of {self.accepted + len(self.rejected)} spans rejected: " \
               f"{shown}{more}"


# Validates a whole span dict against span.v1 (raises RecordError). A source whose mapping sets
# some fields from typed code may pass a cheaper check of the others: records.field_validator.
Check = Callable[[dict[str, Any]], None]
validate_span: Check = functools.partial(records.validate, SpanRecord)

# Every SpanRecord field, in the dataclass's order, with its default (required ones are always
# overwritten): a valid span dict merged into this encodes as records.encode encodes the
# SpanRecord built from it, absent optional fields included, without building one.
_SPAN_TEMPLATE: dict[str, Any] = {
    f.name: None if f.default is dataclasses.MISSING else f.default
    for f in dataclasses.fields(SpanRecord)}


class ReceiverMetrics:
    """Prometheus counters shared by all receivers of a process, labelled by receiver."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("clover_receiver_requests", "Requests (or files) received",
                                ["receiver"], registry=registry)
        self.accepted = Counter("clover_receiver_spans_accepted", "Spans published",
                                ["receiver"], registry=registry)
        self.rejected = Counter("clover_receiver_spans_rejected",
                                "Spans sent to the dead-letter topic, by reason",
                                ["receiver", "reason"], registry=registry)


class SpanSink:
    """Validates and publishes spans for one or more receivers of a process.

    Receivers call it from their own threads (gRPC pools, the HTTP server's loop); one lock
    keeps the publishers' bookkeeping consistent. The work under it is short: validation and
    a produce call into librdkafka's queue.
    """

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.metrics = ReceiverMetrics(self.registry)
        publisher_metrics = PublisherMetrics(self.registry, "span-receiver")
        self.spans = Publisher(settings, SPANS, publisher_metrics)
        self.deadletters = Publisher(settings, DEADLETTER, publisher_metrics)
        self._lock = threading.Lock()

    def request(self, receiver: str) -> None:
        self.metrics.requests.labels(receiver).inc()

    def submit(self, receiver: str, candidates: Iterable[Candidate],
               check: Check = validate_span) -> BatchResult:
        """Publish the valid spans; dead-letter the rest. Never raises for bad input.

        ``check`` validates each span dict (raising RecordError); the default checks every
        field against span.v1."""
        with self._lock:
            return self._submit(receiver, candidates, check)

    def _submit(self, receiver: str, candidates: Iterable[Candidate],
                check: Check) -> BatchResult:
        result = BatchResult()
        now_us = time.time_ns() // 1000
        # The hot path, per span: check, encode, produce; no SpanRecord is built.
        publish, dumps, template = self.spans.publish_encoded, orjson.dumps, _SPAN_TEMPLATE
        fields = len(template)
        keys: dict[tuple[Any, Any], bytes] = {}
        for index, candidate in enumerate(candidates):
            span, reason, rule = candidate.span, candidate.problem, "mapping"
            if reason is None and span is not None:
                try:
                    check(span)
                except RecordError as exc:
                    reason, rule = str(exc), exc.errors[0][1] if exc.errors else "invalid"
                else:
                    service = (span.get("namespace"), span["service"])
                    key = keys.get(service)
                    if key is None:
                        key = keys[service] = records.service_key(*service)
                    # A span with every field is encoded as it is (sources build theirs in
                    # SpanRecord's order); one without some gets their defaults.
                    publish(key, dumps(span if len(span) == fields else {**template, **span}))
                    result.accepted += 1
                    continue
            elif reason is None:
                reason = "the source gave no span"
            assert reason is not None
            self.deadletters.publish(DeadLetter.wrap(
                source_topic=f"receiver.{receiver}", key=_key_of(candidate.span),
                value=candidate.original, reason=reason, component=f"{receiver}-receiver",
                at_us=now_us))
            self.metrics.rejected.labels(receiver, rule).inc()
            result.rejected.append(Rejection(index, reason))
        self.metrics.accepted.labels(receiver).inc(result.accepted)
        self.spans.poll()
        self.deadletters.poll()
        return result

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for delivery; returns how many records are still undelivered."""
        with self._lock:
            return self.spans.flush(timeout) + self.deadletters.flush(timeout)

    def close(self, timeout: float = 30.0) -> int:
        with self._lock:
            return self.spans.close(timeout) + self.deadletters.close(timeout)


def _key_of(span: dict[str, Any] | None) -> bytes | None:
    """The service key of a rejected span when it has one, so it sits with its service."""
    if span and isinstance(span.get("service"), str) and span["service"]:
        namespace = span.get("namespace")
        return records.service_key(namespace if isinstance(namespace, str) else None,
                                   span["service"])
    return None
