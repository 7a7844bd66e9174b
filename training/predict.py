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
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.encode import encode
from pipeline.filters import FilterParams
from pipeline.process import ProcessConfig, Rejection, prepare_or_reject, read_photo
from pipeline.sources import expand_photo_paths
from tfrecord_writer.info import load_info


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


def process_config_of(data_dir: str | Path) -> ProcessConfig:
    """The ProcessConfig the shards were made with (from drpipe_info.json)."""
    info = load_info(data_dir)
    proc = dict(info["config"]["process"])
    proc["filter_params"] = FilterParams(**proc.get("filter_params", {}))
    return ProcessConfig(**proc)


def predict_photos(run: str | Path, sources, checkpoint: str = "final",
                   batch_size: int = 16, progress=None,
                   exported: str | Path | None = None) -> list[Prediction]:
    """Grades for photos. ``exported``: a model from ``drpipe export`` (SavedModel directory
    or .tflite) to run instead of the run's Keras model, with the same preprocessing."""
    import keras
    import tensorflow as tf

    import training.models  # noqa: F401 - registers the custom layers
    from training.data import image_decoder
    from training.fit import load_config, model_path
    from training.metrics import apply_thresholds
    from training.runs import process_config

    run = Path(run)
    cfg = load_config(run)
    proc = process_config(run, cfg.data)  # as recorded at train time
    if exported:
        from training.export import runner

        model = runner(exported, threads=os.cpu_count() or 1)
    else:
        keras_model = keras.saving.load_model(model_path(run, checkpoint))

        def model(x):
            return keras_model(x, training=False)
    decode = image_decoder(proc.size, proc.format, cfg.image_size)
    thresholds = None
    if cfg.task == "regression":
        thresholds = json.loads((run / "metrics.json").read_text()).get("thresholds")

    out: list[Prediction] = []
    pending: list[tuple[Path, np.ndarray]] = []

    def flush():
        if not pending:
            return
        batch = np.stack([img for _, img in pending])
        y = np.asarray(model(batch), np.float32)
        for (path, _), row in zip(pending, y, strict=True):
            out.append(_prediction(path, row, cfg.task, thresholds, apply_thresholds))
        pending.clear()

    for path in expand_photo_paths(sources):
        data = read_photo(path)
        result = data if isinstance(data, Rejection) else prepare_or_reject(data, proc)
        if isinstance(result, Rejection):
            out.append(Prediction(path.stem, str(path), "rejected", str(result), None, None,
                                  None, None))
        else:
            encoded = encode(result.image, proc.format, proc.quality)  # as in the records
            pending.append((path, decode(tf.constant(encoded)).numpy()))
            if len(pending) == batch_size:
                flush()
        if progress:
            progress()
    flush()
    return sorted(out, key=lambda p: p.image_id)


def _prediction(path: Path, y: np.ndarray, task: str, thresholds, apply_thresholds):
    if task == "grade":
        p = [float(v) for v in y]
        return Prediction(path.stem, str(path), "ok", "", int(np.argmax(y)), p,
                          float(sum(p[2:])), None)
    if task == "referable":
        return Prediction(path.stem, str(path), "ok", "", None, None, float(y[0]), None)
    grade = int(apply_thresholds([float(y[0])], thresholds or [0.5, 1.5, 2.5, 3.5])[0])
    return Prediction(path.stem, str(path), "ok", "", grade, None, None, float(y[0]))


PRED_HEADER = ["image_id", "path", "status", "reason", "grade", "p_grade0", "p_grade1",
               "p_grade2", "p_grade3", "p_grade4", "p_referable", "score"]


def write_csv(preds: list[Prediction], path: str | Path) -> None:
    """Text cells that a spreadsheet would run as formulas get a leading ' (OWASP)."""
    from pipeline.outputs import csv_cell

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(PRED_HEADER)
        for p in preds:
            probs = [f"{v:.6f}" for v in p.probabilities] if p.probabilities else [""] * 5
            w.writerow([csv_cell(p.image_id), csv_cell(str(p.path)), p.status,
                        csv_cell(p.reason),
                        "" if p.grade is None else p.grade, *probs,
                        "" if p.referable is None else f"{p.referable:.6f}",
                        "" if p.score is None else f"{p.score:.6f}"])
