"""The Zipkin v2 JSON receiver against a real HTTP client and real Kafka: each span mapped field
for field, invalid ones dead-lettered with their JSON, malformed bodies refused whole."""

from __future__ import annotations

import base64
import gzip
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from clover import records
from clover.records import DeadLetter, SpanRecord
from clover.topics import DEADLETTER, SPANS
from collectors.ingest import SpanSink
from collectors.zipkin import ZipkinReceiver

T0_US = 1_717_200_000_000_000  # 2024-06-01T00:00:00Z


def post(port: int, body: bytes | Any, *, path: str = "/api/v2/spans",
         content_type: str = "application/json",
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST ``body`` (JSON-encoded unless bytes); returns (status, parsed JSON answer or None)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST",
                                     headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, answer = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, answer = error.code, error.read()
    try:
        return status, json.loads(answer)
    except ValueError:
        return status, None


def hex_id(digits: int) -> str:
    return os.urandom(digits // 2).hex()


@pytest.fixture
def port(sink: SpanSink) -> Iterator[int]:
    receiver = ZipkinReceiver(sink)
    port = receiver.start()
    yield port
    receiver.stop()


def counter(sink: SpanSink, name: str, **labels: str) -> float:
    return sink.registry.get_sample_value(name, {"receiver": "zipkin", **labels}) or 0.0


def test_spans_are_mapped_published_and_dead_lettered(
        sink: SpanSink, port: int, topic_reader: Any) -> None:
    spans_reader, dead_reader = topic_reader(SPANS.name), topic_reader(DEADLETTER.name)
    trace = hex_id(32)
    server_id, client_id, ratings_id = hex_id(16), hex_id(16), hex_id(16)
    spans: list[dict[str, Any]] = [
        {   # Envoy's inbound span, ids in upper case
            "traceId": trace.upper(), "id": server_id.upper(),
            "name": "productpage.bookinfo:9080/*", "kind": "SERVER",
            "timestamp": T0_US, "duration": 18_400,
            "localEndpoint": {"serviceName": "productpage.bookinfo", "ipv4": "10.244.1.7"},
            "tags": {"http.status_code": "200", "request_size": "120", "response_size": "4096",
                     "upstream_cluster": "inbound|9080||", "k8s.pod.name": "productpage-v1-x"}},
        {   # its outbound call, named by the remote endpoint, answered 503
            "traceId": trace, "id": client_id, "parentId": server_id, "name": "GET /reviews",
            "kind": "CLIENT", "timestamp": T0_US + 1_000, "duration": 7_250,
            "localEndpoint": {"serviceName": "productpage.bookinfo"},
            "remoteEndpoint": {"serviceName": "reviews.bookinfo", "ipv4": "10.96.3.4",
                               "port": 9080},
            "tags": {"http.status_code": "503", "request_size": "300", "response_size": "19"}},
        {   # no kind, an error tag, the callee only in Envoy's upstream_cluster; a tracer's
            # service name without a namespace, the k8s attributes as tags
            "traceId": trace, "id": ratings_id, "parentId": client_id, "name": "ratings",
            "timestamp": T0_US + 2_000, "duration": 1_500,
            "localEndpoint": {"serviceName": "reviews"},
            "tags": {"error": "upstream reset", "http.status_code": "not a number",
                     "upstream_cluster": "outbound|9080||ratings.bookinfo.svc.cluster.local",
                     "k8s.namespace.name": "bookinfo", "k8s.deployment.name": "reviews-v2",
                     "k8s.replicaset.name": "reviews-v2-7bf8c9648f"}},
        {"traceId": trace, "id": "xyz", "name": "bad id", "kind": "SERVER",
         "timestamp": T0_US, "duration": 1, "localEndpoint": {"serviceName": "details"}},
        {"traceId": trace, "id": hex_id(16), "name": "backwards", "kind": "SERVER",
         "timestamp": T0_US, "duration": -5, "localEndpoint": {"serviceName": "details"}},
        {"traceId": trace, "id": hex_id(16), "name": "nowhere", "kind": "SERVER",
         "timestamp": T0_US, "duration": 5},
    ]

    status, answer = post(port, spans)

    assert status == 202
    assert answer["accepted"] == 3
    assert [r["index"] for r in answer["rejected"]] == [3, 4, 5]
    reasons = [r["reason"] for r in answer["rejected"]]
    assert reasons[0].startswith("SpanRecord.span_id: ") and "(rule: pattern)" in reasons[0]
    assert reasons[1].startswith("SpanRecord.duration_us: ")
    assert reasons[2] == "span has no localEndpoint.serviceName"
    assert sink.flush() == 0

    bookinfo: dict[str, Any] = {"namespace": "bookinfo", "source": "zipkin"}
    expected = [
        SpanRecord(trace_id=trace, span_id=server_id, service="productpage",
                   pod="productpage-v1-x", operation="productpage.bookinfo:9080/*",
                   kind="server", start_us=T0_US, duration_us=18_400, status_code=200,
                   error=False, bytes_sent=4096, bytes_received=120, **bookinfo),
        SpanRecord(trace_id=trace, span_id=client_id, parent_span_id=server_id,
                   service="productpage", operation="GET /reviews", kind="client",
                   start_us=T0_US + 1_000, duration_us=7_250, status_code=503, error=True,
                   peer_service="reviews", peer_namespace="bookinfo", bytes_sent=300,
                   bytes_received=19, **bookinfo),
        SpanRecord(trace_id=trace, span_id=ratings_id, parent_span_id=client_id,
                   service="reviews", revision="7bf8c9648f", operation="ratings",
                   kind="unspecified", start_us=T0_US + 2_000, duration_us=1_500, error=True,
                   peer_service="ratings", peer_namespace="bookinfo", **bookinfo),
    ]
    published = [records.decode(SpanRecord, m.value()) for m in spans_reader.read_all()]
    assert {s.span_id: s for s in published if s.trace_id == trace} == \
        {s.span_id: s for s in expected}

    letters = [records.decode(DeadLetter, m.value()) for m in dead_reader.read_all()]
    mine = {}
    for letter in letters:
        original = base64.b64decode(letter.value_b64)
        if letter.source_topic == "receiver.zipkin" and trace.encode() in original:
            mine[json.loads(original)["name"]] = (letter, json.loads(original))
    assert set(mine) == {"bad id", "backwards", "nowhere"}
    for index, span in enumerate(spans[3:], start=3):
        letter, original = mine[span["name"]]
        assert original == span  # the span's JSON, as sent
        assert letter.reason == answer["rejected"][index - 3]["reason"]
        assert letter.component == "zipkin-receiver"
    assert mine["bad id"][0].key() == b"unknown/details"
    assert mine["nowhere"][0].key_b64 is None

    assert counter(sink, "clover_receiver_requests_total") == 1
    assert counter(sink, "clover_receiver_spans_accepted_total") == 3
    assert counter(sink, "clover_receiver_spans_rejected_total", reason="pattern") == 1
    assert counter(sink, "clover_receiver_spans_rejected_total", reason="minimum") == 1
    assert counter(sink, "clover_receiver_spans_rejected_total", reason="mapping") == 1


def test_a_gzipped_body_is_accepted(sink: SpanSink, port: int, topic_reader: Any) -> None:
    spans_reader = topic_reader(SPANS.name)
    trace = hex_id(16)  # a 64-bit trace id
    span = {"traceId": trace, "id": hex_id(16), "name": "get", "kind": "SERVER",
            "timestamp": T0_US, "duration": 10, "localEndpoint": {"serviceName": "cart"}}
    body = gzip.compress(json.dumps([span]).encode())
    status, answer = post(port, body, headers={"Content-Encoding": "gzip"},
                          content_type="application/json; charset=utf-8")
    assert (status, answer) == (202, {"accepted": 1, "rejected": []})
    assert sink.flush() == 0
    published = [records.decode(SpanRecord, m.value()) for m in spans_reader.read_all()]
    assert [(s.service, s.namespace, s.kind) for s in published if s.trace_id == trace] == [
        ("cart", None, "server")]


@pytest.mark.parametrize(("body", "message"), [
    (b"[{\"traceId\": ", "the body is not JSON"),
    (b"", "the body is not JSON"),
    ({"traceId": "a"}, "expected a JSON array of spans, got a JSON dict"),
    ([{"traceId": "4bf92f3577b34da6", "id": "00f067aa0ba902b7", "name": "ok", "timestamp": 1,
       "duration": 1, "localEndpoint": {"serviceName": "cart"}}, "not a span"],
     "span 1 is not a JSON object"),
])
def test_a_malformed_body_is_refused_whole(sink: SpanSink, port: int, body: Any,
                                          message: str) -> None:
    status, answer = post(port, body)
    assert status == 400
    assert answer["error"].startswith(message), answer
    assert sink.flush() == 0
    assert counter(sink, "clover_receiver_requests_total") == 1
    assert counter(sink, "clover_receiver_spans_accepted_total") == 0


def test_other_requests(sink: SpanSink, port: int) -> None:
    assert post(port, [], content_type="text/plain")[0] == 415
    assert post(port, [], content_type="application/x-protobuf")[0] == 415
    assert post(port, [], headers={"Content-Encoding": "br-unknown"})[0] == 415
    assert post(port, [], path="/api/v1/spans")[0] == 404
    assert post(port, []) == (202, {"accepted": 0, "rejected": []})
    assert counter(sink, "clover_receiver_requests_total") == 4


def test_a_body_too_large_after_decompression_is_refused(sink: SpanSink) -> None:
    receiver = ZipkinReceiver(sink, max_body=1000)
    port = receiver.start()
    try:
        body = gzip.compress(b"[" + b" " * 5000 + b"]")
        assert len(body) < 1000
        assert post(port, body, headers={"Content-Encoding": "gzip"})[0] == 413
    finally:
        receiver.stop()
