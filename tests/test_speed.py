"""Issue 15's changes keep their promises: the cheap shrink does not alias, does not move the
image, and the job reports the cluster's start-up apart from processing."""

from __future__ import annotations

import json
import subprocess

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.retina import shrink
from tests.test_cli import DRPIPE


def _grating(n: int, period: float) -> np.ndarray:
    g = 128 + 100 * np.sin(2 * np.pi * np.arange(n) / period)
    return np.ascontiguousarray(np.repeat(np.repeat(g[None], n, 0)[..., None], 3, 2)
                                .round().astype(np.uint8))


@pytest.mark.parametrize("n", [640, 768, 1080])  # ratios 1.25, 1.5, 2.1: what 1/4 decodes give
def test_shrink_aliases_less_than_area_and_keeps_the_passband(n):
    r = n / 512
    beyond = _grating(n, r * 1.6)  # 1.6 output pixels per cycle: must vanish, not fold back
    passband = _grating(n, r * 8)  # 8 output pixels per cycle: must survive
    ours = [shrink(g, r, (512, 512))[:, 20:-20, 1].std() for g in (beyond, passband)]
    area = [cv2.resize(g, (512, 512), interpolation=cv2.INTER_AREA)[:, 20:-20, 1].std()
            for g in (beyond, passband)]
    assert ours[0] <= area[0] + 0.5, (ours, area)
    assert ours[1] >= 0.9 * 70.7, ours  # amplitude 100 -> std 70.7


def test_shrink_of_a_real_crop_is_close_to_a_high_quality_resize(sample_photos):
    from pipeline import decode as dec

    data = sample_photos[3].read_bytes()
    info = dec.read_info(data)
    img = dec.decode(data, info, dec.choose_dct_factor(min(info.width, info.height), 512))
    side = min(img.shape[:2])
    sq = np.ascontiguousarray(img[:side, :side])
    ref = np.asarray(Image.fromarray(sq).resize((512, 512), Image.LANCZOS)).astype(float)
    ours = shrink(sq, side / 512, (512, 512)).astype(float)
    area = cv2.resize(sq, (512, 512), interpolation=cv2.INTER_AREA).astype(float)
    # Not shifted (a half-pixel shift alone costs several grey levels at vessel edges), and
    # about as far from Lanczos as OpenCV's area average is.
    assert np.abs(ours - ref).mean() < 0.6
    assert np.abs(ours - ref).mean() < 2 * np.abs(area - ref).mean() + 0.1
    cy_ref = np.average(np.arange(512), weights=ref[..., 0].sum(axis=1))
    cy_ours = np.average(np.arange(512), weights=ours[..., 0].sum(axis=1))
    assert abs(cy_ref - cy_ours) < 0.1


def test_summary_times_cluster_start_apart(synth_dir, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([DRPIPE, "preprocess", "--quiet", "--src", str(synth_dir), "--out",
                        str(out), "--workers", "1", "--size", "64", "--limit", "8",
                        "--summary-json", str(tmp_path / "s.json")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    t = json.loads((tmp_path / "s.json").read_text())["timings"]
    assert t["cluster_start_s"] > 0.1  # starting processes is never free
    parts = t["setup_s"] + t["cluster_start_s"] + t["process_s"] + t["shards_and_manifest_s"]
    assert abs(parts - t["total_s"]) < 0.05
