"""Contrast filters, registered by short name and composable with ``+``.

Each registered name maps to a factory ``make(params) -> fn(rgb, radius, frame) -> rgb``;
the returned function is pure (uint8 RGB in, uint8 RGB out). ``radius`` is the retina
radius in the array's pixels, which the filters need to scale with resolution; ``frame``
(x0, y0, x1, y1) is the part of the array that came from the photo (outside it: black
padding where the camera frame clipped the disc), or None for all of it.

    get_filter("graham+clahe", FilterParams())(rgb, radius, frame)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

Frame = tuple[int, int, int, int] | None
FilterFn = Callable[[np.ndarray, float, Frame], np.ndarray]


@dataclass(frozen=True)
class FilterParams:
    """Tunables of the filters (all have the defaults users of the reference works had)."""

    # Ben Graham: sigma = radius / 30 (TFDS btgraham-300 uses 300/30 = 10 px).
    graham_sigma_fraction: float = 1 / 30
    # Outside this fraction of the radius the filtered image is set to the background: the
    # rim of the disc is where the blur mixes in the black border and rings.
    graham_mask_fraction: float = 0.9
    clahe_clip: float = 2.0
    clahe_tiles: int = 8


_REGISTRY: dict[str, Callable[[FilterParams], FilterFn]] = {}


def register(name: str):
    def deco(factory):
        _REGISTRY[name] = factory
        return factory
    return deco


def available() -> list[str]:
    return sorted(_REGISTRY)


@lru_cache(maxsize=32)
def get_filter(spec: str, params: FilterParams = FilterParams()) -> FilterFn:
    """Build the filter named by ``spec``: one registered name or several joined by ``+``,
    applied left to right. Raises ValueError naming the unknown part. Cached: a run builds
    its filter (and OpenCV's CLAHE object) once, not once per photo."""
    parts = [p.strip() for p in spec.split("+") if p.strip()]
    if not parts:
        raise ValueError("empty filter spec")
    for p in parts:
        if p not in _REGISTRY:
            raise ValueError(f"unknown filter {p!r} (choose from {', '.join(available())}, "
                             "or join them with '+')")
    fns = [_REGISTRY[p](params) for p in parts if p != "none"]

    def apply(rgb: np.ndarray, radius: float, frame: Frame = None) -> np.ndarray:
        for fn in fns:
            rgb = fn(rgb, radius, frame)
        return rgb
    return apply


@register("none")
def _none(params: FilterParams) -> FilterFn:
    return lambda rgb, radius, frame=None: rgb


@register("graham")
def graham(params: FilterParams) -> FilterFn:
    """Ben Graham's local-average subtraction (Kaggle DR 2015 winner; TFDS btgraham-300).

    out = 4 * img - 4 * GaussianBlur(img, sigma = radius / 30) + 128, then everything outside
    90 % of the radius set to the background grey 128.

    Unlike the reference, padding where the camera frame clipped the disc is not averaged
    in: the edge rows are replicated into it before the blur and it is set to the background
    afterwards. Averaging in the black leaves a bright band along every clipped edge — a
    camera artefact a model can learn.
    """
    def apply(rgb: np.ndarray, radius: float, frame: Frame = None) -> np.ndarray:
        h, w = rgb.shape[:2]
        clipped = frame is not None and tuple(frame) != (0, 0, w, h)
        src = _replicate_into_padding(rgb, frame) if clipped else rgb
        sigma = max(radius * params.graham_sigma_fraction, 0.5)
        out = cv2.addWeighted(src, 4, _gaussian_blur(src, sigma), -4, 128)
        outside, grey = _outside_disc(h, w, round(radius * params.graham_mask_fraction))
        cv2.copyTo(grey, outside, out)  # ~100x faster than numpy boolean assignment
        if clipped:
            x0, y0, x1, y1 = frame
            for sl in (np.s_[:y0], np.s_[y1:], np.s_[:, :x0], np.s_[:, x1:]):
                out[sl] = 128
        return out
    return apply


def _replicate_into_padding(rgb: np.ndarray, frame: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = frame
    src = rgb.copy()
    if y1 > y0 and x1 > x0:
        src[:y0] = src[y0]
        src[y1:] = src[y1 - 1]
        src[:, :x0] = src[:, x0:x0 + 1]
        src[:, x1:] = src[:, x1 - 1:x1]
    return src


def _gaussian_blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur; for wide kernels, blur at a reduced resolution and scale back.

    A Gaussian of sigma >= 4 px has almost no energy near the Nyquist frequency of a 2x
    reduction (sigma >= 8: of a 4x one), so blurring an area-downsampled copy and
    upsampling it bilinearly is much cheaper (6.5 ms at full size, 1.9 at 2x, 0.8 at 4x at
    512 px, where sigma = 256/30). The reduced blur's sigma leaves room for the blur the
    two resizes add (the f-pixel box, variance ~f^2/12; bilinear upsampling's triangle,
    ~f^2/6): without that the 4x blur is 3 grey levels off, with it at most 2 and mean
    0.16 from the full-size blur inside the disc on the 31 EyePACS photos, as at 2x
    (tests/test_filters.py, docs/BENCHMARKS.md).
    """
    if sigma < 4:
        return cv2.GaussianBlur(rgb, (0, 0), sigma)
    h, w = rgb.shape[:2]
    f = 4 if sigma >= 8 else 2
    small = rgb
    for _ in range(f // 2):  # 2x area steps: OpenCV's 4x area reduction costs 3x as much
        small = cv2.resize(small, (max(1, small.shape[1] // 2), max(1, small.shape[0] // 2)),
                           interpolation=cv2.INTER_AREA)
    s = float(np.sqrt(sigma * sigma - f * f / 4)) / f
    # Each 2x area step rounds quarters half up, +1/8 of a level on average: taken off here.
    small = cv2.sepFilter2D(small, -1, *(_gaussian_kernel(round(s, 6)),) * 2,
                            delta=-0.125 * (f // 2))
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


@lru_cache(maxsize=64)
def _gaussian_kernel(sigma: float) -> np.ndarray:
    """The 1-D Gaussian (±3 sigma, float32) GaussianBlur would use. sepFilter2D with it is
    ~1.7x faster on uint8 than GaussianBlur's bit-exact fixed-point path at these widths,
    with the same rounding to within a grey level."""
    return cv2.getGaussianKernel(2 * int(np.ceil(3 * sigma)) + 1, sigma, cv2.CV_32F)


@lru_cache(maxsize=16)
def _outside_disc(h: int, w: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 mask, 255 outside the centred disc of radius r; an HxWx3 image of grey 128),
    cached per shape: every photo of a run has the same size."""
    mask = np.full((h, w), 255, np.uint8)
    cv2.circle(mask, (w // 2, h // 2), r, 0, thickness=cv2.FILLED)
    grey = np.full((h, w, 3), 128, np.uint8)
    mask.setflags(write=False)
    grey.setflags(write=False)
    return mask, grey


@register("clahe")
def clahe(params: FilterParams) -> FilterFn:
    """CLAHE on the L channel of CIE-LAB: local contrast without shifting hue (the Pisa
    report used 5x5 tiles; OpenCV's default 8x8 and clip 2.0 are ours)."""
    op = cv2.createCLAHE(clipLimit=params.clahe_clip,
                         tileGridSize=(params.clahe_tiles, params.clahe_tiles))

    def apply(rgb: np.ndarray, radius: float, frame: Frame = None) -> np.ndarray:
        lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
        lab[:, :, 0] = op.apply(np.ascontiguousarray(lab[:, :, 0]))
        return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    return apply
