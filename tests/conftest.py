"""Shared fixtures. Real-photo tests read ../shared/data/eyepacs-sample from its own path
(competition data: never copied into the repository)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

# A shell's background job (`cmd &` without job control, as under nohup) starts with SIGINT
# ignored, and every process it starts inherits that: the Ctrl-C tests' drpipe would never
# see their SIGINT. A handler here is reset to the default in each child at exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("DRPIPE_SAMPLE", ROOT.parent / "shared/data/eyepacs-sample"))


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    if not (SAMPLE / "train").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"EyePACS sample missing at {SAMPLE} (CI must have ../shared)")
        pytest.skip(f"EyePACS sample not found at {SAMPLE}")
    return SAMPLE


@pytest.fixture(scope="session")
def sample_photos(sample_dir) -> list[Path]:
    photos = sorted((sample_dir / "train").glob("*.jpeg"))
    assert len(photos) == 31
    return photos


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from pipeline.synth import synth_dataset

    out = tmp_path_factory.mktemp("synth")
    synth_dataset(out, n=40, seed=7)
    return out


class DaskCluster:
    """A real `dask scheduler` and `dask worker` processes on 127.0.0.1, each in its own
    process group (so a test can kill one worker, nanny and all) and its own empty
    temporary cwd (so a path relative to the client's cwd finds nothing on a worker)."""

    def __init__(self, n_workers: int = 2, worker_args: tuple[str, ...] = ()):
        import shutil
        import socket
        import subprocess
        import sys
        import tempfile

        dask = shutil.which("dask") or str(Path(sys.executable).parent / "dask")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.address = f"tcp://127.0.0.1:{port}"
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL,
                 "start_new_session": True}
        self.scheduler = subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port",
                                           str(port), "--no-dashboard"], **quiet)
        # PYTHONPATH made absolute: a relative entry would not find drpipe from another cwd
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if p))
        self.cwds = [tempfile.mkdtemp(prefix=f"dask-worker-{i}-") for i in range(n_workers)]
        self.workers = [subprocess.Popen([dask, "worker", self.address, "--nthreads", "1",
                                          "--nworkers", "1", "--host", "127.0.0.1",
                                          "--no-dashboard", *worker_args], cwd=cwd, env=env,
                                         **quiet)
                        for cwd in self.cwds]

    def kill_worker(self, i: int) -> None:
        import signal

        os.killpg(self.workers[i].pid, signal.SIGKILL)

    def close(self) -> None:
        import shutil
        import signal

        for p in [*self.workers, self.scheduler]:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in [*self.workers, self.scheduler]:
            p.wait(timeout=30)
        for cwd in self.cwds:  # made by __init__ (what a worker wrote there too)
            shutil.rmtree(cwd, ignore_errors=True)


@pytest.fixture()
def dask_cluster():
    cluster = DaskCluster(2)
    try:
        yield cluster
    finally:
        cluster.close()
