"""``drpipe export``: a deployable model from a run — SavedModel (TF Serving, TF.js, ...) or
TensorFlow Lite (phones, edge boxes), optionally quantised — with its size, its CPU latency
per photo, and a check that it grades like the Keras model it came from.

The exported graph is traced with an explicit ``training=False`` through Keras'
``ExportArchive``, whatever a layer's ``training`` default: the augmentation layers are
identities and BatchNormalization uses its moving statistics.

Input: ``images``, float32 [batch, S, S, 3], RGB in [0, 255] — the processed photo as the
training reader gives it (``drpipe predict`` makes it from a raw photo; the settings are in
``export.json`` beside the model). Output: the model's output (per-grade probabilities,
P(referable), or the regression score).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from training import runs
from training.metrics import decide

FORMATS = ("savedmodel", "tflite")
# dynamic: int8 weights, float activations (no data needed; ~4x smaller)
# float16: float16 weights (~2x smaller, GPU delegates)
# int8: int8 weights and activations, calibrated on photos of the run's training split
QUANTIZATIONS = ("dynamic", "float16", "int8")


class ExportError(RuntimeError):
    """A one-line reason the export cannot be made."""


class ExportTargetRefused(ExportError):
    """--out names something that is not an earlier export: never replaced (exit 2)."""


def _sidecar(out: Path) -> Path:
    return out.parent / f"{out.name.removesuffix('.tflite')}.export.json"


def is_previous_export(out: Path) -> bool:
    """True if ``out`` is what an earlier drpipe export wrote: its .export.json sidecar
    names it, and it is a SavedModel folder or a TFLite flatbuffer."""
    try:
        record = json.loads(_sidecar(out).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or Path(str(record.get("path", ""))).name != out.name:
        return False
    if out.is_dir() and not out.is_symlink():
        return (out / "saved_model.pb").is_file()
    if out.is_file() and not out.is_symlink():
        with open(out, "rb") as f:
            return f.read(8)[4:8] == b"TFL3"
    return False


def check_target(out: Path) -> None:
    """Refuse an ``out`` that exists and is not an earlier export (it would be replaced)."""
    out = Path(os.path.abspath(out))
    if os.path.lexists(out) and not is_previous_export(out):
        raise ExportTargetRefused(
            f"{out} exists and is not an earlier drpipe export; export never replaces it "
            "(choose a new --out)")
    sidecar = _sidecar(out)  # written beside OUT: a file of that name must be ours too
    if os.path.lexists(sidecar) and not is_previous_export(out):
        raise ExportTargetRefused(
            f"{sidecar} exists and is not the record of an earlier drpipe export of {out.name}; "
            "export never replaces it (move it away or choose a new --out)")


@dataclass
class ExportResult:
    path: str
    format: str
    quantize: str | None
    bytes: int
    keras_bytes: int
    latency_ms_median: float  # batch of one, on this machine's CPU
    latency_ms_p90: float
    keras_latency_ms_median: float
    threads: int  # LiteRT interpreter threads; 0 = TensorFlow's own thread pool
    checked_photos: int  # records of the check split graded by both models
    same_grade: int
    max_abs_diff: float  # largest difference between the two models' outputs
    check_split: str

    def summary(self) -> str:
        q = f" ({self.quantize} quantised)" if self.quantize else ""
        threads = f"{self.threads} thread(s)" if self.threads else "TensorFlow's threads"
        return (f"{self.path}: {self.format}{q}, {self.bytes / 1e6:.2f} MB "
                f"(Keras model {self.keras_bytes / 1e6:.2f} MB); CPU latency per photo "
                f"{self.latency_ms_median:.2f} ms median, {self.latency_ms_p90:.2f} ms p90 "
                f"({threads}; Keras {self.keras_latency_ms_median:.2f} ms); "
                f"same grade as the Keras model on {self.same_grade}/{self.checked_photos} "
                f"{self.check_split} photos, max output difference {self.max_abs_diff:.2g}")


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def save_savedmodel(model, image_size: int, out: Path) -> None:
    """An inference-only SavedModel with one signature, ``serving_default``."""
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        tf.function(lambda images: {"outputs": model(images, training=False)}),
        input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32,
                                       name="images")])
    archive.write_out(str(out), verbose=False)


def to_tflite(saved_model: Path, quantize: str | None, calibration=None) -> bytes:
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    if quantize:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        conv.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        # Integer kernels throughout; input and output stay float32, so callers do not
        # change. Calibrated on real processed photos, one at a time.
        conv.representative_dataset = lambda: ([x[None]] for x in calibration)
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return conv.convert()


class TFLiteRunner:
    """Batch-of-one inference with the LiteRT interpreter (the package for deployment)."""

    def __init__(self, model: bytes | str, threads: int = 1):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:  # no LiteRT wheel for this platform
            from tensorflow.lite import Interpreter

        kw = {"model_content": model} if isinstance(model, bytes) else {"model_path": model}
        self.it = Interpreter(num_threads=threads, **kw)
        self.it.allocate_tensors()
        self.inp = self.it.get_input_details()[0]["index"]
        self.out = self.it.get_output_details()[0]["index"]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        rows = []
        for img in x:
            self.it.set_tensor(self.inp, np.ascontiguousarray(img[None], np.float32))
            self.it.invoke()
            rows.append(self.it.get_tensor(self.out)[0].copy())
        return np.stack(rows)


class SavedModelRunner:
    def __init__(self, path: str | Path):
        import tensorflow as tf

        self.fn = tf.saved_model.load(str(path)).signatures["serving_default"]
        self.tf = tf

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.fn(images=self.tf.constant(x, self.tf.float32))["outputs"].numpy()


def runner(path: str | Path, threads: int = 1):
    """Something to call on a float32 [n, S, S, 3] batch, for an exported model."""
    path = Path(path)
    return TFLiteRunner(str(path), threads) if path.suffix == ".tflite" else SavedModelRunner(path)


def _latency_ms(fn, photos: np.ndarray, repeats: int) -> list[float]:
    for img in photos[:3]:  # warm-up: graph building, allocation, caches
        fn(img[None])
    times = []
    for i in range(repeats):
        img = photos[i % len(photos)][None]
        t = time.perf_counter()
        fn(img)
        times.append((time.perf_counter() - t) * 1000)
    return times


def _split_images(data: str, split: str, image_size: int, n: int) -> np.ndarray:
    from training.data import make_dataset  # TensorFlow

    ds = make_dataset(data, split, image_size=image_size, batch_size=16)
    xs: list[np.ndarray] = []
    for x, _ in ds:
        xs.extend(np.asarray(x))
        if len(xs) >= n:
            break
    return np.stack(xs[:n]) if xs else np.zeros((0, image_size, image_size, 3), np.float32)


def export(run: str | Path, fmt: str, out: str | Path | None = None,
           quantize: str | None = None, checkpoint: str = "final", check_split: str = "val",
           check_photos: int = 64, repeats: int = 50, threads: int = 1,
           log=print) -> ExportResult:
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if quantize and fmt != "tflite":
        raise ExportError("--quantize applies to --format tflite")
    if quantize and quantize not in QUANTIZATIONS:
        raise ExportError(f"unknown quantisation {quantize!r} "
                          f"(choose from {', '.join(QUANTIZATIONS)})")
    run = Path(run)
    if out is not None:
        check_target(Path(out))
    try:
        cfg = runs.load_config(run)
        runs.check_data(run, cfg.data)  # the checks and calibration use the run's own shards
        source = runs.require_model(run, checkpoint)
        info = runs.own_dataset_info(run, cfg.data, "needed for the preprocessing record and "
                                     "the check")
    except runs.RunError as e:
        raise ExportError(str(e)) from None
    suffix = {"savedmodel": "", "tflite": ".tflite"}[fmt]
    out = Path(out) if out else run / "export" / (
        f"{fmt}{'-' + quantize if quantize else ''}{suffix}")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    import training.models  # noqa: F401 - registers the custom layers

    keras.mixed_precision.set_global_policy("float32")
    model = keras.saving.load_model(source)
    split = check_split if check_split in info["counts"] else next(iter(info["counts"]))
    photos = _split_images(cfg.data, split, cfg.image_size, check_photos)
    if not len(photos):
        raise ExportError(f"split {split!r} of {cfg.data} has no photos to check the export on")
    thresholds = runs.recorded_cuts(run) if cfg.task == "regression" else None

    check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target, then renamed: a killed export never leaves half a model
    # under the final name.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        sm = Path(tmp) / "savedmodel"
        log(f"tracing {source} (inference mode, input {cfg.image_size}x{cfg.image_size}x3)")
        save_savedmodel(model, cfg.image_size, sm)
        if fmt == "tflite":
            log(f"converting to TensorFlow Lite{' (' + quantize + ')' if quantize else ''}")
            calibration = None
            if quantize == "int8":
                calibration = _split_images(cfg.data, cfg.train_split, cfg.image_size, 100)
            staged = Path(tmp) / "model.tflite"
            staged.write_bytes(to_tflite(sm, quantize, calibration))
        else:
            staged = sm
        if out.exists():
            check_target(out)  # an earlier export of ours, nothing else
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(staged, out)

    exported = runner(out, threads)
    want = np.concatenate([np.asarray(model(photos[i:i + 16], training=False), np.float32)
                           for i in range(0, len(photos), 16)])
    got = np.asarray(exported(photos), np.float32)
    same = int((decide(cfg.task, want, thresholds) == decide(cfg.task, got, thresholds)).sum())
    lat = _latency_ms(exported, photos, repeats)
    # The Keras model as a compiled graph, as model.predict runs it (without its per-call
    # overhead of building a dataset): the fair comparison.
    keras_lat = _latency_ms(tf.function(lambda x: model(x, training=False)), photos, repeats)
    result = ExportResult(
        path=str(out), format=fmt, quantize=quantize, bytes=_tree_bytes(out),
        keras_bytes=source.stat().st_size, latency_ms_median=statistics.median(lat),
        latency_ms_p90=float(np.percentile(lat, 90)),
        keras_latency_ms_median=statistics.median(keras_lat),
        threads=threads if fmt == "tflite" else 0,
        checked_photos=len(photos), same_grade=same,
        max_abs_diff=float(np.abs(want - got).max()), check_split=split)
    record = {**asdict(result), "run": str(run.resolve()), "checkpoint": checkpoint,
              "task": cfg.task, "model": cfg.model, "thresholds": thresholds,
              "input": {"name": "images", "shape": [None, cfg.image_size, cfg.image_size, 3],
                        "dtype": "float32", "range": [0, 255], "channels": "RGB"},
              "preprocessing": info["config"]["process"],
              "tensorflow": tf.__version__}
    runs.write_json(_sidecar(out), record)
    return result
