"""`clover collect flows`: the TCP lifecycle collector and, on chosen interfaces, the packet
counter, their records attributed to Kubernetes workloads and published to ``clover.flows``,
with Prometheus metrics about the collector itself; with ``http``, the HTTP/1.x exchanges the
packet counter reads become server spans on ``clover.spans``.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from clover.config import Settings
from clover.heap import freeze_startup_objects
from clover.kafka import admin_client
from clover.metrics_endpoint import serve_metrics
from clover.records import SpanRecord
from clover.stack.install import kernel_headers_dir
from clover.topics import FLOWS, SPANS
from collectors.environment import bpf_environment
from collectors.packets import HttpExchange, PacketCounter
from collectors.publish import Publisher, PublisherMetrics
from collectors.signals import stop_on_signals
from collectors.tcp_flows import Attribute, TcpFlowCollector, unattributed

log = logging.getLogger(__name__)

DRAIN_S = 0.1  # how often closed connections are read from the ring buffer


class FlowMetrics:
    """The collector's own Prometheus metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter("clover_collector_events", "Kernel events seen",
                              ["collector"], registry=registry)
        self.lost = Counter("clover_collector_events_lost",
                            "Kernel events lost (ring buffer or map full)",
                            ["collector", "reason"], registry=registry)
        self.map_entries = Gauge("clover_collector_map_entries", "Entries in the BPF maps",
                                 ["collector"], registry=registry)
        self.interface_packets = Counter(
            "clover_interface_packets", "Packets seen by the packet counter",
            ["interface", "direction", "protocol"], registry=registry)
        self.interface_bytes = Counter(
            "clover_interface_bytes", "Bytes (L2 frame length) seen by the packet counter",
            ["interface", "direction", "protocol"], registry=registry)


@dataclass
class CollectSummary:
    published: int
    delivery_errors: int
    undelivered: int
    lost: int
    http_spans: int = 0


def collect_flows(settings: Settings, *, interfaces: list[str] | None = None,
                  netns: str | None = None, duration_s: float | None = None,
                  stop: threading.Event | None = None, ready: threading.Event | None = None,
                  registry: CollectorRegistry | None = None,
                  http: bool = False) -> CollectSummary:
    """Run until ``duration_s`` has passed, ``stop`` is set, or SIGTERM/SIGINT arrives.

    ``interfaces`` (in network namespace ``netns``, an ``ip netns`` name, if given) get the
    packet counter, which with ``http`` also reads HTTP exchanges; ``ready`` is set once the
    programs are attached.
    """
    config = settings.collectors
    headers = kernel_headers_dir(settings.stack.cache_dir)
    bpf_environment(headers)  # clear errors before anything else starts
    admin_client(settings)  # Kafka reachable, or a clear error
    stop = stop or threading.Event()
    registry = registry or CollectorRegistry()
    metrics = FlowMetrics(registry)
    serve_metrics(config.metrics_port, "collectors.metrics_port", registry=registry)
    publisher_metrics = PublisherMetrics(registry, "flow-collector")
    publisher = Publisher(settings, FLOWS, publisher_metrics)
    spans = Publisher(settings, SPANS, publisher_metrics) if http and interfaces else None
    attribution = _attribution(settings)
    attribute = attribution.endpoint if attribution is not None else unattributed
    restore = stop_on_signals(stop)
    tcp = TcpFlowCollector(snapshot_interval_s=config.flow_update_interval_s,
                           max_connections=config.max_connections, attribute=attribute,
                           headers_dir=headers)
    packets = PacketCounter(interfaces, max_entries=config.max_flow_entries,
                            headers_dir=str(headers), netns=netns,
                            http=spans is not None) if interfaces else None
    lost_seen = {"ring_buffer_full": 0, "table_full": 0, "dropped_updates": 0, "http": 0}
    try:
        tcp.start()
        if packets is not None:
            packets.start()
        freeze_startup_objects()
        log.info("collecting flows%s", f" and packets on {', '.join(interfaces or [])}"
                 if packets else "")
        if ready is not None:
            ready.set()
        deadline = time.monotonic() + duration_s if duration_s else None
        next_update = time.monotonic() + config.flow_update_interval_s
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            # Drain every DRAIN_S: the ring buffer (4 MiB, ~29k events) covers ~290k closed
            # connections/s at this pace; overflow is counted, not silent.
            stop.wait(DRAIN_S)
            metrics.events.labels("tcp").inc(tcp.poll(publisher.publish_encoded))
            if spans is not None and packets is not None:
                _publish_http(packets, spans, metrics, attribute)
            if time.monotonic() >= next_update:
                next_update += config.flow_update_interval_s
                _periodic(tcp, packets, publisher, metrics, attribute, lost_seen)
            publisher.poll()
        # Whatever is still in the kernel when we stop is published too.
        tcp.poll(publisher.publish_encoded)
        if spans is not None and packets is not None:
            _publish_http(packets, spans, metrics, attribute)
        _periodic(tcp, packets, publisher, metrics, attribute, lost_seen)
    finally:
        restore()
        if packets is not None:
            packets.close()
        tcp.close()
        if attribution is not None:
            attribution.stop()
        undelivered = publisher.close() + (spans.close() if spans is not None else 0)
        http_spans, span_errors = (spans.published, spans.delivery_errors) if spans else (0, 0)
    return CollectSummary(publisher.published, publisher.delivery_errors + span_errors,
                          undelivered, sum(lost_seen.values()), http_spans)


def _publish_http(packets: PacketCounter, spans: Publisher, metrics: FlowMetrics,
                  attribute: Attribute) -> None:
    exchanges = packets.exchanges()
    metrics.events.labels("http").inc(len(exchanges))
    for exchange in exchanges:
        spans.publish(http_span(exchange, attribute))
    spans.poll()


def http_span(exchange: HttpExchange, attribute: Attribute) -> SpanRecord:
    """The server span of one exchange, attributed at both ends. It belongs to no trace (plain
    HTTP carries no trace context we read), so its ids are random. A server that is no known
    pod is named by its address and port: unknown, not guessed."""
    server, client = attribute(*exchange.server), attribute(*exchange.client)
    return SpanRecord(
        trace_id=secrets.token_hex(16), span_id=secrets.token_hex(8),
        service=server.service or f"{exchange.server[0]}:{exchange.server[1]}",
        operation=f"{exchange.method} {exchange.path}", kind="server",
        start_us=exchange.start_us, duration_us=exchange.duration_us,
        error=exchange.status >= 500, source="other", namespace=server.namespace,
        pod=server.pod, revision=server.revision, status_code=exchange.status,
        peer_namespace=client.namespace, peer_service=client.service)


def _periodic(tcp: TcpFlowCollector, packets: PacketCounter | None, publisher: Publisher,
              metrics: FlowMetrics, attribute: Attribute, lost_seen: dict[str, int]) -> None:
    """Updates of long-lived connections, a drain of the packet counters, and the gauges."""
    tcp.snapshots(publisher.publish_encoded)
    loss = tcp.loss()
    for reason in ("ring_buffer_full", "table_full"):
        new = getattr(loss, reason) - lost_seen[reason]
        if new:
            metrics.lost.labels("tcp", reason).inc(new)
            lost_seen[reason] += new
    metrics.map_entries.labels("tcp").set(tcp.live_connections())
    if packets is None:
        return
    http_lost = packets.http_lost()
    if http_lost > lost_seen["http"]:
        metrics.lost.labels("http", "ring_buffer_full").inc(http_lost - lost_seen["http"])
        lost_seen["http"] = http_lost
    drain = packets.drain()
    metrics.events.labels("tc").inc(drain.entries)
    metrics.map_entries.labels("tc").set(drain.entries)
    if drain.dropped_updates:
        metrics.lost.labels("tc", "map_full").inc(drain.dropped_updates)
        lost_seen["dropped_updates"] += drain.dropped_updates
    for record in drain.flows:
        record.src = attribute(record.src.addr, record.src.port)
        record.dst = attribute(record.dst.addr, record.dst.port)
        publisher.publish(record)
    for interface, counters in drain.interfaces.items():
        for direction, by_protocol in (("rx", counters.rx), ("tx", counters.tx)):
            for protocol, counts in by_protocol.items():
                metrics.interface_packets.labels(interface, direction, protocol).inc(
                    counts.packets)
                metrics.interface_bytes.labels(interface, direction, protocol).inc(counts.bytes)


def _attribution(settings: Settings) -> Any:
    """A started PodIndex on the pipeline's identity, or None when there is no API server."""
    from kubernetes import config as kube_config

    from k8s.metadata import PodIndex

    namespaces = list(settings.collectors.attribution_namespaces) or [
        settings.kubernetes.namespace]
    try:
        if settings.kubeconfig == "in-cluster":
            kube_config.load_incluster_config()
            from kubernetes.client import ApiClient

            api = ApiClient()
        else:
            if not Path(settings.kubeconfig).exists():
                raise FileNotFoundError(settings.kubeconfig)
            api = kube_config.new_client_from_config(config_file=settings.kubeconfig)
    except Exception as exc:  # attribution is optional: flows stay unattributed, and we say so
        log.warning("no Kubernetes attribution (%s); flows are published unattributed", exc)
        return None
    index = PodIndex(api, None if namespaces == ["*"] else namespaces)
    index.start()
    if not index.wait_synced(10):
        log.warning("the pod index is not synced yet; early flows may be unattributed")
    return index
