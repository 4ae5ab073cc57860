"""Mapping helpers the OTLP and Zipkin receivers share: OpenTelemetry semantic-convention
attributes (OTLP span attributes, Zipkin tags) -> span.v1 fields.

Rules they both follow: a value the source does not give stays ``None`` (never guessed), and a
value that is present but wrong (an id of the wrong length, a negative duration) is passed on
as it is, so that validation rejects the span and the dead letter says why.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Attribute (tag) names a receiver reads per span, looked up once into a dict.
STATUS_CODE_KEYS = ("http.response.status_code", "http.status_code",  # HTTP, new then old
                    "rpc.grpc.status_code", "grpc.status_code")  # gRPC: OTel, then Envoy's tag
HTTP_STATUS_KEYS = frozenset(STATUS_CODE_KEYS[:2])
REQUEST_SIZE_KEYS = ("http.request.body.size", "http.request_content_length", "request_size")
RESPONSE_SIZE_KEYS = ("http.response.body.size", "http.response_content_length",
                      "response_size")
PEER_SERVICE = "peer.service"
SERVER_ADDRESS = "server.address"
SPAN_KEYS = frozenset((*STATUS_CODE_KEYS, *REQUEST_SIZE_KEYS, *RESPONSE_SIZE_KEYS,
                       PEER_SERVICE, SERVER_ADDRESS))

# Kinds on which this side received the request and sent the response (else it sent the
# request: client, producer, and internal/unspecified spans, whose sizes are rare anyway).
_RECEIVING_KINDS = frozenset(("server", "consumer"))


def as_int(value: Any) -> int | None:
    """An integer attribute, or a string of decimal digits (Zipkin tags are strings); else None.
    An int is passed on as it is (a negative one is then rejected by validation)."""
    if type(value) is int:
        return value
    if isinstance(value, str) and value.isdigit() and value.isascii():
        return int(value)
    return None


def apply_attributes(record: dict[str, Any], attrs: Mapping[str, Any], kind: str) -> None:
    """Set ``record``'s status_code, bytes and peer fields from the attributes that give them
    (the others keep their value, None), and ``error`` when the HTTP status is >= 500. ``kind``
    is the span.v1 kind ("" when the source's is not a string)."""
    status_code, server_error = status_of(attrs)
    if status_code is not None:
        record["status_code"] = status_code
        if server_error:
            record["error"] = True
    record["bytes_sent"], record["bytes_received"] = sizes_of(attrs, kind)
    record["peer_service"], record["peer_namespace"] = peer_of(attrs, kind)


def status_of(attrs: Mapping[str, Any]) -> tuple[int | None, bool]:
    """``(status_code, is_server_error)`` from the first status attribute present; only an HTTP
    status >= 500 counts as an error (gRPC codes have no such order)."""
    for key in STATUS_CODE_KEYS:
        if key in attrs:
            code = as_int(attrs[key])
            if code is not None:
                return code, key in HTTP_STATUS_KEYS and code >= 500
    return None, False


def sizes_of(attrs: Mapping[str, Any], kind: str) -> tuple[int | None, int | None]:
    """``(bytes_sent, bytes_received)`` by this side: the request body is sent by a client and
    received by a server, the response the other way round."""
    request = response = None
    for key in REQUEST_SIZE_KEYS:
        if key in attrs and (request := as_int(attrs[key])) is not None:
            break
    for key in RESPONSE_SIZE_KEYS:
        if key in attrs and (response := as_int(attrs[key])) is not None:
            break
    return (response, request) if kind in _RECEIVING_KINDS else (request, response)


def split_dns_name(address: str) -> tuple[str, str | None]:
    """A Kubernetes Service DNS name ``<service>.<namespace>.svc[.cluster.local]`` as
    ``(service, namespace)``; any other address (an IP, an external host) as it is."""
    parts = address.split(".", 3)
    if len(parts) >= 3 and parts[2] == "svc" and parts[0] and parts[1]:
        return parts[0], parts[1]
    return address, None


def peer_of(attrs: Mapping[str, Any], kind: str) -> tuple[str | None, str | None]:
    """``(peer_service, peer_namespace)``: ``peer.service`` as given; else, on a client span,
    ``server.address``, which names the namespace too when it is a Service DNS name."""
    peer = attrs.get(PEER_SERVICE)
    if isinstance(peer, str) and peer:
        return peer, None
    address = attrs.get(SERVER_ADDRESS)
    if kind == "client" and isinstance(address, str) and address:
        return split_dns_name(address)
    return None, None


def revision_of(deployment: Any, replicaset: Any) -> str | None:
    """The pod template hash: a ReplicaSet of a Deployment is named ``<deployment>-<hash>``.
    Without both names, or when the name has another shape, it is unknown (None)."""
    if (isinstance(deployment, str) and isinstance(replicaset, str) and deployment
            and replicaset.startswith(deployment + "-")):
        suffix = replicaset[len(deployment) + 1:]
        if suffix and "-" not in suffix:
            return suffix
    return None
