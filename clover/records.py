"""Version-1 record contracts for the values on Clover's Kafka topics.

Other systems consume our topics, so the JSON Schema files in
``clover/schemas/`` are the published contract and the source of truth for
every rule: field types, ranges, enums, which fields are required, and a few
cross-field rules. The dataclasses below mirror those schemas by hand so that
Python code gets attribute access and type hints; ``tests/test_records.py``
checks that the two cannot drift apart.

Conventions (see the schemas for details):

* Values are compact UTF-8 JSON objects, one record per Kafka message.
* Times are integer microseconds since the Unix epoch and durations are
  integer microseconds; both use names ending in ``_us``.
* A field a source may not know is nullable (``X | None = None``): unknown
  stays ``null``, it is never guessed.
* ``additionalProperties`` is false everywhere, so a misspelt field is an
  error. Every record carries ``schema_version`` (1); evolution happens by
  publishing a new version, and a reader refuses versions it does not know.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import ipaddress
import json
import math
import operator
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import fastjsonschema
import msgspec
import orjson
from jsonschema import Draft202012Validator, FormatChecker, ValidationError, validators

SCHEMA_VERSION = 1
"""The only ``schema_version`` this build reads and writes."""

Observer = Literal["tcp_lifecycle", "tc_counter"]
Protocol = Literal["tcp", "udp", "icmp", "icmpv6"]
FlowState = Literal["open", "closed", "reset", "counter"]
ObservedAt = Literal["src", "dst"]
SpanKind = Literal[
    "server", "client", "producer", "consumer", "internal", "unspecified"
]
SpanSource = Literal["mixer", "otlp", "zipkin", "jaeger", "nezha", "other"]
Verdict = Literal["anomalous", "normal", "inconclusive"]
RollbackAction = Literal["rollback", "dry_run", "alert_only", "skip", "failed"]


def service_key(namespace: str | None, service: str) -> bytes:
    """The Kafka key for everything about one service: ``b"namespace/service"``.

    All records about a service share it, so they land on one partition in
    order. An unknown namespace is spelt ``unknown``.
    """
    return f"{namespace or 'unknown'}/{service}".encode()


# --------------------------------------------------------------------------
# Records (mirrors of clover/schemas/*.v1.json)


@dataclass
class Endpoint:
    """One side of a flow (``$defs/endpoint`` in flow.v1.json)."""

    addr: str
    port: int | None = None
    namespace: str | None = None
    service: str | None = None
    pod: str | None = None
    revision: str | None = None


@dataclass
class FlowRecord:
    """An L3/L4 flow seen by eBPF (topic clover.flows)."""

    SCHEMA: ClassVar[str] = "flow.v1.json"

    observer: Observer
    node: str
    protocol: Protocol
    ip_version: int
    src: Endpoint
    dst: Endpoint
    bytes_sent: int
    bytes_received: int
    packets_sent: int
    packets_received: int
    start_us: int
    duration_us: int
    state: FlowState
    interface: str | None = None
    observed_at: ObservedAt | None = None
    pid: int | None = None
    comm: str | None = None
    cgroup_id: int | None = None
    netns_ino: int | None = None
    end_us: int | None = None
    srtt_us: int | None = None
    schema_version: int = SCHEMA_VERSION

    def key(self) -> bytes:
        """The server side's service when known, else the client's, else its address."""
        for end in (self.dst, self.src):
            if end.service:
                return service_key(end.namespace, end.service)
        return f"unknown/{self.dst.addr}".encode()


@dataclass
class SpanRecord:
    """One normalised span (topic clover.spans)."""

    SCHEMA: ClassVar[str] = "span.v1.json"

    trace_id: str
    span_id: str
    service: str
    operation: str
    kind: SpanKind
    start_us: int
    duration_us: int
    error: bool
    source: SpanSource
    parent_span_id: str | None = None
    namespace: str | None = None
    pod: str | None = None
    revision: str | None = None
    status_code: int | None = None
    peer_namespace: str | None = None
    peer_service: str | None = None
    bytes_sent: int | None = None
    bytes_received: int | None = None
    schema_version: int = SCHEMA_VERSION

    def key(self) -> bytes:
        return service_key(self.namespace, self.service)


@dataclass
class ServiceMetrics:
    """Per-window aggregate for a service revision, or a caller -> callee edge
    when ``peer_service`` is set (topic clover.service-metrics)."""

    SCHEMA: ClassVar[str] = "service-metrics.v1.json"

    namespace: str
    service: str
    revision: str
    window_start_us: int
    window_seconds: int
    requests: int
    errors: int
    bytes_in: int
    bytes_out: int
    flows: int
    connections_opened: int
    connections_closed: int
    connections_reset: int
    peer_namespace: str | None = None
    peer_service: str | None = None
    error_rate: float | None = None
    latency_p50_ms: float | None = None
    latency_p90_ms: float | None = None
    latency_p99_ms: float | None = None
    latency_max_ms: float | None = None
    latency_sketch: str | None = None
    # Requests per call pattern (analytics/windows.py; models/structure.py judges them).
    call_patterns: dict[str, int] | None = None
    schema_version: int = SCHEMA_VERSION

    def key(self) -> bytes:
        return service_key(self.namespace, self.service)


@dataclass
class Contribution:
    """One feature's share of an anomaly score (``$defs/contribution``)."""

    feature: str
    weight: float
    value: float | None = None
    baseline: float | None = None


@dataclass
class Anomaly:
    """A detector's verdict on one service-metrics window (topic clover.anomalies)."""

    SCHEMA: ClassVar[str] = "anomaly.v1.json"

    namespace: str
    service: str
    revision: str
    window_start_us: int
    window_seconds: int
    detector: str
    threshold: float
    verdict: Verdict
    emitted_us: int
    score: float | None = None
    reason: str | None = None
    contributions: list[Contribution] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def key(self) -> bytes:
        return service_key(self.namespace, self.service)


@dataclass
class RollbackDecision:
    """A decision of the rollback controller, acted on or not (topic clover.rollbacks)."""

    SCHEMA: ClassVar[str] = "rollback.v1.json"

    namespace: str
    service: str
    decided_us: int
    action: RollbackAction
    reason: str
    message: str
    consecutive_anomalous: int
    dry_run: bool
    deployment: str | None = None
    from_revision: int | None = None
    to_revision: int | None = None
    score: float | None = None
    threshold: float | None = None
    anomaly_window_start_us: int | None = None
    patched_us: int | None = None
    schema_version: int = SCHEMA_VERSION

    def key(self) -> bytes:
        return service_key(self.namespace, self.service)


@dataclass
class DeadLetter:
    """A message a component could not process, kept verbatim (topic clover.deadletter)."""

    SCHEMA: ClassVar[str] = "deadletter.v1.json"

    source_topic: str
    value_b64: str
    reason: str
    component: str
    at_us: int
    partition: int | None = None
    offset: int | None = None
    key_b64: str | None = None
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def wrap(
        cls,
        *,
        source_topic: str,
        key: bytes | None,
        value: bytes | None,
        reason: str,
        component: str,
        at_us: int,
        partition: int | None = None,
        offset: int | None = None,
    ) -> DeadLetter:
        """Build a dead letter from the raw bytes of the rejected message."""
        return cls(
            source_topic=source_topic,
            value_b64=base64.b64encode(value or b"").decode("ascii"),
            reason=reason,
            component=component,
            at_us=at_us,
            partition=partition,
            offset=offset,
            key_b64=None if key is None else base64.b64encode(key).decode("ascii"),
        )

    def key(self) -> bytes:
        """The original key, so a dead letter sits with its service's other records."""
        if self.key_b64:
            try:
                original = base64.b64decode(self.key_b64, validate=True)
            except (binascii.Error, ValueError):
                original = b""
            if original:
                return original
        return b"unknown/deadletter"


RECORD_TYPES: tuple[type, ...] = (
    FlowRecord,
    SpanRecord,
    ServiceMetrics,
    Anomaly,
    RollbackDecision,
    DeadLetter,
)

# Fields holding nested records, per top-level type: name -> (type, is_list).
_NESTED: dict[type, dict[str, tuple[type, bool]]] = {
    FlowRecord: {"src": (Endpoint, False), "dst": (Endpoint, False)},
    Anomaly: {"contributions": (Contribution, True)},
}

# Types with float fields (also nested): the only ones that can hold NaN or Infinity. The
# high-volume ones (flows, spans) have none, so their fast path skips the check.
_HAS_FLOATS = (ServiceMetrics, Anomaly, RollbackDecision)

R = TypeVar("R")


# --------------------------------------------------------------------------
# Errors


class RecordError(ValueError):
    """A record does not satisfy its published schema.

    ``errors`` lists every problem as ``(field path, rule, message)``, e.g.
    ``("src.port", "maximum", "70000 is greater than the maximum of 65535")``.
    The path is empty for problems with the record as a whole.
    """

    def __init__(self, record_type: type, errors: list[tuple[str, str, str]]) -> None:
        self.record_type = record_type
        self.errors = list(errors)
        name = getattr(record_type, "__name__", str(record_type))
        lines = [
            f"{name}{'.' + path if path else ''}: {message} (rule: {rule})"
            for path, rule, message in self.errors
        ]
        super().__init__("\n".join(lines))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.record_type, self.errors))

    @property
    def fields(self) -> list[str]:
        """The field paths that have errors."""
        return [path for path, _, _ in self.errors]

    @property
    def rules(self) -> list[str]:
        """The rules that were broken, in the same order as ``fields``."""
        return [rule for _, rule, _ in self.errors]


# --------------------------------------------------------------------------
# Schemas and validation


def _schema_name(record_type: type) -> str:
    if record_type not in RECORD_TYPES:
        raise TypeError(f"{record_type!r} is not a Clover record type")
    schema: str = getattr(record_type, "SCHEMA")  # noqa: B009 - a ClassVar of each record type
    return schema


def schema_path(record_type: type) -> Path:
    """Filesystem path of the published schema for ``record_type``."""
    return Path(str(files("clover") / "schemas" / _schema_name(record_type)))


def load_schema(record_type: type) -> dict[str, Any]:
    """The published JSON Schema for ``record_type``, freshly parsed."""
    text = (files("clover") / "schemas" / _schema_name(record_type)).read_text("utf-8")
    return json.loads(text)


def _ecma_pattern(
    validator: Any, pattern: str, instance: Any, schema: dict[str, Any]
) -> Iterator[ValidationError]:
    """``pattern`` with ECMA-262 semantics for a final ``$`` (end of input).

    Consumers' validators use ECMA regexes; Python's ``$`` would also accept a
    trailing newline (``"cooldown\\n"``) that they reject.
    """
    if not validator.is_type(instance, "string"):
        return
    python_pattern = pattern
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        python_pattern = pattern[:-1] + r"\Z"
    if not re.search(python_pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


_Validator = validators.extend(Draft202012Validator, {"pattern": _ecma_pattern})


@functools.cache
def _validator(record_type: type) -> Any:
    schema = load_schema(record_type)
    Draft202012Validator.check_schema(schema)
    return _Validator(schema, format_checker=FormatChecker())


def _format_path(parts: Any) -> str:
    text = ""
    for part in parts:
        text += (
            f"[{part}]"
            if isinstance(part, int)
            else (f".{part}" if text else str(part))
        )
    return text


def _short(message: str, limit: int = 300) -> str:
    return message if len(message) <= limit else message[: limit - 1] + "…"


def _cross_field_note(schema: dict[str, Any], error: ValidationError) -> str:
    """For an error from a cross-field rule (the schema's ``allOf``), say which rule."""
    where = list(error.absolute_schema_path)
    if len(where) >= 2 and where[0] == "allOf":
        rule = schema["allOf"][where[1]]["description"].rstrip(".")
        return f"; {rule[:1].lower()}{rule[1:]}"
    return ""


def _explain(
    error: ValidationError, schema: dict[str, Any]
) -> Iterator[tuple[str, str, str]]:
    """Turn one jsonschema error into (path, rule, message) entries."""
    parts = list(error.absolute_path)
    rule = str(error.validator)
    note = _cross_field_note(schema, error)
    if rule == "required":
        # Name the missing field itself, not the object that lacks it.
        for name in error.validator_value:
            if name not in error.instance:
                yield _format_path([*parts, name]), rule, "missing" + note
    elif rule == "additionalProperties" and isinstance(error.instance, dict):
        known = error.schema.get("properties", {})
        for name in error.instance:
            if name not in known:
                yield (
                    _format_path([*parts, name]),
                    rule,
                    f"unknown field {name!r} (not part of version {SCHEMA_VERSION})",
                )
    elif (
        rule == "anyOf"
        and error.context
        and all(sub.validator == "format" for sub in error.context)
    ):
        formats = " or ".join(str(sub.validator_value) for sub in error.context)
        yield (
            _format_path(parts),
            "format",
            _short(f"{error.instance!r} is not a valid {formats}"),
        )
    else:
        yield _format_path(parts), rule, _short(error.message) + note


def _non_finite(
    value: Any, parts: tuple[Any, ...] = ()
) -> Iterator[tuple[str, str, str]]:
    """NaN and Infinity pass numeric range checks but are not JSON numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        yield _format_path(parts), "type", f"{value!r} is not a JSON number"
    elif isinstance(value, dict):
        for name, item in value.items():
            yield from _non_finite(item, (*parts, name))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _non_finite(item, (*parts, index))


def _version_error(data: dict[str, Any]) -> tuple[str, str, str] | None:
    if "schema_version" not in data:
        return (
            "schema_version",
            "schema_version",
            f"missing; this build reads version {SCHEMA_VERSION} and will not guess",
        )
    version = data["schema_version"]
    if type(version) is not int:
        return (
            "schema_version",
            "schema_version",
            f"{version!r} is not a version number (must be the integer {SCHEMA_VERSION})",
        )
    if version != SCHEMA_VERSION:
        return (
            "schema_version",
            "schema_version",
            (
                f"version {version} is not supported by this build (reads {SCHEMA_VERSION}); "
                "upgrade Clover or route this producer to a topic of that version"
            ),
        )
    return None


def _ecma_patterns(schema: Any) -> Any:
    """A copy of ``schema`` whose patterns end in ``\\Z`` where ECMA's ``$`` means end of input
    (see :func:`_ecma_pattern`), for fastjsonschema, which uses Python's ``re`` as it is."""
    if isinstance(schema, dict):
        return {
            key: (value[:-1] + r"\Z" if key == "pattern" and isinstance(value, str)
                  and value.endswith("$") and not value.endswith("\\$")
                  else _ecma_patterns(value))
            for key, value in schema.items()
        }
    if isinstance(schema, list):
        return [_ecma_patterns(item) for item in schema]
    return schema


def _is_ip(kind: type) -> Any:
    """The same check as jsonschema's FormatChecker, zone indexes (``%eth0``) refused."""
    def check(text: str) -> bool:
        try:
            return not getattr(kind(text), "scope_id", None)
        except ValueError:
            return False

    return check


@functools.cache
def _fast_validator(record_type: type) -> Any:
    """The schema compiled to Python by fastjsonschema: ~30x faster than jsonschema on a valid
    record, but it stops at the first error with a terse message. So it only ever says "valid";
    for an invalid record jsonschema runs again to explain every problem."""
    return fastjsonschema.compile(
        _ecma_patterns(load_schema(record_type)),
        formats={"ipv4": _is_ip(ipaddress.IPv4Address), "ipv6": _is_ip(ipaddress.IPv6Address)},
    )


def _check(record_type: type, data: Any) -> None:
    if (isinstance(data, dict) and _version_error(data) is None
            and (record_type not in _HAS_FLOATS or not any(_non_finite(data)))):
        try:
            _fast_validator(record_type)(data)
            return
        except fastjsonschema.JsonSchemaValueException:
            pass  # explained below
    validator = _validator(record_type)
    if not isinstance(data, dict):
        raise RecordError(
            record_type,
            [("", "type", f"expected a JSON object, got {type(data).__name__}")],
        )
    # The version decides which rules apply, so check it alone and first.
    version_error = _version_error(data)
    if version_error:
        raise RecordError(record_type, [version_error])
    found = {
        entry
        for error in validator.iter_errors(data)
        for entry in _explain(error, validator.schema)
    }
    found.update(_non_finite(data))
    if found:
        raise RecordError(record_type, sorted(found))


_REMEMBERED_MAX = 10_000  # valid combinations a field_validator keeps


@functools.cache
def field_validator(record_type: type, fields: frozenset[str],
                    remembered: frozenset[str] = frozenset()) -> Any:
    """A check of only ``fields`` of a ``record_type`` dict against the published schema (each
    one's type, pattern, range, enum, and whether it is required), for hot paths that set the
    other fields themselves from typed code, so that those cannot be wrong. The returned
    function raises :class:`RecordError` when a field is wrong, explained as :func:`validate`
    explains it.

    ``remembered`` (a subset of ``fields``, string fields only) are fields whose values repeat
    from record to record (service, operation and peer names): each combination of their values
    that passed is remembered (at most 10,000, then forgotten all at once) and not checked
    again. Only strings and None, so an equal combination is the same one (1 == True == 1.0).

    Only for record types without float fields (no NaN check) and without cross-field rules.
    """
    if record_type in _HAS_FLOATS:
        raise TypeError(f"{record_type.__name__} has float fields: use validate()")
    schema = load_schema(record_type)
    unknown = (fields | remembered) - schema["properties"].keys()
    if unknown:
        raise ValueError(f"{record_type.__name__} has no fields {sorted(unknown)}")
    if not remembered <= fields:
        raise ValueError(f"remembered fields {sorted(remembered - fields)} are not checked")
    if "allOf" in schema:
        raise TypeError(f"{record_type.__name__} has cross-field rules: use validate()")
    for name in remembered:
        kind = schema["properties"][name].get("type")
        if kind not in ("string", ["string", "null"]):
            raise TypeError(f"{record_type.__name__}.{name} is not a string field: it cannot "
                            "be remembered")

    def compiled(names: frozenset[str]) -> Any:
        partial = {key: value for key, value in schema.items()
                   if key not in ("properties", "required", "additionalProperties")}
        partial["properties"] = {name: rule for name, rule in schema["properties"].items()
                                 if name in names}
        partial["required"] = [name for name in schema.get("required", []) if name in names]
        return fastjsonschema.compile(_ecma_patterns(partial), formats={
            "ipv4": _is_ip(ipaddress.IPv4Address), "ipv6": _is_ip(ipaddress.IPv6Address)})

    check_each = compiled(fields - remembered)
    check_remembered = compiled(remembered) if remembered else None
    values_of = operator.itemgetter(*sorted(remembered)) if remembered else None
    passed: dict[Any, None] = {}

    def check(data: dict[str, Any]) -> None:
        try:
            check_each(data)
            if check_remembered is not None:
                try:
                    values = values_of(data)  # type: ignore[misc]
                except KeyError:  # an optional field left out: nothing to remember
                    check_remembered(data)
                    return
                if values not in passed:
                    check_remembered(data)
                    if len(passed) >= _REMEMBERED_MAX:
                        passed.clear()
                    passed[values] = None
        except fastjsonschema.JsonSchemaValueException as exc:
            _check(record_type, data)  # raises, explaining every problem
            raise RecordError(record_type, [(str(exc.name or ""), str(exc.rule or "invalid"),
                                             _short(str(exc)))]) from None

    return check


# Schema keywords fast_decoder turns into msgspec types; any other makes it refuse the schema.
_FAST_KEYWORDS = frozenset({"type", "enum", "const", "pattern", "minimum", "maximum",
                            "minLength", "maxLength", "description", "$ref", "anyOf",
                            "format"})
_JSON_TYPES: dict[str, Any] = {"string": str, "integer": int, "boolean": bool,
                               "number": float, "null": None}


@functools.cache
def fast_decoder(record_type: type) -> Any:
    """A decoder of ``record_type``'s JSON into a struct with the record's fields, checking the
    published schema as it parses, in C (msgspec): for the stream worker, where decode() with
    its schema check costs more than everything else the worker does with a record.

    The struct types are made from the schema itself (types, nullability, required fields,
    enums, consts, patterns, lengths, ranges, nested objects, no unknown fields), so there is
    one contract. What msgspec cannot express is checked after parsing: IP address formats
    (with the addresses seen remembered, as they repeat), integer bounds beyond int64, and the
    schema's cross-field rules (``allOf`` of if/then/else on consts, enums and types).

    It never accepts what the schema refuses (tests hold it to jsonschema on generated records);
    it may refuse a valid record in a corner it reads more strictly (1.0 for an integer), so a
    refusal is for decode() to confirm and explain. A schema with rules it cannot express is a
    TypeError: use decode() for that type. The decoder raises ValueError on anything it refuses.
    """
    decode, checks, _ = _fast_parts(record_type, lift_ids=False)
    if not checks:
        return decode

    def decode_and_check(data: bytes) -> Any:
        record = decode(data)
        for check in checks:
            check(record)
        return record

    return decode_and_check


# The id patterns of the published schemas (as _ecma_patterns writes them), which the batch
# decoder checks on a whole column at once instead of with a regex per record: lowercase hex,
# not all zero, of these lengths.
_HEX_ID_PATTERNS: dict[str, tuple[int, ...]] = {
    r"^(?!0+$)[0-9a-f]{16}\Z": (16,),
    r"^(?!0+$)([0-9a-f]{16}|[0-9a-f]{32})\Z": (16, 32),
}


@functools.cache
def batch_decoder(record_type: type) -> Callable[[Sequence[bytes | None]], list[Any] | None]:
    """A decoder of a whole batch of ``record_type`` JSON values for the stream worker: the
    structs of :func:`fast_decoder` for every value, or None if any value is refused.

    It checks what fast_decoder checks, except that the hex id patterns (trace and span ids)
    are checked on the batch's column of each id at once rather than by a regex per record. A
    batch it refuses is for the caller to decode record by record, which finds the bad ones and
    explains them."""
    decode, checks, id_checks = _fast_parts(record_type, lift_ids=True)
    refused = (msgspec.ValidationError, msgspec.DecodeError, ValueError, TypeError)

    def decode_batch(values: Sequence[bytes | None]) -> list[Any] | None:
        try:
            decoded = list(map(decode, values))
            for check in checks:
                for record in decoded:
                    check(record)
        except refused:  # TypeError: a value that is not bytes (a tombstone's None)
            return None
        if all(check(decoded) for check in id_checks):
            return decoded
        return None

    return decode_batch


def _fast_parts(record_type: type, *, lift_ids: bool) -> tuple[Any, list[Any], list[Any]]:
    """The msgspec decode of ``record_type``, the checks of one parsed record that follow it,
    and (with ``lift_ids``) the checks of a list of parsed records that replace the id
    patterns it then leaves out."""
    schema = _ecma_patterns(load_schema(record_type))
    extra = set(schema) - {"$schema", "$id", "title", "description", "type", "$defs",
                           "additionalProperties", "required", "properties", "allOf"}
    if extra:
        raise TypeError(f"{record_type.__name__}'s schema has rules a fast decoder cannot "
                        f"check ({sorted(extra)})")
    checks: list[Any] = []
    id_checks: list[Any] | None = [] if lift_ids else None
    struct = _fast_struct(record_type.__name__, schema, schema.get("$defs", {}), (), checks,
                          id_checks)
    required = set(schema.get("required", ()))
    for rule in schema.get("allOf", ()):
        checks.append(_cross_field_check(record_type.__name__, rule, required))
    return msgspec.json.Decoder(struct).decode, checks, id_checks or []


def _hex_ids_check(path: tuple[str, ...], lengths: tuple[int, ...]) -> Any:
    """Whether every id in a field of a list of parsed records (None skipped) is lowercase hex
    of one of ``lengths`` and not all zero: the schema's id pattern, on the whole column.

    The ids are joined with commas: the joined text less its hex digits is then the commas
    alone exactly when every id is hex."""
    read = operator.attrgetter(".".join(path))
    allowed = frozenset(lengths)
    zeros = frozenset("0" * length for length in lengths)

    def check(records: list[Any]) -> bool:
        ids = list(map(read, records))
        if None in ids:
            ids = [value for value in ids if value is not None]
        if not set(map(len, ids)) <= allowed:
            return False
        joined = ",".join(ids)
        if not joined.isascii():  # then some character is not a hex digit
            return False
        if joined.encode("ascii").translate(None, b"0123456789abcdef") != b"," * (len(ids) - 1):
            return False
        return zeros.isdisjoint(ids)

    return check


def _fast_struct(name: str, schema: dict[str, Any], defs: dict[str, Any],
                 path: tuple[str, ...], checks: list[Any],
                 id_checks: list[Any] | None = None) -> Any:
    """The msgspec struct type of an object schema; checks it cannot express go to ``checks``.
    With ``id_checks``, hex id patterns are left out of the struct, and their column checks go
    there."""
    if schema.get("additionalProperties") is not False:
        raise TypeError(f"{name} allows additional properties: a fast decoder cannot check it")
    required = set(schema.get("required", ()))
    fields: list[tuple[Any, ...]] = []
    for field_name, rule in schema["properties"].items():
        where = (*path, field_name)
        if "$ref" in rule:
            target = rule["$ref"].removeprefix("#/$defs/")
            if target not in defs or set(rule) - {"$ref", "description"}:
                raise TypeError(f"{name}.{field_name}: a fast decoder follows only plain "
                                f"references to $defs")
            kind = _fast_struct(target, defs[target], defs, where, checks, id_checks)
        else:
            if id_checks is not None and rule.get("pattern") in _HEX_ID_PATTERNS:
                id_checks.append(_hex_ids_check(where, _HEX_ID_PATTERNS[rule["pattern"]]))
                rule = {key: value for key, value in rule.items() if key != "pattern"}
            kind = _fast_type(name, field_name, rule)
            _add_format_check(name, where, rule, checks)
            _add_bound_check(where, rule, checks)
        if field_name in required:
            fields.append((field_name, kind))
        elif "$ref" not in rule and _allows_null(rule):
            fields.append((field_name, kind, None))
        else:
            fields.append((field_name, kind | msgspec.UnsetType, msgspec.UNSET))
    fields.sort(key=lambda f: len(f) > 2)  # required fields first, as Python requires
    # Not tracked by the cyclic garbage collector (gc=False): a decoded record holds only
    # scalars and other such records, so it can be in no cycle, and a stream worker decoding
    # thousands of them per batch would otherwise set off collections that scan its whole heap.
    return msgspec.defstruct(f"Fast{name}", fields, kw_only=True, forbid_unknown_fields=True,
                             gc=False)


def _add_format_check(name: str, path: tuple[str, ...], rule: dict[str, Any],
                      checks: list[Any]) -> None:
    """IP formats (``format``, or ``anyOf`` of formats) are checked after parsing."""
    formats = ([rule["format"]] if "format" in rule else
               [option.get("format") for option in rule.get("anyOf", ())])
    if not formats:
        return
    if set(formats) - {"ipv4", "ipv6"} or any(
            set(option) != {"format"} for option in rule.get("anyOf", ())):
        raise TypeError(f"{name}.{path[-1]}: a fast decoder checks only IP address formats")
    checks.append(_field_check(path, _valid_ip(frozenset(formats)),
                               f"is not an IP address of {sorted(formats)}"))


def _field_check(path: tuple[str, ...], valid: Any, problem: str) -> Any:
    """A check of one (nested) field of a parsed record: a value that is there and not
    ``valid`` raises ValueError naming the field and the ``problem``."""
    read = operator.attrgetter(".".join(path))
    dotted = ".".join(path)

    def check(record: Any) -> None:
        value = read(record)
        if value is not None and not valid(value):
            raise ValueError(f"{dotted}: {value!r} {problem}")

    return check


def _cross_field_check(name: str, rule: dict[str, Any], required: set[str]) -> Any:
    """An ``if``/``then``/``else`` rule of the schema as a check of a parsed record."""
    if set(rule) - {"if", "then", "else", "description"}:
        raise TypeError(f"{name}: a fast decoder checks only if/then/else cross-field rules")
    when, then, otherwise = (_branch(name, rule.get(key, {}), required)
                             for key in ("if", "then", "else"))
    text = rule.get("description", "a cross-field rule")

    def check(record: Any) -> None:
        if not (then if when(record) else otherwise)(record):
            raise ValueError(f"{name}: {text}")

    return check


def _branch(name: str, rule: dict[str, Any], required: set[str]) -> Any:
    """Whether a record matches a subschema of properties (const, enum, type) and required.

    An optional nullable field reads None whether it was left out or null; so ``required`` is
    accepted only for a field that is required anyway or that this branch keeps from being
    null, where both readings give the same answer."""
    properties = rule.get("properties", {})
    if set(rule) - {"properties", "required"} or any(
            set(p) - {"const", "enum", "type"} for p in properties.values()):
        raise TypeError(f"{name}: a fast decoder checks only consts, enums and types in "
                        "cross-field rules")
    for field_name in rule.get("required", ()):
        if field_name not in required and _allows_null(properties.get(field_name, {"type":
                                                                                  "null"})):
            raise TypeError(f"{name}.{field_name}: required in a cross-field rule but may be "
                            "null")

    def matches(record: Any) -> bool:
        for field_name, allowed in properties.items():
            value = getattr(record, field_name)
            if value is msgspec.UNSET:
                continue  # left out: the branch's properties do not apply
            if "const" in allowed and not _same_json(value, allowed["const"]):
                return False
            if "enum" in allowed and not any(_same_json(value, v) for v in allowed["enum"]):
                return False
            if "type" in allowed and not _of_json_type(value, allowed["type"]):
                return False
        return all(getattr(record, field_name) is not msgspec.UNSET
                   for field_name in rule.get("required", ()))

    return matches


def _same_json(value: Any, expected: Any) -> bool:
    return value == expected and (type(value) is bool) == (type(expected) is bool)


def _of_json_type(value: Any, kinds: str | list[str]) -> bool:
    names = kinds if isinstance(kinds, list) else [kinds]
    return any(
        (kind == "null" and value is None)
        or (kind == "integer" and type(value) is int)
        or (kind == "number" and type(value) in (int, float))
        or (kind == "string" and type(value) is str)
        or (kind == "boolean" and type(value) is bool)
        for kind in names)


INT64_MAX = 2**63 - 1  # the largest signed 64-bit integer (msgspec, numpy, CQL bigint)


def _add_bound_check(path: tuple[str, ...], rule: dict[str, Any], checks: list[Any]) -> None:
    """msgspec cannot bound an integer beyond int64 (a cgroup id is a uint64): checked after
    parsing."""
    high = rule.get("maximum")
    if high is None or high <= INT64_MAX:
        return
    checks.append(_field_check(path, lambda value: value <= high,
                               f"is above the maximum {high}"))


@functools.cache
def _valid_ip(formats: frozenset[str]) -> Any:
    kinds = [_is_ip(ipaddress.IPv4Address if f == "ipv4" else ipaddress.IPv6Address)
             for f in sorted(formats)]

    @functools.lru_cache(maxsize=65_536)  # a node's flows repeat a few thousand addresses
    def valid(text: str) -> bool:
        return any(kind(text) for kind in kinds)

    return valid


def _allows_null(rule: dict[str, Any]) -> bool:
    kinds = rule.get("type", [])
    return "null" in (kinds if isinstance(kinds, list) else [kinds]) or None in rule.get(
        "enum", ())


def _fast_type(record_name: str, name: str, rule: dict[str, Any]) -> Any:
    unknown = set(rule) - _FAST_KEYWORDS
    if unknown:
        raise TypeError(f"{record_name}.{name} has rules a fast decoder cannot check "
                        f"({sorted(unknown)})")
    if "const" in rule:
        return Literal[rule["const"]]  # type: ignore[valid-type]
    if "enum" in rule:
        values = tuple(value for value in rule["enum"] if value is not None)
        base: Any = Literal[values]  # type: ignore[valid-type]
    else:
        kinds = rule["type"] if isinstance(rule["type"], list) else [rule["type"]]
        named = [kind for kind in kinds if kind != "null"]
        if len(named) != 1:
            raise TypeError(f"{record_name}.{name} has types {kinds}")
        base = _JSON_TYPES[named[0]]
        meta = {key: value for key, value in (
            ("pattern", rule.get("pattern")), ("ge", rule.get("minimum")),
            ("le", rule.get("maximum") if rule.get("maximum", 0) <= INT64_MAX else None),
            ("min_length", rule.get("minLength")),
            ("max_length", rule.get("maxLength"))) if value is not None}
        if meta:
            base = Annotated[base, msgspec.Meta(**meta)]
    return base | None if _allows_null(rule) else base


def validate(record_type: type, data: dict[str, Any]) -> None:
    """Check a JSON-like dict against ``record_type``'s published schema.

    Raises :class:`RecordError` listing every problem, sorted by field path.
    An unsupported or missing ``schema_version`` is reported on its own.
    """
    _check(record_type, data)


# --------------------------------------------------------------------------
# Conversion


def to_dict(record: Any) -> dict[str, Any]:
    """The record as a JSON-ready dict (nested records become dicts)."""
    if type(record) not in RECORD_TYPES:
        raise TypeError(f"{type(record)!r} is not a Clover record type")
    return dataclasses.asdict(record)


def from_dict(record_type: type[R], data: dict[str, Any]) -> R:
    """Validate ``data`` and build a ``record_type`` from it."""
    _check(record_type, data)
    kwargs = dict(data)
    for name, (nested_type, is_list) in _NESTED.get(record_type, {}).items():
        if name in kwargs:
            value = kwargs[name]
            kwargs[name] = (
                [nested_type(**item) for item in value]
                if is_list
                else nested_type(**value)
            )
    return record_type(**kwargs)


def encode(record: Any, *, validate: bool = True) -> bytes:
    """Serialize a record as compact UTF-8 JSON, fields in schema order.

    Validates against the schema first unless ``validate=False`` (for hot
    paths that built the record themselves). orjson serializes the
    dataclasses directly, several times faster than ``json`` over ``asdict``;
    it would write NaN as null, so non-finite floats are refused here first.
    (The record classes are plain dataclasses, not slotted: orjson reads a
    plain one's ``__dict__`` directly, about five times faster.)
    """
    record_type = type(record)
    if record_type not in RECORD_TYPES:
        raise TypeError(f"{record_type!r} is not a Clover record type")
    if record_type in _HAS_FLOATS:
        if validate:
            _check(record_type, to_dict(record))
        else:
            # A flat record's fields are its __dict__ (no asdict copy: this is a hot path).
            fields = to_dict(record) if record_type in _NESTED else vars(record)
            if record_type in _NESTED or not all(
                    math.isfinite(value) for value in fields.values() if type(value) is float):
                bad = [(path, "json", message) for path, _, message in _non_finite(fields)]
                if bad:
                    raise RecordError(record_type, bad)
    try:
        payload = orjson.dumps(record)
    except orjson.JSONEncodeError as exc:
        raise RecordError(
            record_type, [("", "json", f"cannot encode as JSON: {exc}")]
        ) from exc
    if validate and record_type not in _HAS_FLOATS:
        # The payload parsed back is the record as a dict, ~10x faster than asdict(); without
        # floats there is no NaN that orjson could have turned into null.
        _check(record_type, orjson.loads(payload))
    return payload


def decode(record_type: type[R], data: bytes | str) -> R:
    """Parse a JSON message value and build a validated ``record_type``."""
    try:
        parsed = orjson.loads(data)  # refuses NaN and Infinity, which are not JSON
    except (orjson.JSONDecodeError, RecursionError) as exc:
        raise RecordError(
            record_type, [("", "json", _short(f"not valid JSON: {exc}"))]
        ) from exc
    return from_dict(record_type, parsed)
