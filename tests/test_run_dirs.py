"""training.runs, training.metrics.decide, the ensemble method names, tune's grid
assembly and ``python -m training``: the one home of each idea (issue 16), without
TensorFlow (seconds)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training import ensemble, runs, tune
from training.config import TrainConfig
from training.metrics import DEFAULT_CUTS, decide, kappa_thresholds

ROOT = Path(__file__).resolve().parents[1]


def test_decide_is_the_grade_decision_of_every_task():
    probs = np.array([[0.1, 0.6, 0.1, 0.1, 0.1], [0.0, 0.0, 0.0, 0.2, 0.8]])
    assert decide("grade", probs).tolist() == [1, 4]
    assert decide("referable", np.array([[0.5], [0.4999], [0.9]])).tolist() == [1, 0, 1]
    scores = np.array([[-0.3], [0.5], [1.49], [2.6], [9.0]])
    assert decide("regression", scores).tolist() == [0, 1, 1, 3, 4]  # a cut belongs above
    assert decide("regression", scores, [0.2, 0.4, 0.6, 0.8]).tolist() == [0, 2, 4, 4, 4]
    assert DEFAULT_CUTS == (0.5, 1.5, 2.5, 3.5)
    assert inspect.signature(kappa_thresholds).parameters["start"].default is DEFAULT_CUTS


def _run(d: Path, **config) -> Path:
    d.mkdir(parents=True)
    (d / runs.CONFIG).write_text(json.dumps({"model": "cnn-small", "head": [8, 4], **config}))
    return d


def test_a_run_directory_read_through_runs(tmp_path):
    assert not runs.is_run(tmp_path)
    with pytest.raises(runs.RunError, match="not a drpipe run"):
        runs.load_config(tmp_path)
    run = _run(tmp_path / "run", task="regression", image_size=64)
    cfg = runs.load_config(run)
    assert isinstance(cfg, TrainConfig) and cfg.head == (8, 4) and cfg.image_size == 64
    assert runs.is_run(run) and not runs.is_finished(run)
    with pytest.raises(runs.RunError, match=r"model\.keras does not exist \(is the run fini"):
        runs.require_model(run)
    assert runs.model_path(run, "best") == run / "checkpoints" / "best.keras"
    assert runs.recorded_cuts(run) is None
    (run / "model.keras").write_bytes(b"x")
    runs.write_metrics(run, {"thresholds": [0.4, 1.4, 2.6, 3.3]})
    assert runs.require_model(run) == run / "model.keras" and runs.is_finished(run)
    assert runs.recorded_cuts(run) == [0.4, 1.4, 2.6, 3.3]
    assert not list(run.glob(".*tmp"))  # written whole, no temporary left
    assert runs.members_of(run, "best") == ([run], "best")


def test_an_ensemble_directory_names_its_members(tmp_path):
    a, b = _run(tmp_path / "a"), _run(tmp_path / "b")
    ens = tmp_path / "ens"
    ens.mkdir()
    runs.write_json(ens / runs.ENSEMBLE, {"method": "mean", "checkpoint": "best",
                                          "members": [{"run": str(a)}, {"run": str(b)}]})
    assert runs.is_ensemble(ens) and not runs.is_ensemble(a) and not runs.is_run(ens)
    assert runs.members_of(ens, "final") == ([a, b], "best")


def test_weighted_mean_is_the_accuracy_weighted_mean_and_mean_its_old_name():
    assert ensemble.canonical("mean") == "weighted-mean" and "mean" not in ensemble.METHODS
    with pytest.raises(ensemble.EnsembleError, match="unknown method 'median'"):
        ensemble.canonical("median")
    p1 = np.array([[0.7, 0.3, 0, 0, 0], [0.1, 0.1, 0.8, 0, 0]])
    p2 = np.array([[0.2, 0.8, 0, 0, 0], [0.1, 0.1, 0.1, 0.7, 0]])
    fitted = {"weights": [0.75, 0.25]}  # as an ensemble.json of either name holds it
    old = ensemble.apply("mean", fitted, [p1, p2])
    np.testing.assert_allclose(old, ensemble.apply("weighted-mean", fitted, [p1, p2]))
    np.testing.assert_allclose(old[0], [0.575, 0.425, 0, 0, 0])


def _options_of(args):
    if "--epochs" in args and args[args.index("--epochs") + 1] == "zero":
        raise tune.TuneError("Invalid value for '--epochs': 'zero' is not a valid integer.")
    return {"args": args}


def test_tune_assembles_the_grid_and_refuses_what_train_would(tmp_path):
    t = tune.prepare(None, "1e-3,1e-4", "", ["data=a,b"], ["--epochs", "2"],
                     tmp_path / "t", _options_of)
    assert t.grid == {"lr": ["1e-3", "1e-4"],
                      "data": [str(Path("a").resolve()), str(Path("b").resolve())]}
    assert [p.name for p in t.points][:2] == [f"lr=1e-3,data={tune._safe(t.grid['data'][0])}",
                                              f"lr=1e-3,data={tune._safe(t.grid['data'][1])}"]
    assert t.points[0].options["args"][:2] == ["--epochs", "2"]
    assert json.loads((tmp_path / "t" / "tune.json").read_text())["train_flags"] == ["--epochs",
                                                                                      "2"]
    assert t.describe().startswith("4 points: lr {1e-3, 1e-4} x data {")
    with pytest.raises(tune.TuneUsageError, match="--out is set by drpipe tune"):
        tune.prepare(None, "1e-3", "", ["data=a"], ["--out=x"], tmp_path / "u", _options_of)
    with pytest.raises(tune.TuneUsageError, match="point epochs=zero: Invalid value"):
        tune.prepare(None, "", "", ["data=a", "epochs=1,zero"], [], tmp_path / "v",
                     _options_of)
    with pytest.raises(runs.RunError, match="no drpipe shards here"):
        tune.prepare(tmp_path, "1e-3", "16", [], [], tmp_path / "w", _options_of)
    assert not (tmp_path / "v").exists() and not (tmp_path / "w").exists()


def _training(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "training", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120)


def test_python_m_training_fails_in_one_line(tmp_path):
    r = _training("--resume", tmp_path)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"drpipe: error: {tmp_path}: not a drpipe run (no config.json)")
    r = _training("--options", json.dumps({"model": "resnet9000", "data": str(tmp_path)}))
    assert r.returncode == 2 and "drpipe: error: unknown model 'resnet9000'" in r.stderr
