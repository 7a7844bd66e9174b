"""Read drpipe shards without TensorFlow: each record as a dict of numpy values and bytes.

    from tfrecord_writer.reader import iter_split
    for ex in iter_split("shards", "train", decode_image=True):
        ex["image"]               # uint8 array, size x size x 3, RGB
        ex["image/class/label"]   # numpy.int64, the grade 0-4
        ex["image/id"]            # bytes, e.g. b"10_left"

The keys are the record keys of :data:`~tfrecord_writer.schema.FEATURES`; int64 features
come back as ``numpy.int64``, bytes features as ``bytes``. A split is read in the order
TensorFlow Datasets reads it without shuffling: shards by index, records in file order.
CRCs are checked. Needs numpy, simplejpeg and Pillow, never TensorFlow (docs/FORMAT.md has a PyTorch
``IterableDataset`` over it).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image

from tfrecord_writer.example import iter_records, parse_example
from tfrecord_writer.info import load_info
from tfrecord_writer.schema import FEATURES

_NUMPY = {"int64": np.int64, "float": np.float32}


def split_shards(data_dir: str | Path, split: str) -> list[Path]:
    """The shard files of ``split``, in order (from drpipe's info, not a directory listing)."""
    splits = load_info(data_dir)["splits"]
    if split not in splits:
        raise ValueError(f"{data_dir} has no split {split!r} (has {', '.join(splits)})")
    return [Path(data_dir) / s["name"] for s in splits[split]["shards"]]


def iter_shard(path: str | Path, *, decode_image: bool = False) -> Iterator[dict]:
    """The records of one shard. ``decode_image`` adds ``"image"``, the decoded RGB array."""
    for data in iter_records(path):
        ex = {k: _NUMPY[FEATURES[k][0]](v) if k in FEATURES and FEATURES[k][0] in _NUMPY else v
              for k, v in parse_example(data).items()}
        if decode_image:
            ex["image"] = decode_image_bytes(ex["image/encoded"])
        yield ex


def iter_split(data_dir: str | Path, split: str, *, decode_image: bool = False
               ) -> Iterator[dict]:
    """The records of a split, shard after shard (see :func:`iter_shard`)."""
    for path in split_shards(data_dir, split):
        yield from iter_shard(path, decode_image=decode_image)


def decode_image_bytes(encoded: bytes) -> np.ndarray:
    """A stored JPEG or PNG to a uint8 RGB array (height x width x 3), pixel for pixel what
    TensorFlow (``tf.io.decode_image``, tf.data, TFDS) decodes."""
    if encoded[:3] == b"\xff\xd8\xff":
        # TensorFlow's decode_jpeg default is libjpeg's fast integer IDCT with fancy
        # upsampling; Pillow and OpenCV use the accurate IDCT and differ by a few levels.
        return simplejpeg.decode_jpeg(encoded, colorspace="RGB", fastdct=True,
                                      fastupsample=False)
    with Image.open(io.BytesIO(encoded)) as im:
        return np.asarray(im.convert("RGB"))
