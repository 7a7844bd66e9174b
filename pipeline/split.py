"""Patient-safe stratified splits: both eyes of a patient always land in the same split.

The two eyes of one patient are strongly correlated; a split that puts the left eye in
train and the right in test leaks (none of the reference works split by patient). Here
patients are assigned whole, greedily, each to the split where it keeps the grade counts
closest to their targets (chi-square) — rarest grades first, so the small classes are spread
before the large ones fill the room — which keeps every split's grade mix within a
fraction of a percent of the whole on Kaggle-sized data, and within a photo or two on tiny
data. With ``quota="floor"`` (``--split-quota floor``) whole patients are then moved until
every split but the first holds exactly floor(fraction x n) photos of each grade
(:mod:`pipeline.split_quota`).

    assign_splits(rows, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0) -> {image_id: split}

``drpipe split`` (labels only: :func:`plan_split`) and ``drpipe preprocess`` call the same
function on the same rows, so a split planned and audited from the labels file is the one
the shards get.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import split_quota
from pipeline.outputs import csv_cell
from pipeline.sources import LabelError, LabelRow, read_labels
from tfrecord_writer.schema import N_GRADES
from tfrecord_writer.writer import atomic_write_bytes

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def parse_split_spec(spec: str) -> dict[str, float]:
    """``"train=0.8,val=0.1,test=0.1"`` -> ordered {name: fraction}. Fractions must sum to 1
    (percentages summing to 100 are accepted too). Raises ValueError with the reason."""
    out: dict[str, float] = {}
    for part in spec.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not _NAME.match(name):
            raise ValueError(f"bad split part {part.strip()!r}: expected NAME=FRACTION "
                             "with a lower-case name")
        if name in out:
            raise ValueError(f"split {name!r} given twice")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"split {name!r}: {value.strip()!r} is not a number") from None
        if not math.isfinite(out[name]):  # nan passes every comparison
            raise ValueError(f"split {name!r}: {value.strip()!r} is not a finite number")
        if out[name] < 0:
            raise ValueError(f"split {name!r}: negative fraction")
    if not out:
        raise ValueError("empty split spec")
    total = sum(out.values())
    if abs(total - 100) < 1e-6:
        out = {k: v / 100 for k, v in out.items()}
        total = 1.0
    if abs(total - 1) > 1e-6:
        raise ValueError(f"split fractions sum to {total:g}, not 1")
    return out


def assign_splits(rows: Iterable[tuple[str, str, int]], ratios: dict[str, float],
                  seed: int = 0, keep: dict[str, str] | None = None,
                  quota: str | None = None) -> dict[str, str]:
    """Assign each image to a split, whole patients at a time, stratified by grade.

    Args:
      rows: (image_id, patient_id, grade) triples.
      ratios: {split name: fraction}, fractions summing to 1.
      seed: the same rows, ratios and seed always give the same assignment.
      keep: {patient_id: split} of an earlier version: these patients stay where they are
        (their counts start the greedy); only the others are assigned (incremental runs).
      quota: None (the greedy alone), or "floor": every split but the first gets exactly
        floor(fraction x n) photos of each grade, the first the rest, by moving whole
        patients after the greedy (:mod:`pipeline.split_quota`; kept patients never move).
        Raises split_quota.QuotaError when no such split is found.
    Returns:
      {image_id: split name}.
    """
    names = list(ratios)
    frac = np.array([ratios[n] for n in names], float)
    patients: dict[str, list[tuple[str, int]]] = {}
    for image_id, patient, grade in rows:
        patients.setdefault(patient, []).append((image_id, int(grade)))
    if not patients:
        return {}
    pids = sorted(patients)
    counts = np.zeros((len(pids), N_GRADES), int)
    for i, p in enumerate(pids):
        for _, g in patients[p]:
            counts[i, g] += 1
    totals = counts.sum(axis=0)
    target = frac[:, None] * totals[None, :]  # split x grade
    size_target = frac * counts.sum()

    # Seeded shuffle, then rarest grade first (stable, so ties keep the shuffled order).
    order = np.random.default_rng(seed).permutation(len(pids))
    rarity = np.where(counts > 0, totals[None, :], np.iinfo(np.int64).max).min(axis=1)
    order = order[np.argsort(rarity[order], kind="stable")]

    # Each patient goes to the split where it raises Pearson's chi-square between the
    # split's grade counts and their targets, sum (n - t)^2 / t, the least. The increase,
    # sum (c^2 + 2c(n - t)) / t, is a "least filled quota first" term, 2c(n/t - 1), plus an
    # overshoot penalty c^2/t that keeps a pair of eyes out of a quota of 0.4 photos.
    current = np.zeros_like(target)
    size = np.zeros(len(names))
    choice = np.empty(len(pids), int)
    fixed = np.zeros(len(pids), bool)
    for i, p in enumerate(pids):
        if keep and p in keep:
            if keep[p] not in names:
                raise ValueError(f"patient {p!r} was in split {keep[p]!r}, which --split lacks")
            choice[i] = s = names.index(keep[p])
            fixed[i] = True
            current[s] += counts[i]
            size[s] += counts[i].sum()
    order = order[~fixed[order]]
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in order:
            c = counts[i]
            inc = np.where(target > 0, (c * c + 2 * c * (current - target)) / target, np.inf)
            delta = inc.sum(axis=1, where=c[None, :] > 0)
            size_fill = np.where(size_target > 0, size / size_target, np.inf)
            s = min(range(len(names)), key=lambda k: (round(delta[k], 9), size_fill[k], k))
            choice[i] = s
            current[s] += c
            size[s] += c.sum()
    if quota is not None:
        choice = split_quota.repair(counts, choice, fixed, order, frac, names, quota)
    return {image_id: names[choice[i]] for i, p in enumerate(pids)
            for image_id, _ in patients[p]}


# ---------------------------------------------------------------- drpipe split: a plan file

PLAN_HEADER = ["image", "patient_id", "eye", "label", "split"]


class NotAPlan(ValueError):
    """The plan's path holds a file that is not a drpipe split plan (never replaced)."""


class PlanWriteError(RuntimeError):
    """The plan could not be written (a one-line reason)."""


def _grade_line(name: str, c: list[int]) -> str:
    share = " ".join(f"{100 * a / max(sum(c), 1):5.1f}%" for a in c)
    return (f"  {name:>6}: {sum(c):6d} photos, grades 0-4: " + " / ".join(map(str, c))
            + f"  ({share})")


@dataclass(frozen=True)
class SplitPlan:
    out: Path
    rows: list[LabelRow]
    ratios: dict[str, float]
    assignment: dict[str, str]  # image id -> split

    def counts(self, split: str | None = None) -> list[int]:
        """Photos per grade in ``split`` (None: all)."""
        return [sum(1 for r in self.rows if r.label == g
                    and (split is None or self.assignment[r.image_id] == split))
                for g in range(N_GRADES)]

    def lines(self) -> list[str]:
        """What drpipe split prints: photos and patients, then grades per split."""
        rows = self.rows
        return ([f"{len(rows)} photos of {len({r.patient_id for r in rows})} patients "
                 f"-> {self.out}"]
                + [_grade_line(name, self.counts(name)) for name in self.ratios]
                + [_grade_line("all", self.counts())])


def read_plan(path: Path) -> dict[str, str]:
    """{patient_id: split} of an earlier plan; LabelError if it cannot be one."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            plan = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise LabelError(f"cannot read --previous {path}: {e}") from None
    if not plan or not {"patient_id", "split"} <= set(plan[0]):
        raise LabelError(f"--previous {path} is not a drpipe split plan "
                         "(no patient_id and split columns)")
    return {r["patient_id"].removeprefix("'"): r["split"] for r in plan}


def _is_plan(path: Path) -> bool:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return next(csv.reader(f), None) == PLAN_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def plan_split(labels: Iterable[Path], ratios: dict[str, float], seed: int, out: Path,
               id_col: str = "image", label_col: str = "level", patient_col: str | None = None,
               previous: Path | None = None, quota: str | None = None) -> SplitPlan:
    """``drpipe split``: assign the photos of ``labels`` (one or more CSVs) to splits and
    write the plan to ``out`` (CSV: image, patient_id, eye, label, split). With ``previous``
    (an earlier plan) its patients keep their split. ``quota``: as :func:`assign_splits`.

    Raises LabelError (bad labels or previous plan; QuotaError), NotAPlan (``out`` is a file no plan
    wrote, or one of the labels), ValueError (``ratios`` cannot be met), PlanWriteError."""
    labels = [Path(p) for p in labels]
    rows = [r for path in labels for r in read_labels(path, id_col, label_col, patient_col)]
    # Never replace a file drpipe split did not write (--out trainLabels.csv would lose the
    # labels): an existing --out must be a previous split plan.
    if out.exists() and (not _is_plan(out)
                         or out.resolve() in {p.resolve() for p in labels}):
        raise NotAPlan(f"{out} exists and is not a drpipe split plan; choose another --out")
    keep = read_plan(previous) if previous is not None else None
    assignment = assign_splits([(r.image_id, r.patient_id, r.label) for r in rows], ratios,
                               seed, keep=keep, quota=quota)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(PLAN_HEADER)
    for r in sorted(rows, key=lambda r: r.image_id):
        w.writerow([csv_cell(r.image_id), csv_cell(r.patient_id), r.eye, r.label,
                    assignment[r.image_id]])
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, buf.getvalue().encode())
    except OSError as e:
        raise PlanWriteError(f"cannot write {out}: {e.strerror or e}") from None
    return SplitPlan(out, rows, ratios, assignment)
