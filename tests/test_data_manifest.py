"""The repository's data_manifest.csv is the manifest of the built-in demo dataset.

Regenerate it (README, "The demo manifest") with:
    drpipe synth --out raw && drpipe preprocess && cp shards/data_manifest.csv data_manifest.csv
"""

from __future__ import annotations

import subprocess

from tests.conftest import ROOT
from tests.test_cli import DRPIPE


def test_data_manifest_has_not_drifted(tmp_path):
    for cmd in (["synth", "--out", "raw", "--quiet"], ["preprocess", "--quiet"]):
        r = subprocess.run([DRPIPE, *cmd], cwd=tmp_path, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    fresh = (tmp_path / "shards/data_manifest.csv").read_text()
    committed = (ROOT / "data_manifest.csv").read_text()
    if fresh != committed:
        diff = [f"  committed: {a}\n  now:       {b}" for a, b in zip(
            committed.splitlines(), fresh.splitlines(), strict=False) if a != b][:3]
        raise AssertionError("data_manifest.csv drifted from the demo dataset; regenerate it "
                             "(see this file's docstring) if the change is intended:\n"
                             + "\n".join(diff))
    assert len(committed.splitlines()) == 201
