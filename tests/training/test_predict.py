"""drpipe predict, explain and export: raw photos in, grades out — the same numbers the model
gives the records, in Keras or exported."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest

from tests.helpers import synth_shards
from tests.training.test_train import drpipe

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("pred")
    synth_shards(d, 40, 4, 96, "train=0.5,val=0.5", "--filter", "graham+clahe",
                 "--workers", 1, run=drpipe)
    drpipe("train", "--data", d / "shards", "--model", "cnn-small", "--image-size", 64,
           "--epochs", 1, "--batch-size", 8, "--out", d / "run")
    return d


def _rows(path):
    return {r["image_id"]: r for r in csv.DictReader(open(path, encoding="utf-8"))}


def test_predict_matches_the_model_on_the_records(run):
    """No train/serve skew: from raw photos, predict reproduces the outputs the model gives
    the very records it was evaluated on."""
    import keras
    import tensorflow as tf

    import training.models  # noqa: F401
    from tfrecord_writer.schema import tf_feature_spec
    from training.data import make_dataset

    drpipe("predict", run / "run", "--src", run / "raw/train", "--out", run / "preds.csv")
    preds = _rows(run / "preds.csv")
    assert len(preds) == 40 and all(p["status"] == "ok" for p in preds.values())
    model = keras.saving.load_model(run / "run/model.keras")
    ids = [tf.io.parse_single_example(r, tf_feature_spec())["image/id"].numpy().decode()
           for r in tf.data.TFRecordDataset(sorted(str(p) for p in
                                                   (run / "shards").glob("val-*.tfrecord")))]
    ds = make_dataset(run / "shards", "val", image_size=64, batch_size=8)
    outputs = np.concatenate([np.asarray(model(x, training=False)) for x, _ in ds])
    assert len(ids) == len(outputs) == 20
    for image_id, out in zip(ids, outputs, strict=True):
        got = [float(preds[image_id][f"p_grade{g}"]) for g in range(5)]
        np.testing.assert_allclose(got, out, atol=1e-5)
        assert int(preds[image_id]["grade"]) == int(np.argmax(out))
        assert float(preds[image_id]["p_referable"]) == pytest.approx(out[2:].sum(), abs=1e-5)
    # each photo's quality, as preprocess recorded it in the manifest
    manifest = _rows(run / "shards/data_manifest.csv")
    for image_id, p in preds.items():
        assert float(p["quality_score"]) == pytest.approx(
            float(manifest[image_id]["quality_score"]), abs=1e-4)
        assert p["quality"] == manifest[image_id]["quality"] != ""


def test_predict_on_the_real_sample_and_bad_files(run, sample_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "404_left.jpeg").write_text("<html>Not Found</html>")
    r = drpipe("predict", run / "run", "--src", sample_dir / "train", "--src", bad,
               "--out", tmp_path / "p.csv")
    assert "31 of 32 photos graded" in r.stdout
    rows = _rows(tmp_path / "p.csv")
    assert len(rows) == 32
    assert rows["404_left"]["status"] == "rejected"
    assert rows["404_left"]["reason"].startswith("not_an_image")
    real = [v for k, v in rows.items() if k != "404_left"]
    assert all(v["status"] == "ok" and 0 <= int(v["grade"]) <= 4 for v in real)
    for v in real:
        assert sum(float(v[f"p_grade{g}"]) for g in range(5)) == pytest.approx(1, abs=1e-4)


def test_predict_errors(run, tmp_path):
    r = drpipe("predict", tmp_path, "--src", run / "raw/train", check=False)
    assert r.returncode == 1 and "not a drpipe run" in r.stderr


def test_explain_writes_heat_maps(run, tmp_path):
    import cv2

    from training.explain import overlay

    photos = sorted((run / "raw/train").glob("*.jpeg"))[:2]
    r = drpipe("explain", run / "run", *photos, "--out", tmp_path / "maps")
    assert r.stdout.count(": grade ") == 2
    for p in photos:
        panel = cv2.imread(str(tmp_path / "maps" / f"{p.stem}_gradcam.png"))
        assert panel.shape == (64, 128, 3)  # the photo | the heat map, at --image-size
        rgb = cv2.cvtColor(panel, cv2.COLOR_BGR2RGB)
        photo, heat = rgb[:, :64], rgb[:, 64:]
        assert photo.std() > 10  # the processed photo, not a blank
        # the right half is the photo under a heat map that is not all zero: it differs
        # from the photo under an empty map (below the label text), by more than rounding
        empty = overlay(photo, np.zeros((64, 64), np.float32))
        diff = np.abs(heat[20:].astype(int) - empty[20:].astype(int))
        assert diff.mean() > 3 and (diff > 30).mean() > 0.05, (diff.mean(), (diff > 30).mean())
    drpipe("explain", run / "run", photos[0], "--out", tmp_path / "one.png", "--class", 4)
    assert cv2.imread(str(tmp_path / "one.png")).shape == (64, 128, 3)


def test_grad_cam_depends_on_the_class_and_works_through_backbones():
    import keras

    from training.explain import grad_cam
    from training.models import ModelSpec, build

    img = np.random.default_rng(0).uniform(0, 255, (96, 96, 3)).astype("float32")
    for name in ("cnn-small", "mobilenetv2"):
        keras.utils.set_random_seed(1)
        model, _ = build(ModelSpec(model=name, image_size=96))
        maps = [grad_cam(model, img, k)[0] for k in range(5)]
        assert all(m.shape == (96, 96) and 0 <= m.min() and m.max() <= 1 for m in maps)
        assert any(not np.allclose(maps[0], m, atol=1e-3) for m in maps[1:]), name


def test_export_grades_like_the_keras_model_on_the_sample(run, sample_dir, tmp_path):
    """SavedModel and TFLite exports, run with predict's preprocessing over the 31 real
    photos, give the Keras model's grades (and outputs, to float precision); the quantised
    TFLite model is 2-4x smaller and agrees wherever the decision is not a near-tie."""
    import json

    drpipe("predict", run / "run", "--src", sample_dir / "train", "--out", tmp_path / "k.csv")
    keras_rows = _rows(tmp_path / "k.csv")
    assert len(keras_rows) == 31
    sizes = {}
    for args, name in ((["--format", "savedmodel"], "savedmodel"),
                       (["--format", "tflite"], "tflite.tflite"),
                       (["--format", "tflite", "--quantize"], "tflite-dynamic.tflite")):
        r = drpipe("export", run / "run", *args)
        assert "CPU latency per photo" in r.stdout and "same grade as the Keras model" in r.stdout
        path = run / "run/export" / name
        meta = json.loads((run / "run/export" / (name.removesuffix(".tflite")
                                                 + ".export.json")).read_text())
        assert meta["bytes"] > 0 and meta["latency_ms_median"] > 0
        assert meta["checked_photos"] == 20 and meta["preprocessing"]["size"] == 96
        sizes[name] = meta["bytes"]
        drpipe("predict", run / "run", "--src", sample_dir / "train", "--exported", path,
               "--out", tmp_path / "e.csv")
        rows = _rows(tmp_path / "e.csv")
        assert rows.keys() == keras_rows.keys()
        for k, want in keras_rows.items():
            p_want = np.array([float(want[f"p_grade{g}"]) for g in range(5)])
            p_got = np.array([float(rows[k][f"p_grade{g}"]) for g in range(5)])
            if "dynamic" not in name:
                assert rows[k]["grade"] == want["grade"], (name, k)
                np.testing.assert_allclose(p_got, p_want, atol=2e-5)
            else:
                np.testing.assert_allclose(p_got, p_want, atol=0.02)
                top2 = np.sort(p_want)[-2:]
                if top2[1] - top2[0] > 0.02:
                    assert rows[k]["grade"] == want["grade"], (name, k)
    # float32 weights in the float TFLite model; int8 weights in the dynamic one
    assert 2 < sizes["tflite.tflite"] / sizes["tflite-dynamic.tflite"] < 4.5


@pytest.mark.slow
def test_export_float16_and_int8(run, tmp_path):
    """float16 halves the float model and keeps its outputs to half precision; int8
    (weights and activations, calibrated on training photos) quarters it; both grade the
    validation photos as the Keras model does, but for near-ties."""
    import json

    sizes, meta = {}, {}
    for quant in (None, "float16", "int8"):
        out = tmp_path / f"{quant or 'float'}.tflite"
        args = ["--quantize", quant] if quant else []
        r = drpipe("export", run / "run", "--format", "tflite", *args, "--out", out)
        assert out.stat().st_size > 0 and (quant or "same grade") in r.stdout
        meta[quant] = json.loads((tmp_path / f"{quant or 'float'}.export.json").read_text())
        assert meta[quant]["quantize"] == quant and meta[quant]["checked_photos"] == 20
        sizes[quant] = out.stat().st_size
    assert 1.6 < sizes[None] / sizes["float16"] < 2.2
    assert 2.5 < sizes[None] / sizes["int8"] < 4.5
    assert meta["float16"]["max_abs_diff"] < 5e-3 and meta["float16"]["same_grade"] >= 19
    assert meta["int8"]["max_abs_diff"] < 0.15 and meta["int8"]["same_grade"] >= 16
    assert meta["int8"]["max_abs_diff"] > meta["float16"]["max_abs_diff"]


def test_export_errors(run):
    r = drpipe("export", run / "run", "--format", "savedmodel", "--quantize", check=False)
    assert r.returncode == 1 and "--quantize applies to --format tflite" in r.stderr
    r = drpipe("export", run / "raw", check=False)
    assert r.returncode == 1 and "not a drpipe run" in r.stderr
