"""drpipe tune and drpipe ensemble on one fixed synthetic split: three differently seeded
runs from a tuning grid (three, so that a vote is a majority, not a tie), combined four
ways."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import synth_shards
from tests.reliability.helpers import kill_when, start
from tests.training.test_train import drpipe, history

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Path:
    """500 synthetic photos 60/20/20 (100 to score on: kappa on fewer moves by a photo's
    worth); a tuning over seed (1, 2, 3) at one lr and batch size."""
    d = tmp_path_factory.mktemp("tune")
    synth_shards(d, 500, 3, 128, "train=0.6,val=0.2,test=0.2", run=drpipe)
    drpipe("tune", "--data", d / "shards", "--lr", "1e-3", "--batch-size", "16",
           "--grid", "seed=1,2,3", "--model", "resnetv2-small", "--image-size", 96,
           "--epochs", 8, "--augment", "flip", "--out", d / "tune")
    return d


def _summary(tune: Path) -> list[dict]:
    return list(csv.DictReader(open(tune / "summary.csv", encoding="utf-8")))


def test_tune_trains_every_point_and_ranks_them(tuned):
    tune = tuned / "tune"
    rows = _summary(tune)
    assert sorted(r["seed"] for r in rows) == ["1", "2", "3"]
    assert sorted(r["point"] for r in rows) == ["seed=1", "seed=2", "seed=3"]  # what varies
    assert all(r["status"] == "done" for r in rows)
    kappas = [float(r["val_kappa"]) for r in rows]
    assert kappas == sorted(kappas, reverse=True)
    assert [r["rank"] for r in rows] == ["1", "2", "3"]
    for r in rows:  # each point is a complete drpipe train run with the point's flags
        run = Path(r["run"])
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["seed"] == int(r["seed"]) and cfg["lr"] == 1e-3 and cfg["epochs"] == 8
        assert cfg["model"] == "resnetv2-small" and cfg["image_size"] == 96
        assert float(r["val_kappa"]) == pytest.approx(
            json.loads((run / "metrics.json").read_text())["quadratic_kappa"], abs=1e-4)
    assert (tune / "tune.png").stat().st_size > 5000
    # the same command again: nothing retrained; a grid that differs is refused
    again = drpipe("tune", "--data", tuned / "shards", "--lr", "1e-3", "--batch-size", "16",
                   "--grid", "seed=1,2,3", "--model", "resnetv2-small", "--image-size", 96,
                   "--epochs", 8, "--augment", "flip", "--out", tune)
    assert "3 of 3 points already trained" in again.stdout + again.stderr
    other = drpipe("tune", "--data", tuned / "shards", "--lr", "1e-3", "--out", tune,
                   check=False)
    assert other.returncode == 1 and "other settings" in other.stderr


def test_tune_killed_mid_point_continues_where_it_stopped(tuned, tmp_path):
    """SIGKILL to the tuning (and the point training under it) mid-epoch; the same command
    again resumes that point from its last epoch and trains the rest."""
    out = tmp_path / "t"
    args = ["tune", "--data", str(tuned / "shards"), "--lr", "1e-3", "--batch-size", "8",
            "--grid", "seed=1,2", "--model", "cnn-small", "--image-size", "64", "--epochs", "4",
            "--steps-per-epoch", "15", "--checkpoint-every", "0", "--precise-bn", "5",
            "--out", str(out)]
    first = out / "seed=1"
    kill_when(start(*args),
              lambda: (first / "history.csv").exists() and len(history(first)) >= 2)
    done = len(history(first))
    assert 2 <= done < 4 and not (first / "model.keras").exists()
    r = drpipe(*args)
    assert "seed=1: validation kappa" in r.stdout + r.stderr
    epochs = [int(h["epoch"]) for h in history(first)]
    assert epochs[:done] == list(range(done)) and sorted(set(epochs)) == [0, 1, 2, 3]
    rows = _summary(out)
    assert sorted(r["point"] for r in rows) == ["seed=1", "seed=2"]
    assert all(r["status"] == "done" for r in rows)


def test_tune_rejects_bad_points_before_training(tuned, tmp_path):
    r = drpipe("tune", "--data", tuned / "shards", "--grid", "epochs=1,zero",
               "--out", tmp_path / "t", check=False)
    assert r.returncode == 2 and "point" in r.stderr and "epochs" in r.stderr
    assert not (tmp_path / "t").exists()
    r = drpipe("tune", "--data", tuned / "shards", "--out", tmp_path / "t", "--resume", "x",
               check=False)
    assert r.returncode == 2 and "--resume is set by drpipe tune" in r.stderr


@pytest.mark.parametrize("method", ["vote", "mean", "weighted", "stack"])
def test_ensemble_of_three_seeds_is_at_least_as_good_as_the_worst(tuned, method):
    runs = sorted(Path(r["run"]) for r in _summary(tuned / "tune"))
    out = tuned / f"ens-{method}"
    r = drpipe("ensemble", *runs, "--method", method, "--split", "test", "--checkpoint", "best",
               "--out", out)
    assert f"ensemble ({method})" in r.stdout
    rep = json.loads((out / "ensemble.json").read_text())
    members = [m["quadratic_kappa"] for m in rep["members"]]
    ens = rep["ensemble"]
    assert ens["n"] == 100 and sum(map(sum, ens["confusion_matrix"])) == 100
    # the members' test kappas are those drpipe evaluate gives each run
    for run, k in zip(runs, members, strict=True):
        drpipe("evaluate", run, "--split", "test", "--checkpoint", "best")
        assert k == pytest.approx(
            json.loads((run / "metrics-test.json").read_text())["quadratic_kappa"], abs=1e-6)
    assert min(members) > 0.2, members  # the members learned something
    assert ens["quadratic_kappa"] >= min(members) - 1e-9, (method, ens["quadratic_kappa"],
                                                           members)
    assert (out / "confusion_test.png").exists()


def test_ensemble_vote_ties_go_to_the_best_member():
    import numpy as np

    from training.ensemble import vote

    grades = np.array([[0, 1, 2, 3], [4, 1, 0, 3], [4, 2, 2, 0]])
    # member 2 is the best, then 0, then 1
    assert vote(grades, [2, 0, 1]).tolist() == [4, 1, 2, 3]
    assert vote(grades[:2], [1, 0]).tolist() == [4, 1, 0, 3]  # two members: best wins ties


def test_ensemble_errors(tuned, tmp_path):
    run = sorted(Path(r["run"]) for r in _summary(tuned / "tune"))[0]
    r = drpipe("ensemble", run, check=False)
    assert r.returncode == 1 and "at least two runs" in r.stderr
    r = drpipe("ensemble", run, tuned / "shards", check=False)
    assert r.returncode == 1 and "not a drpipe run" in r.stderr
    r = drpipe("ensemble", run, run.parent / "seed=2", "--split", "val", check=False)
    assert run.name == "seed=1"
    assert r.returncode == 1 and "would be scored on it" in r.stderr


@pytest.mark.parametrize("method", ["vote", "stack"])
def test_predict_with_an_ensemble_reproduces_its_test_score(tuned, method, tmp_path):
    """drpipe predict ENSEMBLE on the raw photos of the test split: each member with its
    own preprocessing, combined as fitted — the same kappa drpipe ensemble measured on the
    records."""
    from training.metrics import quadratic_kappa

    ens = tuned / f"ens-{method}"
    if not (ens / "ensemble.json").exists():
        runs = sorted(Path(r["run"]) for r in _summary(tuned / "tune"))
        drpipe("ensemble", *runs, "--method", method, "--split", "test", "--checkpoint",
               "best", "--out", ens)
    rep = json.loads((ens / "ensemble.json").read_text())
    manifest = list(csv.DictReader(open(tuned / "shards/data_manifest.csv", encoding="utf-8")))
    test = {r["image_id"]: int(r["label"]) for r in manifest if r["split"] == "test"}
    src = tmp_path / "test"
    src.mkdir()
    for r in manifest:
        if r["split"] == "test":
            (src / Path(r["path"]).name).symlink_to(tuned / "raw" / r["path"])
    drpipe("predict", ens, "--src", src, "--out", tmp_path / "p.csv")
    rows = list(csv.DictReader(open(tmp_path / "p.csv", encoding="utf-8")))
    assert len(rows) == len(test) == rep["ensemble"]["n"]
    assert all(r["status"] == "ok" for r in rows)
    y = [test[r["image_id"]] for r in rows]
    got = [int(r["grade"]) for r in rows]
    assert quadratic_kappa(y, got) == pytest.approx(rep["ensemble"]["quadratic_kappa"],
                                                    abs=1e-9)
    quality = {r["image_id"]: r["quality"] for r in manifest}
    for r in rows:
        assert sum(float(r[f"p_grade{g}"]) for g in range(5)) == pytest.approx(1, abs=1e-4)
        assert r["quality"] == quality[r["image_id"]] != ""  # the members share one tune's data


@pytest.mark.slow  # three trainings
def test_an_ensemble_of_min_quality_runs_is_scored_on_their_photos(tmp_path):
    """Members trained with --min-quality are scored (as evaluate scores them) on the photos
    reaching it; members trained at different bars are refused (their photos differ)."""
    shards = synth_shards(tmp_path, 60, 8, 64, "train=0.5,val=0.25,test=0.25", "--workers", 1,
                          run=drpipe)
    common = ("--data", shards, "--model", "cnn-small", "--image-size", 32, "--epochs", 1,
              "--batch-size", 8)
    for name, extra in (("all", ()), ("q1", ("--min-quality", 0.48)),
                        ("q2", ("--min-quality", 0.48, "--seed", 1))):
        drpipe("train", *common, *extra, "--out", tmp_path / name)
    r = drpipe("ensemble", tmp_path / "all", tmp_path / "q1", "--split", "test",
               "--out", tmp_path / "mixed", check=False)
    assert r.returncode == 1 and "different --min-quality" in r.stderr, r.stderr
    assert not (tmp_path / "mixed").exists()
    drpipe("ensemble", tmp_path / "q1", tmp_path / "q2", "--split", "test", "--out",
           tmp_path / "ens")
    rep = json.loads((tmp_path / "ens/ensemble.json").read_text())
    manifest = list(csv.DictReader(open(shards / "data_manifest.csv", encoding="utf-8")))
    test = [r for r in manifest if r["split"] == "test" and r["status"] == "ok"]
    reach = [r for r in test if np.float32(r["quality_score"]) >= np.float32(0.48)]
    assert 0 < len(reach) < len(test), "the bar should leave some test photos out"
    assert rep["ensemble"]["n"] == len(reach) and rep["min_quality"] == "0.48"


@pytest.mark.parametrize("code", [130, -2])
def test_a_point_interrupted_stops_the_tuning(tmp_path, monkeypatch, code):
    """Ctrl-C reaches the point's training process too: its exit 130 (or death by SIGINT)
    interrupts the tuning (drpipe tune exits 130) rather than being taken for a failed point
    and going on to the next; the point stays pending, so the same command resumes it."""
    import sys

    from training import tune

    kill = "import sys; sys.exit(130)" if code == 130 else (
        "import os, signal; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        "os.kill(os.getpid(), signal.SIGINT)")
    monkeypatch.setattr(tune, "_training", lambda: [sys.executable, "-c", kill])
    point = tune.Point({"lr": "0.1"}, tmp_path / "p", options={"lr": 0.1})
    with pytest.raises(KeyboardInterrupt):
        tune.run_point(point, tmp_path / "p.log")
    assert point.status == "pending"
    # a point that fails for another reason is a failed point, and the tuning goes on
    monkeypatch.setattr(tune, "_training",
                        lambda: [sys.executable, "-c", "print('drpipe: error: boom'); exit(1)"])
    tune.run_point(point, tmp_path / "p.log")
    assert point.status == "failed" and point.error == "error: boom"
