"""One pod of the demo mesh: an HTTP service process (``python -m demo.service ...``).

The runner (demo/runner.py) starts one per pod, with the pod's identity and the build its image
names. Each request does some simulated work, calls the service's downstream services (found in
the routes file the runner keeps: the Ready pods of each service, as a Service's endpoints
would be), and records a server span and one client span per call, exported every
``FLUSH_S`` the way its sidecar would (demo/exporters.py). Outgoing connections leave from the
pod's own address and are not kept alive, so the eBPF collector sees every call as a flow
between two pods.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import secrets
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
from aiohttp import web

from demo.exporters import Identity, Span, exporter_for
from demo.mesh import FAULT_ERROR_RATIO, FAULT_LATENCY_MS, SERVICES, VERSIONS

log = logging.getLogger("demo.service")

FLUSH_S = 0.5  # how often spans are exported: well inside the pipeline's allowed lateness
MAX_BUFFERED = 50_000  # spans kept while the receiver is unreachable; older ones are dropped
CALL_TIMEOUT_S = 3.0


class Routes:
    """The routes file written by the runner, re-read when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime = 0.0
        self._routes: dict[str, list[tuple[str, int]]] = {}

    def pick(self, service: str) -> tuple[str, int] | None:
        try:
            mtime = self.path.stat().st_mtime
            if mtime != self._mtime:
                self._routes = {k: [tuple(e) for e in v]  # type: ignore[misc]
                                for k, v in json.loads(self.path.read_text()).items()}
                self._mtime = mtime
        except (OSError, ValueError):
            pass  # being replaced: keep the last routes
        endpoints = self._routes.get(service)
        return random.choice(endpoints) if endpoints else None


class Pod:
    """The service's behaviour and its span buffer."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.spec = SERVICES[args.service]
        self.version = VERSIONS[args.tag]
        self.identity = Identity(args.namespace, args.service, args.pod, args.revision)
        self.address = args.ip
        self.routes = Routes(Path(args.routes))
        ports = {"otlp": args.otlp_port, "zipkin": args.zipkin_port, "mixer": args.mixer_port}
        self.exporter = exporter_for(self.spec.exporter, self.identity, args.receiver_host,
                                     ports)
        self.spans: list[Span] = []
        self.session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.Response:
        start = time.time_ns()
        trace_id = request.headers.get("X-B3-TraceId") or secrets.token_hex(16)
        parent = request.headers.get("X-B3-SpanId")
        span_id = secrets.token_hex(8)
        body_in = await request.read()
        await asyncio.sleep(random.uniform(*self.spec.work_ms) / 1000)
        if self.version.fault == "latency":
            await asyncio.sleep(FAULT_LATENCY_MS / 1000)
        status = 200
        for callee in self.spec.calls:
            if not await self.call(callee, trace_id, span_id):
                status = 502
        if self.version.fault == "errors" and random.random() < FAULT_ERROR_RATIO:
            status = 500
        body = b"x" * random.randint(200, 2000)
        self.spans.append(Span(trace_id, span_id, parent, f"GET /{self.spec.name}", "server",
                               start, time.time_ns(), status, status >= 500,
                               request.headers.get("X-Demo-Caller"), len(body_in), len(body)))
        return web.Response(status=status, body=body)

    async def call(self, callee: str, trace_id: str, parent: str) -> bool:
        """One call downstream with its client span; False when it failed."""
        span_id = secrets.token_hex(8)
        start = time.time_ns()
        status, received = None, 0
        target = self.routes.pick(callee)
        if target is not None and self.session is not None:
            try:
                async with self.session.get(
                        f"http://{target[0]}:{target[1]}/{callee}",
                        headers={"X-B3-TraceId": trace_id, "X-B3-SpanId": span_id,
                                 "X-Demo-Caller": self.spec.name}) as response:
                    received = len(await response.read())
                    status = response.status
            except (TimeoutError, aiohttp.ClientError) as exc:
                log.warning("call to %s failed: %s", callee, exc)
        error = status is None or status >= 500
        self.spans.append(Span(trace_id, span_id, parent, f"GET /{callee}", "client", start,
                               time.time_ns(), status, error, callee, 0, received))
        return not error

    async def export_forever(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), FLUSH_S)
            except TimeoutError:
                pass
            await self.flush(loop)

    async def flush(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self.spans = self.spans, []
        if not batch:
            return
        try:
            await loop.run_in_executor(None, self.exporter.export, batch)
        except Exception as exc:  # noqa: BLE001 - the receiver may be restarting: keep them
            log.warning("could not export %d spans (%s); retrying", len(batch), exc)
            self.spans = (batch + self.spans)[-MAX_BUFFERED:]


async def serve(args: argparse.Namespace) -> None:
    pod = Pod(args)
    app = web.Application()
    app.router.add_get("/{path:.*}", pod.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.ip, args.port)
    await site.start()
    # Calls leave from the pod's own address, one connection per call.
    connector = aiohttp.TCPConnector(local_addr=(args.ip, 0), force_close=True)
    pod.session = aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("%s %s (%s) serving on %s:%d", args.service, args.tag, args.pod, args.ip,
             args.port)
    try:
        await pod.export_forever(stop)
    finally:
        await runner.cleanup()
        await pod.session.close()
        await pod.flush(loop)
        pod.exporter.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.service",
                                     description="one pod of the Clover demo mesh")
    parser.add_argument("--service", required=True, choices=sorted(SERVICES))
    parser.add_argument("--tag", required=True, choices=sorted(VERSIONS))
    for name in ("namespace", "pod", "revision", "ip", "routes"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--receiver-host", default="127.0.0.1")
    for name in ("otlp", "zipkin", "mixer"):
        parser.add_argument(f"--{name}-port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {os.getpid()} %(message)s")
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
