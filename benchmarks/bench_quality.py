"""Cost of the quality gate per photo, one core: pipeline.quality.assess on the retina crop.

    python benchmarks/bench_quality.py [--src ../shared/data/eyepacs-sample/train] [--rounds 7]

Each photo is prepared once as the pipeline does (reduced decode, retina fit, 512 px crop);
then ``assess`` — what the quality gate adds to a photo's processing — runs on every crop,
round after round. Reports CPU time (``time.process_time``, so other processes on a shared
machine do not count) and wall time per photo: the median over rounds of the per-round
mean, the best round (the least disturbed by a busy machine), and the worst photo. Writes
JSON with ``--json``.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's packages
from benchmarks._common import one_core, photo_arguments, report  # noqa: E402


def main() -> None:
    ap = photo_arguments(__doc__, rounds=7)
    args = ap.parse_args()

    one_core()
    import cv2

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
    for c in crops:  # warm caches (the CLAHE object, disc masks)
        assess(c.image, c.radius, c.frame)

    cpu, wall, worst = [], [], 0.0
    for _ in range(args.rounds):
        c0, w0 = time.process_time(), time.perf_counter()
        for c in crops:
            t = time.process_time()
            assess(c.image, c.radius, c.frame)
            worst = max(worst, time.process_time() - t)
        cpu.append((time.process_time() - c0) / len(crops))
        wall.append((time.perf_counter() - w0) / len(crops))
    result = {"photos": len(crops), "rounds": args.rounds, "crop_size": args.size,
              "cpu_ms_per_photo": round(1e3 * statistics.median(cpu), 3),
              "best_round_cpu_ms_per_photo": round(1e3 * min(cpu), 3),
              "wall_ms_per_photo": round(1e3 * statistics.median(wall), 3),
              "worst_photo_cpu_ms": round(1e3 * worst, 3),
              "opencv": cv2.__version__, "python": platform.python_version(),
              "machine": platform.machine(), "cpu_count": os.cpu_count(),
              "load_avg_1min": round(os.getloadavg()[0], 2)}
    print(f"quality gate: {result['cpu_ms_per_photo']:.3f} ms CPU per photo (best round "
          f"{result['best_round_cpu_ms_per_photo']:.3f} ms; wall "
          f"{result['wall_ms_per_photo']:.3f} ms, worst photo "
          f"{result['worst_photo_cpu_ms']:.3f} ms), {len(crops)} photos x {args.rounds} rounds, "
          f"one core, load {result['load_avg_1min']}")
    report(result, args.json, echo=False)


if __name__ == "__main__":
    main()
