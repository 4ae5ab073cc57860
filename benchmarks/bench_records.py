"""Record encoding and decoding with schema validation, against plain json on the same data."""

from __future__ import annotations

import dataclasses
import json

from benchmarks.common import Result, best_rate
from clover import records
from tests import samples

N = 20_000


def run() -> list[Result]:
    spans = []
    for i in range(N):
        span = samples.sample_span()
        span.start_us += i
        spans.append(span)
    dicts = [dataclasses.asdict(s) for s in spans]
    encoded = [records.encode(s) for s in spans]

    def plain_dumps() -> int:
        for d in dicts:
            json.dumps(d, separators=(",", ":")).encode()
        return N

    def plain_loads() -> int:
        for raw in encoded:
            json.loads(raw)
        return N

    def encode_validated() -> int:
        for s in spans:
            records.encode(s)
        return N

    def encode_unvalidated() -> int:
        for s in spans:
            records.encode(s, validate=False)
        return N

    def decode_validated() -> int:
        for raw in encoded:
            records.decode(records.SpanRecord, raw)
        return N

    dumps, loads = best_rate(plain_dumps), best_rate(plain_loads)
    return [
        Result("records.encode(span) validated", best_rate(encode_validated), dumps,
               "json.dumps of the same dict"),
        Result("records.encode(span, validate=False)", best_rate(encode_unvalidated), dumps,
               "json.dumps of the same dict"),
        Result("records.decode(span) validated", best_rate(decode_validated), loads,
               "json.loads of the same bytes"),
    ]
