"""Process faults: kills, a full disk, read-only output, concurrent runs, a lost worker.
For each: no traceback, nothing committed lost or altered, the same bytes in the end."""

from __future__ import annotations

import errno
import os
import subprocess
import time

import pytest

from pipeline.synth import synth_dataset
from tests.helpers import synth_source
from tests.reliability.helpers import (
    committed_shards_whole,
    digest,
    drpipe,
    kill_when,
    no_traceback,
)
from tests.test_cli import DRPIPE

ARGS = ["--workers", "1", "--shard-size", "0.2", "--quiet"]


raw = synth_source(n=160, seed=11)


@pytest.fixture(scope="module")
def clean(raw, tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("clean")
    drpipe("preprocess", "--src", raw, "--out", out, *ARGS, check=True)
    d = digest(out)
    assert sum(n.endswith(".tfrecord") for n in d) >= 6  # several shards to kill between
    return d


def _start(raw, out) -> subprocess.Popen:
    return subprocess.Popen([DRPIPE, "preprocess", "--src", str(raw), "--out", str(out), *ARGS],
                            start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("point", ["setup", "processing", "writing_shards"])
def test_sigkill_then_resume_is_byte_identical(raw, clean, tmp_path, point):
    out = tmp_path / "out"
    proc = _start(raw, out)
    conditions = {
        "setup": lambda: (out / ".drpipe-state.json").exists(),
        "processing": lambda: len(list((out / ".staging").glob("batch-*.json"))) >= 2,
        "writing_shards": lambda: any(out.glob("*.tfrecord")),
    }
    killed = kill_when(proc, conditions[point])
    assert killed, f"the run ended before reaching {point}"
    assert not (out / "dataset_info.json").exists()
    committed_shards_whole(out)  # a final name always means a whole shard
    r = drpipe("preprocess", "--src", raw, "--out", out, *ARGS)
    assert r.returncode == 0, r.stderr[-2000:]
    no_traceback(r)
    assert digest(out) == clean
    assert not list(out.rglob("*.tmp")) and not (out / ".staging").exists()


def test_disk_full_while_writing_a_shard(raw, clean, tmp_path, monkeypatch):
    from pipeline.job import JobConfig, JobError, RunOptions, run
    from pipeline.process import ProcessConfig
    from tfrecord_writer import writer

    out = tmp_path / "out"
    real_write = writer.ShardWriter.write
    calls = {"n": 0}

    def full_disk(self, record):
        calls["n"] += 1
        if calls["n"] == 40:  # somewhere in the second or third shard
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self._tmp))
        return real_write(self, record)

    monkeypatch.setattr(writer.ShardWriter, "write", full_disk)
    cfg = JobConfig(src=str(raw), out=str(out), process=ProcessConfig(), shard_size_mb=0.2)
    with pytest.raises(JobError, match="No space left on device; what was committed is kept"):
        run(cfg, RunOptions(workers=1, quiet=True))
    committed = sorted(p.name for p in out.glob("*.tfrecord"))
    assert committed and len(committed) < sum(n.endswith(".tfrecord") for n in clean)
    committed_shards_whole(out)
    assert not list(out.glob("*.tmp"))  # the half-written shard is gone, not renamed
    before = {n: clean[n] for n in committed}
    assert {n: h for n, h in digest(out).items() if n in before} == before
    monkeypatch.setattr(writer.ShardWriter, "write", real_write)  # space is back
    r = drpipe("preprocess", "--src", raw, "--out", out, *ARGS)
    assert r.returncode == 0, r.stderr[-2000:]
    assert digest(out) == clean


def test_read_only_output_is_a_clear_error(raw, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode:
        pytest.skip("chattr +i unavailable on this filesystem")
    try:
        r = drpipe("preprocess", "--src", raw, "--out", ro, *ARGS)
    finally:
        subprocess.run(["chattr", "-i", str(ro)])
    assert r.returncode == 1
    assert r.stderr == f"drpipe: error: {ro} is not writable\n"
    r = drpipe("preprocess", "--src", raw, "--out", "/sys/drpipe-out", *ARGS)
    assert r.returncode == 1 and "cannot create /sys/drpipe-out" in r.stderr
    no_traceback(r)


def test_two_concurrent_runs_on_one_out(raw, clean, tmp_path):
    out = tmp_path / "out"
    a, b = _start(raw, out), _start(raw, out)
    results = [p.communicate(timeout=300) + (p.returncode,) for p in (a, b)]
    codes = sorted(rc for _, _, rc in results)
    assert codes == [0, 75], results  # the loser is skipped (EX_TEMPFAIL)
    loser = next(err for _, err, rc in results if rc == 75)
    assert "another drpipe run is writing to" in loser and "Traceback" not in loser
    assert digest(out) == clean


def test_dask_worker_killed_mid_job(raw, clean, tmp_path, dask_cluster):
    out = tmp_path / "out"
    job = subprocess.Popen([DRPIPE, "preprocess", "--src", str(raw), "--out", str(out),
                            "--scheduler", dask_cluster.address, "--shard-size", "0.2",
                            "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / ".staging").glob("batch-*.json")):
        time.sleep(0.01)
    dask_cluster.kill_worker(0)  # one worker, nanny and process, gone mid-job
    _, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-2000:]
    assert "Traceback" not in err
    assert digest(out) == clean


def test_train_killed_before_its_first_epoch_resumes(tmp_path):
    """(A kill mid-training is tests/training/test_train.py::test_kill_and_resume_...)."""
    import csv

    synth_dataset(tmp_path / "raw", n=40, seed=2)
    drpipe("preprocess", "--src", tmp_path / "raw", "--out", tmp_path / "shards", "--size", 64,
           "--workers", 1, "--quiet", check=True)
    run = tmp_path / "run"
    proc = subprocess.Popen([DRPIPE, "train", "--data", str(tmp_path / "shards"), "--model",
                             "cnn-small", "--image-size", "32", "--epochs", "3", "--batch-size",
                             "8", "--out", str(run)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert kill_when(proc, lambda: (run / "config.json").exists())
    assert not (run / "history.csv").exists() or len(list(csv.DictReader(
        open(run / "history.csv")))) == 0
    r = drpipe("train", "--resume", run, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [row["epoch"] for row in csv.DictReader(open(run / "history.csv"))] == ["0", "1", "2"]
