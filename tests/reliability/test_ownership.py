"""No command deletes or overwrites a file it did not create (issue 10, section A).

Each test puts a user's file where drpipe writes, runs the real command, and checks the
file's bytes afterwards (and the one-line refusal where drpipe refuses)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from tests.helpers import same_stem_folders, synth_source
from tests.reliability.helpers import digest, drpipe, no_traceback

ARGS = ["--workers", "1", "--size", "64", "--shard-size", "0.02", "--quiet"]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


raw = synth_source(n=24, seed=5, folder="own-raw")


@pytest.fixture(scope="module")
def done(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("own-done") / "shards"
    drpipe("preprocess", "--src", raw, "--out", out, *ARGS, check=True)
    assert len(list(out.glob("*.tfrecord"))) >= 3
    return out


# ------------------------------------------------------------------ preprocess (A4)


def test_preprocess_overwrite_keeps_a_users_tmp_file(raw, done, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(done, out)
    (out / "notes.tmp").write_text("my notes")
    (out / "train.tmp").write_text("mine too")
    r = drpipe("preprocess", "--src", raw, "--out", out, *ARGS, "--size", "48", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (out / "notes.tmp").read_text() == "my notes"
    assert (out / "train.tmp").read_text() == "mine too"


def test_preprocess_refuses_a_shard_it_did_not_write(raw, done, tmp_path):
    # Another dataset's shard, under a name this run would use, in an otherwise empty --out.
    foreign = sorted(done.glob("train-*.tfrecord"))[0]
    out = tmp_path / "shards"
    out.mkdir()
    shutil.copy(foreign, out / foreign.name)
    before = _sha(out / foreign.name)
    r = drpipe("preprocess", "--src", raw, "--out", out, *ARGS, "--size", "48")
    no_traceback(r)
    assert r.returncode == 1 and "no drpipe run recorded writing here" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1
    assert _sha(out / foreign.name) == before and not (out / "dataset_info.json").exists()
    # --overwrite replaces drpipe's output, never a file drpipe did not write
    r = drpipe("preprocess", "--src", raw, "--out", out, *ARGS, "--overwrite")
    assert r.returncode == 1 and _sha(out / foreign.name) == before


def test_preprocess_refuses_a_stray_shard_beside_a_finished_run(raw, done, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(done, out)
    stray = out / "train-00007-of-00009.tfrecord"  # would be globbed with the dataset
    shutil.copy(sorted(done.glob("val-*.tfrecord"))[0], stray)
    r = drpipe("preprocess", "--src", raw, "--out", out, *ARGS, "--size", "48", "--overwrite")
    assert r.returncode == 1 and stray.name in r.stderr, r.stderr
    assert stray.exists() and digest(out) == {**digest(done), stray.name: _sha(stray)}


def test_resume_rewrites_a_recorded_shard_whose_bytes_changed(raw, done, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(done, out)
    (out / "dataset_info.json").unlink()  # an interrupted run, shards written
    shards = sorted(out.glob("train-*.tfrecord"))
    shards[0].write_bytes(shards[1].read_bytes())  # changed behind drpipe's back
    r = drpipe("preprocess", "--src", raw, "--out", out, *ARGS)
    assert r.returncode == 0, r.stderr
    assert digest(out) == digest(done)


def test_temporaries_are_drpipe_names(raw, tmp_path):
    from tfrecord_writer.writer import remove_temporaries, temporary_name

    (tmp_path / "notes.tmp").write_text("mine")
    ours = temporary_name(tmp_path / "train-00000-of-00001.tfrecord")
    ours.write_bytes(b"half")
    assert ours.name.startswith(".") and ours.name.endswith(".drpipe.tmp")
    assert remove_temporaries(tmp_path) == 1
    assert (tmp_path / "notes.tmp").read_text() == "mine" and not ours.exists()


# ------------------------------------------------------------------ preview (A2)


def test_preview_never_replaces_an_input_or_another_output(raw, tmp_path):
    photos = sorted((raw / "train").glob("*.jpeg"))
    a, b = same_stem_folders(tmp_path, photos, "10_left")
    shutil.copy(photos[2], a / "contact_sheet.jpeg")  # a photo named like the sheet
    originals = {p: _sha(p) for p in [*a.iterdir(), *b.iterdir()]}

    # --out = a source folder (or inside one): refused, the photographs untouched
    for out in (a, a / "sub"):
        r = drpipe("preview", a, b, "--out", out, "--size", "64")
        no_traceback(r)
        assert r.returncode == 2 and "source" in r.stderr, r.stderr
    r = drpipe("preview", a / "10_left.jpeg", "--out", a, "--size", "64")
    assert r.returncode == 2, r.stderr
    assert {p: _sha(p) for p in originals} == originals and not (a / "sub").exists()

    out = tmp_path / "p"
    out.mkdir()
    (out / "10_left.jpeg").write_bytes(b"a user's file")  # in --out before preview ran
    r = drpipe("preview", a, b, "--out", out, "--size", "64")
    assert r.returncode == 0, r.stderr
    assert (out / "10_left.jpeg").read_bytes() == b"a user's file"
    made = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    # three photos and one sheet, four distinct files besides the user's
    assert len(made) == 5 and "contact_sheet.jpeg" in made, made
    import cv2

    sheet = cv2.imread(str(out / "contact_sheet.jpeg"))
    assert sheet.shape[1] == 3 * 512  # the sheet, not a photo written over it
    outputs = [cv2.imread(str(out / n)) for n in made if n not in
               ("contact_sheet.jpeg", "10_left.jpeg")]
    assert [o.shape for o in outputs] == [(64, 64, 3)] * 3
    assert len({o.tobytes() for o in outputs}) == 3  # three different photos kept
    # a second preview replaces its own outputs, still not the user's file
    r = drpipe("preview", a, b, "--out", out, "--size", "48")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == made
    assert (out / "10_left.jpeg").read_bytes() == b"a user's file"


# ------------------------------------------------------------------ synth (A3)


def test_synth_refuses_a_folder_it_did_not_write(raw, tmp_path):
    real = _copy_dataset(raw, tmp_path / "real")
    before = {p: _sha(p) for p in real.rglob("*") if p.is_file()}
    r = drpipe("synth", "--out", real, "--n", "4", "--quiet")
    no_traceback(r)
    assert r.returncode == 2 and "not the output of drpipe synth" in r.stderr, r.stderr
    assert {p: _sha(p) for p in real.rglob("*") if p.is_file()} == before
    # an earlier synth's output may be replaced, and its photos that the new one does not
    # make are removed (they would be photos without labels)
    out = tmp_path / "demo"
    drpipe("synth", "--out", out, "--n", "6", "--quiet", check=True)
    drpipe("synth", "--out", out, "--n", "4", "--quiet", check=True)
    assert len(list((out / "train").glob("*.jpeg"))) == 4
    assert len((out / "trainLabels.csv").read_text().splitlines()) == 5
    (out / "mine.txt").write_text("x")  # files the user adds are kept
    drpipe("synth", "--out", out, "--n", "4", "--seed", "1", "--quiet", check=True)
    assert (out / "mine.txt").read_text() == "x"


def _copy_dataset(raw: Path, to: Path) -> Path:
    shutil.copytree(raw, to, ignore=shutil.ignore_patterns(".drpipe-*"))
    return to


# ------------------------------------------------------------------ export, explain (A1, A5)
# Fast checks of the decisions; tests/training/test_outputs.py runs them on a trained run.


def test_export_refuses_an_existing_folder_before_loading_anything(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    run = tmp_path / "run"
    run.mkdir()
    r = drpipe("export", run, "--out", mine)
    no_traceback(r)
    assert r.returncode == 2 and "not an earlier drpipe export" in r.stderr, r.stderr
    assert (mine / "notes.txt").read_text() == "x"
    r = drpipe("export", run, "--out", ".", cwd=tmp_path)
    assert r.returncode == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["mine", "run"]


def test_explain_targets_never_collide_and_writes_are_checked(tmp_path):
    import numpy as np

    from training.explain import ExplainError, plan_targets, write_panel

    a, b = tmp_path / "a" / "p.jpeg", tmp_path / "b" / "p.jpeg"
    out = tmp_path / "maps"
    out.mkdir()
    (out / "p_gradcam.png").write_bytes(b"a user's file")
    targets = plan_targets([a, b], out)
    assert [t.name for t in targets] == ["p~2_gradcam.png", "p~3_gradcam.png"]
    assert plan_targets([a], tmp_path / "x.jpg") == [tmp_path / "x.jpg"]  # a file
    with pytest.raises(ExplainError, match="one image file"):
        plan_targets([a, b], tmp_path / "x.png")
    panel = np.zeros((8, 16, 3), np.uint8)
    write_panel(tmp_path / "x.jpg", panel)
    assert (tmp_path / "x.jpg").read_bytes()[:2] == b"\xff\xd8"  # a JPEG, as named
    with pytest.raises(ExplainError, match="cannot write .*No such file"):
        write_panel(tmp_path / "no" / "x.png", panel)
    with pytest.raises(ExplainError, match="cannot write .*too long"):
        write_panel(tmp_path / ("n" * 260 + ".png"), panel)
