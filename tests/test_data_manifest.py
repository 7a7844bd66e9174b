"""The repository's data_manifest.csv is the manifest of the built-in demo dataset.

Regenerate it (README, "The demo manifest") with:
    drpipe synth --out raw && drpipe preprocess && cp shards/data_manifest.csv data_manifest.csv
"""

from __future__ import annotations

import csv
import io
import subprocess

from tests.conftest import ROOT
from tests.test_cli import DRPIPE

# What drpipe decides about each photo: compared exactly. The bytes of the demo photos
# (sha256, bytes) and so the shard cuts come from the installed JPEG encoder (OpenCV /
# Pillow, unpinned): a fresh install may encode them differently with no change in drpipe,
# so they are not compared; the fitted retina circle is compared within a tolerance.
DECIDED = ("image_id", "path", "patient_id", "eye", "label", "origin", "status", "reason",
           "split", "width", "height")
RETINA = ("retina_cx", "retina_cy", "retina_r")


def _rows(text: str) -> dict[tuple[str, str], dict]:
    return {(r["image_id"], r["path"]): r for r in csv.DictReader(io.StringIO(text))}


def drift(committed: str, fresh: str) -> list[str]:
    """Differences in what drpipe decided between two manifests (empty: none)."""
    want, got = _rows(committed), _rows(fresh)
    out = [f"rows only in the committed manifest: {sorted(want.keys() - got.keys())[:3]}"
           ] if want.keys() - got.keys() else []
    if got.keys() - want.keys():
        out.append(f"rows only in the fresh manifest: {sorted(got.keys() - want.keys())[:3]}")
    dup_ids = {k: bool(r["duplicate_of"]) for k, r in want.items()}
    for key in sorted(want.keys() & got.keys()):
        a, b = want[key], got[key]
        for c in DECIDED:
            if a[c] != b[c]:
                out.append(f"{key[0]}: {c} {a[c]!r} -> {b[c]!r}")
        if bool(b["duplicate_of"]) != dup_ids[key]:
            out.append(f"{key[0]}: duplicate_of {a['duplicate_of']!r} -> {b['duplicate_of']!r}")
        if a["shard"].split("-")[0] != b["shard"].split("-")[0]:
            out.append(f"{key[0]}: shard {a['shard']!r} -> {b['shard']!r}")
        if a["retina_r"]:
            tol = max(2.0, 0.01 * float(a["retina_r"]))
            for c in RETINA:
                if abs(float(a[c]) - float(b[c] or "nan")) > tol or not b[c]:
                    out.append(f"{key[0]}: {c} {a[c]} -> {b[c]} (tolerance {tol:.1f} px)")
    return out


def test_drift_compares_decisions_not_encoder_bytes():
    committed = (ROOT / "data_manifest.csv").read_text()
    rows = list(csv.reader(io.StringIO(committed)))
    header = rows[0]
    sha, size, r = header.index("sha256"), header.index("bytes"), header.index("retina_r")
    reencoded = [header] + [row[:sha] + ["0" * 64, str(int(row[size]) + 7)] + row[size + 1:]
                            for row in rows[1:]]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(reencoded)
    assert drift(committed, buf.getvalue()) == []  # another encoder: not a drift
    moved = [list(row) for row in reencoded]
    moved[1][header.index("split")] = "train" if moved[1][header.index("split")] != "train" \
        else "val"
    moved[2][r] = f"{float(moved[2][r]) + 20:.2f}"
    moved[3][header.index("status")] = "rejected"
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(moved)
    found = drift(committed, buf.getvalue())
    assert len(found) == 3 and "split" in found[0] and "retina_r" in found[1], found


def test_data_manifest_has_not_drifted(tmp_path):
    for cmd in (["synth", "--out", "raw", "--quiet"], ["preprocess", "--quiet"]):
        r = subprocess.run([DRPIPE, *cmd], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    fresh = (tmp_path / "shards/data_manifest.csv").read_text()
    committed = (ROOT / "data_manifest.csv").read_text()
    found = drift(committed, fresh)
    assert not found, ("data_manifest.csv drifted from the demo dataset; regenerate it (see "
                       "this file's docstring) if the change is intended:\n  "
                       + "\n  ".join(found[:5]))
    assert len(committed.splitlines()) == 201
