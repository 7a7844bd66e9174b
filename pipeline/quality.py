"""Gradability of a fundus photo: classical measures inside the retina disc, one score.

    assess(crop) -> Quality(score, verdict, focus, vessels, vessel_field, brightness,
                            contrast, exposure, coverage)

Computed in the per-photo pipeline on the retina crop that :func:`pipeline.process.prepare`
already holds (the reduced decode, cropped and centred on the fitted disc, before any
contrast filter), brought to a fixed grid of :data:`GRID` pixels across the disc so the
measures do not depend on the camera's resolution or on ``--size``. Every measure is taken
inside the disc (:data:`INNER` of its radius, so the rim's bright-to-black step does not
count as detail) and inside the part of the crop that came from the photo: the black bands
where the camera's frame clipped the disc are never counted as retina.

The measures (docs/QUALITY.md says how the thresholds were chosen):

- ``vessels``: edge density of the CLAHE'd green channel (pixels whose Sobel gradient
  |dx| + |dy| reaches :data:`EDGE`, per disc pixel) —
  vessels are the retina's fine structure, and they vanish first with blur, haze, cataract
  and poor exposure.
- ``vessel_field``: the fraction of the disc's 8 x 8 grid cells in which vessels are still
  visible; it catches a photo that is sharp in one part and dark or veiled in the rest.
- ``focus``: Tenengrad (RMS Sobel gradient) of the green channel relative to its mean.
- ``brightness`` / ``contrast``: green mean (0-255) and its standard deviation / mean.
- ``exposure``: the fraction of disc pixels neither nearly black nor saturated. A saturated
  optic disc is a few per cent of the disc, so it costs little: over-exposure alone is not
  the signal.
- ``coverage``: the fraction of the disc inside the camera's frame (EyePACS routinely clips
  top and bottom to ~0.9; that costs nothing).

``score`` in [0, 1], higher is better: a weighted mean of the sub-scores of vessels,
vessel_field, focus and exposure, times the coverage sub-score. The verdict is ``good`` at
``score >= GOOD``, ``usable`` at ``score >= USABLE``, else ``reject``. Deterministic: only
integer-exact OpenCV operations on fixed grids, fixed thresholds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import cv2
import numpy as np

GRID = 256  # pixels across the disc where the measures are taken
INNER = 0.9  # fraction of the radius measured (the rim is the bright-to-black step)
EDGE_MARGIN = 3  # pixels kept clear of a frame edge that clips the disc
# An edge pixel of the CLAHE'd green (clip 2, 8 x 8 tiles): L1 Sobel gradient |dx| + |dy|
# at least this (Canny's units; until 2026-12 the measure was Canny 40/100, which cost 4-5
# times as much: docs/QUALITY.md).
EDGE = 60
CELLS = 8  # vessel_field grid
CELL_MIN_EDGES = 0.04  # a cell "shows vessels" at this edge density
DARK, BRIGHT = 12, 250  # green levels counted as black / saturated

# Sub-score ramps (measure at sub-score 0, at sub-score 1): see docs/QUALITY.md.
RAMPS = {
    "vessels": (0.08, 0.28),
    "vessel_field": (0.35, 0.9),
    "focus": (0.10, 0.30),
    "exposure": (0.60, 0.95),
}
WEIGHTS = {"vessels": 0.45, "vessel_field": 0.35, "focus": 0.2}
DIM = (8.0, 30.0)  # green mean: sub-score 0 at or below, 1 at or above
WASHED_OUT = (160.0, 240.0)  # green mean: sub-score 1 at or below, 0 at or above
# Coverage: the sub-score is the coverage itself down to COVERAGE_KNEE (EyePACS frames
# routinely clip the disc top and bottom to ~0.9 of its area), then falls steeply to 0 at
# COVERAGE_ZERO.
COVERAGE_KNEE, COVERAGE_ZERO = 0.85, 0.5

GOOD = 0.85
USABLE = 0.60
VERDICTS = ("good", "usable", "reject")
MEASURES = ("focus", "vessels", "vessel_field", "brightness", "contrast", "exposure",
            "coverage")


@dataclass(frozen=True)
class Quality:
    score: float
    verdict: str
    focus: float
    vessels: float
    vessel_field: float
    brightness: float
    contrast: float
    exposure: float
    coverage: float

    def measures(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in MEASURES}

    def describe(self) -> str:
        """One line for a rejection detail or a caption."""
        return (f"score {self.score:.2f} ({self.verdict}): " + ", ".join(
            f"{k} {v:.3f}" if k != "brightness" else f"{k} {v:.1f}"
            for k, v in self.measures().items()))

    def as_dict(self) -> dict:
        return asdict(self)


# Manifest columns: the score, the verdict, and each measure as quality_<measure>.
COLUMNS = ("quality_score", "quality", *(f"quality_{k}" for k in MEASURES))


def quality_row(q: Quality | None) -> dict:
    """The manifest cells of a photo's quality (empty when it was never measured)."""
    if q is None:
        return dict.fromkeys(COLUMNS)
    return {"quality_score": q.score, "quality": q.verdict,
            **{f"quality_{k}": v for k, v in q.measures().items()}}


def verdict_for(score: float, good: float = GOOD, usable: float = USABLE) -> str:
    return "good" if score >= good else "usable" if score >= usable else "reject"


def parse_min_quality(value: str) -> float:
    """``--min-quality``: ``usable`` / ``good`` (the default thresholds) or a score in
    [0, 1]. Returns the minimum score; raises ValueError with the reason."""
    v = str(value).strip().lower()
    if v in ("good", "usable"):
        return GOOD if v == "good" else USABLE
    try:
        s = float(v)
    except ValueError:
        raise ValueError(f"expected usable, good or a score in [0, 1], got {value!r}") from None
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"a score must lie in [0, 1], got {value!r}")
    return s


@lru_cache(maxsize=1)
def _clahe():
    return cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))


@lru_cache(maxsize=64)
def _disc(radius_px: int) -> np.ndarray:
    m = np.zeros((GRID, GRID), np.uint8)
    cv2.circle(m, (GRID // 2, GRID // 2), radius_px, 255, thickness=cv2.FILLED)
    return m


@lru_cache(maxsize=64)
def _disc_area(radius_px: int) -> int:
    return cv2.countNonZero(_disc(radius_px))


@lru_cache(maxsize=64)
def _cell_disc(radius_px: int) -> tuple[np.ndarray, np.ndarray]:
    """The vessel_field cells the disc mostly covers, and the edge density (0-255 scale, as
    an 8 x 8 area resize of the edges gives it) at which each "shows vessels"."""
    cell_disc = cv2.resize(_disc(radius_px), (CELLS, CELLS), interpolation=cv2.INTER_AREA)
    cells = cell_disc > 127
    return cells, CELL_MIN_EDGES * cell_disc[cells]


def _ramp(x: float, lo: float, hi: float) -> float:
    return float(min(1.0, max(0.0, (x - lo) / (hi - lo))))


def assess(image: np.ndarray, radius: float, frame=None) -> Quality:
    """Quality of one retina crop.

    Args:
      image: square RGB uint8 crop centred on the disc (:func:`pipeline.retina.crop_to_retina`,
        before any filter).
      radius: the disc radius in ``image`` pixels.
      frame: (x0, y0, x1, y1) part of ``image`` that came from the photo, or None for all.
    """
    side = image.shape[0]
    green = image[:, :, 1]  # a strided view: OpenCV copies it once, here
    if side != GRID:
        interp = cv2.INTER_AREA if side > GRID else cv2.INTER_LINEAR
        green = cv2.resize(green, (GRID, GRID), interpolation=interp)
    else:
        green = np.ascontiguousarray(green)
    s = GRID / side
    r = radius * s
    x0, y0, x1, y1 = frame if frame is not None else (0, 0, side, side)
    fx0, fy0 = round(x0 * s), round(y0 * s)
    fx1, fy1 = round(x1 * s), round(y1 * s)

    full_r = max(1, round(r))
    in_frame = _disc(full_r)[fy0:fy1, fx0:fx1]
    coverage = float(np.count_nonzero(in_frame)) / max(1, _disc_area(full_r))
    mask = np.zeros((GRID, GRID), np.uint8)  # 0 / 255, as OpenCV's masks
    e = EDGE_MARGIN
    mask[fy0 + e if fy0 > 0 else 0:fy1 - e if fy1 < GRID else GRID,
         fx0 + e if fx0 > 0 else 0:fx1 - e if fx1 < GRID else GRID] = 255
    inner_r = max(1, round(INNER * r))
    mask &= _disc(inner_r)
    n = cv2.countNonZero(mask)
    if n < 64:  # nearly no disc inside the frame: nothing to grade
        return Quality(0.0, "reject", 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, round(coverage, 4))
    # Reductions over the image with everything outside the mask zeroed: OpenCV's masked
    # reductions (and NumPy's boolean indexing) cost 10-20 times as much. Integer sums, so
    # exact.
    inside = cv2.bitwise_and(green, mask)
    mean = cv2.sumElems(inside)[0] / n
    std = float(np.sqrt(max(0.0, cv2.norm(inside, cv2.NORM_L2SQR) / n - mean * mean)))
    contrast = std / max(mean, 1.0)
    exposed = cv2.bitwise_and(cv2.inRange(green, DARK + 1, BRIGHT - 1), mask)
    exposure = cv2.countNonZero(exposed) / n

    # Sobel 3 x 3 (spatialGradient: both directions in one pass; it differs from cv2.Sobel
    # only on the image's outermost pixels, which the mask never holds).
    gx, gy = cv2.spatialGradient(green)
    mask16 = mask.view(np.int8).astype(np.int16)  # 0 / -1: all bits set inside
    energy = (cv2.norm(cv2.bitwise_and(gx, mask16), cv2.NORM_L2SQR)
              + cv2.norm(cv2.bitwise_and(gy, mask16), cv2.NORM_L2SQR)) / n
    focus = float(np.sqrt(energy)) / max(mean, 1.0)

    gx, gy = cv2.spatialGradient(_clahe().apply(green))
    # |dx| + |dy| >= EDGE; each term saturates at 255, which cannot change the comparison.
    edges = cv2.compare(cv2.add(cv2.convertScaleAbs(gx), cv2.convertScaleAbs(gy)), EDGE,
                        cv2.CMP_GE)
    edges = cv2.bitwise_and(edges, mask)  # edges are 255, the mask is 0 / 255
    vessels = cv2.countNonZero(edges) / n
    cell_edges = cv2.resize(edges, (CELLS, CELLS), interpolation=cv2.INTER_AREA)
    # Over the whole disc: cells the frame cut off show no vessels.
    cells, bar = _cell_disc(inner_r)
    field = np.count_nonzero(cell_edges[cells] >= bar) / len(bar) if len(bar) else 0.0

    m = {"focus": focus, "vessels": vessels, "vessel_field": field, "brightness": mean,
         "contrast": contrast, "exposure": exposure, "coverage": coverage}
    score = round(combine(m), 4)
    return Quality(score, verdict_for(score),
                   **{k: round(v, 4 if k != "brightness" else 2) for k, v in m.items()})


def combine(m: dict[str, float]) -> float:
    """The score from the measures: the weighted mean of the detail sub-scores (vessels,
    vessel_field, focus), times the illumination and coverage gates. A gate multiplies, so a
    photo with the disc half outside the frame, or nearly black, cannot be saved by detail
    in what remains."""
    sub = {k: _ramp(m[k], *RAMPS[k]) for k in WEIGHTS}
    detail = sum(w * sub[k] for k, w in WEIGHTS.items())
    b = m["brightness"]
    illumination = min(_ramp(b, *DIM), 1.0 - _ramp(b, *WASHED_OUT),
                       _ramp(m["exposure"], *RAMPS["exposure"]))
    c = m["coverage"]
    coverage = c if c >= COVERAGE_KNEE else COVERAGE_KNEE * _ramp(c, COVERAGE_ZERO,
                                                                   COVERAGE_KNEE)
    return coverage * illumination * detail
