"""Spans as a mesh sidecar reports them, in the three protocols Clover receives: OTLP/gRPC,
Zipkin v2 JSON and the Istio Mixer ``tracespan`` template. Each exporter takes the demo's own
:class:`Span` records plus the pod's Kubernetes identity, and sends one batch per call
(blocking; the service calls it from a worker thread).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc


@dataclass(frozen=True)
class Identity:
    """Who reports: what Istio's sidecar knows from the pod's metadata."""

    namespace: str
    deployment: str
    pod: str
    revision: str  # the pod-template-hash label

    @property
    def replica_set(self) -> str:
        return f"{self.deployment}-{self.revision}"


@dataclass(frozen=True)
class Span:
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_id: str | None
    name: str
    kind: str  # "server" or "client"
    start_ns: int
    end_ns: int
    status_code: int | None
    error: bool
    peer: str | None  # the other side's service: the caller of a server span, the callee of a
    #                   client span (same namespace)
    request_bytes: int = 0
    response_bytes: int = 0


class Exporter(Protocol):
    def export(self, spans: Sequence[Span]) -> None: ...

    def close(self) -> None: ...


class OtlpExporter:
    """OTLP/gRPC ``TraceService/Export``, with the ``k8s.*`` resource attributes Istio 1.5+
    sidecars (and the OpenTelemetry Collector's k8sattributes processor) add."""

    def __init__(self, identity: Identity, address: str) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import (
            TraceServiceStub,
        )

        self.identity = identity
        self.channel = grpc.insecure_channel(address)
        self.stub = TraceServiceStub(self.channel)

    def export(self, spans: Sequence[Span]) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )
        from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
        from opentelemetry.proto.resource.v1.resource_pb2 import Resource
        from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Status
        from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan

        def attr(key: str, value: str | int) -> KeyValue:
            any_value = AnyValue(int_value=value) if isinstance(value, int) \
                else AnyValue(string_value=value)
            return KeyValue(key=key, value=any_value)

        me = self.identity
        resource = Resource(attributes=[
            attr("service.name", me.deployment), attr("k8s.deployment.name", me.deployment),
            attr("k8s.namespace.name", me.namespace), attr("k8s.pod.name", me.pod),
            attr("k8s.replicaset.name", me.replica_set)])
        converted = []
        for span in spans:
            attributes = [attr("http.request.body.size", span.request_bytes),
                          attr("http.response.body.size", span.response_bytes)]
            if span.status_code is not None:
                attributes.append(attr("http.response.status_code", span.status_code))
            if span.kind == "client" and span.peer:
                attributes.append(attr("server.address",
                                       f"{span.peer}.{me.namespace}.svc.cluster.local"))
            converted.append(OtlpSpan(
                trace_id=bytes.fromhex(span.trace_id), span_id=bytes.fromhex(span.span_id),
                parent_span_id=bytes.fromhex(span.parent_id) if span.parent_id else b"",
                name=span.name,
                kind=OtlpSpan.SPAN_KIND_SERVER if span.kind == "server"
                else OtlpSpan.SPAN_KIND_CLIENT,
                start_time_unix_nano=span.start_ns, end_time_unix_nano=span.end_ns,
                attributes=attributes,
                status=Status(code=Status.STATUS_CODE_ERROR if span.error
                              else Status.STATUS_CODE_UNSET)))
        request = ExportTraceServiceRequest(resource_spans=[ResourceSpans(
            resource=resource, scope_spans=[ScopeSpans(spans=converted)])])
        self.stub.Export(request, timeout=10)

    def close(self) -> None:
        self.channel.close()


class ZipkinExporter:
    """Zipkin v2 JSON, as Envoy's Zipkin tracer sends it: the service named
    ``<workload>.<namespace>``, the pod and ReplicaSet as tags."""

    def __init__(self, identity: Identity, url: str) -> None:
        self.identity = identity
        self.url = url

    def export(self, spans: Sequence[Span]) -> None:
        me = self.identity
        body = []
        for span in spans:
            tags = {"k8s.pod.name": me.pod, "k8s.deployment.name": me.deployment,
                    "k8s.replicaset.name": me.replica_set,
                    "request_size": str(span.request_bytes),
                    "response_size": str(span.response_bytes)}
            if span.status_code is not None:
                tags["http.status_code"] = str(span.status_code)
            if span.error:
                tags["error"] = "true"
            item: dict[str, Any] = {
                "traceId": span.trace_id, "id": span.span_id, "name": span.name,
                "kind": span.kind.upper(), "timestamp": span.start_ns // 1000,
                "duration": max(1, (span.end_ns - span.start_ns) // 1000),
                "localEndpoint": {"serviceName": f"{me.deployment}.{me.namespace}"},
                "tags": tags}
            if span.parent_id:
                item["parentId"] = span.parent_id
            if span.kind == "client" and span.peer:
                item["remoteEndpoint"] = {"serviceName": f"{span.peer}.{me.namespace}"}
            body.append(item)
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.loads(response.read() or b"{}")
        if answer.get("rejected"):
            raise ValueError(f"the Zipkin receiver rejected spans: {answer['rejected']}")

    def close(self) -> None:
        pass


class MixerExporter:
    """Istio 1.0-1.4's Mixer calling Clover's out-of-process adapter with ``tracespan``
    instances (the span tags of k8s/manifests/istio-mixer-adapter.yaml)."""

    INSTANCE = "cloverspan.instance.istio-system"

    def __init__(self, identity: Identity, address: str) -> None:
        from collectors.mixer.generated import tracespan_pb2_grpc

        self.identity = identity
        self.channel = grpc.insecure_channel(address)
        self.stub = tracespan_pb2_grpc.HandleTraceSpanServiceStub(self.channel)

    def export(self, spans: Sequence[Span]) -> None:
        from google.protobuf.timestamp_pb2 import Timestamp

        from collectors.mixer.generated import policy_pb2, tracespan_pb2

        me = self.identity

        def text(value: str) -> Any:
            return policy_pb2.Value(string_value=value)

        def stamp(ns: int) -> Any:
            return policy_pb2.TimeStamp(value=Timestamp(seconds=ns // 1_000_000_000,
                                                        nanos=ns % 1_000_000_000))

        instances = []
        for span in spans:
            mine, theirs = ("source", "destination") if span.kind == "client" \
                else ("destination", "source")
            tags = {f"{mine}.workload.name": text(me.deployment),
                    f"{mine}.workload.namespace": text(me.namespace),
                    f"{mine}.name": text(me.pod),
                    f"{mine}.labels.pod-template-hash": text(me.revision)}
            if span.peer:
                tags[f"{theirs}.workload.name"] = text(span.peer)
                tags[f"{theirs}.workload.namespace"] = text(me.namespace)
            if span.error:
                tags["error"] = policy_pb2.Value(bool_value=True)
            instances.append(tracespan_pb2.InstanceMsg(
                name=self.INSTANCE, trace_id=span.trace_id, span_id=span.span_id,
                parent_span_id=span.parent_id or "", span_name=span.name,
                start_time=stamp(span.start_ns), end_time=stamp(span.end_ns),
                httpStatusCode=span.status_code or 0, client_span=span.kind == "client",
                request_total_size=span.request_bytes, response_total_size=span.response_bytes,
                api_protocol="http", span_tags=tags))
        self.stub.HandleTraceSpan(tracespan_pb2.HandleTraceSpanRequest(instances=instances),
                                  timeout=10)

    def close(self) -> None:
        self.channel.close()


def exporter_for(kind: str, identity: Identity, host: str, ports: dict[str, int]) -> Exporter:
    """The exporter of ``kind`` ("otlp", "zipkin", "mixer") to the receivers on ``host``."""
    if kind == "otlp":
        return OtlpExporter(identity, f"{host}:{ports['otlp']}")
    if kind == "zipkin":
        return ZipkinExporter(identity, f"http://{host}:{ports['zipkin']}/api/v2/spans")
    if kind == "mixer":
        return MixerExporter(identity, f"{host}:{ports['mixer']}")
    raise ValueError(f"unknown span exporter {kind!r}: expected otlp, zipkin or mixer")
