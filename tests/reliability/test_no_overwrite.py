"""Every output drpipe writes to a named file or folder refuses (exit 2) an existing one it
did not write: checked before any model loads, so no trained run is needed here."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.helpers import synth_source
from tests.reliability.helpers import drpipe, no_traceback

ARGS = ["--workers", "1", "--size", "64", "--shard-size", "0.02", "--quiet"]


raw = synth_source(n=12, seed=3, folder="nov-raw")


def _refused(r, path: Path, before: bytes, code: int = 2) -> None:
    no_traceback(r)
    assert r.returncode == code, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1, r.stderr
    assert path.read_bytes() == before


def test_explain_never_replaces_an_existing_file(raw, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_bytes(b"not loaded")  # refused before the model loads
    photo = sorted((raw / "train").iterdir())[0]
    before = photo.read_bytes()
    r = drpipe("explain", run, photo, "--out", photo)
    _refused(r, photo, before)
    assert "explain never replaces a file" in r.stderr


def test_summary_json_only_over_an_earlier_summary(raw, tmp_path):
    labels = raw / "trainLabels.csv"
    before = labels.read_bytes()
    r = drpipe("preprocess", "--src", raw, "--out", tmp_path / "s", *ARGS,
               "--summary-json", labels)
    _refused(r, labels, before)
    assert not (tmp_path / "s").exists()  # refused before anything is written
    mine = tmp_path / "mine.json"
    mine.write_text('{"photos": 3}')
    r = drpipe("preprocess", "--src", raw, "--out", tmp_path / "s", *ARGS, "--summary-json", mine)
    _refused(r, mine, b'{"photos": 3}')
    assert "not a drpipe summary JSON" in r.stderr
    ours = tmp_path / "summary.json"
    drpipe("preprocess", "--src", raw, "--out", tmp_path / "s", *ARGS, "--summary-json", ours,
           check=True)
    assert json.loads(ours.read_text())["photos"] == 12
    ours.write_text(ours.read_text().replace('"photos": 12', '"photos": 99'))
    drpipe("preprocess", "--src", raw, "--out", tmp_path / "s", *ARGS, "--summary-json", ours,
           check=True)  # an earlier summary is replaced
    assert json.loads(ours.read_text())["photos"] == 12


def test_predict_and_report_only_over_their_own_files(raw, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    labels = raw / "trainLabels.csv"
    before = labels.read_bytes()
    r = drpipe("predict", run, "--src", raw / "train", "--out", labels)
    _refused(r, labels, before)
    assert "not a drpipe predictions CSV" in r.stderr
    page = tmp_path / "mine.html"
    page.write_text("<html><title>my notes</title></html>")
    r = drpipe("report", "--data", tmp_path / "none", "--out", page)
    _refused(r, page, b"<html><title>my notes</title></html>")
    assert "not a drpipe report" in r.stderr
    page.write_text("<!DOCTYPE html>\n<html><head><title>drpipe report: x</title>")
    r = drpipe("report", "--data", tmp_path / "none", "--out", page)  # ours: only --data fails
    assert r.returncode != 0 and "not a drpipe report" not in r.stderr and "none" in r.stderr


def test_tune_and_ensemble_refuse_a_folder_of_other_files(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.csv").write_text("my table")
    r = drpipe("tune", "--data", tmp_path / "none", "--out", mine)
    _refused(r, mine / "summary.csv", b"my table")
    assert "not a tuning directory" in r.stderr
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    r = drpipe("ensemble", a, b, "--out", mine)
    _refused(r, mine / "summary.csv", b"my table")
    assert "not an earlier ensemble output" in r.stderr


def test_export_never_replaces_a_users_sidecar(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    ex = tmp_path / "ex2"
    ex.mkdir()
    (ex / "m.export.json").write_text("{}")
    r = drpipe("export", run, "--format", "tflite", "--out", ex / "m.tflite")
    _refused(r, ex / "m.export.json", b"{}")
    assert not (ex / "m.tflite").exists()


def test_preprocess_drpipe_named_files_without_state_are_foreign(raw, tmp_path):
    out = tmp_path / "out"
    (out / ".staging").mkdir(parents=True)
    files = {"data_manifest.csv": b"my table", "features.json": b"{}",
             "dataset_info.json": b"{}", "metadata.json": b"{}"}
    for name, data in files.items():
        (out / name).write_bytes(data)
    for extra in ([], ["--overwrite"]):
        r = drpipe("preprocess", "--src", raw, "--out", out, *ARGS, *extra)
        no_traceback(r)
        assert r.returncode == 1 and "not a drpipe output" in r.stderr, r.stderr
        assert {n: (out / n).read_bytes() for n in files} == files
        assert (out / ".staging").is_dir()
        assert sorted(p.name for p in out.iterdir()) == sorted([*files, ".staging"])


def test_a_ctrl_c_while_the_cluster_starts_is_not_lost():
    code = textwrap.dedent("""
        import sys
        import time
        import distributed  # imported first: the signal falls in the LocalCluster window
        from pipeline.job import RunOptions, _start_client
        start = distributed.LocalCluster.__init__

        def slow_start(self, *a, **kw):  # the window, made certain on a fast machine
            print("window", flush=True)
            time.sleep(1.0)
            start(self, *a, **kw)

        distributed.LocalCluster.__init__ = slow_start
        print("start", flush=True)
        try:
            client, cluster = _start_client(RunOptions(workers=1))
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        else:
            print("continued", flush=True)
            sys.exit(0)
        import signal
        distributed.LocalCluster.__init__ = start
        client, cluster = _start_client(RunOptions(workers=1))  # workers ignore Ctrl-C
        print(set(client.run(lambda: signal.getsignal(signal.SIGINT)).values()), flush=True)
        client.close(); cluster.close()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "start"
    assert p.stdout.readline().strip() == "window"  # inside LocalCluster(...), SIGINT held
    import os
    import signal

    os.kill(p.pid, signal.SIGINT)
    out, _ = p.communicate(timeout=120)
    assert out.split() == ["interrupted", "{<Handlers.SIG_IGN:", "1>}"], out
