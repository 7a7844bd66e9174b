"""benchmarks/bench_ops.py --against / --steps: another copy of the repository timed side
by side with this one and the floor (issue 15, docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from tests.conftest import ROOT


def _run(src, tmp_path, *extra):
    out = tmp_path / "ops.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_ops.py"), "--src", str(src),
                        "--rounds", "1", "--no-tfds", "--json", str(out), *extra],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return r, out


def test_against_a_copy_side_by_side_with_steps(sample_photos, tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for p in (sample_photos[0], sample_photos[10], sample_photos[29]):  # 1/4, 1/2, 1/2 decodes
        (src / p.name).symlink_to(p)
    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "pipeline", copy / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    r, out = _run(src, tmp_path, "--against", str(copy), "--steps")
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["photos"] == 3 and res["dct_factors"] == {"2": 2, "4": 1}
    assert set(res["photos_per_s_one_core"]) == {"drpipe", "floor", "against"}
    a = res["against"]
    assert a["dir"] == str(copy)
    # The same code against itself: the per-photo ratio is about 1 (a loaded machine is noisy).
    assert 0.5 < a["median_per_photo_drpipe_cpu_over_against"] < 2.0, a
    assert res["median_per_photo_cpu_over_floor"] > 1.0  # more work than the bare decode
    steps = res["steps_ms_median_per_photo"]
    assert set(steps) == {"decode", "retina", "crop_shrink", "quality", "filter", "encode",
                          "process"}
    assert steps["process"] > steps["decode"] > max(v for k, v in steps.items()
                                                    if k not in ("decode", "process"))


def test_against_a_folder_without_the_pipeline_is_refused(sample_photos, tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    (src / sample_photos[0].name).symlink_to(sample_photos[0])
    (tmp_path / "empty").mkdir()
    r, _ = _run(src, tmp_path, "--against", str(tmp_path / "empty"))
    assert r.returncode != 0
    assert "pipeline" in r.stderr
