"""gs:// against a real GCS JSON API on 127.0.0.1 (gcp-storage-emulator, in memory): the
same code paths as s3:// (tests/test_storage.py) through another fsspec protocol: a store
folder and Kaggle's volumes read by the workers themselves, outputs uploaded, staged back.

The emulator has no preconditions (``ifGenerationMatch``): the lease's exclusive create
is not tested here (on GCS gcsfs sends ``ifGenerationMatch=0``)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

# gcsfs otherwise asks a gRPC API for each bucket's type, which the emulator does not
# serve: 60 s per call. Set before gcsfs is imported (here and in every drpipe process).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

gcsfs = pytest.importorskip("gcsfs")
emulator = pytest.importorskip("gcp_storage_emulator.server")

from tests.helpers import digest, download, environment, preprocess  # noqa: E402
from tests.test_archive import SETTINGS as ARCHIVE_SETTINGS  # noqa: E402
from tests.test_archive import make_zip, split_parts  # noqa: E402
from tests.test_cli import DRPIPE  # noqa: E402

SETTINGS = ("--workers", 2, "--size", 128, "--shard-size", 0.2, "--storage-option",
            "token=anon")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator; STORAGE_EMULATOR_HOST points every process (drpipe, its Dask
    workers) at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = emulator.create_server("127.0.0.1", port, in_memory=True)
    server.start()
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
           "DRPIPE_CACHE": str(tmp_path_factory.mktemp("cache"))}
    try:
        with environment(env):
            fs = gcsfs.GCSFileSystem(token="anon", project="test", skip_instance_cache=True)
            fs.mkdir("bkt")
            yield fs
    finally:
        server.stop()


@pytest.fixture(scope="module")
def local_run(synth_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local-run")
    preprocess("--src", synth_dir, "--out", out, *SETTINGS[:-2])
    return out


def test_store_to_store_on_gcs_equals_the_local_run(gcs, synth_dir, local_run, tmp_path):
    gcs.put(str(synth_dir) + "/", "bkt/raw/", recursive=True)
    preprocess("--src", "gs://bkt/raw", "--out", "gs://bkt/out", *SETTINGS)
    got = download(gcs, "gs://bkt/out", tmp_path / "got")
    assert digest(got) == digest(local_run) and len(digest(got)) >= 5
    names = {k.rsplit("/", 1)[-1] for k in gcs.find("bkt/out")}
    assert {"dataset_info.json", "SHA256SUMS"} <= names and ".drpipe.lease" not in names
    # a re-run has nothing to do; report stages the output back, verified
    r = subprocess.run([DRPIPE, "preprocess", "--src", "gs://bkt/raw", "--out", "gs://bkt/out",
                        *map(str, SETTINGS)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "already complete" in r.stdout, r.stderr
    r = subprocess.run([DRPIPE, "report", "--data", "gs://bkt/out", "--out",
                        str(tmp_path / "r.html"), "--storage-option", "token=anon"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "r.html").stat().st_size > 10_000


def test_kaggle_volumes_on_gcs_read_in_place(gcs, sample_dir, tmp_path):
    """Ranged reads across part boundaries through gcsfs: the bytes of the folder run."""
    parts = split_parts(make_zip(sample_dir, tmp_path / "train.zip"), tmp_path / "parts")
    shutil.copy(sample_dir / "trainLabels.csv", tmp_path / "parts")
    gcs.put(str(tmp_path / "parts") + "/", "bkt/kaggle/", recursive=True)
    assert len(parts) > 10
    preprocess("--src", sample_dir, "--out", tmp_path / "folder", *ARCHIVE_SETTINGS)
    preprocess("--src", "gs://bkt/kaggle", "--out", tmp_path / "out", *ARCHIVE_SETTINGS,
               "--storage-option", "token=anon")
    assert digest(tmp_path / "out") == digest(tmp_path / "folder")
