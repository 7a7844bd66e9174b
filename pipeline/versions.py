"""Dataset versions: incremental runs of ``drpipe preprocess`` on a growing collection.

Every finished run commits a **version** (1, 2, ...). Shards are immutable once written: a
later version adds shards and stops *listing* the old shards it no longer serves, it never
rewrites one. The layout (docs/FORMAT.md, "Versions"):

    train-00000-of-00002.tfrecord          version 1's shards (the names of a single run)
    train-v0002-00000-of-00001.tfrecord    shards added by version 2
    versions/v0001/                        version 1 as a TFDS directory: hard links named
    versions/v0002/                          {split}-{i:05d}-of-{n:05d}.tfrecord to the shards
                                             it serves, drpipe_info.json, dataset_info.json,
                                             data_manifest.csv, version.json (counts, what
                                             changed), listing.json (what each photo was)
    versions/LATEST                        the latest version number
    dataset_info.json, drpipe_info.json    the latest version (TFDS reads it through a
                                             filepathTemplate into versions/vNNNN/)
    history.jsonl                          one JSON line per run, for schedulers

An incremental run compares the listing (path, label, file size) with the latest version's:
new, replaced (another path or size) and relabelled photos are processed; a removed photo
is dropped. A shard that holds a record of a removed, replaced or relabelled photo is not
served by the new version; its other records are copied (bytes as they are) into the new
version's shards, so TFDS and tf.data read exactly the current records without filtering.
Splits are stable: a patient keeps the split it had (:func:`pipeline.split.assign_splits`
with ``keep``); new patients are assigned by the same greedy, from the current counts.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline import manifest
from tfrecord_writer import info as output_info
from tfrecord_writer.example import iter_records, parse_example
from tfrecord_writer.files import atomic_write_bytes
from tfrecord_writer.writer import shard_name

VERSIONS = "versions"
LATEST = "LATEST"
HISTORY = "history.jsonl"
VERSION_FILE = "version.json"  # a version's marker, written last in its folder
LISTING_FILE = "listing.json"


def version_dir(out: str | Path, k: int) -> Path:
    return Path(out) / VERSIONS / f"v{k:04d}"


def latest_version(out: str | Path) -> int | None:
    """The latest committed version of ``out``, or None (no versions: a single run of drpipe
    0.1 or earlier, or no output)."""
    try:
        k = int((Path(out) / VERSIONS / LATEST).read_text().strip())
    except (OSError, ValueError):
        return None
    return k if (version_dir(out, k) / VERSION_FILE).is_file() else None


def resolve(data: str | Path, version: int | None = None) -> Path:
    """The directory readers open for ``data`` at ``version`` (default: the latest): a
    version folder, or ``data`` itself for an output without versions.

    Raises FileNotFoundError (one line) for a version that ``data`` does not have."""
    data = Path(data)
    latest = latest_version(data)
    if version is None:
        return version_dir(data, latest) if latest else data
    d = version_dir(data, version)
    if not (d / VERSION_FILE).is_file():
        have = f"versions 1-{latest}" if latest else "no versions"
        raise FileNotFoundError(f"{data} has no version {version} ({have})")
    return d


def listing(source, photos) -> dict[str, list]:
    """{image_id: [path, label, fingerprint]}: what an incremental run compares (the
    fingerprint is Source.fingerprint's, as in the input hash: a photo rewritten in place at
    the same size counts as replaced)."""
    out: dict[str, list] = {}
    for p in photos:  # several files of one id: each is listed, the id is ambiguous
        out.setdefault(p.image_id, []).append([p.path, p.label, source.fingerprint(p.path),
                                               p.ambiguous])
    return {i: v[0] if len(v) == 1 else [v[0][0], v[0][1], repr(v), "ambiguous"]
            for i, v in out.items()}


def diff(old: dict, new: dict) -> dict[str, list[str]]:
    """What changed between two listings: added, removed, replaced (path or size),
    relabelled (label only); sorted ids."""
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    replaced, relabelled = [], []
    for i in sorted(set(new) & set(old)):
        a, b = old[i], new[i]
        if a[0] != b[0] or a[2] != b[2] or a[3:] != b[3:]:
            replaced.append(i)
        elif a[1] != b[1]:
            relabelled.append(i)
    return {"added": added, "removed": removed, "replaced": replaced,
            "relabelled": relabelled}


def read_rows(d: Path) -> list[dict]:
    return pq.read_table(d / "manifest.parquet").to_pylist()


def patient_splits(rows: list[dict]) -> dict[str, str]:
    """{patient_id: split} of a version's manifest (every row with a split)."""
    return {r["patient_id"]: r["split"] for r in rows if r.get("split")}


def write_version(out: Path, k: int, info: dict, rows: list[dict], photo_listing: dict,
                  changes: dict) -> None:
    """Commit version ``k``: its folder (links, manifest, TFDS and drpipe info, listing,
    version.json last), then ``versions/LATEST``."""
    d = version_dir(out, k)
    d.mkdir(parents=True, exist_ok=True)
    local = {}
    for split, v in info["splits"].items():
        files = []
        for i, f in enumerate(v["shards"]):
            name = shard_name(split, i, len(v["shards"]))
            link = d / name
            if link.exists() or link.is_symlink():
                link.unlink()
            try:
                os.link(out / f["name"], link)
            except OSError:  # a file system without hard links
                os.symlink(os.path.join("..", "..", f["name"]), link)
            files.append(dict(f, name=name, file=f["name"]))
        local[split] = dict(v, shards=files)
    manifest.write(rows, d)
    atomic_write_bytes(d / LISTING_FILE, json.dumps(photo_listing).encode())
    own = {key: v for key, v in info.items() if key != "tfds_template"}
    output_info.write_info(d, dict(own, splits=local))
    record = {"version": k, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "counts": info["counts"],
              "shards": {s: [f["name"] for f in v["shards"]] for s, v in info["splits"].items()},
              "changes": {key: len(v) for key, v in changes.items()},
              "changed_ids": changes}
    atomic_write_bytes(d / VERSION_FILE, json.dumps(record, indent=1).encode())
    atomic_write_bytes(Path(out) / VERSIONS / LATEST, f"{k}\n".encode())


def tfds_template(k: int) -> str:
    return f"{VERSIONS}/v{k:04d}/{{SPLIT}}-{{SHARD_X_OF_Y}}.{{FILEFORMAT}}"


# The keys of every history.jsonl line drpipe writes (history_entry).
HISTORY_KEYS = frozenset({"time", "exit_status", "version", "noop", "added", "changed",
                          "removed", "rejected", "photos", "ok", "duration_s"})


def append_history(out: str | Path, entry: dict) -> None:
    """One JSON line per run appended to ``out/history.jsonl`` (O_APPEND: whole lines)."""
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    try:
        fd = os.open(Path(out) / HISTORY,
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError:
        return
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def history_entry(out: str | Path, status: int, summary: dict | None, started: float) -> None:
    """Append the line of one ``drpipe preprocess`` run to ``out``'s history: only in a
    drpipe output (a state file there, or the lock held by another run), never in a folder
    a run refused."""
    from pipeline.job import STATE_FILE  # local: pipeline.job imports this module (a cycle)

    if not (Path(out) / STATE_FILE).exists() and status != 75:
        return
    s = summary or {}
    c = s.get("changes") or {}
    append_history(out, {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "exit_status": status, "version": s.get("version"),
        "noop": bool(s.get("already_complete")),
        "added": 0 if s.get("already_complete") else c.get("added", 0),
        "changed": 0 if s.get("already_complete") else
        c.get("replaced", 0) + c.get("relabelled", 0),
        "removed": 0 if s.get("already_complete") else c.get("removed", 0),
        "rejected": s.get("rejected"), "photos": s.get("photos"), "ok": s.get("ok"),
        "duration_s": round(time.time() - started, 2)})


def version_shard_name(k: int):
    def name(split: str, index: int, count: int) -> str:
        return f"{split}-v{k:04d}-{index:05d}-of-{count:05d}.tfrecord"
    return name


def read_records(path: Path, ids: set[str]) -> dict[str, bytes]:
    """The serialised records of ``ids`` in shard ``path`` (bytes as stored)."""
    out = {}
    for data in iter_records(path):
        i = parse_example(data)["image/id"]
        i = i.decode() if isinstance(i, bytes) else str(i)
        if i in ids:
            out[i] = data
    return out


def shuffle_order(n: int, seed: int, split_int: int, k: int) -> np.ndarray:
    return np.random.default_rng([seed, split_int, k]).permutation(n)
