"""`clover receive spans` as a process: the three receivers on their ports, one span sink, the
metrics endpoint, and a clean stop on SIGTERM (everything delivered first)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from clover import records
from clover.ports import free_port
from clover.records import SpanRecord
from clover.topics import SPANS


def test_receive_spans_command_serves_all_receivers_and_stops_cleanly(
        live_stack: Any, kafka_topics: Any, topic_reader: Any) -> None:
    ports = {name: free_port() for name in ("mixer", "otlp", "zipkin", "metrics")}
    env = {**os.environ, "CLOVER_RECEIVERS_LISTEN_HOST": "127.0.0.1",
           **{f"CLOVER_RECEIVERS_{name.upper()}_PORT": str(port) for name, port in ports.items()}}
    reader = topic_reader(SPANS.name)
    proc = subprocess.Popen([sys.executable, "-m", "clover.cli", "receive", "spans"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stderr is not None
        listening: list[str] = []
        for line in proc.stderr:  # until all three say they listen (or the process ends)
            if "receiver listening" in line:
                listening.append(line)
                if len(listening) == 3:
                    break
        assert len(listening) == 3, listening

        # OTLP: one span.
        resource = resource_pb2.Resource(attributes=[common_pb2.KeyValue(
            key="service.name", value=common_pb2.AnyValue(string_value="cart"))])
        span = trace_pb2.Span(trace_id=bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736"),
                              span_id=bytes.fromhex("00f067aa0ba902b7"), name="GET /cart",
                              kind=trace_pb2.Span.SPAN_KIND_SERVER,
                              start_time_unix_nano=1_717_200_000_000_000_000,
                              end_time_unix_nano=1_717_200_000_012_000_000)
        with grpc.insecure_channel(f"127.0.0.1:{ports['otlp']}") as channel:
            trace_service_pb2_grpc.TraceServiceStub(channel).Export(
                trace_service_pb2.ExportTraceServiceRequest(resource_spans=[
                    trace_pb2.ResourceSpans(resource=resource,
                                            scope_spans=[trace_pb2.ScopeSpans(spans=[span])])]),
                timeout=30)
        # Zipkin: one span.
        body = json.dumps([{"traceId": "5b8aa5a2d2c872e8321cf37308d69df2",
                            "id": "051581bf3cb55c13", "name": "get /", "kind": "SERVER",
                            "timestamp": 1_717_200_000_000_000, "duration": 3000,
                            "localEndpoint": {"serviceName": "frontend.shop"}}]).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{ports['zipkin']}/api/v2/spans",
                                         data=body, headers={"Content-Type": "application/json"})
        assert urllib.request.urlopen(request, timeout=30).status == 202
        # The Mixer adapter answers on its port (an empty report is valid and publishes nothing).
        from collectors.mixer.generated import tracespan_pb2, tracespan_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{ports['mixer']}") as channel:
            tracespan_pb2_grpc.HandleTraceSpanServiceStub(channel).HandleTraceSpan(
                tracespan_pb2.HandleTraceSpanRequest(), timeout=30)

        scrape = urllib.request.urlopen(
            f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=10).read().decode()
        for receiver in ("otlp", "zipkin", "mixer"):
            assert f'clover_receiver_requests_total{{receiver="{receiver}"}} 1.0' in scrape
        assert 'clover_receiver_spans_accepted_total{receiver="otlp"} 1.0' in scrape
        assert 'clover_receiver_spans_accepted_total{receiver="zipkin"} 1.0' in scrape
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err

    spans = sorted((records.decode(SpanRecord, m.value()) for m in reader.read(2)),
                   key=lambda s: s.service)
    assert [(s.service, s.namespace, s.source, s.duration_us) for s in spans] == [
        ("cart", None, "otlp", 12_000), ("frontend", "shop", "zipkin", 3000)]
