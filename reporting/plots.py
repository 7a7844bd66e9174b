"""Every figure drpipe draws, with matplotlib only (never TensorFlow): the report's charts,
and a run's training curves and confusion matrices (written by training/fit.py and
training/ensemble.py, embedded by the report).

matplotlib is imported on first use (:func:`pyplot`), not with this module: importing it
costs a CLI start, and the Agg backend must be chosen before ``matplotlib.pyplot`` loads.
"""

from __future__ import annotations

import base64
import csv
import io
from pathlib import Path

import numpy as np

from tfrecord_writer.files import atomic_write_bytes

GRADES = ["0 no DR", "1 mild", "2 moderate", "3 severe", "4 proliferative"]
COLORS = ["#4c78a8", "#72b7b2", "#eeca3b", "#f58518", "#e45756"]
VERDICTS = ("good", "usable", "reject")
VERDICT_COLORS = {"good": "#54a24b", "usable": "#eeca3b", "reject": "#e45756"}


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_uri(fig) -> str:
    """The figure as a PNG data URI (closed afterwards)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    pyplot().close(fig)
    return data_uri(buf.getvalue(), "png")


def save_png(fig, path) -> None:
    """The figure as a PNG to ``path`` (whole or not at all: atomic_write_bytes) or to a
    buffer; closed afterwards."""
    if hasattr(path, "write"):
        fig.savefig(path, format="png", dpi=100)
    else:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        atomic_write_bytes(Path(path), buf.getvalue())
    pyplot().close(fig)


def data_uri(data: bytes, fmt: str) -> str:
    """Image bytes (``fmt`` jpeg or png) as a data URI, for a self-contained page."""
    return (f"data:image/{'jpeg' if fmt == 'jpeg' else 'png'};base64,"
            + base64.b64encode(data).decode("ascii"))


# ---------------------------------------------------------------- the report's charts


def grade_chart(counts: dict[str, list[int]]) -> str:
    """Photos per grade per split, as counts and as shares (a PNG data URI)."""
    plt = pyplot()
    splits = list(counts)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    left = np.zeros(len(splits))
    for g in range(5):
        vals = np.array([counts[s][g] for s in splits], float)
        axes[0].barh(splits, vals, left=left, color=COLORS[g], label=GRADES[g])
        left += vals
    axes[0].set_xlabel("photos")
    axes[0].invert_yaxis()
    axes[0].set_title("photos per grade")
    left = np.zeros(len(splits))
    for g in range(5):
        vals = np.array([100 * counts[s][g] / max(sum(counts[s]), 1) for s in splits])
        axes[1].barh(splits, vals, left=left, color=COLORS[g], label=GRADES[g])
        left += vals
    axes[1].set_xlabel("% of the split")
    axes[1].invert_yaxis()
    axes[1].set_xlim(0, 100)
    axes[1].set_title("grade shares (stratified splits look alike)")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    return png_uri(fig)


def rejection_chart(by_reason: list[tuple[str, int]], rejected: int, photos: int) -> str:
    """Rejected photos per reason, most frequent first (a PNG data URI)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(by_reason) + 1.2))
    ax.barh([r for r, _ in by_reason], [n for _, n in by_reason], color="#e45756")
    ax.invert_yaxis()
    ax.set_xlabel("photos")
    ax.set_title(f"{rejected} of {photos} photos rejected")
    fig.tight_layout()
    return png_uri(fig)


def quality_chart(manifest: list[dict]) -> str:
    """Histogram of the quality scores of all measured photos, by verdict (a PNG data URI)."""
    plt = pyplot()
    scores = {v: [float(r["quality_score"]) for r in manifest
                  if r.get("quality") == v and r.get("quality_score")] for v in VERDICTS}
    fig, ax = plt.subplots(figsize=(8, 2.8))
    bins = np.linspace(0, 1, 41)
    for v in VERDICTS:
        if scores[v]:
            ax.hist(scores[v], bins=bins, color=VERDICT_COLORS[v], label=f"{v} ({len(scores[v])})")
    ax.set_xlabel("quality score")
    ax.set_ylabel("photos")
    ax.set_title("quality scores of all measured photos (incl. rejected as ungradable)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png_uri(fig)


# ---------------------------------------------------------------- a run's figures


def read_history(run: Path) -> list[dict]:
    """history.csv as rows, one per epoch (a row repeated by a crash-resume kept once)."""
    if not (run / "history.csv").exists():
        return []
    rows = {}
    for row in csv.DictReader(open(run / "history.csv")):
        rows[int(row["epoch"])] = row
    return [rows[k] for k in sorted(rows)]


def plot_history(run: Path) -> None:
    """RUN/training_curves.png from RUN/history.csv: loss, kappa, accuracy/AUC/MAE."""
    plt = pyplot()
    rows = read_history(run)
    if not rows:
        return
    epochs = [int(r["epoch"]) + 1 for r in rows]
    panels = [("loss", ["loss", "val_loss"]), ("quadratic kappa", ["val_kappa"]),
              ("accuracy / AUC / MAE", [k for k in ("accuracy", "val_accuracy", "auc",
                                                    "val_auc", "mae", "val_mae")
                                        if k in rows[0]])]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for k in keys:
            if k in rows[0]:
                ax.plot(epochs, [float(r[k]) for r in rows], marker=".", label=k)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(run.name)
    fig.tight_layout()
    save_png(fig, run / "training_curves.png")


def plot_confusion(result: dict, path: Path) -> None:
    """The confusion matrix of an evaluation result, to ``path`` (a file or a buffer)."""
    plt = pyplot()
    m = np.asarray(result["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(5, 4.4))
    ax.imshow(m, cmap="Blues")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center",
                    color="white" if m[i, j] > m.max() / 2 else "black")
    labels = ["no", "yes"] if m.shape[0] == 2 else list(range(m.shape[0]))
    ax.set_xticks(range(m.shape[1]), labels)
    ax.set_yticks(range(m.shape[0]), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    kappa = result.get("quadratic_kappa")
    ax.set_title(f"{result.get('split', '')}: kappa {kappa:.3f}" if kappa is not None
                 else str(result.get("split", "")))
    fig.tight_layout()
    save_png(fig, path)
