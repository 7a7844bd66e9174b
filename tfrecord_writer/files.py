"""Files written whole or not at all, under temporary names that are drpipe's own.

Every file drpipe writes (shards, the manifest, the info and state files, a staged download)
is written under ``dir/.NAME.PID.drpipe.tmp`` and renamed over its final name only once it
is complete, so a file with a final name is always whole: a crash leaves at most a
temporary, which the next run removes (:func:`remove_temporaries`). A user's ``*.tmp`` is
never touched.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_SUFFIX = ".drpipe.tmp"


def temporary_name(path: Path) -> Path:
    """``dir/.NAME.PID.drpipe.tmp``: hidden, unique to this process and to drpipe."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """The temporary name to write ``path`` under; renamed over ``path`` when the block
    completes, removed when it raises (a check of the bytes may raise to refuse them).

        with replacing(local / name) as tmp:
            fs.get_file(url, str(tmp))
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a whole file under a temporary name, fsync, rename over the final name."""
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(d: Path) -> None:
    """Make a rename in ``d`` survive a power cut, not only the file's data (best effort)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_temporaries(directory: Path) -> int:
    """Delete leftovers of drpipe's interrupted writes (``.*.drpipe.tmp``, the names
    :func:`temporary_name` makes; nothing else). Returns how many."""
    n = 0
    for p in Path(directory).glob(f".*{TMP_SUFFIX}"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file's bytes, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
