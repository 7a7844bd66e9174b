"""Shared helpers for the fault-injection suite."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.test_cli import DRPIPE

OUTPUTS = ("*.tfrecord", "data_manifest.csv", "manifest.parquet")


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


def drpipe(*args, timeout=300, user=None, check=False, **kw) -> subprocess.CompletedProcess:
    """Run the real CLI; ``user="nobody"`` runs it unprivileged (root ignores file modes)."""
    cmd = [DRPIPE, *map(str, args)]
    env = dict(os.environ)
    if user and os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        env["HOME"] = tempfile.gettempdir()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kw)
    if check and r.returncode:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r


def can_drop_privileges() -> bool:
    return os.geteuid() != 0 or shutil.which("setpriv") is not None


def shared_tmp() -> Path:
    """A temporary directory an unprivileged user can use too."""
    d = Path(tempfile.mkdtemp(prefix="drpipe-rel-"))
    d.chmod(0o777)
    return d


def digest(out: Path) -> dict[str, str]:
    files = sorted(p for pat in OUTPUTS for p in out.glob(pat))
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


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
