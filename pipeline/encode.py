"""Encoding processed photos for the shards."""

from __future__ import annotations

import cv2
import numpy as np
import simplejpeg

FORMATS = ("jpeg", "png")


def encode(rgb: np.ndarray, fmt: str = "jpeg", quality: int = 95) -> bytes:
    """Encode uint8 RGB as JPEG (libjpeg-turbo, 4:2:0 like OpenCV and TFDS) or lossless PNG.

    Both encoders are deterministic for a given library version, which the byte-for-byte
    reproducibility of the shards relies on.
    """
    if fmt == "jpeg":
        return simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=quality,
                                      colorspace="RGB", colorsubsampling="420")
    if fmt == "png":
        ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_PNG_COMPRESSION, 6])
        if not ok:
            raise RuntimeError("PNG encoding failed")
        return buf.tobytes()
    raise ValueError(f"unknown output format {fmt!r} (choose from {', '.join(FORMATS)})")
