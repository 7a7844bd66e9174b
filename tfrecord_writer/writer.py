"""Shard naming and the shard writer: open, write, commit atomically, nothing else.

A shard is written under a temporary name in the same directory and renamed to its final
name only after it is complete and fsynced (:mod:`tfrecord_writer.files`), so a file with a
final name is always whole.
"""

from __future__ import annotations

import os
from pathlib import Path

from tfrecord_writer.example import frame_record, serialize_example

# Re-exported for callers that import the file helpers from here (drpipe/, training/).
from tfrecord_writer.files import (  # noqa: F401
    TMP_SUFFIX,
    atomic_write_bytes,
    fsync_dir,
    remove_temporaries,
    temporary_name,
)
from tfrecord_writer.schema import Record


def shard_name(split: str, index: int, count: int) -> str:
    """``{split}-{i:05d}-of-{n:05d}.tfrecord`` — the TFDS convention."""
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def plan_shards(sizes: list[int], target_bytes: int) -> list[int]:
    """Cut a sequence of record sizes into shards of about ``target_bytes``.

    Returns the shard index of each record. Depends only on the sizes, so the same records
    always land in the same shards, whatever the workers did. Uses as many shards as
    needed for none to exceed the target by more than one record, sized evenly.
    """
    total = sum(sizes)
    if not sizes:
        return []
    count = max(1, -(-total // max(1, target_bytes)))
    count = min(count, len(sizes))
    per = total / count
    out, acc = [], 0
    for s in sizes:
        out.append(min(count - 1, int((acc + s / 2) // per)))
        acc += s
    return out


class ShardWriter:
    """Writes records to one shard; :meth:`commit` makes it appear under its final name.

        with ShardWriter(path) as w:
            for rec in records:
                w.write(rec)
        # committed on a clean exit; on an exception the temporary file is removed
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._tmp = temporary_name(self.path)
        self._f = open(self._tmp, "wb")
        self.records = 0
        self.bytes = 0

    def write(self, record: Record | bytes) -> None:
        """Append a Record, or an already serialised Example."""
        data = record if isinstance(record, bytes) else serialize_example(record.features())
        framed = frame_record(data)
        self._f.write(framed)
        self.records += 1
        self.bytes += len(framed)

    def commit(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self.path)
        fsync_dir(self.path.parent)  # the rename too

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, typ, exc, tb) -> None:
        if exc is None:
            self.commit()
        else:
            self.abort()
