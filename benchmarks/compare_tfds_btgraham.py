"""How close drpipe's btgraham-300 recipe comes to TFDS's btgraham-300 output, photo by photo.

    python benchmarks/compare_tfds_btgraham.py [--src ../shared/data/eyepacs-sample/train]

Both sides from the same photo: TFDS's own ``_btgraham_processing(fobj, path, 300,
crop_to_radius=True)`` (the builder's code, run here, not a re-implementation), and drpipe's
``process`` with the recipe's settings (recipes/tfds-btgraham-300.sh: 600 px, graham, q72).

TFDS assumes the eye is centred and crops to 90 % of the radius (540 px wide; shorter where
the frame clips the disc); drpipe centres the square on the fitted retina and keeps the grey
ring. So drpipe's central 540 px are compared with TFDS's image placed at the centre, over
the pixels where both hold retina (inside 90 % of the radius, not TFDS's grey fill):
mean absolute difference in grey levels, and the correlation. The retina centre each side
assumes is reported too: where TFDS's centring assumption fails, the two images are
shifted against each other, and that is where they differ most (on purpose).
"""

from __future__ import annotations

import io
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's packages
from benchmarks._common import SAMPLE, arguments, report  # noqa: E402

RADIUS = 300
CROP = int(RADIUS * 0.9)  # TFDS's mask and crop radius: 270 px


def tfds_btgraham(data: bytes, name: str = "photo") -> np.ndarray:
    """TFDS's btgraham-300 output for a photo, decoded (BGR as OpenCV gives it -> RGB)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import cv2
    from tensorflow_datasets.image_classification import diabetic_retinopathy_detection as ref

    buf = ref._btgraham_processing(io.BytesIO(data), name, RADIUS, crop_to_radius=True)
    img = cv2.imdecode(np.frombuffer(buf.getvalue(), np.uint8), cv2.IMREAD_COLOR)
    return img[:, :, ::-1]


def drpipe_btgraham(data: bytes, filter_: str = "graham", fmt: str = "jpeg"):
    """drpipe's output with the recipe's settings, decoded, and the fitted circle."""
    import cv2

    from pipeline.process import ProcessConfig, ProcessedImage, process

    r = process(data, ProcessConfig(size=2 * RADIUS, filter=filter_, quality=72, format=fmt))
    if not isinstance(r, ProcessedImage):
        raise ValueError(str(r))
    img = cv2.imdecode(np.frombuffer(r.encoded, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    return img, r


def compare(data: bytes, name: str = "photo", matched: bool = False) -> dict:
    """Mean absolute difference (grey levels) and correlation over the shared retina.

    ``matched``: give TFDS drpipe's retina-centred, unfiltered 600 px square instead of the
    photo, so both sides see the same geometry and only the filters (and JPEG) differ."""
    if matched:
        import cv2

        square, _ = drpipe_btgraham(data, "none", "png")
        ok, png = cv2.imencode(".png", np.ascontiguousarray(square[:, :, ::-1]))
        t = tfds_btgraham(png.tobytes(), name).astype(np.float32)
    else:
        t = tfds_btgraham(data, name).astype(np.float32)
    d, r = drpipe_btgraham(data)
    c = RADIUS  # drpipe's square is centred on the retina
    d = d[c - CROP:c + CROP, c - CROP:c + CROP].astype(np.float32)
    # TFDS's crop is centred on the image: where the frame clips the disc it is shorter.
    th, tw = t.shape[:2]
    canvas = np.full((2 * CROP, 2 * CROP, 3), np.nan, np.float32)
    y0, x0 = (2 * CROP - th) // 2, (2 * CROP - tw) // 2
    canvas[y0:y0 + th, x0:x0 + tw] = t
    yy, xx = np.mgrid[:2 * CROP, :2 * CROP]
    inside = (yy - CROP + 0.5) ** 2 + (xx - CROP + 0.5) ** 2 < (CROP - 2) ** 2
    inside &= ~np.isnan(canvas[..., 0])
    a, b = canvas[inside], d[inside]
    off_x = r.circle.cx - r.original_width / 2
    off_y = r.circle.cy - r.original_height / 2
    return {"photo": name, "mean_abs_diff": float(np.mean(np.abs(a - b))),
            "correlation": float(np.corrcoef(a.ravel(), b.ravel())[0, 1]),
            "pixels_compared": int(inside.sum()),
            "retina_offset_from_centre_pct": round(
                100 * float(np.hypot(off_x, off_y)) / (2 * r.circle.r), 2)}


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--src", default=str(SAMPLE / "train"))
    args = ap.parse_args()
    paths = sorted(Path(args.src).glob("*.jpeg"))
    result = {}
    for matched in (False, True):
        rows = [compare(p.read_bytes(), p.stem, matched) for p in paths]
        what = "same geometry (TFDS given drpipe's square)" if matched else "as each does it"
        print(f"\n{what}\n{'photo':14} {'MAD':>6} {'corr':>6} {'offset %':>8}")
        for r in rows:
            print(f"{r['photo']:14} {r['mean_abs_diff']:6.2f} {r['correlation']:6.3f} "
                  f"{r['retina_offset_from_centre_pct']:8.2f}")
        med = {k: statistics.median(r[k] for r in rows)
               for k in ("mean_abs_diff", "correlation")}
        print(f"median over {len(rows)} photos: mean abs diff {med['mean_abs_diff']:.2f} grey "
              f"levels, correlation {med['correlation']:.3f}")
        result["matched" if matched else "as_is"] = {"photos": rows, "median": med}
    report(result, args.json, echo=False)


if __name__ == "__main__":
    main()
