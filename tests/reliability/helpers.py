"""Shared helpers for the fault-injection suite (and, from tests/helpers.py, the ones every
suite uses)."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.helpers import DRPIPE, OUTPUTS, digest, drpipe  # noqa: F401 - re-exported


def start(*args) -> subprocess.Popen:
    """``drpipe ARGS`` in its own process group (so a kill takes its children too)."""
    return subprocess.Popen([DRPIPE, *map(str, args)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_when(proc: subprocess.Popen, condition, timeout: float = 300) -> bool:
    """SIGKILL ``proc``'s process group as soon as ``condition()`` holds; True if it did,
    False if the process ended or the time ran out first (it is killed then too)."""
    deadline = time.time() + timeout
    met = False
    while time.time() < deadline and proc.poll() is None:
        if condition():
            met = True
            break
        time.sleep(0.005)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return met


def can_drop_privileges() -> bool:
    return os.geteuid() != 0 or shutil.which("setpriv") is not None


def shared_tmp() -> Path:
    """A temporary directory an unprivileged user can use too."""
    d = Path(tempfile.mkdtemp(prefix="drpipe-rel-"))
    d.chmod(0o777)
    return d


def manifest(out: Path) -> dict[str, dict]:
    return {r["image_id"]: r for r in csv.DictReader(open(out / "data_manifest.csv",
                                                           encoding="utf-8"))}


def no_traceback(r: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-2000:]


def committed_shards_whole(out: Path) -> None:
    """Every file with a final shard name parses completely (CRCs checked)."""
    from tfrecord_writer.example import read_records

    for p in out.glob("*.tfrecord"):
        read_records(p)
