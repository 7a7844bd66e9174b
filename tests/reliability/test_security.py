"""Security and robustness (issue 10, section C): markup in a report, symlinks out of
--src, spreadsheet formulas in CSV outputs, huge files. Real files, the real CLI."""

from __future__ import annotations

import csv
import html.parser
import json
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.helpers import synth_source
from tests.reliability.helpers import drpipe, manifest, no_traceback
from tfrecord_writer.info import load_info

ARGS = ["--workers", "1", "--size", "64", "--quiet"]
MARK = "\"'><i id=pwn>"  # breaks out of an attribute, then opens an element


raw = synth_source(n=12, seed=3, folder="sec-raw")


def _copy(raw: Path, to: Path) -> Path:
    shutil.copytree(raw, to, symlinks=True, ignore=shutil.ignore_patterns(".drpipe-*"))
    return to


def _label(src: Path, *rows: str) -> None:
    with open(src / "trainLabels.csv", "a", encoding="utf-8") as f:
        f.writelines(r + "\n" for r in rows)


# ------------------------------------------------------------------ C1: report


class _Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs


@pytest.mark.parametrize("scores", ["numbers", "markup"])
def test_report_escapes_markup_in_every_field(raw, tmp_path, scores):
    src = _copy(raw, tmp_path / "raw")
    photo = sorted((src / "train").glob("*.jpeg"))[0]
    marked = f"{MARK}_left"  # a photo id, kept in the records and the manifest
    shutil.copy(photo, src / "train" / f"{marked}.jpeg")
    (src / "train" / f"{MARK}bad_right.jpeg").write_bytes(b"<html>" + MARK.encode())
    _label(src, f"{marked},2", f"{MARK}bad_right,1")
    data = tmp_path / MARK.replace("/", "")  # the data folder's name reaches the title
    drpipe("preprocess", "--src", src, "--out", data, *ARGS, "--split", "train=1", check=True)
    run = tmp_path / f"run{MARK}"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(
        {k: MARK for k in ("model", "task", "augment", "freeze", "weights", "data")}))
    m = {"split": MARK, "n": MARK, "quadratic_kappa": MARK, "accuracy": MARK,
         "majority_baseline_accuracy": MARK, "auc": MARK, "sensitivity": MARK,
         "specificity": MARK, "confusion_matrix": [[1, 0], [0, 1]],
         "per_class": {k: [MARK] * 5 for k in ("precision", "recall", "f1", "support")}}
    if scores == "numbers":  # as evaluate writes them; only the split name is hostile
        m.update({k: 0.5 for k in ("quadratic_kappa", "accuracy", "majority_baseline_accuracy",
                                   "auc", "sensitivity", "specificity")}, n=10)
        m["per_class"] = {k: [0.5] * 5 for k in ("precision", "recall", "f1", "support")}
    (run / "metrics-x.json").write_text(json.dumps(m))  # dropped into a shared run folder
    (run / "metrics.json").write_text(json.dumps(dict(m, split="test")))
    out = tmp_path / "report.html"
    r = drpipe("report", "--data", data, "--run", run, "--out", out)
    assert r.returncode == 0, r.stderr
    page = out.read_text(encoding="utf-8")
    assert page.count("&lt;i id=pwn&gt;") >= (10 if scores == "markup" else 6)  # all arrived
    assert "<i id=pwn>" not in page
    p = _Tags()
    p.feed(page)
    assert "i" not in p.tags and ("id", "pwn") not in p.attrs  # no element, no attribute
    assert sum(MARK in (v or "") for _, v in p.attrs) >= 2  # whole values, in their quotes


# ------------------------------------------------------------------ C2: symlinks


def test_symlinks_leaving_the_source_are_rejected_unless_followed(raw, tmp_path):
    src = _copy(raw, tmp_path / "raw")
    outside = tmp_path / "elsewhere"
    (outside / "folder").mkdir(parents=True)
    photos = sorted((src / "train").glob("*.jpeg"))
    shutil.copy(photos[0], outside / "800_left.jpeg")
    shutil.copy(photos[1], outside / "folder" / "801_left.jpeg")
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    (src / "train" / "800_left.jpeg").symlink_to(outside / "800_left.jpeg")  # linked file
    (src / "train" / "linked").symlink_to(outside / "folder")  # linked folder
    (src / "train" / "802_left.jpeg").symlink_to(secret)  # /etc/passwd-like
    (src / "train" / "inside").symlink_to(src / "train")  # a loop, inside: harmless
    (src / "train" / "803_left.jpeg").symlink_to(photos[2])  # inside the source: read
    _label(src, "800_left,1", "801_left,2", "802_left,0", "803_left,3")

    out = tmp_path / "out"
    r = drpipe("preprocess", "--src", src, "--out", out, *ARGS)
    assert r.returncode == 0, r.stderr
    no_traceback(r)
    rows = manifest(out)
    for i in ("800_left", "801_left", "802_left"):
        assert rows[i]["status"] == "rejected", rows[i]
        assert rows[i]["reason"].startswith("outside_source:"), rows[i]
        assert rows[i]["sha256"] == "" and rows[i]["bytes"] == ""  # never read
    assert rows["801_left"]["path"] == "train/linked/801_left.jpeg"  # listed, not lost
    assert rows["803_left"]["status"] == "ok"
    info = load_info(out)
    assert info["summary"]["rejected_by_reason"]["outside_source"] == 3

    out2 = tmp_path / "out2"
    r = drpipe("preprocess", "--src", src, "--out", out2, *ARGS, "--follow-links")
    assert r.returncode == 0, r.stderr
    rows = manifest(out2)
    assert rows["800_left"]["status"] == rows["801_left"]["status"] == "ok"
    assert rows["802_left"]["reason"].startswith("not_an_image")  # read, judged as a photo


# ------------------------------------------------------------------ C3: CSV formulas

FORMULAS = ["=SUM(1)_left", "+1+cmd_left", "-2+3_left", "@SUM(A1)_left"]


def test_csv_outputs_neutralise_formulas(raw, tmp_path):
    src = _copy(raw, tmp_path / "raw")
    photo = sorted((src / "train").glob("*.jpeg"))[0]
    for i, name in enumerate(FORMULAS):
        shutil.copy(photo, src / "train" / f"{name}.jpeg")
        _label(src, f"{name},{i % 5}")
    out = tmp_path / "out"
    drpipe("preprocess", "--src", src, "--out", out, *ARGS, check=True)
    with open(out / "data_manifest.csv", newline="", encoding="utf-8") as f:
        cells = [c for row in csv.reader(f) for c in row]
    for cell in cells:
        if cell and cell[0] in "=+-@\t\r":
            float(cell)  # only numbers may start so
    ids = set(manifest(out))
    assert {"'" + n for n in FORMULAS} <= ids
    normal = {p.stem for p in (raw / "train").glob("*.jpeg")}
    assert normal <= ids  # ordinary ids unchanged
    exact = set(pq.read_table(out / "manifest.parquet").column("image_id").to_pylist())
    assert set(FORMULAS) <= exact  # the Parquet manifest keeps the true ids

    split_csv = tmp_path / "split.csv"
    drpipe("split", "--labels", src / "trainLabels.csv", "--out", split_csv, check=True)
    assert "'" + FORMULAS[0] in split_csv.read_text(encoding="utf-8")

    from training.predict import Prediction, write_csv

    preds = [Prediction(FORMULAS[0], "=cmd|' /C calc'!A0", "rejected", "@bad", None, None,
                        None, None),
             Prediction("\tx", "\tx.jpeg", "rejected", "-1", None, None, None, None),
             Prediction("10_left", "a/10_left.jpeg", "ok", "", 2, [0.1, 0.1, 0.6, 0.1, 0.1],
                        0.8, None)]
    write_csv(preds, tmp_path / "preds.csv")
    rows = list(csv.reader(open(tmp_path / "preds.csv", newline="", encoding="utf-8")))
    assert rows[1][:4] == ["'" + FORMULAS[0], "'=cmd|' /C calc'!A0", "rejected", "'@bad"]
    assert rows[2][:4] == ["'\tx", "'\tx.jpeg", "rejected", "-1"]  # -1: a number
    from pipeline.outputs import csv_cell

    assert csv_cell("\rx") == "'\rx" and csv_cell("-12.50") == "-12.50"
    assert rows[3][:5] == ["10_left", "a/10_left.jpeg", "ok", "", "2"]


# ------------------------------------------------------------------ C4: huge files


def test_a_huge_file_is_rejected_by_size_before_reading(raw, tmp_path):
    src = _copy(raw, tmp_path / "raw")
    photo = sorted((src / "train").glob("*.jpeg"))[0]
    huge = src / "train" / "900_left.jpeg"
    shutil.copy(photo, huge)
    with open(huge, "r+b") as f:  # a real JPEG padded to 1.5 GB (sparse: no disk used)
        f.truncate(1536 * 2**20)
    _label(src, "900_left,1")
    out = tmp_path / "out"
    t = time.time()
    r = drpipe("preprocess", "--src", src, "--out", out, *ARGS, "--summary-json",
               tmp_path / "s.json")
    assert r.returncode == 0, r.stderr
    rows = manifest(out)
    assert rows["900_left"]["reason"].startswith("too_large: file of 1536 MB"), rows["900_left"]
    assert rows["900_left"]["sha256"] == ""  # never read
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["ok"] == 12 and summary["peak_worker_rss_mb"] < 1000
    assert time.time() - t < 60
    # the limit is an option: a small one rejects the ordinary photos too
    out2 = tmp_path / "out2"
    r = drpipe("preprocess", "--src", raw, "--out", out2, *ARGS, "--max-file-mb", "0.01")
    # nothing usable is a failed run (exit 1), with the reasons in the manifest
    assert r.returncode == 1 and "too_large" in r.stderr, r.stderr
    assert {r["reason"].split(":")[0] for r in manifest(out2).values()} == {"too_large"}


def test_preview_rejects_a_huge_file_by_size(raw, tmp_path):
    photo = sorted((raw / "train").glob("*.jpeg"))[0]
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(photo, src / "a.jpeg")
    r = drpipe("preview", src, "--out", tmp_path / "p", "--max-file-mb", "0.001")
    assert r.returncode == 0 and "too_large" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow  # ~35 s: four worker deaths and restarts
def test_a_photo_that_kills_its_worker_is_isolated_and_rejected(raw, tmp_path):
    """Workers limited to 300 MB; one photo padded to 800 MB and allowed by --max-file-mb:
    reading it gets the worker killed (repeatedly: KilledWorker). The batch is retried photo
    by photo, that photo is rejected with the reason, the others are processed."""
    from tests.conftest import DaskCluster

    src = _copy(raw, tmp_path / "raw")
    huge = src / "train" / "900_left.jpeg"
    shutil.copy(sorted((src / "train").glob("*.jpeg"))[0], huge)
    with open(huge, "r+b") as f:
        f.truncate(800 * 2**20)
    _label(src, "900_left,1")
    cluster = DaskCluster(1, ("--memory-limit", "300MB"))
    try:
        out = tmp_path / "out"
        r = drpipe("preprocess", "--src", src, "--out", out, "--size", "64", "--quiet",
                   "--scheduler", cluster.address, "--max-file-mb", "4096", timeout=600)
    finally:
        cluster.close()
    assert r.returncode == 0, r.stderr[-2000:]
    no_traceback(r)
    rows = manifest(out)
    assert rows["900_left"]["status"] == "rejected"
    assert rows["900_left"]["reason"].startswith("worker_died:"), rows["900_left"]
    assert sum(row["status"] == "ok" for row in rows.values()) == 12
