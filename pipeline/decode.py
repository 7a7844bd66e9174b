"""Reading photographs: sniff the format, read dimensions without decoding, decode small.

Every failure raises :class:`ImageError` with a short machine-readable ``code`` and a
one-line human ``detail``; :mod:`pipeline.process` turns those into manifest rejections.

JPEG goes through libjpeg-turbo (``simplejpeg``) in *strict* mode: libjpeg's recoverable
warnings — "Premature end of JPEG file", "Corrupt JPEG data: ..." — become errors. That is
the integrity check: Pillow's ``verify()`` reads headers only, and OpenCV prints those
warnings to stderr and hands back a half-grey image.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

# Largest EyePACS photo is 4928x3264 (16 MP); 100 MP leaves room for any fundus camera
# while a decompression bomb (tens of thousands of pixels a side) is refused from its header.
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MIN_SIDE = 128

# DCT-domain reductions libjpeg does cheaply (1/2, 1/4, 1/8 use dedicated reduced IDCTs).
DCT_FACTORS = (8, 4, 2, 1)

# Lower bound of retina diameter / short side of the frame seen on fundus cameras, used to
# pick the reduction before the retina is found; pipeline.process re-decodes finer if wrong.
RETINA_FRACTION_OF_SHORT_SIDE = 0.9

_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
)


class ImageError(Exception):
    """A photo that cannot be used. ``code`` is stable (manifest ``reason``), ``detail`` human."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    """What the header says: format, size as stored (before EXIF rotation), orientation."""

    format: str
    width: int
    height: int
    orientation: int = 1  # EXIF orientation tag, 1 = upright

    @property
    def upright_size(self) -> tuple[int, int]:
        """(width, height) after applying the EXIF orientation."""
        return (self.height, self.width) if self.orientation in (5, 6, 7, 8) else (
            self.width, self.height)


def sniff_format(data: bytes) -> str:
    """Name the container from its magic bytes; the file extension is not trusted.

    Raises ImageError for empty input, HTML/text (what failed downloads look like) and
    anything else unrecognised.
    """
    if not data:
        raise ImageError("empty", "file has zero bytes")
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        raise ImageError("not_an_image", "HTML/XML document, not an image (a failed download?)")
    if _looks_like_text(data[:4096]):
        raise ImageError("not_an_image", "text file, not an image")
    raise ImageError("not_an_image", f"unrecognised file signature {data[:8].hex(' ')}")


def _looks_like_text(chunk: bytes) -> bool:
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_info(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
              min_side: int = DEFAULT_MIN_SIDE) -> ImageInfo:
    """Read format, dimensions and EXIF orientation without decoding pixel data.

    Refuses decompression bombs (more than ``max_pixels``) and photos whose short side is
    under ``min_side`` here, before any pixel memory is allocated.
    """
    fmt = sniff_format(data)
    if fmt == "jpeg":
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data, strict=True)
        except ValueError as e:
            raise ImageError("corrupt", f"unreadable JPEG header ({e})") from None
    else:
        with _pillow_errors():
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
    orientation = _exif_orientation(data)
    info = ImageInfo(fmt, width, height, orientation)
    if width * height > max_pixels:
        raise ImageError("too_large", f"{width}x{height} pixels exceeds the limit of "
                         f"{max_pixels:,} (decompression bomb?)")
    if min(width, height) < min_side:
        raise ImageError("too_small", f"{width}x{height}, short side under {min_side} px")
    return info


def _exif_orientation(data: bytes) -> int:
    # EXIF lives in an APP1 segment near the start; most fundus JPEGs have none, and looking
    # for it is cheaper than letting Pillow parse the headers (~0.2 ms).
    if data[:3] == b"\xff\xd8\xff" and not _jpeg_has_exif(data):
        return 1
    # Image.open parses headers lazily; getexif() reads the APP1/IFD0 only.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                value = int(im.getexif().get(0x0112, 1))
    except Exception:  # a damaged EXIF block must not reject an otherwise good photo
        return 1
    return value if 1 <= value <= 8 else 1


def _jpeg_has_exif(data: bytes) -> bool:
    """Whether a JPEG's header segments (before the scan) hold an EXIF APP1 segment. Walks
    the segment lengths (a few steps, ~3 us); searching the first 64 KB for the signature
    took ~0.1 ms. Where the segments do not parse, the search decides, as it used to."""
    i, n = 2, min(len(data), 1 << 20)
    while i + 4 <= n:
        if data[i] != 0xFF:
            break
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in (0xDA, 0xD9):  # start of scan, end of image: no more headers
            return False
        elif 0xD0 <= marker <= 0xD7 or marker in (0x01, 0xD8):  # no length field
            i += 2
        else:
            if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\x00\x00":
                return True
            i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return data.find(b"Exif\x00\x00", 0, 65536) >= 0


def choose_dct_factor(short_side: int, target_diameter: int) -> int:
    """The largest DCT reduction (8, 4, 2 or 1) that keeps the retina >= target_diameter.

    The retina is assumed to span at least RETINA_FRACTION_OF_SHORT_SIDE of the short side;
    at 512 px output, a 3888x2592 EyePACS photo decodes at 1/4 (648 px high): 78 photos/s
    against 29 for OpenCV's full-size decode, one core (docs/BENCHMARKS.md).
    """
    for factor in DCT_FACTORS:
        if short_side / factor * RETINA_FRACTION_OF_SHORT_SIDE >= target_diameter:
            return factor
    return 1


def decode(data: bytes, info: ImageInfo, factor: int = 1) -> np.ndarray:
    """Decode to an upright 8-bit RGB array, reduced ``factor`` times where the codec can.

    JPEG is reduced in the DCT domain; other formats decode at full size (they are rare and
    small in fundus datasets) and are reduced afterwards with area interpolation.
    """
    if info.format == "jpeg":
        rgb = _decode_jpeg(data, info, factor)
    else:
        rgb = _decode_other(data)
        if factor > 1:
            h, w = rgb.shape[:2]
            rgb = cv2.resize(rgb, (max(1, round(w / factor)), max(1, round(h / factor))),
                             interpolation=cv2.INTER_AREA)
    return apply_orientation(rgb, info.orientation)


def _decode_jpeg(data: bytes, info: ImageInfo, factor: int) -> np.ndarray:
    min_h, min_w = math.ceil(info.height / factor), math.ceil(info.width / factor)
    try:
        return simplejpeg.decode_jpeg(data, "RGB", min_height=min_h, min_width=min_w,
                                      strict=True)
    except ValueError as e:
        msg = str(e)
        if "Premature end of JPEG file" in msg:
            raise ImageError("truncated", "JPEG data ends early (truncated file)") from None
        if "Unsupported color conversion" in msg or "CMYK" in msg:
            return _decode_other(data)  # CMYK/YCCK: libjpeg-turbo won't convert, Pillow does
        raise ImageError("corrupt", f"corrupt JPEG data ({msg})") from None


class _pillow_errors:
    """Map Pillow's many exception types onto ImageError codes."""

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is None or isinstance(exc, ImageError):
            return False
        if isinstance(exc, Image.DecompressionBombError):
            raise ImageError("too_large", str(exc)) from None
        if isinstance(exc, UnidentifiedImageError):
            raise ImageError("not_an_image", "no decoder recognises the file") from None
        text = str(exc)
        if "truncated" in text.lower():
            raise ImageError("truncated", text) from None
        if isinstance(exc, (OSError, ValueError, SyntaxError, EOFError)):
            raise ImageError("corrupt", text or type(exc).__name__) from None
        return False


def _decode_other(data: bytes) -> np.ndarray:
    with _pillow_errors(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning: checked already
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return to_rgb8(im)


def to_rgb8(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> HxWx3 uint8 RGB. 16/32-bit grey is scaled, not clipped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im)
        bits = 16 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 8
        a = (a.astype(np.float32) * (255.0 / (2**bits - 1))).round().clip(0, 255)
        return np.repeat(a.astype(np.uint8)[:, :, None], 3, axis=2)
    if im.mode == "F":
        a = np.asarray(im)
        top = max(float(a.max(initial=0)), 1.0)
        a = (a * (255.0 / top)).round().clip(0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if im.mode != "RGB":
        im = im.convert("RGB")  # L, LA, P, PA, RGBA, CMYK, YCbCr, 1 — alpha is dropped
    return np.asarray(im, dtype=np.uint8)


def apply_orientation(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """Rotate/flip an array as EXIF orientation 1-8 says, so the result is upright."""
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: np.swapaxes(a, 0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1],
        8: lambda a: np.rot90(a, 1),
    }
    op = ops.get(orientation)
    return np.ascontiguousarray(op(rgb)) if op else rgb
