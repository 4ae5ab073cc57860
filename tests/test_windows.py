"""Window aggregation rules (analytics/windows.py), on records built in the test."""

from __future__ import annotations

import random

import numpy as np
import pytest

from analytics.windows import WindowAggregator, aggregate, decode_sketch, merge_sketches
from clover.records import (
    Endpoint,
    FlowRecord,
    FlowState,
    ObservedAt,
    ServiceMetrics,
    SpanKind,
    SpanRecord,
    to_dict,
    validate,
)

BASE_US = 1_700_000_000_000_000  # a window boundary for every window length used here


def span(i: int, end_us: int, duration_us: int = 10_000, *, service: str = "cart",
         kind: SpanKind = "server", error: bool = False, revision: str = "r1",
         peer: str | None = None, parent: int | None = None,
         operation: str = "GET /") -> SpanRecord:
    """Span ``i`` (a child of span ``parent`` when given)."""
    return SpanRecord(trace_id=f"{i:032x}", span_id=f"{i + 1:016x}", service=service,
                      operation=operation, kind=kind, start_us=end_us - duration_us,
                      duration_us=duration_us, error=error, source="otlp", namespace="shop",
                      revision=revision, peer_service=peer, peer_namespace="shop" if peer else None,
                      bytes_sent=100, bytes_received=40,
                      parent_span_id=None if parent is None else f"{parent + 1:016x}")


def flow(end_us: int, *, state: FlowState = "closed", observed_at: ObservedAt = "src",
         sport: int = 40000, duration_us: int = 1000, sent: int = 500,
         received: int = 2000) -> FlowRecord:
    return FlowRecord(
        observer="tcp_lifecycle", node="n1", protocol="tcp", ip_version=4,
        src=Endpoint("10.0.0.1", sport, "shop", "frontend", "frontend-1", "f1"),
        dst=Endpoint("10.0.0.2", 8080, "shop", "cart", "cart-1", "r1"),
        bytes_sent=sent, bytes_received=received, packets_sent=5, packets_received=6,
        start_us=end_us - duration_us, duration_us=duration_us,
        end_us=None if state == "open" else end_us, state=state, observed_at=observed_at)


def test_spans_count_in_the_window_they_end_with_exact_totals() -> None:
    rows = aggregate([span(1, BASE_US + 9_999_999), span(2, BASE_US + 10_000_000, error=True),
                      span(3, BASE_US + 12_000_000, duration_us=30_000)])
    assert [(r.window_start_us, r.requests, r.errors) for r in rows] == [
        (BASE_US, 1, 0), (BASE_US + 10_000_000, 2, 1)]
    second = rows[1]
    assert second.error_rate == 0.5
    assert second.latency_max_ms == 30.0
    assert second.bytes_in == 80 and second.bytes_out == 200  # from spans: no flows here
    for row in rows:
        validate(ServiceMetrics, to_dict(row))


def test_client_spans_make_edge_rows_and_internal_spans_are_not_requests() -> None:
    rows = aggregate([span(1, BASE_US + 1, service="frontend", kind="client", peer="cart"),
                      span(2, BASE_US + 2, service="frontend", kind="internal"),
                      span(3, BASE_US + 3, service="frontend", kind="server")])
    keyed = {(r.service, r.peer_service): r.requests for r in rows}
    assert keyed == {("frontend", None): 1, ("frontend", "cart"): 1}


def test_percentiles_are_within_the_sketch_accuracy_and_merge_across_windows() -> None:
    rng = random.Random(7)
    durations = [rng.randint(1_000, 400_000) for _ in range(5000)]
    spans = [span(i, BASE_US + i * 20_000, d) for i, d in enumerate(durations)]
    rows = aggregate(spans, window_seconds=10)
    assert len(rows) == 10
    truth = np.array(durations) / 1000.0
    merged = merge_sketches(r.latency_sketch for r in rows)
    assert merged is not None and merged.count == 5000
    for q in (0.5, 0.9, 0.99):
        exact = float(np.quantile(truth, q, method="lower"))
        assert merged.get_quantile_value(q) == pytest.approx(exact, rel=0.011)
    first = decode_sketch(rows[0].latency_sketch or "")
    assert first.count == 500


def test_final_flow_records_count_once_per_connection_and_open_updates_not_at_all() -> None:
    end = BASE_US + 5_000_000
    rows = aggregate(flows=[
        flow(end - 2_000_000, state="open"),  # cumulative progress report
        flow(end, observed_at="src"),
        flow(end + 100, observed_at="dst"),  # the other side of the same connection
        flow(end, state="reset", sport=40001, duration_us=20_000_000),  # opened earlier
    ])
    [cart] = rows
    assert cart.service == "cart" and cart.revision == "r1"
    assert (cart.flows, cart.connections_closed, cart.connections_reset,
            cart.connections_opened) == (2, 1, 1, 1)
    # Into the server: the client's bytes_sent; out of it: what the client received.
    assert (cart.bytes_in, cart.bytes_out) == (1000, 4000)


def test_a_record_later_than_the_allowed_lateness_is_refused_not_dropped() -> None:
    aggregator = WindowAggregator(window_seconds=10, allowed_lateness_seconds=2)
    assert aggregator.add_span(span(1, BASE_US + 1), "spans", 0)
    assert aggregator.add_span(span(2, BASE_US + 11_000_000), "spans", 1)
    assert aggregator.close_due() == []  # 1 s past the end: within the lateness
    assert aggregator.add_span(span(3, BASE_US + 2), "spans", 2)  # late but allowed
    assert aggregator.add_span(span(4, BASE_US + 12_000_001), "spans", 3)
    [closed] = aggregator.close_due()
    assert [r.requests for r in aggregator.metrics(closed)] == [2]
    assert not aggregator.add_span(span(5, BASE_US + 3), "spans", 4)  # its window is written
    # The open window still needs offset 1 of "spans": nothing from 1 on may be committed.
    assert aggregator.first_open_position("spans") == 1


def test_idle_inputs_close_their_windows_when_time_moves_on() -> None:
    aggregator = WindowAggregator(window_seconds=10, allowed_lateness_seconds=5)
    aggregator.add_span(span(1, BASE_US + 1), "spans", 0)
    assert aggregator.close_due() == []
    aggregator.advance(BASE_US + 15_000_000)
    assert len(aggregator.close_due()) == 1
    assert aggregator.first_open_position("spans") is None


def test_a_sketch_encodes_the_same_whatever_order_its_values_came_in() -> None:
    durations = [1_000, 250_000, 3_000, 90_000, 40_000, 2_000_000]
    forward = aggregate([span(i, BASE_US + i, d) for i, d in enumerate(durations)])
    backward = aggregate([span(i, BASE_US + i, d) for i, d in reversed(list(enumerate(durations)))])
    assert forward[0].latency_sketch == backward[0].latency_sketch
    assert decode_sketch(forward[0].latency_sketch or "").count == len(durations)


def test_a_batch_gives_what_its_spans_give_one_at_a_time_lateness_included() -> None:
    rng = random.Random(11)
    spans = []
    for i in range(3000):
        # Mostly in order, some spans late by up to 12 s against windows of 2 s + 1 s lateness.
        end = BASE_US + i * 5_000 - (rng.randint(0, 12_000_000) if rng.random() < 0.05 else 0)
        # Some are calls of an earlier span of their service (many of those are requests).
        parent = i + 1 - 3 * rng.randint(1, 100) if rng.random() < 0.5 else None
        spans.append(span(i + 1, end, rng.randint(0, 90_000), service=f"s{i % 3}",
                          kind=rng.choice(["server", "client", "internal"]),
                          peer="cart" if rng.random() < 0.7 else None,
                          error=rng.random() < 0.1, revision=f"r{i % 2}",
                          parent=parent if parent and parent > 0 else None,
                          operation=rng.choice(["GET /", "db", "cache"])))

    def run(batches: list[list[SpanRecord]]) -> tuple[list[bool], list[ServiceMetrics], int]:
        aggregator = WindowAggregator(window_seconds=2, allowed_lateness_seconds=1)
        accepted: list[bool] = []
        rows: list[ServiceMetrics] = []
        position = 0
        for batch in batches:
            flags = aggregator.add_spans(batch, "spans", range(position, position + len(batch)))
            accepted += flags.tolist()
            position += len(batch)
            for window in aggregator.close_due():
                rows += aggregator.metrics(window)
        assert aggregator.first_open_position("spans") is not None
        rows += [r for w in aggregator.close_all() for r in aggregator.metrics(w)]
        return accepted, rows, aggregator.event_time_us

    one_by_one = run([[s] for s in spans])
    cuts = sorted(rng.sample(range(1, len(spans)), 12))
    in_batches = run([spans[a:b] for a, b in zip([0, *cuts], [*cuts, len(spans)], strict=True)])
    assert in_batches == one_by_one
    refused = one_by_one[0].count(False)
    assert 0 < refused < 150  # the test's late spans were judged, and most were in time
    patterns = {name for row in one_by_one[1] for name in row.call_patterns or {}}
    assert {"", "db", "cache+db", "GET /+cache+db"} <= patterns, patterns


def test_call_patterns_are_the_sets_of_operations_each_request_called() -> None:
    """Children are found in the request's window and the one before, however late they
    come while its window is open, and an edge row has no patterns."""
    w = 10_000_000
    spans = [
        span(1, BASE_US + 4_000_000, operation="db", parent=3, kind="client", peer="db"),
        span(2, BASE_US + 4_500_000, operation="db", parent=3, kind="internal"),
        span(3, BASE_US + 5_000_000, duration_us=2_000_000),  # db (twice: once in the set)
        span(4, BASE_US + 6_000_000),  # no calls
        span(5, BASE_US + 8_000_000, operation="db", parent=7, kind="internal"),
        span(6, BASE_US + w + 6_000_000, operation="log", parent=7, kind="internal"),
        span(7, BASE_US + w + 5_000_000, duration_us=9_000_000),  # db in the window before
        span(8, BASE_US + 2_000_000, operation="db", parent=9, kind="internal"),
        span(9, BASE_US + 2 * w + 1_000_000, duration_us=20_000_000),  # db is too far back
    ]
    want = {(BASE_US, None): {"db": 1, "": 1}, (BASE_US, "db"): None,
            (BASE_US + w, None): {"db+log": 1}, (BASE_US + 2 * w, None): {"": 1}}

    def patterns(rows: list[ServiceMetrics]) -> dict[tuple[int, str | None], object]:
        return {(r.window_start_us, r.peer_service): r.call_patterns for r in rows}

    assert patterns(aggregate(spans)) == want
    # As a stream, in arrival order, with the call of span 7 ending in the window before
    # arriving after that window closed: it is refused (late) but still one of 7's calls.
    aggregator = WindowAggregator(window_seconds=10, allowed_lateness_seconds=2)
    rows: list[ServiceMetrics] = []
    arrivals = [spans[i - 1] for i in (1, 2, 3, 4, 8, 7, 6, 9, 5)]
    accepted = []
    for position, record in enumerate(arrivals):
        accepted.append(aggregator.add_span(record, "spans", position))
        rows += [r for window in aggregator.close_due() for r in aggregator.metrics(window)]
        if record.span_id == spans[8].span_id:
            # Window 0 is written, but its calls (from position 0) are kept for window 1's
            # requests: a stream may not commit past them yet.
            assert aggregator.closed_before_us == BASE_US + w
            assert aggregator.first_open_position("spans") == 0
    assert accepted == [True] * 8 + [False]  # span 5 came late
    rows += [r for window in aggregator.close_all() for r in aggregator.metrics(window)]
    assert patterns(rows) == want


def test_a_row_keeps_its_most_common_patterns_and_counts_the_rest_together() -> None:
    from analytics.windows import MAX_PATTERNS, OTHER_PATTERNS

    spans = []
    for i in range(MAX_PATTERNS + 10):  # one request per operation, two of op0 and op1
        for copy in range(2 if i < 2 else 1):
            request = 1000 * i + 10 * copy
            spans += [span(request, BASE_US + 5_000_000),
                      span(request + 1, BASE_US + 4_000_000, operation=f"op{i:02d}",
                           parent=request, kind="internal")]
    [row] = aggregate(spans)
    assert row.call_patterns is not None and len(row.call_patterns) == MAX_PATTERNS
    assert row.call_patterns["op00"] == row.call_patterns["op01"] == 2
    assert row.call_patterns[OTHER_PATTERNS] == 11  # op49 .. op59, ranked last by name
    assert sum(row.call_patterns.values()) == row.requests
    validate(ServiceMetrics, to_dict(row))


def test_latency_bins_are_the_ddsketch_of_the_same_values() -> None:
    from ddsketch import DDSketch

    from analytics.windows import LatencyBins, encode_sketch, sketch_quantile

    rng = np.random.default_rng(5)
    for _ in range(50):
        values = np.round(rng.lognormal(2, 1.5, int(rng.integers(1, 2000))) * 1000) / 1000
        values[rng.random(values.size) < 0.02] = 0.0  # 0 ms spans go to the zero bucket
        sketch = DDSketch(0.01)
        for value in values:
            sketch.add(float(value))
        bins = LatencyBins.of(values)
        assert bins.encode() == encode_sketch(sketch)
        for q in (0.0, 0.5, 0.9, 0.99, 1.0):
            assert bins.quantile(q) == sketch_quantile(sketch, q)


def _random_spans(count: int, seed: int) -> list[SpanRecord]:
    rng = random.Random(seed)
    spans = []
    for i in range(count):
        duration = rng.randint(0, 90_000)
        end = BASE_US + i * 3_000 + rng.randint(0, 400_000)
        peer = rng.choice([None, "cart", "payment"])
        spans.append(SpanRecord(
            trace_id=f"{i + 1:032x}", span_id=f"{i + 1:016x}", service=f"s{i % 3}",
            operation="GET /", kind=rng.choice(["server", "client", "producer", "consumer",
                                                "internal", "unspecified"]),
            start_us=end - duration, duration_us=duration, error=rng.random() < 0.1,
            source="otlp", namespace=rng.choice([None, "shop"]),
            revision=rng.choice([None, "r1", "r2"]), peer_service=peer,
            peer_namespace=rng.choice([None, "shop"]) if peer else None,
            bytes_sent=rng.choice([None, rng.randint(0, 5000)]),
            bytes_received=rng.choice([None, rng.randint(0, 5000)])))
    return spans


def test_span_rows_follow_the_counting_rules_span_by_span() -> None:
    """The array arithmetic against the rules written out for one span at a time."""
    spans = _random_spans(4000, seed=3)
    expected: dict[tuple[object, ...], list[float]] = {}
    for s in spans:
        if s.kind in ("server", "consumer", "unspecified"):
            peer: tuple[str | None, str | None] = (None, None)
        elif s.kind in ("client", "producer") and s.peer_service:
            peer = (s.peer_namespace, s.peer_service)
        else:
            continue  # not a request
        end = s.start_us + s.duration_us
        key = (end - end % 10_000_000, s.namespace or "unknown", s.service,
               s.revision or "unknown", *peer)
        totals = expected.setdefault(key, [0, 0, 0, 0, 0.0])
        totals[0] += 1
        totals[1] += s.error
        totals[2] += s.bytes_received or 0
        totals[3] += s.bytes_sent or 0
        totals[4] = max(totals[4], s.duration_us / 1000)
    rows = aggregate(spans)
    assert {(r.window_start_us, r.namespace, r.service, r.revision, r.peer_namespace,
             r.peer_service): [r.requests, r.errors, r.bytes_in, r.bytes_out, r.latency_max_ms]
            for r in rows} == expected


def test_span_columns_sliced_and_joined_aggregate_as_the_spans_do() -> None:
    """The stream worker queues spans as columns and takes them in slices, joined."""
    from analytics.windows import SpanColumns

    spans = _random_spans(3000, seed=4)
    columns = SpanColumns.of(spans)
    cuts = [0, 1, 700, 701, 2000, 3000]
    joined = SpanColumns.join([columns[a:b] for a, b in zip(cuts, cuts[1:], strict=False)])

    def run(batch: list[SpanRecord] | SpanColumns) -> list[ServiceMetrics]:
        aggregator = WindowAggregator(window_seconds=2, allowed_lateness_seconds=0.2)
        accepted = aggregator.add_spans(batch, "spans", np.arange(len(batch)))
        assert 0 < int(accepted.sum()) < len(batch)  # late spans were judged too
        return [r for w in aggregator.close_all() for r in aggregator.metrics(w)]

    assert run(joined) == run(spans)
