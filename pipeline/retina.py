"""Finding the retina (a bright disc on black) and cropping a square around it.

The reference builder (TFDS ``diabetic_retinopathy_detection``) estimates the radius from
the middle row and assumes the eye is centred; the Pisa report crops to the bounding box of
a threshold. Both go wrong when the frame clips the disc at top and bottom (common in
EyePACS), when the disc is off-centre, or when a notch marker or glare touches the edge.
Here the disc edge is fitted with a circle, using only edge points that are not on the
frame, and only those on the circle most of the edge agrees with (RANSAC), so notches,
glare and shadow bands do not pull it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

# The fit runs on a thumbnail (~140-160 px across): the synthetic and real-photo tests
# recover discs within 2 %; on the 31 EyePACS photos the fit moves by at most 0.3 % of the
# radius from a ~240 px thumbnail, and find_retina cost ~1.4 ms instead of ~2.9 (issue 15;
# ~0.5 ms since RANSAC and the mask were made cheaper, docs/BENCHMARKS.md).
THUMB_LONG_SIDE = 160


class NoRetina(Exception):
    """No fundus disc in the frame; ``str()`` is the human reason."""


@dataclass(frozen=True)
class Circle:
    """The retina: centre (cx, cy) and radius r, in pixels of the image it was found in."""

    cx: float
    cy: float
    r: float

    def scaled(self, s: float) -> Circle:
        return Circle(self.cx * s, self.cy * s, self.r * s)


def find_retina(rgb: np.ndarray) -> Circle:
    """Locate the retina disc in an RGB photo.

    Args:
      rgb: HxWx3 uint8.
    Returns:
      The fitted circle in ``rgb``'s pixel coordinates.
    Raises:
      NoRetina: black or blank frames, and frames whose bright region is not a disc.
    """
    h, w = rgb.shape[:2]
    # Nearest-neighbour subsampling: the mask is thresholded and opened afterwards, so
    # averaging buys nothing here, and area reduction cost more than the whole fit (~1.3 ms).
    k = max(1, -(-max(h, w) // THUMB_LONG_SIDE))
    thumb = rgb if k == 1 else cv2.resize(rgb, (w // k, h // k), interpolation=cv2.INTER_NEAREST)
    scale_x, scale_y = w / thumb.shape[1], h / thumb.shape[0]
    # The brightest channel (usually red) separates retina from black border best, and keeps
    # working on dark, blue-tinted or over-exposed photos.
    gray = cv2.max(cv2.max(thumb[:, :, 0], thumb[:, :, 1]), thumb[:, :, 2])
    mask, edge = _disc_mask(gray)
    circle = _fit_circle(edge, mask.shape)
    _check_disc(mask, circle)
    return Circle(circle.cx * scale_x, circle.cy * scale_y, circle.r * (scale_x + scale_y) / 2)


_OPEN = np.ones((3, 3), np.uint8)


def _disc_mask(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bright region (largest connected part, holes filled) as a 0/1 mask, and its outer
    contour (N x 1 x 2 int32)."""
    cdf = np.cumsum(np.bincount(gray.ravel(), minlength=256)) / gray.size
    lo, hi = int(np.searchsorted(cdf, 0.01)), int(np.searchsorted(cdf, 0.99))
    if hi - lo < 12:
        raise NoRetina("no retina: blank or black frame (no contrast)")
    # Dark photos have a retina only a little brighter than the border: threshold relative
    # to the measured background and the bright end, not a fixed grey level.
    thr = lo + max(6.0, 0.08 * (hi - lo))
    # gray > thr, as 0/1 (thr is an integer + a fraction or an integer: floor is exact).
    _, mask = cv2.threshold(gray, np.floor(thr), 1, cv2.THRESH_BINARY)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _OPEN)
    # The outer contours are the outermost 8-connected parts; the largest by its pixels is
    # taken, holes (dark lesions, vessels, the macula) filled by drawing its outer contour
    # filled. findContours + drawContours cost a tenth of connectedComponentsWithStats.
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        raise NoRetina("no retina: nothing brighter than the background")
    filled = np.zeros_like(mask)
    if len(contours) == 1:
        cv2.drawContours(filled, contours, 0, 1, thickness=cv2.FILLED)
        return filled, contours[0]
    # Several parts (specks in the border): the pixels each one's filled outline holds.
    labels = np.zeros(mask.shape, np.int32)
    for i in range(len(contours)):
        cv2.drawContours(labels, contours, i, i + 1, thickness=cv2.FILLED)
    counts = np.bincount(labels[mask.astype(bool)], minlength=len(contours) + 1)
    largest = int(np.argmax(counts[1:]))
    cv2.drawContours(filled, contours, largest, 1, thickness=cv2.FILLED)
    return filled, contours[largest]


def _fit_circle(contour: np.ndarray, shape: tuple[int, int]) -> Circle:
    h, w = shape
    pts = contour.reshape(-1, 2).astype(np.float64)
    # Edge points on (or next to) the frame are where the frame clipped the disc: not its edge.
    m = 2
    on_frame = (pts[:, 0] <= m) | (pts[:, 1] <= m) | (pts[:, 0] >= w - 1 - m) | (
        pts[:, 1] >= h - 1 - m)
    pts = pts[~on_frame]
    if len(pts) < 20:
        raise NoRetina("no retina: no disc edge visible (bright region fills the frame)")
    inliers = _ransac_inliers(pts)
    if inliers.sum() < 20:
        raise NoRetina("no retina: bright region is not disc-shaped")
    cx, cy, r = _kasa(pts[inliers])
    # Contour pixels lie on the last inside pixel; the true edge is half a pixel further out.
    return Circle(cx, cy, r + 0.5)


# Trials: the winner only selects the inliers that the least-squares fit then uses, so few
# are needed; on the 31 EyePACS photos and the 200 demo photos 64 give the circles of 192
# to within 0.04 % of the radius (0.17 % on one demo photo), at a third of the cost.
RANSAC_TRIALS = 64


@lru_cache(maxsize=4096)
def _triples(n: int) -> np.ndarray:
    """RANSAC's random triples of point indices for n points: seeded, so deterministic, and
    cached (making the generator costs more than drawing from it)."""
    tri = np.random.default_rng(0).integers(0, n, (RANSAC_TRIALS, 3))
    tri.setflags(write=False)
    return tri


def _ransac_inliers(pts: np.ndarray) -> np.ndarray:
    """Edge points on the circle most of the edge agrees with.

    Least squares, even trimmed, is pulled by long non-circular runs of edge: a shadow
    band above the frame's bottom edge, haze bulging the rim, a notch. Here random triples
    of edge points propose circles (all at once, vectorised), the one with the most
    points within ~1 % of its radius wins. Seeded, so the result is deterministic.
    """
    full, pts = pts, pts[::2]  # neighbours on a contour add cost, not information
    n = len(pts)
    tri = pts[_triples(n)]  # trials x 3 x 2
    # Circumcentres, relative to each triple's first point a.
    a = tri[:, 0]
    b, c = tri[:, 1] - a, tri[:, 2] - a
    b2, c2 = (b * b).sum(axis=1), (c * c).sum(axis=1)
    d = 2 * (b[:, 0] * c[:, 1] - b[:, 1] * c[:, 0])
    ok = np.abs(d) > 1e-6
    d[~ok] = 1.0
    vx, vy = (c[:, 1] * b2 - b[:, 1] * c2) / d, (b[:, 0] * c2 - c[:, 0] * b2) / d
    r = np.hypot(vx, vy)
    ux, uy = a[:, 0] + vx, a[:, 1] + vy
    tol = np.maximum(1.5, 0.012 * r)
    # |dist - r| < tol  <=>  |dist^2 - r^2 - tol^2| < 2 r tol (for r >= tol), and
    # dist^2 - r^2 is linear in (x, y, x^2 + y^2, 1): one matrix product scores every trial.
    m = np.empty((n, 4))
    m[:, :2] = pts
    m[:, 2] = (pts * pts).sum(axis=1)
    m[:, 3] = 1.0
    v = np.stack([-2 * ux, -2 * uy, np.ones_like(ux), ux * ux + uy * uy - r * r - tol * tol])
    e = m @ v
    np.abs(e, out=e)
    score = np.where(ok, (e < 2 * r * tol).sum(axis=0), -1)
    k = int(np.argmax(score))
    return np.abs(np.hypot(full[:, 0] - ux[k], full[:, 1] - uy[k]) - r[k]) < tol[k]


def _kasa(pts: np.ndarray) -> tuple[float, float, float]:
    """Algebraic least-squares circle fit: x^2 + y^2 + D x + E y + F = 0, solved in
    coordinates centred on the points' mean (the normal equations are then 2 x 2 and
    well conditioned; the same circle as a general least-squares solver, to ~1e-9 px)."""
    mean = pts.mean(axis=0)
    q = pts - mean
    x, y = q[:, 0], q[:, 1]
    z = x * x + y * y
    sxx, syy, sxy = x @ x, y @ y, x @ y
    sxz, syz = x @ z, y @ z
    det = sxx * syy - sxy * sxy
    if not np.isfinite(det) or abs(det) < 1e-9:
        raise NoRetina("no retina: bright region is not disc-shaped")
    d = -(syy * sxz - sxy * syz) / det
    e = -(sxx * syz - sxy * sxz) / det
    cx, cy = -d / 2, -e / 2
    r2 = cx * cx + cy * cy + z.mean()
    if not np.isfinite(r2) or r2 <= 0:
        raise NoRetina("no retina: bright region is not disc-shaped")
    return float(cx + mean[0]), float(cy + mean[1]), float(np.sqrt(r2))


def _check_disc(mask: np.ndarray, c: Circle) -> None:
    h, w = mask.shape
    if c.r < 0.15 * min(h, w) or c.r > 1.5 * max(h, w):
        raise NoRetina(f"no retina: implausible disc radius {c.r:.0f} px in a {w}x{h} frame")
    if not (-0.25 * w <= c.cx <= 1.25 * w and -0.25 * h <= c.cy <= 1.25 * h):
        raise NoRetina("no retina: fitted disc centre lies outside the frame")
    disc = np.zeros_like(mask)
    cv2.circle(disc, (round(c.cx * 16), round(c.cy * 16)), round(c.r * 16), 1,
               thickness=cv2.FILLED, lineType=cv2.LINE_8, shift=4)
    inter = int(np.count_nonzero(disc & mask))
    union = int(np.count_nonzero(disc | mask))
    iou = inter / max(union, 1)
    # A fundus disc agrees with its fitted circle to IoU ~0.97+; photos of other things don't.
    if iou < 0.85:
        raise NoRetina(f"no retina: bright region is not disc-shaped (circle IoU {iou:.2f})")


@dataclass(frozen=True)
class Crop:
    """The square crop and where things are in it (output pixels)."""

    image: np.ndarray  # size x size x 3 uint8
    radius: float  # retina radius
    frame: tuple[int, int, int, int]  # (x0, y0, x1, y1): the part that came from the photo;
    # outside it is black padding where the photo's frame clipped the disc


def crop_to_retina(rgb: np.ndarray, circle: Circle, size: int) -> Crop:
    """Square crop centred on the disc, side = its diameter, resized to ``size``.

    Where the frame clipped the disc the square is padded with black, so the disc stays
    round and centred. Shrinking is anti-aliased (:func:`shrink`: no aliasing of fine
    vessels); cubic if the disc is smaller than ``size`` (rare: see choose_dct_factor).

    Returns:
      The crop, the disc radius in output pixels and the in-frame rectangle.
    """
    h, w = rgb.shape[:2]
    side = max(1, round(2 * circle.r))
    x0, y0 = round(circle.cx - side / 2), round(circle.cy - side / 2)
    # Only the part of the square inside the frame is resized, straight into a black output:
    # no padded copy of the full-size square (the clipped bands would be resized for nothing).
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + side, w), min(y0 + side, h)
    s = size / side
    ox0, oy0 = round((sx0 - x0) * s), round((sy0 - y0) * s)
    ox1, oy1 = round((sx1 - x0) * s), round((sy1 - y0) * s)
    if (ox0, oy0, ox1, oy1) == (0, 0, size, size):
        out = None
    else:
        out = np.zeros((size, size, 3), np.uint8)
    if ox1 > ox0 and oy1 > oy0:
        if out is None:
            out = shrink(rgb[sy0:sy1, sx0:sx1], side / size, (size, size))
        else:  # resized straight into its place in the black square
            shrink(rgb[sy0:sy1, sx0:sx1], side / size, (ox1 - ox0, oy1 - oy0),
                   dst=out[oy0:oy1, ox0:ox1])
    elif out is None:
        out = np.zeros((size, size, 3), np.uint8)
    return Crop(out, circle.r * size / side, (ox0, oy0, ox1, oy1))


def shrink(rgb: np.ndarray, ratio: float, dsize: tuple[int, int],
           dst: np.ndarray | None = None) -> np.ndarray:
    """Resize ``rgb`` to ``dsize`` (w, h), ``ratio`` source pixels per output pixel.

    Shrinking: a Gaussian prefilter (sigma 0.42 x ratio, the width of an area average)
    then bilinear sampling. OpenCV's INTER_AREA at a non-integer ratio (the usual 1.2-1.6
    here) is its slow generic path, 2.8-6.9 ms at 512 px, and still passes detail beyond
    the output's Nyquist frequency (it is a box: a grating at 1.6 output pixels per cycle
    keeps 29 of 71 grey levels of amplitude); this costs ~1 ms and keeps 13-14
    (docs/BENCHMARKS.md, tests/test_retina.py). Cubic when enlarging. ``dst``: an array
    of that size to write into (e.g. a view into a larger one), returned.
    """
    if ratio <= 1.0:
        return cv2.resize(rgb, dsize, dst=dst, interpolation=cv2.INTER_CUBIC)
    k = 2 * int(ratio) + 1
    blurred = cv2.GaussianBlur(rgb, (k, k), SHRINK_SIGMA * ratio)
    return cv2.resize(blurred, dsize, dst=dst, interpolation=cv2.INTER_LINEAR)


SHRINK_SIGMA = 0.42  # Gaussian sigma per source pixel per output pixel when shrinking
