"""A drpipe output opens with TensorFlow Datasets as it is, reads without TensorFlow, and
outputs of the previous format (drpipe's info in dataset_info.json) still load in drpipe."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import preprocess
from tfrecord_writer import info as output_info
from tfrecord_writer.example import parse_example, read_records
from tfrecord_writer.info import load_info
from tfrecord_writer.reader import iter_shard, iter_split, split_shards

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tfds = pytest.importorskip("tensorflow_datasets")
tf = pytest.importorskip("tensorflow")

SPLIT = "train=0.6,val=0.2,test=0.2"


def _make(synth_dir, out: Path, fmt: str) -> Path:
    # 64 px and 20 kB shards: several shards per split from 40 photos, in seconds.
    preprocess("--src", synth_dir, "--out", out, "--size", 64, "--format", fmt,
               "--shard-size", 0.02, "--split", SPLIT, "--workers", 1)
    return out


@pytest.fixture(scope="module")
def jpeg_out(synth_dir, tmp_path_factory) -> Path:
    return _make(synth_dir, tmp_path_factory.mktemp("tfds") / "jpeg", "jpeg")


@pytest.fixture(scope="module")
def png_out(synth_dir, tmp_path_factory) -> Path:
    return _make(synth_dir, tmp_path_factory.mktemp("tfds") / "png", "png")


def manifest_ok(out: Path) -> dict[str, dict]:
    return {r["image_id"]: r for r in csv.DictReader(open(out / "data_manifest.csv"))
            if r["status"] == "ok"}


def direct(out: Path, split: str) -> list[dict]:
    """The records of a split read straight from its shard files, in shard-index order
    (no drpipe info file involved)."""
    return [parse_example(rec) for path in sorted(out.glob(f"{split}-*-of-*.tfrecord"))
            for rec in read_records(path)]


def ids_of(ds) -> list[str]:
    return [e["image/id"].decode() for e in tfds.as_numpy(ds)]


def test_builder_from_directory_matches_the_manifest(jpeg_out):
    rows = manifest_ok(jpeg_out)
    builder = tfds.builder_from_directory(jpeg_out)
    info = builder.info
    assert (info.name, str(info.version), info.file_format.value) == ("drpipe", "1.0.0",
                                                                     "tfrecord")
    for split in ("train", "val", "test"):
        members = [r for r in rows.values() if r["split"] == split]
        assert info.splits[split].num_examples == len(members) > 0
        names = [f"{split}-{i:05d}-of-{info.splits[split].num_shards:05d}.tfrecord"
                 for i in range(info.splits[split].num_shards)]
        # exact shard lengths: what TFDS slices with
        assert info.splits[split].shard_lengths == [
            sum(1 for r in members if r["shard"] == n) for n in names]
        assert [Path(f).name for f in info.splits[split].filenames] == names
    assert info.splits["train"].num_shards >= 3
    feats = info.features
    assert feats["image/encoded"].shape == (64, 64, 3)
    assert feats["image/encoded"].encoding_format == "jpeg"
    assert feats["image/class/label"].names == list(output_info.GRADE_NAMES)
    assert set(feats.keys()) == set(direct(jpeg_out, "val")[0])
    assert info.supervised_keys == ("image/encoded", "image/class/label")
    assert info.metadata["config_hash"] == load_info(jpeg_out)["config_hash"]


@pytest.mark.parametrize("spec", ["train[:10%]", "train[10%:30%]", "train+val", "test",
                                  "val[-2:]"])
def test_slices_give_the_stored_records_in_order(jpeg_out, spec):
    builder = tfds.builder_from_directory(jpeg_out)
    expected = []
    for part in spec.split("+"):
        split, _, sl = part.partition("[")
        ids = [r["image/id"].decode() for r in direct(jpeg_out, split)]
        if sl:
            a, b = sl.rstrip("]").split(":")
            n = len(ids)

            def bound(s, default, n=n):  # TFDS rounds percents to the closest record
                if not s:
                    return default
                return round(float(s[:-1]) * n / 100) if s.endswith("%") else int(s)
            ids = ids[bound(a, 0):bound(b, n)]
        expected += ids
    got = ids_of(builder.as_dataset(split=spec))
    assert got == expected and got
    assert builder.info.splits[spec].num_examples == len(expected)


def test_pixels_labels_and_ids_equal_the_stored_records(jpeg_out):
    rows = manifest_ok(jpeg_out)
    builder = tfds.builder_from_directory(jpeg_out)
    stored = direct(jpeg_out, "train")
    got = list(tfds.as_numpy(builder.as_dataset(split="train")))
    assert len(got) == len(stored)
    for e, s in zip(got, stored, strict=True):
        row = rows[s["image/id"].decode()]
        np.testing.assert_array_equal(
            e["image/encoded"], tf.io.decode_image(s["image/encoded"], channels=3).numpy())
        assert e["image/encoded"].dtype == np.uint8 and e["image/encoded"].shape == (64, 64, 3)
        assert e["image/id"].decode() == row["image_id"]
        assert int(e["image/class/label"]) == int(row["label"])
        assert int(e["image/class/referable"]) == int(int(row["label"]) >= 2)
        assert e["image/patient_id"].decode() == row["patient_id"]
        assert e["image/eye"].decode() == row["eye"]
        assert e["image/source_sha256"].decode() == row["sha256"]
        assert e["image/format"] == b"jpeg"


def test_as_supervised_gives_image_and_grade(jpeg_out):
    builder = tfds.builder_from_directory(jpeg_out)
    rows = manifest_ok(jpeg_out)
    stored = direct(jpeg_out, "val")
    pairs = list(tfds.as_numpy(builder.as_dataset(split="val", as_supervised=True)))
    assert len(pairs) == len(stored)
    for (image, grade), s in zip(pairs, stored, strict=True):
        assert image.shape == (64, 64, 3)
        assert int(grade) == int(rows[s["image/id"].decode()]["label"])
    # batched, the usual Keras input
    x, y = next(iter(builder.as_dataset(split="train", as_supervised=True, batch_size=4)))
    assert tuple(x.shape) == (4, 64, 64, 3) and tuple(y.shape) == (4,)


def test_shuffled_reading_needs_the_ordering_guard_off(jpeg_out):
    builder = tfds.builder_from_directory(jpeg_out)
    with pytest.raises(ValueError, match="ordered dataset"):
        builder.as_dataset(split="train", shuffle_files=True)
    ids = ids_of(builder.as_dataset(
        split="train", shuffle_files=True,
        read_config=tfds.ReadConfig(enable_ordering_guard=False, shuffle_seed=1)))
    assert sorted(ids) == sorted(r["image/id"].decode() for r in direct(jpeg_out, "train"))


def test_png_output_opens_and_decodes_losslessly(png_out):
    builder = tfds.builder_from_directory(png_out)
    assert builder.info.features["image/encoded"].encoding_format == "png"
    stored = direct(png_out, "test")
    got = list(tfds.as_numpy(builder.as_dataset(split="test")))
    assert len(got) == len(stored) == builder.info.splits["test"].num_examples > 0
    for e, s in zip(got, stored, strict=True):
        assert s["image/encoded"][:8] == b"\x89PNG\r\n\x1a\n"
        import io

        png = np.asarray(Image.open(io.BytesIO(s["image/encoded"])).convert("RGB"))
        np.testing.assert_array_equal(e["image/encoded"], png)
        assert e["image/id"] == s["image/id"]


@pytest.mark.parametrize("fmt", ["jpeg", "png"])
def test_reader_gives_the_tfds_records(fmt, jpeg_out, png_out):
    out = {"jpeg": jpeg_out, "png": png_out}[fmt]
    builder = tfds.builder_from_directory(out)
    for split in ("train", "val"):
        mine = list(iter_split(out, split, decode_image=True))
        theirs = list(tfds.as_numpy(builder.as_dataset(split=split)))
        assert len(mine) == len(theirs) == builder.info.splits[split].num_examples
        for m, t in zip(mine, theirs, strict=True):
            # same pixels as TensorFlow's decoder (JPEG: the same fast integer IDCT)
            np.testing.assert_array_equal(m["image"], t["image/encoded"])
            assert m["image/id"] == t["image/id"]
            assert isinstance(m["image/class/label"], np.int64)
            assert m["image/class/label"] == t["image/class/label"]
            assert isinstance(m["image/encoded"], bytes)
    first = split_shards(out, "train")[0]
    assert [e["image/id"] for e in iter_shard(first)] == [
        parse_example(r)["image/id"] for r in read_records(first)]
    with pytest.raises(ValueError, match="no split 'nope'"):
        split_shards(out, "nope")


def test_reader_and_metadata_never_import_tensorflow(jpeg_out, tmp_path):
    code = ("import sys, json\n"
            "from tfrecord_writer.reader import iter_split\n"
            "from tfrecord_writer.info import load_info, tfds_dataset_info, write_info\n"
            f"out = {str(jpeg_out)!r}\n"
            "info = load_info(out)\n"
            f"write_info({str(tmp_path)!r}, info)\n"
            "n = sum(1 for e in iter_split(out, 'train', decode_image=True))\n"
            "print(json.dumps([n, 'tensorflow' in sys.modules]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
    assert r.returncode == 0, r.stderr
    n, loaded = json.loads(r.stdout)
    assert n == sum(1 for row in manifest_ok(jpeg_out).values() if row["split"] == "train")
    assert loaded is False
    assert load_info(jpeg_out)["summary"]["workers_imported_tensorflow"] is False
    # the metadata written from drpipe's info alone is the one preprocess wrote
    for name in (output_info.INFO_FILE, output_info.FEATURES_FILE, output_info.LABELS_FILE):
        assert (tmp_path / name).read_bytes() == (jpeg_out / name).read_bytes()


def test_dataset_info_is_written_last(jpeg_out):
    marker = (jpeg_out / output_info.INFO_FILE).stat().st_mtime_ns
    for name in (*output_info.FILES, "data_manifest.csv", "manifest.parquet"):
        assert (jpeg_out / name).stat().st_mtime_ns <= marker
    for p in jpeg_out.glob("*.tfrecord"):
        assert p.stat().st_mtime_ns <= marker


def test_features_follow_the_schema(monkeypatch):
    from tfrecord_writer import schema

    extra = dict(schema.FEATURES, **{"image/quality/score": schema.Feature("float", "s"),
                                     "image/quality/ok": schema.Feature("int64", "ok"),
                                     "image/quality/note": schema.Feature("bytes", "note")})
    monkeypatch.setattr(output_info, "FEATURES", extra)
    feats = output_info.tfds_features("png", 96)["content"]["features"]
    assert set(feats) == set(extra)
    assert feats["image/quality/score"]["tensor"]["dtype"] == "float32"
    assert feats["image/quality/ok"]["tensor"]["dtype"] == "int64"
    assert feats["image/quality/note"]["pythonClassName"].endswith("text_feature.Text")
    assert feats["image/encoded"]["image"]["shape"]["dimensions"] == ["96", "96", "3"]
    with pytest.raises(ValueError, match="not jpeg or png"):
        output_info.tfds_features("webp", 96)
    # and TFDS itself reads the JSON back
    restored = tfds.features.FeatureConnector.from_json(output_info.tfds_features("png", 96))
    assert restored["image/encoded"].shape == (96, 96, 3)
    assert restored["image/quality/score"].dtype == tf.float32


def _previous_format(out: Path, dest: Path) -> Path:
    """``out`` as drpipe 0.1.0 wrote it: drpipe's info as dataset_info.json, no TFDS files."""
    shutil.copytree(out, dest)
    info = json.loads((dest / output_info.DRPIPE_INFO_FILE).read_text())
    for name in output_info.FILES:
        (dest / name).unlink()
    (dest / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return dest


def test_previous_format_still_loads(jpeg_out, synth_dir, tmp_path):
    old = _previous_format(jpeg_out, tmp_path / "old")
    info = load_info(old)
    assert info == load_info(jpeg_out) and "drpipe_version" in info
    from reporting.report import build
    from training.data import split_counts, stored_image
    from training.fit import TrainConfig, TrainError, train
    from training.predict import process_config_of

    assert split_counts(old, "val") == info["counts"]["val"] and sum(info["counts"]["val"])
    assert stored_image(old) == (64, "jpeg")
    assert process_config_of(old).size == 64
    with pytest.raises(TrainError, match="has no split 'nope'"):  # read the old info
        train(TrainConfig(data=str(old), train_split="nope", out=str(tmp_path / "run")))
    assert list(iter_split(old, "test")) and split_shards(old, "test")
    page = build(old, per_grade=1)
    assert "drpipe" in page and str(sum(info["counts"]["train"])) in page
    # re-running preprocess recognises the old output as finished and leaves it alone
    before = (old / "dataset_info.json").read_bytes()
    preprocess("--src", synth_dir, "--out", old, "--size", 64, "--format", "jpeg",
               "--shard-size", 0.02, "--split", SPLIT, "--workers", 1,
               "--summary-json", tmp_path / "summary.json")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["already_complete"] is True and summary["ok"] == info["summary"]["ok"]
    assert (old / "dataset_info.json").read_bytes() == before
    with pytest.raises(FileNotFoundError, match="no drpipe shards here"):
        load_info(tmp_path)


@pytest.mark.slow
def test_previous_format_trains_predicts_and_reports(jpeg_out, synth_dir, tmp_path):
    """The commands themselves on an old output: train, predict (its preprocessing comes
    from the info), report (~1 min on two cores)."""
    from tests.training.test_train import drpipe

    old = _previous_format(jpeg_out, tmp_path / "old")
    run = tmp_path / "run"
    drpipe("train", "--data", old, "--model", "cnn-small", "--image-size", 32, "--epochs", 1,
           "--batch-size", 8, "--precise-bn", 0, "--out", run)
    photos = sorted((synth_dir / "train").glob("*.jpeg"))[:3]
    drpipe("predict", run, *[a for p in photos for a in ("--src", p)], "--out",
           tmp_path / "preds.csv")
    preds = list(csv.DictReader(open(tmp_path / "preds.csv")))
    assert [r["status"] for r in preds] == ["ok"] * 3
    drpipe("report", "--data", old, "--run", run, "--examples", 1, "--out", tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert str(load_info(old)["config_hash"]) in page


def test_a_split_without_records_is_left_out_of_the_tfds_info(jpeg_out, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(jpeg_out, out)
    info = load_info(out)
    info["splits"]["holdout"] = {"shards": [], "records": 0}
    output_info.write_info(out, info)
    builder = tfds.builder_from_directory(out)
    assert set(builder.info.splits) == {"train", "val", "test"}
    assert ids_of(builder.as_dataset(split="val")) == [
        r["image/id"].decode() for r in direct(out, "val")]
    assert load_info(out)["splits"]["holdout"]["records"] == 0
