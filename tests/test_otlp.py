"""The OTLP/gRPC trace receiver against a real grpc client and real Kafka: each span mapped field
for field, invalid ones dead-lettered with the Span's bytes, partial success reported."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import TraceServiceStub
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from clover import records
from clover.records import DeadLetter, SpanRecord
from clover.topics import DEADLETTER, SPANS
from collectors import otlp, spanmap
from collectors.ingest import SpanSink
from collectors.otlp import OtlpReceiver

T0_NS = 1_717_200_000_000_000_000  # 2024-06-01T00:00:00Z
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def attrs(values: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=name, value=AnyValue(int_value=v) if isinstance(v, int)
                     else AnyValue(string_value=v))
            for name, v in values.items()]


def span(name: str, kind: Span.SpanKind.ValueType, *, trace_id: bytes, parent: bytes = b"",
         start_ms: int = 0, duration_ms: float = 10,
         status: Status.StatusCode.ValueType = Status.STATUS_CODE_UNSET,
         attributes: dict[str, Any] | None = None) -> Span:
    start = T0_NS + start_ms * 1_000_000
    return Span(trace_id=trace_id, span_id=os.urandom(8), parent_span_id=parent, name=name,
                kind=kind, start_time_unix_nano=start,
                end_time_unix_nano=start + int(duration_ms * 1_000_000),
                status=Status(code=status), attributes=attrs(attributes or {}))


@pytest.fixture
def receiver(sink: SpanSink) -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver(sink)
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture
def channel(receiver: OtlpReceiver) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{receiver.port}") as channel:
        yield channel


def test_spans_are_mapped_published_and_dead_lettered(
        sink: SpanSink, channel: grpc.Channel, topic_reader: Any) -> None:
    spans_reader, dead_reader = topic_reader(SPANS.name), topic_reader(DEADLETTER.name)
    trace = os.urandom(16)
    server = span("GET /cart/{id}", Span.SPAN_KIND_SERVER, trace_id=trace, duration_ms=18.4,
                  attributes={"http.response.status_code": 200, "http.route": "/cart/{id}",
                              "http.request.body.size": 1843, "http.response.body.size": 20417})
    client = span("POST /charge", Span.SPAN_KIND_CLIENT, trace_id=trace,
                  parent=server.span_id, start_ms=1, duration_ms=7.25,
                  attributes={"peer.service": "payments", "http.status_code": "201",
                              "http.request_content_length": 300,
                              "http.response_content_length": 40})
    failed = span("reserve", Span.SPAN_KIND_INTERNAL, trace_id=trace, parent=server.span_id,
                  start_ms=2, status=Status.STATUS_CODE_ERROR)
    unavailable = span("GET /stock", Span.SPAN_KIND_CLIENT, trace_id=trace,
                       parent=server.span_id, start_ms=3, duration_ms=0.5,
                       attributes={"http.response.status_code": 503,
                                   "server.address": "inventory.stock.svc.cluster.local"})
    grpc_failure = span("inventory.Reserve", Span.SPAN_KIND_CLIENT, trace_id=trace,
                        start_ms=4, attributes={"server.address": "10.96.0.12",
                                                "rpc.grpc.status_code": 14})
    zero_trace = span("GET /", Span.SPAN_KIND_SERVER, trace_id=bytes(16))
    untimed = Span(trace_id=trace, span_id=os.urandom(8), name="untimed",
                   kind=Span.SPAN_KIND_SERVER)
    backwards = span("backwards", Span.SPAN_KIND_SERVER, trace_id=trace, start_ms=5,
                     duration_ms=-1)
    consumer = span("orders process", Span.SPAN_KIND_CONSUMER, trace_id=trace, start_ms=6)
    unnamed = span("anonymous", Span.SPAN_KIND_SERVER, trace_id=trace)
    k8s = Resource(attributes=attrs({
        "service.name": "cart-service", "k8s.deployment.name": "cart",
        "k8s.namespace.name": "shop", "k8s.pod.name": "cart-5c4b7f9d8-q8wzt",
        "k8s.replicaset.name": "cart-5c4b7f9d8", "telemetry.sdk.language": "go"}))
    request = ExportTraceServiceRequest(resource_spans=[
        ResourceSpans(resource=k8s, scope_spans=[
            ScopeSpans(spans=[server, client, failed, unavailable, grpc_failure]),
            ScopeSpans(spans=[zero_trace, untimed, backwards])]),
        ResourceSpans(resource=Resource(attributes=attrs({"service.name": "orders"})),
                      scope_spans=[ScopeSpans(spans=[consumer])]),
        ResourceSpans(resource=Resource(attributes=attrs({"host.name": "vm-1"})),
                      scope_spans=[ScopeSpans(spans=[unnamed])]),
    ])

    response = TraceServiceStub(channel).Export(request, timeout=30)

    assert response.partial_success.rejected_spans == 3
    message = response.partial_success.error_message
    assert message.startswith("3 of 10 spans rejected: span 5: SpanRecord.trace_id"), message
    assert "span 7: SpanRecord.duration_us" in message
    assert "span 9: resource has no service.name" in message
    assert sink.flush() == 0

    hexed = trace.hex()
    in_cart: dict[str, Any] = {"namespace": "shop", "service": "cart",
                               "pod": "cart-5c4b7f9d8-q8wzt", "revision": "5c4b7f9d8",
                               "source": "otlp"}
    expected = [
        SpanRecord(trace_id=hexed, span_id=server.span_id.hex(), parent_span_id=None,
                   operation="GET /cart/{id}", kind="server", start_us=T0_NS // 1000,
                   duration_us=18_400, status_code=200, error=False, bytes_sent=20417,
                   bytes_received=1843, **in_cart),
        SpanRecord(trace_id=hexed, span_id=client.span_id.hex(),
                   parent_span_id=server.span_id.hex(), operation="POST /charge", kind="client",
                   start_us=T0_NS // 1000 + 1000, duration_us=7_250, status_code=201,
                   error=False, peer_service="payments", bytes_sent=300, bytes_received=40,
                   **in_cart),
        SpanRecord(trace_id=hexed, span_id=failed.span_id.hex(),
                   parent_span_id=server.span_id.hex(), operation="reserve", kind="internal",
                   start_us=T0_NS // 1000 + 2000, duration_us=10_000, error=True, **in_cart),
        SpanRecord(trace_id=hexed, span_id=unavailable.span_id.hex(),
                   parent_span_id=server.span_id.hex(), operation="GET /stock", kind="client",
                   start_us=T0_NS // 1000 + 3000, duration_us=500, status_code=503, error=True,
                   peer_service="inventory", peer_namespace="stock", **in_cart),
        SpanRecord(trace_id=hexed, span_id=grpc_failure.span_id.hex(),
                   operation="inventory.Reserve", kind="client", start_us=T0_NS // 1000 + 4000,
                   duration_us=10_000, status_code=14, error=False, peer_service="10.96.0.12",
                   **in_cart),
        SpanRecord(trace_id=hexed, span_id=untimed.span_id.hex(), operation="untimed",
                   kind="server", start_us=0, duration_us=0, error=False, **in_cart),
        SpanRecord(trace_id=hexed, span_id=consumer.span_id.hex(), operation="orders process",
                   kind="consumer", start_us=T0_NS // 1000 + 6000, duration_us=10_000,
                   error=False, service="orders", source="otlp"),
    ]
    published = [records.decode(SpanRecord, m.value()) for m in spans_reader.read_all()]
    mine = {s.span_id: s for s in published if s.trace_id == hexed}
    assert mine == {s.span_id: s for s in expected}
    assert {m.key() for m in spans_reader.read_all() if m.value() and hexed.encode()
            in m.value()} == {b"shop/cart", b"unknown/orders"}

    letters = [records.decode(DeadLetter, m.value()) for m in dead_reader.read_all()]
    by_original = {base64.b64decode(d.value_b64): d for d in letters
                   if d.source_topic == "receiver.otlp"}
    rejected = {zero_trace.SerializeToString(): "SpanRecord.trace_id: ",
                backwards.SerializeToString(): "SpanRecord.duration_us: ",
                unnamed.SerializeToString(): "resource has no service.name"}
    assert set(rejected) <= set(by_original)
    for original, reason in rejected.items():
        letter = by_original[original]
        assert letter.reason.startswith(reason), letter.reason
        assert letter.component == "otlp-receiver"
        assert Span.FromString(original) in (zero_trace, backwards, unnamed)
    assert by_original[zero_trace.SerializeToString()].key() == b"shop/cart"
    assert by_original[unnamed.SerializeToString()].key_b64 is None

    def sample(name: str, **labels: str) -> float | None:
        return sink.registry.get_sample_value(name, {"receiver": "otlp", **labels})

    assert sample("clover_receiver_requests_total") == 1
    assert sample("clover_receiver_spans_accepted_total") == 7
    assert sample("clover_receiver_spans_rejected_total", reason="pattern") == 1
    assert sample("clover_receiver_spans_rejected_total", reason="minimum") == 1
    assert sample("clover_receiver_spans_rejected_total", reason="mapping") == 1


def test_all_accepted_is_an_empty_response(sink: SpanSink, channel: grpc.Channel) -> None:
    resource = Resource(attributes=attrs({"service.name": "cart"}))
    request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=resource, scope_spans=[ScopeSpans(spans=[
            span("GET /", Span.SPAN_KIND_SERVER, trace_id=os.urandom(16))])])])
    response = TraceServiceStub(channel).Export(request, timeout=30)
    assert response == ExportTraceServiceResponse()
    assert not response.HasField("partial_success")
    empty = TraceServiceStub(channel).Export(ExportTraceServiceRequest(), timeout=30)
    assert empty == ExportTraceServiceResponse()
    assert sink.registry.get_sample_value("clover_receiver_spans_accepted_total",
                                          {"receiver": "otlp"}) == 1


@pytest.mark.parametrize("body", [b"not a protobuf", b"\x0a\x05\x12\x03\x12\x01\xff",
                                  b"\x0a\x02\x12\x09"])
def test_a_malformed_body_is_invalid_argument(
        sink: SpanSink, channel: grpc.Channel, body: bytes) -> None:
    # Raw bytes; the second body is a span (ResourceSpans.scope_spans.spans) that is itself
    # truncated, the third a length running past the end.
    export = channel.unary_unary(EXPORT, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as caught:
        export(body, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not an ExportTraceServiceRequest" in (caught.value.details() or "")
    with pytest.raises(Exception):  # noqa: B017 - the real type refuses it too
        ExportTraceServiceRequest.FromString(body)

    def sample(name: str) -> float | None:
        return sink.registry.get_sample_value(name, {"receiver": "otlp"})

    assert sample("clover_receiver_requests_total") == 1
    assert not sample("clover_receiver_spans_accepted_total")


def test_view_parse_maps_what_the_real_types_hold() -> None:
    """The fast "view" parse reads the same values as the generated types."""
    one = span("GET /", Span.SPAN_KIND_PRODUCER, trace_id=os.urandom(16), parent=os.urandom(8),
               status=Status.STATUS_CODE_OK, attributes={"peer.service": "kafka",
                                                         "http.response.status_code": "404"})
    one.events.add(name="an event", time_unix_nano=T0_NS)
    one.trace_state = "vendor=1"
    body = ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=Resource(attributes=attrs({"k8s.deployment.name": "a", "service.name": "b",
                                            "k8s.replicaset.name": "a-b-c"})),
        scope_spans=[ScopeSpans(spans=[one])])]).SerializeToString()
    (candidate,) = otlp.candidates(body)
    assert candidate.original == one.SerializeToString()
    assert candidate.span == {
        "trace_id": one.trace_id.hex(), "span_id": one.span_id.hex(),
        "parent_span_id": one.parent_span_id.hex(), "service": "a", "namespace": None,
        "pod": None, "revision": None, "operation": "GET /", "kind": "producer",
        "start_us": T0_NS // 1000, "duration_us": 10_000, "status_code": 404, "error": False,
        "peer_service": "kafka", "peer_namespace": None, "bytes_sent": None,
        "bytes_received": None, "source": "otlp", "schema_version": 1}


@pytest.mark.parametrize(("deployment", "replicaset", "revision"), [
    ("cart", "cart-5c4b7f9d8", "5c4b7f9d8"),
    ("cart", "cart-api-5c4b7f9d8", None),  # another deployment's ReplicaSet
    ("cart", "cart-", None),
    (None, "cart-5c4b7f9d8", None),
    ("cart", None, None),
])
def test_revision_is_the_replicaset_suffix(deployment: str | None, replicaset: str | None,
                                           revision: str | None) -> None:
    assert spanmap.revision_of(deployment, replicaset) == revision
