"""OTLP/gRPC trace receiver: ``opentelemetry.proto.collector.trace.v1.TraceService/Export``,
each span mapped to a span.v1 dict and handed to the :class:`~collectors.ingest.SpanSink`.

Mapping (resource attributes are read once per ``ResourceSpans``, span attributes once per span):

======================  ==========================================================================
span.v1 field           from
======================  ==========================================================================
service                 resource ``k8s.deployment.name``, else ``service.name``; neither (or empty)
                        -> dead letter "resource has no service.name"
namespace               resource ``k8s.namespace.name`` (None if absent or empty)
pod                     resource ``k8s.pod.name`` (None if absent or empty)
revision                pod template hash: resource ``k8s.replicaset.name`` minus the prefix
                        ``<k8s.deployment.name>-``; None without both or when the name has another
                        shape (never guessed from the pod name)
operation               ``span.name``
kind                    ``span.kind``: SERVER/CLIENT/PRODUCER/CONSUMER/INTERNAL/UNSPECIFIED ->
                        server/client/producer/consumer/internal/unspecified (a kind newer than
                        this proto: unspecified)
trace_id, span_id,      lowercase hex of the bytes; an empty parent -> None. Wrong lengths and
parent_span_id          all-zero ids are passed on for validation to reject, not fixed up
start_us                ``start_time_unix_nano // 1000``
duration_us             ``(end_time_unix_nano - start_time_unix_nano) // 1000`` (negative ->
                        rejected); a span without start and end times: start 0, duration 0
status_code             first present (an int, or a string of digits) of
                        ``http.response.status_code``, ``http.status_code``,
                        ``rpc.grpc.status_code`` (and Envoy's ``grpc.status_code``)
error                   ``status.code == STATUS_CODE_ERROR``, or an HTTP status_code >= 500
peer_service,           ``peer.service`` (peer_namespace None); else on a CLIENT span
peer_namespace          ``server.address``, split when it is a Service DNS name
                        ``<service>.<namespace>.svc[...]``; else None
bytes_sent,             ``http.request.body.size`` (older: ``http.request_content_length``) and
bytes_received          ``http.response.body.size`` (``http.response_content_length``): a
                        SERVER/CONSUMER span received the request and sent the response, any other
                        kind sent the request
source                  ``"otlp"``
======================  ==========================================================================

A dead letter's original bytes are the ``Span`` message's bytes exactly as the client sent them
(equal to its ``SerializeToString()``); its resource is implied by the key, ``namespace/service``.

Responses follow the OTLP spec: every span accepted -> an empty ``ExportTraceServiceResponse``;
some rejected -> status OK with ``partial_success`` (``rejected_spans``, and the sink's summary as
``error_message``), the valid ones published; a body that is not an ``ExportTraceServiceRequest``
-> ``INVALID_ARGUMENT``. The service is registered with a raw-bytes deserializer so that a
malformed body reaches our handler and gets that answer (grpc's own deserialization failure
would be ``INTERNAL``).

For speed the body is parsed with "view" message types (see :func:`_view_types`): what Clover
does not read (events, links, trace_state, the instrumentation scope, the values of attributes
it does not use) is not decoded, so a corruption inside those alone goes unnoticed; the framing
of the whole body and everything that is read are checked as usual.
"""

from __future__ import annotations

import logging
from concurrent import futures
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor_pb2 import FieldDescriptorProto
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from clover import records
from clover.records import SpanRecord
from collectors import spanmap
from collectors.ingest import Candidate, SpanSink

log = logging.getLogger(__name__)

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
RECEIVER = "otlp"

# SpanKind enum values 0..5, in order.
_KINDS = ("unspecified", "internal", "server", "client", "producer", "consumer")
_STATUS_ERROR = trace_pb2.Status.STATUS_CODE_ERROR
_RESOURCE_KEYS = frozenset(("service.name", "k8s.deployment.name", "k8s.namespace.name",
                            "k8s.pod.name", "k8s.replicaset.name"))

# What a request controls, so what is checked against span.v1. The mapping sets the other
# fields from typed values: kind from _KINDS, error a bool, start_us an unsigned integer // 1000,
# source and schema_version constants.
# Names repeat from span to span: each combination that passed is not checked again.
_NAMES = frozenset(("service", "namespace", "pod", "revision", "operation", "peer_service",
                    "peer_namespace"))
_check = records.field_validator(SpanRecord, _NAMES | {
    "trace_id", "span_id", "parent_span_id", "duration_us", "status_code", "bytes_sent",
    "bytes_received"}, remembered=_NAMES)


def _view_types() -> tuple[Any, Any]:
    """Two message types that read ``ExportTraceServiceRequest`` wire bytes differently, for
    speed (each body is parsed with both, in C):

    * ``Request``: ``Span.attributes`` (``repeated KeyValue {string key = 1; AnyValue value =
      2}``) read as ``map<string, bytes>``, which has the same wire format. Looking up the few
      attributes we need in the C map, and decoding only their values, is several times cheaper
      than walking every KeyValue from Python;
    * ``RawRequest``: ``ScopeSpans.spans`` as ``repeated bytes``: each span's own bytes, exactly
      as the client sent them (the dead-letter original, without re-serializing every span).

    Span fields Clover does not read (events, links, trace_state...) are left undecoded. The
    types live in a private descriptor pool, apart from the generated ones."""
    pool = descriptor_pool.DescriptorPool()
    for module in (common_pb2, resource_pb2, trace_pb2):
        pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    file = descriptor_pb2.FileDescriptorProto(
        name="clover/otlp_view.proto", package="clover.otlpview", syntax="proto3",
        dependency=[common_pb2.DESCRIPTOR.name, resource_pb2.DESCRIPTOR.name,
                    trace_pb2.DESCRIPTOR.name])
    f = FieldDescriptorProto
    optional, repeated = f.LABEL_OPTIONAL, f.LABEL_REPEATED
    resource = ".opentelemetry.proto.resource.v1.Resource"

    def message(parent: Any, name: str, *fields: tuple[str, int, int, int, str]) -> Any:
        added = parent.add(name=name)
        for field_name, number, label, kind, type_name in fields:
            added.field.add(name=field_name, number=number, label=label, type=kind,
                            **({"type_name": type_name} if type_name else {}))
        return added

    for prefix, span_field in (("", (f.TYPE_MESSAGE, ".clover.otlpview.Span")),
                               ("Raw", (f.TYPE_BYTES, ""))):
        message(file.message_type, f"{prefix}Request",
                ("resource_spans", 1, repeated, f.TYPE_MESSAGE,
                 f".clover.otlpview.{prefix}ResourceSpans"))
        message(file.message_type, f"{prefix}ResourceSpans",
                ("resource", 1, optional, f.TYPE_MESSAGE, resource),
                ("scope_spans", 2, repeated, f.TYPE_MESSAGE,
                 f".clover.otlpview.{prefix}ScopeSpans"))
        message(file.message_type, f"{prefix}ScopeSpans", ("spans", 2, repeated, *span_field))
    span = message(
        file.message_type, "Span",
        ("trace_id", 1, optional, f.TYPE_BYTES, ""),
        ("span_id", 2, optional, f.TYPE_BYTES, ""),
        ("parent_span_id", 4, optional, f.TYPE_BYTES, ""),
        ("name", 5, optional, f.TYPE_STRING, ""),
        ("kind", 6, optional, f.TYPE_INT32, ""),  # the SpanKind enum's wire format
        ("start_time_unix_nano", 7, optional, f.TYPE_FIXED64, ""),
        ("end_time_unix_nano", 8, optional, f.TYPE_FIXED64, ""),
        ("attributes", 9, repeated, f.TYPE_MESSAGE, ".clover.otlpview.Span.AttributesEntry"),
        ("status", 15, optional, f.TYPE_MESSAGE, ".opentelemetry.proto.trace.v1.Status"))
    entry = message(span.nested_type, "AttributesEntry",
                    ("key", 1, optional, f.TYPE_STRING, ""),
                    ("value", 2, optional, f.TYPE_BYTES, ""))  # an AnyValue, decoded on use
    entry.options.map_entry = True
    pool.Add(file)
    return tuple(message_factory.GetMessageClass(  # type: ignore[return-value]
        pool.FindMessageTypeByName(f"clover.otlpview.{name}")) for name in ("Request",
                                                                           "RawRequest"))


_Request, _RawRequest = _view_types()


# Serialized AnyValue -> its value. Status codes, sizes and host names repeat from span to span,
# and a dict lookup is ~4x cheaper than decoding. Bounded: short values, at most 10,000.
_values: dict[bytes, Any] = {}


def _value(raw: bytes) -> Any:
    """Decode a serialized ``AnyValue`` (arrays and maps stay messages: unused) and cache it."""
    any_value = common_pb2.AnyValue.FromString(raw)
    which = any_value.WhichOneof("value")
    value = getattr(any_value, which) if which else None
    if len(raw) <= 128:
        if len(_values) >= 10_000:  # concurrent requests at worst decode again
            _values.clear()
        _values[raw] = value
    return value


def _resource_base(resource: Any) -> dict[str, Any] | None:
    """The fields every span of a resource shares, or None when it names no service."""
    attrs: dict[str, str] = {}
    for kv in resource.attributes:
        if kv.key in _RESOURCE_KEYS and kv.value.WhichOneof("value") == "string_value":
            attrs[kv.key] = kv.value.string_value
    deployment = attrs.get("k8s.deployment.name")
    service = deployment or attrs.get("service.name")
    if not service:
        return None
    return {
        "service": service,
        "namespace": attrs.get("k8s.namespace.name") or None,
        "pod": attrs.get("k8s.pod.name") or None,
        "revision": spanmap.revision_of(deployment, attrs.get("k8s.replicaset.name")),
    }


def candidates(body: bytes) -> list[Candidate]:
    """One Candidate per span of a serialized ``ExportTraceServiceRequest``, in order.

    Raises DecodeError when the body is not valid protobuf (before anything is published)."""
    span_keys, kinds, known_value, value_of = spanmap.SPAN_KEYS, _KINDS, _values.get, _value
    apply_attributes = spanmap.apply_attributes
    result: list[Candidate] = []
    request, raw = _Request.FromString(body), _RawRequest.FromString(body)
    # Both views have the same repeated fields, so they zip one to one.
    for resource_spans, raw_resource_spans in zip(request.resource_spans, raw.resource_spans,
                                                  strict=True):
        base = _resource_base(resource_spans.resource)
        if base is not None:
            service, namespace, pod = base["service"], base["namespace"], base["pod"]
            revision = base["revision"]
        for scope_spans, raw_scope_spans in zip(resource_spans.scope_spans,
                                                raw_resource_spans.scope_spans, strict=True):
            for span, original in zip(scope_spans.spans, raw_scope_spans.spans, strict=True):
                if base is None:
                    result.append(Candidate(None, original,
                                            problem="resource has no service.name"))
                    continue
                kind_number = span.kind
                kind = kinds[kind_number] if 0 <= kind_number < 6 else "unspecified"
                parent = span.parent_span_id
                start = span.start_time_unix_nano
                # Every field, in SpanRecord's order (the sink then encodes it as it is).
                record = {
                    "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                    "service": service, "operation": span.name, "kind": kind,
                    "start_us": start // 1000,
                    "duration_us": (span.end_time_unix_nano - start) // 1000,
                    "error": span.status.code == _STATUS_ERROR, "source": RECEIVER,
                    "parent_span_id": parent.hex() if parent else None,
                    "namespace": namespace, "pod": pod, "revision": revision,
                    # Set from span attributes when they give them:
                    "status_code": None, "peer_namespace": None, "peer_service": None,
                    "bytes_sent": None, "bytes_received": None, "schema_version": 1}
                attributes = span.attributes
                if attributes:
                    attrs = {}
                    for key in attributes:
                        if key in span_keys:
                            raw_value = attributes[key]
                            value = known_value(raw_value)
                            attrs[key] = value_of(raw_value) if value is None else value
                    if attrs:
                        apply_attributes(record, attrs, kind)
                result.append(Candidate(record, original))
    return result


class OtlpReceiver:
    """A gRPC server for OTLP traces; ``start`` returns the bound port."""

    def __init__(self, sink: SpanSink, *, port: int = 0, host: str = "127.0.0.1",
                 workers: int = 4) -> None:
        self._sink = sink
        self._address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._workers = workers
        self._server: grpc.Server | None = None
        self.port: int | None = None

    def start(self) -> int:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self._workers,
                                                        thread_name_prefix="otlp"))
        handler = grpc.unary_unary_rpc_method_handler(
            self._export, request_deserializer=None,  # raw bytes: we parse (and refuse) them
            response_serializer=ExportTraceServiceResponse.SerializeToString)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Export": handler}),))
        port = server.add_insecure_port(self._address)
        if not port:
            raise OSError(f"cannot listen on {self._address}")
        server.start()
        self._server, self.port = server, port
        log.info("OTLP/gRPC trace receiver listening on %s", self._address)
        return port

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting requests and let running ones finish (the sink stays open)."""
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None

    def _export(self, body: bytes, context: grpc.ServicerContext) -> ExportTraceServiceResponse:
        self._sink.request(RECEIVER)
        try:
            batch = candidates(body)
        except DecodeError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"the body is not an ExportTraceServiceRequest: {exc}")
        result = self._sink.submit(RECEIVER, batch, _check)
        if not result.rejected:
            return ExportTraceServiceResponse()
        return ExportTraceServiceResponse(partial_success=ExportTracePartialSuccess(
            rejected_spans=len(result.rejected), error_message=result.summary()))
