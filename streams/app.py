"""Clover's Faust app: declared at module level, configured from Settings when a worker starts.

The scoring and rollback agents (streams/score.py, streams/rollback.py) attach to ``app`` and
``configure`` points it at the configured Kafka and consumer group before their worker starts.
The aggregation worker (streams/aggregate.py) is not a Faust agent: it reads far more records
than Faust's one-event-at-a-time path can carry, and says why there.

Faust's own web server is off: every component serves Prometheus metrics on the port its
settings name instead, like the collectors and receivers do.
"""

from __future__ import annotations

from typing import Any

import faust

from clover.config import Settings

app = faust.App(
    "clover-aggregate",
    autodiscover=False,
    web_enabled=False,
    # Records are our own versioned JSON; decoding and validation happen in the agents so a bad
    # record becomes a dead letter instead of a crashed stream.
    value_serializer="raw",
    key_serializer="raw",
)


def configure(settings: Settings, **overrides: Any) -> faust.App:
    """Point the app at the configured Kafka and consumer group (before the worker starts)."""
    streams = settings.streams
    app.conf.id = streams.app_id
    servers = settings.kafka_bootstrap.split(",")
    app.conf.broker = ";".join(f"kafka://{server}" for server in servers)  # type: ignore
    # A new consumer group starts from the oldest record: nothing already on the topic is lost.
    app.conf.consumer_auto_offset_reset = streams.new_group_starts_at
    app.conf.topic_replication_factor = settings.kafka.replication_factor
    app.conf.broker_commit_interval = 1.0
    # A worker that died is noticed in 10 s (Faust's default is 60 s), so its partitions move to
    # a restarted or surviving worker within seconds.
    app.conf.broker_session_timeout = 10.0
    app.conf.broker_heartbeat_interval = 3.0
    # Agents hold events unacknowledged on purpose (until their window is written); waiting for
    # them on shutdown or rebalance would never end. What is unacknowledged is re-read by the
    # partition's next owner, which is what keeps the windows exact.
    app.conf.stream_wait_empty = False
    # Faust's own state (its table stores; our agents keep none) goes under the stack's home,
    # not into the current directory as "<app id>-data".
    # Faust makes its own directory there, but not the ones above it.
    (settings.stack.home / "faust").mkdir(parents=True, exist_ok=True)
    app.conf.datadir = str(settings.stack.home / "faust" / "{conf.name}-data")  # type: ignore
    for key, value in overrides.items():
        setattr(app.conf, key, value)
    return app

