"""Helpers the test modules share: the ``drpipe`` command run as a user runs it, digests of
an output, and synthetic sources and shards made once per module.

Fixtures every module may use are in conftest.py; these are imported by name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.synth import synth_dataset

DRPIPE = shutil.which("drpipe") or str(Path(sys.executable).parent / "drpipe")
OUTPUTS = ("*.tfrecord", "data_manifest.csv", "manifest.parquet")


def drpipe(*args, timeout=300, user=None, check=False, tail=2000, env=None,
           **kw) -> subprocess.CompletedProcess:
    """Run the real CLI; ``user="nobody"`` runs it unprivileged (root ignores file modes);
    ``check`` raises with the last ``tail`` characters of its output (None: all of it) on a
    non-zero exit."""
    cmd = [DRPIPE, *map(str, args)]
    env = dict(os.environ if env is None else env)
    if user and os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        env["HOME"] = tempfile.gettempdir()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kw)
    if check and r.returncode:
        cut = slice(-tail if tail else None, None)
        raise AssertionError(f"exit {r.returncode}\n{r.stdout[cut]}\n{r.stderr[cut]}")
    return r


def preprocess(*args, check=True, **kw) -> subprocess.CompletedProcess:
    """``drpipe preprocess --quiet ARGS``, checked unless ``check=False``."""
    return drpipe("preprocess", "--quiet", *args, check=check, timeout=600, tail=None, **kw)


def digest(out: Path) -> dict[str, str]:
    """{name: SHA-256} of an output's shards and manifests."""
    files = sorted(p for pat in OUTPUTS for p in out.glob(pat))
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def synth_source(n: int, seed: int, name: str = "raw", folder: str | None = None):
    """A module-scoped fixture ``name``: a synthetic source of ``n`` photos (in a temporary
    folder named ``folder``).

        raw = synth_source(n=24, seed=5, folder="own-raw")
    """
    @pytest.fixture(scope="module", name=name)
    def fixture(tmp_path_factory) -> Path:
        root = tmp_path_factory.mktemp(folder or name)
        synth_dataset(root, n=n, seed=seed)
        return root
    return fixture


def same_stem_folders(tmp_path: Path, photos: list[Path], stem: str) -> tuple[Path, Path]:
    """Folders ``a`` and ``b`` under ``tmp_path``, each holding another of the first two
    ``photos`` as ``{stem}.jpeg``: one output name, two photos."""
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, photo in ((a, photos[0]), (b, photos[1])):
        folder.mkdir()
        shutil.copy(photo, folder / f"{stem}.jpeg")
    return a, b


def synth_shards(d: Path, n: int, seed: int, size: int, split: str, *options,
                 run=drpipe) -> Path:
    """``drpipe synth`` of ``n`` photos into ``d/raw``, then ``drpipe preprocess`` of it at
    ``size`` px into ``d/shards`` (``options`` added). Returns ``d/shards``."""
    run("synth", "--out", d / "raw", "--n", n, "--seed", seed, "--quiet", check=True)
    run("preprocess", "--src", d / "raw", "--out", d / "shards", "--size", size,
        "--split", split, *options, "--quiet", check=True)
    return d / "shards"


@contextlib.contextmanager
def environment(env: dict):
    """``env`` set in os.environ (so subprocesses and Dask workers inherit it), restored
    after."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield


def download(fs, url: str, to: Path) -> Path:
    """The files directly under a store URL (an output), downloaded into ``to``."""
    to.mkdir(parents=True, exist_ok=True)
    fs.invalidate_cache()
    base = url.split("://", 1)[1].rstrip("/")
    for key in fs.find(base):
        rel = key[len(base) + 1:]
        if rel and "/" not in rel:
            (to / rel).write_bytes(fs.cat_file(key))
    return to
