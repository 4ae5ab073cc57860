"""The scoring agent end to end: `clover models agent` as a process, real Kafka and Cassandra.

Each test has topics, a consumer group, a Cassandra keyspace and a model path of its own. Also
`clover models train` from windows stored in that keyspace, and the agent's refusal of an
incompatible model file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from analytics.anomalies import AnomalyTable
from analytics.store import Store, connect
from clover import records
from clover.config import Settings
from clover.kafka import client_config, producer_config
from clover.records import Anomaly, ServiceMetrics
from clover.stack import Stack
from tests.conftest import TopicReader
from tests.test_models_features import as_records, synthetic_metrics

CLOVER = [sys.executable, "-m", "clover.cli"]


@pytest.fixture(scope="module")
def keyspace(live_stack: Stack, settings: Settings) -> Iterator[Store]:
    cassandra = dataclasses.replace(settings.cassandra,
                                    keyspace=f"clover_scoretest_{uuid.uuid4().hex[:8]}")
    store = connect(dataclasses.replace(settings, cassandra=cassandra))
    store.create_schema(1)
    AnomalyTable(store).create()
    yield store
    store.session.execute(f"DROP KEYSPACE {store.keyspace}", timeout=60)
    store.close()


@dataclasses.dataclass
class Topics:
    metrics: str
    anomalies: str


@pytest.fixture
def topics(live_stack: Stack, settings: Settings) -> Iterator[Topics]:
    suffix = uuid.uuid4().hex[:8]
    made = Topics(f"test-score-metrics-{suffix}", f"test-score-anomalies-{suffix}")
    admin = AdminClient(client_config(settings))
    for future in admin.create_topics([NewTopic(t, 1, 1) for t in (made.metrics,
                                                                     made.anomalies)]).values():
        future.result(30)
    yield made
    admin.delete_topics([made.metrics, made.anomalies])


def _env(store: Store, model_path: Path, **models: object) -> dict[str, str]:
    return {**os.environ, "CLOVER_CASSANDRA_KEYSPACE": store.keyspace,
            "CLOVER_MODELS_MODEL_PATH": str(model_path),
            "CLOVER_MODELS_GROUP_ID": f"test-score-{uuid.uuid4().hex[:8]}",
            # No metrics endpoint: these tests do not scrape it, and a port picked free here
            # can be taken by another process before the agent binds it.
            "CLOVER_MODELS_METRICS_PORT": "0",
            **{f"CLOVER_MODELS_{k.upper()}": str(v) for k, v in models.items()}}


class Agent:
    """`clover models agent` as a process; its log is kept for failure messages."""

    def __init__(self, env: dict[str, str], topics: Topics) -> None:
        self.proc = subprocess.Popen(
            [*CLOVER, "models", "agent", "--metrics-topic", topics.metrics,
             "--anomalies-topic", topics.anomalies], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env=env)
        self.log: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.log.append(line)
                if "scoring agent ready" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(90):
            self.stop()
            raise AssertionError("the agent did not start:\n" + "".join(self.log[-40:]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def agents() -> Iterator[Callable[..., Agent]]:
    started: list[Agent] = []

    def start(env: dict[str, str], topics: Topics) -> Agent:
        started.append(Agent(env, topics))
        return started[-1]

    yield start
    for agent in started:
        agent.stop()
        print("".join(agent.log[-60:]))  # shown when the test failed


def _publish(settings: Settings, topic: str, windows: list[ServiceMetrics],
             raw: Sequence[bytes] = ()) -> None:
    producer = Producer(producer_config(settings))
    for value in raw:
        producer.produce(topic, value, b"shop/cart")
    for window in windows:
        producer.produce(topic, records.encode(window), window.key())
    assert producer.flush(10) == 0


def _verdicts(topic_reader: Callable[[str], TopicReader], reader: TopicReader,
              count: int) -> list[Anomaly]:
    messages = reader.read(count, timeout=60)
    return [records.decode(Anomaly, m.value()) for m in messages]


def test_agent_learns_online_flags_a_spike_and_records_every_verdict(
        settings: Settings, keyspace: Store, topics: Topics, agents: Callable[..., Agent],
        topic_reader: Callable[[str], TopicReader], tmp_path: Path) -> None:
    verdicts_reader = topic_reader(topics.anomalies)
    deadletters = topic_reader("clover.deadletter")
    frame = synthetic_metrics(windows=20, services=("cart",), seed=31,
                              spikes={("cart", 15): {"latency": 6.0}})
    # Every request gets the cart and sets it; in windows 18 and 19 a third of them return
    # after the get (the metrics look as usual there: only the call patterns tell).
    windows = [dataclasses.replace(w, call_patterns={
        "get+set": w.requests - w.requests // 3, "get": w.requests // 3} if i >= 18
        else {"get+set": w.requests}) for i, w in enumerate(as_records(frame))]
    edge = dataclasses.replace(windows[0], peer_service="redis", peer_namespace="shop")
    agents(_env(keyspace, tmp_path / "absent.joblib", min_windows=4), topics)
    _publish(settings, topics.metrics, [edge, *windows], raw=[b"{not json"])

    verdicts = _verdicts(topic_reader, verdicts_reader, 20)
    assert [v.window_start_us for v in verdicts] == [w.window_start_us for w in windows]
    assert [v.verdict for v in verdicts[:4]] == ["inconclusive"] * 4
    assert verdicts[0].reason == "learning: 0 of 4 windows of history for this service"
    anomalous = [i for i, v in enumerate(verdicts) if v.verdict == "anomalous"]
    assert anomalous == [15, 18, 19]
    assert verdicts[15].contributions[0].feature.startswith("latency")
    assert [v.detector for v in verdicts[18:]] == ["call_patterns"] * 2
    assert verdicts[19].contributions[0].feature == "call pattern get"
    assert all(v.verdict == "normal" for i, v in enumerate(verdicts)
               if i >= 4 and i not in anomalous)
    # The edge row (published before the windows) gave no verdict: 20 records, not 21.
    assert len(verdicts_reader.read_all()) == 20

    stored = AnomalyTable(keyspace).read("shop", "cart", windows[0].window_start_us,
                                         windows[-1].window_start_us + 1)
    assert stored == verdicts

    letters = [records.decode(records.DeadLetter, m.value()) for m in deadletters.read(50, 5)]
    ours = [d for d in letters if d.source_topic == topics.metrics]
    assert len(ours) == 1 and ours[0].component == "score" and "JSON" in ours[0].reason


def test_train_from_cassandra_then_score_with_the_model(
        settings: Settings, keyspace: Store, topics: Topics, agents: Callable[..., Agent],
        topic_reader: Callable[[str], TopicReader], tmp_path: Path) -> None:
    history = as_records(synthetic_metrics(windows=120, services=("cart",), seed=41,
                                           start_us=1_699_990_000_000_000))
    assert keyspace.write_service_metrics(history) == 120
    model_path = tmp_path / "model.joblib"
    env = _env(keyspace, model_path)
    done = subprocess.run([*CLOVER, "models", "train", "--since", "2023-11-14T19:00Z",
                           "--until", "2023-11-15T00:00Z", "--service", "shop/cart"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "trained on 114 windows of 1 services (shop/cart)" in done.stdout
    metadata = json.loads(Path(f"{model_path}.json").read_text())
    assert metadata["services"] == ["shop/cart"] and metadata["training_windows"] == 114

    reader = topic_reader(topics.anomalies)
    agents(env, topics)
    fresh = as_records(synthetic_metrics(windows=12, services=("cart",), seed=42,
                                         spikes={("cart", 10): {"requests": 0.1}}))
    _publish(settings, topics.metrics, fresh)
    verdicts = _verdicts(topic_reader, reader, 12)
    assert all(v.detector.startswith("anomaly_model@") for v in verdicts[6:])
    assert [v.verdict for v in verdicts[6:]] == ["normal"] * 4 + ["anomalous", "normal"]
    # Bytes follow requests in this data, so they fell as far: all three lead.
    assert {c.feature for c in verdicts[10].contributions} == {
        "request_rate", "bytes_in_rate", "bytes_out_rate"}


def test_training_with_a_bad_range_or_no_data_says_what_to_do(
        settings: Settings, keyspace: Store, tmp_path: Path) -> None:
    env = _env(keyspace, tmp_path / "m.joblib")
    done = subprocess.run([*CLOVER, "models", "train", "--since", "yesterday-ish",
                           "--service", "shop/cart"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 2 and "--since/--until" in done.stderr
    done = subprocess.run([*CLOVER, "models", "train", "--since", "2001-01-01",
                           "--until", "2001-01-02", "--service", "shop/nothing"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and "no service-metric windows in the training range" \
        in done.stderr


def test_agent_refuses_an_incompatible_model_file(
        keyspace: Store, topics: Topics, tmp_path: Path) -> None:
    from models import persistence
    from models.train import train_model

    model, features = train_model(synthetic_metrics(windows=60, services=("cart",)))
    path = tmp_path / "old.joblib"
    persistence.save(model, path, training_start_us=0, training_end_us=1,
                     training_windows=len(features), created_us=2)
    meta = json.loads(Path(f"{path}.json").read_text())
    meta["libraries"]["scikit-learn"] = "0.22.0"
    Path(f"{path}.json").write_text(json.dumps(meta))
    done = subprocess.run([*CLOVER, "models", "agent", "--metrics-topic", topics.metrics,
                           "--anomalies-topic", topics.anomalies],
                          capture_output=True, text=True, env=_env(keyspace, path), timeout=120)
    assert done.returncode == 2
    assert "saved with scikit-learn 0.22.0" in done.stderr
    assert "clover models train" in done.stderr
