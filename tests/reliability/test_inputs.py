"""Hostile inputs: each is rejected with a clear reason or processed, never lost, and the
job finishes. One real `drpipe preprocess` over a Kaggle layout holding all of them."""

from __future__ import annotations

import io
import os
import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.process import ProcessConfig, process
from tests.reliability.helpers import (
    can_drop_privileges,
    drpipe,
    manifest,
    no_traceback,
    shared_tmp,
)


def _fundus(w=900, h=600, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    cv2.circle(img, (w // 2, h // 2), int(h * 0.46), (190, 100, 45), -1)
    cv2.circle(img, (int(w * 0.35), h // 2), 22, (250, 235, 150), -1)
    return cv2.add(img, rng.integers(0, 6, img.shape, dtype=np.uint8))


def _save(rgb, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **kw)
    return buf.getvalue()


def _png_header_only(w, h) -> bytes:
    def chunk(tag, payload):
        return (struct.pack(">I", len(payload)) + tag + payload
                + struct.pack(">I", zlib.crc32(tag + payload)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _jpeg_with_size(jpeg: bytes, w: int, h: int) -> bytes:
    i = 2
    while True:
        marker, length = jpeg[i + 1], struct.unpack(">H", jpeg[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC2):
            return jpeg[:i + 5] + struct.pack(">HH", h, w) + jpeg[i + 9:]
        i += 2 + length


# id -> (bytes or a maker, expected status, expected reason code or None)
def hostile_files() -> dict[str, tuple[bytes, str, str | None]]:
    rgb = _fundus()
    jpeg = _save(rgb, "JPEG", quality=92)
    flipped = bytearray(jpeg)
    rng = np.random.default_rng(0)
    for i in rng.integers(2000, len(jpeg) - 10, 40):
        flipped[i] ^= 0xFF
    exif = Image.Exif()
    exif[0x0112] = 6
    scene = cv2.GaussianBlur(np.random.default_rng(1).integers(40, 255, (600, 900, 3),
                                                               dtype=np.uint8), (0, 0), 4)
    files = {
        "1_left": (b"", "rejected", "empty"),
        "1_right": (b"lorem ipsum dolor sit amet\n" * 20, "rejected", "not_an_image"),
        "2_left": (b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>",
                   "rejected", "not_an_image"),
        "3_left": (jpeg[: len(jpeg) // 10], "rejected", "truncated"),
        "3_right": (jpeg[: len(jpeg) // 2], "rejected", "truncated"),
        "4_left": (jpeg[: len(jpeg) * 9 // 10], "rejected", "truncated"),
        "4_right": (bytes(flipped), "rejected", "corrupt"),
        "5_left": (cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes(),
                   "ok", None),  # PNG named .jpeg
        "5_right": (_save(rgb, "GIF"), "ok", None),
        "6_left": (_save(rgb, "BMP"), "ok", None),
        "6_right": (_save(rgb, "TIFF"), "ok", None),
        "7_left": (_save(Image.fromarray(rgb).convert("CMYK"), "JPEG") if False else
                   _cmyk(rgb), "ok", None),
        "7_right": (_save(rgb[:, :, 0].copy(), "JPEG"), "ok", None),
        "8_left": (cv2.imencode(".png", rgb.astype(np.uint16) * 257)[1].tobytes(), "ok", None),
        "8_right": (_save(np.ascontiguousarray(np.rot90(rgb, 1)), "JPEG",
                          exif=exif.tobytes()), "ok", None),
        "9_left": (_save(rgb, "JPEG", progressive=True), "ok", None),
        "9_right": (jpeg + os.urandom(5000), "ok", None),  # trailing garbage after EOI
        "10_left": (_save(np.full((1, 1, 3), 200, np.uint8), "PNG"), "rejected", "too_small"),
        "10_right": (_save(rgb[:32, :32].copy(), "JPEG"), "rejected", "too_small"),
        "11_left": (_png_header_only(60000, 60000), "rejected", "too_large"),
        "11_right": (_jpeg_with_size(jpeg, 65000, 40000), "rejected", "too_large"),
        "12_left": (_save(np.zeros((600, 900, 3), np.uint8), "JPEG"), "rejected", "no_retina"),
        "12_right": (_save(scene, "JPEG"), "rejected", "no_retina"),
        "13_left": (jpeg, "ok", None),
        "13_right": (jpeg, "ok", None),  # the same bytes under another id
        "ünï cödé 14_left": (_save(_fundus(seed=3), "JPEG"), "ok", None),
    }
    return files


def _cmyk(rgb) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG", quality=92)
    return buf.getvalue()


EXT = {"5_right": ".gif", "6_left": ".bmp", "6_right": ".tiff"}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    root = shared_tmp()
    train = root / "train"
    train.mkdir()
    files = hostile_files()
    for image_id, (data, _, _) in files.items():
        (train / f"{image_id}{EXT.get(image_id, '.jpeg')}").write_bytes(data)
    os.symlink(root / "nowhere.jpeg", train / "15_left.jpeg")  # broken symlink
    os.mkfifo(train / "15_right.jpeg")  # would block a naive reader forever
    (train / "16_left.jpeg").write_bytes(files["13_left"][0])
    (train / "16_left.jpeg").chmod(0)  # unreadable (for a user other than root)
    ids = [*files, "15_left", "15_right", "16_left"]
    (root / "trainLabels.csv").write_text(
        "image,level\n" + "".join(f"{i},{n % 5}\n" for n, i in enumerate(ids)), "utf-8")
    return root


@pytest.fixture(scope="module")
def result(hostile):
    out = hostile / "out"
    t = time.time()
    r = drpipe("preprocess", "--src", hostile, "--out", out, "--workers", 2, "--quiet",
               "--summary-json", hostile / "summary.json")
    return r, out, time.time() - t


def test_job_completes_without_traceback(result):
    r, out, seconds = result
    assert r.returncode == 0, r.stderr[-2000:]
    no_traceback(r)
    assert seconds < 120


def test_every_hostile_file_gets_its_outcome(result):
    _, out, _ = result
    rows = manifest(out)
    for image_id, (_, status, code) in hostile_files().items():
        row = rows[image_id]
        assert row["status"] == status, (image_id, row["reason"])
        if code:
            assert row["reason"].split(":")[0] == code, (image_id, row["reason"])
            assert len(row["reason"]) > len(code) + 4  # a human detail, not only a code
        else:
            assert row["shard"], image_id


def test_unreadable_paths_are_accounted(result):
    _, out, _ = result
    rows = manifest(out)
    assert rows["15_left"]["reason"] == "unreadable: broken symlink"
    assert rows["15_right"]["reason"] == "unreadable: not a regular file (FIFO)"
    if os.geteuid() != 0:  # root reads a mode-000 file; see the unprivileged test below
        assert rows["16_left"]["reason"] == "unreadable: Permission denied"


@pytest.mark.skipif(not can_drop_privileges(), reason="needs setpriv to drop root")
def test_unreadable_file_for_an_ordinary_user(tmp_path):
    import subprocess
    import sys

    d = shared_tmp()
    (d / "x.jpeg").write_bytes(b"\xff\xd8\xff")
    (d / "x.jpeg").chmod(0)
    code = ("from pipeline.process import read_photo; import sys; "
            "print(read_photo(sys.argv[1]))")
    cmd = [sys.executable, "-c", code, str(d / "x.jpeg")]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.stdout.strip() == "unreadable: Permission denied", r.stderr


def test_duplicates_flagged_and_unicode_kept(result):
    _, out, _ = result
    rows = manifest(out)
    assert rows["13_right"]["duplicate_of"] == "13_left"
    assert rows["ünï cödé 14_left"]["patient_id"] == "ünï cödé 14"
    assert rows["ünï cödé 14_left"]["path"] == "train/ünï cödé 14_left.jpeg"


def test_exif_rotated_photo_is_upright(result):
    _, out, _ = result
    row = manifest(out)["8_right"]
    assert (int(row["width"]), int(row["height"])) == (900, 600)


def test_bomb_refused_fast_and_small():
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    for data in (_png_header_only(60000, 60000),
                 _jpeg_with_size(_save(_fundus(), "JPEG"), 65000, 65000)):
        r = process(data, ProcessConfig())
        assert r.code == "too_large"
    assert time.perf_counter() - t < 0.5
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 50  # 60000^2 RGB would be 10 GB
