"""export and explain never replace what they did not write, and every write is checked
(issue 10, A1 and A5). A real tiny run, the real CLI."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import same_stem_folders, synth_shards
from tests.training.test_train import drpipe

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("outs")
    synth_shards(d, 24, 8, 64, "train=0.5,val=0.5", "--workers", 1, run=drpipe)
    r = drpipe("train", "--data", d / "shards", "--model", "cnn-small", "--image-size", 32,
               "--epochs", 1, "--batch-size", 8, "--out", d / "run", "--precise-bn", 0)
    (d / "train.stderr").write_text(r.stderr)
    return d


def test_train_prints_no_tensorflow_start_up_lines(made):
    err = (made / "train.stderr").read_text()
    for noise in ("absl::InitializeLog", "cudart_stub", "cuInit", "oneDNN"):
        assert noise not in err, err[:2000]


def _tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def test_export_refuses_a_folder_that_is_not_an_export(made, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("two years of work")
    r = drpipe("export", made / "run", "--format", "tflite", "--out", mine, check=False)
    assert r.returncode == 2 and "not an earlier drpipe export" in r.stderr, r.stderr
    assert (mine / "thesis.tex").read_text() == "two years of work"
    # --out . in a project folder: the working directory is never emptied
    before = _tree(made)
    r = drpipe("export", made / "run", "--out", ".", check=False, cwd=made)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert _tree(made) == before
    # a file too (e.g. a model someone else converted)
    other = tmp_path / "other.tflite"
    other.write_bytes(b"not ours")
    r = drpipe("export", made / "run", "--format", "tflite", "--out", other, check=False)
    assert r.returncode == 2 and other.read_bytes() == b"not ours"


@pytest.mark.slow  # two exports, ~50 s
def test_export_replaces_its_own_earlier_export(made, tmp_path):
    out = tmp_path / "m.tflite"
    drpipe("export", made / "run", "--format", "tflite", "--out", out)
    first = out.stat().st_mtime_ns
    drpipe("export", made / "run", "--format", "tflite", "--out", out)  # ours: replaced
    assert out.stat().st_mtime_ns > first and out.read_bytes()[4:8] == b"TFL3"


@pytest.mark.slow  # four TensorFlow starts, ~70 s
def test_explain_checks_every_write_and_never_collides(made, tmp_path):
    import cv2

    photos = sorted((made / "raw/train").glob("*.jpeg"))
    a, b = same_stem_folders(tmp_path, photos, "p")
    maps = tmp_path / "maps"
    maps.mkdir()
    (maps / "p_gradcam.png").write_bytes(b"a user's file")
    r = drpipe("explain", made / "run", a / "p.jpeg", b / "p.jpeg", "--out", maps)
    assert r.stdout.count(": grade ") == 2, r.stdout
    assert (maps / "p_gradcam.png").read_bytes() == b"a user's file"
    panels = [cv2.imread(str(p)) for p in sorted(maps.glob("p~*_gradcam.png"))]
    assert len(panels) == 2 and panels[0].shape == (32, 64, 3)
    assert panels[0].tobytes() != panels[1].tobytes()

    # --out x.jpg: one image file, not a folder
    r = drpipe("explain", made / "run", a / "p.jpeg", "--out", tmp_path / "x.jpg")
    assert (tmp_path / "x.jpg").is_file() and cv2.imread(str(tmp_path / "x.jpg")) is not None

    # a write that fails is an error, not a success: a missing folder, an over-long name
    r = drpipe("explain", made / "run", a / "p.jpeg", "--out", tmp_path / "no/such/x.png",
               check=False)
    assert r.returncode == 1 and "cannot write" in r.stderr and ": grade" not in r.stdout
    long = tmp_path / "long"
    long.mkdir()
    shutil.copy(photos[0], long / ("n" * 250 + ".jpeg"))
    r = drpipe("explain", made / "run", long, "--out", tmp_path / "maps2", check=False)
    assert r.returncode == 1 and "cannot write" in r.stderr, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
