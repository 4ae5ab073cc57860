"""Features of service windows: baselines without look-ahead, revisions, batch = online."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from clover.records import ServiceMetrics
from models.features import BASE_FEATURES, ServiceBaseline, base_vector, build_features

WINDOW_US = 10_000_000


def synthetic_metrics(windows: int = 200, services: tuple[str, ...] = ("cart", "checkout"),
                      seed: int = 7, spikes: dict[tuple[str, int], dict[str, float]] | None = None,
                      revisions: dict[str, tuple[str, ...]] | None = None,
                      start_us: int = 1_700_000_000_000_000) -> pd.DataFrame:
    """Service windows with Poisson traffic and log-normal latency; ``spikes`` multiplies a
    column of (service, window) by a factor, e.g. {("cart", 150): {"latency": 5}}."""
    rng = np.random.default_rng(seed)
    spikes = spikes or {}
    rows = []
    for i in range(windows):
        for s, service in enumerate(services):
            for revision in (revisions or {}).get(service, ("r1",)):
                factors = spikes.get((service, i), {})
                if revision != (revisions or {}).get(service, ("r1",))[0]:
                    factors = spikes.get((service + "@" + revision, i), factors)
                requests = int(rng.poisson(400 * (s + 1)) * factors.get("requests", 1.0))
                latency = 20 * (s + 1) * np.exp(rng.normal(0, 0.05)) * factors.get("latency", 1)
                errors = int(rng.binomial(requests, min(1.0, 0.002 * factors.get("errors", 1))))
                rows.append(dict(
                    namespace="shop", service=service, revision=revision,
                    window_start_us=start_us + i * WINDOW_US, window_seconds=10,
                    requests=requests, errors=errors,
                    error_rate=errors / requests if requests else None,
                    latency_p50_ms=latency if requests else None,
                    latency_p90_ms=latency * 2 if requests else None,
                    latency_p99_ms=latency * 3 if requests else None,
                    latency_max_ms=latency * 4 if requests else None,
                    bytes_in=requests * 300, bytes_out=requests * 900, flows=requests // 10,
                    connections_opened=5, connections_closed=5, connections_reset=0,
                    peer_namespace=None, peer_service=None))
    return pd.DataFrame(rows)


def as_records(frame: pd.DataFrame) -> list[ServiceMetrics]:
    records = []
    for row in frame.to_dict("records"):
        # A row's columns are the record's fields, of several types (NaN is a missing value).
        fields: dict[str, Any] = {k: (None if isinstance(v, float) and np.isnan(v) else v)
                                  for k, v in row.items()}
        records.append(ServiceMetrics(**fields))
    return records


def test_edge_rows_are_not_scored() -> None:
    frame = synthetic_metrics(windows=20, services=("cart",))
    edge = frame.iloc[:5].copy()
    edge["peer_service"] = "redis"
    features = build_features(pd.concat([frame, edge]))
    assert len(features) == 20


def test_a_spike_departs_from_the_baseline_and_the_baseline_never_sees_ahead() -> None:
    frame = synthetic_metrics(windows=120, spikes={("cart", 100): {"latency": 4.0}})
    features = build_features(frame, baseline_windows=60, min_windows=6)
    cart = features[features["service"] == "cart"].reset_index(drop=True)
    assert cart.loc[100, "latency_p90_ms__z"] > 10
    assert cart.drop(index=100)["latency_p90_ms__z"].abs().max() < 6
    # Changing a later window changes nothing earlier (no look-ahead).
    later = frame.copy()
    later.loc[(later["service"] == "cart") & (later.index > 230), "latency_p50_ms"] *= 100
    again = build_features(later, baseline_windows=60, min_windows=6)
    again_cart = again[again["service"] == "cart"].reset_index(drop=True)
    pd.testing.assert_series_equal(cart.loc[:110, "latency_p50_ms__z"],
                                   again_cart.loc[:110, "latency_p50_ms__z"])
    # Too little history: no departure at all rather than a made-up one.
    assert cart.loc[:5, "latency_p50_ms__z"].isna().all()


def test_departure_from_the_other_revision() -> None:
    frame = synthetic_metrics(windows=40, services=("cart",),
                              revisions={"cart": ("old", "new")},
                              spikes={("cart@new", i): {"latency": 3.0} for i in range(40)})
    features = build_features(frame)
    new = features[features["revision"] == "new"]
    old = features[features["revision"] == "old"]
    assert (new["latency_p50_ms__rev"] > 5).all()
    assert (old["latency_p50_ms__rev"] < -5).all()
    alone = build_features(synthetic_metrics(windows=10, services=("cart",)))
    assert (alone["latency_p50_ms__rev"] == 0).all()


def test_online_baseline_matches_the_batch_features() -> None:
    frame = synthetic_metrics(windows=90, services=("cart",))
    features = build_features(frame, baseline_windows=30, min_windows=6)
    baseline = ServiceBaseline(baseline_windows=30)
    for i, record in enumerate(frame.to_dict("records")):
        values = base_vector(pd.DataFrame([record]))
        median, scale = baseline.stats()
        if i >= 6:
            expected = features.loc[i, [f"{f}__z" for f in BASE_FEATURES]].to_numpy(float)
            np.testing.assert_allclose((values - median) / scale, expected, rtol=1e-9,
                                       equal_nan=True)
        baseline.learn(values)
