"""Label faults through `drpipe preprocess`: one line naming file, line and value, exit 3."""

from __future__ import annotations

import pytest

from pipeline.synth import synth_dataset
from tests.reliability.helpers import drpipe, manifest


@pytest.fixture()
def raw(tmp_path):
    synth_dataset(tmp_path / "raw", n=4, seed=0)
    return tmp_path / "raw"


@pytest.mark.parametrize("labels,message", [
    (None, "not a known layout"),  # labels file missing
    ("image,grade\n", "line 1: no column 'level' (columns: image, grade)"),
    ("image,level\n", "no label rows (header only)"),
    ("image,level\n{a},1\n{a},3\n", "line 3: '{a}' listed again with grade 3 (earlier 1)"),
    ("image,level\n{a},5\n", "line 2: level '5' for '{a}' is not a grade 0-4"),
    ("image,level\n{a},two\n", "line 2: level 'two' for '{a}' is not a grade 0-4"),
])
def test_label_faults(raw, tmp_path, labels, message):
    first = sorted(p.stem for p in (raw / "train").iterdir())[0]
    f = raw / "trainLabels.csv"
    if labels is None:
        f.unlink()
    else:
        f.write_text(labels.format(a=first))
    r = drpipe("preprocess", "--src", raw, "--out", tmp_path / "out", "--workers", 1)
    assert r.returncode == 3, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("drpipe: error: ")
    assert message.format(a=first) in r.stderr
    if labels is not None:
        assert str(f) in r.stderr
    assert not (tmp_path / "out" / "dataset_info.json").exists()


def test_bom_and_crlf_labels_are_fine(raw, tmp_path):
    f = raw / "trainLabels.csv"
    f.write_bytes(b"\xef\xbb\xbf" + f.read_bytes().replace(b"\n", b"\r\n"))
    r = drpipe("preprocess", "--src", raw, "--out", tmp_path / "out", "--workers", 1, "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = manifest(tmp_path / "out")
    assert len(rows) == 4 and all(row["status"] == "ok" for row in rows.values())
