"""Each process's own Prometheus endpoint, with a clear error when its port is taken."""

from __future__ import annotations

import errno

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

from clover.config import ConfigError


def serve_metrics(port: int, setting: str, *, addr: str = "0.0.0.0",
                  registry: CollectorRegistry = REGISTRY) -> None:
    """Serve ``registry`` on ``addr:port`` in a background thread; port 0 is no endpoint.

    ``setting`` is the dotted name of the port's setting (``collectors.metrics_port``), so a
    port already in use names what to change instead of ending in a bind traceback.
    """
    if not port:
        return
    try:
        start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        env = "CLOVER_" + setting.replace(".", "_").upper()
        raise ConfigError(
            f"{setting}: port {port} is already in use (another Clover process?); "
            f"stop what holds it, or set {env} to a free port, or to 0 for no metrics "
            "endpoint") from exc
