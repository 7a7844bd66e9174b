"""``drpipe predict``: raw photos in, grades out, with exactly the training preprocessing.

The run's ``config.json`` records the preprocessing of the shards it learnt from (size,
filter, format, quality, ...; :mod:`training.runs`), so shards re-made since never change
what it predicts; runs made before that record read their shards' ``dataset_info.json``.
Each photo goes through the same ``pipeline.process`` steps, is encoded as the records
were, and is decoded by the same function the training reader uses
(:func:`training.data.image_decoder`) — so a photo reaches the model exactly as its
training photos did: no train/serve skew.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.outputs import csv_cell
from pipeline.process import Rejection
from pipeline.sources import expand_photo_paths, photo_id
from tfrecord_writer.schema import N_GRADES, REFERABLE_MIN_GRADE
from tfrecord_writer.writer import atomic_write_bytes
from training import runs
from training.export import runner
from training.metrics import decide
from training.runs import process_config_of  # noqa: F401 - re-exported


@dataclass(frozen=True)
class Prediction:
    image_id: str
    path: str
    status: str  # ok | rejected
    reason: str
    grade: int | None
    probabilities: list[float] | None  # per grade (task grade)
    referable: float | None  # P(grade >= 2), or the referable model's output
    score: float | None  # regression output
    # The photo's quality as preprocess records it (pipeline.quality), when it was measured
    quality_score: float | None = None
    quality: str = ""  # good | usable | reject

    @classmethod
    def rejected(cls, path: Path | str, image_id: str, reason: str, quality=None) -> Prediction:
        return dataclasses.replace(cls(image_id, str(path), "rejected", reason, None, None,
                                       None, None), **_quality_fields(quality))


def _quality_fields(quality) -> dict:
    if quality is None:
        return {}
    return {"quality_score": float(quality.score), "quality": quality.verdict}


def graded(path: Path | str, image_id: str, task: str, y: np.ndarray, grade: int,
           quality=None) -> Prediction:
    """The prediction for one photo from the model's output ``y`` and its decided grade
    (``quality``: the photo's pipeline.quality.Quality, reported beside it)."""
    if task == "grade":
        p = [float(v) for v in y]
        pred = Prediction(image_id, str(path), "ok", "", int(grade), p,
                          float(sum(p[REFERABLE_MIN_GRADE:])), None)
    elif task == "referable":
        pred = Prediction(image_id, str(path), "ok", "", None, None, float(y[0]), None)
    else:
        pred = Prediction(image_id, str(path), "ok", "", int(grade), None, None, float(y[0]))
    return dataclasses.replace(pred, **_quality_fields(quality))


def predict_photos(run: str | Path, sources, checkpoint: str = "final",
                   batch_size: int = 16, progress=None,
                   exported: str | Path | None = None) -> list[Prediction]:
    """Grades for photos. ``exported``: a model from ``drpipe export`` (SavedModel directory
    or .tflite) to run instead of the run's Keras model, with the same preprocessing."""
    import keras  # deferred: TensorFlow

    import training.models  # noqa: F401 - registers the custom layers
    from training.data import photo_input

    run = Path(run)
    cfg = runs.load_config(run)
    to_input = photo_input(runs.process_config(run, cfg.data), cfg.image_size,  # as trained
                           with_quality=True)
    if exported:
        model = runner(exported, threads=os.cpu_count() or 1)
    else:
        keras_model = keras.saving.load_model(runs.model_path(run, checkpoint))

        def model(x):
            return keras_model(x, training=False)
    cuts = runs.recorded_cuts(run) if cfg.task == "regression" else None

    out: list[Prediction] = []
    pending: list[tuple[Path | str, np.ndarray, object]] = []

    def flush():
        if not pending:
            return
        y = np.asarray(model(np.stack([img for _, img, _ in pending])), np.float32)
        for (path, _, q), row, grade in zip(pending, y, decide(cfg.task, y, cuts),
                                            strict=True):
            out.append(graded(path, photo_id(path), cfg.task, row, grade, q))
        pending.clear()

    for path in expand_photo_paths(sources):
        result = to_input(path)
        if isinstance(result, Rejection):
            out.append(Prediction.rejected(path, photo_id(path), str(result), result.quality))
        else:
            pending.append((path, *result))
            if len(pending) == batch_size:
                flush()
        if progress:
            progress()
    flush()
    return sorted(out, key=lambda p: p.image_id)


def predict(run: str | Path, sources, checkpoint: str = "final", progress=None,
            exported: str | Path | None = None) -> list[Prediction]:
    """``drpipe predict``: a run's, or an ensemble directory's, grades for photos."""
    if runs.is_ensemble(run):
        from training.ensemble import predict_photos as ensemble_predict  # imports this module

        return ensemble_predict(run, sources, progress=progress)
    return predict_photos(run, sources, checkpoint, progress=progress, exported=exported)


def check_predictor(run: str | Path, checkpoint: str = "final",
                    exported: str | Path | None = None) -> list[Path]:
    """Before any model loads: every run that will grade (a run, or an ensemble's members)
    can, with its preprocessing and its model. Returns them (RunError if one cannot)."""
    members, checkpoint = runs.members_of(run, checkpoint)
    for member in members:
        runs.check_servable(member, checkpoint, need_model=not exported)
    return members


PRED_HEADER = ["image_id", "path", "status", "reason", "grade",
               *(f"p_grade{g}" for g in range(N_GRADES)), "p_referable", "score",
               "quality_score", "quality"]


def write_csv(preds: list[Prediction], path: str | Path) -> None:
    """Text cells that a spreadsheet would run as formulas get a leading ' (OWASP). Written
    whole (temp-then-rename)."""
    f = io.StringIO(newline="")
    w = csv.writer(f, lineterminator="\n")
    w.writerow(PRED_HEADER)
    for p in preds:
        probs = [f"{v:.6f}" for v in p.probabilities] if p.probabilities else [""] * N_GRADES
        w.writerow([csv_cell(p.image_id), csv_cell(str(p.path)), p.status, csv_cell(p.reason),
                   "" if p.grade is None else p.grade, *probs,
                   "" if p.referable is None else f"{p.referable:.6f}",
                   "" if p.score is None else f"{p.score:.6f}",
                   "" if p.quality_score is None else f"{p.quality_score:.4f}", p.quality])
    atomic_write_bytes(Path(path), f.getvalue().encode("utf-8"))
