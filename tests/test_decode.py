"""Reading photographs: format sniffing, header limits, reduced decode, odd but valid files."""

from __future__ import annotations

import io
import struct

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline import decode as dec
from pipeline.process import ProcessConfig, ProcessedImage, Rejection, process, verify


def _photo(w=900, h=600, seed=0) -> np.ndarray:
    """A fundus-like RGB disc on black (centre offset so orientation is testable)."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    cv2.circle(img, (int(w * 0.45), h // 2), int(h * 0.45), (200, 110, 50), -1)
    cv2.circle(img, (int(w * 0.30), h // 2), 20, (255, 240, 160), -1)
    noise = rng.integers(0, 6, img.shape, dtype=np.uint8)
    return cv2.add(img, noise)


def _jpeg(rgb, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=92, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def good_jpeg() -> bytes:
    return _jpeg(_photo())


@pytest.mark.parametrize("data,code", [
    (b"", "empty"),
    (b"hello, this is a text file\n" * 10, "not_an_image"),
    (b"<!DOCTYPE html><html><head><title>404 Not Found</title></head></html>", "not_an_image"),
    (b"\x00\x01\x02\x03garbage\xff\xfe" * 50, "not_an_image"),
])
def test_non_images_are_rejected_with_reason(data, code):
    r = process(data)
    assert isinstance(r, Rejection)
    assert r.code == code, r
    assert r.detail


def test_html_error_page_says_so():
    r = process(b"\n  <html><body><h1>403 Forbidden</h1></body></html>")
    assert r.code == "not_an_image" and "HTML" in r.detail


@pytest.mark.parametrize("fraction", [0.4, 0.8, 0.98])
def test_truncated_jpeg_is_rejected(good_jpeg, fraction):
    cut = good_jpeg[: int(len(good_jpeg) * fraction)]
    r = process(cut)
    assert isinstance(r, Rejection) and r.code == "truncated", r
    # Pillow's verify(), what the research scripts used, passes the same bytes:
    Image.open(io.BytesIO(cut)).verify()
    assert verify(cut).code == "truncated"


def test_bit_flipped_jpeg_is_rejected_or_processed(good_jpeg):
    rng = np.random.default_rng(3)
    outcomes = set()
    for _ in range(10):
        b = bytearray(good_jpeg)
        for i in rng.integers(1000, len(b) - 10, 8):
            b[i] ^= 1 << int(rng.integers(8))
        r = process(bytes(b))
        if isinstance(r, Rejection):
            assert r.code in {"corrupt", "truncated", "no_retina"}, r
        outcomes.add(type(r).__name__)
    # Entropy-coded corruption must be caught at least sometimes (libjpeg warnings -> errors).
    assert "Rejection" in outcomes


def test_png_named_jpeg_is_processed():
    ok, png = cv2.imencode(".png", cv2.cvtColor(_photo(), cv2.COLOR_RGB2BGR))
    r = process(png.tobytes(), ProcessConfig(size=256))
    assert isinstance(r, ProcessedImage)


def _patch_jpeg_size(data: bytes, w: int, h: int) -> bytes:
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            return data[:i + 5] + struct.pack(">HH", h, w) + data[i + 9:]
        i += 2 + length
    raise AssertionError("no SOF marker")


def test_decompression_bomb_rejected_from_header(good_jpeg):
    bomb = _patch_jpeg_size(good_jpeg, 60000, 60000)
    r = process(bomb)
    assert r.code == "too_large" and "60000x60000" in r.detail


def test_png_bomb_rejected_from_header():
    # A PNG header claiming 50000 x 50000 (the pixel data need not exist to be refused).
    import zlib

    def chunk(tag, payload):
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(
            ">I", zlib.crc32(tag + payload))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 50000, 50000, 8, 2,
           0, 0, 0)) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))
    r = process(png)
    assert r.code == "too_large"


def test_too_small_rejected():
    r = process(_jpeg(_photo(64, 48)))
    assert r.code == "too_small"


@pytest.mark.parametrize("kind", ["cmyk", "gray", "png16", "progressive", "tiff", "palette",
                                  "gray_png16"])
def test_unusual_but_valid_photos_are_processed(kind):
    rgb = _photo()
    if kind == "cmyk":
        buf = io.BytesIO()
        Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG", quality=92)
        data = buf.getvalue()
    elif kind == "gray":
        data = _jpeg(np.ascontiguousarray(rgb[:, :, 0]))
    elif kind == "png16":
        ok, b = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257)
        data = b.tobytes()
    elif kind == "gray_png16":
        ok, b = cv2.imencode(".png", rgb[:, :, 0].astype(np.uint16) * 257)
        data = b.tobytes()
    elif kind == "progressive":
        data = _jpeg(rgb, progressive=True)
    elif kind == "tiff":
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "TIFF")
        data = buf.getvalue()
    elif kind == "palette":
        buf = io.BytesIO()
        Image.fromarray(rgb).convert("P").save(buf, "PNG")
        data = buf.getvalue()
    r = process(data, ProcessConfig(size=256))
    assert isinstance(r, ProcessedImage), r
    out = cv2.imdecode(np.frombuffer(r.encoded, np.uint8), cv2.IMREAD_COLOR)
    assert out.shape == (256, 256, 3)
    # Same retina as the plain RGB photo: the conversions kept the geometry.
    ref = process(_jpeg(rgb), ProcessConfig(size=256))
    assert abs(r.circle.cx - ref.circle.cx) < 4 and abs(r.circle.r - ref.circle.r) < 4


def test_sixteen_bit_gray_is_scaled_not_clipped():
    a = (np.arange(256 * 200, dtype=np.uint32).reshape(200, 256) * 1).astype(np.uint16)
    ok, b = cv2.imencode(".png", a)
    info = dec.read_info(b.tobytes(), min_side=1)
    rgb = dec.decode(b.tobytes(), info)
    assert rgb.dtype == np.uint8 and rgb.shape == (200, 256, 3)
    assert rgb.max() == round(a.max() / 257)  # not saturated at 255


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(orientation):
    rgb = _photo(300, 200)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    data = buf.getvalue()
    info = dec.read_info(data, min_side=1)
    assert info.orientation == orientation
    ours = dec.decode(data, info)
    theirs = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert ours.shape == theirs.shape
    assert np.abs(ours.astype(int) - theirs).max() <= 2


def test_exif_rotated_photo_finds_the_upright_retina():
    rgb = _photo()
    upright = process(_jpeg(rgb), ProcessConfig(size=256))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated 90 degrees counter-clockwise; display rotates it back
    stored = np.ascontiguousarray(np.rot90(rgb, 1))
    rotated = process(_jpeg(stored, exif=exif.tobytes()), ProcessConfig(size=256))
    assert (rotated.original_width, rotated.original_height) == (900, 600)
    assert abs(rotated.circle.cx - upright.circle.cx) < 3
    assert abs(rotated.circle.cy - upright.circle.cy) < 3


@pytest.mark.parametrize("short,size,factor", [
    (2592, 512, 4), (3264, 512, 4), (1920, 512, 2), (1944, 512, 2), (2592, 256, 8),
    (600, 512, 1)])
def test_dct_factor_keeps_the_retina_at_least_target(short, size, factor):
    assert dec.choose_dct_factor(short, size) == factor


def test_reduced_decode_is_really_reduced(sample_photos):
    data = sample_photos[0].read_bytes()
    info = dec.read_info(data)
    small = dec.decode(data, info, 4)
    assert small.shape[:2] == (-(-info.height // 4), -(-info.width // 4))


def test_verify_accepts_all_real_photos(sample_photos):
    for p in sample_photos:
        assert verify(p.read_bytes()) is None, p.name
