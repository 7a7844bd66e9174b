"""A deterministic synthetic fundus dataset in the Kaggle/EyePACS layout.

    OUT/train/{patient}_{left|right}.jpeg
    OUT/trainLabels.csv                      image,level

It is the built-in demo and test data (no downloads, no competition data in the repository).
The photos imitate what makes real ones hard: varied frame sizes and aspect ratios, discs
clipped at top and bottom by the frame, off-centre discs, under/over-exposure, notch markers,
glare, blur, vessels; lesion-like spots (dark red haemorrhages, yellow exudates, new vessels)
whose number grows with the grade, so a model can learn the signal.

Each photo depends only on (seed, patient, eye), never on ``n`` or on the order of
generation; the same arguments always give the same bytes.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import simplejpeg

from pipeline.outputs import OutputRefused
from tfrecord_writer.files import atomic_write_bytes

# Frame sizes of real fundus cameras, scaled down ~4x to keep the demo small and fast.
FRAME_SIZES = ((1024, 683), (972, 648), (1188, 792), (960, 720), (1232, 816), (880, 880))
# Grade mix: imbalanced like EyePACS (73 % grade 0 there), but softened so a small demo
# has enough of every grade to learn from.
GRADE_PROBS = (0.40, 0.16, 0.22, 0.11, 0.11)
# Lesions per grade (haemorrhages/microaneurysms + exudates), (low, high).
LESIONS = ((0, 0), (3, 6), (9, 15), (18, 28), (30, 44))


@dataclass(frozen=True)
class SynthPhoto:
    image: str  # Kaggle id: {patient}_{eye}
    level: int
    width: int
    height: int
    cx: float  # the disc as drawn, for tests of the retina finder
    cy: float
    r: float


def patient_ids(n_patients: int, seed: int) -> list[int]:
    """Kaggle-like patient numbers: increasing, with gaps."""
    rng = np.random.default_rng([seed, 0xBA5E])
    return (10 + np.cumsum(rng.integers(1, 12, n_patients))).tolist()


def plan(n: int, seed: int = 0) -> list[tuple[int, str, int]]:
    """(patient, eye, grade) for ``n`` photos, two eyes per patient.

    The two eyes of a patient share the grade 85 % of the time, otherwise differ by one,
    as in EyePACS where the eyes differ for ~13 % of patients.
    """
    if n < 2 or n % 2:
        raise ValueError(f"--n must be an even number >= 2 (two eyes per patient), got {n}")
    rows = []
    for pid in patient_ids(n // 2, seed):
        rng = np.random.default_rng([seed, pid, 0])
        g = int(rng.choice(5, p=GRADE_PROBS))
        other = g if rng.random() < 0.85 else int(np.clip(g + rng.choice((-1, 1)), 0, 4))
        eyes = ("left", "right") if rng.random() < 0.5 else ("right", "left")
        rows += [(pid, eyes[0], g), (pid, eyes[1], other)]
    rows.sort(key=lambda t: (t[0], t[1]))  # Kaggle order: 10_left, 10_right, 13_left, ...
    return rows


def render(patient: int, eye: str, grade: int, seed: int = 0) -> tuple[np.ndarray, SynthPhoto]:
    """Draw one photo. Returns (HxWx3 uint8 RGB, its ground truth)."""
    rng = np.random.default_rng([seed, patient, 1 if eye == "left" else 2])
    w, h = FRAME_SIZES[rng.integers(len(FRAME_SIZES))]
    # Radius relative to the frame height: > 0.5 means the frame clips the disc top and
    # bottom (as in most 3:2 EyePACS photos).
    r = h * rng.uniform(0.42, 0.60)
    off = 0.12 if rng.random() < 0.15 else 0.02  # some photos are clearly off-centre
    cx = w / 2 + rng.normal(0, off) * w
    cy = h / 2 + rng.normal(0, off / 2) * h
    cx = float(np.clip(cx, r * 0.6, w - r * 0.6))
    cy = float(np.clip(cy, h / 2 - 0.15 * h, h / 2 + 0.15 * h))

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = (xx - cx) / r, (yy - cy) / r
    rho2 = dx * dx + dy * dy
    inside = rho2 <= 1.0

    exposure = rng.uniform(0.45, 1.25)
    base = np.array([rng.uniform(170, 230), rng.uniform(75, 125), rng.uniform(25, 60)],
                    np.float32)
    # Vignetting: fundus photos darken towards the rim.
    shade = (1.0 - 0.45 * rho2) * exposure
    img = base[None, None, :] * shade[:, :, None]

    # Optic disc (nasal side, mirrored between eyes) and macula (dark centre).
    side = 1 if eye == "right" else -1
    od = (cx + side * 0.42 * r, cy + rng.normal(0, 0.04) * r)
    _blob(img, xx, yy, od, 0.085 * r, np.array([255, 230, 150], np.float32) * exposure, 0.9)
    _blob(img, xx, yy, (cx - side * 0.1 * r, cy), 0.16 * r, np.array([-60, -35, -10],
          np.float32) * exposure, 1.0, additive=True)

    img = np.clip(img, 0, 255).astype(np.uint8)
    _vessels(img, rng, od, r, exposure)
    _lesions(img, rng, grade, cx, cy, r, od, exposure)

    if rng.random() < 0.15:  # glare: a soft bright haze near the rim
        a = rng.uniform(0, 2 * math.pi)
        gx, gy = cx + 0.75 * r * math.cos(a), cy + 0.75 * r * math.sin(a)
        glare = np.exp(-(((xx - gx) ** 2 + (yy - gy) ** 2) / (2 * (0.18 * r) ** 2)))
        img = np.clip(img + (90 * glare)[:, :, None], 0, 255).astype(np.uint8)

    img[~inside] = 0
    if rng.random() < 0.6:  # notch marker on the rim at ~1 o'clock, as on many cameras
        nx, ny = int(cx + r * 0.71), int(cy - r * 0.71)
        s = max(3, int(r * 0.03))
        cv2.rectangle(img, (nx - s, ny - s), (nx + s, ny + s), (200, 170, 90), thickness=-1)

    sigma = rng.uniform(1.5, 3.0) if rng.random() < 0.1 else 0.6  # some photos are blurred
    img = cv2.GaussianBlur(img, (0, 0), sigma)
    noise = rng.normal(0, 2.0, img.shape).astype(np.float32)
    img = np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    return img, SynthPhoto(f"{patient}_{eye}", grade, w, h, cx, cy, float(r))


def _blob(img, xx, yy, c, radius, color, strength, additive=False):
    g = np.exp(-(((xx - c[0]) ** 2 + (yy - c[1]) ** 2) / (2 * radius * radius)))
    g = (g * strength)[:, :, None]
    if additive:
        img += color[None, None, :] * g
    else:
        img *= 1 - g
        img += color[None, None, :] * g


def _vessels(img, rng, od, r, exposure):
    color = tuple(float(v) for v in np.array([120, 30, 25]) * exposure)
    for _ in range(rng.integers(8, 13)):
        x, y = od
        a = rng.uniform(0, 2 * math.pi)
        width = max(1, int(r * rng.uniform(0.006, 0.016)))
        pts = []
        for _ in range(40):
            a += rng.normal(0, 0.18)
            x += math.cos(a) * r * 0.03
            y += math.sin(a) * r * 0.03
            pts.append((int(x), int(y)))
        cv2.polylines(img, [np.array(pts, np.int32)], False, color, width, cv2.LINE_AA)


def _lesions(img, rng, grade, cx, cy, r, od, exposure):
    lo, hi = LESIONS[grade]
    for _ in range(int(rng.integers(lo, hi + 1))):
        rad, ang = r * 0.85 * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
        p = (int(cx + rad * math.cos(ang)), int(cy + rad * math.sin(ang)))
        if grade >= 2 and rng.random() < 0.35:  # hard exudate: bright yellow, sharp
            size = max(2, int(r * rng.uniform(0.012, 0.025)))
            cv2.circle(img, p, size, (240, 220, 90), -1, cv2.LINE_AA)
        else:  # haemorrhage / microaneurysm: dark red
            size = max(2, int(r * rng.uniform(0.012, 0.03)))
            col = tuple(float(v) for v in np.array([110, 15, 10]) * exposure)
            cv2.circle(img, p, size, col, -1, cv2.LINE_AA)
    if grade == 4:  # proliferative: a tangle of fine new vessels near the optic disc
        col = tuple(float(v) for v in np.array([150, 25, 30]) * exposure)
        for _ in range(6):
            x, y = od[0] + rng.normal(0, 0.08) * r, od[1] + rng.normal(0, 0.08) * r
            pts = []
            for _ in range(12):
                x += rng.normal(0, 0.025) * r
                y += rng.normal(0, 0.025) * r
                pts.append((int(x), int(y)))
            cv2.polylines(img, [np.array(pts, np.int32)], False, col, 1, cv2.LINE_AA)


def synth_dataset(out: Path, n: int = 200, seed: int = 0, quality: int = 90,
                  progress=None) -> list[SynthPhoto]:
    """Write ``n`` photos and ``trainLabels.csv`` under ``out``; return their ground truth.

    ``progress`` is called once per photo written (for a progress bar).
    """
    out = Path(out)
    planned = plan(n, seed)
    _claim(out, [f"train/{pid}_{eye}.jpeg" for pid, eye, _ in planned])
    (out / "train").mkdir(parents=True, exist_ok=True)
    truth = []
    for pid, eye, grade in planned:
        rgb, photo = render(pid, eye, grade, seed)
        atomic_write_bytes(out / "train" / f"{photo.image}.jpeg",
                           simplejpeg.encode_jpeg(rgb, quality=quality, colorspace="RGB",
                                                  colorsubsampling="420"))
        truth.append(photo)
        if progress:
            progress()
    labels = io.StringIO()
    wr = csv.writer(labels, lineterminator="\n")
    wr.writerow(["image", "level"])
    wr.writerows((p.image, p.level) for p in truth)
    atomic_write_bytes(out / "trainLabels.csv", labels.getvalue().encode())
    return truth


MARKER = ".drpipe-synth.json"  # what a synth wrote here: a later synth may replace it


def _claim(out: Path, photos: list[str]) -> None:
    """Make ``out`` this synth's: refuse a non-empty folder no synth wrote (a real dataset's
    trainLabels.csv and photos would be replaced), remove an earlier synth's photos that this
    one does not write, and record what this one writes before writing it."""
    earlier: list[str] = []
    if out.is_dir() and any(out.iterdir()):
        try:
            earlier = json.loads((out / MARKER).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            entry = next(iter(sorted(p.name for p in out.iterdir())))
            raise OutputRefused(f"{out} is not empty ({entry}, ...) and not the output of "
                                "drpipe synth; choose an empty or new --out") from None
    elif out.exists() and not out.is_dir():
        raise OutputRefused(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    keep = set(photos) | {"trainLabels.csv"}
    for rel in earlier:
        if isinstance(rel, str) and rel not in keep and ".." not in rel:
            (out / rel).unlink(missing_ok=True)
    atomic_write_bytes(out / MARKER, json.dumps({"files": sorted(keep)}, indent=1).encode())
