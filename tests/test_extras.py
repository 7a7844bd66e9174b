"""The dependency split: preprocessing runs where TensorFlow is not installed; the training
commands then say in one line what to install (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import digest, preprocess
from tests.test_cli import DRPIPE

ROOT = Path(__file__).resolve().parents[1]
# Imported at start-up by every Python process that has this folder on its path (the
# client and each Dask worker): the training stack's modules then cannot be found, as on a
# machine where only `pip install drpipe` ran.
BLOCKER = '''
import sys
from importlib.abc import MetaPathFinder

class _NotInstalled(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"tensorflow", "keras", "tensorboard", "ai_edge_litert"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled())
'''


@pytest.fixture(scope="module")
def no_tf_env(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("no-tf")
    (d / "sitecustomize.py").write_text(BLOCKER)
    return dict(os.environ, PYTHONPATH=f"{d}{os.pathsep}{ROOT}")


def test_blocker_really_hides_tensorflow(no_tf_env):
    r = subprocess.run([sys.executable, "-c", "import tensorflow"], env=no_tf_env,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "No module named 'tensorflow'" in r.stderr


def test_preprocess_without_tensorflow_same_bytes(synth_dir, no_tf_env, tmp_path):
    preprocess("--src", synth_dir, "--out", tmp_path / "a", "--workers", 2, "--size", 128,
               "--shard-size", 0.2, env=no_tf_env)
    preprocess("--src", synth_dir, "--out", tmp_path / "b", "--workers", 2, "--size", 128,
               "--shard-size", 0.2)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert len(digest(tmp_path / "a")) >= 5


@pytest.mark.parametrize("command", [["train", "--data", "shards"],
                                     ["evaluate", "runs/x"],
                                     ["export", "runs/x"]])
def test_training_commands_name_the_extra(no_tf_env, tmp_path, command):
    r = subprocess.run([DRPIPE, *command], env=no_tf_env, capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and "pip install 'drpipe[train]'" in r.stderr
    assert f"drpipe {command[0]} needs the training stack" in r.stderr
