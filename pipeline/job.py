"""``drpipe preprocess``: raw photos -> patient-safe splits -> sharded TFRecords + manifest.

The life of a run, and what makes it safe to schedule, kill and re-run:

1. Lock ``--out`` (``flock``: released by the kernel if the process dies) and compare the
   configuration and the input listing with the state file a previous run left: same ->
   resume, different -> refuse unless ``--overwrite``; finished -> nothing to do.
2. Find photos and labels (:mod:`pipeline.sources`) and assign splits from the labels
   (:mod:`pipeline.split`).
3. Cut the photos, in id order, into fixed batches (independent of the number of workers)
   and process them on Dask workers (:func:`process_batch`: bytes in, serialised records
   and manifest rows out; TensorFlow is never imported there). The client commits each
   batch to ``.staging/`` atomically; a resumed run skips committed batches.
4. Order each split's records by a seeded shuffle, cut them into shards of about
   ``--shard-size`` MB by size alone, and write each shard under a temporary name, renamed
   when complete. Shards already committed by an interrupted run are identical and kept.
5. Write the manifest, then drpipe's ``drpipe_info.json`` and the TensorFlow Datasets files
   (:mod:`tfrecord_writer.info`), ``dataset_info.json`` last — its presence marks a finished
   run — and remove the staging area.

The same inputs and configuration give byte-identical shards and manifest, whatever the
number of workers or the cluster.

Dask and distributed are imported only where a cluster is used (about a second of imports,
which an in-process incremental run never pays); TensorFlow never.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pipeline import manifest, storage, versions
from pipeline.process import ProcessConfig, ProcessedImage, Rejection, process, read_photo
from pipeline.quality import quality_row
from pipeline.sources import Source, SourceError, detect_source
from pipeline.split import assign_splits
from tfrecord_writer import info as output_info
from tfrecord_writer.example import serialize_example
from tfrecord_writer.files import TMP_SUFFIX, atomic_write_bytes, file_sha256, remove_temporaries
from tfrecord_writer.info import drpipe_version
from tfrecord_writer.schema import FEATURES, N_GRADES, Record
from tfrecord_writer.writer import ShardWriter, plan_shards, shard_name

BATCH_SIZE = 32  # photos per Dask task: ~1 s of work, small enough to bound memory
STATE_FILE = ".drpipe-state.json"
LOCK_FILE = ".drpipe.lock"
STAGING = ".staging"
INFO_FILE = output_info.INFO_FILE
OWN_FILES = {STATE_FILE, LOCK_FILE, STAGING, INFO_FILE, "data_manifest.csv",
             "manifest.parquet", *output_info.FILES, versions.VERSIONS, versions.HISTORY}


class JobError(RuntimeError):
    """The run cannot proceed; the message is the one line a user sees."""


class LockHeld(JobError):
    """Another run holds ``--out``: this one is skipped (exit 75, EX_TEMPFAIL)."""


@dataclass(frozen=True)
class JobConfig:
    """Everything that determines the output bytes (and nothing that does not)."""

    src: str = "raw"
    out: str = "shards"
    process: ProcessConfig = field(default_factory=ProcessConfig)
    split: dict = field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    seed: int = 0
    shard_size_mb: float = 128.0
    source_kind: str | None = None
    labels: str | None = None
    id_col: str = "image"
    label_col: str = "level"
    patient_col: str | None = None
    limit: int | None = None
    follow_links: bool = False  # read symlinks that lead outside src (else outside_source)
    split_quota: str | None = None  # "floor": exact per-grade quotas (pipeline.split_quota)

    def output_config(self) -> dict:
        """The configuration as stored with the data (paths made absolute)."""
        d = dataclasses.asdict(self)
        d["src"] = _absolute(self.src)
        d["labels"] = _absolute(self.labels) if self.labels else None
        del d["out"]
        if d["split_quota"] is None:  # absent unless given: earlier outputs keep their hash
            del d["split_quota"]
        return d

    def hash(self) -> str:
        blob = json.dumps(self.output_config(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _absolute(path: str) -> str:
    """A local path made absolute; a URL (s3://, gs://) as it is."""
    return path if "://" in str(path) else str(Path(path).resolve())


@dataclass
class RunOptions:
    """How to run, not what to produce: never part of the configuration hash."""

    workers: int | None = None
    scheduler: str | None = None
    strict: bool = False
    overwrite: bool = False
    quiet: bool = False


# ---------------------------------------------------------------------------- worker side


def process_batch(root: str, items: list[dict], config: ProcessConfig,
                  confine: bool = True) -> dict:
    """Process photos on a worker. Returns {"rows": [...], "records": [bytes|None, ...],
    "maxrss_mb": float, "tensorflow_loaded": bool}. Never raises for a bad photo.

    ``confine``: a photo whose path (through symlinks, of files or folders) leads outside
    ``root`` is rejected ``outside_source`` without being read."""
    cv2.setNumThreads(1)  # one task per worker process: no oversubscription
    rows, records = [], []
    for it in items:
        row = _blank_row(it)
        record = None
        if hasattr(root, "read"):  # an archive member or an object in a store
            data = root.read(it["path"], config.max_bytes)
        else:
            data = (outside_source(root, it["path"]) if confine else None) or read_photo(
                Path(root, it["path"]), config.max_bytes)
        if isinstance(data, Rejection):
            result = data
        else:
            row["sha256"] = hashlib.sha256(data).hexdigest()
            row["bytes"] = len(data)
            # several files share this id: which one the label is for is unknown
            result = (Rejection(*it["ambiguous"].split(": ", 1)) if it.get("ambiguous")
                      else process(data, config))
        if getattr(result, "quality", None) is not None:
            row.update(quality_row(result.quality))
        if isinstance(result, ProcessedImage):
            c = result.circle
            row.update(width=result.original_width, height=result.original_height,
                       retina_cx=round(c.cx, 2), retina_cy=round(c.cy, 2),
                       retina_r=round(c.r, 2))
            if it["label"] is None:
                row.update(status="rejected", reason="no_label: no label row for this photo")
            else:
                record = serialize_example(Record(
                    result.encoded, result.format, result.height, result.width, it["label"],
                    it["image_id"], it["patient_id"], it["eye"], row["sha256"],
                    result.quality.score, result.quality.verdict).features())
        else:
            row.update(status="rejected", reason=str(result))
        rows.append(row)
        records.append(record)
    return {"rows": rows, "records": records,
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tensorflow_loaded": "tensorflow" in sys.modules}


def _blank_row(it: dict) -> dict:
    return dict(it, status="ok", reason="", sha256="", bytes=None, width=None, height=None,
                retina_cx=None, retina_cy=None, retina_r=None, **quality_row(None))


def outside_source(root: str, rel: str) -> Rejection | None:
    """The rejection of a path under ``root`` that resolves (through symlinks) outside it;
    None for a path inside, or a broken link (reported as unreadable when read)."""
    path = os.path.join(root, rel)
    if not os.path.exists(path):
        return None
    real, top = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, top]) == top:
        return None
    return Rejection("outside_source", f"a symlink to {real}, outside the source folder "
                                       "(--follow-links reads it)")


# ---------------------------------------------------------------------------- client side


class _Lock:
    def __init__(self, out: Path):
        self.path = out / LOCK_FILE
        self.f = None
        self.created = False

    def __enter__(self):
        self.created = not os.path.lexists(self.path)
        try:  # never through a symlink: the lock is written, and must be a file of --out
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise JobError(f"{self.path} is not drpipe's lock file (a link or not a file: "
                           f"{e.strerror or e}); move it away or choose another --out") from None
        self.f = os.fdopen(fd, "r+b")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.seek(0)
            holder = self.f.read(32).decode("ascii", "replace").strip() or "?"
            self.f.close()
            raise LockHeld(f"another drpipe run is writing to {self.path.parent} "
                           f"(pid {holder}); wait for it or choose another --out") from None
        self.f.seek(0)
        held = self.f.read(64).strip()
        if held and not (held.isascii() and held.isdigit()):  # drpipe writes a pid, only
            fcntl.flock(self.f, fcntl.LOCK_UN)
            self.f.close()
            raise JobError(f"{self.path} is not drpipe's lock file (it holds other text); "
                           "move it away or choose another --out")
        self.f.seek(0)
        self.f.truncate()
        self.f.write(str(os.getpid()).encode())
        self.f.flush()
        return self

    def __exit__(self, *exc):
        # A folder this run refused (or never began: no state file) keeps no lock of ours.
        if self.created and not (self.path.parent / STATE_FILE).exists():
            self.path.unlink(missing_ok=True)
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def _input_fingerprint(source: Source, photos) -> str:
    h = hashlib.sha256()
    for p in photos:
        size = source.fingerprint(p.path)
        h.update(f"{p.image_id}\t{p.path}\t{p.label}\t{size}\t{p.ambiguous}\n".encode())
    for r in source.labels_without_photo:
        h.update(f"{r.image_id}\t-\t{r.label}\n".encode())
    return h.hexdigest()[:16]


def _prepare_out(out: Path, state: dict, overwrite: bool) -> bool:
    """Check ``out`` against this run. Returns True if the run is already complete.

    Only files a drpipe run recorded as its own (OWN_FILES, and the shards listed in the
    state file or dataset_info.json) are ever kept, replaced or removed: any other
    ``*.tfrecord`` in ``out`` would be read as part of the dataset, so it is refused."""
    state_path = out / STATE_FILE
    old = _read_json(state_path) if state_path.exists() else None
    recorded = _refuse_strays(out, old)
    if old is not None:
        same = same_run(old, state)
        if same and not overwrite:
            state["shards"] = old.get("shards", {})
            return (out / INFO_FILE).exists()
        if not overwrite:
            raise other_run(out, old, state)
        _clear(out, recorded)
    else:
        # No state file: not a drpipe output, whatever its files are named (only the lock
        # this run just took is ours); --overwrite never clears such a folder.
        # A run skipped on the lock (exit 75) may already have logged its line in
        # history.jsonl: that file is drpipe's too.
        foreign = sorted(p.name for p in out.iterdir()
                         if p.name != LOCK_FILE and not _is_history(p))
        if foreign:
            raise JobError(f"{out} is not empty and not a drpipe output ({foreign[0]}, ...); "
                           "choose an empty --out")
    state["shards"] = {}
    _write_state(out, state)
    return False


def same_run(old: dict, state: dict) -> bool:
    """True if a state file ``old`` is of a run with this run's configuration and inputs."""
    return (old.get("config_hash") == state["config_hash"]
            and old.get("input_hash") == state["input_hash"])


def other_run(where, old: dict, state: dict) -> JobError:
    """The refusal of an output (``where``) that holds another run, naming what differs."""
    what = ("configuration" if old.get("config_hash") != state["config_hash"]
            else "input photos or labels")
    return JobError(f"{where} holds a run with a different {what}; use --overwrite to "
                    "replace it, or choose another --out")


def _is_history(path: Path) -> bool:
    """True for a ``history.jsonl`` of drpipe's own lines only (each a run record with all
    of versions.HISTORY_KEYS); an empty one, or a link, is not known to be drpipe's."""
    if path.name != versions.HISTORY or path.is_symlink() or not path.is_file():
        return False
    try:
        lines = path.read_text().splitlines()
        return bool(lines) and all(
            isinstance(r := json.loads(line), dict) and set(r) == versions.HISTORY_KEYS
            and isinstance(r["exit_status"], int) for line in lines)
    except (OSError, ValueError):
        return False


def _refuse_strays(out: Path, old: dict | None) -> set[str]:
    """The shards drpipe recorded in ``out``; any other ``*.tfrecord`` there is refused."""
    recorded = _recorded_shards(out, old or {})
    stray = sorted(p.name for p in out.glob("*.tfrecord") if p.name not in recorded)
    if stray:
        raise JobError(f"{out} holds {stray[0]}" + (f" and {len(stray) - 1} more shard(s)"
                       if len(stray) > 1 else "") + " that no drpipe run recorded writing "
                       "here; move them away or choose another --out")
    return recorded


def _refuse_other_config(out: Path, config: JobConfig, overwrite: bool) -> None:
    """Refuse (without --overwrite) a finished output made with another configuration,
    naming the settings that differ."""
    if overwrite or not output_info.has_info(out):
        return
    try:
        info = output_info.load_info(out)
    except (OSError, ValueError):
        return
    if info.get("config_hash") == config.hash():
        return
    old = info.get("config") or {}
    new = json.loads(json.dumps(config.output_config()))
    flat = {}
    for d, tag in ((old, 0), (new, 1)):
        for k, v in d.items():
            for kk, vv in (v.items() if isinstance(v, dict) and k == "process" else [(k, v)]):
                flat.setdefault(kk, [None, None])[tag] = vv
    differ = sorted(k for k, (a, b) in flat.items() if a != b)
    if differ:
        what = ", ".join(f"{k} {flat[k][0]!r} -> {flat[k][1]!r}" for k in differ[:3])
        raise JobError(f"{out} holds a run with a different configuration ({what}"
                       + (", ..." if len(differ) > 3 else "") + "); use --overwrite to "
                       "rebuild it, or choose another --out")


def _incremental(out: Path, state: dict, overwrite: bool) -> dict | None:
    """The previous state if this run adds a version to ``out`` (same configuration, other
    inputs, a committed version; or an interrupted incremental run), else None."""
    old = _read_json(out / STATE_FILE) if (out / STATE_FILE).exists() else None
    if (overwrite or not old or old.get("config_hash") != state["config_hash"]
            or versions.latest_version(out) is None or not (out / INFO_FILE).exists()):
        return None
    if old.get("input_hash") != state["input_hash"] or old.get("pending_version"):
        return old
    return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _recorded_shards(out: Path, old_state: dict) -> set[str]:
    """Shard names a drpipe run recorded writing into ``out``: the state file's (written
    as each shard is committed) and a finished run's info."""
    names = set(old_state.get("shards") or {})
    try:  # drpipe's info (drpipe_info.json, or an earlier output's dataset_info.json)
        info = output_info.load_info(out) if output_info.has_info(out) else {}
    except (OSError, ValueError):
        info = {}
    splits = info.get("splits") if isinstance(info, dict) else None
    for split in (splits.values() if isinstance(splits, dict) else []):
        names.update(f.get("name") for f in split.get("shards", []) if isinstance(f, dict))
    return {n for n in names if isinstance(n, str) and "/" not in n}


def _clear(out: Path, recorded: set[str]) -> None:
    if not (out / STATE_FILE).is_file():  # never a folder no drpipe run recorded as its own
        return
    for p in out.iterdir():
        if p.name in (LOCK_FILE, versions.HISTORY):  # the run log outlives an --overwrite
            continue
        if p.name in OWN_FILES or p.name in recorded or (
                p.name.startswith(".") and p.name.endswith(TMP_SUFFIX)):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def _record_shard(out: Path, state: dict, name: str) -> dict:
    """Note a committed shard in the state file (before anything else relies on it)."""
    path = out / name
    entry = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    state.setdefault("shards", {})[name] = entry
    _write_state(out, state)
    return entry


def _plan_shard(out: Path, state: dict, name: str) -> None:
    state.setdefault("shards", {})[name] = {}
    _write_state(out, state)


def _write_state(out: Path, state: dict) -> None:
    atomic_write_bytes(out / STATE_FILE, json.dumps(state, indent=2, sort_keys=True).encode())


def _own_shard_intact(out: Path, state: dict, name: str) -> bool:
    """A shard is kept on resume only if this run recorded writing it and its bytes are
    the ones recorded."""
    entry = (state.get("shards") or {}).get(name)
    path = out / name
    if not entry or not path.is_file() or path.stat().st_size != entry.get("bytes"):
        return False
    return file_sha256(path) == entry.get("sha256")


def _start_client(opts: RunOptions):
    import dask
    from distributed import Client, LocalCluster

    if opts.scheduler:
        try:
            client = Client(opts.scheduler, timeout="10s")
            client.wait_for_workers(1, timeout=60)
        except Exception as e:  # noqa: BLE001 - many transport errors look alike
            raise JobError(f"cannot use the Dask scheduler at {opts.scheduler}: "
                           f"{type(e).__name__}: {e}") from None
        return client, None
    n = opts.workers or os.cpu_count() or 1
    # The scheduler serves HTTP (health, metrics) even without a dashboard; on localhost and
    # any free port it neither collides with another cluster's 8787 nor faces the network.
    # Workers start with SIGINT ignored (inherited): a Ctrl-C in the terminal reaches the
    # whole process group, and only this process should answer it (one line, exit 130).
    # SIGINT is blocked here, not ignored (an ignored one would be lost): a Ctrl-C while the
    # cluster starts is held and raised as KeyboardInterrupt once it is up (then closed);
    # each worker ignores SIGINT once started (pipeline/worker_signals.py).
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        # distributed is imported (its defaults loaded) before the set, which restores them
        # after: local workers take the config they start with (WORKER_CONFIG).
        with dask.config.set(WORKER_CONFIG):
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                   dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR,
                                   preload=["pipeline.worker_signals"])
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        raise
    try:
        client = Client(cluster)
        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a held Ctrl-C is raised here
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        cluster.close()
        raise
    return client, cluster


def _batches(photos) -> list[list[dict]]:
    items = [dataclasses.asdict(p) for p in photos]
    return [items[i:i + BATCH_SIZE] for i in range(0, len(items), BATCH_SIZE)]


def _commit_batch(staging: Path, k: int, result: dict) -> None:
    """Records to batch-k.bin, then rows (with offsets) to batch-k.json: the .json is the
    commit marker, so a batch counts only when both are whole."""
    blob, offset = bytearray(), 0
    rows = []
    for row, rec in zip(result["rows"], result["records"], strict=True):
        if rec is not None:
            row = dict(row, _offset=offset, _length=len(rec))
            blob += rec
            offset += len(rec)
        rows.append(row)
    atomic_write_bytes(staging / f"batch-{k:06d}.bin", bytes(blob))
    meta = {"rows": rows, "maxrss_mb": result["maxrss_mb"],
            "tensorflow_loaded": result["tensorflow_loaded"]}
    atomic_write_bytes(staging / f"batch-{k:06d}.json", json.dumps(meta).encode())


def run(config: JobConfig, opts: RunOptions, progress_factory=None) -> dict:
    """Run (or resume, or recognise as finished) a preprocessing job. Returns the summary.

    ``progress_factory(total, initial)`` returns a tqdm-like object (update, close).
    Raises JobError (and LabelError / SourceError from the sources) with one-line reasons.
    """
    try:
        return _run(config, opts, progress_factory)
    except OSError as e:
        # Disk full, read-only or vanished storage: one line, and nothing committed is lost
        # (every file is written under a temporary name first; re-run to resume).
        where = e.filename or config.out
        raise JobError(f"cannot write {where}: {e.strerror or e}; what was committed is kept, "
                       "re-run to resume once fixed") from None


def _run(config: JobConfig, opts: RunOptions, progress_factory) -> dict:
    t0 = time.time()
    out = Path(config.out)
    # Before --out is made: nothing left behind (a store URL is checked when listed; one
    # .zip file is a source too).
    if not storage.is_url(config.src) and not Path(config.src).exists():
        raise SourceError(f"{config.src}: no such directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise JobError(f"cannot create {out}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK):
        raise JobError(f"{out} is not writable")
    with _Lock(out):
        source = detect_source(config.src, config.source_kind,  # a path or a URL
                               config.labels or None,
                               config.id_col, config.label_col, config.patient_col)
        photos = source.photos[:config.limit] if config.limit else source.photos
        missing = [] if config.limit else source.labels_without_photo
        state = {"config_hash": config.hash(), "input_hash": _input_fingerprint(source, photos),
                 "drpipe_version": drpipe_version()}
        _refuse_other_config(out, config, opts.overwrite)
        old = _incremental(out, state, opts.overwrite)
        if old is not None:
            # Local: pipeline.incremental is built on this module's steps (a cycle).
            from pipeline.incremental import run_incremental

            return run_incremental(config, opts, progress_factory, out, source, photos,
                                   missing, state, old, t0)
        # Exact quotas that cannot be met are refused before --out holds this run's state.
        quota_splits = _label_splits(source, config) if config.split_quota else None
        if _prepare_out(out, state, opts.overwrite):
            info = output_info.load_info(out)
            return dict(info["summary"], already_complete=True)
        splits = quota_splits if quota_splits is not None else _label_splits(source, config)

        staging = out / STAGING
        staging.mkdir(exist_ok=True)
        remove_temporaries(staging)
        remove_temporaries(out)
        batches = _batches(photos)
        todo = [k for k in range(len(batches))
                if not (staging / f"batch-{k:06d}.json").exists()]
        done_photos = sum(len(batches[k]) for k in range(len(batches)) if k not in set(todo))
        t_process = time.time()
        cluster_s = 0.0  # starting the local Dask cluster: a fixed cost, not per photo
        if todo:
            cluster_s = _process_batches(batches, todo, source.reader or source.root, config,
                                         opts, staging, progress_factory, done_photos,
                                         len(photos))
        t_shards = time.time()

        rows, peak_rss, tf_loaded = _read_batches(staging, len(batches))
        _flag_duplicates(rows)
        for row in rows:  # rejected photos show the split they would have been in
            row["split"] = splits.get(row["image_id"], "")
        shards = _write_shards(rows, config, out, staging, state)
        rows += _missing_rows(missing, splits)
        _drop_private(rows)
        manifest.write(rows, out)
        t_end = time.time()
        summary = _summary(rows, shards, config, len(photos), len(missing), peak_rss,
                           tf_loaded, timings={"total_s": t_end - t0,
                                               "setup_s": t_process - t0,
                                               "cluster_start_s": cluster_s,
                                               "process_s": t_shards - t_process - cluster_s,
                                               "shards_and_manifest_s": t_end - t_shards},
                           processed_now=sum(len(batches[k]) for k in todo))
        info = _info(config, state, shards, summary, version=1)
        listed = versions.listing(source, photos)
        summary.update(version=1, changes={"added": len(listed), "removed": 0,
                                           "replaced": 0, "relabelled": 0})
        versions.write_version(out, 1, info, rows, listed, {"added": sorted(listed)})
        output_info.write_info(out, info)
        shutil.rmtree(staging, ignore_errors=True)
        return summary


def _read_batches(staging: Path, n: int) -> tuple[list[dict], float, bool]:
    """The rows of committed batches 0..n-1 (each marked with its batch), the workers' peak
    RSS and whether any worker imported TensorFlow."""
    rows, peak_rss, tf_loaded = [], 0.0, False
    for k in range(n):
        meta = json.loads((staging / f"batch-{k:06d}.json").read_text())
        peak_rss = max(peak_rss, meta["maxrss_mb"])
        tf_loaded |= meta["tensorflow_loaded"]
        for row in meta["rows"]:
            row["_batch"] = k
            rows.append(row)
    return rows, peak_rss, tf_loaded


def _label_splits(source, config: JobConfig) -> dict[str, str]:
    # Splits come from the labels alone (drpipe split gives the same), never from
    # which photos happened to decode.
    # All of them, --limit or not (a trial gets the full run's split), an id shared by
    # several files once.
    return assign_splits(split_rows(source.photos, source.labels_without_photo),
                         config.split, config.seed, quota=config.split_quota)


def split_rows(photos, labels_without_photo) -> list[tuple[str, str, int]]:
    """The (image_id, patient_id, grade) rows a split is planned from: every labelled id
    once (an id shared by several files counts once, as ``drpipe split`` sees it), photo or
    not."""
    rows = list({p.image_id: (p.image_id, p.patient_id, p.label)
                 for p in photos if p.label is not None}.values())
    return rows + [(r.image_id, r.patient_id, r.label) for r in labels_without_photo]


def _missing_rows(missing, splits: dict) -> list[dict]:
    """Manifest rows of labels without a photo."""
    return [{"image_id": r.image_id, "path": "", "patient_id": r.patient_id, "eye": r.eye,
             "label": r.label, "origin": r.origin, "status": "rejected",
             "split": splits.get(r.image_id, ""),
             "reason": "missing_file: labelled, but no photo found"} for r in missing]


def _drop_private(rows: list[dict]) -> None:
    """Remove the run's own bookkeeping (where a record is staged) before rows are written."""
    for row in rows:
        for key in ("_batch", "_offset", "_length", "_data"):
            row.pop(key, None)


def _info(config: JobConfig, state: dict, shards: dict, summary: dict, version: int,
          **extra) -> dict:
    """drpipe's information about a finished run (``drpipe_info.json``)."""
    return {"name": "drpipe", "drpipe_version": drpipe_version(),
            "features": {k: kind for k, (kind, _) in FEATURES.items()},
            "splits": shards, "counts": summary["counts"],
            "config": config.output_config(), "config_hash": config.hash(),
            "input_hash": state["input_hash"], "summary": summary, "version": version,
            **extra}


def _process_batches(batches, todo, root, config, opts, staging, progress_factory,
                     initial, total):
    """Run the batches on the cluster, committing each as it completes. Returns the seconds
    spent starting the cluster (and its workers' imports), reported apart from processing."""
    from distributed import as_completed

    t0 = time.time()
    client, cluster = _start_client(opts)
    # The workers' first task would otherwise pay the imports (OpenCV, simplejpeg, ...).
    try:
        client.run(_warm_up)
    except Exception:  # noqa: BLE001 - only a head start; a task reports a real failure
        pass
    started = time.time() - t0
    bar = progress_factory(total, initial) if progress_factory else None
    try:
        window = 2 * max(1, len(client.scheduler_info()["workers"])) + 2
        key = config.hash()
        pending = iter(todo)
        futures = {}

        def submit_next():
            k = next(pending, None)
            if k is None:
                return
            f = client.submit(process_batch, _task_root(root, batches[k]), batches[k],
                              config.process, not config.follow_links,
                              key=f"drpipe-batch-{key}-{k}", retries=2, pure=False)
            futures[f] = k
            ac.add(f)

        ac = as_completed()
        for _ in range(window):
            submit_next()
        for f in ac:
            k = futures.pop(f)
            try:
                result = f.result()
            except (OSError, TimeoutError) as e:  # the cluster itself is gone
                raise JobError(f"batch {k} failed on the cluster after retries: "
                               f"{type(e).__name__}: {e}") from None
            except Exception as e:  # noqa: BLE001 - KilledWorker after retries, mostly
                # A worker died on this batch (out of memory?) or it failed: retry it photo
                # by photo, and reject only the photo(s) that still fail, with the reason.
                result = _isolate(client, root, batches[k], config, f"{key}-{k}", e)
            _commit_batch(staging, k, result)
            f.release()
            if bar:
                bar.update(len(batches[k]))
            submit_next()
    finally:
        if bar:
            bar.close()
        client.close()
        if cluster is not None:
            cluster.close()
    return started


# A local worker runs one photo task at a time on one thread.
# - Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also pins glibc's mmap
#   threshold at 128 KB: every decoded photo, crop and file read (MBs each) is then a fresh
#   mmap, zero-filled page by page — 7.6x the page faults and 26 -> 35 ms CPU per photo
#   (docs/BENCHMARKS.md). A 32 MiB mmap threshold (glibc's own dynamic maximum) lets those
#   buffers come from the heap; a 32 MiB trim threshold keeps the freed top of the heap for
#   the next photo instead of handing it back after each one (with 64 KB, 1,330 page faults
#   and ~2.5 ms CPU per photo more than the bare loop; at most 32 MiB more per malloc arena,
#   137 MB peak either way on the sample).
# - Dask's statistical profiler (a stack sample every 10 ms) and its 20 ms event-loop tick
#   take the GIL from the task thread; on a loaded machine every hand-over waits for a time
#   slice (1 worker: 0.52 -> 0.69 of the bare loop with the profiler off, interleaved runs).
WORKER_CONFIG = {"distributed.worker.profile.enabled": False,
                 "distributed.admin.tick.interval": "500ms",
                 "distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": 32 * 2**20,
                 "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 32 * 2**20}


def _warm_up() -> None:
    # Run on each worker: importing is the point (the modules a task needs, loaded once).
    import pipeline.process  # noqa: F401
    import tfrecord_writer.example  # noqa: F401


def _task_root(root, batch):
    """A folder's path, or the directory entries of this batch's archive members."""
    return root.batch([it["path"] for it in batch]) if hasattr(root, "batch") else str(root)


def _isolate(client, root, items, config, key, error) -> dict:
    """``process_batch``'s result for a batch whose task failed: each photo on its own task;
    one that fails again (a worker killed reading or decoding it) is rejected, named."""
    from distributed import wait

    futures = [client.submit(process_batch, _task_root(root, [it]), [it], config.process,
                             not config.follow_links, key=f"drpipe-photo-{key}-{i}",
                             retries=0, pure=False) for i, it in enumerate(items)]
    wait(futures)
    rows, records, rss, tf_loaded = [], [], 0.0, False
    for it, f in zip(items, futures, strict=True):
        try:
            r = f.result()
        except Exception as e:  # noqa: BLE001 - this photo is the one
            what = ("worker_died: the worker processing this photo died (out of memory?); "
                    f"{type(e).__name__}" if type(e).__name__ == "KilledWorker" else
                    f"internal_error: {type(e).__name__}: {e}")
            r = {"rows": [dict(_blank_row(it), status="rejected", reason=what)],
                 "records": [None], "maxrss_mb": 0.0, "tensorflow_loaded": False}
        finally:
            f.release()
        rows += r["rows"]
        records += r["records"]
        rss, tf_loaded = max(rss, r["maxrss_mb"]), tf_loaded or r["tensorflow_loaded"]
    return {"rows": rows, "records": records, "maxrss_mb": rss, "tensorflow_loaded": tf_loaded,
            "isolated_after": f"{type(error).__name__}: {error}"}


def _flag_duplicates(rows: list[dict]) -> None:
    first: dict[str, str] = {}
    for row in sorted(rows, key=lambda r: r["image_id"]):
        sha = row.get("sha256")
        row["duplicate_of"] = None
        if sha:
            if sha in first:
                row["duplicate_of"] = first[sha]
            else:
                first[sha] = row["image_id"]


def _write_shards(rows: list[dict], config: JobConfig, out: Path, staging: Path,
                  state: dict | None = None) -> dict:
    """Seeded order per split, size-based cuts, atomic writes. Returns per-split shard info
    and sets each row's ``shard``."""
    with _StagedRecords(staging) as staged:
        return _write_split_shards(rows, config, out, staged,
                                   state if state is not None else {"shards": {}})


def _write_split_shards(rows, config, out, staged: _StagedRecords, state: dict,
                        names=shard_name, order_key=()) -> dict:
    target = int(config.shard_size_mb * 1024 * 1024)
    info = {}
    for split in config.split:
        members = sorted((r for r in rows if r["status"] == "ok" and r["split"] == split),
                         key=lambda r: r["image_id"])
        rng = np.random.default_rng([config.seed, _stable_int(split), *order_key])
        members = [members[i] for i in rng.permutation(len(members))]
        assignment = plan_shards([r["_length"] for r in members], target)
        count = (max(assignment) + 1) if assignment else 0
        files = []
        for i in range(count):
            name = names(split, i, count)
            these = [r for r, a in zip(members, assignment, strict=True) if a == i]
            for r in these:
                r["shard"] = name
            path = out / name
            # Committed shards of an interrupted run are identical: kept, but only if this
            # run recorded writing them and their bytes check out.
            if not _own_shard_intact(out, state, name):
                _plan_shard(out, state, name)  # a kill after the rename leaves it ours
                with ShardWriter(path) as w:
                    for r in these:
                        w.write(staged.read(r))
                _record_shard(out, state, name)
            files.append({"name": name, "records": len(these), "bytes": path.stat().st_size})
        info[split] = {"shards": files, "records": len(members)}
    return info


class _StagedRecords:
    """Random access to committed records in ``.staging/batch-*.bin``, a bounded number of
    files open at a time; closed when the shards are written."""

    MAX_OPEN = 64

    def __init__(self, staging: Path):
        self.staging = staging
        self.files: dict[int, object] = {}

    def read(self, row: dict) -> bytes:
        k = row["_batch"]
        f = self.files.get(k)
        if f is None:
            if len(self.files) >= self.MAX_OPEN:
                self.close()
            f = self.files[k] = open(self.staging / f"batch-{k:06d}.bin", "rb")
        f.seek(row["_offset"])
        data = f.read(row["_length"])
        if len(data) != row["_length"]:
            raise JobError(f"staging batch {k} is damaged; re-run with --overwrite")
        return data

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _stable_int(s: str) -> int:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:4], "little")


def _summary(rows, shards, config, n_photos, n_missing, peak_rss, tf_loaded, timings,
             processed_now) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    reasons = Counter(r["reason"].split(":")[0] for r in rows
                      if r["status"] == "rejected" and r.get("path"))  # photos only
    counts = {s: [sum(1 for r in ok if r["split"] == s and r["label"] == g)
                  for g in range(N_GRADES)]
              for s in config.split}
    return {
        "photos": n_photos,
        "ok": len(ok),
        "rejected": n_photos - len(ok),
        "labels_without_photo": n_missing,
        "rejected_by_reason": dict(sorted(reasons.items())),
        "duplicates": sum(1 for r in rows if r.get("duplicate_of")),
        "counts": counts,
        "shards": {s: len(v["shards"]) for s, v in shards.items()},
        "shard_bytes": sum(f["bytes"] for v in shards.values() for f in v["shards"]),
        "source_bytes": sum(r.get("bytes") or 0 for r in rows),
        "peak_worker_rss_mb": round(peak_rss, 1),
        "workers_imported_tensorflow": tf_loaded,
        "processed_this_run": processed_now,
        "photos_per_s": round(processed_now / timings["process_s"], 2)
        if timings["process_s"] > 0 and processed_now else None,
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "config_hash": config.hash(),
    }
