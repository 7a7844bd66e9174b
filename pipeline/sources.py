"""Sources: find the photos and their labels in the layouts people bring.

    detect_source(src, ...) -> Source(kind, photos: [ImageRecord], labels_without_photo)

Layouts (detected in this order, or forced with ``kind``):

- ``kaggle``:  ``train/`` + ``trainLabels.csv`` (image,level); and/or ``test/`` +
  ``retinopathy_solution.csv`` (image,level,Usage). EyePACS.
- ``aptos``:   ``train.csv`` (id_code,diagnosis) + ``train_images/{id}.png``. APTOS 2019.
- ``folders``: one folder per grade, ``0/ 1/ 2/ 3/ 4/``.
- ``csv``:     any labels CSV (``labels=FILE``, ``id_col``, ``label_col``, ``patient_col``),
  photos anywhere under ``src`` matched by file name without extension.

Patient and eye come from ``{patient}_{left|right}`` names unless a patient column is
given; otherwise each photo is its own patient. Bad label rows (a grade outside 0-4, a
non-integer, a missing column, conflicting duplicates) raise :class:`LabelError` naming
the file, the line and the value.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from tfrecord_writer.schema import N_GRADES

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".jfif", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp")
GRADES = range(N_GRADES)
_EYE_NAME = re.compile(r"^(?P<patient>.+)_(?P<eye>left|right)$", re.IGNORECASE)


class LabelError(ValueError):
    """A labels file that cannot be used as it is; the message names file, line, value."""


class SourceError(ValueError):
    """The source directory is not a layout we know, or is missing."""


@dataclass(frozen=True)
class ImageRecord:
    """A photo to process: where it is and what is known about it before decoding."""

    image_id: str
    path: str  # relative to the source root, POSIX separators
    label: int | None  # None: no label row for this photo
    patient_id: str
    eye: str  # "left" | "right" | ""
    origin: str = ""  # e.g. "train", "test/Public" — where in the source it came from
    # non-empty: the reason this photo is rejected before decoding (duplicate_id: several
    # files share its id, so which one the label belongs to is unknown)
    ambiguous: str = ""


@dataclass(frozen=True)
class LabelRow:
    image_id: str
    label: int
    patient_id: str
    eye: str
    origin: str = ""


@dataclass
class Source:
    kind: str
    root: Path
    photos: list[ImageRecord]
    labels_without_photo: list[LabelRow] = field(default_factory=list)
    reader: object | None = None  # photos read in place: archive members, objects in a store

    def fingerprint(self, path: str) -> str:
        """What tells a changed photo from an unchanged one without reading it: a file's
        size and mtime_ns (a photo rewritten in place at the same size is noticed), an
        archive member's or a store object's directory entry; "-1" when it cannot be had."""
        try:
            if self.reader is not None:
                return str(self.reader.fingerprint(path))
            st = os.stat(self.root / path)
            return f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            return "-1"


def patient_and_eye(image_id: str) -> tuple[str, str]:
    """``"10_left"`` -> ("10", "left"); names without an eye are their own patient."""
    m = _EYE_NAME.match(image_id)
    if m:
        return m.group("patient"), m.group("eye").lower()
    return image_id, ""


def read_labels(path: Path, id_col: str, label_col: str, patient_col: str | None = None,
                extra_col: str | None = None, origin: str = "") -> list[LabelRow]:
    """Parse a labels CSV strictly. Accepts a UTF-8 BOM and CRLF line endings.

    Raises LabelError for a missing file or column, an empty file, an unparseable or
    out-of-range grade, and the same id listed twice with different grades (the same
    grade twice is tolerated and kept once).
    """
    path = Path(path)
    try:
        raw_bytes = path.read_bytes()
    except OSError as e:
        raise LabelError(f"{path}: cannot read labels file ({e.strerror or e})") from None
    try:
        text = raw_bytes.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw_bytes[:e.start].count(b"\n") + 1
        raise LabelError(f"{path}: line {line}: not UTF-8 text (byte {raw_bytes[e.start]:#x}); "
                         "save the labels file as UTF-8") from None
    with io.StringIO(text, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise LabelError(f"{path}: empty labels file (no header)")
        header = [h.strip() for h in header]
        need = [c for c in (id_col, label_col, patient_col, extra_col) if c]
        for c in need:
            if c not in header:
                raise LabelError(f"{path}: line 1: no column {c!r} (columns: "
                                 f"{', '.join(header)})")
        col = {c: header.index(c) for c in need}
        rows: dict[str, LabelRow] = {}
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise LabelError(f"{path}: line {line}: {len(row)} fields, expected "
                                 f"{len(header)}: {','.join(row)!r}")
            image_id = label_id(row[col[id_col]])
            raw = row[col[label_col]].strip()
            if not image_id:
                raise LabelError(f"{path}: line {line}: empty {id_col!r}")
            grade = _parse_grade(raw)
            if grade is None:
                raise LabelError(f"{path}: line {line}: {label_col} {raw!r} for {image_id!r} "
                                 "is not a grade 0-4")
            if patient_col:
                patient, eye = row[col[patient_col]].strip(), patient_and_eye(image_id)[1]
                if not patient:  # never merge every blank into one "" patient
                    raise LabelError(f"{path}: line {line}: empty {patient_col!r} for "
                                     f"{image_id!r}")
            else:
                patient, eye = patient_and_eye(image_id)
            org = origin
            if extra_col:
                org = f"{origin}/{row[col[extra_col]].strip()}" if origin else row[
                    col[extra_col]].strip()
            prev = rows.get(image_id)
            if prev is not None and prev.label != grade:
                raise LabelError(f"{path}: line {line}: {image_id!r} listed again with grade "
                                 f"{grade} (earlier {prev.label})")
            rows[image_id] = LabelRow(image_id, grade, patient, eye, org)
    if not rows:
        raise LabelError(f"{path}: no label rows (header only)")
    return list(rows.values())


def label_id(cell: str) -> str:
    """A labels file's id as photos are matched: NFC Unicode, and without a photo extension
    (``1002_left.jpeg`` -> ``1002_left``) — photo ids are file names without extension."""
    image_id = unicodedata.normalize("NFC", cell.strip())
    stem, ext = os.path.splitext(image_id)
    return stem if stem and ext.lower() in IMAGE_SUFFIXES else image_id


def _parse_grade(raw: str) -> int | None:
    if not raw.isascii():  # float() also reads "２" and "٣"
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    if not math.isfinite(value) or not value.is_integer() or int(value) not in GRADES:
        return None
    return int(value)


def expand_photo_paths(sources) -> list:
    """Files and folders (searched recursively, in name order, hidden entries skipped) ->
    photo paths. Named files are kept whatever their suffix: the reader judges them.
    A store URL (``s3://bucket/photos``) is a folder the same way, its photos' URLs kept as
    strings, or one object; a prefix that holds nothing gives nothing."""
    from pipeline import storage

    files: list = []
    for s in sources:
        if storage.is_url(s):
            files += _store_photos(str(s).rstrip("/"))
            continue
        s = Path(s)
        if s.is_dir():
            files += sorted(p for p in s.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                            and not any(part.startswith(".") for part in p.relative_to(s).parts))
        else:
            files.append(s)
    return files


def _store_photos(url: str) -> list[str]:
    from pipeline import storage

    found = storage.walk(url)
    if found:
        return [storage.join(url, rel) for rel in sorted(found, key=lambda r: r.split("/"))
                if os.path.splitext(rel)[1].lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in rel.split("/"))]
    try:
        storage.size(url)
    except FileNotFoundError:
        return []
    return [url]  # the URL of one object


def photo_id(path) -> str:
    """The id of a photo from its path or URL: its file name without the suffix."""
    return os.path.splitext(str(path).rstrip("/").rsplit("/", 1)[-1])[0]


def grade_folders(src, photos_in) -> tuple[dict, list[LabelRow]]:
    """The photos and labels of grade folders ``0/`` .. ``4/`` (the folder is the grade), a
    local folder's or a store's: ``photos_in(g)`` gives {image id: [paths]} in folder ``g``.
    An id in two grade folders is refused: which grade it has is unknown."""
    files, rows = {}, []
    for g in GRADES:
        for image_id, paths in photos_in(g).items():
            if image_id in files:
                raise LabelError(f"{src}: {image_id!r} appears in two grade folders "
                                 f"({files[image_id][0][0]} and {paths[0]})")
            files[image_id] = [(p, str(g)) for p in paths]
            patient, eye = patient_and_eye(image_id)
            rows.append(LabelRow(image_id, g, patient, eye, str(g)))
    if not files:
        raise SourceError(f"{src}: grade folders 0/..4/ hold no photos")
    return files, rows


def _scan(folder: Path, root: Path) -> dict[str, list[str]]:
    """{image id: [paths relative to root]} for image files under ``folder`` (recursive).

    The id is the file name without extension, NFC-normalised (macOS writes NFD names).
    Several files with one id (``10_left.jpeg``, ``10_left.JPG``, ``sub/10_left.jpeg``) are
    all kept: :func:`_join` rejects each as ``duplicate_id``. Hidden files and folders are
    skipped. Broken symlinks are kept (they are reported as unreadable, not silently lost).
    Linked folders are listed like linked files (each folder once: no cycles); a photo
    reached through a link that leaves the source is rejected ``outside_source`` when read
    (pipeline.job), not silently dropped."""
    found: dict[str, list[str]] = {}
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_SUFFIXES:
                rel = Path(dirpath, name).relative_to(root).as_posix()
                found.setdefault(unicodedata.normalize("NFC", stem), []).append(rel)
    return found


def _add(files: dict[str, list[tuple[str, str]]], scanned: dict[str, list[str]],
         origin: str) -> None:
    for image_id, paths in scanned.items():
        files.setdefault(image_id, []).extend((p, origin) for p in paths)


def _join(root: Path, kind: str, files: dict[str, list[tuple[str, str]]],
          labels: list[LabelRow]) -> Source:
    """Match photos ({id: [(path, origin), ...]}) with label rows. An id with several
    files gives one record per file, each rejected ``duplicate_id`` naming the others."""
    by_id = {r.image_id: r for r in labels}
    photos = []
    for image_id in sorted(files):
        entries = sorted(files[image_id])
        for path, origin in entries:
            others = [p for p, _ in entries if p != path]
            ambiguous = (f"duplicate_id: {len(entries)} files have id {image_id!r} (also "
                         f"{', '.join(others)}); rename all but one" if others else "")
            row = by_id.get(image_id)
            if row:
                photos.append(ImageRecord(image_id, path, row.label, row.patient_id, row.eye,
                                          row.origin or origin, ambiguous))
            else:
                patient, eye = patient_and_eye(image_id)
                photos.append(ImageRecord(image_id, path, None, patient, eye, origin,
                                          ambiguous))
    missing = [r for r in labels if r.image_id not in files]
    return Source(kind, root, photos, sorted(missing, key=lambda r: r.image_id))


def detect_kind(src: Path) -> str:
    if (src / "trainLabels.csv").is_file() or (src / "retinopathy_solution.csv").is_file():
        return "kaggle"
    if (src / "train.csv").is_file() and (src / "train_images").is_dir():
        return "aptos"
    if any((src / str(g)).is_dir() for g in GRADES):
        return "folders"
    raise SourceError(
        f"{src}: not a known layout (Kaggle train/ + trainLabels.csv, APTOS train.csv + "
        "train_images/, or folders 0/..4/); give --labels FILE for any other CSV")


def detect_source(src: Path, kind: str | None = None, labels: Path | None = None,
                  id_col: str = "image", label_col: str = "level",
                  patient_col: str | None = None) -> Source:
    """Find photos and labels under ``src``. ``labels`` given means kind ``csv``."""
    # Archives, object stores; local: pipeline.remote_source imports this module (a cycle).
    from pipeline.remote_source import detect_in_place

    found = detect_in_place(src, kind, labels, id_col, label_col, patient_col)
    if found is not None:
        return found
    return detect_local(src, kind, labels, id_col, label_col, patient_col)


def detect_local(src: Path, kind: str | None = None, labels: Path | None = None,
                 id_col: str = "image", label_col: str = "level",
                 patient_col: str | None = None) -> Source:
    """:func:`detect_source` for a local folder (``labels`` a local file)."""
    from pipeline.archive import read_labels_as  # errors name a fetched file by its URL

    src = Path(src)
    if not src.is_dir():
        raise SourceError(f"{src}: no such directory")
    if labels is not None:
        kind = "csv"
    kind = kind or detect_kind(src)
    if kind == "kaggle":
        files, rows = {}, []
        if (src / "trainLabels.csv").is_file():
            rows += read_labels(src / "trainLabels.csv", "image", "level", origin="train")
            _add(files, _scan(src / "train", src), "train")
        if (src / "retinopathy_solution.csv").is_file():
            rows += read_labels(src / "retinopathy_solution.csv", "image", "level",
                                extra_col="Usage", origin="test")
            _add(files, _scan(src / "test", src), "test")
        return _join(src, kind, files, rows)
    if kind == "aptos":
        rows = read_labels(src / "train.csv", "id_code", "diagnosis", origin="train")
        files = {}
        _add(files, _scan(src / "train_images", src), "train")
        return _join(src, kind, files, rows)
    if kind == "folders":
        files, rows = grade_folders(src, lambda g: _scan(src / str(g), src))
        return _join(src, kind, files, rows)
    if kind == "csv":
        if labels is None:
            raise SourceError("--labels FILE is needed for a CSV source")
        rows = read_labels_as(labels, id_col, label_col, patient_col)
        files = {}
        _add(files, _scan(src, src), "")
        return _join(src, kind, files, rows)
    raise SourceError(f"unknown source kind {kind!r} (kaggle, aptos, folders, csv)")
