"""Per-photo operations, one core: drpipe vs the TFDS reference vs the reduced-decode floor.

    python benchmarks/bench_ops.py [--src ../shared/data/eyepacs-sample/train] [--rounds 5]

For each round, every photo goes through the three contenders back to back (the order
rotates each round), so machine noise hits all three alike. Photos are read into memory
first: this measures CPU per photo, not the disk.

- tfds:   tensorflow_datasets' diabetic_retinopathy_detection._btgraham_processing(fobj,
          path, 300, crop_to_radius=True) — config btgraham-300 (full-size OpenCV decode,
          radius from the middle row, Gaussian subtraction, mask, crop, JPEG q72).
- drpipe: pipeline.process.process(bytes, ProcessConfig(size=512, filter="graham")) —
          verify (strict decode), reduced decode, retina fit, crop, resize, Graham, JPEG q95.
- floor:  the bare strict reduced decode drpipe does (same library, same DCT factor).

Prints a table and writes JSON (``--json``) with photos/s per contender (median of rounds).
"""

from __future__ import annotations

import io
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's packages
from benchmarks._common import command_line, one_core, photo_arguments, report  # noqa: E402


def main() -> None:
    ap = photo_arguments(__doc__, rounds=5)
    ap.add_argument("--no-tfds", action="store_true", help="skip the TFDS reference")
    args = ap.parse_args()

    one_core()  # for everyone
    from pipeline import decode as dec
    from pipeline.process import ProcessConfig, ProcessedImage, prepare, process

    paths = sorted(p for p in Path(args.src).iterdir() if p.is_file())
    photos = [(p, p.read_bytes()) for p in paths]
    cfg = ProcessConfig(size=args.size, filter="graham")
    # The floor decodes at the factor drpipe ends up using for each photo.
    factors = {p: prepare(d, cfg).factor for p, d in photos}
    infos = {p: dec.read_info(d) for p, d in photos}

    contenders = {
        "drpipe": lambda p, d: _ok(process(d, cfg), ProcessedImage),
        "floor": lambda p, d: dec.decode(d, infos[p], factors[p]),
    }
    if not args.no_tfds:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        from tensorflow_datasets.image_classification import diabetic_retinopathy_detection as ref

        contenders["tfds"] = lambda p, d: ref._btgraham_processing(
            io.BytesIO(d), str(p), 300, crop_to_radius=True)

    for fn in contenders.values():  # warm-up: imports, caches, page faults
        fn(*photos[0])

    names = list(contenders)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    per_photo: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    for r in range(args.rounds):
        totals = dict.fromkeys(names, 0.0)
        order = names[r % len(names):] + names[:r % len(names)]
        for p, d in photos:
            for n in order:
                t = time.perf_counter()
                contenders[n](p, d)
                dt = time.perf_counter() - t
                totals[n] += dt
                per_photo[n].setdefault(p.name, []).append(dt)
        for n in names:
            per_round[n].append(len(photos) / totals[n])
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {per_round[n][-1]:.1f}/s" for n in names), file=sys.stderr)

    med = {n: statistics.median(v) for n, v in per_round.items()}
    photo_ratio = statistics.median(
        statistics.median(per_photo["drpipe"][k]) / statistics.median(per_photo["floor"][k])
        for k in per_photo["drpipe"])
    result = {
        "command": command_line(),
        "photos": len(photos),
        "rounds": args.rounds,
        "size": args.size,
        "cpu": platform.processor() or platform.machine(),
        "photos_per_s_one_core": {n: round(v, 2) for n, v in med.items()},
        "drpipe_over_tfds": round(med["drpipe"] / med["tfds"], 2) if "tfds" in med else None,
        "drpipe_time_over_floor": round(med["floor"] / med["drpipe"], 3),
        "median_per_photo_time_over_floor": round(photo_ratio, 3),
        "dct_factors": {str(f): list(factors.values()).count(f) for f in sorted(
            set(factors.values()))},
    }
    report(result, args.json)


def _ok(result, cls):
    if not isinstance(result, cls):
        raise SystemExit(f"drpipe rejected a benchmark photo: {result}")
    return result


if __name__ == "__main__":
    main()
