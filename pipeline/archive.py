"""Zip archives read in place: Kaggle's byte-split volumes (``train.zip.001`` ...) or one zip.

    open_archive([part, ...]) -> Archive     # the client: central directory read once
    archive.batch(paths) -> MemberReader      # shipped to a worker with one batch of photos
    reader.read(path) -> bytes | Rejection    # the worker: one ranged read per member

Kaggle ships EyePACS as ``train.zip.001``-``.005`` and ``test.zip.001``-``.007``: byte-split
volumes (7-Zip style) of one ordinary Zip64 archive, so their concatenation is a valid zip
whose central directory sits at the end of the last part and whose "disk numbers" are all
0. Nothing is extracted and no ``ZipFile`` is opened per task: the client parses the end
records (EOCD, Zip64 locator and record) and the central directory once; a worker reads a
member's local header and data with one read (per part it spans), inflates it (raw deflate)
or takes the stored bytes, and checks its CRC-32 and size (a mismatch is the rejection
``corrupt``). Deflate64, encrypted members and other methods are rejected with the reason.

The parts are checked before any work, since ``zipfile`` silently mis-reads a set with a
middle part missing: their numbering (``.001`` up, no gap), the equal size of all but the
last, the end records at the end of the last part, the central directory's declared
position against where the end records really are (a missing, short or extra part shifts
it), and, in each part, the local header of the first member that starts there (a
reordered or foreign part). Each refusal names the part (:class:`ArchiveError`).

A photo's ``path`` (manifest column) is the member's name inside the archive, e.g.
``train/10_left.jpeg``: the path it has relative to ``--src`` once extracted, so a run on
the parts and a run on the extracted folder write the same manifest.
"""

from __future__ import annotations

import atexit
import io
import os
import re
import shutil
import struct
import tempfile
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from pipeline import sources as S
from pipeline import storage
from pipeline.process import Rejection
from pipeline.sources import IMAGE_SUFFIXES, LabelError, SourceError, read_labels

try:  # ISA-L's inflate: the same bytes, faster than zlib's (deflated members cost ~a decode)
    from isal import isal_zlib as _inflate
except ImportError:  # pragma: no cover - isal has wheels for the usual platforms
    _inflate = zlib

EOCD_SIG = b"PK\x05\x06"
Z64_LOCATOR_SIG = b"PK\x06\x07"
Z64_EOCD_SIG = b"PK\x06\x06"
CDIR_SIG = b"PK\x01\x02"
LOCAL_SIG = b"PK\x03\x04"
LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # 30 bytes
CDIR_ENTRY = struct.Struct("<4sHHHHHHIIIHHHHHII")  # 46 bytes
EOCD = struct.Struct("<4sHHHHIIH")  # 22 bytes
Z64_LOCATOR = struct.Struct("<4sIQI")  # 20 bytes
Z64_EOCD = struct.Struct("<4sQHHIIQQQQ")  # 56 bytes
METHODS = {0: "stored", 8: "deflate"}
METHOD_NAMES = {1: "Shrink", 6: "Implode", 9: "Deflate64", 12: "bzip2", 14: "LZMA",
                93: "Zstandard", 95: "XZ", 99: "AES (WinZip encryption)"}
PART_NAME = re.compile(r"^(?P<stem>.+\.zip)\.(?P<num>\d{3,})$", re.IGNORECASE)
_SLACK = 64  # extra bytes read after a member: a local extra field longer than the central one


class ArchiveError(SourceError):
    """The parts do not form a readable archive; the message names the part (exit 3)."""


@dataclass(frozen=True)
class Part:
    url: str  # a local path or an fsspec URL
    size: int

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]


# member: (local header offset, compressed size, uncompressed size, method, crc32, flags)
Member = tuple


class Parts:
    """The parts as one byte string: ``read(offset, length)`` with one read per part."""

    def __init__(self, parts: list[Part], storage_options: dict | None = None):
        self.parts = list(parts)
        self.storage_options = dict(storage.OPTIONS if storage_options is None
                                    else storage_options)
        self.starts = []
        pos = 0
        for p in self.parts:
            self.starts.append(pos)
            pos += p.size
        self.size = pos

    def read(self, offset: int, length: int) -> bytes:
        out = []
        end = min(offset + length, self.size)
        for p, start in zip(self.parts, self.starts, strict=True):
            lo, hi = max(offset, start), min(end, start + p.size)
            if lo < hi:
                out.append(storage.read_range(p.url, lo - start, hi - start,
                                              self.storage_options))
        return b"".join(out)

    def part_at(self, offset: int) -> int:
        for i in range(len(self.parts) - 1, -1, -1):
            if offset >= self.starts[i]:
                return i
        return 0


class Archive:
    """A zip's central directory: ``members`` {name: Member}, in the archive's order."""

    def __init__(self, parts: Parts, members: dict[str, Member]):
        self.parts = parts
        self.members = members

    @property
    def name(self) -> str:
        first = self.parts.parts[0].name
        m = PART_NAME.match(first)
        return m.group("stem") if m else first

    def batch(self, names) -> MemberReader:
        """What a worker needs to read these members, and nothing more."""
        return MemberReader(self.parts.parts, {n: self.members[n] for n in names},
                            self.parts.storage_options)


class MemberReader:
    """Shipped to a worker: the parts and the directory entries of one batch's members."""

    def __init__(self, parts: list[Part], members: dict[str, Member],
                 storage_options: dict | None = None):
        self.parts = list(parts)
        self.members = members
        self.storage_options = dict(storage.OPTIONS if storage_options is None
                                    else storage_options)

    def read(self, name: str, max_bytes: int | None = None) -> bytes | Rejection:
        """The member's bytes, checked against its CRC-32 and size, or why not. Never raises.
        A member larger than ``max_bytes`` is ``too_large`` from the directory, unread."""
        offset, csize, usize, method, crc, flags = self.members[name]
        if max_bytes is not None and max(usize, csize) > max_bytes:
            return Rejection("too_large", f"archive member of {usize / 2**20:.0f} MB, over "
                                          f"the {max_bytes / 2**20:.0f} MB limit "
                                          "(--max-file-mb)")
        if flags & 0x1:
            return Rejection("unreadable", "encrypted archive member")
        if method not in METHODS:
            what = METHOD_NAMES.get(method, f"method {method}")
            return Rejection("unreadable", f"archive member compressed with {what} "
                                           f"(method {method}); only stored and deflate")
        parts = Parts(self.parts, self.storage_options)
        want = LOCAL_HEADER.size + len(name.encode("utf-8")) + csize + _SLACK
        try:
            blob = parts.read(offset, want)
            if len(blob) < LOCAL_HEADER.size or blob[:4] != LOCAL_SIG:
                return Rejection("corrupt", f"no local header at offset {offset} of the archive")
            fields = LOCAL_HEADER.unpack_from(blob)
            n_name, n_extra = fields[9], fields[10]
            start = LOCAL_HEADER.size + n_name + n_extra
            if _decode_name(blob[LOCAL_HEADER.size:LOCAL_HEADER.size + n_name],
                            fields[2]) != name:
                return Rejection("corrupt", "the local header names another member")
            if start + csize > len(blob):
                blob += parts.read(offset + len(blob), start + csize - len(blob))
        except OSError as e:
            return Rejection("unreadable", f"reading the archive: {e.strerror or e}")
        data = blob[start:start + csize]
        if len(data) != csize:
            return Rejection("truncated", f"archive member cut short ({len(data)} of {csize} "
                                          "bytes)")
        if method == 8:
            d = _inflate.decompressobj(-15)
            try:
                data = d.decompress(data, usize + 1) if usize else d.decompress(data)
            except (zlib.error, _inflate.error) as e:
                return Rejection("corrupt", f"archive member does not inflate ({e})")
            if not d.eof and len(data) <= usize:
                return Rejection("corrupt", "archive member's deflate stream ends early")
        if len(data) != usize:
            return Rejection("corrupt", f"archive member is {len(data)} bytes, the directory "
                                        f"says {usize}")
        got = _inflate.crc32(data)
        if got != crc:
            return Rejection("corrupt", f"archive member CRC-32 {got:08x}, the directory says "
                                        f"{crc:08x}")
        return data


def _decode_name(raw: bytes, flags: int) -> str:
    return raw.decode("utf-8" if flags & 0x800 else "cp437")


# ---------------------------------------------------------------------------- the parts


def find_parts(names: list[str], stem: str) -> list[str] | None:
    """Of the file ``names`` in a folder, the volumes of ``stem`` (``train.zip``) in order:
    ``[stem]`` for one zip, ``stem.001`` ... for split volumes, None if neither. Raises
    ArchiveError for a gap in the numbering, naming the missing part."""
    by_lower = {n.lower(): n for n in names}
    numbered = {}
    for n in names:
        m = PART_NAME.match(n)
        if m and m.group("stem").lower() == stem.lower():
            numbered[int(m.group("num"))] = n
    if not numbered:
        single = by_lower.get(stem.lower())
        return [single] if single else None
    if stem.lower() in by_lower:
        raise ArchiveError(f"both {by_lower[stem.lower()]} and split volumes "
                           f"{numbered[min(numbered)]}... are here: keep one of them")
    width = len(PART_NAME.match(numbered[min(numbered)]).group("num"))
    for k in range(1, max(numbered) + 1):
        if k not in numbered:
            have = ", ".join(numbered[i] for i in sorted(numbered))
            raise ArchiveError(f"{stem}.{k:0{width}d} is missing (have {have})")
    return [numbered[k] for k in sorted(numbered)]


def open_archive(parts: list[Part], storage_options: dict | None = None) -> Archive:
    """Check the parts against the archive's own layout and read the central directory."""
    if not parts:
        raise ArchiveError("no archive parts")
    ps = Parts(parts, storage_options)
    label = parts[-1].name
    eocd_pos, eocd = _find_eocd(ps)
    if eocd_pos is None:
        raise ArchiveError(_no_end_record(ps))
    _check_sizes(parts)
    _, disk, cd_disk, n_disk, n_total, cd_size, cd_offset, _ = eocd
    end_of_cd = eocd_pos  # where the central directory must end
    total_disks = 1
    loc = ps.read(eocd_pos - Z64_LOCATOR.size, Z64_LOCATOR.size) if eocd_pos >= 20 else b""
    if loc[:4] == Z64_LOCATOR_SIG:
        _, z64_disk, z64_offset, total_disks = Z64_LOCATOR.unpack(loc)
        rec_pos = _find_z64_record(ps, eocd_pos - Z64_LOCATOR.size)
        if rec_pos is None:
            raise ArchiveError(f"{label}: a Zip64 locator without its Zip64 end record "
                               "(a part is missing or short)")
        rec = Z64_EOCD.unpack(ps.read(rec_pos, Z64_EOCD.size))
        _, _, _, _, disk, cd_disk, n_disk, n_total, cd_size, cd_offset = rec
        if rec_pos != z64_offset:
            raise ArchiveError(_shift_message(ps, rec_pos - z64_offset))
        if z64_disk != 0:
            total_disks = max(total_disks, 2)
        end_of_cd = rec_pos
    if disk or cd_disk or total_disks != 1:
        raise ArchiveError(f"{label}: a spanned multi-disk zip (disk numbers are not 0, PKZIP "
                           "'.z01' style); join it with `zip -s 0` first")
    if cd_offset + cd_size != end_of_cd:
        raise ArchiveError(_shift_message(ps, end_of_cd - (cd_offset + cd_size)))
    members = _read_directory(ps, cd_offset, cd_size, n_total, label)
    _probe_parts(ps, members)
    return Archive(ps, members)


def _check_sizes(parts: list[Part]) -> None:
    """Byte-split volumes are all one size but the last."""
    if len(parts) < 2:
        return
    first = parts[0].size
    for p in parts[1:-1]:
        if p.size != first:
            raise ArchiveError(f"{p.name} is {p.size} bytes, {parts[0].name} {first}: "
                               f"{p.name} is {'short (truncated download?)' if p.size < first else 'not one of these volumes'}")  # noqa: E501
    if parts[-1].size == 0:  # any other size: `split -n` puts the remainder in the last
        raise ArchiveError(f"{parts[-1].name} is empty")


def _find_eocd(ps: Parts, end: int | None = None):
    """(position, fields) of the end-of-central-directory record ending exactly at ``end``."""
    end = ps.size if end is None else end
    n = min(end, EOCD.size + 0xFFFF)
    tail = ps.read(end - n, n)
    i = tail.rfind(EOCD_SIG)
    while i >= 0:
        if i + EOCD.size <= len(tail):
            fields = EOCD.unpack_from(tail, i)
            if i + EOCD.size + fields[7] == len(tail):
                return end - n + i, fields
        i = tail.rfind(EOCD_SIG, 0, i)
    return None, None


def _find_z64_record(ps: Parts, locator_pos: int) -> int | None:
    pos = locator_pos - Z64_EOCD.size
    if pos >= 0 and ps.read(pos, 4) == Z64_EOCD_SIG:
        return pos
    n = min(locator_pos, 0x10000)  # a record with an extensible data sector
    blob = ps.read(locator_pos - n, n)
    i = blob.rfind(Z64_EOCD_SIG)
    return None if i < 0 else locator_pos - n + i


def _no_end_record(ps: Parts) -> str:
    last = ps.parts[-1].name
    for i in range(len(ps.parts) - 2, -1, -1):  # an extra part after the archive's end?
        end = ps.starts[i] + ps.parts[i].size
        if _find_eocd(ps, end)[0] is not None:
            extra = ", ".join(p.name for p in ps.parts[i + 1:])
            return (f"{extra}: extra part(s), the archive ends with {ps.parts[i].name}")
    if len(ps.parts) == 1:
        return f"{last}: not a zip archive, or truncated (no end-of-archive record at its end)"
    return (f"{last}: no end-of-archive record at its end: the last part is truncated, or "
            "later parts are missing")


def _shift_message(ps: Parts, shift: int) -> str:
    n = len(ps.parts)
    what = f"{-shift} bytes fewer" if shift < 0 else f"{shift} bytes more"
    where = ps.parts[0].name if n == 1 else f"the {n} parts ({ps.parts[0].name} ...)"
    return (f"{where} hold {what} than the archive's directory expects: a part is missing, "
            "short or extra" + ("" if n > 1 else " (truncated, or not one archive)"))


def _read_directory(ps: Parts, cd_offset: int, cd_size: int, n_total: int,
                    label: str) -> dict[str, Member]:
    blob = ps.read(cd_offset, cd_size)
    members: dict[str, Member] = {}
    pos, count = 0, 0
    while pos + CDIR_ENTRY.size <= len(blob):
        f = CDIR_ENTRY.unpack_from(blob, pos)
        if f[0] != CDIR_SIG:
            raise ArchiveError(f"{label}: damaged central directory at entry {count}")
        (_, _, _, flags, method, _, _, crc, csize, usize, n_name, n_extra, n_comment,
         disk, _, _, offset) = f
        p = pos + CDIR_ENTRY.size
        name = _decode_name(blob[p:p + n_name], flags)
        extra = blob[p + n_name:p + n_name + n_extra]
        if 0xFFFFFFFF in (csize, usize, offset) or disk == 0xFFFF:
            usize, csize, offset, disk = _zip64_extra(extra, usize, csize, offset, disk, name,
                                                      label)
        if disk != 0:
            raise ArchiveError(f"{label}: {name} is on disk {disk}: a spanned multi-disk zip; "
                               "join it with `zip -s 0` first")
        if not name.endswith("/"):
            if name in members:  # which of the two is the photo is unknown: never guess
                raise ArchiveError(f"{label}: two members are named {name!r} (an archive "
                                   "appended to); rebuild it with one member per name")
            members[name] = (offset, csize, usize, method, crc, flags)
        pos = p + n_name + n_extra + n_comment
        count += 1
    if count != n_total or pos != len(blob):
        raise ArchiveError(f"{label}: the central directory holds {count} entries, its end "
                           f"record says {n_total}")
    return members


def _zip64_extra(extra: bytes, usize, csize, offset, disk, name, label):
    i = 0
    while i + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, i)
        if tag == 0x0001:
            vals, j = [], i + 4
            for v, width in ((usize, 8), (csize, 8), (offset, 8), (disk, 4)):
                full = 0xFFFF if width == 4 else 0xFFFFFFFF
                if v == full:
                    vals.append(int.from_bytes(extra[j:j + width], "little"))
                    j += width
                else:
                    vals.append(v)
            if j > i + 4 + size:
                break
            return tuple(vals)
        i += 4 + size
    raise ArchiveError(f"{label}: {name}: sizes too large for a plain zip entry but no Zip64 "
                       "extra field")


def _probe_parts(ps: Parts, members: dict[str, Member]) -> None:
    """In each part, the first member whose local header starts there must be there: a
    reordered, replaced or shifted part is refused before any work (one small read per
    part; a part in which no header starts is covered by the members' CRCs)."""
    if len(ps.parts) < 2:
        return
    first_in_part: dict[int, tuple[int, str]] = {}
    for name, m in members.items():
        k = ps.part_at(m[0])
        if k not in first_in_part or m[0] < first_in_part[k][0]:
            first_in_part[k] = (m[0], name)
    for k in sorted(first_in_part):
        offset, name = first_in_part[k]
        raw_name = name.encode("utf-8")
        head = ps.read(offset, LOCAL_HEADER.size + len(raw_name) + 4)
        fields = LOCAL_HEADER.unpack_from(head) if len(head) >= LOCAL_HEADER.size else None
        ok = fields is not None and fields[0] == LOCAL_SIG and _decode_name(
            head[LOCAL_HEADER.size:LOCAL_HEADER.size + fields[9]], fields[2]) == name
        if not ok:
            raise ArchiveError(f"{ps.parts[k].name} does not hold what the archive's directory "
                               f"places there ({name} at byte {offset - ps.starts[k]}): parts "
                               "out of order, or from another download")


# ---------------------------------------------------------------------------- as a source


class ArchiveSource:
    """The archives of one ``--src`` and where each photo is: {path: archive index}."""

    def __init__(self, archives: list[Archive]):
        self.archives = archives
        self.where: dict[str, int] = {}
        for i, a in enumerate(archives):
            for name in a.members:
                self.where.setdefault(name, i)

    def member(self, path: str) -> Member:
        return self.archives[self.where[path]].members[path]

    def fingerprint(self, path: str) -> str:
        """What the input fingerprint takes from a member: its CRC-32 and size, no stat."""
        m = self.member(path)
        return f"{m[4]:08x}:{m[2]}"

    def batch(self, paths) -> BatchReader:
        by_archive: dict[int, list[str]] = {}
        for p in paths:
            by_archive.setdefault(self.where[p], []).append(p)
        return BatchReader({i: self.archives[i].batch(ps) for i, ps in by_archive.items()},
                           {p: self.where[p] for p in paths})


class BatchReader:
    """One batch's members, from one or more archives (``read(path)``, as MemberReader)."""

    def __init__(self, readers: dict[int, MemberReader], where: dict[str, int]):
        self.readers = readers
        self.where = where

    def read(self, path: str, max_bytes: int | None = None) -> bytes | Rejection:
        return self.readers[self.where[path]].read(path, max_bytes)


KAGGLE_ARCHIVES = (("train.zip", "train", "trainLabels.csv", None),
                   ("test.zip", "test", "retinopathy_solution.csv", "Usage"))


def detect_archive_source(src, kind=None, labels=None, id_col="image", label_col="level",
                          patient_col=None, storage_options=None):
    """A Source for Kaggle's parts in a folder (``train.zip.001`` ..., ``test.zip.001`` ...,
    labels beside them as ``.csv`` or ``.csv.zip``) or for one ``.zip``; None when ``src``
    is neither (the folder layouts). An extracted ``train/`` or ``test/`` beside the parts
    wins: the archives are then ignored, as before."""
    src = str(src)
    listing = storage.listdir(src, storage_options)
    single = None
    if not listing:
        if not src.lower().endswith(".zip"):
            return None
        try:
            single = Part(src, storage.size(src, storage_options))
        except (OSError, FileNotFoundError):
            return None
        folder = src.rsplit("/", 1)[0] if "/" in src else "."
        listing = storage.listdir(folder, storage_options)
    else:
        folder = src
        if not storage.is_url(src) and any(os.path.isdir(os.path.join(src, d))
                                           for d in ("train", "test")):
            return None
    groups = []  # (archive, origin, labels name, extra column)
    if single is not None:
        groups.append(([single], None, None, None))
    else:
        for stem, origin, label_name, extra in KAGGLE_ARCHIVES:
            names = find_parts(list(listing), stem)
            if names:
                parts = [Part(storage.join(folder, n), listing[n] if storage.is_url(folder)
                              else storage.size(storage.join(folder, n))) for n in names]
                groups.append((parts, origin, label_name, extra))
        if not groups:
            return None
    if labels is not None:
        kind = "csv"
    if kind not in (None, "kaggle", "csv"):
        raise S.SourceError(f"{src}: archives hold the Kaggle layout (train/, test/) or any "
                            f"layout with --labels; --source {kind} needs a folder")
    archives = [open_archive(parts, storage_options) for parts, *_ in groups]
    source = ArchiveSource(archives)
    if kind == "csv":
        rows = read_labels_as(_local_labels(labels, storage_options), id_col, label_col,
                              patient_col)
        files = {}
        for a in archives:
            S._add(files, photos_by_id(a.members, ""), "")
        return _with_archive(S._join(_root(src), "csv", files, rows), source)
    files, rows = {}, []
    for a, (_, origin, label_name, extra) in zip(archives, groups, strict=True):
        wanted = [(origin, label_name, extra)] if origin else [
            (o, n, e) for _, o, n, e in KAGGLE_ARCHIVES]
        for o, label_name_, extra_ in wanted:
            found = photos_by_id(a.members, o + "/")
            path = _find_labels(folder, listing, label_name_, a, storage_options)
            if path is None:
                continue
            rows += read_labels_as(path, "image", "level", extra_col=extra_, origin=o)
            S._add(files, found, o)
    nested = sorted(n for a in archives for n in a.members if PART_NAME.match(n.rsplit("/")[-1]))
    if not rows and nested:
        raise S.SourceError(f"{src}: an outer download holding Kaggle's volumes ({nested[0]}, "
                            "...) compressed; unzip it first (unzip FILE 'train.zip.*' "
                            "trainLabels.csv.zip) and give the folder as --src")
    if not rows:
        raise S.SourceError(f"{src}: archives without their labels (trainLabels.csv[.zip] "
                            "beside train.zip, retinopathy_solution.csv[.zip] beside "
                            "test.zip); or give --labels FILE")
    return _with_archive(S._join(_root(src), "kaggle", files, rows), source)


def _root(src: str):
    return src if storage.is_url(src) else Path(src)


def _with_archive(source, archive: ArchiveSource):
    source.reader = archive
    return source


def photos_by_id(names, prefix: str) -> dict[str, list[str]]:
    """{image id: [names]} for the photos among ``names`` (``/``-separated paths: archive
    members, objects in a store) under ``prefix`` (e.g. ``train/``), as
    :func:`pipeline.sources._scan` finds them in a folder: os.walk order, hidden entries
    skipped, NFC ids, every name of an id kept (several are each rejected ``duplicate_id``)."""
    found: dict[str, list[str]] = {}
    for name in sorted((n for n in names if n.startswith(prefix)), key=_walk_order):
        parts = name[len(prefix):].split("/")
        if any(p.startswith(".") for p in parts):
            continue
        stem, ext = os.path.splitext(parts[-1])
        if ext.lower() in IMAGE_SUFFIXES:
            found.setdefault(unicodedata.normalize("NFC", stem), []).append(name)
    return found


def _walk_order(name: str):
    """os.walk's order as _scan uses it: a folder's files (by name) before its subfolders."""
    parts = name.split("/")
    return [(1, p) for p in parts[:-1]] + [(0, parts[-1])]


def _find_labels(folder, listing, name, archive: Archive, storage_options):
    """A labels file beside the archive (``name`` or ``name.zip``) or inside it, as a local
    path (client side only: labels are small)."""
    if name in listing:
        return _local_labels(storage.join(folder, name), storage_options)
    if name + ".zip" in listing:
        return _labels_from_zip(storage.join(folder, name + ".zip"), name, storage_options)
    if name in archive.members:
        data = archive.batch([name]).read(name)
        if isinstance(data, Rejection):
            raise ArchiveError(f"{archive.name}: {name}: {data}")
        return _temp_file(name, data, f"{archive.name}:{name}")
    return None


def _local_labels(path, storage_options):
    if path is None or not storage.is_url(str(path)):
        return path
    url = str(path)
    return _temp_file(url.rsplit("/", 1)[-1],
                      storage.read_range(url, 0, storage.size(url, storage_options),
                                         storage_options), url)


def _labels_from_zip(url: str, name: str, storage_options):
    data = storage.read_range(url, 0, storage.size(url, storage_options), storage_options)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            inner = [n for n in z.namelist() if n.rsplit("/", 1)[-1] == name] or z.namelist()
            return _temp_file(name, z.read(inner[0]), f"{url}:{inner[0]}")
    except (zipfile.BadZipFile, IndexError, KeyError) as e:
        raise ArchiveError(f"{url}: not a zip holding {name} ({e})") from None


class _Fetched(type(Path())):
    """A labels file fetched to a temporary folder (removed at exit), and what to call it."""

    shown: str = ""


def _temp_file(name: str, data: bytes, shown: str | None = None):
    d = tempfile.mkdtemp(prefix="drpipe-labels-")
    atexit.register(shutil.rmtree, d, True)
    p = _Fetched(d, name)
    p.shown = shown or name
    p.write_bytes(data)
    return p


def read_labels_as(path, *args, **kw):
    """:func:`pipeline.sources.read_labels`; errors name the file as the user knows it (the
    URL, ``trainLabels.csv.zip``), not the temporary copy."""
    try:
        return read_labels(path, *args, **kw)
    except LabelError as e:
        shown = getattr(path, "shown", "")
        raise (LabelError(str(e).replace(str(path), shown)) if shown else e) from None
