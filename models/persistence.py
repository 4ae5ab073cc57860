"""Saving and loading a trained model: ``<path>`` (joblib) next to ``<path>.json`` (metadata).

The metadata says what the model is and what it needs: the format version, the features in
order, the training range, the threshold, the services it knows, and the versions of the
libraries that pickled it. :func:`load` checks them before unpickling, so an incompatible file
is refused with a :class:`ModelFileError` naming what differs and what to do, rather than
failing later in an obscure way (or, worse, scoring with the wrong features).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy
import pandas
import scipy
import sklearn

from models.detectors import AnomalyModel
from models.features import BASE_FEATURES, DEPARTURE_FEATURES

FORMAT_VERSION = 2  # 2: AnomalyModel calibrates its combined score (calibration_)
FEATURES = [*BASE_FEATURES, *DEPARTURE_FEATURES]
RETRAIN = "retrain it with `clover models train --since ...`"


class ModelFileError(ValueError):
    """A model file is missing, unreadable or incompatible with this build."""


@dataclass
class ModelMetadata:
    format_version: int
    features: list[str]
    threshold: float
    training_start_us: int
    training_end_us: int
    training_windows: int
    services: list[str]
    libraries: dict[str, str] = field(default_factory=dict)
    created_us: int = 0


def library_versions() -> dict[str, str]:
    """The versions whose pickles must match (scikit-learn does not promise compatibility)."""
    return {"scikit-learn": sklearn.__version__, "numpy": numpy.__version__,
            "scipy": scipy.__version__, "pandas": pandas.__version__,
            "joblib": joblib.__version__}


def metadata_path(path: Path) -> Path:
    return Path(f"{path}.json")


def save(model: AnomalyModel, path: str | os.PathLike[str], *, training_start_us: int,
         training_end_us: int, training_windows: int, created_us: int) -> ModelMetadata:
    """Write the model and its metadata (each to a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = ModelMetadata(
        format_version=FORMAT_VERSION, features=list(FEATURES), threshold=model.threshold,
        training_start_us=training_start_us, training_end_us=training_end_us,
        training_windows=training_windows, services=list(model.services_),
        libraries=library_versions(), created_us=created_us)
    partial = path.with_name(path.name + ".partial")
    joblib.dump(model, partial)
    os.replace(partial, path)
    meta = metadata_path(path)
    meta.with_name(meta.name + ".partial").write_text(json.dumps(asdict(metadata), indent=2))
    os.replace(meta.with_name(meta.name + ".partial"), meta)
    return metadata


def read_metadata(path: str | os.PathLike[str]) -> ModelMetadata:
    meta = metadata_path(Path(path))
    try:
        raw: dict[str, Any] = json.loads(meta.read_text())
    except FileNotFoundError:
        raise ModelFileError(f"{meta} does not exist: a model is saved with its metadata next "
                             f"to it; {RETRAIN}") from None
    except ValueError as exc:
        raise ModelFileError(f"{meta} is not valid JSON ({exc}); {RETRAIN}") from None
    known = set(ModelMetadata.__dataclass_fields__)
    missing = [k for k in known if k not in raw and k not in ("libraries", "created_us")]
    if missing:
        raise ModelFileError(f"{meta} lacks {sorted(missing)}; {RETRAIN}")
    return ModelMetadata(**{k: v for k, v in raw.items() if k in known})


def check_compatible(metadata: ModelMetadata, where: str) -> None:
    """Raise :class:`ModelFileError` listing every difference that stops this build using it."""
    problems = []
    if metadata.format_version != FORMAT_VERSION:
        problems.append(f"format version {metadata.format_version}, this build reads "
                        f"{FORMAT_VERSION}")
    if metadata.features != FEATURES:
        added = sorted(set(FEATURES) - set(metadata.features))
        dropped = sorted(set(metadata.features) - set(FEATURES))
        problems.append("features differ" + (f" (this build adds {added})" if added else "")
                        + (f" (this build no longer has {dropped})" if dropped else "")
                        + ("" if added or dropped else " in order"))
    current = library_versions()
    for name, version in sorted(metadata.libraries.items()):
        if name in ("scikit-learn", "numpy", "joblib") and current.get(name) != version:
            problems.append(f"saved with {name} {version}, this environment has "
                            f"{current.get(name)}")
    if problems:
        raise ModelFileError(f"model {where} cannot be used: {'; '.join(problems)}. Either "
                             f"{RETRAIN} in this environment, or use the environment it was "
                             "trained in")


def load(path: str | os.PathLike[str]) -> tuple[AnomalyModel, ModelMetadata]:
    """The model and its metadata, after checking that this build can use it."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"no model at {path}; {RETRAIN}, or point [models] model_path at "
                             "an existing one")
    metadata = read_metadata(path)
    check_compatible(metadata, str(path))
    try:
        model = joblib.load(path)
    except Exception as exc:  # unpickling can raise almost anything on a damaged file
        raise ModelFileError(f"model {path} could not be read ({type(exc).__name__}: {exc}); "
                             f"{RETRAIN}") from exc
    if not isinstance(model, AnomalyModel):
        raise ModelFileError(f"{path} holds a {type(model).__name__}, not an AnomalyModel; "
                             f"{RETRAIN}")
    return model, metadata
