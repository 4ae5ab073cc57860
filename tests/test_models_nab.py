"""`clover models score` on NAB-format series: streaming, no look-ahead; NAB's scoring."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.nab import StreamingScorer, nab_score, normalised, score_series
from tests.conftest import SHARED_DATA

NAB = SHARED_DATA / "nab-sample"
CLOVER = [str(Path(sys.executable).parent / "clover")]


def _series(n: int = 600, jump_at: int = 500) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    values = 50 + rng.normal(0, 1, n)
    values[jump_at:jump_at + 5] += 30
    times = pd.date_range("2024-01-01", periods=n, freq="5min")
    return pd.DataFrame({"timestamp": times.strftime("%Y-%m-%d %H:%M:%S"), "value": values})


def test_scores_flag_the_jump_and_never_look_ahead() -> None:
    frame = _series()
    scores = score_series(frame["value"].to_numpy(), StreamingScorer(threshold=0.9999))
    assert scores[500] >= 0.9999
    assert (scores[100:500] < 0.9999).mean() > 0.99
    changed = frame["value"].to_numpy().copy()
    changed[550:] = 1000.0
    again = score_series(changed, StreamingScorer(threshold=0.9999))
    np.testing.assert_array_equal(scores[:550], again[:550])


def test_nab_scoring_rewards_early_detection_and_charges_false_positives() -> None:
    times = pd.Series(pd.date_range("2024-01-01", periods=1000, freq="min"))
    window = [(times[600], times[699])]
    early, late, none = (np.zeros(1000, bool) for _ in range(3))
    early[600] = late[690] = True
    results = [nab_score(times, d, window) for d in (early, late, none)]
    assert results[0].raw > results[1].raw > 0 > results[2].raw == -1.0
    assert normalised([results[0]]) == pytest.approx(100.0)
    assert normalised([results[2]]) == pytest.approx(0.0)
    noisy = early.copy()
    noisy[300] = True
    assert nab_score(times, noisy, window).false_positives == 1
    probation = early.copy()
    probation[10] = True  # inside the first 15 %: ignored
    assert nab_score(times, probation, window).false_positives == 0


def test_cli_scores_a_generated_file(tmp_path: Path) -> None:
    source = tmp_path / "series.csv"
    _series().to_csv(source, index=False)
    out = tmp_path / "scores.csv"
    done = subprocess.run([*CLOVER, "models", "score", "--input", str(source), "--output",
                           str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    scored = pd.read_csv(out)
    assert list(scored.columns) == ["timestamp", "value", "anomaly_score"]
    assert len(scored) == 600 and scored["anomaly_score"].between(0, 1).all()
    assert scored["anomaly_score"][500] >= 0.9999


def test_cli_refuses_a_file_that_is_not_nab_format(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("time,reading\n2024-01-01 00:00:00,1\n")
    done = subprocess.run([*CLOVER, "models", "score", "--input", str(bad), "--output",
                           str(tmp_path / "o.csv")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "expected the columns timestamp,value (NAB format), found time,reading" in done.stderr
    bad.write_text("timestamp,value\n2024-01-01 00:00:00,1\n2024-01-01 00:05:00,high\n")
    done = subprocess.run([*CLOVER, "models", "score", "--input", str(bad), "--output",
                           str(tmp_path / "o.csv")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "line 3: value 'high' is not a number" in done.stderr
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.skipif(not NAB.is_dir(), reason=f"the NAB sample is not at {NAB}")
def test_cli_scores_a_real_nab_file_and_finds_its_labelled_anomalies(tmp_path: Path) -> None:
    import json

    name = "realKnownCause/ec2_request_latency_system_failure.csv"
    out = tmp_path / "scores.csv"
    done = subprocess.run([*CLOVER, "models", "score", "--input", str(NAB / "data" / name),
                           "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    scored = pd.read_csv(out)
    source = pd.read_csv(NAB / "data" / name)
    assert len(scored) == len(source) and (scored["value"] == source["value"]).all()
    windows = json.loads((NAB / "labels" / "combined_windows.json").read_text())[name]
    result = nab_score(pd.to_datetime(scored["timestamp"]),
                       scored["anomaly_score"].to_numpy() >= 0.9999,
                       [(pd.Timestamp(a), pd.Timestamp(b)) for a, b in windows])
    assert result.detected == result.windows == 3
