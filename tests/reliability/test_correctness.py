"""Never a silently wrong result (issue 10 B): ambiguous ids, changed photos, lenient
parsing, empty runs. Each case is what a careful user would trip over; each fails on the
code before the fix."""

from __future__ import annotations

import csv
import os
import unicodedata
from pathlib import Path

import pytest

from pipeline.sources import LabelError, detect_source, read_labels
from pipeline.split import parse_split_spec
from pipeline.synth import synth_dataset
from tests.reliability.helpers import drpipe, no_traceback

ARGS = ("--size", "64", "--workers", "1", "--quiet", "--split", "train=0.5,val=0.25,test=0.25")


def _rows(out: Path) -> list[dict]:
    return list(csv.DictReader(open(out / "data_manifest.csv", encoding="utf-8")))


@pytest.fixture()
def raw(tmp_path) -> Path:
    synth_dataset(tmp_path / "raw", n=8, seed=3)
    return tmp_path / "raw"


def test_duplicate_ids_every_file_has_a_row_and_none_is_used(raw, tmp_path):
    train = raw / "train"
    first = sorted(train.glob("*_left.jpeg"))[0]
    other = sorted(train.glob("*_right.jpeg"))[-1]
    image_id = first.stem
    (train / f"{image_id}.JPG").write_bytes(first.read_bytes())
    (train / f"{image_id}.jpg").write_bytes(other.read_bytes())  # another photo, same id
    (train / "sub").mkdir()
    (train / "sub" / f"{image_id}.jpeg").write_bytes(other.read_bytes())
    r = drpipe("preprocess", "--src", raw, "--out", tmp_path / "out", *ARGS)
    no_traceback(r)
    assert r.returncode == 0, r.stderr
    rows = [row for row in _rows(tmp_path / "out") if row["image_id"] == image_id]
    paths = sorted(row["path"] for row in rows)
    assert paths == sorted([f"train/{image_id}.JPG", f"train/{image_id}.jpeg",
                            f"train/{image_id}.jpg", f"train/sub/{image_id}.jpeg"])
    for row in rows:
        assert row["status"] == "rejected" and row["reason"].startswith("duplicate_id:"), row
        assert row["shard"] == "" and row["sha256"]  # hashed, never written to a shard
        for p in paths:  # each row names every other file with the id
            assert (p in row["reason"]) == (p != row["path"]), (p, row["reason"])
    # the other photos are unaffected: 7 ok of 8 labelled ids
    assert sum(row["status"] == "ok" for row in _rows(tmp_path / "out")) == 7


def test_photo_rewritten_in_place_at_the_same_size_is_noticed(raw, tmp_path):
    out = tmp_path / "out"
    assert drpipe("preprocess", "--src", raw, "--out", out, *ARGS).returncode == 0
    photo = sorted((raw / "train").glob("*.jpeg"))[0]
    st = photo.stat()
    photo.write_bytes(b"\0" * st.st_size)  # corrupted, same size
    os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    # Not "already complete": the changed photo is processed again into a new version
    # (pipeline.versions), where it is rejected for what it now is.
    r = drpipe("preprocess", "--src", raw, "--out", out, *ARGS)
    no_traceback(r)
    assert r.returncode == 0 and "already complete" not in r.stdout, (r.stdout, r.stderr)
    row = next(r for r in _rows(out) if r["path"].endswith(photo.name))
    assert row["status"] == "rejected" and row["reason"].startswith("not_an_image")
    assert (out / "versions" / "v0002").is_dir()


def test_a_run_with_no_usable_photo_fails_with_the_reasons(raw, tmp_path):
    (raw / "trainLabels.csv").write_text("image,level\nnobody_left,1\n")  # labels no photo
    r = drpipe("preprocess", "--src", raw, "--out", tmp_path / "out", *ARGS)
    no_traceback(r)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "no usable photo: 8 found, 8 rejected (no_label 8" in r.stderr
    assert (tmp_path / "out" / "data_manifest.csv").exists()  # the reasons are kept


def test_label_ids_with_the_extension_match_their_photos(raw, tmp_path):
    labels = raw / "trainLabels.csv"
    lines = labels.read_text().splitlines()
    labels.write_text("\n".join([lines[0]] + [f"{ln.split(',')[0]}.jpeg,{ln.split(',')[1]}"
                                              for ln in lines[1:]]) + "\n")
    src = detect_source(raw)
    assert len(src.photos) == 8 and all(p.label is not None for p in src.photos)
    assert not src.labels_without_photo


def test_jfif_and_nfd_names_are_found_and_matched(tmp_path):
    nfc = unicodedata.normalize("NFC", "José_left")
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfc != nfd
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / f"{nfd}.jpeg").write_bytes(b"\xff\xd8\xff")
    (tmp_path / "imgs" / "a_right.jfif").write_bytes(b"\xff\xd8\xff")
    labels = tmp_path / "l.csv"
    labels.write_text(f"image,level\n{nfc},2\na_right,1\n", encoding="utf-8")
    src = detect_source(tmp_path / "imgs", labels=labels)
    assert [(p.image_id, p.label) for p in src.photos] == [(nfc, 2), ("a_right", 1)]
    assert not src.labels_without_photo


@pytest.mark.parametrize("text, match", [
    ("image,level\na,２\n", "not a grade"),  # fullwidth digit
    ("image,level\na,٣\n", "not a grade"),  # Arabic-Indic digit
    ("image,level\na,nan\n", "not a grade"),
    ("image,level\na,1,extra\n", "line 2: 3 fields, expected 2"),
])
def test_lenient_label_values_are_refused(tmp_path, text, match):
    p = tmp_path / "l.csv"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(LabelError, match=match):
        read_labels(p, "image", "level")


def test_blank_patient_ids_are_not_one_patient(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("image,level,patient\na,1,P1\nb,2,\nc,3,\n")
    with pytest.raises(LabelError, match="line 3: empty 'patient' for 'b'"):
        read_labels(p, "image", "level", "patient")


def test_latin1_labels_file_exits_3_naming_file_and_line(tmp_path):
    p = tmp_path / "l.csv"
    p.write_bytes("image,level\na,1\nJos\xe9_left,2\n".encode("latin-1"))
    r = drpipe("split", "--labels", p, "--out", tmp_path / "s.csv")
    no_traceback(r)
    assert r.returncode == 3, r.stderr
    assert f"{p}: line 3: not UTF-8" in r.stderr


@pytest.mark.parametrize("spec", ["train=nan,val=0.5,test=0.5", "train=inf,val=0"])
def test_non_finite_split_fractions_are_refused(spec):
    with pytest.raises(ValueError, match="not a finite number"):
        parse_split_spec(spec)


@pytest.mark.parametrize("toml, match", [
    ("size = 64.7", "size = 64.7: expected an integer"),
    ("size = [1, 2]", "expected a single value"),
    ("strict = 1", "expected true or false"),
])
def test_toml_values_are_checked_against_their_option(tmp_path, toml, match):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml + "\n")
    r = drpipe("preprocess", "--config", cfg, "--src", tmp_path / "missing")
    no_traceback(r)
    assert r.returncode == 2 and match in r.stderr, r.stderr
