"""The command line as a user runs it: the installed ``drpipe`` script, in a subprocess."""

from __future__ import annotations

import subprocess

import cv2
import numpy as np
import pytest

from tests.helpers import DRPIPE


def run(*args, check=True):
    r = subprocess.run([DRPIPE, *map(str, args)], capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"drpipe {args} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def test_help_lists_commands():
    out = run("--help").stdout
    assert "synth" in out and "preview" in out
    assert "--filter" in run("preview", "--help").stdout


def test_synth_then_preview(tmp_path, sample_photos):
    run("synth", "--out", tmp_path / "raw", "--n", "6", "--seed", "1", "--quiet")
    assert len(list((tmp_path / "raw/train").glob("*.jpeg"))) == 6
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/404_left.jpeg").write_text("<html><body>Not Found</body></html>")
    (tmp_path / "bad/empty_right.jpeg").write_bytes(b"")
    r = run("preview", tmp_path / "raw/train", tmp_path / "bad", sample_photos[0],
            "--out", tmp_path / "prev", "--size", "256", "--filter", "graham+clahe")
    assert "processed 7 of 9" in r.stdout
    assert "404_left.jpeg: not_an_image" in r.stdout
    assert "empty_right.jpeg: empty" in r.stdout
    outs = sorted(p.name for p in (tmp_path / "prev").glob("*.jpeg"))
    assert "contact_sheet.jpeg" in outs and f"{sample_photos[0].stem}.jpeg" in outs
    assert len(outs) == 8
    one = cv2.imread(str(tmp_path / "prev" / f"{sample_photos[0].stem}.jpeg"))
    assert one.shape == (256, 256, 3)
    sheet = cv2.imread(str(tmp_path / "prev/contact_sheet.jpeg"))
    assert sheet.shape[1] == 3 * 512 and sheet.shape[0] >= 3 * 256
    assert sheet.std() > 20  # not blank


def test_size_limits_are_options(tmp_path, sample_photos):
    """--max-megapixels and --min-side reach the header check: the real photos (2-16 MP)
    are refused as too_large under a 1 MP limit, the synthetic ones (under 1,200 px) as
    too_small under a 2,000 px minimum; the defaults let both through."""
    from pipeline.decode import read_info

    big = [p for p in sample_photos if read_info(p.read_bytes()).width
           * read_info(p.read_bytes()).height > 1e6][:2]
    assert len(big) == 2
    r = run("preview", *big, "--out", tmp_path / "a", "--max-megapixels", 1)
    assert "processed 0 of 2" in r.stdout and r.stdout.count(": too_large") == 2
    run("synth", "--out", tmp_path / "raw", "--n", "2", "--seed", "1", "--quiet")
    r = run("preview", tmp_path / "raw/train", "--out", tmp_path / "b", "--min-side", 2000)
    assert "processed 0 of 2" in r.stdout and r.stdout.count(": too_small") == 2
    r = run("preview", tmp_path / "raw/train", *big, "--out", tmp_path / "c")
    assert "processed 4 of 4" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (("preview", "nonexistent.jpeg", "--out", "x"), "does not exist"),
    (("preview", ".", "--out", "x", "--filter", "sharpen"), "unknown filter 'sharpen'"),
    (("synth", "--out", "x", "--n", "7"), "must be even"),
])
def test_user_mistakes_are_one_line_exit_2(tmp_path, args, needle):
    r = subprocess.run([DRPIPE, *args], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_preview_empty_folder_is_usage_error(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run("preview", tmp_path / "empty", "--out", tmp_path / "o", check=False)
    assert r.returncode == 2 and "no photos found" in r.stderr


def test_version():
    assert run("--version").stdout.startswith("drpipe, version")


def test_preview_output_matches_library(tmp_path, sample_photos):
    from pipeline.process import ProcessConfig, prepare

    run("preview", sample_photos[5], "--out", tmp_path, "--size", "128", "--filter", "none")
    got = cv2.cvtColor(cv2.imread(str(tmp_path / f"{sample_photos[5].stem}.jpeg")),
                       cv2.COLOR_BGR2RGB).astype(int)
    want = prepare(sample_photos[5].read_bytes(), ProcessConfig(size=128, filter="none")).image
    assert np.abs(got - want).mean() < 3
