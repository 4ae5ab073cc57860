"""Helpers the SRE notebooks (notebooks/) share: their parameters, and reads the views lack.

* ``parameters``: a notebook's top cell names what it looks at (namespace, services, time
  range, resolution, config file); ``CLOVER_NOTEBOOK_<NAME>`` environment variables override
  those values, so the test suite (and papermill-less automation) can point a notebook at other
  data without editing it.
* ``read_flows`` / ``flow_matrix``: who talks to whom. The stored windows count flows per
  server service only (no peer), so the matrix is built from the flow records themselves, read
  from ``clover.flows`` over a bounded range of offsets.
* ``latency_histogram``: how a stored DDSketch's values spread over latency buckets.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from confluent_kafka import Consumer, TopicPartition
from ddsketch import DDSketch

from clover import records
from clover.config import Settings, load_settings
from clover.kafka import consumer_config
from clover.records import FlowRecord, RecordError
from clover.topics import FLOWS

ENV_PREFIX = "CLOVER_NOTEBOOK_"


@dataclass(frozen=True)
class Parameters:
    """What a notebook looks at; times are UTC."""

    namespace: str
    services: tuple[str, ...]
    start: pd.Timestamp
    end: pd.Timestamp
    resolution: str | None
    settings: Settings

    @property
    def service_keys(self) -> list[str]:
        """The services as analytics.views spells them: ``namespace/service``."""
        return [f"{self.namespace}/{service}" for service in self.services]

    @property
    def start_us(self) -> int:
        return int(self.start.value // 1000)

    @property
    def end_us(self) -> int:
        return int(self.end.value // 1000)


def parameters(*, namespace: str, services: Sequence[str], start: str = "-1h",
               end: str = "now", resolution: str | None = "1min", config: str | None = None,
               environ: Mapping[str, str] | None = None) -> Parameters:
    """The notebook's parameters: the given values, overridden by ``CLOVER_NOTEBOOK_NAMESPACE``,
    ``_SERVICES`` (comma-separated), ``_START``, ``_END`` (ISO times, ``now`` or an offset from
    now such as ``-2h``), ``_RESOLUTION`` (a pandas offset such as ``1min``, or ``none`` for the
    stored windows) and ``_CONFIG`` (a Clover TOML file; else ``$CLOVER_CONFIG``)."""
    env = os.environ if environ is None else environ

    def pick(name: str, value: object) -> object:
        return env.get(ENV_PREFIX + name.upper(), value)

    namespace = str(pick("namespace", namespace))
    raw_services = pick("services", services)
    service_list = (raw_services.split(",") if isinstance(raw_services, str)
                    else list(raw_services))  # type: ignore[call-overload]
    chosen = tuple(s.strip() for s in service_list if s.strip())
    if not namespace or not chosen:
        raise ValueError("name a namespace and at least one service (parameters(namespace=..., "
                         f"services=[...]) or {ENV_PREFIX}NAMESPACE / {ENV_PREFIX}SERVICES)")
    now = pd.Timestamp.now(tz="UTC")
    start_at = _moment("start", str(pick("start", start)), now)
    end_at = _moment("end", str(pick("end", end)), now)
    if start_at >= end_at:
        raise ValueError(f"the time range is empty: start {start_at} is not before end {end_at}")
    raw_resolution = pick("resolution", resolution)
    chosen_resolution = (None if raw_resolution is None
                         or str(raw_resolution).lower() in ("", "none") else str(raw_resolution))
    if chosen_resolution is not None:
        try:
            pd.Timedelta(chosen_resolution)
        except ValueError:
            raise ValueError(f"resolution {chosen_resolution!r} ({ENV_PREFIX}RESOLUTION): "
                             "expected a pandas offset such as '10s', '1min' or '1h', or "
                             "'none' for the stored windows") from None
    config_file = pick("config", config)
    settings = load_settings(str(config_file) if config_file else None)
    return Parameters(namespace, chosen, start_at, end_at, chosen_resolution, settings)


def _moment(name: str, text: str, now: pd.Timestamp) -> pd.Timestamp:
    text = text.strip()
    try:
        if text == "now":
            return now
        if text.startswith(("-", "+")):
            return now + pd.Timedelta(text)
        stamp = pd.Timestamp(text)
    except ValueError:
        raise ValueError(f"{name} {text!r} ({ENV_PREFIX}{name.upper()}): expected an ISO time "
                         "(2024-05-01T12:00Z), 'now', or an offset from now such as '-2h'"
                         ) from None
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


# -- flows ------------------------------------------------------------------------------------

FLOW_COLUMNS = ["end", "observer", "protocol", "state", "src", "dst", "src_revision",
                "dst_revision", "src_addr", "src_port", "dst_addr", "dst_port", "bytes_sent",
                "bytes_received", "duration_ms"]


def read_flows(settings: Settings, start: pd.Timestamp, end: pd.Timestamp,
               namespace: str | None = None, *, topic: str = FLOWS.name,
               max_records: int = 2_000_000, timeout_s: float = 30.0) -> pd.DataFrame:
    """Final flow records (closed, reset, counter intervals) that ended in [start, end) and
    touch ``namespace`` (either end; None: all), from ``clover.flows``.

    The read is bounded: it starts at the first message produced at ``start`` (a flow is
    published after it ends), stops at the topic's end as of the call, and reads at most
    ``max_records`` messages. It joins no consumer group and commits nothing. ``open`` records
    are progress reports whose totals the final record repeats, so they are left out; a
    connection seen from both of its ends (two records) is kept once. Records that do not
    decode are skipped and counted in ``frame.attrs["undecodable"]``.
    """
    start_us, end_us = int(start.value // 1000), int(end.value // 1000)
    consumer = Consumer(consumer_config(settings, group_id=f"clover-notebook-{uuid.uuid4()}",
                                        **{"enable.partition.eof": True}))
    rows: list[dict[str, object]] = []
    undecodable = read = 0
    try:
        partitions = consumer.list_topics(topic, timeout=timeout_s).topics[topic].partitions
        wanted = [TopicPartition(topic, p, start_us // 1000) for p in partitions]
        starts = consumer.offsets_for_times(wanted, timeout=timeout_s)
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout_s)[1]
                for p in partitions}
        # OFFSET_END (-1): nothing was produced at or after start on that partition.
        assigned = [tp for tp in starts if 0 <= tp.offset < ends[tp.partition]]
        pending = {tp.partition for tp in assigned}
        consumer.assign(assigned)
        while pending and read < max_records:
            for message in consumer.consume(500, timeout=1.0):
                partition = message.partition()
                if message.error() is not None:
                    pending.discard(partition)  # end of partition (or an error): stop there
                    continue
                if partition not in pending:
                    continue
                offset = message.offset()
                assert offset is not None  # a consumed message that is not an error has one
                if offset >= ends[partition] - 1:
                    pending.discard(partition)
                if offset >= ends[partition]:
                    continue
                read += 1
                try:
                    # A tombstone (no value) is undecodable, like any value that is not JSON.
                    flow = records.decode(FlowRecord, message.value() or b"")
                except RecordError:
                    undecodable += 1
                    continue
                if _wanted(flow, start_us, end_us, namespace):
                    rows.append(_flow_row(flow))
    finally:
        consumer.close()
    frame = pd.DataFrame(rows, columns=FLOW_COLUMNS)
    tcp = frame["observer"] == "tcp_lifecycle"
    connection = ["protocol", "src_addr", "src_port", "dst_addr", "dst_port", "state"]
    frame = pd.concat([frame[tcp].drop_duplicates(connection), frame[~tcp]])
    frame = frame.sort_values("end", ignore_index=True)
    frame.attrs["undecodable"] = undecodable
    frame.attrs["messages_read"] = read
    return frame


def _wanted(flow: FlowRecord, start_us: int, end_us: int, namespace: str | None) -> bool:
    if flow.state == "open" or flow.end_us is None or not start_us <= flow.end_us < end_us:
        return False
    return namespace is None or namespace in (flow.src.namespace, flow.dst.namespace)


def _who(end: records.Endpoint) -> str:
    """An end as ``namespace/service``, or its address when no pod was attributed."""
    return f"{end.namespace or 'unknown'}/{end.service}" if end.service else end.addr


def _flow_row(flow: FlowRecord) -> dict[str, object]:
    return {"end": pd.Timestamp(flow.end_us, unit="us", tz="UTC"), "observer": flow.observer,
            "protocol": flow.protocol, "state": flow.state, "src": _who(flow.src),
            "dst": _who(flow.dst), "src_revision": flow.src.revision,
            "dst_revision": flow.dst.revision, "src_addr": flow.src.addr,
            "src_port": flow.src.port, "dst_addr": flow.dst.addr, "dst_port": flow.dst.port,
            "bytes_sent": flow.bytes_sent, "bytes_received": flow.bytes_received,
            "duration_ms": flow.duration_us / 1000}


def flow_matrix(flows: pd.DataFrame) -> pd.DataFrame:
    """One row per (src, dst) pair: bytes each way, connections (TCP), resets and flows."""
    pairs = flows.assign(
        bytes=flows["bytes_sent"] + flows["bytes_received"],
        connections=(flows["observer"] == "tcp_lifecycle").astype(int),
        resets=(flows["state"] == "reset").astype(int))
    matrix = pairs.groupby(["src", "dst"], as_index=False).agg(
        bytes=("bytes", "sum"), bytes_sent=("bytes_sent", "sum"),
        bytes_received=("bytes_received", "sum"), connections=("connections", "sum"),
        resets=("resets", "sum"), flows=("end", "size"))
    return matrix.sort_values("bytes", ascending=False, ignore_index=True)


# -- sketches ---------------------------------------------------------------------------------

def latency_histogram(sketch: DDSketch | None, edges_ms: np.ndarray,
                      points: int = 400) -> np.ndarray:
    """How many of the sketch's values fall in each bucket between ``edges_ms``.

    The sketch is read through its quantiles at ``points`` evenly spaced ranks, each standing
    for count/points values, so a bucket's count is exact to within count/points (and the
    sketch's own 1% relative error on the edges)."""
    counts = np.zeros(len(edges_ms) - 1)
    if sketch is None or sketch.count == 0:
        return counts
    ranks = (np.arange(points) + 0.5) / points
    values = np.array([sketch.get_quantile_value(q) for q in ranks], dtype=float)
    values = np.clip(values, edges_ms[0], edges_ms[-1])
    counts += np.histogram(values, bins=edges_ms)[0] * (sketch.count / points)
    return counts
