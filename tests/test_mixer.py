"""The Mixer out-of-process adapter against real Kafka: a real gRPC client calls the started
server over a socket; the spans are read back from clover.spans and the rejected instances from
clover.deadletter. Also: the generated code's field numbers are Istio's, and the manifest holds
together."""

from __future__ import annotations

import base64
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from clover import records
from clover.config import Settings
from clover.records import DeadLetter, SpanRecord
from clover.topics import DEADLETTER, SPANS
from collectors.ingest import SpanSink
from collectors.mixer import generated, server
from collectors.mixer.generated import (
    metric_pb2,
    metric_pb2_grpc,
    policy_pb2,
    report_pb2,
    tracespan_pb2_grpc,
)
from collectors.mixer.generated import tracespan_pb2 as ts
from tests.samples import T0_US

MANIFEST = Path(__file__).resolve().parents[1] / "k8s" / "manifests" / "istio-mixer-adapter.yaml"
SPAN_INSTANCE = "cloverspan.instance.istio-system"
METRIC_INSTANCE = "cloverrequest.instance.istio-system"


@dataclass
class Client:
    sink: SpanSink
    channel: grpc.Channel
    spans: Any  # tracespan stub
    metrics: Any  # metric stub

    def sample(self, name: str, **labels: str) -> float | None:
        return self.sink.registry.get_sample_value(name, {"receiver": "mixer", **labels})


@pytest.fixture
def client(settings: Settings, kafka_topics: Any) -> Iterator[Client]:
    sink = SpanSink(settings)
    adapter = server.MixerAdapter(sink)
    port = adapter.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield Client(sink, channel, tracespan_pb2_grpc.HandleTraceSpanServiceStub(channel),
                 metric_pb2_grpc.HandleMetricServiceStub(channel))
    channel.close()
    adapter.stop()
    sink.close()


def value(**kwargs: Any) -> Any:
    return policy_pb2.Value(**kwargs)


def stamp(us: int) -> Any:
    return policy_pb2.TimeStamp(value=Timestamp(seconds=us // 1_000_000,
                                                nanos=us % 1_000_000 * 1000 + 789))


def call(method: Any, request: Any) -> tuple[grpc.StatusCode, str, Any]:
    """(status, message, response) of one RPC."""
    try:
        return grpc.StatusCode.OK, "", method(request, timeout=30)
    except grpc.RpcError as exc:
        return exc.code(), exc.details(), None


def published(reader: Any, services: set[str]) -> list[SpanRecord]:
    """Our spans among everything written since the reader was made (other tests may write)."""
    spans = [records.decode(SpanRecord, m.value()) for m in reader.read_all()]
    return [span for span in spans if span.service in services]


def dead_letters(reader: Any) -> dict[bytes, DeadLetter]:
    letters = [records.decode(DeadLetter, m.value()) for m in reader.read_all()]
    return {base64.b64decode(d.value_b64): d for d in letters if d.component == "mixer-receiver"}


def test_trace_spans_are_published_and_an_invalid_one_dead_lettered(
        client: Client, topic_reader: Any) -> None:
    spans_reader, dead_reader = topic_reader(SPANS.name), topic_reader(DEADLETTER.name)
    run = uuid.uuid4().hex[:8]
    cart, frontend = f"cart-{run}", f"frontend-{run}"
    trace = uuid.uuid4().hex
    server_span = ts.InstanceMsg(
        name=SPAN_INSTANCE, trace_id=trace.upper(), span_id="A1B2C3D4E5F60718",
        parent_span_id="00000000000000Ff", span_name="/cart/items",
        start_time=stamp(T0_US), end_time=stamp(T0_US + 35_120), httpStatusCode=503,
        client_span=False, request_total_size=1843, response_total_size=20417,
        source_name=frontend, destination_name=cart, api_protocol="http",
        span_tags={
            "destination.workload.name": value(string_value=cart),
            "destination.workload.namespace": value(string_value="shop"),
            "destination.name": value(string_value="cart-5c4b7f9d8-q8wzt"),
            "destination.labels.pod-template-hash": value(string_value="5c4b7f9d8"),
            "source.workload.name": value(string_value=frontend),
            "source.workload.namespace": value(string_value="web"),
            "source.name": value(string_value="frontend-7d9f8b6c5d-x2kqj"),
        })
    # A root client span: its service only in the source_name field, no pod tags, no status.
    client_span = ts.InstanceMsg(
        name=SPAN_INSTANCE, trace_id="00F067AA0BA902B7", span_id="00f067aa0ba902b7",
        span_name="/", start_time=stamp(T0_US + 1_000), end_time=stamp(T0_US + 2_500),
        client_span=True, request_total_size=512, source_name=frontend,
        span_tags={
            "source.workload.namespace": value(string_value="web"),
            "destination.workload.name": value(string_value=cart),
            "destination.workload.namespace": value(string_value="shop"),
        })
    # One span tag at most: with more, serializing this message again need not give the bytes
    # the request carried (map order), and those bytes are what gets dead-lettered.
    invalid = ts.InstanceMsg(
        name=SPAN_INSTANCE, trace_id="not-a-trace-id", span_id="a1b2c3d4e5f60718",
        span_name="/cart/items", start_time=stamp(T0_US), end_time=stamp(T0_US + 10),
        destination_name=cart,
        span_tags={"destination.workload.namespace": value(string_value="shop")})

    status, message, _ = call(client.spans.HandleTraceSpan, ts.HandleTraceSpanRequest(
        instances=[server_span, client_span, invalid], dedup_id="1"))
    assert status == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("1 of 3 spans rejected: span 2: SpanRecord.trace_id:"), message
    assert "'not-a-trace-id'" in message

    # An all-valid report is answered OK with an (empty) ReportResult.
    errored = ts.InstanceMsg()
    errored.CopyFrom(server_span)
    errored.span_id, errored.httpStatusCode = "0000000000000abc", 200
    errored.span_tags["error"].bool_value = True
    status, _, response = call(client.spans.HandleTraceSpan,
                               ts.HandleTraceSpanRequest(instances=[errored]))
    assert status == grpc.StatusCode.OK
    assert response == report_pb2.ReportResult()
    assert client.sink.flush() == 0

    expected_server = SpanRecord(
        trace_id=trace, span_id="a1b2c3d4e5f60718", parent_span_id="00000000000000ff",
        service=cart, namespace="shop", pod="cart-5c4b7f9d8-q8wzt", revision="5c4b7f9d8",
        operation="/cart/items", kind="server", start_us=T0_US, duration_us=35_120,
        status_code=503, error=True, peer_namespace="web", peer_service=frontend,
        bytes_sent=20417, bytes_received=1843, source="mixer")
    expected = {
        "a1b2c3d4e5f60718": expected_server,
        "00f067aa0ba902b7": SpanRecord(
            trace_id="00f067aa0ba902b7", span_id="00f067aa0ba902b7", parent_span_id=None,
            service=frontend, namespace="web", pod=None, revision=None, operation="/",
            kind="client", start_us=T0_US + 1_000, duration_us=1_500, status_code=None,
            error=False, peer_namespace="shop", peer_service=cart, bytes_sent=512,
            bytes_received=None, source="mixer"),
        "0000000000000abc": replace(expected_server, span_id="0000000000000abc",
                                    status_code=200, error=True),
    }
    spans = published(spans_reader, {cart, frontend})
    assert {span.span_id: span for span in spans} == expected
    assert len(spans) == 3

    letters = dead_letters(dead_reader)
    assert list(letters) == [invalid.SerializeToString()]  # the instance's bytes as sent
    letter = letters[invalid.SerializeToString()]
    assert letter.reason.startswith("SpanRecord.trace_id: 'not-a-trace-id' does not match")
    assert letter.source_topic == "receiver.mixer"
    assert letter.key() == f"shop/{cart}".encode()

    assert client.sample("clover_receiver_requests_total") == 2
    assert client.sample("clover_receiver_spans_accepted_total") == 3
    assert client.sample("clover_receiver_spans_rejected_total", reason="pattern") == 1


def test_request_metrics_become_server_spans_and_other_metrics_are_rejected(
        client: Client, topic_reader: Any) -> None:
    spans_reader, dead_reader = topic_reader(SPANS.name), topic_reader(DEADLETTER.name)
    run = uuid.uuid4().hex[:8]
    cart, frontend = f"cart-{run}", f"frontend-{run}"

    def request_metric(operation: str, code: int, start_us: int, ms: int) -> Any:
        return metric_pb2.InstanceMsg(
            name=METRIC_INSTANCE,
            value=value(duration_value=policy_pb2.Duration(
                value=Duration(seconds=ms // 1000, nanos=ms % 1000 * 1_000_000 + 999))),
            dimensions={
                "source_workload": value(string_value=frontend),
                "source_workload_namespace": value(string_value="web"),
                "destination_workload": value(string_value=cart),
                "destination_workload_namespace": value(string_value="shop"),
                "destination_pod": value(string_value="cart-5c4b7f9d8-q8wzt"),
                "destination_revision": value(string_value="5c4b7f9d8"),
                "operation": value(string_value=operation),
                "response_code": value(int64_value=code),
                "request_time": value(timestamp_value=stamp(start_us)),
                "request_size": value(int64_value=700),
                "response_size": value(int64_value=0),
            },
            monitored_resource_type="UNSPECIFIED")

    status, _, response = call(client.metrics.HandleMetric, metric_pb2.HandleMetricRequest(
        instances=[request_metric("/cart/items", 200, T0_US, 1_250),
                   request_metric("/cart/checkout", 500, T0_US + 7, 42)]))
    assert status == grpc.StatusCode.OK
    assert response == report_pb2.ReportResult()

    other = metric_pb2.InstanceMsg(name="requestcount.instance.istio-system",
                                   value=value(int64_value=1))
    status, message, _ = call(client.metrics.HandleMetric,
                              metric_pb2.HandleMetricRequest(instances=[other]))
    assert status == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("1 of 1 spans rejected: span 0: metric instance "
                              "'requestcount.instance.istio-system' is not one Clover maps")
    assert client.sink.flush() == 0

    spans = sorted(published(spans_reader, {cart}), key=lambda span: span.start_us)
    assert len(spans) == 2
    for span in spans:  # random ids: they only identify the record
        assert re.fullmatch("[0-9a-f]{32}", span.trace_id)
        assert re.fullmatch("[0-9a-f]{16}", span.span_id)
    assert len({span.trace_id for span in spans}) == 2
    common: dict[str, Any] = dict(
        parent_span_id=None, service=cart, namespace="shop", pod="cart-5c4b7f9d8-q8wzt",
        revision="5c4b7f9d8", kind="server", peer_namespace="web", peer_service=frontend,
        bytes_sent=None, bytes_received=700, source="mixer")
    assert spans == [
        SpanRecord(trace_id=spans[0].trace_id, span_id=spans[0].span_id,
                   operation="/cart/items", start_us=T0_US, duration_us=1_250_000,
                   status_code=200, error=False, **common),
        SpanRecord(trace_id=spans[1].trace_id, span_id=spans[1].span_id,
                   operation="/cart/checkout", start_us=T0_US + 7, duration_us=42_000,
                   status_code=500, error=True, **common),
    ]

    letters = dead_letters(dead_reader)
    assert list(letters) == [other.SerializeToString()]
    assert "only 'cloverrequest'" in letters[other.SerializeToString()].reason

    assert client.sample("clover_receiver_requests_total") == 2
    assert client.sample("clover_receiver_spans_accepted_total") == 2
    assert client.sample("clover_receiver_spans_rejected_total", reason="mapping") == 1


def test_a_body_that_does_not_parse_is_invalid_argument(client: Client) -> None:
    for path in ("/tracespan.HandleTraceSpanService/HandleTraceSpan",
                 "/metric.HandleMetricService/HandleMetric"):
        raw = client.channel.unary_unary(path)  # no serializers: bytes on the wire as given
        status, message, _ = call(raw, b"\x0a\x05ab")  # field 1 says 5 bytes, 2 follow
        assert status == grpc.StatusCode.INVALID_ARGUMENT
        assert message.startswith("cannot parse the body as ")
    assert client.sample("clover_receiver_requests_total") == 2
    assert client.sample("clover_receiver_spans_accepted_total") is None


def test_dead_letters_keep_each_instance_as_sent() -> None:
    tags = {f"tag{i}": value(int64_value=i) for i in range(20)}
    request = ts.HandleTraceSpanRequest(
        instances=[ts.InstanceMsg(trace_id=str(n), span_tags=tags) for n in range(3)],
        dedup_id="x")
    body = request.SerializeToString()
    parsed = ts.HandleTraceSpanRequest.FromString(body)
    originals = server._original_instances(body, parsed.instances)
    assert [ts.InstanceMsg.FromString(o) for o in originals] == list(request.instances)
    offset = 0
    for original in originals:  # the very bytes, in order
        offset = body.index(original, offset) + len(original)


def test_mapping_problems_are_reasons_not_exceptions() -> None:
    no_workload = ts.InstanceMsg(trace_id="a" * 32, span_id="b" * 16, span_name="/",
                                 start_time=stamp(T0_US), end_time=stamp(T0_US))
    with pytest.raises(server.MappingError, match="no destination workload name"):
        server.span_from_tracespan(no_workload)
    no_workload.destination_name = "cart"
    no_workload.span_tags["destination.workload.namespace"].int64_value = 3
    with pytest.raises(server.MappingError, match="is int64_value, expected string_value"):
        server.span_from_tracespan(no_workload)
    del no_workload.span_tags["destination.workload.namespace"]
    no_workload.ClearField("end_time")
    with pytest.raises(server.MappingError, match="no end_time"):
        server.span_from_tracespan(no_workload)
    not_a_duration = metric_pb2.InstanceMsg(name=METRIC_INSTANCE, value=value(int64_value=3))
    with pytest.raises(server.MappingError, match="must be a duration"):
        server.span_from_metric(not_a_duration)


def test_generated_code_has_istios_names_and_field_numbers() -> None:
    def numbers(message: Any) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}

    for module, service, method, request in (
            (ts, "tracespan.HandleTraceSpanService", "HandleTraceSpan",
             "tracespan.HandleTraceSpanRequest"),
            (metric_pb2, "metric.HandleMetricService", "HandleMetric",
             "metric.HandleMetricRequest")):
        descriptor = module.DESCRIPTOR.services_by_name[service.split(".")[1]]
        assert descriptor.full_name == service
        rpc = descriptor.methods_by_name[method]
        assert rpc.input_type.full_name == request
        assert rpc.output_type.full_name == "istio.mixer.adapter.model.v1beta1.ReportResult"
        assert numbers(rpc.input_type._concrete_class) == {
            "instances": 1, "adapter_config": 2, "dedup_id": 3}
    assert numbers(ts.InstanceMsg) == {
        "name": 72295727, "trace_id": 1, "span_id": 2, "parent_span_id": 3, "span_name": 4,
        "start_time": 5, "end_time": 6, "span_tags": 7, "httpStatusCode": 8, "client_span": 9,
        "rewrite_client_span_id": 10, "source_name": 11, "source_ip": 12,
        "destination_name": 13, "destination_ip": 14, "request_size": 15,
        "request_total_size": 16, "response_size": 17, "response_total_size": 18,
        "api_protocol": 19}
    assert numbers(metric_pb2.InstanceMsg) == {
        "name": 72295727, "value": 1, "dimensions": 2, "monitored_resource_type": 3,
        "monitored_resource_dimensions": 4}
    assert numbers(policy_pb2.Value) == {
        "string_value": 1, "int64_value": 2, "double_value": 3, "bool_value": 4,
        "ip_address_value": 5, "timestamp_value": 6, "duration_value": 7,
        "email_address_value": 8, "dns_name_value": 9, "uri_value": 10}
    assert policy_pb2.Value.DESCRIPTOR.full_name == "istio.policy.v1beta1.Value"
    assert ts.InstanceMsg.DESCRIPTOR.fields_by_name["start_time"].message_type.full_name == \
        "istio.policy.v1beta1.TimeStamp"

    # Round trip, and bytes written by hand the way Mixer's Go code writes them.
    message = ts.InstanceMsg(name="x.instance.ns", trace_id="abc", httpStatusCode=404,
                             start_time=stamp(T0_US), span_tags={"k": value(bool_value=True)})
    assert ts.InstanceMsg.FromString(message.SerializeToString()) == message
    name_key = bytes([0xFA, 0xD2, 0xE4, 0x93, 0x02])  # varint of 72295727 << 3 | 2
    wire = name_key + b"\x01n" + b"\x0a\x03abc" + b"\x40\x94\x03"  # name, trace_id, 404
    parsed = ts.InstanceMsg.FromString(wire)
    assert (parsed.name, parsed.trace_id, parsed.httpStatusCode) == ("n", "abc", 404)
    # An older Istio revision's `bool force_sample = 11` is skipped, not an error.
    assert ts.InstanceMsg.FromString(wire + b"\x58\x01").source_name == ""


def test_code_is_generated_again_when_a_proto_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    protos = tmp_path / "proto"
    shutil.copytree(generated.PROTO_DIR, protos)
    monkeypatch.setattr(generated, "PROTO_DIR", protos)
    assert generated.source_hash() == generated.GENERATED_DIR.name  # same files, same key
    report = protos / "mixer_report.proto"
    report.write_text(report.read_text() + "\n// changed\n")
    key = generated.source_hash()
    assert key != generated.GENERATED_DIR.name
    target = generated.generate(tmp_path / "cache" / key)
    assert sorted(p.name for p in target.glob("*_pb2*.py")) == sorted(
        p.name for p in generated.GENERATED_DIR.glob("*_pb2*.py"))
    assert generated.generate(target) == target  # a finished generation is reused
    assert [p.name for p in target.parent.iterdir()] == [key]  # no work directory left


def test_manifest_wires_instances_the_mapping_reads_to_the_adapter() -> None:
    documents = list(yaml.safe_load_all(MANIFEST.read_text()))
    by_kind: dict[str, dict[str, Any]] = {}
    for document in documents:
        assert document["apiVersion"] == "config.istio.io/v1alpha2"
        by_kind.setdefault(document["kind"], {})[document["metadata"]["name"]] = document
    assert set(by_kind) == {"adapter", "handler", "instance", "rule"}
    (adapter,) = by_kind["adapter"].values()
    assert adapter["spec"]["session_based"] is False
    assert sorted(adapter["spec"]["templates"]) == ["metric", "tracespan"]
    (handler,) = by_kind["handler"].values()
    assert handler["spec"]["adapter"] == adapter["metadata"]["name"]
    assert handler["spec"]["connection"]["address"] == "clover-adapter.clover.svc:9091"

    instances = by_kind["instance"]
    used = set()
    for rule in by_kind["rule"].values():
        for action in rule["spec"]["actions"]:
            assert action["handler"].split(".")[0] in by_kind["handler"]
            for name in action["instances"]:
                assert name.split(".")[0] in instances, name
                used.add(name.split(".")[0])
    assert used == set(instances)

    templates = {i["spec"]["template"]: i for i in instances.values()}
    assert set(templates) == {"tracespan", "metric"}
    assert set(server.SPAN_TAGS) <= set(templates["tracespan"]["spec"]["params"]["spanTags"])
    assert templates["metric"]["metadata"]["name"] == server.METRIC_INSTANCE
    assert set(templates["metric"]["spec"]["params"]["dimensions"]) == \
        set(server.METRIC_DIMENSIONS)
