"""`clover receive spans`: the Mixer adapter, the OTLP/gRPC and the Zipkin receivers in one
process, sharing one span sink (and so one pair of Kafka producers and one metrics endpoint)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from clover.config import Settings
from clover.heap import freeze_startup_objects
from clover.kafka import admin_client
from clover.metrics_endpoint import serve_metrics
from collectors.ingest import SpanSink

log = logging.getLogger(__name__)


@dataclass
class Listening:
    mixer: int | None
    otlp: int | None
    zipkin: int | None


def receive_spans(settings: Settings, *, stop: threading.Event,
                  on_listening: threading.Event | None = None,
                  listening: list[Listening] | None = None) -> int:
    """Serve until ``stop`` is set; returns the number of records left undelivered."""
    from collectors.mixer.server import MixerAdapter
    from collectors.otlp import OtlpReceiver
    from collectors.zipkin import ZipkinReceiver

    config = settings.receivers
    admin_client(settings)  # Kafka reachable, or a clear error before any port opens
    sink = SpanSink(settings)
    serve_metrics(config.metrics_port, "receivers.metrics_port", addr=config.listen_host,
                  registry=sink.registry)
    freeze_startup_objects()  # the imports above, the sink
    servers = []
    ports: dict[str, int | None] = {}
    try:
        for name, cls, port in (("mixer", MixerAdapter, config.mixer_port),
                                ("otlp", OtlpReceiver, config.otlp_port),
                                ("zipkin", ZipkinReceiver, config.zipkin_port)):
            if not port:
                ports[name] = None
                continue
            server = cls(sink, port=port, host=config.listen_host)
            ports[name] = server.start()
            servers.append(server)
            log.info("%s receiver listening on %s:%d", name, config.listen_host, ports[name])
        if listening is not None:
            listening.append(Listening(ports["mixer"], ports["otlp"], ports["zipkin"]))
        if on_listening is not None:
            on_listening.set()
        stop.wait()
    finally:
        for server in servers:
            server.stop()
        undelivered = sink.close()
    return undelivered
