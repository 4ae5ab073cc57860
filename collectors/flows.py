"""`clover collect flows`: the TCP lifecycle collector and, on chosen interfaces, the packet
counter, their records attributed to Kubernetes workloads and published to ``clover.flows``,
with Prometheus metrics about the collector itself.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from clover.config import Settings
from clover.kafka import admin_client
from clover.stack.install import kernel_headers_dir
from clover.topics import FLOWS
from collectors.environment import bpf_environment
from collectors.heap import freeze_startup_objects
from collectors.packets import PacketCounter
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


def collect_flows(settings: Settings, *, interfaces: list[str] | None = None,
                  netns: str | None = None, duration_s: float | None = None,
                  stop: threading.Event | None = None, ready: threading.Event | None = None,
                  registry: CollectorRegistry | None = None) -> CollectSummary:
    """Run until ``duration_s`` has passed, ``stop`` is set, or SIGTERM/SIGINT arrives.

    ``interfaces`` (in network namespace ``netns``, an ``ip netns`` name, if given) get the
    packet counter; ``ready`` is set once the programs are attached.
    """
    config = settings.collectors
    headers = kernel_headers_dir(settings.stack.cache_dir)
    bpf_environment(headers)  # clear errors before anything else starts
    admin_client(settings)  # Kafka reachable, or a clear error
    stop = stop or threading.Event()
    registry = registry or CollectorRegistry()
    metrics = FlowMetrics(registry)
    if config.metrics_port:
        start_http_server(config.metrics_port, addr="0.0.0.0", registry=registry)
    publisher = Publisher(settings, FLOWS, PublisherMetrics(registry, "flow-collector"))
    attribution = _attribution(settings)
    attribute = attribution.endpoint if attribution is not None else unattributed
    restore = stop_on_signals(stop)
    tcp = TcpFlowCollector(snapshot_interval_s=config.flow_update_interval_s,
                           max_connections=config.max_connections, attribute=attribute,
                           headers_dir=headers)
    packets = PacketCounter(interfaces, max_entries=config.max_flow_entries,
                            headers_dir=str(headers), netns=netns) if interfaces else None
    lost_seen = {"ring_buffer_full": 0, "table_full": 0, "dropped_updates": 0}
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
            if time.monotonic() >= next_update:
                next_update += config.flow_update_interval_s
                _periodic(tcp, packets, publisher, metrics, attribute, lost_seen)
            publisher.poll()
        # Whatever is still in the kernel when we stop is published too.
        tcp.poll(publisher.publish_encoded)
        _periodic(tcp, packets, publisher, metrics, attribute, lost_seen)
    finally:
        restore()
        if packets is not None:
            packets.close()
        tcp.close()
        if attribution is not None:
            attribution.stop()
        undelivered = publisher.close()
    return CollectSummary(publisher.published, publisher.delivery_errors, undelivered,
                          sum(lost_seen.values()))


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
