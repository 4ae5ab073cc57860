"""The span sink every receiver shares, against real Kafka: valid spans published, each invalid
one dead-lettered with its reason and original bytes, all counted."""

from __future__ import annotations

import base64
from typing import Any

from clover import records
from clover.config import Settings
from clover.records import DeadLetter, SpanRecord
from clover.topics import DEADLETTER, SPANS
from collectors.ingest import Candidate, SpanSink
from tests import samples


def test_valid_spans_are_published_and_invalid_ones_dead_lettered(
        settings: Settings, topic_reader: Any, kafka_topics: Any) -> None:
    spans_reader, dead_reader = topic_reader(SPANS.name), topic_reader(DEADLETTER.name)
    good = records.to_dict(samples.sample_span())
    other = {**good, "span_id": "00000000000000aa", "service": "cart"}
    bad = {**good, "trace_id": "not-hex"}
    sink = SpanSink(settings)
    sink.request("test")
    result = sink.submit("test", [
        Candidate(good, b"original-0"),
        Candidate(bad, b"original-1"),
        Candidate(None, b"original-2", problem="no service name in the resource"),
        Candidate(other, b"original-3"),
    ])
    assert sink.flush() == 0
    assert result.accepted == 2
    assert [(r.index, r.reason.split(":")[0]) for r in result.rejected] == [
        (1, "SpanRecord.trace_id"), (2, "no service name in the resource")]
    assert "2 of 4 spans rejected: span 1: SpanRecord.trace_id" in result.summary()

    # The topics are the shared ones, which other components (a stream worker) may write to at
    # the same time: pick this test's records out of everything written since it started.
    values = [m.value() for m in spans_reader.read_all()]
    published = [records.decode(SpanRecord, value) for value in values]
    ours = sorted(s.span_id for s in published if s.trace_id == good["trace_id"])
    assert ours == sorted([good["span_id"], "00000000000000aa"])
    # The sink encodes span dicts without building SpanRecords, byte for byte as encode() does.
    assert records.encode(samples.sample_span()) in values
    letters = [letter for letter in (records.decode(DeadLetter, m.value())
                                     for m in dead_reader.read_all())
               if letter.component == "test-receiver"]
    by_value = {base64.b64decode(d.value_b64): d for d in letters}
    assert set(by_value) == {b"original-1", b"original-2"}
    assert "trace_id" in by_value[b"original-1"].reason
    assert "(rule: pattern)" in by_value[b"original-1"].reason
    assert by_value[b"original-1"].key() == f"{good['namespace']}/{good['service']}".encode()
    assert by_value[b"original-2"].source_topic == "receiver.test"
    assert by_value[b"original-2"].component == "test-receiver"

    def sample(name: str, **labels: str) -> float | None:
        return sink.registry.get_sample_value(name, labels)

    assert sample("clover_receiver_requests_total", receiver="test") == 1
    assert sample("clover_receiver_spans_accepted_total", receiver="test") == 2
    assert sample("clover_receiver_spans_rejected_total", receiver="test", reason="pattern") == 1
    assert sample("clover_receiver_spans_rejected_total", receiver="test", reason="mapping") == 1
    sink.close()
