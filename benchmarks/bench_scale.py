"""The full-size Kaggle job as a benchmark: ~88,700 ids through the real ``drpipe preprocess``.

    python benchmarks/bench_scale.py [--fraction 0.1] [--size 64] [--workers 1,2]

Builds a Kaggle layout in a temporary directory: ``train/`` with the ids of
``../shared/data/eyepacs-labels/trainLabels.csv`` (35,125 rows; Kaggle has 35,126 photos)
and ``test/`` with 53,576 generated test names (patients numbered after the last train
patient, a ``retinopathy_solution.csv`` with Usage Public/Private): 88,701 ids, every one a
symlink to one of the 31 real sample photos (round robin; never copied).
``--fraction`` (or ``--ids``) takes the first part of both lists, so a run
fits the time at hand. For each worker count the real CLI runs on a fresh ``--out``
(``--follow-links``: the links lead outside ``--src``), and a sampler polls every 0.25 s:

- client RSS (the ``drpipe`` process) and the largest worker RSS (its descendant
  processes), each as a peak, and the client's RSS when 10 % and 100 % of the batches were
  committed (``.staging/batch-*.json``) — flat memory means these two are alike;
- disk: the bytes under ``--out`` (staging and shards), as a peak.

Per-phase times come from the run's own summary (``timings``: setup, cluster start-up,
processing, sharding and manifest). Prints and writes (``--json``) one JSON object.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's packages
from benchmarks._common import (  # noqa: E402
    DRPIPE,
    LABELS,
    SAMPLE,
    arguments,
    command_line,
    report,
    write_labels,
)

KAGGLE_TEST = 53_576
BATCH = 32  # pipeline.job.BATCH_SIZE


def make_source(sample: Path, labels: Path, dest: Path, fraction: float,
                ids: int | None) -> dict:
    photos = sorted((sample / "train").glob("*.jpeg"))
    levels = {r["image"]: r["level"] for r in csv.DictReader(open(sample / "trainLabels.csv"))}
    train = [(r["image"], r["level"]) for r in csv.DictReader(open(labels))]
    last = max(int(i.split("_")[0]) for i, _ in train)
    test = []
    for k in range(KAGGLE_TEST):
        p = photos[k % len(photos)]
        test.append((f"{last + 1 + k // 2}_{('left', 'right')[k % 2]}", levels[p.stem],
                     "Public" if k % 4 == 0 else "Private"))
    total = len(train) + len(test)
    n = ids if ids is not None else round(fraction * total)
    n_train = round(n * len(train) / total)
    train, test = train[:n_train], test[:n - n_train]
    for folder, rows in (("train", train), ("test", test)):
        (dest / folder).mkdir(parents=True)
        for k, row in enumerate(rows):
            os.symlink(photos[k % len(photos)], dest / folder / f"{row[0]}.jpeg")
    write_labels(dest / "trainLabels.csv", train)
    write_labels(dest / "retinopathy_solution.csv", test, header=("image", "level", "Usage"))
    return {"ids": len(train) + len(test), "train": len(train), "test": len(test),
            "of_kaggle": total}


class Sampler(threading.Thread):
    def __init__(self, proc: subprocess.Popen, out: Path, batches: int):
        super().__init__(daemon=True)
        self.p = psutil.Process(proc.pid)
        self.out, self.batches = out, batches
        self.stop = threading.Event()
        self.client_peak = self.worker_peak = self.disk_peak = 0
        self.client_at: dict[str, int] = {}
        self.samples: list[tuple[float, int, int, int]] = []

    def run(self) -> None:
        t0 = time.time()
        while not self.stop.is_set():
            try:
                client = self.p.memory_info().rss
                workers = [c.memory_info().rss for c in self.p.children(recursive=True)]
            except psutil.Error:
                break
            committed, disk = 0, 0
            for dirpath, _, files in os.walk(self.out):
                for name in files:
                    if dirpath.endswith(".staging") and name.endswith(".json"):
                        committed += 1
                    try:
                        disk += os.lstat(os.path.join(dirpath, name)).st_size
                    except OSError:
                        pass
            self.client_peak = max(self.client_peak, client)
            self.worker_peak = max(self.worker_peak, max(workers, default=0))
            self.disk_peak = max(self.disk_peak, disk)
            done = committed / self.batches
            for mark in (0.1, 0.5, 1.0):
                if done >= mark and f"{mark:.0%}" not in self.client_at:
                    self.client_at[f"{mark:.0%}"] = client
            self.samples.append((round(time.time() - t0, 2), client, disk, committed))
            self.stop.wait(0.25)


def run_job(src: Path, out: Path, workers: int, size: int, n: int) -> dict:
    summary = Path(str(out) + ".json")
    cmd = [DRPIPE, "preprocess", "--quiet", "--src", str(src), "--out", str(out),
           "--workers", str(workers), "--size", str(size), "--follow-links",
           "--summary-json", str(summary)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(proc, out, -(-n // BATCH))
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t
    sampler.stop.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"drpipe failed ({proc.returncode}): {err.strip()}")
    s = json.loads(summary.read_text())
    mb = 2 ** 20
    return {
        "workers": workers,
        "command": " ".join(cmd),
        "wall_s": round(wall, 1),
        "timings": s["timings"],
        "photos_per_s_processing": s["photos_per_s"],
        "photos_per_s_whole_command": round(n / wall, 1),
        "ok": s["ok"], "rejected": s["rejected"], "rejected_by_reason": s["rejected_by_reason"],
        "shard_bytes": s["shard_bytes"],
        "peak_client_rss_mb": round(sampler.client_peak / mb),
        "client_rss_mb_at": {k: round(v / mb) for k, v in sampler.client_at.items()},
        "peak_worker_rss_mb": round(sampler.worker_peak / mb),
        "peak_worker_rss_mb_reported": s["peak_worker_rss_mb"],
        "peak_disk_mb": round(sampler.disk_peak / mb, 1),
        "final_disk_mb": round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / mb,
                               1),
    }


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--sample", default=str(SAMPLE))
    ap.add_argument("--labels", default=str(LABELS))
    ap.add_argument("--fraction", type=float, default=1.0,
                    help="part of the 88,702 ids to run (default all)")
    ap.add_argument("--ids", type=int, default=None, help="number of ids (overrides --fraction)")
    ap.add_argument("--size", type=int, default=64, help="output size (default 64)")
    ap.add_argument("--workers", default="2", help="worker counts to run, e.g. 1,2")
    ap.add_argument("--tmp", default=None, help="where to build the source and outputs")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        src = make_source(Path(args.sample).resolve(), Path(args.labels), tmp / "raw",
                          args.fraction, args.ids)
        print(f"source: {src['ids']:,} ids ({src['train']:,} train + {src['test']:,} test) "
              f"linked in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        runs = []
        for w in (int(x) for x in args.workers.split(",")):
            r = run_job(tmp / "raw", tmp / f"out-{w}", w, args.size, src["ids"])
            runs.append(r)
            print(f"{w} worker(s): {r['photos_per_s_processing']} photos/s processing, "
                  f"{r['wall_s']} s wall, client peak {r['peak_client_rss_mb']} MB "
                  f"(at {r['client_rss_mb_at']}), worker peak {r['peak_worker_rss_mb']} MB, "
                  f"disk peak {r['peak_disk_mb']} MB", file=sys.stderr)
    by = {r["workers"]: r for r in runs}
    result = {"command": command_line(),
              "source": src, "size": args.size, "cpus": os.cpu_count(), "runs": runs}
    if 1 in by and 2 in by:
        result["scaling_1_to_2_workers"] = round(
            by[2]["photos_per_s_processing"] / by[1]["photos_per_s_processing"], 3)
    report(result, args.json)


if __name__ == "__main__":
    main()
