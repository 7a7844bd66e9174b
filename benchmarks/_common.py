"""What the benchmarks share: where things are, the sample linked under new ids, one core,
and the result written as JSON.

Each benchmark runs as ``python benchmarks/NAME.py`` and first puts the repository on
``sys.path`` (two lines), so that this module and the packages import from the checkout.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRPIPE = str(Path(sys.executable).parent / "drpipe")  # the command beside this Python
SHARED = ROOT.parent / "shared/data"
SAMPLE = SHARED / "eyepacs-sample"  # the 31 real EyePACS photos and their labels
LABELS = SHARED / "eyepacs-labels/trainLabels.csv"  # Kaggle's 35,126 labels


def arguments(doc: str | None) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of ``doc``, with ``--json FILE``."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)
    ap.add_argument("--json", type=Path, default=None, help="write the result here")
    return ap


def photo_arguments(doc: str | None, rounds: int) -> argparse.ArgumentParser:
    """:func:`arguments` and ``--src`` (photos: the sample's), ``--rounds``, ``--size``."""
    ap = arguments(doc)
    ap.add_argument("--src", default=str(SAMPLE / "train"))
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--size", type=int, default=512)
    return ap


def command_line() -> str:
    """How this benchmark was run, for its result: ``python benchmarks/NAME.py ARGS``."""
    return f"python benchmarks/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:])


def preprocess(src: Path | str, out: Path | str, *options) -> None:
    """``drpipe preprocess --quiet`` of ``src`` into ``out``, the real command; raises if it
    fails."""
    subprocess.run([DRPIPE, "preprocess", "--quiet", "--src", str(src), "--out", str(out),
                    *map(str, options)], check=True)


def write_labels(path: Path, rows: Iterable, header=("image", "level")) -> None:
    """A labels CSV (Kaggle's form: a header, ``id,level`` lines)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def link_sample(sample: Path, copies: int, train: Path) -> list[tuple[str, str]]:
    """The sample's photos symlinked (never copied) into ``train`` under ``copies`` sets of
    new patient ids (``{copy}{patient:05d}_{eye}``). Returns the (id, level) rows."""
    train.mkdir(parents=True)
    rows = []
    with open(sample / "trainLabels.csv") as f:
        labels = list(csv.DictReader(f))
    for c in range(copies):
        for r in labels:
            patient, eye = r["image"].split("_")
            new = f"{c}{int(patient):05d}_{eye}"
            os.symlink(sample / "train" / f"{r['image']}.jpeg", train / f"{new}.jpeg")
            rows.append((new, r["level"]))
    return rows


def linked_source(sample: Path, copies: int, dest: Path) -> int:
    """A Kaggle-layout source (``train/`` and ``trainLabels.csv``) of the linked sample
    (:func:`link_sample`). Returns the number of photos."""
    rows = link_sample(sample, copies, dest / "train")
    write_labels(dest / "trainLabels.csv", rows)
    return len(rows)


def one_core() -> None:
    """Pin this process to one core and stop OpenCV from threading: a per-photo cost."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import cv2  # once pinned, as the benchmarks always did

    cv2.setNumThreads(1)


def report(result: dict, path: Path | str | None, indent: int = 2, echo: bool = True) -> None:
    """Print the result as JSON (``echo``) and write it to ``path`` when given."""
    text = json.dumps(result, indent=indent)
    if echo:
        print(text)
    if path:
        Path(path).write_text(text + "\n")
