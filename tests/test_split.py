"""Patient-safe stratified splits, at Kaggle scale and on tiny data."""

from __future__ import annotations

import csv
import subprocess

import numpy as np
import pytest

from pipeline.sources import read_labels
from pipeline.split import assign_splits, parse_split_spec

PISA_VAL = np.array([2580, 244, 529, 87, 70])  # the Pisa report's 90/10 validation set


@pytest.fixture(scope="module")
def kaggle_rows(sample_dir):
    rows = read_labels(sample_dir.parent / "eyepacs-labels/trainLabels.csv", "image", "level")
    return [(r.image_id, r.patient_id, r.label) for r in rows]


def _counts(rows, assignment, split):
    return np.bincount([g for i, _, g in rows if assignment[i] == split], minlength=5)


def _no_patient_split(rows, assignment):
    seen = {}
    for image_id, patient, _ in rows:
        assert seen.setdefault(patient, assignment[image_id]) == assignment[image_id], patient


def test_kaggle_90_10_matches_pisa_within_5_percent(kaggle_rows):
    # The real label distribution: 17,563 patients, eyes differing for 2,240 of them.
    patients = {}
    for _, p, g in kaggle_rows:
        patients.setdefault(p, set()).add(g)
    assert len(patients) == 17563 and sum(len(v) > 1 for v in patients.values()) == 2240
    a = assign_splits(kaggle_rows, {"train": 0.9, "val": 0.1}, seed=0)
    val = _counts(kaggle_rows, a, "val")
    assert (np.abs(val - PISA_VAL) <= 0.05 * PISA_VAL).all(), val
    _no_patient_split(kaggle_rows, a)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kaggle_80_10_10_within_one_point(kaggle_rows, seed):
    ratios = {"train": 0.8, "val": 0.1, "test": 0.1}
    a = assign_splits(kaggle_rows, ratios, seed)
    whole = np.bincount([g for _, _, g in kaggle_rows], minlength=5) / len(kaggle_rows)
    for s, f in ratios.items():
        c = _counts(kaggle_rows, a, s)
        assert abs(c.sum() / len(kaggle_rows) - f) < 0.005
        assert (np.abs(c / c.sum() - whole) < 0.01).all(), (s, c)
    _no_patient_split(kaggle_rows, a)


def test_deterministic_and_seed_dependent(kaggle_rows):
    r = kaggle_rows[:4000]
    a = assign_splits(r, {"train": 0.8, "val": 0.2}, seed=5)
    assert a == assign_splits(list(reversed(r)), {"train": 0.8, "val": 0.2}, seed=5)
    assert a != assign_splits(r, {"train": 0.8, "val": 0.2}, seed=6)


def test_tiny_data_within_one_patient():
    rows = []
    for p in range(20):
        g = [0, 0, 0, 1, 2, 2, 3, 4][p % 8]
        rows += [(f"{p}_left", str(p), g), (f"{p}_right", str(p), g)]
    ratios = {"train": 0.8, "val": 0.1, "test": 0.1}
    a = assign_splits(rows, ratios, seed=0)
    total = np.bincount([g for _, _, g in rows], minlength=5)
    for s, f in ratios.items():
        c = _counts(rows, a, s)
        # Eyes come in pairs: a split can only be within one patient (2 photos) of target.
        assert (np.abs(c - f * total) <= 2).all(), (s, c, f * total)
    _no_patient_split(rows, a)


@pytest.mark.parametrize("spec,err", [
    ("train=0.8,val=0.3", "sum to 1.1"),
    ("train=0.8,val", "expected NAME=FRACTION"),
    ("Train=1", "lower-case"),
    ("train=x", "not a number"),
    ("train=0.5,train=0.5", "given twice"),
])
def test_bad_split_specs(spec, err):
    with pytest.raises(ValueError, match=err):
        parse_split_spec(spec)


def test_split_spec_percentages():
    assert parse_split_spec("train=90, val=10") == {"train": 0.9, "val": 0.1}


def test_split_cli_on_real_labels(tmp_path, sample_dir, kaggle_rows):
    from tests.test_cli import DRPIPE

    out = tmp_path / "split.csv"
    labels = sample_dir.parent / "eyepacs-labels/trainLabels.csv"
    r = subprocess.run([DRPIPE, "split", "--labels", labels, "--split", "train=0.9,val=0.1",
                        "--seed", "0", "--out", out], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "35125 photos of 17563 patients" in r.stdout
    rows = list(csv.DictReader(open(out)))
    assert set(rows[0]) == {"image", "patient_id", "eye", "label", "split"}
    a = {row["image"]: row["split"] for row in rows}
    assert a == assign_splits(kaggle_rows, {"train": 0.9, "val": 0.1}, seed=0)


def test_split_cli_bad_label_exit_3(tmp_path):
    from tests.test_cli import DRPIPE

    f = tmp_path / "l.csv"
    f.write_text("image,level\n1_left,0\n1_right,7\n")
    r = subprocess.run([DRPIPE, "split", "--labels", f, "--out", tmp_path / "o.csv"],
                       capture_output=True, text=True)
    assert r.returncode == 3
    assert r.stderr.strip() == (f"drpipe: error: {f}: line 3: level '7' for '1_right' "
                                "is not a grade 0-4")


def test_plan_split_replaces_only_an_earlier_plan(tmp_path, sample_dir):
    """Re-planning over an earlier plan replaces it (it crashed with an internal error on a
    tuple of --labels); a labels file is never replaced, even when it holds a plan's header."""
    from pipeline.split import PLAN_HEADER, NotAPlan, plan_split

    labels = sample_dir / "trainLabels.csv"
    out = tmp_path / "plan.csv"
    first = plan_split([labels], {"train": 0.8, "val": 0.1, "test": 0.1}, 0, out)
    assert [r[-1] for r in csv.reader(open(out))][1:] == [
        first.assignment[r.image_id] for r in sorted(first.rows, key=lambda r: r.image_id)]
    second = plan_split([labels], {"a": 0.5, "b": 0.5}, 1, out)
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 31 and {r["split"] for r in rows} == {"a", "b"}
    assert second.lines()[0] == f"31 photos of 18 patients -> {out}"
    assert second.lines()[-1].startswith("     all:     31 photos, grades 0-4: 10 / 5 / 5 / 6 / 5")
    own = tmp_path / "own.csv"  # a plan-shaped labels file given as its own --out
    own.write_text(",".join(PLAN_HEADER) + "\n1_left,1,left,0,train\n")
    before = own.read_bytes()
    with pytest.raises(NotAPlan, match="is not a drpipe split plan"):
        plan_split([own], {"train": 1.0}, 0, own, label_col="label")
    assert own.read_bytes() == before
