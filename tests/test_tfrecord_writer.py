"""The lean writer: Example bytes as TensorFlow writes them, CRCs, atomic commits, sharding."""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import pytest

from tfrecord_writer.example import (
    frame_record,
    parse_example,
    read_records,
    serialize_example,
)
from tfrecord_writer.schema import FEATURES, Record
from tfrecord_writer.writer import ShardWriter, plan_shards, remove_temporaries, shard_name

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _record(i=0, label=3) -> Record:
    return Record(bytes(range(256)) * (i + 1), "jpeg", 512, 512, label, f"{i}_left", str(i),
                  "left", "ab" * 32)


@pytest.fixture(scope="module")
def tf():
    import tensorflow

    return tensorflow


def _tf_example(tf, r: Record):
    """The record as TensorFlow's own tf.train.Example."""
    ex = tf.train.Example()
    for k, v in r.features().items():
        f = ex.features.feature[k]
        if FEATURES[k][0] == "int64":
            f.int64_list.value.append(v)
        elif FEATURES[k][0] == "float":
            f.float_list.value.append(v)
        else:
            f.bytes_list.value.append(v if isinstance(v, bytes) else v.encode())
    return ex


def test_example_bytes_equal_tensorflows(tf):
    for label in (0, 2, 4):
        r = _record(label=label)
        ex = _tf_example(tf, r)
        assert serialize_example(r.features()) == ex.SerializeToString(deterministic=True)


def test_float_features_byte_identical_and_read_back(tf):
    """Quality scores are float32 lists: the same bytes as TensorFlow's, and both parsers
    read the float32 value back."""
    import dataclasses

    import numpy as np

    from tfrecord_writer.schema import tf_feature_spec

    for score, label in ((0.8731, "good"), (0.0, "reject"), (1.0, "usable"), (-1.0, "")):
        r = dataclasses.replace(_record(), quality_score=score, quality_label=label)
        ours = serialize_example(r.features())
        assert ours == _tf_example(tf, r).SerializeToString(deterministic=True)
        got = parse_example(ours)
        assert got["image/quality/score"] == float(np.float32(score))
        assert got["image/quality/label"] == label.encode()
        parsed = tf.io.parse_single_example(ours, tf_feature_spec())
        assert float(parsed["image/quality/score"]) == float(np.float32(score))


def test_parse_example_reads_tensorflows_examples(tf):
    """The TF-free reader (drpipe report) reads what TensorFlow writes, packed int64 lists
    or not, large and negative values too."""
    r = _record(label=4)
    got = parse_example(_tf_example(tf, r).SerializeToString())
    assert got["image/class/label"] == 4 and got["image/width"] == 512
    assert got["image/encoded"] == r.encoded and got["image/id"] == b"0_left"
    assert got == parse_example(serialize_example(r.features()))
    other = tf.train.Example()
    other.features.feature["n"].int64_list.value.append(-5)
    other.features.feature["big"].int64_list.value.append(2**40 + 3)
    assert parse_example(other.SerializeToString()) == {"n": -5, "big": 2**40 + 3}


def test_shard_parses_with_tf_data(tf, tmp_path):
    from tfrecord_writer.schema import tf_feature_spec

    path = tmp_path / shard_name("train", 0, 1)
    with ShardWriter(path) as w:
        for i in range(5):
            w.write(_record(i, label=i))
    ds = tf.data.TFRecordDataset(str(path)).map(
        lambda s: tf.io.parse_single_example(s, tf_feature_spec()))
    got = [(e["image/id"].numpy().decode(), int(e["image/class/label"]),
            int(e["image/class/referable"]), len(e["image/encoded"].numpy())) for e in ds]
    assert got == [(f"{i}_left", i, int(i >= 2), 256 * (i + 1)) for i in range(5)]


def test_crc_checked_on_read(tmp_path):
    p = tmp_path / "x.tfrecord"
    p.write_bytes(frame_record(b"hello") + frame_record(b"world"))
    assert read_records(p) == [b"hello", b"world"]
    data = bytearray(p.read_bytes())
    data[14] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="bad data CRC"):
        read_records(p)
    p.write_bytes(frame_record(b"hello")[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_records(p)


def test_failed_write_leaves_no_final_file(tmp_path):
    path = tmp_path / shard_name("train", 0, 2)
    with pytest.raises(RuntimeError):
        with ShardWriter(path) as w:
            w.write(_record())
            assert not path.exists()  # only the temporary exists while writing
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_temporaries_are_cleaned(tmp_path):
    w = ShardWriter(tmp_path / "val-00000-of-00001.tfrecord")
    w.write(_record())
    w._f.flush()  # the process "dies" here: temporary left behind, no final name
    assert [p.name.endswith(".tmp") for p in tmp_path.iterdir()] == [True]
    assert remove_temporaries(tmp_path) == 1
    assert list(tmp_path.iterdir()) == []


def test_schema_rejects_unknown_and_missing_keys():
    f = _record().features()
    with pytest.raises(ValueError, match="unknown"):
        serialize_example({**f, "image/extra": 1})
    del f["image/id"]
    with pytest.raises(ValueError, match="missing"):
        serialize_example(f)


def test_record_features_follow_the_schema():
    """Record.features() is read off FEATURES: every key, each from its Record field."""
    import dataclasses

    r = dataclasses.replace(_record(label=2), quality_score=0.5, quality_label="good")
    f = r.features()
    assert list(f) == list(FEATURES)
    assert f["image/id"] == "0_left" and f["image/patient_id"] == "0"
    assert f["image/class/label"] == 2 and f["image/class/referable"] == 1
    assert f["image/quality/score"] == 0.5 and f["image/quality/label"] == "good"
    assert _record(label=1).features()["image/class/referable"] == 0
    # every field of a Record is stored under some key
    stored = {feature.field for feature in FEATURES.values()}
    assert {fld.name for fld in dataclasses.fields(Record)} <= stored


@pytest.mark.parametrize("sizes,target,expect_count", [
    ([100] * 10, 250, 4), ([100] * 10, 10_000, 1), ([100] * 3, 1, 3), ([], 100, 0)])
def test_plan_shards(sizes, target, expect_count):
    plan = plan_shards(sizes, target)
    assert len(plan) == len(sizes)
    assert (max(plan) + 1 if plan else 0) == expect_count
    assert plan == sorted(plan)  # contiguous runs, in order
    if sizes:
        per = [sum(s for s, a in zip(sizes, plan, strict=True) if a == i)
               for i in range(expect_count)]
        assert max(per) - min(per) <= max(sizes)  # even


def test_drpipe_version_from_metadata_or_pyproject(monkeypatch):
    import importlib.metadata

    from tfrecord_writer.info import drpipe_version

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    want = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert drpipe_version.__wrapped__() == importlib.metadata.version("drpipe")

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert drpipe_version.__wrapped__() == want  # a source tree without install metadata


def _imports(*folders: str) -> list[tuple[str, str]]:
    """(file relative to the checkout, top-level package imported) for every import in the
    modules of ``folders``, deferred ones included."""
    root = Path(__file__).parents[1]
    found = []
    for path in sorted(p for folder in folders for p in root.glob(f"{folder}/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [(str(path.relative_to(root)), n.split(".")[0]) for n in names]
    return found


def test_the_pipeline_layers_import_no_upper_floor():
    """pipeline/ and tfrecord_writer/ never import drpipe/, training/ or TensorFlow (one
    deferred import: schema.tf_feature_spec, for the training reader)."""
    found = [f"{f} {top}" for f, top in _imports("pipeline", "tfrecord_writer")
             if top in ("drpipe", "training", "tensorflow", "keras")]
    assert found == ["tfrecord_writer/schema.py tensorflow"]


def test_reporting_and_training_never_import_the_command_line():
    """The command line is the top floor: nothing below imports drpipe/; reporting/ (read by
    drpipe report, TensorFlow-free) imports no TensorFlow or Keras at all."""
    found = [f"{f} {top}" for f, top in _imports("reporting", "training")
             if top == "drpipe" or (f.startswith("reporting/") and top in ("tensorflow", "keras"))]
    assert found == []
    assert ("training/fit.py", "reporting") in _imports("training")  # the walk sees imports


def test_replacing_renames_when_whole_and_removes_when_refused(tmp_path):
    from tfrecord_writer.files import atomic_write_bytes, replacing

    target = tmp_path / "shard.tfrecord"
    atomic_write_bytes(target, b"old")
    with pytest.raises(ValueError, match="refused"), replacing(target) as tmp:
        tmp.write_bytes(b"half")
        raise ValueError("refused")  # e.g. a download whose SHA-256 is wrong
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]
    with replacing(target) as tmp:
        assert tmp.name.startswith(".") and tmp.name.endswith(".drpipe.tmp")
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # the final name is untouched until the end
    assert target.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [target]


def test_info_from_tells_the_formats_apart():
    """tfrecord_writer.info.info_from over any reader (load_info locally, the object-store
    output through the store's reads): the format decision in one place."""
    from tfrecord_writer.info import info_from

    old = {"drpipe_version": "0.1.0", "splits": {"train": {"shards": [{"name": "a"}]}}}
    new = {"drpipe_version": "0.2.0", "splits": {"train": {"shards": [{"name": "b"}]}}}
    tfds = {"name": "drpipe", "splits": [{"name": "train"}]}

    def reader(**files):
        blobs = {k.replace("_json", ".json"): json.dumps(v).encode() for k, v in files.items()}
        return blobs.get

    assert info_from(reader(dataset_info_json=old), "o") == old
    assert info_from(reader(dataset_info_json=tfds, drpipe_info_json=new), "o") == new
    with pytest.raises(FileNotFoundError, match=r"^o: no drpipe shards here"):
        info_from(reader(drpipe_info_json=new), "o")
    with pytest.raises(FileNotFoundError, match="drpipe_info.json is missing"):
        info_from(reader(dataset_info_json=tfds), "o")
    # a run that stopped before its marker: what drpipe_info.json says, or nothing
    assert info_from(reader(drpipe_info_json=new), "o", finished=False) == new
    assert info_from(reader(), "o", finished=False) == {}
    with pytest.raises(ValueError):
        info_from({"dataset_info.json": b"{not json"}.get, "o")
