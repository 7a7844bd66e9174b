"""``drpipe tune``: a grid over training flags, one training run per point.

    tune/<name>/
      tune.json               the grid and the fixed flags (a re-run must match them)
      lr=0.001,batch-size=16/ a complete run directory per point (drpipe train --out)
      lr=0.001,batch-size=16.log   that run's output
      summary.csv             one row per point, sorted by validation kappa
      tune.png                validation kappa per point (a heat map for a 2-D grid)

Each point's flags are drpipe train's, parsed by it (the ``options_of`` callable
:func:`prepare` is given) before anything trains. Each point then runs as its own process,
``python -m training`` (training/__main__.py) with those options: memory is returned
between points, a crash ends one point only, and a point's directory is exactly what
``drpipe train`` would make (evaluate, predict, export and ensemble take it as it is).
Re-running the same command skips finished points and resumes an interrupted one from its
last epoch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reporting.plots import read_history, save_png
from tfrecord_writer.writer import atomic_write_bytes
from training import runs


class TuneError(RuntimeError):
    """A one-line reason the tuning cannot start."""


class TuneUsageError(TuneError):
    """A grid or flags that cannot be used as given: a usage error (exit 2)."""


@dataclass
class Point:
    params: dict[str, str]  # option name (without --) -> value, in grid order
    dir: Path
    status: str = "pending"  # pending | done | failed
    error: str = ""
    metrics: dict | None = None
    best_epoch_kappa: float | None = None
    best_epoch: int | None = None
    options: dict = field(default_factory=dict)  # drpipe train's, parsed (prepare)

    @property
    def name(self) -> str:
        return self.dir.name

    def args(self, fixed: list[str]) -> list[str]:
        args = list(fixed)
        for k, v in self.params.items():
            args += [f"--{k}", v]
        return args + ["--out", str(self.dir)]


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["lr=1e-3,1e-4", "batch-size=16,32"]`` -> ordered {option: values}."""
    grid: dict[str, list[str]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip().removeprefix("--").replace("_", "-")
        # Values that hold commas themselves (a head such as 32,16) are separated by ';'.
        sep_values = ";" if ";" in values else ","
        vals = [v.strip() for v in values.split(sep_values) if v.strip()]
        if not sep or not name or not vals:
            raise TuneError(f"--grid {item!r}: expected OPTION=V1,V2,... "
                            "(e.g. lr=1e-3,1e-4; head=16;32,16 for values with commas)")
        if name in ("out", "resume", "config"):
            raise TuneError(f"--grid {item!r}: --{name} cannot vary across points")
        if len(set(vals)) < len(vals):
            raise TuneError(f"--grid {item!r}: a value is repeated")
        grid[name] = vals
    return grid


def _safe(value: str) -> str:
    """A value as part of a directory name; one that had to be changed (``a/b``) gets a
    hash of the original, so it never shares a directory with another (``a_b``)."""
    safe = "".join(c if c.isalnum() or c in "+-._" else "_" for c in value)
    if safe == value:
        return safe
    return f"{safe}.{hashlib.sha256(value.encode()).hexdigest()[:8]}"


def plan(grid: dict[str, list[str]], out: Path) -> list[Point]:
    """Every combination, in grid order; a point's directory is named by the axes that vary
    (``lr=0.001,batch-size=16``), all of them when none does."""
    varying = [k for k, v in grid.items() if len(v) > 1] or list(grid)
    points = []
    for combo in itertools.product(*grid.values()):
        params = dict(zip(grid, combo, strict=True))
        name = ",".join(f"{k}={_safe(params[k])}" for k in varying)
        points.append(Point(params, out / name))
    if len({p.dir for p in points}) < len(points):  # never one directory for two points
        raise TuneError("two grid points would share a run directory; make the values differ")
    return points


def _history_best(run: Path) -> tuple[float | None, int | None]:
    rows = [r for r in read_history(run) if r.get("val_kappa") not in (None, "")]
    if not rows:
        return None, None
    best = max(rows, key=lambda r: float(r["val_kappa"]))
    return float(best["val_kappa"]), int(best["epoch"]) + 1


def collect(point: Point) -> None:
    if (point.dir / runs.METRICS).exists() and runs.is_finished(point.dir):
        point.status = "done"
        point.metrics = json.loads((point.dir / runs.METRICS).read_text())
        point.best_epoch_kappa, point.best_epoch = _history_best(point.dir)


def _training() -> list[str]:
    # training/__main__.py's main(), with the working directory off sys.path ("-m" would put
    # it first: a user's own training.py there would run instead of drpipe's package).
    return [sys.executable, "-c", "import sys; sys.path.pop(0); "
            "from training.__main__ import main; sys.exit(main())"]


def run_point(point: Point, log_path: Path) -> None:
    """Train one point (or resume it) in a process of its own, its output to ``log_path``."""
    if runs.is_run(point.dir):
        cmd = [*_training(), "--resume", str(point.dir)]
    else:
        # killed before its config was written: nothing to resume, start it again
        shutil.rmtree(point.dir, ignore_errors=True)
        options = dict(point.options)
        version = options.pop("data_version", None)
        cmd = [*_training(), "--options", json.dumps(options, default=str)]
        cmd += ["--version", str(version)] if version is not None else []
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    with open(log_path, "a", encoding="utf-8") as log:
        log.write("+ " + shlex.join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if rc in (130, -signal.SIGINT):  # the point was interrupted (Ctrl-C): so is the tuning
        raise KeyboardInterrupt
    collect(point)
    if point.status != "done":
        point.status = "failed"
        point.error = _last_error(log_path) or f"training exited {rc}"


def _last_error(log_path: Path) -> str:
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    for line in reversed(lines):
        if line.startswith("drpipe: "):
            return line.removeprefix("drpipe: ")
    return ""


def check_manifest(out: Path, grid: dict[str, list[str]], fixed: list[str]) -> None:
    """A tune directory belongs to one grid and one set of fixed flags."""
    want = {"grid": grid, "train_flags": fixed}
    path = out / "tune.json"
    if path.exists():
        have = json.loads(path.read_text())
        if have != want:
            raise TuneError(f"{out} holds a tuning with other settings ({path}); choose "
                            "another --out, or repeat the same command to continue it")
        return
    out.mkdir(parents=True, exist_ok=True)
    runs.write_json(path, want)


SUMMARY_COLUMNS = ["rank", "point", "status", "val_kappa", "val_accuracy",
                   "best_epoch_val_kappa", "best_epoch", "run", "error"]


def sorted_points(points: list[Point]) -> list[Point]:
    def key(p: Point):
        k = p.metrics.get("quadratic_kappa") if p.metrics else None
        return (k is None, -(k or 0.0))

    return sorted(points, key=key)


def write_summary(points: list[Point], grid: dict[str, list[str]], out: Path) -> Path:
    rows = sorted_points(points)
    path = out / "summary.csv"
    f = io.StringIO(newline="")
    w = csv.writer(f, lineterminator="\n")
    w.writerow(SUMMARY_COLUMNS[:2] + list(grid) + SUMMARY_COLUMNS[2:])
    for rank, p in enumerate(rows, 1):
        m = p.metrics or {}
        w.writerow([rank if m else "", p.name, *p.params.values(), p.status,
                    _fmt(m.get("quadratic_kappa")), _fmt(m.get("accuracy")),
                    _fmt(p.best_epoch_kappa), p.best_epoch or "", str(p.dir), p.error])
    atomic_write_bytes(path, f.getvalue().encode("utf-8"))
    plot(points, grid, out / "tune.png")
    return path


def _fmt(v) -> str:
    return "" if v is None else f"{v:.4f}"


def plot(points: list[Point], grid: dict[str, list[str]], path: Path) -> None:
    import matplotlib  # deferred: matplotlib takes a second to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def kappa(p):
        return p.metrics["quadratic_kappa"] if p.metrics else np.nan

    names = list(grid)
    if len(names) == 2 and len(grid[names[0]]) > 1 and len(grid[names[1]]) > 1:
        a, b = names
        m = np.full((len(grid[a]), len(grid[b])), np.nan)
        for p in points:
            m[grid[a].index(p.params[a]), grid[b].index(p.params[b])] = kappa(p)
        fig, ax = plt.subplots(figsize=(1.6 * len(grid[b]) + 2.5, 1.2 * len(grid[a]) + 1.8))
        im = ax.imshow(m, cmap="viridis")
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, "failed" if np.isnan(m[i, j]) else f"{m[i, j]:.3f}",
                        ha="center", va="center", color="white")
        ax.set_xticks(range(len(grid[b])), grid[b])
        ax.set_yticks(range(len(grid[a])), grid[a])
        ax.set_xlabel(b)
        ax.set_ylabel(a)
        fig.colorbar(im, ax=ax, label="validation quadratic kappa")
    else:
        ranked = sorted_points(points)
        fig, ax = plt.subplots(figsize=(8, 0.4 * len(ranked) + 1.5))
        ax.barh(range(len(ranked)), [kappa(p) for p in ranked], color="tab:blue")
        ax.set_yticks(range(len(ranked)), [p.name for p in ranked])
        ax.invert_yaxis()
        ax.set_xlabel("validation quadratic kappa")
        ax.grid(axis="x", alpha=0.3)
    ax.set_title("drpipe tune")
    fig.tight_layout()
    save_png(fig, path)


@dataclass
class Tuning:
    """A prepared tuning: the grid, the flags every point shares, the directory, the points
    (each with its parsed options)."""

    grid: dict[str, list[str]]
    fixed: list[str]
    out: Path
    points: list[Point]

    def describe(self) -> str:
        axes = " x ".join(f"{k} {{{', '.join(v)}}}" for k, v in self.grid.items())
        return f"{len(self.points)} points: {axes} -> {self.out}"


def prepare(data: str | Path | None, lrs: str, batch_sizes: str, grids: list[str],
            train_args: list[str], out: str | Path | None,
            options_of: Callable[[list[str]], dict]) -> Tuning:
    """``drpipe tune``'s grid from its options: ``--lr`` and ``--batch-size`` lists ('' = not
    an axis) and ``--grid`` items; ``train_args`` go to every point, with ``--data`` unless
    data is an axis. Every point's flags are parsed by ``options_of`` (drpipe train's
    parser: a TuneError names what is wrong) before anything trains, and the directory's
    tune.json is checked (or written). TuneUsageError for what the user must change,
    RunError for missing shards, TuneError for a directory of another tuning."""
    items = []
    if lrs.strip():
        items.append(f"lr={lrs}")
    if batch_sizes.strip():
        items.append(f"batch-size={batch_sizes}")
    try:
        grid = parse_grid([*items, *grids])
    except TuneError as e:
        raise TuneUsageError(str(e)) from None
    if "data" in grid:  # preprocessing variants as a grid axis
        grid["data"] = [str(Path(v).resolve()) for v in grid["data"]]
    fixed = list(train_args)
    for flag in ("--out", "--resume", "--config"):
        if any(a == flag or a.startswith(flag + "=") for a in fixed):
            raise TuneUsageError(f"{flag} is set by drpipe tune, not per run")
    if "data" not in grid:
        runs.dataset_info(data)  # "no drpipe shards here" (RunError)
        fixed = ["--data", str(Path(data).resolve()), *fixed]
    out = Path(out) if out else Path("runs") / f"tune-{time.strftime('%Y%m%d-%H%M%S')}"
    if not grid:
        raise TuneError("nothing to tune: give --lr, --batch-size or --grid OPTION=V1,V2")
    points = plan(grid, out)
    for p in points:  # every point's flags are checked before anything trains
        try:
            p.options = options_of(p.args(fixed))
        except TuneError as e:
            raise TuneUsageError(f"point {p.name}: {e}") from None
    check_manifest(out, grid, fixed)  # before anything is printed or trained
    return Tuning(grid, fixed, out, points)


def tune(tuning: Tuning, progress=None, log=print) -> list[Point]:
    """Train every point not yet done; returns the points sorted by validation kappa."""
    grid, out, points = tuning.grid, tuning.out, tuning.points
    for p in points:
        collect(p)
    done = sum(p.status == "done" for p in points)
    if done:
        log(f"{done} of {len(points)} points already trained in {out}")
    for p in points:
        if p.status != "done":
            run_point(p, out / f"{p.name}.log")
            k = p.metrics["quadratic_kappa"] if p.metrics else None
            log(f"{p.name}: " + (f"validation kappa {k:.3f}" if k is not None
                                 else f"FAILED: {p.error} (see {out / (p.name + '.log')})"))
            write_summary(points, grid, out)
        if progress:
            progress()
    write_summary(points, grid, out)
    return sorted_points(points)


def ranking(ranked: list[Point]) -> list[str]:
    """The ranked points as the lines drpipe tune prints."""
    width = max(len(p.name) for p in ranked)
    lines = [f"{'rank':>4}  {'point':{width}}  val kappa  val acc  best epoch (kappa)"]
    for i, p in enumerate(ranked, 1):
        if p.metrics:
            best = (f"{p.best_epoch} ({p.best_epoch_kappa:.3f})" if p.best_epoch else "")
            lines.append(f"{i:>4}  {p.name:{width}}  {p.metrics['quadratic_kappa']:9.3f}  "
                         f"{p.metrics['accuracy']:7.3f}  {best}")
        else:
            lines.append(f"{'-':>4}  {p.name:{width}}  failed: {p.error}")
    return lines
