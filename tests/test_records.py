"""Unit tests for the v1 record contracts (clover.records, clover.topics).

No servers needed. The published JSON Schemas are the source of truth, so
several tests read them directly: to check the hand-written dataclasses
against them, and to derive malformed records for hypothesis.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import ipaddress
import json
import pickle
import re
import typing
from concurrent.futures import Future
from typing import Any, ClassVar, Protocol

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from clover import records, topics
from clover.records import (
    RECORD_TYPES,
    Anomaly,
    Contribution,
    DeadLetter,
    Endpoint,
    FlowRecord,
    RecordError,
    RollbackDecision,
    ServiceMetrics,
    SpanRecord,
    decode,
    encode,
    from_dict,
    load_schema,
    schema_path,
    service_key,
    to_dict,
    validate,
)
from tests.samples import (
    SAMPLES,
    sample_anomaly,
    sample_deadletter,
    sample_edge_metrics,
    sample_flow,
    sample_rollback,
    sample_service_metrics,
    sample_span,
    sample_tc_flow,
)

SAMPLE_NAMES = sorted(SAMPLES)
NESTED = {"endpoint": Endpoint, "contribution": Contribution}


def fmt(path: tuple[Any, ...]) -> str:
    """("contributions", 0, "weight") -> "contributions[0].weight"."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def pairs(error: RecordError) -> set[tuple[str, str]]:
    return {(path, rule) for path, rule, _ in error.errors}


def rejected(record_type: type, data: Any) -> RecordError:
    with pytest.raises(RecordError) as info:
        validate(record_type, data)
    return info.value


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_sample_round_trips_through_encode_and_decode(name: str) -> None:
    record = SAMPLES[name]()
    payload = encode(record)
    assert isinstance(payload, bytes)
    assert decode(type(record), payload) == record
    assert decode(type(record), payload.decode()) == record
    assert from_dict(type(record), to_dict(record)) == record


def test_every_record_type_has_a_sample() -> None:
    assert {type(build()) for build in SAMPLES.values()} == set(RECORD_TYPES)


def test_encode_is_compact_utf8_json_in_field_order() -> None:
    record = sample_span()
    record.operation = "GET /warenkörbe/{id}"
    payload = encode(record)
    assert payload.startswith(
        b'{"trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","span_id":'
    )
    assert b": " not in payload and b", " not in payload
    assert "körbe".encode() in payload
    assert json.loads(payload)["schema_version"] == 1


def test_decode_builds_nested_records() -> None:
    flow = decode(FlowRecord, encode(sample_flow()))
    assert isinstance(flow.src, Endpoint) and isinstance(flow.dst, Endpoint)
    anomaly = decode(Anomaly, encode(sample_anomaly()))
    assert all(isinstance(c, Contribution) for c in anomaly.contributions)


def test_nullable_fields_may_be_omitted_and_default_to_none() -> None:
    data = to_dict(sample_span())
    for name in ("parent_span_id", "namespace", "status_code", "bytes_sent"):
        del data[name]
    span = from_dict(SpanRecord, data)
    assert span.parent_span_id is None and span.namespace is None


def test_encode_validates_unless_told_not_to() -> None:
    record = sample_flow()
    record.src.port = 70000
    with pytest.raises(RecordError):
        encode(record)
    payload = encode(record, validate=False)
    with pytest.raises(RecordError) as info:
        decode(FlowRecord, payload)
    assert ("src.port", "maximum") in pairs(info.value)


def test_non_finite_numbers_are_refused() -> None:
    record = sample_service_metrics()
    record.latency_p50_ms = float("nan")
    with pytest.raises(RecordError) as info:
        encode(record)
    assert ("latency_p50_ms", "type") in pairs(info.value)
    with pytest.raises(RecordError) as info:
        encode(record, validate=False)
    assert info.value.rules == ["json"]
    text = encode(sample_service_metrics()).replace(
        b'"latency_p50_ms":11.5', b'"latency_p50_ms":NaN'
    )
    with pytest.raises(RecordError) as info:
        decode(ServiceMetrics, text)
    assert info.value.rules == ["json"]


# ------------------------------------------------------------- schema files


class _Record(Protocol):
    """A record type: each names its published schema file."""
    SCHEMA: ClassVar[str]


@pytest.mark.parametrize("record_type", RECORD_TYPES, ids=lambda t: t.__name__)
def test_schema_file_is_a_readable_draft_2020_12_contract(record_type: type[_Record]) -> None:
    path = schema_path(record_type)
    assert path.is_file() and path.name == record_type.SCHEMA
    schema = json.loads(path.read_text())
    assert schema == load_schema(record_type)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"https://clover.dev/schemas/{record_type.SCHEMA}"
    assert schema["title"] == record_type.__name__
    assert schema["description"]
    assert schema["properties"]["schema_version"] == {
        "description": schema["properties"]["schema_version"]["description"],
        "const": 1,
    }
    for obj in [schema, *schema.get("$defs", {}).values()]:
        assert obj["type"] == "object" and obj["additionalProperties"] is False
        for name, prop in obj["properties"].items():
            assert prop.get("description"), (
                f"{record_type.SCHEMA}: {name} has no description"
            )


def _dataclass_schema_pairs() -> list[tuple[type, dict[str, Any], bool]]:
    out = []
    for record_type in RECORD_TYPES:
        schema = load_schema(record_type)
        out.append((record_type, schema, True))
        for def_name, definition in schema.get("$defs", {}).items():
            out.append((NESTED[def_name], definition, False))
    return out


@pytest.mark.parametrize(
    ("cls", "schema", "top_level"),
    _dataclass_schema_pairs(),
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_dataclass_mirrors_schema(
    cls: type, schema: dict[str, Any], top_level: bool
) -> None:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    properties = schema["properties"]
    assert set(fields) == set(properties)

    def has_default(f: dataclasses.Field) -> bool:
        return (
            f.default is not dataclasses.MISSING
            or f.default_factory is not dataclasses.MISSING
        )

    without_default = {name for name, f in fields.items() if not has_default(f)}
    expected_required = without_default | ({"schema_version"} if top_level else set())
    assert set(schema["required"]) == expected_required
    if top_level:
        assert fields["schema_version"].default == 1

    hints = typing.get_type_hints(cls)
    for name, f in fields.items():
        prop = properties[name]
        types = prop.get("type", [])
        types = [types] if isinstance(types, str) else types
        # Nullable in the schema <=> Optional with default None in Python.
        assert ("null" in types) == (has_default(f) and f.default is None), name
        # Literal enums match the schema's enums.
        hint = hints[name]
        if typing.get_origin(hint) is typing.Literal:
            assert set(typing.get_args(hint)) == set(prop["enum"]), name


def test_topic_level_schemas_name_their_topics() -> None:
    for topic in topics.ALL_TOPICS:
        assert topic.name in load_schema(topic.record_type)["description"]


# ------------------------------------------------------- malformed records

JSON_VALUES: list[tuple[Any, str]] = [
    (None, "null"),
    (True, "boolean"),
    (7, "integer"),
    (2.5, "number"),
    ("text", "string"),
    ([1], "array"),
    ({"a": 1}, "object"),
]


def _resolve(schema: dict[str, Any], sub: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in sub:
        return schema["$defs"][sub["$ref"].rsplit("/", 1)[-1]]
    return sub


def _fields(
    schema: dict[str, Any], data: dict[str, Any]
) -> list[tuple[tuple, dict, bool]]:
    """(path, property schema, required) for every field of a sample, nested included."""
    out: list[tuple[tuple, dict, bool]] = []

    def walk(obj_schema: dict[str, Any], obj: dict[str, Any], prefix: tuple) -> None:
        for name, prop in obj_schema["properties"].items():
            if name == "schema_version":
                continue
            prop = _resolve(schema, prop)
            out.append(((*prefix, name), prop, name in obj_schema["required"]))
            if prop.get("type") == "object" and isinstance(obj.get(name), dict):
                walk(prop, obj[name], (*prefix, name))
            if prop.get("type") == "array" and obj.get(name):
                walk(_resolve(schema, prop["items"]), obj[name][0], (*prefix, name, 0))

    walk(schema, data, ())
    return out


def _objects(schema: dict[str, Any], data: dict[str, Any]) -> list[tuple[tuple, dict]]:
    """(path, object schema) for the record and each nested object in a sample."""
    out = [((), schema)]
    for path, prop, _ in _fields(schema, data):
        if prop.get("type") == "object":
            out.append((path, prop))
        if prop.get("type") == "array" and _get(data, path):
            out.append(((*path, 0), _resolve(schema, prop["items"])))
    return out


def _get(data: Any, path: tuple) -> Any:
    for part in path:
        data = data[part]
    return data


def _set(data: Any, path: tuple, value: Any) -> None:
    _get(data, path[:-1])[path[-1]] = value


def _accepts_type(prop: dict[str, Any], json_type: str) -> bool:
    types = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
    if json_type == "integer":
        return "integer" in types or "number" in types
    return json_type in types


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return "%" not in text


def _violations(prop: dict[str, Any]) -> list[tuple[st.SearchStrategy, str]]:
    """Strategies for values of the right type that break one of the field's rules."""
    out: list[tuple[st.SearchStrategy, str]] = []
    types = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
    numeric = "integer" in types or "number" in types
    if "enum" in prop:
        base = st.integers() if "integer" in types else st.text(max_size=20)
        out.append((base.filter(lambda v: v not in prop["enum"]), "enum"))
    elif numeric and "minimum" in prop:
        low = prop["minimum"]
        out.append((st.integers(max_value=low - 1), "minimum"))
        if "number" in types:
            out.append(
                (
                    st.floats(
                        max_value=low,
                        exclude_max=True,
                        allow_nan=False,
                        allow_infinity=False,
                    ),
                    "minimum",
                )
            )
    if numeric and "maximum" in prop:
        high = prop["maximum"]
        out.append((st.integers(min_value=high + 1), "maximum"))
        if "number" in types:
            out.append(
                (
                    st.floats(
                        min_value=high,
                        exclude_min=True,
                        allow_nan=False,
                        allow_infinity=False,
                    ),
                    "maximum",
                )
            )
    if prop.get("minLength", 0) >= 1:
        out.append((st.just(""), "minLength"))
    if "maxLength" in prop:
        out.append((st.just("a" * (prop["maxLength"] + 1)), "maxLength"))
    if "pattern" in prop:
        pattern = re.compile(prop["pattern"][:-1] + r"\Z")
        out.append(
            (st.text(max_size=40).filter(lambda s: not pattern.search(s)), "pattern")
        )
    if "anyOf" in prop:  # IP address formats
        out.append((st.text(max_size=40).filter(lambda s: not _is_ip(s)), "format"))
    return out


@st.composite
def samples(draw: st.DrawFn, names: list[str] = SAMPLE_NAMES,
            ) -> tuple[type, dict[str, Any], dict[str, Any]]:
    record = SAMPLES[draw(st.sampled_from(names))]()
    return type(record), load_schema(type(record)), to_dict(record)


@st.composite
def missing_required(draw: st.DrawFn, names: list[str] = SAMPLE_NAMES,
                     ) -> tuple[type, dict, str, str]:
    record_type, schema, data = draw(samples(names))
    required = [path for path, _, req in _fields(schema, data) if req]
    path = draw(st.sampled_from(required))
    del _get(data, path[:-1])[path[-1]]
    return record_type, data, fmt(path), "required"


@st.composite
def wrong_type(draw: st.DrawFn, names: list[str] = SAMPLE_NAMES,
               ) -> tuple[type, dict, str, str]:
    record_type, schema, data = draw(samples(names))
    path, prop, _ = draw(st.sampled_from(_fields(schema, data)))
    value = draw(
        st.sampled_from([v for v, t in JSON_VALUES if not _accepts_type(prop, t)])
    )
    _set(data, path, copy.deepcopy(value))
    return record_type, data, fmt(path), "type"


@st.composite
def out_of_range(draw: st.DrawFn, names: list[str] = SAMPLE_NAMES,
                 ) -> tuple[type, dict, str, str]:
    record_type, schema, data = draw(samples(names))
    candidates = [
        (path, prop) for path, prop, _ in _fields(schema, data) if _violations(prop)
    ]
    path, prop = draw(st.sampled_from(candidates))
    strategy, rule = draw(st.sampled_from(_violations(prop)))
    _set(data, path, draw(strategy))
    return record_type, data, fmt(path), rule


@st.composite
def unknown_field(draw: st.DrawFn, names: list[str] = SAMPLE_NAMES,
                  ) -> tuple[type, dict, str, str]:
    record_type, schema, data = draw(samples(names))
    path, obj_schema = draw(st.sampled_from(_objects(schema, data)))
    name = draw(
        st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=20).filter(
            lambda n: n not in obj_schema["properties"]
        )
    )
    _get(data, path)[name] = draw(st.sampled_from([v for v, _ in JSON_VALUES]))
    return record_type, data, fmt((*path, name)), "additionalProperties"


@pytest.mark.parametrize("record_type", [SpanRecord, FlowRecord])
@given(draws=st.data())
def test_the_fast_decoder_refuses_whatever_the_schema_refuses(record_type: type,
                                                              draws: st.DataObject) -> None:
    names = [name for name in SAMPLE_NAMES if type(SAMPLES[name]()) is record_type]
    _, data, _, _ = draws.draw(st.one_of(missing_required(names), wrong_type(names),
                                         out_of_range(names), unknown_field(names)))
    with pytest.raises(ValueError):
        records.fast_decoder(record_type)(json.dumps(data))


def _schema_valid(record_type: type, data: dict[str, Any]) -> bool:
    try:
        validate(record_type, data)
    except RecordError:
        return False
    return True


@pytest.mark.parametrize("record_type", [SpanRecord, FlowRecord])
@given(draws=st.data())
def test_the_batch_decoder_takes_a_batch_exactly_when_the_schema_takes_every_record(
        record_type: type, draws: st.DataObject) -> None:
    names = [name for name in SAMPLE_NAMES if type(SAMPLES[name]()) is record_type]
    valid = samples(names).map(lambda case: case[2])
    invalid = st.one_of(missing_required(names), wrong_type(names), out_of_range(names),
                        unknown_field(names)).map(lambda case: case[1])
    # Mostly valid records, so that about half the batches are wholly valid.
    record = st.integers(0, 9).flatmap(lambda k: valid if k < 8 else invalid)
    batch = draws.draw(st.lists(record, min_size=1, max_size=6))
    decoded = records.batch_decoder(record_type)([json.dumps(data).encode() for data in batch])
    if all(_schema_valid(record_type, data) for data in batch):
        import msgspec

        # A valid record the fast decoders read more strictly may refuse the batch; none
        # of the samples is such a corner.
        assert decoded is not None
        assert [msgspec.to_builtins(d) for d in decoded] == [
            to_dict(from_dict(record_type, data)) for data in batch]
    else:
        assert decoded is None


# Ids as producers might send them: mostly valid (so that whole batches are valid too), else
# near misses (all zeros, a wrong length, upper case, a newline or comma) or anything at all.
_HEX = "0123456789abcdef"
_bad_ids = st.one_of(st.sampled_from(["0" * 16, "0" * 32, "0" * 15, "1" * 24, "A" * 16]),
                     st.text(_HEX + "ABCDEF0g,\n ", min_size=14, max_size=34),
                     st.text(max_size=40))


def _ids(*lengths: int) -> st.SearchStrategy[str]:
    valid = st.one_of(*(st.text(_HEX, min_size=n, max_size=n) for n in lengths))
    return st.integers(0, 9).flatmap(lambda k: valid if k < 8 else _bad_ids)


@given(st.lists(st.tuples(_ids(16, 32), _ids(16), st.one_of(st.none(), _ids(16))),
                min_size=1, max_size=5))
def test_the_batch_decoder_checks_ids_as_the_schema_patterns_do(
        batch: list[tuple[str, str, str | None]]) -> None:
    """The id patterns are checked on the batch's id columns at once, not by regex per record:
    the verdict must still be the schema's, record for record."""
    spans = []
    for trace_id, span_id, parent in batch:
        data = to_dict(sample_span())
        data.update(trace_id=trace_id, span_id=span_id, parent_span_id=parent)
        spans.append(data)
    decoded = records.batch_decoder(SpanRecord)([json.dumps(d).encode() for d in spans])
    assert (decoded is not None) == all(_schema_valid(SpanRecord, d) for d in spans)


def test_the_batch_decoder_refuses_a_batch_with_a_missing_value() -> None:
    value = encode(sample_span())
    assert records.batch_decoder(SpanRecord)([value, value]) is not None
    assert records.batch_decoder(SpanRecord)([value, None]) is None  # a tombstone
    assert records.batch_decoder(SpanRecord)([value, b"{"]) is None
    assert records.batch_decoder(SpanRecord)([]) == []


def test_the_fast_span_decoder_reads_a_valid_span_field_for_field() -> None:
    import msgspec

    full = sample_span()
    sparse = to_dict(full)
    for name in ("parent_span_id", "namespace", "status_code", "bytes_sent"):
        del sparse[name]  # optional fields may be left out
    for data in (to_dict(full), sparse):
        decoded = records.fast_decoder(SpanRecord)(json.dumps(data))
        assert msgspec.to_builtins(decoded) == to_dict(from_dict(SpanRecord, data))


@pytest.mark.parametrize("change", [
    {"state": "counter"},  # a socket observer never has state 'counter'
    {"state": "open"},  # an open flow has no end_us
    {"end_us": None},  # a closed one has
    {"observer": "tc_counter"},  # a tc counter has state 'counter' and no observing socket
])
def test_the_fast_flow_decoder_checks_the_cross_field_rules(change: dict[str, Any]) -> None:
    data = {**to_dict(sample_flow()), **change}
    with pytest.raises(RecordError):
        from_dict(FlowRecord, data)  # the schema refuses it...
    with pytest.raises(ValueError):
        records.fast_decoder(FlowRecord)(json.dumps(data))  # ...and so does the fast decoder


def test_the_fast_flow_decoder_reads_valid_flows_field_for_field() -> None:
    import msgspec

    for record in (sample_flow(), sample_tc_flow()):
        decoded = records.fast_decoder(FlowRecord)(encode(record))
        assert msgspec.to_builtins(decoded) == to_dict(record)


def test_a_schema_the_fast_decoder_cannot_express_is_refused_up_front() -> None:
    with pytest.raises(TypeError, match="cannot check"):
        records.fast_decoder(Anomaly)  # a list of nested records: not supported


def _assert_names(error: RecordError, record_type: type, path: str, rule: str) -> None:
    assert (path, rule) in pairs(error), error.errors
    assert f"{record_type.__name__}.{path}: " in str(error)
    assert f"(rule: {rule})" in str(error)
    assert [e[0] for e in error.errors] == sorted(e[0] for e in error.errors)


@given(st.one_of(missing_required(), wrong_type(), out_of_range(), unknown_field()))
def test_malformed_records_are_rejected_naming_field_and_rule(case: tuple) -> None:
    record_type, data, path, rule = case
    error = rejected(record_type, data)
    _assert_names(error, record_type, path, rule)
    with pytest.raises(RecordError) as info:
        decode(record_type, json.dumps(data))
    _assert_names(info.value, record_type, path, rule)


def test_error_message_format() -> None:
    data = to_dict(sample_flow())
    data["src"]["port"] = 70000
    error = rejected(FlowRecord, data)
    assert str(error) == (
        "FlowRecord.src.port: 70000 is greater than the maximum of 65535 (rule: maximum)"
    )
    assert error.record_type is FlowRecord
    assert error.errors == [
        ("src.port", "maximum", "70000 is greater than the maximum of 65535")
    ]
    assert error.fields == ["src.port"] and error.rules == ["maximum"]


def test_missing_field_is_named_itself() -> None:
    data = to_dict(sample_span())
    del data["trace_id"]
    assert (
        str(rejected(SpanRecord, data))
        == "SpanRecord.trace_id: missing (rule: required)"
    )
    data = to_dict(sample_anomaly())
    del data["contributions"][1]["feature"]
    assert rejected(Anomaly, data).errors == [
        ("contributions[1].feature", "required", "missing")
    ]


def test_all_errors_are_listed_sorted_by_path() -> None:
    data = to_dict(sample_anomaly())
    data["verdict"] = "bad"
    data["contributions"][0]["weight"] = "heavy"
    data["bogus"] = 1
    del data["detector"]
    error = rejected(Anomaly, data)
    assert error.errors == sorted(error.errors)
    assert pairs(error) == {
        ("bogus", "additionalProperties"),
        ("contributions[0].weight", "type"),
        ("detector", "required"),
        ("verdict", "enum"),
    }
    assert len(str(error).splitlines()) == 4


def test_ip_addresses_are_checked() -> None:
    for bad in ("10.0.0.256", "010.0.0.1", "fe80::1%eth0", "cart.shop.svc", ""):
        data = to_dict(sample_flow())
        data["dst"]["addr"] = bad
        assert ("dst.addr", "format") in pairs(rejected(FlowRecord, data)), bad
    for good in ("10.0.0.1", "::1", "::ffff:10.0.0.1", "fd00:10:244::1a"):
        data = to_dict(sample_flow())
        data["dst"]["addr"] = good
        validate(FlowRecord, data)


def test_patterns_do_not_accept_a_trailing_newline() -> None:
    data = to_dict(sample_rollback())
    data["reason"] = "cooldown\n"
    assert ("reason", "pattern") in pairs(rejected(RollbackDecision, data))
    data = to_dict(sample_span())
    data["span_id"] = "00f067aa0ba902b7\n"
    assert ("span_id", "pattern") in pairs(rejected(SpanRecord, data))
    data["span_id"] = "0000000000000000"
    assert ("span_id", "pattern") in pairs(rejected(SpanRecord, data))


def test_booleans_are_not_integers() -> None:
    data = to_dict(sample_flow())
    data["bytes_sent"] = True
    assert ("bytes_sent", "type") in pairs(rejected(FlowRecord, data))


@pytest.mark.parametrize(
    ("build", "change", "field"),
    [
        (sample_flow, {"state": "open"}, "end_us"),
        (sample_flow, {"end_us": None}, "end_us"),
        (sample_flow, {"state": "counter"}, "state"),
        (sample_tc_flow, {"state": "closed"}, "state"),
        (sample_tc_flow, {"observed_at": "src"}, "observed_at"),
        (sample_service_metrics, {"error_rate": None}, "error_rate"),
        (sample_edge_metrics, {"error_rate": 0.0}, "error_rate"),
        (sample_anomaly, {"score": None}, "verdict"),
        (sample_rollback, {"action": "dry_run"}, "dry_run"),
    ],
)
def test_cross_field_rules(build: Any, change: dict[str, Any], field: str) -> None:
    record = build()
    data = {**to_dict(record), **change}
    assert field in rejected(type(record), data).fields


def test_cross_field_rules_accept_the_legal_combinations() -> None:
    flow = sample_flow()
    flow.state, flow.end_us = "open", None
    anomaly = sample_anomaly()
    anomaly.score, anomaly.verdict, anomaly.reason = (
        None,
        "inconclusive",
        "too little traffic",
    )
    rollback = sample_rollback()
    rollback.action, rollback.dry_run, rollback.patched_us = "dry_run", True, None
    for record in (flow, anomaly, rollback):
        validate(type(record), to_dict(record))


# ---------------------------------------------------------- schema_version


@pytest.mark.parametrize("version", [2, 0, "1", True, 1.5, None])
@pytest.mark.parametrize("name", ["flow", "span", "anomaly", "deadletter"])
def test_unknown_schema_version_is_refused(name: str, version: Any) -> None:
    record = SAMPLES[name]()
    data = to_dict(record)
    data["schema_version"] = version
    data["unrelated_typo"] = 1  # other rules are not even looked at
    error = rejected(type(record), data)
    assert error.errors[0][:2] == ("schema_version", "schema_version")
    assert len(error.errors) == 1
    with pytest.raises(RecordError) as info:
        decode(type(record), json.dumps(data).encode())
    assert info.value.rules == ["schema_version"]


def test_missing_schema_version_is_refused() -> None:
    data = to_dict(sample_flow())
    del data["schema_version"]
    error = rejected(FlowRecord, data)
    assert error.rules == ["schema_version"]
    assert "FlowRecord.schema_version: missing" in str(error)


def test_schema_version_message_says_what_to_do() -> None:
    data = {**to_dict(sample_flow()), "schema_version": 2}
    assert str(rejected(FlowRecord, data)) == (
        "FlowRecord.schema_version: version 2 is not supported by this build (reads 1); "
        "upgrade Clover or route this producer to a topic of that version (rule: schema_version)"
    )


# --------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "payload",
    [b"{not json", b"", b"\xff\xfe\x00", b'{"a": Infinity}', "{", b'{"a":1} x'],
)
def test_invalid_json_is_refused_with_rule_json(payload: bytes | str) -> None:
    with pytest.raises(RecordError) as info:
        decode(FlowRecord, payload)
    assert info.value.rules == ["json"]
    assert str(info.value).startswith("FlowRecord: not valid JSON")


@pytest.mark.parametrize("payload", [b"[]", b"1", b'"flow"', b"null"])
def test_non_object_json_is_refused(payload: bytes) -> None:
    with pytest.raises(RecordError) as info:
        decode(SpanRecord, payload)
    assert info.value.errors[0][:2] == ("", "type")


def test_non_record_types_are_programming_errors() -> None:
    with pytest.raises(TypeError):
        validate(Endpoint, {"addr": "10.0.0.1"})
    with pytest.raises(TypeError):
        to_dict({"addr": "10.0.0.1"})


def test_record_error_pickles() -> None:
    error = rejected(SpanRecord, {"schema_version": 1})
    clone = pickle.loads(pickle.dumps(error))
    assert clone.record_type is SpanRecord and clone.errors == error.errors
    assert str(clone) == str(error)


# -------------------------------------------------------------------- keys


def test_service_key() -> None:
    assert service_key("shop", "cart") == b"shop/cart"
    assert service_key(None, "cart") == b"unknown/cart"
    assert topics.service_key is records.service_key


def test_flow_key_prefers_the_server_side() -> None:
    flow = sample_flow()
    assert flow.key() == b"shop/cart"
    flow.dst.service = None
    assert flow.key() == b"shop/frontend"
    flow.src.namespace = None
    assert flow.key() == b"unknown/frontend"
    flow.src.service = None
    assert flow.key() == b"unknown/10.244.2.9"
    assert sample_tc_flow().key() == b"kube-system/coredns"


def test_service_record_keys() -> None:
    assert sample_span().key() == b"shop/cart"
    span = sample_span()
    span.namespace = None
    assert span.key() == b"unknown/cart"
    assert sample_service_metrics().key() == b"shop/cart"
    assert sample_edge_metrics().key() == b"shop/frontend"
    assert sample_anomaly().key() == b"shop/cart"
    assert sample_rollback().key() == b"shop/cart"


def test_deadletter_key_is_the_original_key() -> None:
    letter = sample_deadletter()
    assert letter.key() == b"shop/cart"
    assert base64.b64decode(letter.value_b64).startswith(b'{"trace_id"')
    for key_b64 in (None, "", "!!not base64!!"):
        letter.key_b64 = key_b64
        assert letter.key() == b"unknown/deadletter"
    assert (
        DeadLetter.wrap(
            source_topic="clover.flows",
            key=None,
            value=None,
            reason="x",
            component="y",
            at_us=1,
        ).value_b64
        == ""
    )


# ------------------------------------------------------------------ topics


def test_topics() -> None:
    names = [t.name for t in topics.ALL_TOPICS]
    assert len(set(names)) == len(names) == len(RECORD_TYPES)
    assert all(name.startswith("clover.") for name in names)
    assert {t.record_type for t in topics.ALL_TOPICS} == set(RECORD_TYPES)
    expected = {
        FlowRecord: ("clover.flows", 6),
        SpanRecord: ("clover.spans", 6),
        ServiceMetrics: ("clover.service-metrics", 6),
        Anomaly: ("clover.anomalies", 6),
        RollbackDecision: ("clover.rollbacks", 3),
        DeadLetter: ("clover.deadletter", 3),
    }
    for record_type, (name, partitions) in expected.items():
        topic = topics.topic_for(record_type)
        assert (topic.name, topic.partitions) == (name, partitions)
    with pytest.raises(KeyError):
        topics.topic_for(Endpoint)
    day_ms = 24 * 3600 * 1000
    assert topics.FLOWS.config() == {
        "cleanup.policy": "delete",
        "retention.ms": str(7 * day_ms),
    }
    assert topics.DEADLETTER.config()["retention.ms"] == str(30 * day_ms)


class FakeAdmin:
    """Stands in for confluent_kafka.admin.AdminClient.create_topics."""

    def __init__(self, outcomes: dict[str, Exception | None]) -> None:
        self.outcomes = outcomes
        self.requested: list[Any] = []

    def create_topics(self, new_topics: list[Any], **kwargs: Any) -> dict[str, Future]:
        self.requested = new_topics
        self.kwargs = kwargs
        futures = {}
        for new in new_topics:
            future: Future = Future()
            outcome = self.outcomes.get(new.topic)
            if outcome is None:
                future.set_result(None)
            else:
                future.set_exception(outcome)
            futures[new.topic] = future
        return futures


def test_create_topics_reports_created_and_existing() -> None:
    from confluent_kafka import KafkaError, KafkaException

    exists = KafkaException(
        KafkaError(KafkaError.TOPIC_ALREADY_EXISTS, "already exists")
    )
    admin = FakeAdmin({"clover.flows": exists})
    result = topics.create_topics(admin, replication_factor=3, timeout=5.0)
    assert result == {
        t.name: "exists" if t is topics.FLOWS else "created" for t in topics.ALL_TOPICS
    }
    by_name = {new.topic: new for new in admin.requested}
    assert by_name["clover.spans"].num_partitions == 6
    assert by_name["clover.rollbacks"].num_partitions == 3
    assert by_name["clover.spans"].replication_factor == 3
    assert by_name["clover.deadletter"].config["retention.ms"] == str(
        30 * 24 * 3600 * 1000
    )
    assert admin.kwargs["operation_timeout"] == 5.0


def test_create_topics_names_the_failed_topic() -> None:
    from confluent_kafka import KafkaError, KafkaException

    failure = KafkaException(
        KafkaError(
            KafkaError.INVALID_REPLICATION_FACTOR, "replication factor 3 > 1 broker"
        )
    )
    with pytest.raises(topics.TopicCreationError) as info:
        topics.create_topics(
            FakeAdmin({"clover.anomalies": failure}), replication_factor=3
        )
    assert list(info.value.failures) == ["clover.anomalies"]
    assert "clover.anomalies" in str(info.value) and "replication factor" in str(
        info.value
    )


def test_field_validator_checks_only_its_fields_and_explains_like_validate() -> None:
    span = records.to_dict(sample_span())
    check = records.field_validator(SpanRecord, frozenset(("trace_id", "duration_us")))
    check(span)
    check({**span, "kind": "not-a-kind"})  # not one of its fields: typed code sets it
    bad = {**span, "trace_id": "not-hex", "duration_us": -1}
    with pytest.raises(RecordError) as partial:
        check(bad)
    with pytest.raises(RecordError) as full:
        records.validate(SpanRecord, bad)
    assert partial.value.errors == full.value.errors
    with pytest.raises(RecordError, match="trace_id"):
        check({key: value for key, value in span.items() if key != "trace_id"})  # required


def test_field_validator_remembers_valid_names_only() -> None:
    span = records.to_dict(sample_span())
    names = frozenset(("service", "operation"))
    check = records.field_validator(SpanRecord, names | {"span_id"}, remembered=names)
    check(span)
    check({**span, "span_id": "00000000000000ab"})  # names remembered; the id still checked
    with pytest.raises(RecordError, match="span_id"):
        check({**span, "span_id": "0" * 16})
    for bad in ({**span, "operation": ""}, {**span, "service": 7}, {**span, "operation": None}):
        for _ in range(2):  # an invalid combination is never remembered
            with pytest.raises(RecordError):
                check(bad)
    with pytest.raises(TypeError, match="not a string field"):
        records.field_validator(SpanRecord, frozenset(("start_us",)),
                                remembered=frozenset(("start_us",)))
    with pytest.raises(ValueError, match="no fields"):
        records.field_validator(SpanRecord, frozenset(("nope",)))
