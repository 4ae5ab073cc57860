"""Configuration in one place.

Every address and tunable lives here, so the same pipeline runs against the local stack, against
existing servers, or inside a real cluster. Values come from, in increasing priority:

1. the defaults below (the local stack started by ``clover stack up``);
2. a TOML file: ``--config FILE`` or ``$CLOVER_CONFIG`` (sections ``[kafka]``, ``[cassandra]``,
   ``[kubernetes]``, ``[collectors]``, ``[receivers]``, ``[streams]``, ``[rollback]``,
   ``[stack]``);
3. environment variables ``CLOVER_<SECTION>_<KEY>``, e.g. ``CLOVER_KAFKA_BOOTSTRAP_SERVERS``.

A bad value raises :class:`ConfigError` naming the key, where it came from and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def _default_home() -> Path:
    """$CLOVER_HOME, else $XDG_DATA_HOME/clover, else ~/.local/share/clover."""
    if os.environ.get("CLOVER_HOME"):
        return Path(os.environ["CLOVER_HOME"]).expanduser()
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "clover"


@dataclass(frozen=True)
class StackSettings:
    """The local stack: where its state lives and which loopback ports its servers take."""

    home: Path = field(default_factory=_default_home)
    # Installed and built software (Kafka, Cassandra, the Kubernetes binaries, kernel headers).
    # Kept apart from home so that a throw-away stack (tests) reuses one build.
    cache: Path | None = None
    zookeeper_port: int = 2181
    kafka_port: int = 9092
    cassandra_port: int = 9042
    cassandra_storage_port: int = 7000
    etcd_port: int = 23790
    etcd_peer_port: int = 23800
    apiserver_port: int = 6443
    controller_manager_port: int = 10257
    kafka_heap_mb: int = 512
    cassandra_heap_mb: int = 256
    ready_timeout_s: int = 120

    @property
    def cache_dir(self) -> Path:
        return self.cache if self.cache is not None else self.home / "cache"


@dataclass(frozen=True)
class KafkaSettings:
    # Empty means: the local stack's broker on stack.kafka_port.
    bootstrap_servers: str = ""
    # Replication factor for the topics `clover topics create` makes (3 on a real cluster).
    replication_factor: int = 1
    # Extra librdkafka settings for every client, e.g. security.protocol, sasl.* and ssl.* for a
    # managed cluster. In TOML: a [kafka.client] table.
    client: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CassandraSettings:
    # Empty means: the local stack's node, 127.0.0.1 on stack.cassandra_port.
    contact_points: tuple[str, ...] = ()
    port: int = 0
    keyspace: str = "clover"
    replication_factor: int = 1
    # 3 for Cassandra 2.1 (auto-negotiation fails against it); 4 or 5 for current releases.
    protocol_version: int = 3
    username: str = ""
    password: str = ""
    # Rows expire after this many days (0 keeps them forever).
    ttl_days: int = 30


@dataclass(frozen=True)
class KubernetesSettings:
    # Path of a kubeconfig, or "in-cluster" to use the pod's ServiceAccount. Empty means the
    # local stack's least-privilege pipeline identity, <stack.home>/kube/pipeline.kubeconfig.
    kubeconfig: str = ""
    # Namespace of the pipeline's own ServiceAccount (and the local stack's workloads).
    namespace: str = "clover"
    service_account: str = "clover-pipeline"


@dataclass(frozen=True)
class CollectorSettings:
    """The eBPF flow collector (`clover collect flows`)."""

    # Seconds between updates of a long-lived connection, and between packet-counter drains.
    flow_update_interval_s: int = 10
    # Its own Prometheus endpoint (0: none).
    metrics_port: int = 9464
    # Namespaces whose pods it attributes flows to; empty means [kubernetes] namespace, "*"
    # means all (which needs cluster-wide list/watch on pods and replicasets).
    attribution_namespaces: tuple[str, ...] = ()
    max_connections: int = 65536
    max_flow_entries: int = 65536


@dataclass(frozen=True)
class ReceiverSettings:
    """The span receivers (`clover receive spans`); a port of 0 turns that receiver off."""

    listen_host: str = "0.0.0.0"
    mixer_port: int = 9091  # Istio 1.0-1.4 Mixer out-of-process adapter (gRPC)
    otlp_port: int = 4317  # OpenTelemetry OTLP/gRPC traces
    zipkin_port: int = 9411  # Zipkin v2 JSON over HTTP
    metrics_port: int = 9465  # their own Prometheus endpoint


@dataclass(frozen=True)
class StreamSettings:
    """The Faust stream workers that aggregate flows and spans into per-service windows."""

    # The Faust app id, which is also the Kafka consumer group the workers share.
    app_id: str = "clover-aggregate"
    window_seconds: int = 10
    # How long after a window ends records may still arrive for it (event time).
    allowed_lateness_seconds: int = 5
    # When a partition has been silent this long (wall clock), its event time is assumed to
    # move on with the clock, so the last windows close although no newer record comes.
    idle_close_seconds: int = 5
    # Where a consumer group with no committed offsets starts: "earliest" loses nothing already
    # on the topics; "latest" ignores the history and starts with what arrives next.
    new_group_starts_at: str = "earliest"
    metrics_port: int = 9466


@dataclass(frozen=True)
class RollbackSettings:
    """The rollback agent (`clover rollback agent`): when it may roll a Deployment back."""

    # Act only on a Deployment whose revision changed at most this many seconds ago...
    watch_window_s: int = 600
    # ...or whose rollout completed (promotion) at most this many seconds ago (0: off).
    post_promotion_watch_s: int = 300
    # Anomalous windows in a row (of one revision) before acting.
    consecutive_windows: int = 3
    # After a rollback (or a dry-run one), no further action on that Deployment for this long.
    cooldown_s: int = 900
    # Namespaces it may act in; empty means [kubernetes] namespace, "*" means all.
    allowed_namespaces: tuple[str, ...] = ()
    # Decide and record, but never patch.
    dry_run: bool = False
    # Its own Prometheus endpoint (0: none).
    metrics_port: int = 9467
    # Its identity: a kubeconfig path, or "in-cluster"; empty means [kubernetes] kubeconfig.
    kubeconfig: str = ""
    # How long to retry an unreachable API server before recording the decision as failed.
    api_retry_s: int = 20
    # Kafka consumer group (and Faust app id) of the agent.
    group_id: str = "clover-rollback"


@dataclass(frozen=True)
class ModelSettings:
    """Anomaly detection: `clover models train|score|evaluate` and the scoring agent."""

    # The trained model (joblib; its metadata is <model_path>.json). Empty means
    # <stack.home>/models/anomaly.joblib. Without a model file the scorer learns online.
    model_path: str = ""
    # Score (a calibrated 1 - p-value in [0, 1]) at or above which a window is anomalous.
    threshold: float = 0.999
    # Windows of a service's own history before it is judged; until then: inconclusive.
    min_windows: int = 6
    # Windows of recent history the baseline keeps (60 x 10 s = 10 minutes).
    baseline_windows: int = 60
    # A window with fewer requests has its latency and errors left unjudged.
    min_requests: int = 10
    # Anomalous windows in a row after which a lasting change is learned as the new normal.
    relearn_after: int = 30
    # Threshold of the NAB-format series scorer (`clover models score`).
    series_threshold: float = 0.9999
    # Where `clover models evaluate` finds nab-sample/ and the Nezha day; empty: ../shared/data.
    data_dir: str = ""
    # Kafka consumer group (and Faust app id) of the scoring agent.
    group_id: str = "clover-score"
    # The scoring agent's own Prometheus endpoint (0: none).
    metrics_port: int = 9468

    def __post_init__(self) -> None:
        for key in ("threshold", "series_threshold"):
            if not 0.0 < getattr(self, key) < 1.0:
                raise ConfigError(f"models.{key}: got {getattr(self, key)!r}; expected a score "
                                  "between 0 and 1 (exclusive), e.g. 0.999")


@dataclass(frozen=True)
class Settings:
    stack: StackSettings = field(default_factory=StackSettings)
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    cassandra: CassandraSettings = field(default_factory=CassandraSettings)
    kubernetes: KubernetesSettings = field(default_factory=KubernetesSettings)
    collectors: CollectorSettings = field(default_factory=CollectorSettings)
    receivers: ReceiverSettings = field(default_factory=ReceiverSettings)
    models: ModelSettings = field(default_factory=ModelSettings)
    rollback: RollbackSettings = field(default_factory=RollbackSettings)
    streams: StreamSettings = field(default_factory=StreamSettings)

    @property
    def kafka_bootstrap(self) -> str:
        return self.kafka.bootstrap_servers or f"127.0.0.1:{self.stack.kafka_port}"

    @property
    def cassandra_contact_points(self) -> tuple[str, ...]:
        return self.cassandra.contact_points or ("127.0.0.1",)

    @property
    def cassandra_port(self) -> int:
        return self.cassandra.port or self.stack.cassandra_port

    @property
    def kubeconfig(self) -> str:
        return self.kubernetes.kubeconfig or str(self.stack.home / "kube" / "pipeline.kubeconfig")

    @property
    def model_path(self) -> Path:
        return Path(self.models.model_path or self.stack.home / "models" / "anomaly.joblib")

    @property
    def rollback_kubeconfig(self) -> str:
        return self.rollback.kubeconfig or self.kubeconfig

    @property
    def rollback_namespaces(self) -> tuple[str, ...]:
        return self.rollback.allowed_namespaces or (self.kubernetes.namespace,)


_CHOICES: dict[tuple[str, str], tuple[object, ...]] = {
    ("cassandra", "protocol_version"): (3, 4, 5),
    ("streams", "new_group_starts_at"): ("earliest", "latest"),
}


def _int_range(section: str, key: str) -> tuple[int, int, str]:
    """The allowed range of an integer setting, and how to say it."""
    if (section, key) == ("cassandra", "port"):
        return 0, 65535, "a TCP port from 1 to 65535, or 0 for the local stack's"
    if key == "metrics_port":
        return 0, 65535, "a TCP port from 1 to 65535, or 0 for no metrics endpoint"
    if section == "receivers" and key.endswith("_port"):
        return 0, 65535, "a TCP port from 1 to 65535, or 0 to turn that receiver off"
    if key.endswith("port"):
        return 1, 65535, "a TCP port from 1 to 65535"
    if section == "rollback" and key in ("post_promotion_watch_s", "cooldown_s"):
        return 0, 2**31 - 1, "a whole number of seconds >= 0 (0 turns it off)"
    if key == "ttl_days":
        return 0, 2**31 - 1, "a whole number of days >= 0 (0 keeps rows forever)"
    return 1, 2**31 - 1, "a whole number >= 1"


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Settings from defaults, then the TOML file, then ``CLOVER_*`` environment variables."""
    environ = os.environ if environ is None else environ
    config_file = config_file or environ.get("CLOVER_CONFIG") or None
    file_values: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        try:
            file_values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"config file {path} does not exist; pass an existing file with --config "
                "or unset CLOVER_CONFIG"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None

    sections: dict[str, Any] = {}
    for section in dataclasses.fields(Settings):
        cls = typing.get_type_hints(Settings)[section.name]
        from_file = file_values.pop(section.name, {})
        if not isinstance(from_file, dict):
            raise ConfigError(f"{section.name}: expected a [{section.name}] table in {config_file}")
        sections[section.name] = _build_section(
            section.name, cls, from_file, environ, str(config_file)
        )
    if file_values:
        raise ConfigError(
            f"unknown section(s) {sorted(file_values)} in {config_file}; "
            f"allowed: {[f.name for f in dataclasses.fields(Settings)]}"
        )
    return Settings(**sections)


def _build_section(
    name: str, cls: type, from_file: dict[str, Any], environ: Mapping[str, str], source: str
) -> Any:
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(from_file) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [{name}] of {source}; allowed: {allowed}")
    values: dict[str, Any] = {}
    for key in allowed:
        env_name = f"CLOVER_{name}_{key}".upper()
        if env_name in environ:
            raw, where = environ[env_name], f"environment variable {env_name}"
        elif key in from_file:
            raw, where = from_file[key], f"[{name}] {key} in {source}"
        else:
            continue
        values[key] = _coerce(name, key, hints[key], raw, where)
    return cls(**values)


def _coerce(section: str, key: str, hint: Any, raw: Any, where: str) -> Any:
    """Convert one raw value (a TOML value or an environment string) to the field's type."""
    qualified = f"{section}.{key}"
    value: Any
    base = _strip_optional(hint)
    origin = typing.get_origin(base)
    try:
        if base is int:
            low, high, wanted = _int_range(section, key)
            try:
                value = int(raw)
            except (TypeError, ValueError):
                raise ValueError(wanted) from None
            if not low <= value <= high:
                raise ValueError(wanted)
        elif base is bool:
            value = _boolean(raw)
        elif base is float:
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise ValueError("a number") from None
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError("a finite number")
        elif base is Path:
            value = Path(os.path.expanduser(str(raw)))
        elif base is str:
            if not isinstance(raw, str):
                raise ValueError("a string")
            value = raw
        elif origin is tuple:
            items = raw.split(",") if isinstance(raw, str) else list(raw)
            value = tuple(str(item).strip() for item in items if str(item).strip())
        elif origin is Mapping or base is Mapping:
            if not isinstance(raw, Mapping):
                raise ValueError("a table of librdkafka settings")
            value = {str(k): str(v) for k, v in raw.items()}
        else:  # a new field type without a converter is a programming error
            raise TypeError(f"no converter for {qualified} ({hint})")
    except ValueError as wanted:
        raise ConfigError(f"{qualified}: got {raw!r} from {where}; expected {wanted}") from None
    choices = _CHOICES.get((section, key))
    if choices is not None and value not in choices:
        raise ConfigError(
            f"{qualified}: got {raw!r} from {where}; allowed: {', '.join(map(str, choices))}"
        )
    return value


def _boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("true or false (also 1/0, yes/no, on/off)")


def _strip_optional(hint: Any) -> Any:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint

