"""Ctrl-C during preprocess, and TensorFlow's start-up noise (issue 10, C5)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.helpers import synth_source
from tests.reliability.helpers import digest, drpipe
from tests.test_cli import DRPIPE

ARGS = ["--workers", "1", "--size", "64", "--shard-size", "0.05", "--quiet"]


raw = synth_source(n=96, seed=9, folder="int-raw")


def test_ctrl_c_is_one_line_exit_130_and_resumable(raw, tmp_path):
    clean = tmp_path / "clean"
    drpipe("preprocess", "--src", raw, "--out", clean, *ARGS, check=True)
    out = tmp_path / "out"
    # Ctrl-C in a terminal: SIGINT to the whole foreground process group (workers too)
    p = subprocess.Popen([DRPIPE, "preprocess", "--src", str(raw), "--out", str(out), *ARGS],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    deadline = time.time() + 120
    while not list((out / ".staging").glob("batch-*.json")) and time.time() < deadline:
        time.sleep(0.01)
    assert p.poll() is None, "the run ended before a batch was committed"
    t = time.time()
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    took = time.time() - t
    assert p.returncode == 130, err
    assert err.splitlines() == [err.strip()] and "interrupted" in err, err
    assert "Traceback" not in err and took < 10
    assert not (out / "dataset_info.json").exists()
    r = drpipe("preprocess", "--src", raw, "--out", out, *ARGS)
    assert r.returncode == 0, r.stderr
    assert digest(out) == digest(clean)


def test_ctrl_c_in_train_is_one_line_exit_130_and_resumable(tmp_path):
    import csv

    from tests.helpers import synth_shards

    shards = synth_shards(tmp_path, 40, 3, 64, "train=0.7,val=0.3", "--workers", 1)
    run = tmp_path / "run"
    p = subprocess.Popen([DRPIPE, "train", "--data", str(shards), "--model", "cnn-small",
                          "--image-size", "32", "--epochs", "6", "--batch-size", "8",
                          "--out", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)

    def epochs() -> int:
        try:
            return len(list(csv.DictReader(open(run / "history.csv"))))
        except OSError:
            return 0
    deadline = time.time() + 300
    while epochs() < 1 and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, "training ended before its first epoch was recorded"
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("drpipe: error: interrupted") and f"--resume {run}" in last, err
    assert "Traceback" not in err and "Aborted!" not in err
    assert not (run / "model.keras").exists()
    r = drpipe("train", "--resume", run, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    from reporting.plots import read_history  # a row repeated by the resume is kept once

    assert [row["epoch"] for row in read_history(run)] == [str(k) for k in range(6)]


def test_tensorflow_start_up_lines_are_hidden_unless_asked():
    code = ("from training.tflogs import install; install(); import tensorflow as tf; "
            "print(float(tf.reduce_sum(tf.ones((2, 2)))))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("DRPIPE_TF_LOGS", None)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "4.0", r.stderr
    assert r.stderr == "", r.stderr  # no absl / oneDNN / CUDA-stub lines
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(env, DRPIPE_TF_LOGS="1"), timeout=300)
    assert loud.returncode == 0
    # what TensorFlow prints depends on the machine; where it prints anything, the switch
    # shows it
    if "cudart_stub" in loud.stderr or "oneDNN" in loud.stderr or "absl" in loud.stderr:
        assert loud.stderr != r.stderr
