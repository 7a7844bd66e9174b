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

``--against DIR`` adds a fourth contender, ``against``: ``process()`` of another copy of the
repository (its ``pipeline`` package), e.g. the main branch's, to measure a change side by
side with what it replaced, interleaved photo by photo on the same core:

    git archive main | tar -x -C /tmp/main-copy
    python benchmarks/bench_ops.py --no-tfds --against /tmp/main-copy

``--steps`` also times each step of the pipeline (this copy's), photo by photo, and
reports the median per photo of each (CPU ms), after the rounds.

Every call is timed in wall time and in CPU time (``time.process_time``); the per-photo
ratios are given in both (on a machine shared with other work, CPU time leaves out the
time slices other processes took).
"""

from __future__ import annotations

import importlib
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
    ap.add_argument("--against", default=None, metavar="DIR",
                    help="also time process() of the repository copy in DIR, side by side")
    ap.add_argument("--steps", action="store_true", help="time each step of the pipeline")
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
    if args.against:
        other = _load_process(args.against)
        other_cfg = other.ProcessConfig(size=args.size, filter="graham")
        contenders["against"] = lambda p, d: _ok(other.process(d, other_cfg),
                                                 other.ProcessedImage)
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
    cpu_photo: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    for r in range(args.rounds):
        totals = dict.fromkeys(names, 0.0)
        order = names[r % len(names):] + names[:r % len(names)]
        for p, d in photos:
            for n in order:
                c, t = time.process_time(), time.perf_counter()
                contenders[n](p, d)
                dt = time.perf_counter() - t
                totals[n] += dt
                per_photo[n].setdefault(p.name, []).append(dt)
                cpu_photo[n].setdefault(p.name, []).append(time.process_time() - c)
        for n in names:
            per_round[n].append(len(photos) / totals[n])
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {per_round[n][-1]:.1f}/s" for n in names), file=sys.stderr)

    med = {n: statistics.median(v) for n, v in per_round.items()}

    def photo_ratio(a: str, b: str, times=per_photo) -> float:
        return statistics.median(
            statistics.median(times[a][k]) / statistics.median(times[b][k])
            for k in times[a])
    result = {
        "command": command_line(),
        "photos": len(photos),
        "rounds": args.rounds,
        "size": args.size,
        "cpu": platform.processor() or platform.machine(),
        "photos_per_s_one_core": {n: round(v, 2) for n, v in med.items()},
        "drpipe_over_tfds": round(med["drpipe"] / med["tfds"], 2) if "tfds" in med else None,
        "drpipe_time_over_floor": round(med["floor"] / med["drpipe"], 3),
        "median_per_photo_time_over_floor": round(photo_ratio("drpipe", "floor"), 3),
        # The same in CPU time (time.process_time): on a shared machine, the time slices
        # other processes took do not count.
        "median_per_photo_cpu_over_floor": round(photo_ratio("drpipe", "floor", cpu_photo), 3),
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "dct_factors": {str(f): list(factors.values()).count(f) for f in sorted(
            set(factors.values()))},
    }
    if args.against:
        result["against"] = {
            "dir": args.against,
            "time_over_floor": round(med["floor"] / med["against"], 3),
            "median_per_photo_time_over_floor": round(photo_ratio("against", "floor"), 3),
            "median_per_photo_drpipe_time_over_against": round(
                photo_ratio("drpipe", "against"), 3),
            "median_per_photo_cpu_over_floor": round(
                photo_ratio("against", "floor", cpu_photo), 3),
            "median_per_photo_drpipe_cpu_over_against": round(
                photo_ratio("drpipe", "against", cpu_photo), 3),
        }
    if args.steps:
        result["steps_ms_median_per_photo"] = steps(photos, cfg, args.rounds)
    report(result, args.json)


def _load_process(root: str):
    """``pipeline.process`` of the repository copy at ``root``, imported beside this one's
    (the two ``pipeline`` packages swap in ``sys.modules`` for the import)."""
    ours = {k: sys.modules.pop(k) for k in list(sys.modules)
            if k == "pipeline" or k.startswith("pipeline.")}
    sys.path.insert(0, str(Path(root).resolve()))
    try:
        mod = importlib.import_module("pipeline.process")
    finally:
        sys.path.pop(0)
        for k in [k for k in sys.modules if k == "pipeline" or k.startswith("pipeline.")]:
            del sys.modules[k]
        sys.modules.update(ours)
    if Path(mod.__file__).resolve().parents[1] != Path(root).resolve():
        raise SystemExit(f"--against {root}: imported {mod.__file__} instead")
    return mod


def steps(photos, cfg, rounds: int) -> dict[str, float]:
    """Each step of ``prepare`` + encode, timed apart, photo by photo: the median per
    photo over ``rounds`` rounds of each step's CPU ms (``process`` is the whole call)."""
    from pipeline import decode as dec
    from pipeline.encode import encode
    from pipeline.filters import get_filter
    from pipeline.process import process
    from pipeline.quality import assess
    from pipeline.retina import crop_to_retina, find_retina

    flt = get_filter(cfg.filter, cfg.filter_params)
    times: dict[str, dict[str, list[float]]] = {}

    def timed(name, key, fn, *a):
        t = time.process_time()
        out = fn(*a)
        times.setdefault(name, {}).setdefault(key, []).append(time.process_time() - t)
        return out

    for _ in range(rounds):
        for p, d in photos:
            info = dec.read_info(d)
            factor = dec.choose_dct_factor(min(info.upright_size), cfg.size)
            rgb = timed("decode", p.name, dec.decode, d, info, factor)
            circle = timed("retina", p.name, find_retina, rgb)
            crop = timed("crop_shrink", p.name, crop_to_retina, rgb, circle, cfg.size)
            timed("quality", p.name, assess, crop.image, crop.radius, crop.frame)
            image = timed("filter", p.name, flt, crop.image, crop.radius, crop.frame)
            timed("encode", p.name, encode, image, cfg.format, cfg.quality)
            timed("process", p.name, process, d, cfg)
    return {n: round(1e3 * statistics.median(statistics.median(v) for v in per.values()), 3)
            for n, per in times.items()}


def _ok(result, cls):
    if not isinstance(result, cls):
        raise SystemExit(f"drpipe rejected a benchmark photo: {result}")
    return result


if __name__ == "__main__":
    main()
