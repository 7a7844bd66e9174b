"""Archives read in place: zips and Kaggle's byte-split volumes of the 31 sample photos,
made here with zipfile and `split -b`; every refusal names the part."""

from __future__ import annotations

import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest

from pipeline import archive as A
from pipeline.process import Rejection
from pipeline.sources import detect_source
from tests.helpers import digest, preprocess
from tests.test_cli import DRPIPE

PART = 2_000_000  # bytes per volume: the 31 photos (~32 MB) make 16 or 17 parts
SETTINGS = ("--workers", 2, "--shard-size", 2, "--size", 128)


def make_zip(sample_dir: Path, path: Path, method=zipfile.ZIP_DEFLATED, **kw) -> Path:
    with zipfile.ZipFile(path, "w", method) as z:
        for p in sorted((sample_dir / "train").glob("*.jpeg")):
            info = zipfile.ZipInfo.from_file(p, "train/" + p.name)
            info.compress_type = method
            with z.open(info, "w", **kw) as f:
                f.write(p.read_bytes())
    return path


def split_parts(zip_path: Path, folder: Path, size: int = PART) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["split", "-b", str(size), "-d", "-a", "3", "--numeric-suffixes=1",
                    str(zip_path), str(folder / "train.zip.")], check=True)
    return sorted(folder.glob("train.zip.*"))


def parts_of(paths) -> list[A.Part]:
    return [A.Part(str(p), p.stat().st_size) for p in paths]


@pytest.fixture(scope="module")
def zips(sample_dir, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("zips")
    return {"deflated": make_zip(sample_dir, d / "deflated.zip"),
            "stored": make_zip(sample_dir, d / "stored.zip", zipfile.ZIP_STORED)}


@pytest.fixture()
def parts(zips, sample_dir, tmp_path) -> list[Path]:
    """The deflated archive as volumes, with the labels beside them (a fresh copy per test,
    to damage)."""
    paths = split_parts(zips["deflated"], tmp_path / "parts")
    shutil.copy(sample_dir / "trainLabels.csv", tmp_path / "parts")
    return paths


def refused(paths) -> str:
    with pytest.raises(A.ArchiveError) as e:
        A.open_archive(parts_of(paths))
    return str(e.value)


# ---------------------------------------------------------------------------- the index


@pytest.mark.parametrize("kind", ["deflated", "stored"])
def test_directory_agrees_with_zipfile_and_members_read_back(zips, sample_dir, kind):
    a = A.open_archive(parts_of([zips[kind]]))
    with zipfile.ZipFile(zips[kind]) as z:
        infos = z.infolist()
    assert len(a.members) == len(infos) == 31
    assert {i.compress_type for i in infos} == {8 if kind == "deflated" else 0}
    for i in infos:
        off, csize, usize, method, crc, _ = a.members[i.filename]
        assert (off, csize, usize, method, crc) == (i.header_offset, i.compress_size,
                                                    i.file_size, i.compress_type, i.CRC)
    reader = a.batch(list(a.members))
    for name in a.members:
        assert reader.read(name) == (sample_dir / name).read_bytes()


def test_volumes_read_across_part_boundaries(parts, sample_dir):
    assert len(parts) >= 15
    a = A.open_archive(parts_of(parts))
    spanning = [n for n, m in a.members.items()
                if a.parts.part_at(m[0]) != a.parts.part_at(m[0] + m[1])]
    assert len(spanning) >= 10  # most photos straddle two volumes
    reader = a.batch(list(a.members))
    for name in a.members:
        assert reader.read(name) == (sample_dir / name).read_bytes()


def test_zip64_records_and_extras(sample_dir, tmp_path, monkeypatch):
    """Zip64 end records (entry count over the limit), Zip64 extras in the central
    directory (offsets over the limit) and in local headers (force_zip64)."""
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 1 << 20)
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 5)
    path = make_zip(sample_dir, tmp_path / "z64.zip", force_zip64=True)
    monkeypatch.undo()
    blob = path.read_bytes()
    assert A.Z64_EOCD_SIG in blob[-200:] and A.Z64_LOCATOR_SIG in blob[-100:]
    paths = split_parts(path, tmp_path / "p")
    a = A.open_archive(parts_of(paths))
    assert len(a.members) == 31
    assert max(m[0] for m in a.members.values()) > 1 << 20  # offsets past the patched limit
    with zipfile.ZipFile(path) as z:
        assert {i.filename: i.header_offset for i in z.infolist()} == {
            n: m[0] for n, m in a.members.items()}
    reader = a.batch(list(a.members))
    for name in a.members:
        assert reader.read(name) == (sample_dir / name).read_bytes()


# ---------------------------------------------------------------------------- damaged sets


def test_missing_middle_part_named(parts):
    parts[5].unlink()
    with pytest.raises(A.ArchiveError, match=r"train\.zip\.006 is missing"):
        A.find_parts([p.name for p in parts if p.exists()], "train.zip")
    with pytest.raises(A.ArchiveError, match=r"train\.zip\.001 is missing"):
        A.find_parts([p.name for p in parts[1:] if p.exists()], "train.zip")


def test_missing_last_part_named(parts):
    msg = refused(parts[:-1])
    assert parts[-2].name in msg and "later parts are missing" in msg


def test_short_middle_part_named(parts):
    data = parts[3].read_bytes()
    parts[3].write_bytes(data[:-1000])
    msg = refused(parts)
    assert msg.startswith("train.zip.004 is") and "short" in msg


def test_short_last_part_named(parts):
    data = parts[-1].read_bytes()
    parts[-1].write_bytes(data[:-10])
    msg = refused(parts)
    assert msg.startswith(parts[-1].name) and "truncated" in msg


def test_extra_part_named(parts):
    extra = parts[-1].with_name(f"train.zip.{len(parts) + 1:03d}")
    extra.write_bytes(parts[0].read_bytes()[:1000])
    msg = refused([*parts, extra])
    assert msg.startswith(f"{extra.name}: extra part") and parts[-1].name in msg


def test_reordered_parts_named(parts):
    a, b = parts[2].read_bytes(), parts[6].read_bytes()
    parts[2].write_bytes(b)
    parts[6].write_bytes(a)
    msg = refused(parts)
    assert msg.startswith("train.zip.003 does not hold") and "out of order" in msg


def test_part_from_another_archive_same_size(parts, zips, tmp_path):
    other = split_parts(zips["stored"], tmp_path / "other")
    parts[4].write_bytes(other[4].read_bytes())
    assert "train.zip.005 does not hold" in refused(parts)


def test_a_part_shifted_by_extra_bytes_is_refused(zips, tmp_path):
    one = tmp_path / "one.zip"
    one.write_bytes(b"\0" * 100 + zips["deflated"].read_bytes())
    msg = refused([one])
    assert "100 bytes more than the archive's directory expects" in msg


def test_flipped_byte_is_corrupt_for_that_photo_only(parts, sample_dir):
    a = A.open_archive(parts_of(parts))
    name = "train/15_left.jpeg"
    off, csize = a.members[name][:2]
    where = off + 30 + len(name) + csize // 2
    k = a.parts.part_at(where)
    data = bytearray(parts[k].read_bytes())
    data[where - a.parts.starts[k]] ^= 0x40
    parts[k].write_bytes(bytes(data))
    reader = a.batch(list(a.members))
    got = reader.read(name)
    assert isinstance(got, Rejection) and got.code == "corrupt", got
    assert all(reader.read(n) == (sample_dir / n).read_bytes() for n in a.members if n != name)


def test_flipped_byte_in_stored_member_fails_the_crc(zips, tmp_path):
    path = tmp_path / "s.zip"
    data = bytearray(zips["stored"].read_bytes())
    a = A.open_archive(parts_of([zips["stored"]]))
    name = "train/15_left.jpeg"
    data[a.members[name][0] + 30 + len(name) + 5000] ^= 1
    path.write_bytes(bytes(data))
    got = A.open_archive(parts_of([path])).batch([name]).read(name)
    assert isinstance(got, Rejection) and got.code == "corrupt" and "CRC-32" in got.detail


def _patch_member(src: Path, dst: Path, name: str, method=None, flags=None) -> None:
    """Rewrite a member's method / flags in its local header and central entry."""
    data = bytearray(src.read_bytes())
    a = A.open_archive(parts_of([src]))
    off = a.members[name][0]
    cd = data.find(A.CDIR_SIG)
    while cd >= 0:
        n = struct.unpack_from("<H", data, cd + 28)[0]
        if data[cd + 46:cd + 46 + n].decode() == name:
            break
        cd = data.find(A.CDIR_SIG, cd + 4)
    for pos, base in ((off, 6), (cd, 8)):  # flags at +6/+8, method at +8/+10
        if flags is not None:
            struct.pack_into("<H", data, pos + base, flags)
        if method is not None:
            struct.pack_into("<H", data, pos + base + 2, method)
    dst.write_bytes(bytes(data))


@pytest.mark.parametrize("method,flags,words", [(9, None, "Deflate64 (method 9)"),
                                                 (12, None, "bzip2 (method 12)"),
                                                 (8, 1, "encrypted")])
def test_unsupported_members_rejected_with_reason(zips, tmp_path, method, flags, words):
    name = "train/15_left.jpeg"
    _patch_member(zips["deflated"], tmp_path / "x.zip", name, method, flags)
    a = A.open_archive(parts_of([tmp_path / "x.zip"]))
    got = a.batch([name]).read(name)
    assert isinstance(got, Rejection) and got.code == "unreadable" and words in got.detail
    other = "train/15_right.jpeg"
    assert isinstance(a.batch([other]).read(other), bytes)


def test_spanned_multi_disk_zip_refused(zips, tmp_path):
    data = bytearray(zips["deflated"].read_bytes())
    eocd = data.rfind(A.EOCD_SIG)
    struct.pack_into("<H", data, eocd + 4, 3)  # "number of this disk"
    (tmp_path / "d.zip").write_bytes(bytes(data))
    assert "spanned multi-disk zip" in refused([tmp_path / "d.zip"])


def test_fingerprint_from_directory_not_stat(parts, tmp_path):
    src = detect_source(parts[0].parent)
    assert src.kind == "kaggle" and len(src.photos) == 31 and src.reader is not None
    m = src.reader.member("train/15_left.jpeg")
    assert src.reader.fingerprint("train/15_left.jpeg") == f"{m[4]:08x}:{m[2]}"


def test_labels_zipped_beside_the_parts(parts, sample_dir):
    folder = parts[0].parent
    (folder / "trainLabels.csv").unlink()
    with zipfile.ZipFile(folder / "trainLabels.csv.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.write(sample_dir / "trainLabels.csv", "trainLabels.csv")
    src = detect_source(folder)
    assert sorted(p.image_id for p in src.photos) == sorted(
        p.stem for p in (sample_dir / "train").glob("*.jpeg"))
    assert all(p.label is not None and p.origin == "train" for p in src.photos)


def test_bad_label_in_zipped_labels_names_the_zip(parts, sample_dir):
    from pipeline.sources import LabelError

    folder = parts[0].parent
    (folder / "trainLabels.csv").unlink()
    with zipfile.ZipFile(folder / "trainLabels.csv.zip", "w") as z:
        z.writestr("trainLabels.csv", "image,level\n15_left,1\n15_right,7\n")
    with pytest.raises(LabelError) as e:
        detect_source(folder)
    assert str(e.value).startswith(f"{folder / 'trainLabels.csv.zip'}:trainLabels.csv: line 3")
    assert "'7'" in str(e.value) and "drpipe-labels-" not in str(e.value)


def test_train_and_test_volumes_with_their_labels(parts, sample_dir, tmp_path):
    """Kaggle's test.zip.00N with retinopathy_solution.csv (its Usage column) beside the
    train volumes; an extracted train/ beside them wins over the archives."""
    folder = parts[0].parent
    photos = sorted((sample_dir / "train").glob("*.jpeg"))[:6]
    with zipfile.ZipFile(tmp_path / "test.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for i, p in enumerate(photos):
            z.write(p, f"test/9{i}_left.jpeg")
    subprocess.run(["split", "-b", "1500000", "-d", "-a", "3", "--numeric-suffixes=1",
                    str(tmp_path / "test.zip"), str(folder / "test.zip.")], check=True)
    assert len(list(folder.glob("test.zip.*"))) >= 3
    (folder / "retinopathy_solution.csv").write_text(
        "image,level,Usage\n" + "".join(f"9{i}_left,{i % 5},{'Public' if i < 3 else 'Private'}\n"
                                         for i in range(6)))
    src = detect_source(folder)
    by_id = {p.image_id: p for p in src.photos}
    assert len(by_id) == 37 and by_id["93_left"].origin == "test/Private"
    assert by_id["90_left"].path == "test/90_left.jpeg" and by_id["15_left"].origin == "train"
    assert src.reader.batch(["test/92_left.jpeg"]).read("test/92_left.jpeg") == \
        photos[2].read_bytes()
    (folder / "train").mkdir()
    shutil.copy(photos[0], folder / "train" / "15_left.jpeg")
    assert detect_source(folder).reader is None


def test_kaggle_outer_download_is_explained(parts, tmp_path):
    outer = tmp_path / "diabetic-retinopathy-detection.zip"
    with zipfile.ZipFile(outer, "w", zipfile.ZIP_DEFLATED) as z:
        for p in parts[:3]:
            z.write(p, p.name)
    from pipeline.sources import SourceError

    with pytest.raises(SourceError, match="unzip it first"):
        detect_source(outer)


def test_other_layouts_beside_no_archive_unchanged(synth_dir):
    assert detect_source(synth_dir).reader is None
    assert detect_source(synth_dir, kind="kaggle").kind == "kaggle"


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def folder_run(sample_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("folder-run")
    preprocess("--src", sample_dir, "--out", out, *SETTINGS)
    return out


def test_parts_give_the_bytes_of_the_extracted_folder(parts, folder_run, tmp_path):
    out = tmp_path / "out"
    preprocess("--src", parts[0].parent, "--out", out, *SETTINGS)
    d = digest(out)
    assert d == digest(folder_run) and len(d) >= 4  # shards, manifest csv and parquet
    # a re-run recognises the finished run (input fingerprint from the directory)
    r = subprocess.run([DRPIPE, "preprocess", "--src", str(parts[0].parent), "--out", str(out),
                        *map(str, SETTINGS)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "already complete" in r.stdout


def test_single_stored_zip_gives_the_same_bytes(zips, sample_dir, folder_run, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(zips["stored"], src / "train.zip")
    shutil.copy(sample_dir / "trainLabels.csv", src)
    preprocess("--src", src / "train.zip", "--out", tmp_path / "out", *SETTINGS)
    assert digest(tmp_path / "out") == digest(folder_run)


@pytest.mark.parametrize("lost", [-1, 5])
def test_missing_part_is_one_line_exit_3_before_any_work(parts, tmp_path, lost):
    parts[lost].unlink()
    r = preprocess("--src", parts[0].parent, "--out", tmp_path / "out", *SETTINGS, check=False)
    assert r.returncode == 3, r.stderr
    named = parts[-2].name if lost == -1 else f"{parts[lost].name} is missing"
    assert r.stderr.count("\n") == 1 and named in r.stderr, r.stderr
    assert not list((tmp_path / "out").glob("*.json")) and not list(
        (tmp_path / "out").glob(".drpipe-state*"))  # refused before any work


def test_two_members_with_one_name_are_refused(sample_photos, tmp_path):
    """zipfile lets a name be written twice (the later one wins on extraction): which photo
    carries the label would be a guess, so the archive is refused, naming the member."""
    import warnings

    from pipeline.archive import ArchiveError, detect_archive_source

    src = tmp_path / "src"
    src.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        with zipfile.ZipFile(src / "train.zip", "w") as z:
            z.writestr("train/15_left.jpeg", sample_photos[0].read_bytes())
            z.writestr("train/15_left.jpeg", sample_photos[1].read_bytes())
    (src / "trainLabels.csv").write_text("image,level\n15_left,0\n")
    with pytest.raises(ArchiveError, match="two members are named 'train/15_left.jpeg'"):
        detect_archive_source(str(src))


# ---------------------------------------------------------------------------- real Zip64 sizes

_ZEROS = bytes(64 << 20)


class _SparseWriter:
    """A file zipfile writes to, in which the padding member's zero chunks become a hole
    (seeked over): a 4 GiB archive that takes a few MB of disk."""

    def __init__(self, path: Path):
        self.f = open(path, "w+b")

    def write(self, data) -> int:
        if data is _ZEROS:
            self.f.seek(len(data), 1)
            return len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def _sparse_split(path: Path, folder: Path, size: int) -> list[Path]:
    """``split -b size`` that copies only the data regions (SEEK_DATA / SEEK_HOLE): the
    parts keep the hole."""
    import os

    folder.mkdir()
    total = path.stat().st_size
    names = [folder / f"train.zip.{i + 1:03d}" for i in range(-(-total // size))]
    fds = [os.open(n, os.O_RDWR | os.O_CREAT) for n in names]
    src = os.open(path, os.O_RDONLY)
    try:
        for i, fd in enumerate(fds):
            os.ftruncate(fd, min(size, total - i * size))
        pos = 0
        while pos < total:
            try:
                start = os.lseek(src, pos, os.SEEK_DATA)
            except OSError:  # no data after pos
                break
            end = os.lseek(src, start, os.SEEK_HOLE)
            while start < end:
                n = min(end - start, 8 << 20, size - start % size)
                os.pwrite(fds[start // size], os.pread(src, n, start), start % size)
                start += n
            pos = end
    finally:
        os.close(src)
        for fd in fds:
            os.close(fd)
    return names


def test_a_real_zip64_archive_over_4_gib_and_65535_members(sample_dir, folder_run, tmp_path):
    """Zip64 as zipfile writes it without any limit patched: a 4.1 GiB stored member
    first (a hole on disk), 70,000 small members (Zip64 entry counts), then the 31
    photos, whose local headers lie past 4 GiB (Zip64 offsets in the central directory),
    cut into volumes with a boundary inside the photos."""
    big = tmp_path / "big.zip"
    w = _SparseWriter(big)
    with zipfile.ZipFile(w, "w", zipfile.ZIP_STORED) as z:
        with z.open(zipfile.ZipInfo("padding.bin"), "w", force_zip64=True) as f:
            for _ in range((4 << 30) // len(_ZEROS) + 2):
                f.write(_ZEROS)
        for i in range(70_000):
            z.writestr(f"notes/{i:05d}.txt", b"%d" % i)
        for p in sorted((sample_dir / "train").glob("*.jpeg")):
            z.writestr("train/" + p.name, p.read_bytes())
    w.f.close()
    with zipfile.ZipFile(big) as z:
        offsets = {i.filename: i.header_offset for i in z.infolist()}
    assert len(offsets) == 70_032 > 0xFFFF
    photos = {n: o for n, o in offsets.items() if n.startswith("train/")}
    assert min(photos.values()) > 0xFFFFFFFF  # every photo's header past 4 GiB
    assert big.stat().st_blocks * 512 < 200 << 20  # the padding is a hole
    middle = sorted(photos.values())[15]
    paths = _sparse_split(big, tmp_path / "parts", middle // 4 + 1)
    assert len(paths) >= 5 and sum(p.stat().st_size for p in paths) == big.stat().st_size
    big.unlink()

    a = A.open_archive(parts_of(paths))
    assert {n: m[0] for n, m in a.members.items()} == offsets
    assert a.members["padding.bin"][2] > 0xFFFFFFFF  # a Zip64 size
    reader = a.batch(sorted(photos))
    for name in sorted(photos):
        assert reader.read(name) == (sample_dir / name).read_bytes()

    shutil.copy(sample_dir / "trainLabels.csv", paths[0].parent)
    out = tmp_path / "out"
    preprocess("--src", paths[0].parent, "--out", out, *SETTINGS)
    assert digest(out) == digest(folder_run)
