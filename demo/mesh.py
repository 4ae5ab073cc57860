"""The demo mesh: five services, who calls whom, how each reports its spans, and what each
version (image tag) of a service does.

``frontend`` calls ``cart``, ``catalog`` and ``checkout``; ``checkout`` calls ``payment``. Each
reports spans the way a sidecar of one Istio generation would: OTLP (Istio 1.5+ with the
OpenTelemetry tracer), Zipkin (Envoy's Zipkin tracer) or the Mixer adapter (Istio 1.0-1.4).
"""

from __future__ import annotations

from dataclasses import dataclass

REGISTRY = "registry.local/clover-demo"
PORT = 8080  # every pod listens on its own address, so all can use one port
# Pod addresses: 127.<run octet>.0.<n>. All of 127.0.0.0/8 is local on Linux, so each pod gets
# an address of its own without network namespaces, and flows can be attributed to pods by IP.
LOOPBACK_PREFIX = "127"

# What the faulty builds do: big enough to be unmistakable against ~10-40 ms of normal latency,
# as a real regression (a missing index, a retry storm) would be.
FAULT_LATENCY_MS = 250.0
FAULT_ERROR_RATIO = 0.5


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    calls: tuple[str, ...]
    exporter: str  # "otlp", "zipkin" or "mixer"
    work_ms: tuple[float, float]  # simulated work per request, uniform in this range


MESH: tuple[ServiceSpec, ...] = (
    ServiceSpec("frontend", ("cart", "catalog", "checkout"), "otlp", (3.0, 6.0)),
    ServiceSpec("cart", (), "otlp", (4.0, 8.0)),
    ServiceSpec("catalog", (), "zipkin", (5.0, 10.0)),
    ServiceSpec("checkout", ("payment",), "zipkin", (4.0, 8.0)),
    ServiceSpec("payment", (), "mixer", (6.0, 12.0)),
)
SERVICES = {spec.name: spec for spec in MESH}
ENTRY = "frontend"


@dataclass(frozen=True)
class Version:
    """What a build of a service does differently: nothing, added latency, or errors."""

    tag: str
    fault: str | None  # None, "latency" or "errors"
    description: str


VERSIONS: dict[str, Version] = {
    "v1": Version("v1", None, "the running release"),
    "v2": Version("v2", None, "a harmless new release (same behaviour)"),
    "v2-latency": Version("v2-latency", "latency",
                          f"a faulty release: +{FAULT_LATENCY_MS:g} ms per request"),
    "v2-errors": Version("v2-errors", "errors",
                         f"a faulty release: {FAULT_ERROR_RATIO:.0%} of requests fail with 500"),
}


def image(service: str, tag: str) -> str:
    return f"{REGISTRY}/{service}:{tag}"


def tag_of(image_name: str) -> str:
    """The tag of an image reference (after the last ':' that is not part of a host:port)."""
    name, _, tag = image_name.rpartition(":")
    return tag if name and "/" not in tag else "latest"


def version_of(image_name: str) -> Version:
    """The version an image names; an unknown tag is an error naming the known ones."""
    tag = tag_of(image_name)
    if tag not in VERSIONS:
        raise ValueError(f"image {image_name}: no demo build is tagged {tag!r}; the demo has "
                         f"{', '.join(VERSIONS)}")
    return VERSIONS[tag]


def rollout_tag(fault: str | None) -> str:
    """The tag the demo rolls out: the faulty build for ``fault``, or the harmless v2."""
    return "v2" if fault is None else f"v2-{fault}"
