"""Local paths and fsspec URLs (``s3://``, ``gs://``, any installed protocol), read alike.

Only what the sources and archives need: list a folder, a file's size, a ranged read, a
whole read. A local path never goes through fsspec. Credentials come from the environment
or the instance's role (the store's own chain); ``storage_options`` are passed through and
never written anywhere.
"""

from __future__ import annotations

import os

# --storage-option KEY=VALUE, set once by the command line; readers shipped to workers carry
# a copy. Never part of a configuration, an output or a log line.
OPTIONS: dict = {}


# How a refused request is explained (the store's own credential chain is used).
CHECK_CREDENTIALS = "check the credentials (environment, profile or the instance's role)"


def short_error(e: BaseException) -> str:
    """A store error's first line, at most 200 characters (its type when it has no text)."""
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def file_sizes(entries) -> dict[str, int]:
    """{name: size} of the files among fsspec ``ls(detail=True)`` entries."""
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
            for e in entries if e.get("type") == "file"}


def configure(options: dict) -> None:
    OPTIONS.clear()
    OPTIONS.update(options)


def is_url(path) -> bool:
    s = str(path)
    return "://" in s and not s.startswith("file://")


def filesystem(url: str, storage_options: dict | None = None):
    import fsspec  # deferred: fsspec and a store's backend load only for a URL

    protocol = url.split("://", 1)[0]
    return fsspec.filesystem(protocol, **(OPTIONS if storage_options is None
                                          else storage_options))


def read_range(url: str, start: int, end: int, storage_options: dict | None = None) -> bytes:
    """Bytes ``[start, end)`` of a file: one seek and read, or one ranged request."""
    if is_url(url):
        return filesystem(url, storage_options).cat_file(url, start=start, end=end)
    with open(url, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def size(url: str, storage_options: dict | None = None) -> int:
    if is_url(url):
        return int(filesystem(url, storage_options).size(url))
    return os.stat(url).st_size


def listdir(url: str, storage_options: dict | None = None) -> dict[str, int]:
    """{name: size} of the files directly in a folder (empty if it is no folder); a local
    folder's sizes are 0 (no stat per file: a folder may hold 35,000 photos)."""
    if is_url(url):
        fs = filesystem(url, storage_options)
        try:
            entries = fs.ls(url, detail=True)
        except FileNotFoundError:
            return {}
        path = fs._strip_protocol(url).rstrip("/")
        if [e["name"].rstrip("/") for e in entries] == [path] and entries[0].get("type") == "file":
            return {}  # ls of an object (one.zip) lists the object itself: no folder
        return file_sizes(entries)
    try:
        with os.scandir(url) as it:
            return {e.name: 0 for e in it if e.is_file()}
    except (NotADirectoryError, FileNotFoundError):
        return {}


def join(base: str, name: str) -> str:
    return f"{str(base).rstrip('/')}/{name}" if is_url(base) else os.path.join(base, name)


def read_all(url: str, storage_options: dict | None = None) -> bytes:
    if is_url(url):
        return filesystem(url, storage_options).cat_file(url)
    with open(url, "rb") as f:
        return f.read()


def walk(url: str, storage_options: dict | None = None) -> dict[str, tuple[int, str]]:
    """{path relative to url: (size, etag)} of every object under a store prefix."""
    fs = filesystem(url, storage_options)
    base = fs._strip_protocol(url).rstrip("/")
    out = {}
    for key, e in fs.find(url, detail=True).items():
        if e.get("type", "file") != "file" or not key.startswith(base + "/"):
            continue
        out[key[len(base) + 1:]] = (int(e.get("size") or 0), str(e.get("ETag", "")).strip('"'))
    return out
