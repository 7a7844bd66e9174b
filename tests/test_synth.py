"""The synthetic generator: layout, determinism, labels, and a learnable lesion signal."""

from __future__ import annotations

import csv
import hashlib

import numpy as np
import pytest

from pipeline.synth import plan, render, synth_dataset


def _digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (d / "train").iterdir()}


def test_layout_and_labels(synth_dir):
    rows = list(csv.DictReader(open(synth_dir / "trainLabels.csv")))
    assert len(rows) == 40 and set(rows[0]) == {"image", "level"}
    files = sorted(p.stem for p in (synth_dir / "train").glob("*.jpeg"))
    assert files == sorted(r["image"] for r in rows)
    patients = {}
    for r in rows:
        pid, eye = r["image"].split("_")
        patients.setdefault(pid, set()).add(eye)
        assert 0 <= int(r["level"]) <= 4
    assert all(eyes == {"left", "right"} for eyes in patients.values())


def test_deterministic_and_prefix_stable(tmp_path, synth_dir):
    a = synth_dataset(tmp_path / "a", n=40, seed=7)
    assert _digest(tmp_path / "a") == _digest(synth_dir)
    small = synth_dataset(tmp_path / "b", n=10, seed=7)
    big = _digest(tmp_path / "a")
    for name, h in _digest(tmp_path / "b").items():
        assert big[name] == h  # a photo depends on (seed, patient, eye) only
    assert [p.image for p in small] == [p.image for p in a[:10]]
    other = synth_dataset(tmp_path / "c", n=10, seed=8)
    assert _digest(tmp_path / "c") != _digest(tmp_path / "b")
    assert len(other) == 10


def test_odd_n_refused():
    with pytest.raises(ValueError, match="even"):
        plan(7)


def test_varied_geometry():
    photos = [render(pid, eye, 0, seed=1)[1] for pid in range(10, 60) for eye in ("left", "right")]
    assert len({(p.width, p.height) for p in photos}) >= 4
    assert sum(2 * p.r > p.height for p in photos) >= 20  # clipped top and bottom
    assert sum(abs(p.cx - p.width / 2) > 0.06 * p.width for p in photos) >= 3  # off-centre


def test_grade_mix_and_eye_disagreement():
    rows = plan(2000, seed=0)
    grades = np.bincount([g for _, _, g in rows], minlength=5) / len(rows)
    assert grades[0] > 0.3 and (grades > 0.05).all()
    by_patient = {}
    for pid, _, g in rows:
        by_patient.setdefault(pid, []).append(g)
    differ = np.mean([a != b for a, b in by_patient.values()])
    assert 0.05 < differ < 0.3


def test_lesion_signal_grows_with_grade():
    """Count dark-red and yellow blobs the way a model could: more lesions, higher grade."""
    import cv2

    def blobs(rgb):
        g = rgb[:, :, 1].astype(np.float32)
        bg = cv2.medianBlur(rgb[:, :, 1], 31).astype(np.float32)
        spots = (np.abs(g - bg) > 25).astype(np.uint8)
        n, _, stats, _ = cv2.connectedComponentsWithStats(spots)
        return int(((stats[1:, cv2.CC_STAT_AREA] > 12) & (stats[1:, cv2.CC_STAT_AREA] < 900)).sum())

    mean = [np.mean([blobs(render(pid, "left", g, seed=2)[0]) for pid in range(100, 106)])
            for g in range(5)]
    assert all(b > a for a, b in zip(mean, mean[1:], strict=False)), mean
