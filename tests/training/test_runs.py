"""A run is tied to the data it learnt from; --resume resumes the run it is given, refuses
options that conflict with it, and finishes a run killed before model.keras (issue 10 B).
One tiny run (cnn-small, 32 px, 1 epoch) on tiny synthetic shards, copied where a test
changes it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import synth_shards
from tests.training.test_train import drpipe

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

TINY = ("--model", "cnn-small", "--image-size", 32, "--epochs", 1, "--batch-size", 8,
        "--precise-bn", 2, "--checkpoint-every", 0)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("runs")
    synth_shards(d, 40, 5, 64, "train=0.5,val=0.25,test=0.25", "--workers", 1, run=drpipe)
    drpipe("train", "--data", d / "shards", *TINY, "--out", d / "run")
    return d


def _copy(base: Path, tmp_path: Path, data: bool = False,
          moved: bool = True) -> tuple[Path, Path]:
    """A copy of the run (and of its shards, the copy's config.json pointing at them).
    ``moved=False``: its config.json names the copy as its ``out``, as a run made there."""
    run = tmp_path / "run"
    shutil.copytree(base / "run", run)
    if not moved:
        cfg = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps(dict(cfg, out=str(run))))
    shards = base / "shards"
    if data:
        shards = tmp_path / "shards"
        shutil.copytree(base / "shards", shards)
        cfg = json.loads((run / "config.json").read_text())
        cfg["data"] = str(shards)
        cfg["data_identity"]["path"] = str(shards)
        (run / "config.json").write_text(json.dumps(cfg))
    return run, shards


def test_config_records_the_shards_identity(base):
    from tfrecord_writer.info import load_info

    cfg = json.loads((base / "run/config.json").read_text())
    rec = cfg["data_identity"]
    # the run trained on the output's latest version (pipeline.versions): its folder
    assert rec["path"] == str((base / "shards/versions/v0001").resolve())
    info = load_info(rec["path"])
    assert rec["config_hash"] == info["config_hash"] and rec["input_hash"] == info["input_hash"]
    assert rec["process"] == info["config"]["process"] and rec["process"]["size"] == 64
    assert load_info(base / "shards")["config_hash"] == rec["config_hash"]


@pytest.mark.slow
def test_remade_shards_are_refused_and_predict_keeps_its_preprocessing(base, tmp_path):
    run, shards = _copy(base, tmp_path, data=True)
    photos = base / "raw" / "train"
    drpipe("predict", run, "--src", photos, "--out", tmp_path / "before.csv")
    # the same folder re-made with other settings: the run must not silently follow it
    drpipe("preprocess", "--src", base / "raw", "--out", shards, "--size", 48, "--overwrite",
           "--split", "train=0.5,val=0.25,test=0.25", "--workers", 1, "--quiet")
    for cmd in (["evaluate", run, "--split", "test"], ["export", run]):
        r = drpipe(*cmd, check=False)
        assert r.returncode == 1, (cmd, r.stderr)
        assert "preprocessed with other settings" in r.stderr and "size 48" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1, r.stderr  # one line
    drpipe("predict", run, "--src", photos, "--out", tmp_path / "after.csv")
    before = (tmp_path / "before.csv").read_text()
    assert before == (tmp_path / "after.csv").read_text()  # the recorded preprocessing
    unfinished = tmp_path / "unfinished"  # a run killed mid-way does not resume on them
    shutil.copytree(run, unfinished)
    (unfinished / "model.keras").unlink()
    r = drpipe("train", "--resume", unfinished, check=False)
    assert r.returncode == 1 and "preprocessed with other settings" in r.stderr, r.stderr
    # same settings, other photos (one fewer): refused too, and says why
    drpipe("preprocess", "--src", base / "raw", "--out", shards, "--size", 64, "--overwrite",
           "--split", "train=0.5,val=0.25,test=0.25", "--workers", 1, "--quiet", "--limit", 39)
    r = drpipe("evaluate", run, "--split", "test", check=False)
    assert r.returncode == 1 and "is not the data" in r.stderr, r.stderr
    # other shards given with --data, preprocessed as the run's: accepted
    r = drpipe("evaluate", run, "--data", base / "shards", "--split", "val")
    assert "val: n=" in r.stdout


def test_evaluate_split_is_a_name_not_a_pattern(base):
    for split in ("*", "t*", "nosuch"):
        r = drpipe("evaluate", base / "run", "--split", split, check=False)
        assert r.returncode == 1 and f"has no split {split!r}" in r.stderr, r.stderr
    assert not list((base / "run").glob("metrics-*[*]*"))


def test_resume_resumes_the_directory_it_is_given(base, tmp_path):
    """A copy of a run killed before its final model: --resume COPY finishes COPY, never
    the directory named in its config.json."""
    run, _ = _copy(base, tmp_path)
    original = {p: p.stat().st_mtime_ns for p in (base / "run").rglob("*") if p.is_file()}
    (run / "model.keras").unlink()
    (run / "metrics.json").unlink()
    drpipe("train", "--resume", run)
    assert (run / "model.keras").exists() and (run / "metrics.json").exists()
    assert {p: p.stat().st_mtime_ns for p in (base / "run").rglob("*")
            if p.is_file()} == original  # the original run is untouched


def test_resume_refuses_options_that_conflict_with_the_run(base):
    run = base / "run"
    for opt in (["--epochs", 5], ["--lr", 0.5], ["--model", "resnetv2-small"],
                ["--data", base / "raw"], ["--batch-size", 4], ["--out", base / "elsewhere"]):
        r = drpipe("train", "--resume", run, *opt, check=False)
        assert r.returncode == 2, (opt, r.stderr)
        assert "conflicts with the run's" in r.stderr and opt[0] in r.stderr, r.stderr
    # the run's own values are no conflict (it is finished, so that is what is reported)
    r = drpipe("train", "--resume", run, "--epochs", 1, "--data", base / "shards", check=False)
    assert r.returncode == 1 and "already finished" in r.stderr, r.stderr


def test_a_kill_after_the_last_phase_and_before_model_keras_can_finish(base, tmp_path):
    """The state on disk of a kill between phase1.weights.h5 and model.keras: --resume
    writes the final model from those weights (it died with UnboundLocalError)."""
    import keras
    import numpy as np

    import training.models  # noqa: F401

    run, _ = _copy(base, tmp_path, moved=False)
    model = keras.saving.load_model(run / "model.keras")
    model.save_weights(run / "phase1.weights.h5")
    want = json.loads((run / "metrics.json").read_text())
    for f in ("model.keras", "metrics.json"):
        (run / f).unlink()
    r = drpipe("train", "--resume", run)
    assert "phase 1 had finished" in r.stdout
    got = json.loads((run / "metrics.json").read_text())
    assert got["confusion_matrix"] == want["confusion_matrix"]
    assert got["quadratic_kappa"] == pytest.approx(want["quadratic_kappa"], abs=1e-9)
    final = keras.saving.load_model(run / "model.keras")
    for a, b in zip(model.weights, final.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not (run / "phase1.weights.h5").exists()


@pytest.mark.slow
def test_ensemble_refuses_members_trained_on_other_photos(base, tmp_path):
    other = tmp_path / "shards"
    drpipe("preprocess", "--src", base / "raw", "--out", other, "--size", 64, "--seed", 9,
           "--split", "train=0.5,val=0.25,test=0.25", "--workers", 1, "--quiet")
    drpipe("train", "--data", other, *TINY, "--out", tmp_path / "run2")
    r = drpipe("ensemble", base / "run", tmp_path / "run2", "--out", tmp_path / "e",
               check=False)
    assert r.returncode == 1 and "other photos or splits" in r.stderr, r.stderr
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_ensemble_scores_each_member_on_its_own_shards(base, tmp_path):
    """Two preprocessings of the same photos and split (tune --grid data=...): each member
    is scored on its own shards, with the metrics drpipe evaluate gives it."""
    other = tmp_path / "shards-none"
    drpipe("preprocess", "--src", base / "raw", "--out", other, "--size", 64, "--filter",
           "none", "--split", "train=0.5,val=0.25,test=0.25", "--workers", 1, "--quiet")
    drpipe("train", "--data", other, *TINY, "--out", tmp_path / "run2")
    mine = tmp_path / "run1"
    shutil.copytree(base / "run", mine)
    drpipe("ensemble", mine, tmp_path / "run2", "--method", "mean", "--split", "test",
           "--out", tmp_path / "e")
    rep = json.loads((tmp_path / "e/ensemble.json").read_text())
    for run, m in zip((mine, tmp_path / "run2"), rep["members"], strict=True):
        drpipe("evaluate", run, "--split", "test")
        ev = json.loads((run / "metrics-test.json").read_text())
        assert m["confusion_matrix"] == ev["confusion_matrix"], run


def test_tune_points_never_share_a_directory(tmp_path):
    from training.tune import plan

    points = plan({"data": ["a/b", "a_b", "a b"], "lr": ["1e-3"]}, tmp_path)
    assert len({p.dir for p in points}) == 3
    assert (tmp_path / "data=a_b") in {p.dir for p in points}  # a clean value keeps its name


def test_resume_restores_the_optimizer_state(tmp_path):
    """The resume state holds the optimizer's variables (Adam's step count and moments), and
    a resumed fit starts from them, not from a fresh optimizer."""
    import keras
    import numpy as np
    import tensorflow as tf

    from training.fit import TrainConfig, _atomic_backup, _compile, _spec
    from training.models import build

    cfg = TrainConfig(model="cnn-small", image_size=32, lr=1e-3)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, np.arange(16) % 5)).batch(8)
    keras.utils.set_random_seed(0)
    first, _ = build(_spec(cfg))
    _compile(first, cfg, cfg.lr)
    first.fit(ds, epochs=1, callbacks=[_atomic_backup(tmp_path)], verbose=0)
    want = [np.array(v) for v in first.optimizer.variables]

    class Resumed(Exception):
        pass

    class Grab(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):  # after the backup callback restored the state
            self.got = [np.array(v) for v in self.model.optimizer.variables]
            raise Resumed

    second, _ = build(_spec(cfg))
    _compile(second, cfg, cfg.lr)
    grab = Grab()
    with pytest.raises(Resumed):
        second.fit(ds, epochs=2, callbacks=[_atomic_backup(tmp_path), grab], verbose=0)
    assert int(first.optimizer.iterations) == 2
    assert len(grab.got) == len(want) > 2
    moments = [w for w in want if w.ndim > 0 and np.abs(w).sum() > 0]
    assert moments  # Adam's moments are not zero after a step
    for a, b in zip(want, grab.got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_optimizer_sgd_patience_and_l1_l2_reach_the_model(base, tmp_path):
    """--optimizer sgd (momentum 0.9, Nesterov), --patience (stop after N epochs without a
    better validation kappa) and --l1/--l2 (on the head's Dense kernels) do what they say."""
    import keras
    import numpy as np

    import training.models  # noqa: F401
    from tests.training.test_train import history

    run = tmp_path / "run"
    drpipe("train", "--data", base / "shards", "--model", "cnn-small", "--image-size", 32,
           "--epochs", 6, "--batch-size", 8, "--precise-bn", 0, "--checkpoint-every", 0,
           "--optimizer", "sgd", "--lr", 0, "--patience", 1, "--head", 8, "--l1", 1e-3,
           "--l2", 1e-2, "--out", run)
    kappas = [float(h["val_kappa"]) for h in history(run)]
    assert 2 <= len(kappas) < 6, kappas  # stopped early: lr 0 never improves for long
    assert max(kappas[-1:]) <= max(kappas[:-1])  # the stop was after a non-improving epoch
    model = keras.saving.load_model(run / "model.keras")
    opt = model.optimizer
    assert isinstance(opt, keras.optimizers.SGD) and opt.nesterov
    assert float(opt.momentum) == pytest.approx(0.9)
    dense = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.Dense)
             and layer.kernel_regularizer is not None]
    assert len(dense) == 1 and dense[0].units == 8  # the head, not the output layer
    w = np.asarray(dense[0].kernel)
    want = 1e-3 * np.abs(w).sum() + 1e-2 * (w ** 2).sum()
    got = sum(float(loss) for loss in model.losses)
    assert want > 0 and got == pytest.approx(want, rel=1e-4)


def test_png_shards_hold_the_processed_pixels_exactly(base, tmp_path):
    """--format png: the records hold exactly the processed photo (lossless), and the
    training reader decodes it to those pixels."""
    import numpy as np
    import tensorflow as tf

    from pipeline.process import prepare_or_reject, read_photo
    from tfrecord_writer.schema import tf_feature_spec
    from training.predict import process_config_of

    out = tmp_path / "png"
    drpipe("preprocess", "--src", base / "raw", "--out", out, "--size", 64, "--format", "png",
           "--split", "train=0.5,val=0.25,test=0.25", "--workers", 1, "--quiet")
    cfg = process_config_of(out)
    assert cfg.format == "png"
    n = 0
    for rec in tf.data.TFRecordDataset(sorted(str(p) for p in out.glob("*.tfrecord"))):
        ex = tf.io.parse_single_example(rec, tf_feature_spec())
        encoded = ex["image/encoded"].numpy()
        assert encoded[:8] == b"\x89PNG\r\n\x1a\n"
        image_id = ex["image/id"].numpy().decode()
        want = prepare_or_reject(read_photo(base / "raw/train" / f"{image_id}.jpeg"), cfg).image
        np.testing.assert_array_equal(tf.io.decode_png(encoded).numpy(), want)
        n += 1
    assert n == 40
