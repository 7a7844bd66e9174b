"""drpipe report: one self-contained HTML page, rendered in a real headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.training.test_train import drpipe
from tfrecord_writer.info import load_info

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# .ci/run installs Debian's chromium and sets DRPIPE_REQUIRE_BROWSER=1: there a missing
# browser fails the test instead of skipping it.
BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome")
                if shutil.which(b)), None)


@pytest.fixture(scope="module")
def browser() -> str:
    if BROWSER is None:
        if os.environ.get("DRPIPE_REQUIRE_BROWSER"):
            pytest.fail("no chromium on PATH (apt-get install chromium)")
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    return BROWSER


def chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    # The flags of a closed machine: no background networking, no first-run work.
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120, check=True)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """60 synthetic photos plus two broken files, shards, a short run evaluated on test."""
    d = tmp_path_factory.mktemp("report")
    drpipe("synth", "--out", d / "raw", "--n", 60, "--seed", 5, "--quiet")
    (d / "raw/train/900_left.jpeg").write_bytes(b"<html>Not Found</html>")
    photo = sorted((d / "raw/train").glob("*_right.jpeg"))[0].read_bytes()
    (d / "raw/train/900_right.jpeg").write_bytes(photo[: len(photo) // 2])
    with open(d / "raw/trainLabels.csv", "a") as f:
        f.write("900_left,1\n900_right,1\n")
    drpipe("preprocess", "--src", d / "raw", "--out", d / "shards", "--size", 64,
           "--workers", 1, "--quiet")
    drpipe("train", "--data", d / "shards", "--model", "cnn-small", "--image-size", 64,
           "--epochs", 2, "--batch-size", 8, "--out", d / "run")
    drpipe("evaluate", d / "run", "--split", "test")
    drpipe("report", "--run", d / "run", "--out", d / "report.html")
    return d


def test_report_is_self_contained(made):
    page = (made / "report.html").read_text(encoding="utf-8")
    # nothing to fetch: every src is inline, no stylesheet or script links
    srcs = re.findall(r'src="([^"]+)"', page)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert "<link" not in page and "<script" not in page and "http://" not in page
    assert "not_an_image" in page and "truncated" in page  # rejection reasons, by name
    counts = load_info(made / "shards")["counts"]
    per_grade = [sum(c[g] for c in counts.values()) for g in range(5)]
    assert page.count('class="example"') == sum(min(8, n) for n in per_grade) > 20
    for fig in ("fig-grades", "fig-rejections", "fig-curves-0", "fig-confusion-0-val",
                "fig-confusion-0-test"):
        assert f'id="{fig}"' in page, fig


def test_report_renders_in_headless_chromium(made, browser, tmp_path):
    """Chromium loads the page: every image decodes, every figure has a height, and the
    screenshot is a page of charts and photos, not a blank."""
    import cv2

    page = (made / "report.html").read_text(encoding="utf-8")
    probe = ("<script>window.addEventListener('load',()=>{const im=[...document.images];"
             "document.body.dataset.images=im.length;"
             "document.body.dataset.decoded=im.filter(i=>i.complete&&i.naturalWidth>0).length;"
             "document.body.dataset.figures=[...document.querySelectorAll('figure')]"
             ".filter(f=>f.getBoundingClientRect().height>50).map(f=>f.id).join(' ');});"
             "</script>")
    (tmp_path / "probe.html").write_text(page.replace("</body>", probe + "</body>"))
    dom = chromium(browser, tmp_path / "profile", "--virtual-time-budget=5000",
                   "--dump-dom", (tmp_path / "probe.html").as_uri()).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', body))
    assert int(attrs["images"]) >= 20 and attrs["decoded"] == attrs["images"], attrs
    assert set(attrs["figures"].split()) == {
        "fig-grades", "fig-rejections", "fig-quality", "fig-curves-0", "fig-confusion-0-val",
        "fig-confusion-0-test"}, attrs

    shot = tmp_path / "shot.png"
    chromium(browser, tmp_path / "profile2", "--window-size=1280,2400",
             f"--screenshot={shot}", (made / "report.html").as_uri())
    img = cv2.imread(str(shot))
    assert img is not None and img.shape[:2] == (2400, 1280)
    assert img.std() > 30  # not blank
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    colourful = (hsv[..., 1] > 120) & (hsv[..., 2] > 80)
    assert colourful.mean() > 0.005  # the coloured grade charts are drawn
    dark = (img.max(axis=2) < 60).mean()
    assert dark > 0.005  # text and photos


def test_report_errors(tmp_path):
    r = drpipe("report", "--data", tmp_path, "--out", tmp_path / "r.html", check=False)
    assert r.returncode == 2 and "no drpipe shards here" in r.stderr
    assert not (tmp_path / "r.html").exists()
