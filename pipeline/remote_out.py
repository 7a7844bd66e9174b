"""``--out`` in an object store (``s3://bucket/shards``), and shards staged back from one.

    run_to_store(config, opts) -> summary     # drpipe preprocess --out s3://...
    stage_shards("s3://bucket/shards") -> Path  # drpipe train --data s3://...

A run into a store is a local run into a staging folder on the client's disk (resumable
as any run: ``$DRPIPE_CACHE``, default ``~/.cache/drpipe``, ``out/<hash of the URL>/``),
then an upload:

1. A lease object ``.drpipe.lease`` replaces the ``flock``: created with a conditional write
   (``If-None-Match: *``; off S3 fsspec's ``open(p, "xb")``), holding host, pid and expiry,
   renewed while the run lives and taken over only when expired (or when its holder is a
   dead process on this host); on S3 the takeover and each renewal are conditional on the
   ETag (see :class:`Lease` for what holds on other stores). A second run is refused,
   naming the holder.
2. The store's ``.drpipe-state.json`` is compared with this run as a local ``--out`` is:
   the same -> resume (or nothing to do when ``dataset_info.json`` is there), different ->
   refused unless ``--overwrite``. Objects drpipe did not write are never removed.
3. Each shard is uploaded whole (``put_file``: one PUT, or a multipart upload completed only
   at the end; never ``with fs.open(p, "wb")``, which commits a partial object when an
   exception interrupts it), so no object under a final name is partial after an error or
   a kill. A shard already in the store with the planned size is this plan's (same
   configuration and inputs give the same bytes) and is not sent again. Then
   ``SHA256SUMS`` (of the shards), the manifest and, last, ``dataset_info.json``: the
   completion marker.

TensorFlow reads ``gs://`` but has no ``s3://`` filesystem, so ``drpipe train`` and the other
training commands copy shards from a store URL to ``$DRPIPE_CACHE/data/<hash>/`` first,
each verified by size and SHA-256 (``SHA256SUMS``), and read them from there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

from pipeline import job, storage
from pipeline.job import JobError, LockHeld  # LockHeld: exit 75, as a held local lock
from pipeline.sources import detect_source
from pipeline.storage import short_error
from tfrecord_writer import info as output_info
from tfrecord_writer.files import file_sha256, replacing
from tfrecord_writer.info import drpipe_version

LEASE = ".drpipe.lease"
SUMS = "SHA256SUMS"


def cache_dir() -> Path:
    return Path(os.environ.get("DRPIPE_CACHE") or Path.home() / ".cache" / "drpipe")


def lease_ttl() -> float:
    return float(os.environ.get("DRPIPE_LEASE_TTL", "300"))


def _url_key(url: str) -> str:
    return hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def check_store(fs, url: str) -> None:
    """One line for a bucket that is not there or credentials that are refused."""
    bucket = fs._strip_protocol(url).split("/", 1)[0]
    try:
        fs.ls(bucket, refresh=True)
    except FileNotFoundError:
        raise JobError(f"{url}: no such bucket {bucket!r}") from None
    except PermissionError as e:
        raise JobError(f"{url}: access denied ({short_error(e)}); "
                       f"{storage.CHECK_CREDENTIALS}") from None
    except OSError as e:
        raise JobError(f"{url}: the store cannot be used ({short_error(e)})") from None


# ---------------------------------------------------------------------------- the lease


class Lease:
    """An object that says who writes to ``--out``: created only if absent, renewed every
    third of its time to live, deleted at the end.

    What is guaranteed where. Every renewal reads the lease back and goes on only if it
    still holds this run's token. On stores that honour S3's conditional writes (AWS S3,
    and the S3 API of moto, MinIO, ...; reached through s3fs) each write is also
    conditional, so the store itself decides between racers: the create
    (``If-None-Match: *``), a takeover of a stale lease (``If-Match`` the ETag that came
    with the body judged stale, in one GET), a renewal (``If-Match`` the ETag of the
    version just read back) and the delete at the end (the same). Of two runs taking over
    one stale lease exactly one holds it, the other is refused (exit 75). A store that
    answers a conditional write with "not implemented" is used as the others are. On the
    others (gcsfs, local files, ...) the create is as exclusive as the store's ``"xb"``
    (GCS: ``ifGenerationMatch=0``; local files: ``O_EXCL``), but a takeover is a delete
    then that create: two runs taking over one stale lease can both believe they hold it
    until the next renewal, when all but one see the token changed.

    Whatever the store: a run counts its lease lost when a renewal finds another token, or
    when a tenth of the time to live is left on the last expiry it wrote (renewals that
    fail or hang); :meth:`check` then refuses, and every write to ``--out`` checks first."""

    def __init__(self, fs, path: str, ttl: float | None = None):
        self.fs, self.path = fs, path
        self.ttl = lease_ttl() if ttl is None else ttl
        self.token = uuid.uuid4().hex
        self.lost = False
        self.valid_until = 0.0  # the expiry of the last version this run wrote
        self.etag = None  # of the version this run last wrote (S3)
        self._conditional = hasattr(fs, "_call_s3")  # s3fs: conditional PUTs on the ETag
        self._stop = threading.Event()
        self._thread = None

    def _body(self) -> tuple[bytes, float]:
        expires = time.time() + self.ttl
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                           "expires": expires, "token": self.token}).encode(), expires

    def _s3(self, method: str, **kwargs):
        """One S3 call; ``None`` when its condition failed (412, 409, or no such key)."""
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(self.path)

        async def call():
            resp = await self.fs._call_s3(method, Bucket=bucket, Key=key, **kwargs)
            if method == "get_object":
                async with resp["Body"] as body:
                    return await body.read(), resp.get("ETag")
            return resp

        try:
            return sync(self.fs.loop, call)
        except (FileExistsError, FileNotFoundError):
            return None
        except OSError as e:
            code = str(getattr(e.__cause__, "response", {}).get("Error", {}).get("Code"))
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                return None
            if code in ("NotImplemented", "501") and kwargs.keys() & {"IfMatch", "IfNoneMatch"}:
                self._conditional = False  # a store without conditional writes
                raise _Unconditional() from None
            raise

    def _write(self, **condition) -> bool:
        """Write this run's lease under ``condition``; False if another run's write won."""
        body, expires = self._body()
        if self._conditional:
            try:
                resp = self._s3("put_object", Body=body, **condition)
            except _Unconditional:
                return self._write(**condition)
            if resp is None:
                return False
            self.etag = resp.get("ETag")
            self.fs.invalidate_cache(self.path)
        elif condition.get("IfNoneMatch") == "*":
            try:
                with self.fs.open(self.path, "xb") as f:
                    f.write(body)
            except FileExistsError:
                return False
        else:
            self.fs.pipe_file(self.path, body)
        self.valid_until = expires
        return True

    def _create(self) -> bool:
        return self._write(IfNoneMatch="*")

    def _read(self) -> tuple[dict | None, str | None]:
        """The holder and the ETag of that same version (one GET; no ETag off S3);
        ``(None, None)`` when there is no lease, ``{}`` for a body that is not one."""
        if self._conditional:
            got = self._s3("get_object")
            if got is None:
                return None, None
            body, etag = got
        else:
            try:
                body, etag = self.fs.cat_file(self.path), None
            except FileNotFoundError:
                return None, None
        try:
            holder = json.loads(body)
        except ValueError:
            return {}, etag
        return (holder if isinstance(holder, dict) else {}), etag

    def _holder(self) -> dict | None:
        return self._read()[0]

    def _take_over(self, etag: str | None) -> bool:
        """Replace the stale lease read with ``etag``: only if it is still that version."""
        if self._conditional and etag:
            return self._write(IfMatch=etag)
        try:
            self.fs.rm(self.path)
        except FileNotFoundError:
            pass  # another run removed it first: the create below decides
        return self._create()

    def __enter__(self):
        if not self._create():
            holder, etag = self._read()
            if holder is not None and not _is_lease(holder):
                raise JobError(f"{self.path} is not a drpipe lease (another tool's object "
                               "of that name?); move it away or choose another --out")
            if holder is not None and not _stale(holder):
                raise LockHeld(_held_message(self.path, holder))
            if not (self._create() if holder is None else self._take_over(etag)):
                raise LockHeld(_held_message(self.path, self._holder() or {}))
        self._thread = threading.Thread(target=self._renew, daemon=True)
        self._thread.start()
        return self

    def _renew_once(self) -> bool:
        """Read the lease back and, if it is still this run's, write it again (on S3 only
        if it is still the version read). False: another run holds it."""
        holder, etag = self._read()
        if not holder or holder.get("token") != self.token:
            return False
        if self._conditional and etag:
            return self._write(IfMatch=etag)  # the version read, even one whose reply was lost
        return self._write()

    def _margin(self) -> float:
        return self.ttl / 10

    def _renew(self) -> None:
        pause = self.ttl / 3
        left = lambda: self.valid_until - self._margin() - time.time()  # noqa: E731
        while not self._stop.wait(max(0.0, min(pause, left()))):
            try:
                held = self._renew_once()
            except Exception:  # noqa: BLE001 - the store did not answer: retry soon, until
                if left() <= 0:  # the last expiry written is a margin away (then another
                    self.lost = True  # run may take the lease over)
                    return
                pause = min(1.0, self.ttl / 30)
                continue
            if not held:
                self.lost = True  # another run holds it
                return
            pause = self.ttl / 3

    def check(self) -> None:
        if self.lost or time.time() >= self.valid_until - self._margin():
            self.lost = True
            raise JobError(f"lost the lease {self.path} to another run; nothing more is "
                           "written, re-run to resume")

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        try:
            if self.lost:
                return
            if self._conditional and self.etag:
                try:
                    if self._s3("delete_object", IfMatch=self.etag) is not None:
                        self.fs.invalidate_cache(self.path)
                        return
                except _Unconditional:
                    pass
                except OSError:
                    pass  # a store without conditional deletes: by the token, as below
            holder = self._holder()
            if holder and holder.get("token") == self.token:
                self.fs.rm(self.path)
        except Exception:  # noqa: BLE001 - never hide the run's own outcome; the lease
            pass  # expires by itself


class _Unconditional(Exception):
    """The store answered a conditional write with 'not implemented'."""


def _is_lease(holder: dict) -> bool:
    """A body drpipe writes: host, pid, a numeric expiry and a token."""
    return ({"host", "pid", "expires", "token"} <= set(holder)
            and isinstance(holder["expires"], (int, float))
            and not isinstance(holder["expires"], bool))


def _stale(holder: dict) -> bool:
    if holder.get("expires", 0) < time.time():
        return True
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True  # its process is gone: a kill left it behind
        except PermissionError:
            return False
    return False


def _held_message(path: str, holder: dict) -> str:
    until = time.strftime("%H:%M:%S", time.localtime(holder.get("expires", 0)))
    return (f"another drpipe run is writing to {path.rsplit('/', 1)[0]} (host "
            f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}, lease until {until}); "
            "wait for it or choose another --out")


# ---------------------------------------------------------------------------- preprocess


def run_to_store(config, opts, progress_factory=None) -> dict:
    url = config.out.rstrip("/")
    try:
        return _run_to_store(config, opts, progress_factory, url)
    except PermissionError as e:
        raise JobError(f"{url}: access denied ({short_error(e)}); check the credentials") from None
    except OSError as e:
        raise JobError(f"{url}: {short_error(e)}; what was uploaded is kept, re-run to "
                       "resume") from None


def _run_to_store(config, opts, progress_factory, url: str) -> dict:
    fs = storage.filesystem(url)
    check_store(fs, url)
    with _staging_lock(url), Lease(fs, f"{url}/{LEASE}") as lease:
        state = _expected_state(config)
        names = _objects(fs, url)
        old = _read_json(fs, f"{url}/{job.STATE_FILE}") if job.STATE_FILE in names else None
        if old is not None:
            same = job.same_run(old, state)
            recorded = _recorded(fs, url, names, old)
            stray = sorted(n for n in names if n.endswith(".tfrecord") and n not in recorded)
            if stray:  # as on a local --out: a shard no drpipe run recorded is not ours
                raise JobError(f"{url} holds {stray[0]}" + (
                    f" and {len(stray) - 1} more shard(s)" if len(stray) > 1 else "")
                    + " that no drpipe run recorded writing here; move them away or choose "
                    "another --out")
            if same and not opts.overwrite and job.INFO_FILE in names:
                try:
                    info = output_info.info_from(_reader(fs, url, names), url)
                except FileNotFoundError as e:
                    raise JobError(f"{e}; re-run with --overwrite") from None
                except (OSError, ValueError) as e:
                    raise JobError(f"{url}: cannot read drpipe's info ({short_error(e)}); "
                                   "re-run with --overwrite") from None
                return dict(info["summary"], already_complete=True)
            if not same and not opts.overwrite:
                raise job.other_run(url, old, state)
            if not same or opts.overwrite:
                _clear(fs, url, names, recorded)
                recorded = set()
        else:  # without a state file nothing here is known to be drpipe's: even shards
            recorded = set()
            foreign = sorted(n for n in names if n != LEASE)
            if foreign:  # --overwrite too: it replaces a drpipe output, nothing else
                raise JobError(f"{url} is not empty and not a drpipe output ({foreign[0]}, "
                               "...); choose an empty --out")
        _write_state(fs, url, state, recorded)
        local = cache_dir() / "out" / _url_key(url)
        if opts.overwrite:
            shutil.rmtree(local, ignore_errors=True)
        _reuse_or_clear(local, state)
        local.mkdir(parents=True, exist_ok=True)
        summary = job.run(dataclasses.replace(config, out=str(local)),
                          dataclasses.replace(opts, overwrite=False), progress_factory)
        summary.pop("already_complete", None)
        lease.check()
        _upload(fs, local, url, lease, state, recorded)
    shutil.rmtree(local, ignore_errors=True)
    return summary


@contextlib.contextmanager
def _staging_lock(url: str):
    """This machine's staging of ``url`` (``$DRPIPE_CACHE/out/<hash>/``), locked for the run
    by a ``flock`` on a file beside it (the folder itself may be cleared). A run of this
    host still alive holds it, even one whose lease in the store has expired (stopped,
    suspended): another run must not clear or fill the staging under it."""
    folder = cache_dir() / "out"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{_url_key(url)}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "r+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = f.read(32).decode("ascii", "replace").strip() or "?"
            raise LockHeld(f"another drpipe run is writing to {url} (host "
                           f"{socket.gethostname()}, pid {pid}: its staging "
                           f"{folder / _url_key(url)} on this machine is in use); wait for "
                           "it or choose another --out") from None
        f.truncate()
        f.write(str(os.getpid()).encode())
        f.flush()
        yield  # the lock goes with the file's close, or with the process


def _expected_state(config) -> dict:
    source = detect_source(config.src, config.source_kind, config.labels, config.id_col,
                           config.label_col, config.patient_col)
    photos = source.photos[:config.limit] if config.limit else source.photos
    if config.split_quota:  # an unreachable quota (exit 3) before the store is touched
        job._label_splits(source, config)
    return {"config_hash": config.hash(), "input_hash": job._input_fingerprint(source, photos),
            "drpipe_version": drpipe_version()}


def _reuse_or_clear(local: Path, state: dict) -> None:
    """The staging folder is drpipe's own cache: one of another run is cleared."""
    p = local / job.STATE_FILE
    if not p.exists():
        return
    try:
        old = json.loads(p.read_text())
    except (OSError, ValueError):
        old = {}
    if (old.get("config_hash"), old.get("input_hash")) != (state["config_hash"],
                                                           state["input_hash"]):
        shutil.rmtree(local)


def _write_state(fs, url: str, state: dict, shards: set[str]) -> None:
    fs.pipe_file(f"{url}/{job.STATE_FILE}", json.dumps(
        dict(state, shards=sorted(shards)), indent=2, sort_keys=True).encode())


def _recorded(fs, url: str, names, old: dict) -> set[str]:
    """The shards drpipe recorded writing to ``url``: the state file's (written before each
    upload), SHA256SUMS' and the finished output's info."""
    found = set(old.get("shards") or [])
    if SUMS in names:
        try:
            text = fs.cat_file(f"{url}/{SUMS}").decode("utf-8", "replace")
        except (FileNotFoundError, OSError):
            text = ""
        found |= {line.split("  ", 1)[1] for line in text.splitlines() if "  " in line}
    try:  # drpipe's info, of a finished output or of one whose upload stopped before the marker
        info = output_info.info_from(_reader(fs, url, names), url, finished=False)
    except (OSError, ValueError):
        info = {}
    splits = info.get("splits") if isinstance(info, dict) else None
    for split in (splits.values() if isinstance(splits, dict) else []):
        found |= {f.get("name") for f in split.get("shards", []) if isinstance(f, dict)}
    return {n for n in found if isinstance(n, str) and n.endswith(".tfrecord")}


def _reader(fs, url: str, names):
    """read(name) for output_info.info_from: an object's bytes, None if there is none."""
    def read(name: str) -> bytes | None:
        try:
            return fs.cat_file(f"{url}/{name}") if name in names else None
        except FileNotFoundError:
            return None
    return read


def _objects(fs, url: str) -> dict[str, int]:
    fs.invalidate_cache()
    try:
        return storage.file_sizes(fs.ls(url, detail=True, refresh=True))
    except FileNotFoundError:
        return {}


def _read_json(fs, path: str) -> dict:
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return {}


def _clear(fs, url: str, names, recorded: set[str]) -> None:
    """Remove drpipe's own objects (a replaced run); never anything else."""
    for n in names:
        if n in job.OWN_FILES or n == SUMS or n in recorded:
            fs.rm(f"{url}/{n}")


def _upload(fs, local: Path, url: str, lease: Lease, state: dict, recorded: set[str]) -> None:
    shards = sorted(local.glob("*.tfrecord"))
    planned = {p.name for p in shards}
    # Every shard this output may hold is recorded before it is uploaded: a re-run after a
    # kill knows them from foreign ones.
    lease.check()
    _write_state(fs, url, state, planned | recorded)
    remote = _objects(fs, url)
    for p in shards:
        if remote.get(p.name) != p.stat().st_size:
            lease.check()
            fs.put_file(str(p), f"{url}/{p.name}")  # whole, or not at all
    for n in remote:
        if n in recorded and n not in planned:
            lease.check()
            fs.rm(f"{url}/{n}")  # a shard of this output's earlier, interrupted plan
    lease.check()
    _write_state(fs, url, state, planned)
    sums = "".join(f"{file_sha256(p)}  {p.name}\n" for p in shards)
    lease.check()
    fs.pipe_file(f"{url}/{SUMS}", sums.encode())
    # The manifest and the info files (TFDS's features.json, drpipe_info.json, ...), then
    # the completion marker.
    for name in ("data_manifest.csv", "manifest.parquet",
                 *(f for f in output_info.FILES if f != job.INFO_FILE)):
        if (local / name).exists():
            lease.check()
            fs.put_file(str(local / name), f"{url}/{name}")
    lease.check()
    fs.put_file(str(local / job.INFO_FILE), f"{url}/{job.INFO_FILE}")  # the marker, last


# ---------------------------------------------------------------------------- train


class NoShardsHere(JobError):
    """A --data URL without a finished output: a missing input (exit 2), as a local one."""


def stage_shards(url: str) -> Path:
    """Copy a finished output from a store to the local cache, each shard verified by size
    and SHA-256; shards already there and sound are kept. Returns the local folder."""
    url = url.rstrip("/")
    fs = storage.filesystem(url)
    check_store(fs, url)
    names = _objects(fs, url)
    if "dataset_info.json" not in names:
        raise NoShardsHere(f"{url}: no finished drpipe output here (no dataset_info.json)")
    if SUMS not in names:
        raise JobError(f"{url}: no {SUMS} (written by drpipe preprocess --out URL); "
                       "cannot verify the shards")
    local = cache_dir() / "data" / _url_key(url)
    local.mkdir(parents=True, exist_ok=True)
    sums = {}
    for line in fs.cat_file(f"{url}/{SUMS}").decode().splitlines():
        digest, name = line.split(None, 1)
        name = name.strip()
        if "/" in name or "\\" in name or name.startswith(".") or not name.endswith(".tfrecord"):
            raise JobError(f"{url}/{SUMS}: {name!r} is not a shard name; not staging it")
        sums[name] = digest
    for name, digest in sorted(sums.items()):
        p = local / name
        if p.exists() and p.stat().st_size == names.get(name) and file_sha256(p) == digest:
            continue
        with replacing(p) as tmp:  # a shard that does not check out is removed
            fs.get_file(f"{url}/{name}", str(tmp))
            if tmp.stat().st_size != names.get(name) or file_sha256(tmp) != digest:
                raise JobError(f"{url}/{name}: the downloaded shard does not match its "
                               f"size and {SUMS} entry; re-run to fetch it again")
    for name in ("data_manifest.csv", "manifest.parquet", *output_info.FILES):
        if name in names:
            with replacing(local / name) as tmp:
                fs.get_file(f"{url}/{name}", str(tmp))
    return local
