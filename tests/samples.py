"""Realistic, valid sample records, one builder per record type.

Shared by the unit tests and by integration tests that round-trip records
through Kafka. Each call returns a fresh record, safe to modify.
"""

from __future__ import annotations

import base64

from clover.records import (
    Anomaly,
    Contribution,
    DeadLetter,
    Endpoint,
    FlowRecord,
    RollbackDecision,
    ServiceMetrics,
    SpanRecord,
)

T0_US = 1_717_200_000_000_000  # 2024-06-01T00:00:00Z


def sample_flow() -> FlowRecord:
    """A closed TCP connection from the frontend to the cart service."""
    return FlowRecord(
        observer="tcp_lifecycle",
        node="worker-1",
        interface=None,
        observed_at="src",
        protocol="tcp",
        ip_version=4,
        src=Endpoint(
            addr="10.244.1.17",
            port=48122,
            namespace="shop",
            service="frontend",
            pod="frontend-7d9f8b6c5d-x2kqj",
            revision="7d9f8b6c5d",
        ),
        dst=Endpoint(
            addr="10.244.2.9",
            port=8080,
            namespace="shop",
            service="cart",
            pod="cart-5c4b7f9d8-q8wzt",
            revision="5c4b7f9d8",
        ),
        pid=31337,
        comm="node",
        cgroup_id=8812,
        netns_ino=4026532591,
        bytes_sent=1843,
        bytes_received=20417,
        packets_sent=12,
        packets_received=19,
        start_us=T0_US,
        end_us=T0_US + 35_120,
        duration_us=35_120,
        srtt_us=412,
        state="closed",
    )


def sample_tc_flow() -> FlowRecord:
    """A tc counter drain for UDP DNS traffic over IPv6, owner unknown."""
    return FlowRecord(
        observer="tc_counter",
        node="worker-2",
        interface="eth0",
        protocol="udp",
        ip_version=6,
        src=Endpoint(addr="fd00:10:244::1a", port=53211),
        dst=Endpoint(
            addr="fd00:10:96::a", port=53, namespace="kube-system", service="coredns"
        ),
        bytes_sent=640,
        bytes_received=0,
        packets_sent=8,
        packets_received=0,
        start_us=T0_US,
        end_us=T0_US + 10_000_000,
        duration_us=10_000_000,
        state="counter",
    )


def sample_span() -> SpanRecord:
    """A server span on the cart service, child of a frontend span."""
    return SpanRecord(
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        span_id="00f067aa0ba902b7",
        parent_span_id="a2fb4a1d1a96d312",
        namespace="shop",
        service="cart",
        pod="cart-5c4b7f9d8-q8wzt",
        revision="5c4b7f9d8",
        operation="GET /cart/{id}",
        kind="server",
        start_us=T0_US + 1_200,
        duration_us=18_400,
        status_code=200,
        error=False,
        peer_namespace="shop",
        peer_service="frontend",
        bytes_sent=20417,
        bytes_received=1843,
        source="otlp",
    )


def sample_service_metrics() -> ServiceMetrics:
    """A 10-second service-level aggregate for one cart revision."""
    return ServiceMetrics(
        namespace="shop",
        service="cart",
        revision="5c4b7f9d8",
        window_start_us=T0_US,
        window_seconds=10,
        requests=1520,
        errors=12,
        error_rate=12 / 1520,
        latency_p50_ms=11.5,
        latency_p90_ms=24.0,
        latency_p99_ms=61.25,
        latency_max_ms=143.0,
        latency_sketch=base64.b64encode(b"\x0a\x04\x08\x01\x10\x02").decode(),
        call_patterns={"hipstershop.CartService/GetCart+redis.get": 1400, "redis.get": 119,
                       "": 1},
        bytes_in=2_801_664,
        bytes_out=31_033_840,
        flows=311,
        connections_opened=42,
        connections_closed=40,
        connections_reset=1,
    )


def sample_edge_metrics() -> ServiceMetrics:
    """A caller -> callee edge aggregate (frontend -> cart) with no traffic."""
    return ServiceMetrics(
        namespace="shop",
        service="frontend",
        revision="unknown",
        peer_namespace="shop",
        peer_service="cart",
        window_start_us=T0_US,
        window_seconds=10,
        requests=0,
        errors=0,
        bytes_in=0,
        bytes_out=0,
        flows=0,
        connections_opened=0,
        connections_closed=0,
        connections_reset=0,
    )


def sample_anomaly() -> Anomaly:
    """An anomalous verdict driven by p99 latency and error rate."""
    return Anomaly(
        namespace="shop",
        service="cart",
        revision="5c4b7f9d8",
        window_start_us=T0_US,
        window_seconds=10,
        detector="isolation_forest@2024-05-01",
        score=0.91,
        threshold=0.75,
        verdict="anomalous",
        reason="p99 latency 4.1x baseline",
        contributions=[
            Contribution(
                feature="latency_p99_ms", value=61.25, baseline=14.9, weight=0.62
            ),
            Contribution(
                feature="error_rate", value=0.0079, baseline=0.001, weight=0.27
            ),
        ],
        emitted_us=T0_US + 10_450_000,
    )


def sample_rollback() -> RollbackDecision:
    """A rollback of the cart Deployment from revision 8 to 7."""
    return RollbackDecision(
        namespace="shop",
        service="cart",
        deployment="cart",
        decided_us=T0_US + 31_000_000,
        action="rollback",
        reason="anomalous",
        message="cart was anomalous for 3 consecutive windows after rollout 8; rolled back to 7",
        from_revision=8,
        to_revision=7,
        consecutive_anomalous=3,
        score=0.91,
        threshold=0.75,
        anomaly_window_start_us=T0_US + 20_000_000,
        patched_us=T0_US + 31_250_000,
        dry_run=False,
    )


def sample_deadletter() -> DeadLetter:
    """A span the aggregator rejected, keyed like the service it was about."""
    return DeadLetter.wrap(
        source_topic="clover.spans",
        partition=3,
        offset=884_112,
        key=b"shop/cart",
        value=b'{"trace_id":"xyz","schema_version":1}',
        reason="SpanRecord.trace_id: 'xyz' does not match the pattern (rule: pattern)",
        component="streams.aggregator",
        at_us=T0_US + 5_000_000,
    )


SAMPLES = {
    "flow": sample_flow,
    "tc_flow": sample_tc_flow,
    "span": sample_span,
    "service_metrics": sample_service_metrics,
    "edge_metrics": sample_edge_metrics,
    "anomaly": sample_anomaly,
    "rollback": sample_rollback,
    "deadletter": sample_deadletter,
}
"""Every sample builder by name, for parametrised tests."""
