"""Saving and loading a model: round trip, and clear errors for incompatible files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models import persistence
from models.detectors import AnomalyModel
from models.features import build_features
from models.persistence import ModelFileError
from models.train import train_model
from tests.test_models_features import synthetic_metrics


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, AnomalyModel]:
    model, features = train_model(synthetic_metrics(windows=200, seed=21), threshold=0.995)
    path = tmp_path_factory.mktemp("model") / "anomaly.joblib"
    persistence.save(model, path, training_start_us=1, training_end_us=2,
                     training_windows=len(features), created_us=3)
    return path, model


def test_round_trip_scores_the_same(saved: tuple[Path, AnomalyModel]) -> None:
    path, model = saved
    loaded, metadata = persistence.load(path)
    fresh = build_features(synthetic_metrics(windows=30, seed=22, spikes={("cart", 25): {
        "latency": 5.0}}))
    np.testing.assert_array_equal(loaded.anomaly_score(fresh), model.anomaly_score(fresh))
    assert metadata.threshold == 0.995 and metadata.services == ["shop/cart", "shop/checkout"]
    assert metadata.features == persistence.FEATURES
    assert metadata.libraries["scikit-learn"] == persistence.library_versions()["scikit-learn"]
    assert (metadata.training_start_us, metadata.training_end_us) == (1, 2)


def _edited(saved: tuple[Path, AnomalyModel], tmp_path: Path, **changes: object) -> Path:
    path, _ = saved
    copy = tmp_path / "model.joblib"
    copy.write_bytes(path.read_bytes())
    meta = json.loads(persistence.metadata_path(path).read_text())
    meta.update(changes)
    persistence.metadata_path(copy).write_text(json.dumps(meta))
    return copy


def test_an_other_format_version_is_refused_with_what_to_do(saved, tmp_path: Path) -> None:
    path = _edited(saved, tmp_path, format_version=99)
    with pytest.raises(ModelFileError) as error:
        persistence.load(path)
    message = str(error.value)
    assert f"format version 99, this build reads {persistence.FORMAT_VERSION}" in message
    assert "clover models train" in message


def test_other_library_versions_and_features_are_named(saved, tmp_path: Path) -> None:
    path = _edited(saved, tmp_path, libraries={"scikit-learn": "0.24.2", "numpy": "1.19.0"},
                   features=["request_rate", "latency_p99_ms", "cpu_seconds"])
    with pytest.raises(ModelFileError) as error:
        persistence.load(path)
    message = str(error.value)
    assert "saved with scikit-learn 0.24.2" in message and "saved with numpy 1.19.0" in message
    assert "no longer has ['cpu_seconds']" in message


def test_missing_or_damaged_files(saved, tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="no model at"):
        persistence.load(tmp_path / "absent.joblib")
    lonely = tmp_path / "lonely.joblib"
    lonely.write_bytes(saved[0].read_bytes())
    with pytest.raises(ModelFileError, match="lonely.joblib.json does not exist"):
        persistence.load(lonely)
    damaged = _edited(saved, tmp_path)
    damaged.write_bytes(b"not a pickle")
    with pytest.raises(ModelFileError, match="could not be read"):
        persistence.load(damaged)
