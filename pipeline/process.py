"""One photograph from bytes to a training-ready encoded square: the per-photo pipeline.

    process(data, config) -> ProcessedImage | Rejection

``process`` never raises for bad input: every failure becomes a :class:`Rejection` with a
stable ``code`` and a human ``detail``, so a batch job can account for every photo. It is a
plain function on bytes and plain dataclasses, so it ships to a Dask worker as it is.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

import numpy as np

from pipeline import decode as dec
from pipeline import storage
from pipeline.encode import encode
from pipeline.filters import FilterParams, get_filter
from pipeline.quality import Quality, assess
from pipeline.retina import Circle, NoRetina, crop_to_retina, find_retina

QUALITY_SIZE = 512  # the --size pipeline.quality's thresholds were calibrated at
DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # a fundus photo is 0.1-20 MB; a padded one is not


@dataclass(frozen=True)
class ProcessConfig:
    """Everything that determines the processed bytes of a photo."""

    size: int = 512
    filter: str = "graham"
    format: str = "jpeg"
    quality: int = 95
    filter_params: FilterParams = field(default_factory=FilterParams)
    max_pixels: int = dec.DEFAULT_MAX_PIXELS
    min_side: int = dec.DEFAULT_MIN_SIDE
    max_bytes: int = DEFAULT_MAX_BYTES  # larger files are rejected before they are read
    # Photos scoring under this (pipeline/quality.py) are rejected as ungradable; None:
    # quality is recorded, nothing is rejected for it.
    min_quality: float | None = None

    @classmethod
    def from_options(cls, size: int = 512, filter_: str = "graham", quality: int = 95,
                     clahe_clip: float = 2.0, clahe_tiles: int = 8,
                     max_megapixels: float = 100.0, min_side: int = 128, fmt: str = "jpeg",
                     max_file_mb: float = 256.0, min_quality: float | None = None
                     ) -> ProcessConfig:
        """The configuration from the command line's units (megapixels, MB); ValueError
        (the reason) for an unknown filter."""
        params = FilterParams(clahe_clip=clahe_clip, clahe_tiles=clahe_tiles)
        get_filter(filter_, params)  # ValueError: unknown filter
        return cls(size=size, filter=filter_, format=fmt, quality=quality,
                   filter_params=params, max_pixels=round(max_megapixels * 1e6),
                   min_side=min_side, max_bytes=round(max_file_mb * 2**20),
                   min_quality=min_quality)


@dataclass(frozen=True)
class Rejection:
    """Why a photo was not used. ``code`` is one of: empty, not_an_image, corrupt, truncated,
    too_large, too_small, no_retina, unreadable, duplicate_id, ungradable, internal_error."""

    code: str
    detail: str
    quality: Quality | None = None  # measured, for ungradable

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"


@dataclass(frozen=True)
class Prepared:
    """The processed photo before encoding, with what was learnt on the way."""

    info: dec.ImageInfo
    decoded: np.ndarray  # upright RGB at 1/factor of the original size
    factor: int
    circle: Circle  # retina in original (upright) pixel coordinates
    image: np.ndarray  # size x size x 3 uint8, filtered
    quality: Quality | None = None  # gradability, measured on the unfiltered crop


@dataclass(frozen=True)
class ProcessedImage:
    encoded: bytes
    format: str
    width: int
    height: int
    original_width: int  # upright, after EXIF orientation
    original_height: int
    circle: Circle  # retina in original pixel coordinates
    decode_factor: int
    quality: Quality | None = None


def read_photo(path, max_bytes: int | None = DEFAULT_MAX_BYTES) -> bytes | Rejection:
    """A photo's bytes, or why they cannot be had. Only regular files are read: a FIFO or
    device named like a photo would block the reader forever; a file over ``max_bytes`` is
    rejected ``too_large`` from its size, before a byte is read (it could take a worker's
    memory). A store URL is one object read by GET (``too_large`` from its size first)."""
    if storage.is_url(path):
        from pipeline.remote_source import StoreReader  # deferred: fsspec

        base, name = str(path).rsplit("/", 1)
        return StoreReader(base).read(name, max_bytes)
    try:
        st = os.stat(path)  # follows symlinks: a broken one fails here
        if not stat.S_ISREG(st.st_mode):
            kind = "directory" if stat.S_ISDIR(st.st_mode) else "FIFO" if stat.S_ISFIFO(
                st.st_mode) else "special file"
            return Rejection("unreadable", f"not a regular file ({kind})")
        if max_bytes is not None and st.st_size > max_bytes:
            return Rejection("too_large", f"file of {st.st_size / 2**20:.0f} MB, over the "
                             f"{max_bytes / 2**20:g} MB limit (--max-file-mb)")
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        what = "broken symlink" if os.path.islink(path) and not os.path.exists(path) else (
            e.strerror or type(e).__name__)
        return Rejection("unreadable", what)


def verify(data: bytes, config: ProcessConfig = ProcessConfig()) -> Rejection | None:
    """A real integrity check: header limits, then a full entropy decode (at 1/8 scale,
    which still reads every byte of a JPEG). Returns the reason, or None if the photo is
    sound. Never raises."""
    try:
        info = dec.read_info(data, max_pixels=config.max_pixels, min_side=config.min_side)
        dec.decode(data, info, factor=8)
    except dec.ImageError as e:
        return Rejection(e.code, e.detail)
    except Exception as e:  # noqa: BLE001 - a verifier must answer, not crash
        return Rejection("internal_error", f"{type(e).__name__}: {e}")
    return None


def prepare(data: bytes, config: ProcessConfig) -> Prepared:
    """Decode small, find the retina, crop, resize, filter. Raises ImageError / NoRetina.

    The strict decode is the integrity check, so a photo is decoded once (twice only when
    the retina turns out smaller than the header suggested and a finer decode is needed).
    """
    info = dec.read_info(data, max_pixels=config.max_pixels, min_side=config.min_side)
    up_w, up_h = info.upright_size
    factor = dec.choose_dct_factor(min(up_w, up_h), config.size)
    while True:
        decoded = dec.decode(data, info, factor)
        circle = find_retina(decoded)
        if 2 * circle.r >= config.size or factor == 1:
            break
        factor //= 2
    # Exact scale of this decode (libjpeg rounds reduced sizes up).
    scale = up_w / decoded.shape[1]
    crop = crop_to_retina(decoded, circle, config.size)
    # Quality is measured as at the default 512 px, where its thresholds were calibrated,
    # whatever --size: a verdict (and --min-quality) then means the same at 64 px. Smaller
    # sizes take a 512 px crop of the decode for it (about a millisecond more).
    seen = (crop if config.size >= QUALITY_SIZE
            else crop_to_retina(decoded, circle, QUALITY_SIZE))
    quality = assess(seen.image, seen.radius, seen.frame)  # before the filter changes it
    image = get_filter(config.filter, config.filter_params)(crop.image, crop.radius, crop.frame)
    return Prepared(info, decoded, factor, circle.scaled(scale), image, quality)


def prepare_or_reject(data: bytes, config: ProcessConfig) -> Prepared | Rejection:
    """:func:`prepare`, with every failure turned into a Rejection. Never raises."""
    try:
        return prepare(data, config)
    except dec.ImageError as e:
        return Rejection(e.code, e.detail)
    except NoRetina as e:
        return Rejection("no_retina", str(e).removeprefix("no retina: "))
    except MemoryError:
        return Rejection("too_large", "out of memory while decoding")
    except Exception as e:  # noqa: BLE001 - one odd photo must not stop a 10-hour job
        return Rejection("internal_error", f"{type(e).__name__}: {e}")


def process(data: bytes, config: ProcessConfig = ProcessConfig()) -> ProcessedImage | Rejection:
    """Verify, decode, find the retina, crop, resize, score, filter and encode one photo."""
    p = prepare_or_reject(data, config)
    if isinstance(p, Rejection):
        return p
    if config.min_quality is not None and p.quality.score < config.min_quality:
        return Rejection("ungradable", f"{p.quality.describe()}; under --min-quality "
                         f"{config.min_quality:g}", p.quality)
    up_w, up_h = p.info.upright_size
    return ProcessedImage(encode(p.image, config.format, config.quality), config.format,
                          config.size, config.size, up_w, up_h, p.circle, p.factor, p.quality)
