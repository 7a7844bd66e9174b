"""Sources and labels: layouts detected, every photo and label accounted for, bad rows named."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.sources import (
    LabelError,
    SourceError,
    detect_kind,
    detect_source,
    patient_and_eye,
    read_labels,
)


def _touch(p: Path, data: bytes = b"\xff\xd8\xff") -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def test_patient_and_eye():
    assert patient_and_eye("10_left") == ("10", "left")
    assert patient_and_eye("foo_bar_RIGHT") == ("foo_bar", "right")
    assert patient_and_eye("000c1434d8d7") == ("000c1434d8d7", "")


def test_kaggle_train_and_test_with_usage(tmp_path):
    for name in ("1_left", "1_right", "2_left", "9_left"):
        _touch(tmp_path / "train" / f"{name}.jpeg")
    (tmp_path / "trainLabels.csv").write_text("image,level\n1_left,0\n1_right,2\n2_left,4\n"
                                              "3_left,1\n")
    _touch(tmp_path / "test/5_left.jpeg")
    (tmp_path / "retinopathy_solution.csv").write_text("image,level,Usage\n5_left,3,Private\n")
    src = detect_source(tmp_path)
    assert src.kind == "kaggle"
    by_id = {p.image_id: p for p in src.photos}
    assert by_id["1_right"].label == 2 and by_id["1_right"].patient_id == "1"
    assert by_id["9_left"].label is None  # photo without a label: kept, reported
    assert by_id["5_left"].origin == "test/Private" and by_id["5_left"].path == "test/5_left.jpeg"
    assert [r.image_id for r in src.labels_without_photo] == ["3_left"]


def test_aptos(tmp_path):
    (tmp_path / "train.csv").write_text("id_code,diagnosis\nabc123,2\ndef456,0\n")
    _touch(tmp_path / "train_images/abc123.png")
    _touch(tmp_path / "train_images/def456.png")
    src = detect_source(tmp_path)
    assert src.kind == "aptos"
    assert [(p.image_id, p.label, p.patient_id, p.eye) for p in src.photos] == [
        ("abc123", 2, "abc123", ""), ("def456", 0, "def456", "")]


def test_grade_folders(tmp_path):
    _touch(tmp_path / "0/7_left.jpeg")
    _touch(tmp_path / "3/7_right.jpg")
    _touch(tmp_path / "3/.hidden.jpeg")
    (tmp_path / "3/notes.txt").write_text("x")
    src = detect_source(tmp_path)
    assert src.kind == "folders"
    assert [(p.image_id, p.label) for p in src.photos] == [("7_left", 0), ("7_right", 3)]


def test_any_csv_with_patient_column(tmp_path):
    _touch(tmp_path / "imgs/a/IM001.jpeg")
    _touch(tmp_path / "imgs/b/IM002.jpeg")
    labels = tmp_path / "idrid.csv"
    labels.write_text("Image name,Retinopathy grade,Patient\nIM001,1,P7\nIM002,4,P7\n")
    src = detect_source(tmp_path / "imgs", labels=labels, id_col="Image name",
                        label_col="Retinopathy grade", patient_col="Patient")
    assert src.kind == "csv"
    assert [(p.image_id, p.label, p.patient_id, p.path) for p in src.photos] == [
        ("IM001", 1, "P7", "a/IM001.jpeg"), ("IM002", 4, "P7", "b/IM002.jpeg")]


def test_unknown_layout(tmp_path):
    _touch(tmp_path / "x.jpeg")
    with pytest.raises(SourceError, match="not a known layout"):
        detect_kind(tmp_path)


@pytest.mark.parametrize("content,match", [
    ("image,level\n1_left,5\n", r"line 2: level '5' for '1_left' is not a grade 0-4"),
    ("image,level\n1_left,0\n1_right,two\n", r"line 3: level 'two'"),
    ("image,level\n1_left,-1\n", r"line 2: level '-1'"),
    ("image,level\n1_left,1.5\n", r"line 2: level '1.5'"),
    ("image,grade\n1_left,1\n", r"line 1: no column 'level' \(columns: image, grade\)"),
    ("image,level\n", "header only"),
    ("", "empty labels file"),
    ("image,level\n1_left,1\n1_left,3\n", r"line 3: '1_left' listed again with grade 3 "
                                          r"\(earlier 1\)"),
    ("image,level\n1_left\n", r"line 2: 1 fields, expected 2"),
])
def test_bad_labels_name_file_line_and_value(tmp_path, content, match):
    f = tmp_path / "trainLabels.csv"
    f.write_text(content)
    with pytest.raises(LabelError, match=match) as e:
        read_labels(f, "image", "level")
    assert str(f) in str(e.value)


def test_missing_labels_file(tmp_path):
    with pytest.raises(LabelError, match="cannot read labels file"):
        read_labels(tmp_path / "nope.csv", "image", "level")


def test_bom_crlf_and_duplicate_same_grade(tmp_path):
    f = tmp_path / "l.csv"
    f.write_bytes(b"\xef\xbb\xbfimage,level\r\n1_left,2\r\n1_left,2\r\n\r\n2_right, 1 \r\n")
    rows = read_labels(f, "image", "level")
    assert [(r.image_id, r.label) for r in rows] == [("1_left", 2), ("2_right", 1)]


def test_real_kaggle_label_file_reads(sample_dir):
    rows = read_labels(sample_dir.parent / "eyepacs-labels/trainLabels.csv", "image", "level")
    assert len(rows) == 35125
    assert [sum(r.label == g for r in rows) for g in range(5)] == [25809, 2443, 5292, 873, 708]
