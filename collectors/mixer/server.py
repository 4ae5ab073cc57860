"""Clover as an Istio Mixer out-of-process adapter (Istio 1.0-1.4): a gRPC server for the
``tracespan`` and ``metric`` templates' handler services, wire-compatible with what Mixer calls
(``/tracespan.HandleTraceSpanService/HandleTraceSpan``, ``/metric.HandleMetricService/
HandleMetric``; protos in ``proto/``). Every instance becomes one span for the shared
:class:`~collectors.ingest.SpanSink`: valid ones go to ``clover.spans``, the rest to the
dead-letter topic with their reason and the instance's bytes exactly as Mixer sent them.

A report with any rejected instance is answered INVALID_ARGUMENT naming the problems (the
valid instances of it are published all the same); so is a body that is not the request
message at all. The instance configuration this mapping expects, with the span tags and
metric dimensions below, is ``k8s/manifests/istio-mixer-adapter.yaml``.

``tracespan`` instance -> span (``me`` is the side whose proxy reported the span: the
destination for a server span, the source for a client span; ``peer`` is the other side):

==================  ==============================================================
trace_id, span_id,  the fields of the same names, lowercased (Envoy's B3 ids); an id
parent_span_id      that is not hex of the right length is rejected by validation;
                    an empty parent means a root span
operation           span_name
kind                "client" if client_span else "server"
start_us            start_time
duration_us         end_time - start_time
status_code         httpStatusCode; 0 (unset) -> null
error               status >= 500, or span tag ``error`` true
service             tag ``<me>.workload.name``, else field ``<me>_name`` (required)
namespace           tag ``<me>.workload.namespace``
pod                 tag ``<me>.name`` (Istio's name of the workload instance)
revision            tag ``<me>.labels.pod-template-hash``
peer_service        tag ``<peer>.workload.name``, else field ``<peer>_name``
peer_namespace      tag ``<peer>.workload.namespace``
bytes_sent          client: request_total_size; server: response_total_size (0 -> null)
bytes_received      client: response_total_size; server: request_total_size (0 -> null)
source              "mixer"
==================  ==============================================================

``metric`` instance ``cloverrequest`` (one per request, reported by the server's proxy) ->
a server span of the destination workload: value (a duration) -> duration_us; dimensions
``request_time`` -> start_us, ``operation``, ``response_code`` -> status_code (error when
>= 500), ``destination_workload`` -> service (required), ``destination_workload_namespace``,
``destination_pod``, ``destination_revision``, ``source_workload`` -> peer_service,
``source_workload_namespace`` -> peer_namespace, ``request_size`` -> bytes_received,
``response_size`` -> bytes_sent. Metric instances carry no trace context, so trace_id and
span_id are random (``secrets.token_hex``): they only identify the record, they join no
trace. Instances of any other metric are rejected, each with its reason.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from concurrent import futures
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from clover.records import SCHEMA_VERSION
from collectors.ingest import Candidate, SpanSink
from collectors.mixer.generated import metric_pb2, report_pb2, tracespan_pb2

RECEIVER = "mixer"
METRIC_INSTANCE = "cloverrequest"
"""The one metric instance Clover maps (by its short name; Mixer sends the qualified one)."""

SPAN_TAGS = tuple(f"{side}.{tag}" for side in ("source", "destination")
                  for tag in ("workload.name", "workload.namespace", "name",
                              "labels.pod-template-hash"))
"""The span tags the mapping reads (besides the optional ``error``)."""

METRIC_DIMENSIONS = ("source_workload", "source_workload_namespace", "destination_workload",
                     "destination_workload_namespace", "destination_pod",
                     "destination_revision", "operation", "response_code", "request_time",
                     "request_size", "response_size")
"""The dimensions of ``cloverrequest`` the mapping reads."""

TRACESPAN_SERVICE = tracespan_pb2.DESCRIPTOR.services_by_name["HandleTraceSpanService"]
METRIC_SERVICE = metric_pb2.DESCRIPTOR.services_by_name["HandleMetricService"]
_REPORT_RESULT = report_pb2.ReportResult().SerializeToString()  # empty: b""


class MappingError(Exception):
    """An instance that cannot become a span; the message is the dead letter's reason."""


class MixerAdapter:
    """The gRPC server Mixer's handler ``connection.address`` points at.

    Serves both templates on one port, over plain TCP (Mixer connects without TLS unless
    the handler configures it). The sink stays the caller's: ``stop`` does not close it.
    """

    def __init__(self, sink: SpanSink, *, port: int = 0, host: str = "127.0.0.1",
                 max_workers: int = 8) -> None:
        self.sink = sink
        self._address = f"{host}:{port}"
        self._max_workers = max_workers
        self._server: grpc.Server | None = None

    def start(self) -> int:
        """Start serving; returns the bound port (useful with port 0)."""
        if self._server is not None:
            raise RuntimeError("the Mixer adapter is already started")
        server = grpc.server(futures.ThreadPoolExecutor(
            max_workers=self._max_workers, thread_name_prefix="mixer-adapter"))
        # Generic handlers that take the raw request bytes: a body that does not parse is
        # answered INVALID_ARGUMENT by us (grpc's own deserializer would answer INTERNAL),
        # and each instance's original bytes stay at hand for the dead-letter topic.
        server.add_generic_rpc_handlers([
            _raw_handler(TRACESPAN_SERVICE, "HandleTraceSpan", self._handle_trace_span),
            _raw_handler(METRIC_SERVICE, "HandleMetric", self._handle_metric),
        ])
        port = server.add_insecure_port(self._address)
        if port == 0:
            raise RuntimeError(f"cannot listen on {self._address}")
        server.start()
        self._server = server
        return port

    def stop(self, grace: float | None = 5.0) -> None:
        """Stop accepting calls; calls in flight get ``grace`` seconds to finish."""
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None

    def __enter__(self) -> MixerAdapter:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _handle_trace_span(self, body: bytes, context: grpc.ServicerContext) -> bytes:
        return self._report(body, context, tracespan_pb2.HandleTraceSpanRequest,
                            span_from_tracespan)

    def _handle_metric(self, body: bytes, context: grpc.ServicerContext) -> bytes:
        return self._report(body, context, metric_pb2.HandleMetricRequest, span_from_metric)

    def _report(self, body: bytes, context: grpc.ServicerContext, request_type: Any,
                mapper: Callable[[Any], dict[str, Any]]) -> bytes:
        self.sink.request(RECEIVER)
        try:
            request = request_type.FromString(body)
        except DecodeError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"cannot parse the body as {request_type.DESCRIPTOR.full_name}: {exc}")
        originals = _original_instances(body, request.instances)
        candidates = [_candidate(mapper, instance, original)
                      for instance, original in zip(request.instances, originals, strict=True)]
        result = self.sink.submit(RECEIVER, candidates)  # thread-safe
        if result.rejected:
            # Mixer logs the status message; the valid spans are published already.
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, result.summary())
        return _REPORT_RESULT


def span_from_tracespan(instance: Any) -> dict[str, Any]:
    """A tracespan ``InstanceMsg`` as a span dict (span.v1 field names); see the table above."""
    tags = instance.span_tags
    client = instance.client_span
    me, peer = ("source", "destination") if client else ("destination", "source")
    service = _tag(tags, f"{me}.workload.name", "string_value") or getattr(instance, f"{me}_name")
    if not service:
        raise MappingError(f"no {me} workload name (span tag '{me}.workload.name' or field "
                           f"{me}_name), so no service to attribute the span to")
    start_us = _timestamp_us(instance, "start_time")
    end_us = _timestamp_us(instance, "end_time")
    status = instance.httpStatusCode or None
    request_size = instance.request_total_size or None
    response_size = instance.response_total_size or None
    return {
        "trace_id": instance.trace_id.lower(),
        "span_id": instance.span_id.lower(),
        "parent_span_id": instance.parent_span_id.lower() or None,
        "service": service,
        "namespace": _tag(tags, f"{me}.workload.namespace", "string_value"),
        "pod": _tag(tags, f"{me}.name", "string_value"),
        "revision": _tag(tags, f"{me}.labels.pod-template-hash", "string_value"),
        "operation": instance.span_name,
        "kind": "client" if client else "server",
        "start_us": start_us,
        "duration_us": end_us - start_us,
        "status_code": status,
        "error": (status or 0) >= 500 or _error_tag(tags),
        "peer_service": (_tag(tags, f"{peer}.workload.name", "string_value")
                         or getattr(instance, f"{peer}_name") or None),
        "peer_namespace": _tag(tags, f"{peer}.workload.namespace", "string_value"),
        "bytes_sent": request_size if client else response_size,
        "bytes_received": response_size if client else request_size,
        "source": "mixer",
        "schema_version": SCHEMA_VERSION,
    }


def span_from_metric(instance: Any) -> dict[str, Any]:
    """A ``cloverrequest`` metric ``InstanceMsg`` as a server span dict; see above."""
    if instance.name.split(".", 1)[0] != METRIC_INSTANCE:
        raise MappingError(
            f"metric instance {instance.name or '(unnamed)'!r} is not one Clover maps: only "
            f"{METRIC_INSTANCE!r} (request duration by request identity) becomes a span")
    if instance.value.WhichOneof("value") != "duration_value":
        raise MappingError(f"the value of {instance.name!r} must be a duration (e.g. "
                           f"response.duration), not {_kind(instance.value)}")
    dims = instance.dimensions
    service = _tag(dims, "destination_workload", "string_value")
    if not service:
        raise MappingError("no destination workload (dimension 'destination_workload'), so no "
                           "service to attribute the request to")
    start_us = _tag(dims, "request_time", "timestamp_value")
    if start_us is None:
        raise MappingError("no request time (dimension 'request_time')")
    status = _tag(dims, "response_code", "int64_value") or None
    return {
        # No trace context in a metric: random ids that only identify this record.
        "trace_id": secrets.token_hex(16),
        "span_id": secrets.token_hex(8),
        "parent_span_id": None,
        "service": service,
        "namespace": _tag(dims, "destination_workload_namespace", "string_value"),
        "pod": _tag(dims, "destination_pod", "string_value"),
        "revision": _tag(dims, "destination_revision", "string_value"),
        "operation": _tag(dims, "operation", "string_value") or "",  # "" fails validation
        "kind": "server",
        "start_us": start_us,
        "duration_us": _duration_us(instance.value.duration_value.value),
        "status_code": status,
        "error": (status or 0) >= 500,
        "peer_service": _tag(dims, "source_workload", "string_value"),
        "peer_namespace": _tag(dims, "source_workload_namespace", "string_value"),
        "bytes_sent": _tag(dims, "response_size", "int64_value") or None,
        "bytes_received": _tag(dims, "request_size", "int64_value") or None,
        "source": "mixer",
        "schema_version": SCHEMA_VERSION,
    }


def _raw_handler(service: Any, method: str,
                 behaviour: Callable[[bytes, grpc.ServicerContext], bytes]) -> Any:
    # No (de)serializers: the behaviour receives and returns bytes.
    return grpc.method_handlers_generic_handler(
        service.full_name, {method: grpc.unary_unary_rpc_method_handler(behaviour)})


def _candidate(mapper: Callable[[Any], dict[str, Any]], instance: Any,
               original: bytes) -> Candidate:
    try:
        return Candidate(mapper(instance), original)
    except MappingError as exc:
        return Candidate(None, original, problem=str(exc))


def _kind(value: Any) -> str:
    return value.WhichOneof("value") or "no value"


def _tag(values: Mapping[str, Any], key: str, kind: str) -> Any:
    """A span tag or dimension of the expected Value kind: None when absent or empty (Mixer's
    ``| ""`` default), MappingError when it has another type (a misconfigured instance)."""
    if key not in values:
        return None
    value = values[key]
    if value.WhichOneof("value") is None:
        return None
    if value.WhichOneof("value") != kind:
        raise MappingError(f"{key!r} is {_kind(value)}, expected {kind}")
    if kind == "timestamp_value":
        stamp = value.timestamp_value
        return _to_us(stamp.value) if stamp.HasField("value") else None
    return getattr(value, kind) or None


def _error_tag(tags: Mapping[str, Any]) -> bool:
    if "error" not in tags:
        return False
    value = tags["error"]
    kind = value.WhichOneof("value")
    return (kind == "bool_value" and value.bool_value) or (
        kind == "string_value" and value.string_value.lower() == "true")


def _timestamp_us(instance: Any, field: str) -> int:
    if not instance.HasField(field) or not getattr(instance, field).HasField("value"):
        raise MappingError(f"no {field}")
    return _to_us(getattr(instance, field).value)


def _to_us(stamp: Any) -> int:
    return stamp.seconds * 1_000_000 + stamp.nanos // 1000


def _duration_us(duration: Any) -> int:
    return duration.seconds * 1_000_000 + duration.nanos // 1000


def _original_instances(body: bytes, instances: Any) -> list[bytes]:
    """Each instance's bytes exactly as Mixer sent them, for the dead-letter topic.

    Re-serializing the parsed message need not reproduce them (map entries have no fixed
    order), so the ``instances`` entries (field 1) are cut out of the body; if that ever
    fails to line up, the re-serialized instances stand in.
    """
    try:
        found = _length_delimited(body, field_number=1)
    except (IndexError, ValueError):
        found = []
    if len(found) != len(instances):
        found = [instance.SerializeToString() for instance in instances]
    return found


def _length_delimited(body: bytes, field_number: int) -> list[bytes]:
    """The payloads of one length-delimited field at the top level of a protobuf message."""
    found, pos = [], 0
    while pos < len(body):
        key, pos = _varint(body, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _varint(body, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            size, pos = _varint(body, pos)
            if number == field_number:
                found.append(body[pos:pos + size])
            pos += size
        else:  # groups: not in these proto3 messages
            raise ValueError(f"unexpected wire type {wire_type}")
    if pos != len(body):
        raise ValueError("truncated message")
    return found


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
