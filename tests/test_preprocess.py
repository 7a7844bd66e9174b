"""drpipe preprocess end to end: accounting, tf.data, splits, determinism, resume, clusters."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.synth import synth_dataset
from tests.helpers import DRPIPE, digest, preprocess
from tests.reliability.helpers import kill_when, start
from tfrecord_writer.info import load_info

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
KEYS = ["image/encoded", "image/format", "image/height", "image/width", "image/class/label",
        "image/class/referable", "image/id", "image/patient_id", "image/eye",
        "image/source_sha256"]  # as documented in docs/FORMAT.md


def manifest(out: Path) -> list[dict]:
    return list(csv.DictReader(open(out / "data_manifest.csv")))


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """120 synthetic photos plus the mess real downloads have."""
    root = tmp_path_factory.mktemp("raw")
    synth_dataset(root, n=120, seed=3)
    train = root / "train"
    good = sorted(train.glob("*.jpeg"))
    data = good[0].read_bytes()
    (train / "900_left.jpeg").write_bytes(data[: len(data) * 2 // 5])  # truncated at 40 %
    (train / "900_right.jpeg").write_text("<html><body>502 Bad Gateway</body></html>")
    (train / "901_left.jpeg").write_bytes(good[1].read_bytes())  # no label row
    (train / "902_left.jpeg").write_bytes(good[2].read_bytes())  # same bytes, another id
    with open(root / "trainLabels.csv", "a") as f:
        f.write("900_left,2\n900_right,1\n902_left,0\n903_left,4\n")  # 903: no photo
    return root


@pytest.fixture(scope="module")
def out2(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out2")
    preprocess("--src", raw, "--out", out, "--workers", 2, "--shard-size", 0.5,
               "--summary-json", out / "summary.json")
    return out


def test_every_input_accounted_for(raw, out2):
    rows = manifest(out2)
    photos = {p.stem for p in (raw / "train").iterdir()}
    labels = {r["image"] for r in csv.DictReader(open(raw / "trainLabels.csv"))}
    assert {r["image_id"] for r in rows} == photos | labels
    by_id = {r["image_id"]: r for r in rows}
    assert by_id["900_left"]["reason"].startswith("truncated:")
    assert by_id["900_right"]["reason"].startswith("not_an_image:")
    assert by_id["901_left"]["reason"].startswith("no_label:")
    assert by_id["903_left"]["reason"].startswith("missing_file:")
    assert by_id["902_left"]["status"] == "ok"
    originals = sorted(p for p in photos if not p.startswith("90"))
    assert by_id["902_left"]["duplicate_of"] == originals[2]
    assert by_id["901_left"]["duplicate_of"] == originals[1]  # also a copy (and unlabelled)
    assert by_id[originals[2]]["duplicate_of"] == ""
    rejected = {r["image_id"] for r in rows if r["status"] == "rejected"}
    assert rejected == {"900_left", "900_right", "901_left", "903_left"}
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["shard"] and r["sha256"] and r["retina_r"] for r in ok)
    summary = json.loads((out2 / "summary.json").read_text())
    assert summary["photos"] == 124 and summary["ok"] == 121
    assert summary["rejected_by_reason"] == {"no_label": 1, "not_an_image": 1, "truncated": 1}
    assert summary["labels_without_photo"] == 1 and summary["duplicates"] == 2


def test_manifest_parquet_is_the_same_data_typed(out2):
    import pyarrow.parquet as pq

    t = pq.read_table(out2 / "manifest.parquet")
    rows = manifest(out2)
    assert t.num_rows == len(rows)
    assert t.column("image_id").to_pylist() == [r["image_id"] for r in rows]
    assert str(t.schema.field("label").type) == "int8"
    assert t.column("label").to_pylist() == [int(r["label"]) if r["label"] else None
                                             for r in rows]


def test_shards_parse_with_plain_tf_data(raw, out2):
    import tensorflow as tf

    spec = {k: tf.io.FixedLenFeature([], tf.int64 if k in (
        "image/height", "image/width", "image/class/label", "image/class/referable")
        else tf.string) for k in KEYS}
    labels = {r["image"]: int(r["level"]) for r in csv.DictReader(open(raw / "trainLabels.csv"))}
    rows = {r["image_id"]: r for r in manifest(out2)}
    seen = {}
    for shard in sorted(out2.glob("*.tfrecord")):
        for ex in tf.data.TFRecordDataset(str(shard)).map(
                lambda s: tf.io.parse_single_example(s, spec)):
            image_id = ex["image/id"].numpy().decode()
            label = int(ex["image/class/label"])
            assert label == labels[image_id]
            assert int(ex["image/class/referable"]) == int(label >= 2)
            assert rows[image_id]["shard"] == shard.name
            assert ex["image/source_sha256"].numpy().decode() == rows[image_id]["sha256"]
            assert ex["image/patient_id"].numpy().decode() == image_id.split("_")[0]
            img = tf.io.decode_jpeg(ex["image/encoded"])
            assert tuple(img.shape) == (512, 512, 3) == (int(ex["image/height"]),
                                                        int(ex["image/width"]), 3)
            seen[image_id] = shard.name.split("-")[0]
    assert len(seen) == 121
    assert {k: v for k, v in seen.items()} == {
        k: r["split"] for k, r in rows.items() if r["status"] == "ok"}


def test_splits_patient_safe_and_stratified(out2):
    rows = [r for r in manifest(out2) if r["status"] == "ok"]
    split_of = {}
    for r in rows:
        assert split_of.setdefault(r["patient_id"], r["split"]) == r["split"], r["patient_id"]
    whole = np.bincount([int(r["label"]) for r in rows], minlength=5) / len(rows)
    for s, frac in {"train": 0.8, "val": 0.1, "test": 0.1}.items():
        c = np.bincount([int(r["label"]) for r in rows if r["split"] == s], minlength=5)
        # within 1 point of the whole, or a patient's two eyes for tiny classes
        assert ((np.abs(c / c.sum() - whole) <= 0.01) | (np.abs(c - whole * c.sum()) <= 2)).all()
        assert abs(c.sum() - frac * len(rows)) <= 3


def test_several_shards_named_and_sized(out2):
    info = load_info(out2)
    train = info["splits"]["train"]["shards"]
    n = len(train)
    assert n >= 4
    assert [s["name"] for s in train] == [f"train-{i:05d}-of-{n:05d}.tfrecord" for i in range(n)]
    sizes = [s["bytes"] for s in train]
    assert max(sizes) < 0.5 * 1024 * 1024 * 1.3
    assert info["config"]["process"]["size"] == 512 and len(info["config_hash"]) == 16
    assert info["counts"]["train"] == [sum(1 for r in manifest(out2) if r["status"] == "ok"
                                           and r["split"] == "train" and r["label"] == str(g))
                                       for g in range(5)]


def test_workers_lean_and_bounded(out2):
    summary = json.loads((out2 / "summary.json").read_text())
    assert summary["workers_imported_tensorflow"] is False
    assert 0 < summary["peak_worker_rss_mb"] < 1500


def _faults_per_photo(root, items):
    """Minor page faults per photo of process_batch in this process (a worker's view)."""
    import resource

    from pipeline.job import process_batch
    from pipeline.process import ProcessConfig

    process_batch(root, items[:2], ProcessConfig(), False)  # warm: the heap grown once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    process_batch(root, items, ProcessConfig(), False)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / len(items)


def test_local_workers_keep_their_heap_between_photos(sample_photos):
    """Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536: glibc then hands the heap
    back after every photo and the next one zero-fills it again, page by page (~1,300
    faults and ~2.5 ms CPU per photo on the sample). The local workers drpipe starts
    keep it (job.WORKER_CONFIG)."""
    from pipeline.job import RunOptions, _start_client

    items = [{"path": p.name, "image_id": p.stem, "patient_id": p.stem.split("_")[0],
              "eye": "left", "label": 0} for p in sample_photos[:8]]
    client, cluster = _start_client(RunOptions(workers=1))
    try:
        env = client.run(lambda: {k: os.environ.get(k) for k in
                                  ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")})
        faults = client.submit(_faults_per_photo, str(sample_photos[0].parent), items,
                               pure=False).result()
    finally:
        client.close()
        cluster.close()
    assert list(env.values()) == [{"MALLOC_TRIM_THRESHOLD_": str(32 * 2**20),
                                   "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20)}]
    assert faults < 200, f"{faults:.0f} page faults per photo: the heap is handed back"


def test_same_bytes_with_one_worker(raw, out2, tmp_path):
    preprocess("--src", raw, "--out", tmp_path, "--workers", 1, "--shard-size", 0.5)
    assert digest(tmp_path) == digest(out2)


def test_rerun_is_a_noop(raw, out2):
    before = {p.name: p.stat().st_mtime_ns for p in out2.iterdir()}
    r = subprocess.run([DRPIPE, "preprocess", "--src", str(raw), "--out", str(out2),
                        "--workers", "2", "--shard-size", "0.5"], capture_output=True, text=True)
    assert r.returncode == 0 and "already complete" in r.stdout
    log = (".drpipe.lock", "history.jsonl")  # the run's line is appended to the history
    after = {p.name: p.stat().st_mtime_ns for p in out2.iterdir() if p.name not in log}
    assert after == {k: v for k, v in before.items() if k not in log}


def test_changed_config_refused_unless_overwrite(raw, tmp_path):
    preprocess("--src", raw, "--out", tmp_path, "--limit", 20, "--workers", 1)
    r = preprocess("--src", raw, "--out", tmp_path, "--limit", 20, "--workers", 1,
                   "--size", 256, check=False)
    assert r.returncode == 1
    assert "different configuration" in r.stderr and "--overwrite" in r.stderr
    assert "Traceback" not in r.stderr
    preprocess("--src", raw, "--out", tmp_path, "--limit", 20, "--workers", 1, "--size", 256,
               "--overwrite")
    info = load_info(tmp_path)
    assert info["config"]["process"]["size"] == 256


def test_lock_stops_a_second_run(raw, tmp_path):
    lock = open(tmp_path / ".drpipe.lock", "w")
    lock.write("4242")
    lock.flush()
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        r = preprocess("--src", raw, "--out", tmp_path, "--limit", 4, check=False)
    finally:
        lock.close()
    assert r.returncode == 75 and "another drpipe run" in r.stderr and "4242" in r.stderr
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [h["exit_status"] for h in history] == [75]
    # The skipped run's history line is drpipe's: the run that follows (here, the first
    # one to hold the lock) is not refused for it (two runs racing on a new --out).
    preprocess("--src", raw, "--out", tmp_path, "--limit", 4, "--workers", 1)
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [h["exit_status"] for h in history] == [75, 0]


def test_a_lock_file_drpipe_did_not_write_is_kept(raw, tmp_path):
    (tmp_path / ".drpipe.lock").write_text("my notes\n")
    r = preprocess("--src", raw, "--out", tmp_path, "--limit", 4, check=False)
    assert r.returncode == 1 and "not drpipe's lock file" in r.stderr, r.stderr
    assert (tmp_path / ".drpipe.lock").read_text() == "my notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".drpipe.lock"]


@pytest.mark.parametrize("kind", ["symlink", "dangling", "binary", "arabic_digits"])
def test_a_lock_that_is_not_a_plain_pid_file_is_refused_and_kept(raw, tmp_path, kind):
    out, mine = tmp_path / "out", tmp_path / "mine.txt"
    out.mkdir()
    lock = out / ".drpipe.lock"
    if kind == "symlink":
        mine.write_text("4242")
        lock.symlink_to(mine)
    elif kind == "dangling":
        lock.symlink_to(mine)
    else:
        lock.write_bytes(b"\xff\xfe\x00binary" if kind == "binary"
                         else "\u0661\u0662".encode())
    before = lock.read_bytes() if kind in ("binary", "arabic_digits") else None
    r = preprocess("--src", raw, "--out", out, "--limit", 4, check=False)
    assert r.returncode == 1 and "not drpipe's lock file" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1
    if kind == "symlink":
        assert mine.read_text() == "4242"
    elif kind == "dangling":
        assert not mine.exists()  # nothing written outside --out
    else:
        assert lock.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == [".drpipe.lock"]


@pytest.mark.parametrize("text", ["", '{"exit_status": "done", "job": "my cron log"}\n'])
def test_a_users_history_jsonl_is_not_taken_for_drpipes(raw, tmp_path, text):
    (tmp_path / "history.jsonl").write_text(text)
    r = preprocess("--src", raw, "--out", tmp_path, "--limit", 4, check=False)
    assert r.returncode == 1 and "not a drpipe output" in r.stderr, r.stderr
    assert (tmp_path / "history.jsonl").read_text() == text


def test_strict_fails_on_rejections(raw, tmp_path):
    r = preprocess("--src", raw, "--out", tmp_path, "--strict", "--workers", 1, check=False)
    assert r.returncode == 1
    assert "--strict: 3 photo(s) rejected" in r.stderr
    assert (tmp_path / "data_manifest.csv").exists()  # the reasons are there to read


def test_bad_label_is_one_line_exit_3(tmp_path):
    synth_dataset(tmp_path / "raw", n=4, seed=0)
    with open(tmp_path / "raw/trainLabels.csv", "a") as f:
        f.write("77_left,9\n")
    r = preprocess("--src", tmp_path / "raw", "--out", tmp_path / "o", check=False)
    assert r.returncode == 3
    assert r.stderr.count("\n") == 1
    assert "trainLabels.csv: line 6: level '9' for '77_left' is not a grade 0-4" in r.stderr


def test_config_file(raw, tmp_path):
    cfg = tmp_path / "job.toml"
    cfg.write_text('size = 128\nfilter = "clahe"\nshard-size = 0.05\nlimit = 12\nworkers = 1\n'
                   'split = "train=0.5,val=0.5"\n')
    preprocess("--config", cfg, "--src", raw, "--out", tmp_path / "o", "--size", 160)
    info = load_info(tmp_path / "o")
    assert info["config"]["process"]["size"] == 160  # the command line wins
    assert info["config"]["process"]["filter"] == "clahe"
    assert info["config"]["split"] == {"train": 0.5, "val": 0.5}
    bad = tmp_path / "bad.toml"
    bad.write_text("colour = 1\n")
    r = preprocess("--config", bad, check=False)
    assert r.returncode == 2 and "unknown option 'colour'" in r.stderr


def test_real_photos_end_to_end(sample_dir, tmp_path):
    import tensorflow as tf

    preprocess("--src", sample_dir, "--out", tmp_path, "--workers", 2)
    rows = manifest(tmp_path)
    assert len(rows) == 31 and all(r["status"] == "ok" for r in rows)
    labels = {r["image"]: int(r["level"]) for r in csv.DictReader(open(sample_dir /
                                                                     "trainLabels.csv"))}
    from tfrecord_writer.schema import tf_feature_spec

    n = 0
    for shard in tmp_path.glob("*.tfrecord"):
        for ex in tf.data.TFRecordDataset(str(shard)).map(
                lambda s: tf.io.parse_single_example(s, tf_feature_spec())):
            assert int(ex["image/class/label"]) == labels[ex["image/id"].numpy().decode()]
            n += 1
    assert n == 31
    patients = {}
    for r in rows:
        assert patients.setdefault(r["patient_id"], r["split"]) == r["split"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_existing_dask_cluster_gives_identical_bytes(raw, out2, tmp_path, dask_cluster):
    """A real `dask scheduler` and two `dask worker` processes on 127.0.0.1."""
    preprocess("--src", raw, "--out", tmp_path, "--shard-size", 0.5,
               "--scheduler", dask_cluster.address)
    from distributed import Client

    with Client(dask_cluster.address, timeout=10) as c:
        assert len(c.scheduler_info()["workers"]) == 2
    assert digest(tmp_path) == digest(out2)


def test_unreachable_scheduler_is_one_line(raw, tmp_path):
    r = preprocess("--src", raw, "--out", tmp_path, "--scheduler",
                   f"tcp://127.0.0.1:{_free_port()}", check=False)
    assert r.returncode == 1 and "cannot use the Dask scheduler" in r.stderr
    assert "Traceback" not in r.stderr


def test_sigkill_then_resume_gives_identical_bytes(raw, out2, tmp_path):
    args = ["preprocess", "--quiet", "--src", raw, "--out", tmp_path, "--workers", 1,
            "--shard-size", 0.5]
    staging = tmp_path / ".staging"
    # the whole job, client and its workers, killed mid-way
    kill_when(start(*args), lambda: len(list(staging.glob("batch-*.json"))) >= 2, 120)
    committed = sorted(p.name for p in staging.glob("batch-*.json"))
    assert 2 <= len(committed) < 4, committed  # killed mid-way, not after the end
    assert not (tmp_path / "dataset_info.json").exists()
    r = subprocess.run([DRPIPE, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert digest(tmp_path) == digest(out2)
    assert not staging.exists() and not list(tmp_path.glob("*.tmp"))
