"""Zipkin v2 JSON receiver (``POST /api/v2/spans``, https://zipkin.io/zipkin-api/), as Istio's
Envoy sidecars and Zipkin-exporting tracers send it: each span mapped to a span.v1 dict and handed
to the :class:`~collectors.ingest.SpanSink`.

The aiohttp server runs in its own thread with its own event loop, so callers stay synchronous;
parsing, mapping and publishing run on a worker thread, off the event loop.

Mapping:

======================  ==========================================================================
span.v1 field           from
======================  ==========================================================================
service, namespace      ``localEndpoint.serviceName``. Istio's convention: Envoy names the service
                        ``<workload>.<namespace>`` (e.g. ``productpage.default``), so a name with a
                        "." is split at the first one; a name without one is the service, and the
                        namespace comes from the tag ``k8s.namespace.name`` (else None). No
                        serviceName -> dead letter "span has no localEndpoint.serviceName"
pod                     tag ``k8s.pod.name`` (else None)
revision                tags ``k8s.replicaset.name`` minus the prefix ``<k8s.deployment.name>-``
                        (else None; never guessed from the pod name)
operation               ``name``
kind                    ``kind`` lowercased (CLIENT/SERVER/PRODUCER/CONSUMER); absent ->
                        unspecified
trace_id, span_id,      ``traceId``, ``id``, ``parentId`` lowercased (absent parent -> None); ids
parent_span_id          of other lengths are passed on for validation to reject
start_us, duration_us   ``timestamp``, ``duration`` (µs) as given; absent or negative -> rejected
status_code             first numeric tag of ``http.response.status_code``, ``http.status_code``,
                        ``rpc.grpc.status_code``, ``grpc.status_code`` (Envoy's)
error                   an ``error`` tag is present (any value), or an HTTP status >= 500
peer_service,           ``remoteEndpoint.serviceName`` (split like the local one); else the tag
peer_namespace          ``peer.service``, or on a client span ``server.address``; else Envoy's
                        ``upstream_cluster`` tag ``outbound|<port>|<subset>|<host>`` when the host
                        is a Service DNS name ``<service>.<namespace>.svc...``
bytes_sent,             numeric tags ``request_size`` / ``response_size`` (Envoy's) or the
bytes_received          semantic-convention body sizes: a SERVER/CONSUMER span received the request
                        and sent the response, any other kind sent the request
source                  ``"zipkin"``
======================  ==========================================================================

A dead letter's original bytes are that span's JSON object, re-serialized (compact UTF-8).

Responses: 202 ``{"accepted": n, "rejected": [{"index": i, "reason": "..."}]}`` once the body
parsed (valid spans published, each invalid one dead-lettered); 400 ``{"error": "..."}`` when the
body is not JSON, not an array, or has an element that is not an object (nothing published); 413
above ``max_body`` (after decompression); 415 for a Content-Type other than application/json or
a Content-Encoding other than gzip/deflate; 404 for other paths.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
from aiohttp import web

from collectors import spanmap
from collectors.ingest import Candidate, SpanSink

log = logging.getLogger(__name__)

RECEIVER = "zipkin"
PATH = "/api/v2/spans"
SHUTDOWN_S = 5.0  # how long stop() lets requests in progress finish
_ENCODINGS = frozenset(("", "identity", "gzip", "deflate"))  # aiohttp decompresses these


class BadRequest(ValueError):
    """The body as a whole is not a Zipkin v2 JSON span list."""


def _split_workload(name: str) -> tuple[str, str | None]:
    """Istio's ``<workload>.<namespace>`` service name as (service, namespace)."""
    service, dot, namespace = name.partition(".")
    return (service, namespace) if dot and service and namespace else (name, None)


def _peer(span: dict[str, Any], tags: dict[str, Any], kind: str) -> tuple[str | None,
                                                                          str | None]:
    remote = span.get("remoteEndpoint")
    name = remote.get("serviceName") if isinstance(remote, dict) else None
    if isinstance(name, str) and name:
        return _split_workload(name)
    if tags:
        peer = spanmap.peer_of(tags, kind)
        if peer[0] is not None:
            return peer
        cluster = tags.get("upstream_cluster")
        if isinstance(cluster, str) and cluster.startswith("outbound|"):
            service, namespace = spanmap.split_dns_name(cluster.rsplit("|", 1)[-1])
            if namespace is not None:
                return service, namespace
    return None, None


def _integral(value: Any) -> Any:
    """1.0 is an integer to JSON Schema; make it one for the record too. Anything else as is."""
    return int(value) if type(value) is float and value.is_integer() else value


def _map(span: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """One Zipkin span as a span.v1 dict, or (None, problem)."""
    local = span.get("localEndpoint")
    name = local.get("serviceName") if isinstance(local, dict) else None
    if not isinstance(name, str) or not name:
        return None, "span has no localEndpoint.serviceName"
    tags = span.get("tags")
    if not isinstance(tags, dict):
        tags = {}
    service, namespace = _split_workload(name)
    if namespace is None:
        namespace = tags.get("k8s.namespace.name") or None
    kind = span.get("kind")
    kind = "unspecified" if kind is None else kind.lower() if isinstance(kind, str) else kind
    kind_name = kind if isinstance(kind, str) else ""  # a bad kind is left for validation
    status_code, server_error = spanmap.status_of(tags) if tags else (None, False)
    bytes_sent, bytes_received = spanmap.sizes_of(tags, kind_name) if tags else (None, None)
    peer_service, peer_namespace = _peer(span, tags, kind_name)
    trace_id, span_id, parent = span.get("traceId"), span.get("id"), span.get("parentId")
    return {  # every field, in SpanRecord's order (the sink then encodes it as it is)
        "trace_id": trace_id.lower() if isinstance(trace_id, str) else trace_id,
        "span_id": span_id.lower() if isinstance(span_id, str) else span_id,
        "service": service,
        "operation": span.get("name"),
        "kind": kind,
        "start_us": _integral(span.get("timestamp")),
        "duration_us": _integral(span.get("duration")),
        "error": server_error or "error" in tags,
        "source": RECEIVER,
        "parent_span_id": parent.lower() if isinstance(parent, str) else parent,
        "namespace": namespace,
        "pod": tags.get("k8s.pod.name") or None,
        "revision": spanmap.revision_of(tags.get("k8s.deployment.name"),
                                        tags.get("k8s.replicaset.name")),
        "status_code": status_code,
        "peer_namespace": peer_namespace,
        "peer_service": peer_service,
        "bytes_sent": bytes_sent,
        "bytes_received": bytes_received,
        "schema_version": 1,
    }, None


def candidates(body: bytes) -> list[Candidate]:
    """One Candidate per span of a Zipkin v2 JSON body, in order; BadRequest (before anything
    is published) when the body is not a JSON array of objects."""
    try:
        spans = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from exc
    if not isinstance(spans, list):
        raise BadRequest(f"expected a JSON array of spans, got a JSON {type(spans).__name__}")
    for index, span in enumerate(spans):
        if not isinstance(span, dict):
            raise BadRequest(f"span {index} is not a JSON object")
    result = []
    for span in spans:
        record, problem = _map(span)
        result.append(Candidate(record, orjson.dumps(span), problem))
    return result


class ZipkinReceiver:
    """An HTTP server for Zipkin v2 JSON spans; ``start`` returns the bound port."""

    def __init__(self, sink: SpanSink, *, port: int = 0, host: str = "127.0.0.1",
                 max_body: int = 16 << 20) -> None:
        self._sink = sink
        self._host, self._port = host, port
        self._max_body = max_body
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        # One worker: the sink serialises publishing anyway, and requests keep their order.
        self._worker: ThreadPoolExecutor | None = None
        self.port: int | None = None

    def start(self) -> int:
        sock = socket.create_server((self._host, self._port),
                                    family=socket.AF_INET6 if ":" in self._host
                                    else socket.AF_INET)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zipkin-worker")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="zipkin-receiver",
                                        daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._serve(sock), self._loop).result(30)
        except BaseException:
            sock.close()
            self.stop()
            raise
        self.port = sock.getsockname()[1]
        log.info("Zipkin receiver listening on %s:%d", self._host, self.port)
        return self.port

    async def _serve(self, sock: socket.socket) -> None:
        app = web.Application(client_max_size=self._max_body)
        app.router.add_post(PATH, self._spans)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_S)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()

    def stop(self) -> None:
        """Stop serving; requests in progress get SHUTDOWN_S to finish (the sink stays open)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(
                SHUTDOWN_S + 10)
            self._runner = None
        loop.call_soon_threadsafe(loop.stop)
        thread.join(SHUTDOWN_S)
        loop.close()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
        self._loop = self._thread = self._worker = None

    async def _spans(self, request: web.Request) -> web.Response:
        self._sink.request(RECEIVER)
        if request.content_type != "application/json":
            return _error(415, f"Content-Type {request.content_type} is not supported: "
                               "send application/json (Zipkin v2 JSON)")
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in _ENCODINGS:
            return _error(415, f"Content-Encoding {encoding} is not supported: "
                               "send gzip, deflate or none")
        body = await request.read()  # decompressed by aiohttp; 413 above client_max_size
        loop = asyncio.get_running_loop()
        try:
            accepted, rejected = await loop.run_in_executor(self._worker, self._submit, body)
        except BadRequest as exc:
            return _error(400, str(exc))
        return web.json_response({"accepted": accepted, "rejected": rejected}, status=202,
                                 dumps=lambda value: orjson.dumps(value).decode())

    def _submit(self, body: bytes) -> tuple[int, list[dict[str, Any]]]:
        result = self._sink.submit(RECEIVER, candidates(body))
        return result.accepted, [{"index": r.index, "reason": r.reason}
                                 for r in result.rejected]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
