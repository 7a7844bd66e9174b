"""Every exit code the README documents, produced by the real CLI; and `drpipe split` plans
exactly the split `preprocess` writes (Kaggle train/ + test/, and with --limit)."""

from __future__ import annotations

import csv
import fcntl
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from pipeline.synth import synth_dataset
from tests.conftest import ROOT
from tests.reliability.helpers import drpipe, no_traceback
from tests.test_cli import DRPIPE

SMALL = ("--size", "64", "--workers", "1", "--quiet")


def _documented_codes() -> set[int]:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("### Exit codes", 1)[1].split("###", 1)[0]
    return {int(m) for m in re.findall(r"^\| (\d+) \|", table, re.M)}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    d = tmp_path_factory.mktemp("codes") / "raw"
    synth_dataset(d, n=12, seed=2)
    return d


def test_every_documented_exit_code(raw, tmp_path):
    seen = {}

    def run(code, *args):
        r = drpipe(*args)
        no_traceback(r)
        assert r.returncode == code, (args, r.returncode, r.stdout[-500:], r.stderr[-500:])
        if code:
            assert r.stderr.strip(), args
        seen.setdefault(code, []).append(args[0])
        return r

    run(0, "split", "--labels", raw / "trainLabels.csv", "--out", tmp_path / "s.csv")
    run(0, "preprocess", "--src", raw, "--out", tmp_path / "ok", *SMALL)
    # 1: the run failed
    empty = tmp_path / "nolabels"
    shutil.copytree(raw, empty)
    (empty / "trainLabels.csv").write_text("image,level\nsomeone_left,1\n")
    r = run(1, "preprocess", "--src", empty, "--out", tmp_path / "none", *SMALL)
    assert "no usable photo" in r.stderr
    run(1, "preprocess", "--src", raw, "--out", tmp_path / "ok", "--size", "96", "--quiet")
    # 2: usage errors, missing inputs
    run(2, "preprocess", "--size", "1", "--src", raw, "--out", tmp_path / "x")
    run(2, "preprocess", "--src", tmp_path / "missing", "--out", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()  # no lock file, no folder left behind
    run(2, "train", "--data", tmp_path / "missing", "--out", tmp_path / "run")
    run(2, "report", "--data", tmp_path / "missing", "--out", tmp_path / "r.html")
    run(2, "tune", "--data", tmp_path / "missing", "--out", tmp_path / "t")
    run(2, "evaluate", tmp_path / "missing")
    # 3: bad input data
    bad = tmp_path / "bad.csv"
    bad.write_text("image,level\na_left,7\n")
    r = run(3, "split", "--labels", bad, "--out", tmp_path / "s2.csv")
    assert f"{bad}: line 2" in r.stderr
    (tmp_path / "layout").mkdir()
    run(3, "preprocess", "--src", tmp_path / "layout", "--out", tmp_path / "o3", *SMALL)
    # 75: another run holds the output's lock
    busy = tmp_path / "busy"
    busy.mkdir()
    with open(busy / ".drpipe.lock", "w") as lock:
        lock.write(str(os.getpid()))
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = run(75, "preprocess", "--src", raw, "--out", busy, *SMALL)
    assert "another drpipe run" in r.stderr
    # 130: Ctrl-C (SIGINT to the foreground process group) in a command of no special
    # handling of its own: one line, no "Aborted!", and synth then goes on in that --out
    p = subprocess.Popen([DRPIPE, "synth", "--out", str(tmp_path / "sy"), "--n", "4000",
                          "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    deadline = time.time() + 60
    while not list((tmp_path / "sy").glob("train/*.jpeg")) and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert err.splitlines() == [err.strip()] and "interrupted" in err and "run drpipe synth" in err
    assert "Aborted!" not in err and "Traceback" not in err
    seen[130] = ["synth"]
    run(0, "synth", "--out", tmp_path / "sy", "--n", "4", "--quiet")
    assert set(seen) == _documented_codes() == {0, 1, 2, 3, 75, 130}


def _kaggle_with_test(raw, tmp_path):
    src = tmp_path / "kaggle"
    shutil.copytree(raw, src)
    rows = list(csv.reader(open(src / "trainLabels.csv")))
    header, rows = rows[0], rows[1:]
    held = rows[-4:]  # two patients' photos go to test/ with their solution rows
    (src / "test").mkdir()
    for image_id, _ in held:
        shutil.move(src / "train" / f"{image_id}.jpeg", src / "test" / f"{image_id}.jpeg")
    with open(src / "trainLabels.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([header, *rows[:-4]])
    with open(src / "retinopathy_solution.csv", "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(
            [["image", "level", "Usage"], *[[i, g, "Public"] for i, g in held]])
    return src


@pytest.mark.parametrize("limit", [None, 5])
def test_split_plans_the_split_preprocess_writes(raw, tmp_path, limit):
    src = _kaggle_with_test(raw, tmp_path)
    spec = "train=0.5,val=0.25,test=0.25"
    out = tmp_path / "shards"
    args = ["--limit", str(limit)] if limit else []
    r = drpipe("preprocess", "--src", src, "--out", out, "--split", spec, "--seed", "4",
               *SMALL, *args)
    assert r.returncode == 0, r.stderr
    drpipe("split", "--labels", src / "trainLabels.csv", "--labels",
           src / "retinopathy_solution.csv", "--split", spec, "--seed", "4",
           "--out", tmp_path / "plan.csv", check=True)
    plan = {r["image"]: r["split"] for r in csv.DictReader(open(tmp_path / "plan.csv"))}
    written = {r["image_id"]: r["split"] for r in csv.DictReader(open(out / "data_manifest.csv"))}
    assert len(plan) == 12 and len(written) == (limit or 12)
    assert {written[i] for i in written} >= {"train"}
    for image_id, split in written.items():
        assert plan[image_id] == split, image_id
