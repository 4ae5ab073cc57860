"""Training: service-metric history (a DataFrame) in, a fitted AnomalyModel out."""

from __future__ import annotations

import pandas as pd

from models.detectors import AnomalyModel
from models.features import build_features


class TrainingError(ValueError):
    """The history cannot train a model (too little of it)."""


def train_model(metrics: pd.DataFrame, *, threshold: float = 0.999, baseline_windows: int = 60,
                min_windows: int = 6, min_training_windows: int = 30) -> tuple[AnomalyModel,
                                                                                pd.DataFrame]:
    """Fit an :class:`AnomalyModel` on ``metrics`` (ServiceMetrics columns, with
    ``window_start_us``); returns it and the feature rows it was fitted on.

    Each service needs ``min_training_windows`` windows to get a baseline of its own; windows
    before a service has ``min_windows`` of history have no departures yet and are left out.
    """
    if metrics.empty:
        raise TrainingError("no service-metric windows in the training range: widen --since/"
                            "--until, or check that the aggregation has written windows")
    features = build_features(metrics, baseline_windows=baseline_windows,
                              min_windows=min_windows)
    features = features[features["history"] >= min_windows]
    counts = features.groupby(["namespace", "service"]).size()
    enough = counts[counts >= min_training_windows]
    if enough.empty:
        raise TrainingError(
            f"no service has {min_training_windows} windows of history in the training range "
            f"(most: {int(counts.max()) if len(counts) else 0}); train on a longer range")
    model = AnomalyModel(threshold=threshold, min_windows=min_training_windows).fit(features)
    return model, features
