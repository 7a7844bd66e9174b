"""Sources read in place: archives (:mod:`pipeline.archive`) and folders in an object store.

    detect_in_place(src, ...) -> Source | None    # None: a local folder, for pipeline.sources

A folder in a store (``s3://bucket/raw``, ``gs://...``) may hold any layout a local folder
may (Kaggle, APTOS, grade folders, any with ``--labels``): it is listed once (with each
object's size and ETag, the input fingerprint: no request per photo), the labels are read
on the client, and each worker reads its photos' bytes from the store itself
(:class:`StoreReader`), so no worker needs the client's filesystem.
"""

from __future__ import annotations

from pipeline import sources as S
from pipeline import storage
from pipeline.archive import _temp_file, detect_archive_source, photos_by_id, read_labels_as
from pipeline.job import JobError
from pipeline.process import Rejection
from pipeline.sources import GRADES, LabelError, SourceError


def detect_in_place(src, kind=None, labels=None, id_col="image", label_col="level",
                    patient_col=None):
    if not storage.is_url(str(src)) and not (labels and storage.is_url(str(labels))):
        return _detect(src, kind, labels, id_col, label_col, patient_col)
    try:
        return _detect(src, kind, labels, id_col, label_col, patient_col)
    except PermissionError as e:
        raise JobError(f"{src}: access denied ({storage.short_error(e)}); "
                       f"{storage.CHECK_CREDENTIALS}") from None
    except OSError as e:
        raise JobError(f"{src}: the store cannot be read ({storage.short_error(e)})") from None


def _detect(src, kind, labels, id_col, label_col, patient_col):
    fetched = labels is not None and storage.is_url(str(labels))
    if fetched:
        labels = _fetch_labels(str(labels))
    found = detect_archive_source(src, kind, labels, id_col, label_col, patient_col)
    if found is None and fetched and not storage.is_url(str(src)):
        from pipeline.sources import detect_local  # a local folder, its labels from a store

        return detect_local(src, kind, labels, id_col, label_col, patient_col)
    if found is not None or not storage.is_url(str(src)):
        return found
    return detect_store_folder(str(src), kind, labels, id_col, label_col, patient_col)


class StoreReader:
    """Photos in a store folder: ``read(path)`` on a worker, one GET per photo."""

    def __init__(self, base: str, listing: dict[str, tuple[int, str]] | None = None,
                 storage_options: dict | None = None):
        self.base = base.rstrip("/")
        self.listing = listing or {}
        self.storage_options = dict(storage.OPTIONS if storage_options is None
                                    else storage_options)

    def batch(self, paths) -> StoreReader:
        return StoreReader(self.base, None, self.storage_options)  # no listing on workers

    def fingerprint(self, path: str) -> str:
        size, etag = self.listing.get(path, (-1, ""))
        return f"{size}:{etag}"

    def read(self, path: str, max_bytes: int | None = None) -> bytes | Rejection:
        """An object's bytes, or why not; one larger than ``max_bytes`` is ``too_large``
        from its size (one HEAD request), unread. Never raises."""
        url = f"{self.base}/{path}"
        try:
            if max_bytes is not None:
                n = storage.size(url, self.storage_options)
                if n > max_bytes:
                    return Rejection("too_large", f"object of {n / 2**20:.0f} MB, over the "
                                                  f"{max_bytes / 2**20:.0f} MB limit "
                                                  "(--max-file-mb)")
            return storage.read_all(url, self.storage_options)
        except FileNotFoundError:
            return Rejection("unreadable", "no such object in the store")
        except Exception as e:  # noqa: BLE001 - a store error must not stop the batch
            return Rejection("unreadable", f"reading from the store: {type(e).__name__}: {e}")


def detect_store_folder(src: str, kind=None, labels=None, id_col="image", label_col="level",
                        patient_col=None):
    listing = list_store(src)
    reader = StoreReader(src, listing)
    top = {p for p in listing if "/" not in p}
    dirs = {p.split("/", 1)[0] for p in listing if "/" in p}
    if labels is not None:
        kind = "csv"
    if kind is None:
        if "trainLabels.csv" in top or "retinopathy_solution.csv" in top:
            kind = "kaggle"
        elif "train.csv" in top and "train_images" in dirs:
            kind = "aptos"
        elif any(str(g) in dirs for g in GRADES):
            kind = "folders"
        else:
            raise SourceError(f"{src}: not a known layout (Kaggle train/ + trainLabels.csv, "
                              "APTOS train.csv + train_images/, folders 0/..4/, or Kaggle's "
                              "train.zip.001...); give --labels FILE for any other CSV")

    def labels_file(name):
        return _fetch_labels(f"{src.rstrip('/')}/{name}")

    files, rows = {}, []
    if kind == "kaggle":
        if "trainLabels.csv" in top:
            rows += read_labels_as(labels_file("trainLabels.csv"), "image", "level",
                                  origin="train")
            S._add(files, photos_by_id(listing, "train/"), "train")
        if "retinopathy_solution.csv" in top:
            rows += read_labels_as(labels_file("retinopathy_solution.csv"), "image", "level",
                                  extra_col="Usage", origin="test")
            S._add(files, photos_by_id(listing, "test/"), "test")
    elif kind == "aptos":
        rows = read_labels_as(labels_file("train.csv"), "id_code", "diagnosis", origin="train")
        S._add(files, photos_by_id(listing, "train_images/"), "train")
    elif kind == "folders":
        files, rows = S.grade_folders(src, lambda g: photos_by_id(listing, f"{g}/"))
    elif kind == "csv":
        if labels is None:
            raise SourceError("--labels FILE is needed for a CSV source")
        rows = read_labels_as(labels, id_col, label_col, patient_col)
        S._add(files, photos_by_id(listing, ""), "")
    else:
        raise SourceError(f"unknown source kind {kind!r} (kaggle, aptos, folders, csv)")
    source = S._join(src, kind, files, rows)
    source.reader = reader
    return source


def list_store(src: str) -> dict[str, tuple[int, str]]:
    """The objects under ``src``; a missing bucket or prefix is a SourceError (exit 3),
    refused credentials an OSError naming the store."""
    try:
        listing = storage.walk(src)
    except FileNotFoundError:
        listing = {}
    except PermissionError as e:
        raise OSError(f"{src}: access denied ({e}); check the credentials") from None
    if not listing:
        raise SourceError(f"{src}: no such bucket or folder, or it is empty")
    return listing


def _fetch_labels(url: str):
    """A labels file from the store, as a local file for :func:`read_labels` (small)."""
    try:
        data = storage.read_all(url)
    except FileNotFoundError:
        raise LabelError(f"{url}: cannot read labels file (no such object)") from None
    return _temp_file(url.rsplit("/", 1)[-1], data, url)
