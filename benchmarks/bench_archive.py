"""Kaggle's archive volumes read in place against the extracted folder, and the index cost.

    python benchmarks/bench_archive.py [--copies 4] [--rounds 3] [--json FILE]

1. Reading: the 31 EyePACS sample photos, ``--copies`` times under new ids, zipped
   (deflated, and stored) and cut into 2 MB volumes with ``split -b``, next to the same
   photos extracted into a folder. Side by side, alternating per round:
   - bytes only: every photo read on one core (``MemberReader.read``: ranged read, inflate,
     CRC-32 check; against ``read_photo``), photos/s;
   - the whole job: ``drpipe preprocess --workers 2`` on the parts and on the folder, the
     processing phase's photos/s from its summary.
   Reported: the medians and parts / folder ratios (target >= 0.95).
2. Index: an archive with the 35,126 names of Kaggle's trainLabels.csv as tiny stored
   members, in 5 volumes; the time and the peak Python memory (tracemalloc) of
   ``open_archive`` (central directory parsed, parts checked) and of ``detect_source`` on
   the folder (index + labels + matching), and the process's peak RSS.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's packages
from benchmarks._common import (  # noqa: E402
    LABELS,
    SAMPLE,
    arguments,
    link_sample,
    preprocess,
    report,
    write_labels,
)


def build_sources(copies: int, d: Path) -> tuple[dict[str, Path], int]:
    """The same photos as a folder (links) and as 2 MB volumes of a deflated and of a
    stored zip."""
    folder = d / "folder"
    rows = link_sample(SAMPLE, copies, folder / "train")
    sources = {"folder": folder}
    for name, method in (("parts-deflated", zipfile.ZIP_DEFLATED),
                         ("parts-stored", zipfile.ZIP_STORED)):
        parts = sources[name] = d / name
        parts.mkdir()
        with zipfile.ZipFile(d / "train.zip", "w", method) as z:
            for new, _ in rows:
                z.write(folder / "train" / f"{new}.jpeg", f"train/{new}.jpeg")
        subprocess.run(["split", "-b", "2000000", "-d", "-a", "3", "--numeric-suffixes=1",
                        str(d / "train.zip"), str(parts / "train.zip.")], check=True)
        (d / "train.zip").unlink()
    for dest in sources.values():
        write_labels(dest / "trainLabels.csv", rows)
    return sources, len(rows)


def read_rate(src: Path) -> float:
    from pipeline.process import read_photo
    from pipeline.sources import detect_source

    s = detect_source(src)
    t = time.perf_counter()
    if s.reader is not None:
        reader = s.reader.batch([p.path for p in s.photos])
        n = sum(isinstance(reader.read(p.path), bytes) for p in s.photos)
    else:
        n = sum(isinstance(read_photo(s.root / p.path), bytes) for p in s.photos)
    assert n == len(s.photos)
    return n / (time.perf_counter() - t)


def job_rate(src: Path, out: Path) -> float:
    summary = out.with_suffix(".json")
    # --follow-links: the extracted folder is symlinks to the sample, outside --src.
    preprocess(src, out, "--workers", 2, "--follow-links", "--summary-json", summary)
    s = json.loads(summary.read_text())
    shutil.rmtree(out)
    return s["photos_per_s"]


def index_cost(d: Path) -> dict:
    from pipeline.archive import Part, find_parts, open_archive
    from pipeline.sources import detect_source

    names = [r["image"] for r in csv.DictReader(open(LABELS))]  # 35,125 labelled
    names.append("99999_left")  # Kaggle's train.zip holds 35,126 photos: one more, unlabelled
    src = d / "big"
    src.mkdir()
    t = time.perf_counter()
    with zipfile.ZipFile(d / "big.zip", "w", zipfile.ZIP_STORED) as z:
        for n in names:
            z.writestr(f"train/{n}.jpeg", b"\xff\xd8" + n.encode() * 4)
    build_s = time.perf_counter() - t
    size = (d / "big.zip").stat().st_size
    subprocess.run(["split", "-n", "5", "-d", "-a", "3", "--numeric-suffixes=1",
                    str(d / "big.zip"), str(src / "train.zip.")], check=True)
    shutil.copy(LABELS, src / "trainLabels.csv")
    files = find_parts(os.listdir(src), "train.zip")
    parts = [Part(str(src / f), (src / f).stat().st_size) for f in files]
    out = {"members": len(names), "archive_bytes": size, "parts": len(parts),
           "build_s": round(build_s, 2)}
    for what, fn in (("open_archive", lambda: open_archive(parts)),
                     ("detect_source", lambda: detect_source(src))):
        times, peaks = [], []
        for _ in range(3):  # time without tracemalloc (it slows every allocation)
            t = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t)
            del result
        tracemalloc.start()
        result = fn()
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        del result
        out[what] = {"s": round(min(times), 3), "peak_python_mb": round(max(peaks) / 1e6, 1)}
    s = detect_source(src)
    assert len(s.photos) == len(names) and not s.labels_without_photo
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        sources, n = build_sources(a.copies, d)
        reads = {k: [] for k in sources}
        jobs = {k: [] for k in sources}
        for r in range(a.rounds):
            order = list(sources.items())
            order = order[r % len(order):] + order[:r % len(order)]  # rotate per round
            for name, src in order:
                reads[name].append(read_rate(src))
            for name, src in order:
                jobs[name].append(job_rate(src, d / f"out-{name}"))
        import pipeline.archive as A

        result = {"photos": n, "rounds": a.rounds, "inflate": A._inflate.__name__}
        for key, runs in (("read_photos_per_s", reads), ("job_photos_per_s", jobs)):
            med = {k: round(statistics.median(v), 1) for k, v in runs.items()}
            ratios = {f"ratio_{k}_over_folder": round(med[k] / med["folder"], 3)
                      for k in med if k != "folder"}
            result[key] = {**med, **ratios, "runs": runs}
        result["index_35126"] = index_cost(d)
    report(result, a.json)


if __name__ == "__main__":
    main()
