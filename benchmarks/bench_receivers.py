"""Span ingestion: spans/s per core of the receivers process (`clover receive spans`) for
batched OTLP/gRPC and Zipkin requests, against the same publisher producing ready-made records.
"""

from __future__ import annotations

import json
import time
import urllib.request
from statistics import median

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from benchmarks.common import CliProcess, Result, publisher_rate_per_core
from clover.ports import free_port
from clover.topics import SPANS
from tests import samples

BATCH = 1000  # spans per request, as an OpenTelemetry collector's batch processor sends
REQUESTS = 40  # per round
ROUNDS = 3  # the median round is reported: the machine's other load makes single runs noisy


def _otlp_request(batch: int, seed: int) -> bytes:
    def attr(key: str, value: str | int) -> common_pb2.KeyValue:
        any_value = (common_pb2.AnyValue(int_value=value) if isinstance(value, int)
                     else common_pb2.AnyValue(string_value=value))
        return common_pb2.KeyValue(key=key, value=any_value)

    spans = []
    for i in range(batch):
        start = 1_717_200_000_000_000_000 + (seed * batch + i) * 1_000_000
        spans.append(trace_pb2.Span(
            trace_id=(seed * batch + i + 1).to_bytes(16, "big"),
            span_id=(i + 1).to_bytes(8, "big"), name="GET /cart",
            kind=trace_pb2.Span.SPAN_KIND_SERVER, start_time_unix_nano=start,
            end_time_unix_nano=start + 12_000_000,
            attributes=[attr("http.response.status_code", 200)]))
    resource = resource_pb2.Resource(attributes=[
        attr("service.name", "cart"), attr("k8s.namespace.name", "shop"),
        attr("k8s.pod.name", "cart-5c4b7f9d8-q8wzt"), attr("k8s.deployment.name", "cart"),
        attr("k8s.replicaset.name", "cart-5c4b7f9d8")])
    request = trace_service_pb2.ExportTraceServiceRequest(resource_spans=[
        trace_pb2.ResourceSpans(resource=resource,
                                scope_spans=[trace_pb2.ScopeSpans(spans=spans)])])
    return bytes(request.SerializeToString())


def _zipkin_request(batch: int, seed: int) -> bytes:
    return json.dumps([{
        "traceId": f"{seed * batch + i + 1:032x}", "id": f"{i + 1:016x}", "name": "get /cart",
        "kind": "SERVER", "timestamp": 1_717_200_000_000_000 + (seed * batch + i) * 1000,
        "duration": 12_000, "localEndpoint": {"serviceName": "cart.shop"},
        "tags": {"http.status_code": "200"}} for i in range(batch)]).encode()


def _measure(receivers: CliProcess, send: object, bodies: list[bytes]) -> float:
    """Spans per CPU-second of the receivers process while it ingests ``bodies``, the median
    of ROUNDS rounds."""
    rates = []
    for _ in range(ROUNDS):
        before = receivers.cpu_seconds()
        for body in bodies:
            send(body)  # type: ignore[operator]
        time.sleep(0.5)  # the last produce calls
        rates.append(len(bodies) * BATCH / (receivers.cpu_seconds() - before))
    return median(rates)


def run() -> list[Result]:
    otlp_port, zipkin_port = free_port(), free_port()
    receivers = CliProcess(["receive", "spans"], {
        "CLOVER_RECEIVERS_MIXER_PORT": "0", "CLOVER_RECEIVERS_OTLP_PORT": str(otlp_port),
        "CLOVER_RECEIVERS_ZIPKIN_PORT": str(zipkin_port), "CLOVER_RECEIVERS_METRICS_PORT": "0",
        "CLOVER_RECEIVERS_LISTEN_HOST": "127.0.0.1"}, ready="receiver listening", ready_count=2)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{otlp_port}")
        export = trace_service_pb2_grpc.TraceServiceStub(channel).Export

        def send_otlp(body: bytes) -> None:
            response = export(trace_service_pb2.ExportTraceServiceRequest.FromString(body),
                              timeout=30)
            assert response.partial_success.rejected_spans == 0

        def send_zipkin(body: bytes) -> None:
            request = urllib.request.Request(f"http://127.0.0.1:{zipkin_port}/api/v2/spans",
                                             data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as response:
                assert response.status == 202

        otlp = _measure(receivers, send_otlp, [_otlp_request(BATCH, s) for s in range(REQUESTS)])
        zipkin = _measure(receivers, send_zipkin,
                          [_zipkin_request(BATCH, s) for s in range(REQUESTS)])
        channel.close()
    finally:
        receivers.stop()
    baseline = publisher_rate_per_core(SPANS, samples.sample_span())
    label = "the same publisher producing ready-made span records"
    return [Result(f"OTLP/gRPC spans ingested per core ({BATCH}/request)", otlp, baseline, label),
            Result(f"Zipkin spans ingested per core ({BATCH}/request)", zipkin, baseline, label)]
