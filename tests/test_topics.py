"""`clover topics create` against the real broker, and the smoke run of `make demo`."""

from __future__ import annotations

import subprocess
import sys

from confluent_kafka.admin import AdminClient

from clover import topics
from clover.config import Settings
from clover.kafka import client_config


def _clover(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "clover.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_topics_create_is_idempotent_and_uses_the_defined_partitions(
        live_stack, settings: Settings) -> None:
    first = _clover("topics", "create")
    assert first.returncode == 0, first.stderr
    second = _clover("topics", "create")
    assert second.returncode == 0, second.stderr
    outcomes = dict(line.split() for line in second.stdout.splitlines())
    assert outcomes == {t.name: "exists" for t in topics.ALL_TOPICS}

    metadata = AdminClient(client_config(settings)).list_topics(timeout=10)
    for topic in topics.ALL_TOPICS:
        assert len(metadata.topics[topic.name].partitions) == topic.partitions


def test_smoke_run_sends_records_through_kafka_into_cassandra(live_stack) -> None:
    out = _clover("smoke", "--count", "6")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "read back 10 of 10 records from Kafka" in out.stdout
    assert "wrote 6 service-metrics rows" in out.stdout and "read back 6:" in out.stdout
    assert "smoke run: OK" in out.stderr


def test_unreachable_kafka_is_a_clear_error() -> None:
    import os

    out = subprocess.run([sys.executable, "-m", "clover.cli", "topics", "create"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CLOVER_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    assert out.returncode == 1
    assert out.stderr.startswith("clover: Kafka at 127.0.0.1:1 is unreachable")
    assert "CLOVER_KAFKA_BOOTSTRAP_SERVERS" in out.stderr and "Traceback" not in out.stderr
