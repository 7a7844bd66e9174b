"""An incremental run that adds 1 % new photos, against the full run (target <= 5 %).

    python benchmarks/bench_incremental.py [--n 10000] [--distinct 300] [--size 64] [--json FILE]

``--distinct`` synthetic photos (``drpipe synth``) hard-linked under ``--n`` ids of
``--n / 2`` patients (Kaggle layout; every photo is decoded and processed as in any run,
identical bytes are only flagged ``duplicate_of``). Then, on one loaded machine, side by side:

1. full: ``drpipe preprocess`` on the ``--n`` photos (version 1);
2. incremental: 1 % more photos (new patients) arrive; the same command (version 2);
3. scratch: a from-scratch run on the grown set (the alternative to 2).

Reported: wall seconds of each command, incremental / full and incremental / scratch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's packages
from benchmarks._common import DRPIPE, arguments, report, write_labels  # noqa: E402


def _collection(src: Path, pool: list[Path], grades: list[int], n: int) -> None:
    (src / "train").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        pid, eye = 100000 + i // 2, ("left", "right")[i % 2]
        k = i % len(pool)
        dst = src / "train" / f"{pid}_{eye}.jpeg"
        if not dst.exists():
            os.link(pool[k], dst)
        rows.append((f"{pid}_{eye}", grades[k]))
    write_labels(src / "trainLabels.csv", rows)


def _run(src: Path, out: Path, size: int, workers: int) -> tuple[float, dict]:
    t = time.perf_counter()
    r = subprocess.run([DRPIPE, "preprocess", "--src", str(src), "--out", str(out), "--size",
                        str(size), "--workers", str(workers), "--quiet", "--summary-json",
                        str(out) + ".json"], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"preprocess failed: {r.stderr}")
    return wall, json.loads(Path(str(out) + ".json").read_text())


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--distinct", type=int, default=300)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    from pipeline.synth import synth_dataset

    with tempfile.TemporaryDirectory(prefix="bench-incr-") as tmp:
        tmp = Path(tmp)
        synth_dataset(tmp / "pool", n=a.distinct, seed=11)
        pool = sorted((tmp / "pool/train").glob("*.jpeg"))
        labels = dict(line.split(",") for line in
                      (tmp / "pool/trainLabels.csv").read_text().splitlines()[1:])
        grades = [int(labels[p.stem]) for p in pool]
        grown = a.n + a.n // 100
        src = tmp / "raw"
        _collection(src, pool, grades, a.n)
        full, s1 = _run(src, tmp / "shards", a.size, a.workers)
        _collection(src, pool, grades, grown)
        incr, s2 = _run(src, tmp / "shards", a.size, a.workers)
        scratch, s3 = _run(src, tmp / "scratch", a.size, a.workers)
    result = {"photos": a.n, "added": grown - a.n, "size": a.size, "workers": a.workers,
              "full_s": round(full, 2), "incremental_s": round(incr, 2),
              "scratch_s": round(scratch, 2),
              "incremental_over_full": round(incr / full, 4),
              "incremental_over_scratch": round(incr / scratch, 4),
              "incremental_version": s2.get("version"), "incremental_changes": s2.get("changes"),
              "incremental_processed": s2.get("processed_this_run"),
              "incremental_timings": s2.get("timings"), "full_timings": s1.get("timings"),
              "scratch_ok": s3.get("ok"), "incremental_ok": s2.get("ok"),
              "load_average": os.getloadavg()}
    report(result, a.json, indent=1)


if __name__ == "__main__":
    main()
