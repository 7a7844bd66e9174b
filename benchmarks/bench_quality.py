"""Cost of the quality gate per photo, one core: pipeline.quality.assess on the retina crop.

    python benchmarks/bench_quality.py [--src ../shared/data/eyepacs-sample/train] [--rounds 7]
    git show REV:pipeline/quality.py > /tmp/quality_ref.py
    python benchmarks/bench_quality.py --against /tmp/quality_ref.py --rounds 31

Each photo is prepared once as the pipeline does (reduced decode, retina fit, 512 px crop);
then ``assess`` — what the quality gate adds to a photo's processing — runs on every crop,
round after round. Reports CPU time (``time.process_time``, so other processes on a shared
machine do not count) and wall time per photo: the median over rounds of the per-round
mean, the best round (the least disturbed by a busy machine), and the worst photo; then
where the time goes (cProfile over the OpenCV and NumPy calls, ms per photo).

``--against FILE`` times another version of ``pipeline/quality.py`` (e.g. the previous
commit's) side by side: the two alternate round by round (the order swapped every round),
on the same crops, so a busy machine slows both alike; the ratio of their medians and the
median of the per-round ratios are printed, and how much the scores differ. Writes JSON
with ``--json``.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import json
import os
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _load(path: str):
    spec = importlib.util.spec_from_file_location("quality_ref", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _round(assess, crops) -> tuple[float, float, float]:
    """One pass over the crops: CPU and wall seconds per photo, the worst photo's CPU."""
    worst = 0.0
    c0, w0 = time.process_time(), time.perf_counter()
    for c in crops:
        t = time.process_time()
        assess(c.image, c.radius, c.frame)
        worst = max(worst, time.process_time() - t)
    return ((time.process_time() - c0) / len(crops), (time.perf_counter() - w0) / len(crops),
            worst)


def breakdown(assess, crops, rounds: int = 5) -> dict[str, float]:
    """CPU ms per photo of each call inside ``assess`` (cProfile's own time, timed with
    ``time.process_time`` as the rest), largest first."""
    prof = cProfile.Profile(time.process_time)
    prof.enable()
    for _ in range(rounds):
        for c in crops:
            assess(c.image, c.radius, c.frame)
    prof.disable()
    st = pstats.Stats(prof).stats
    n = rounds * len(crops)
    rows = {}
    for (file, _line, name), (_cc, _nc, tottime, _ct, _callers) in st.items():
        label = name if file == "~" else f"{Path(file).name}:{name}"
        rows[label] = rows.get(label, 0.0) + 1e3 * tottime / n
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default=str(ROOT.parent / "shared/data/eyepacs-sample/train"))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--against", default=None, metavar="FILE",
                    help="another pipeline/quality.py to time side by side")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()

    if hasattr(os, "sched_setaffinity"):  # one core, no OpenCV threads
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import cv2

    cv2.setNumThreads(1)
    from pipeline import decode as dec
    from pipeline.quality import assess
    from pipeline.retina import crop_to_retina, find_retina

    crops = []
    for path in sorted(Path(args.src).glob("*.jp*g")):
        data = path.read_bytes()
        info = dec.read_info(data)
        factor = dec.choose_dct_factor(min(info.upright_size), args.size)
        decoded = dec.decode(data, info, factor)
        crops.append(crop_to_retina(decoded, find_retina(decoded), args.size))
    if not crops:
        sys.exit(f"no photos in {args.src}")
    impls = {"this": assess}
    if args.against:
        impls["against"] = _load(args.against).assess
    for f in impls.values():  # warm caches (the CLAHE object, disc masks)
        for c in crops:
            f(c.image, c.radius, c.frame)

    cpu = {k: [] for k in impls}
    wall = {k: [] for k in impls}
    worst = dict.fromkeys(impls, 0.0)
    for i in range(args.rounds):
        for k in (list(impls) if i % 2 == 0 else list(impls)[::-1]):
            c, w, x = _round(impls[k], crops)
            cpu[k].append(c)
            wall[k].append(w)
            worst[k] = max(worst[k], x)

    def summary(k):
        return {"cpu_ms_per_photo": round(1e3 * statistics.median(cpu[k]), 3),
                "best_round_cpu_ms_per_photo": round(1e3 * min(cpu[k]), 3),
                "wall_ms_per_photo": round(1e3 * statistics.median(wall[k]), 3),
                "worst_photo_cpu_ms": round(1e3 * worst[k], 3)}

    parts = breakdown(assess, crops)
    result = {"photos": len(crops), "rounds": args.rounds, "crop_size": args.size,
              **summary("this"),
              "breakdown_ms_per_photo": {k: round(v, 4) for k, v in parts.items() if v >= 0.005},
              "opencv": cv2.__version__, "python": platform.python_version(),
              "machine": platform.machine(), "cpu_count": os.cpu_count(),
              "load_avg_1min": round(os.getloadavg()[0], 2)}
    print(f"quality gate: {result['cpu_ms_per_photo']:.3f} ms CPU per photo (best round "
          f"{result['best_round_cpu_ms_per_photo']:.3f} ms; wall "
          f"{result['wall_ms_per_photo']:.3f} ms, worst photo "
          f"{result['worst_photo_cpu_ms']:.3f} ms), {len(crops)} photos x {args.rounds} rounds, "
          f"one core, load {result['load_avg_1min']}")
    print("where the time goes (cProfile, CPU ms per photo; profiling adds its own overhead):")
    for k, v in list(parts.items())[:12]:
        print(f"  {v:6.3f}  {k}")
    if args.against:
        ref = summary("against")
        ratios = [a / b for a, b in zip(cpu["this"], cpu["against"], strict=True)]
        d = [abs(impls["this"](c.image, c.radius, c.frame).score
                 - impls["against"](c.image, c.radius, c.frame).score) for c in crops]
        result["against"] = {"file": args.against, **ref,
                             "ratio_of_medians": round(result["cpu_ms_per_photo"]
                                                       / ref["cpu_ms_per_photo"], 3),
                             "median_round_ratio": round(statistics.median(ratios), 3),
                             "score_diff_median": round(statistics.median(d), 4),
                             "score_diff_max": round(max(d), 4)}
        a = result["against"]
        print(f"against {args.against}: {ref['cpu_ms_per_photo']:.3f} ms CPU per photo (best "
              f"round {ref['best_round_cpu_ms_per_photo']:.3f} ms); this / that: "
              f"{a['ratio_of_medians']:.3f} (median of per-round ratios "
              f"{a['median_round_ratio']:.3f}); score differs by {a['score_diff_median']:.4f} "
              f"median, {a['score_diff_max']:.4f} at most")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
