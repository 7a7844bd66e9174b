"""Training and evaluation runs: a run directory that holds everything about a model.

    runs/<name>/
      config.json            the resolved configuration (resume and evaluate read it)
      history.csv            one row per epoch, continued across resumes
      logs/                  TensorBoard
      checkpoints/best.keras best by validation quadratic kappa
      checkpoints/epoch-NNN.keras   every --checkpoint-every epochs
      backup/                weights, optimizer state and epoch for --resume (removed
                             when done; replaced atomically, so a kill never breaks it)
      model.keras            the final model; backbone.weights.h5 (Keras Applications)
      metrics.json           validation metrics; metrics-<split>.json from evaluate
      training_curves.png, confusion_<split>.png

Two phases when --fine-tune-epochs is given (Barh): the first with --freeze, the second
with everything trainable at --fine-tune-lr.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np

from pipeline.versions import resolve
from reporting.plots import plot_confusion, plot_history
from tfrecord_writer.schema import N_GRADES, REFERABLE_MIN_GRADE
from tfrecord_writer.writer import atomic_write_bytes
from training import MODEL_NAMES, runs
from training import metrics as M
from training.config import TrainConfig, default_run_dir  # noqa: F401 - re-exported
from training.runs import load_config, model_path  # noqa: F401 - re-exported


class TrainError(runs.RunError):
    """A one-line reason a run cannot start or continue."""


class OptionError(TrainError):
    """An option that cannot be used as given (``param``: the option, e.g. "--model"; None
    for a combination of options): a usage error (exit 2)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def new_config(options: dict, data_version: int | None = None) -> TrainConfig:
    """A new run's TrainConfig from ``drpipe train``'s options (TrainConfig field names):
    the model checked, the run directory defaulted, ``data`` resolved to the folder of
    ``data_version`` (docs/FORMAT.md, "Versions"; default the latest), made absolute so that
    predict and evaluate run from anywhere."""
    kw = dict(options)
    if kw["model"] not in MODEL_NAMES:
        raise OptionError(f"unknown model {kw['model']!r}; choose from {', '.join(MODEL_NAMES)}",
                          "--model")
    kw["out"] = kw.get("out") or default_run_dir()
    try:
        data = resolve(kw["data"], data_version)
    except FileNotFoundError as e:
        raise OptionError(str(e), "--version") from None
    kw["data"] = str(Path(data).resolve())
    return TrainConfig.from_dict(kw)


def resume_config(resume: str | Path, given: dict | None = None,
                  data_version: int | None = None) -> TrainConfig:
    """``train --resume DIR``: DIR's own configuration, for DIR itself (a moved or copied run
    resumes where it is, not at the ``out`` it was started with). ``given``: the options
    given with it (TrainConfig field names), which must agree with the run: a different
    value is refused (OptionError), never ignored."""
    if data_version is not None:
        raise OptionError("--version applies to a new run; --resume keeps the data version "
                          "the run was trained on")
    cfg = load_config(resume)
    recorded = dataclasses.asdict(cfg)
    for name, value in (given or {}).items():
        if name not in recorded:
            continue
        if name == "out":
            same = value is not None and Path(value).resolve() == Path(resume).resolve()
        elif name == "data":  # the output itself, or the version folder the run trained on
            rec = Path(recorded[name]).resolve()
            output = rec.parent.parent if rec.parent.name == "versions" else rec
            same = value is not None and Path(value).resolve() in (rec, output)
        else:
            same = value == recorded[name] or (isinstance(value, (tuple, list))
                                               and list(value) == list(recorded[name]))
        if not same:
            flag = "--" + name.replace("_", "-")
            raise OptionError(f"--resume {resume}: {flag} {value} conflicts with the run's "
                              f"{recorded[name]!r}; a resumed run keeps its configuration "
                              "(start a new run to change it)")
    return dataclasses.replace(cfg, out=str(resume))


def metrics_line(r: dict, run) -> str:
    """One line of a split's metrics, as train and evaluate print it."""
    line = f"{r['split']}: n={r['n']}, quadratic kappa {r['quadratic_kappa']:.3f}"
    line += f", accuracy {r['accuracy']:.3f}"
    if "auc" in r:
        line += (f", AUC {r['auc']:.3f}, sensitivity {r['sensitivity']:.3f}, "
                 f"specificity {r['specificity']:.3f}")
    return line + f"  ({run})"


def _spec(cfg: TrainConfig):
    from training.models import ModelSpec

    return ModelSpec(model=cfg.model, image_size=cfg.image_size, task=cfg.task,
                     head=tuple(cfg.head), dropout=cfg.dropout, l1=cfg.l1, l2=cfg.l2,
                     weights=cfg.weights, augment=cfg.augment, seed=cfg.seed)


def _setup_devices(cfg: TrainConfig):
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    mp = cfg.mixed_precision == "on" or (cfg.mixed_precision == "auto" and gpus)
    keras.mixed_precision.set_global_policy("mixed_float16" if mp else "float32")
    strategy = tf.distribute.MirroredStrategy() if len(gpus) > 1 else (
        tf.distribute.get_strategy())
    return strategy, {"gpus": len(gpus), "mixed_precision": bool(mp),
                      "replicas": strategy.num_replicas_in_sync}


def _compile(model, cfg: TrainConfig, lr: float):
    import keras

    opt = (keras.optimizers.Adam(lr) if cfg.optimizer == "adam"
           else keras.optimizers.SGD(lr, momentum=0.9, nesterov=True))
    if cfg.task == "grade":
        model.compile(opt, "sparse_categorical_crossentropy", metrics=["accuracy"])
    elif cfg.task == "referable":
        model.compile(opt, "binary_crossentropy",
                      metrics=["accuracy", keras.metrics.AUC(name="auc")])
    else:
        model.compile(opt, "mse", metrics=["mae"])


def model_outputs(model, ds, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(true grades or targets, model outputs) over a dataset, in its order (inference
    mode; ``drpipe predict`` is training.predict)."""
    ys, ps = [], []
    for x, y in ds:
        ps.append(np.asarray(model(x, training=False), np.float32))
        ys.append(np.asarray(y))
    if not ys:
        return np.zeros(0), np.zeros((0, N_GRADES if task == "grade" else 1))
    return np.concatenate(ys), np.concatenate(ps)


def scores(task: str, y, out, thresholds=None) -> dict:
    """Metrics for a task from targets and outputs (y = grade for grade/regression,
    0/1 for referable)."""
    decided = M.decide(task, out, thresholds)
    if task == "grade":
        return M.grade_metrics(y.astype(int), decided)
    if task == "referable":
        r = M.referable_metrics(np.where(y > 0.5, REFERABLE_MIN_GRADE, 0), out[:, 0])
        # kappa on the binary decision, so "best by kappa" means the same for every task
        r["quadratic_kappa"] = M.quadratic_kappa((y > 0.5).astype(int), decided, n=2)
        return r
    cuts = thresholds or M.DEFAULT_CUTS
    r = M.grade_metrics(y.astype(int), decided)
    r["thresholds"] = list(cuts)
    r["mse"] = float(np.mean((out[:, 0] - y) ** 2)) if len(y) else 0.0
    return r


def _all_layers(layer):
    for sub in getattr(layer, "layers", []):
        yield sub
        yield from _all_layers(sub)


class BatchNormRecompute:
    """Replace the moving statistics of the trainable BatchNormalization layers by the
    population statistics of training batches, as the weights are now ("precise BN",
    Wu & Johnson 2021).

    The moving averages trail the weights: on the synthetic test sets a model whose
    training-mode predictions scored validation kappa 0.90 scored 0.14 in inference mode
    after its last epoch, and 0.88 after this recomputation. The batches run through the
    model from its normalisation layer on, so the augmentation layers are skipped: the
    statistics are those of photos as inference sees them. Frozen layers keep theirs.
    One instance per model: its traced step is reused epoch after epoch.
    """

    def __init__(self, model):
        import keras

        self.bns = [layer for layer in _all_layers(model)
                    if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]
        try:
            self.body = keras.Model(model.get_layer("normalize").input, model.output)
        except ValueError:
            self.body = model
        self.step = None

    def _trace(self):
        import tensorflow as tf

        bns, body = self.bns, self.body

        @tf.function
        def step(x):
            body(x, training=True)  # momentum 0: moving stats := this batch's stats
            return ([tf.identity(bn.moving_mean) for bn in bns],
                    [tf.identity(bn.moving_variance) for bn in bns])

        return step

    def __call__(self, dataset, batches: int) -> int:
        """Recompute from up to ``batches`` batches of ``dataset``; the number of layers
        updated."""
        import tensorflow as tf

        if not self.bns or batches <= 0:
            return 0
        momenta = [bn.momentum for bn in self.bns]
        for bn in self.bns:
            bn.momentum = 0.0  # read when the step is traced (the first time, here)
        try:
            self.step = self.step or self._trace()
            n_total = 0
            s1 = [0.0] * len(self.bns)  # per layer: sum of n * batch mean
            s2 = [0.0] * len(self.bns)  # per layer: sum of n * (batch variance + mean^2)
            for x, _ in dataset.take(batches):
                means, variances = self.step(x)
                n = int(tf.shape(x)[0])
                for i, (mean, var) in enumerate(zip(means, variances, strict=True)):
                    mean = np.asarray(mean, np.float64)
                    s1[i] = s1[i] + n * mean
                    s2[i] = s2[i] + n * (np.asarray(var, np.float64) + mean**2)
                n_total += n
            if n_total == 0:
                return 0
            for bn, t1, t2 in zip(self.bns, s1, s2, strict=True):
                mean = t1 / n_total
                bn.moving_mean.assign(mean.astype(np.float32))
                # E[x^2] - E[x]^2 over all photos: the mean within-batch variance plus the
                # variance of the batch means
                bn.moving_variance.assign(np.maximum(t2 / n_total - mean**2, 0)
                                          .astype(np.float32))
        finally:
            for bn, m in zip(self.bns, momenta, strict=True):
                bn.momentum = m
        return len(self.bns)


def recompute_batchnorm(model, dataset, batches: int) -> int:
    """:class:`BatchNormRecompute` once; the number of BatchNorm layers updated."""
    return BatchNormRecompute(model)(dataset, batches)


def validation_logs(task: str, y: np.ndarray, out: np.ndarray) -> dict:
    """Validation loss and the compiled metrics, from predictions (no class weights, as
    Keras' own validation)."""
    eps = 1e-7
    if len(y) == 0:
        return {}
    if task == "grade":
        p = np.clip(out[np.arange(len(y)), y.astype(int)], eps, 1.0)
        return {"val_loss": float(-np.log(p).mean()),
                "val_accuracy": float((out.argmax(axis=1) == y).mean())}
    if task == "referable":
        p = np.clip(out[:, 0], eps, 1 - eps)
        return {"val_loss": float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()),
                "val_accuracy": float(((p >= 0.5) == (y > 0.5)).mean()),
                "val_auc": M.roc_auc(y > 0.5, p)}
    return {"val_loss": float(np.mean((out[:, 0] - y) ** 2)),
            "val_mae": float(np.mean(np.abs(out[:, 0] - y)))}


def _atomic_backup(backup_dir: Path):
    """Resume state that survives SIGKILL at any instant.

    Keras' BackupAndRestore overwrites one weights file in place: a kill during that write
    leaves a file that cannot be loaded, and the run cannot resume (tests caught it). Here
    each epoch's state — weights with the optimizer's variables, and the epoch — goes into a
    new directory, then ``latest.json`` is replaced atomically to point at it; older states
    are deleted only after that.
    """
    import keras

    class AtomicBackupAndRestore(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            pointer = backup_dir / "latest.json"
            if not pointer.exists():
                return
            state = json.loads(pointer.read_text())
            if self.model.optimizer is not None and not self.model.optimizer.built:
                self.model.optimizer.build(self.model.trainable_variables)
            self.model.load_weights(backup_dir / state["dir"] / "state.weights.h5")
            self.model._initial_epoch = state["epoch"]  # as Keras' own callback does

        def on_epoch_end(self, epoch, logs=None):
            name = f"epoch-{epoch + 1:04d}"
            d = backup_dir / name
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            self.model.save_weights(d / "state.weights.h5")
            atomic_write_bytes(backup_dir / "latest.json",
                               json.dumps({"epoch": epoch + 1, "dir": name}).encode())
            for old in backup_dir.glob("epoch-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)

    return AtomicBackupAndRestore()


def _callbacks(cfg, run: Path, val_ds, bn_ds, phase: int, n_train: int):
    import keras

    # at most one pass over the split, and never more batches than an epoch trains on
    # (forward only: at most about a third of the epoch's cost)
    bn_batches = min(cfg.precise_bn, math.ceil(n_train / cfg.batch_size),
                     cfg.steps_per_epoch or cfg.precise_bn)

    class PreciseBatchNorm(keras.callbacks.Callback):
        recompute = None

        def on_epoch_end(self, epoch, logs=None):
            if bn_ds is not None:
                self.recompute = self.recompute or BatchNormRecompute(self.model)
                self.recompute(bn_ds, bn_batches)

    class Validation(keras.callbacks.Callback):
        """Validation each epoch, after the BatchNorm statistics are recomputed (Keras'
        own validation runs before any callback): loss, the compiled metrics, and quadratic
        weighted kappa (logs['val_kappa']) — accuracy hid a model predicting only grade 0
        in the reference works."""

        def on_epoch_end(self, epoch, logs=None):
            y, out = model_outputs(self.model, val_ds, cfg.task)
            logs.update(validation_logs(cfg.task, y, out))
            logs["val_kappa"] = scores(cfg.task, y, out)["quadratic_kappa"]

    class EveryN(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0:
                self.model.save(run / "checkpoints" / f"epoch-{epoch + 1:03d}.keras")

    cbs = [PreciseBatchNorm(), Validation(),
           keras.callbacks.ModelCheckpoint(run / "checkpoints/best.keras", monitor="val_kappa",
                                           mode="max", save_best_only=True),
           EveryN(),
           keras.callbacks.CSVLogger(str(run / "history.csv"), append=True),
           keras.callbacks.TensorBoard(str(run / "logs"), write_graph=False),
           _atomic_backup(run / f"backup/phase{phase}")]
    if cfg.patience:
        cbs.append(keras.callbacks.EarlyStopping("val_kappa", mode="max",
                                                 patience=cfg.patience))
    return cbs


def train(cfg: TrainConfig, resume: bool = False, log=print) -> dict:
    """Train (or continue) the run in ``cfg.out``; returns the validation metrics."""
    # Check what can be checked before importing TensorFlow (seconds, and log noise).
    counts = runs.dataset_info(cfg.data)["counts"]
    for split in (cfg.train_split, cfg.val_split):
        if split not in counts:
            raise TrainError(f"{cfg.data} has no split {split!r}")
    run = Path(cfg.out)
    if resume:
        runs.read_config(run)  # "not a drpipe run" without config.json
        if runs.is_finished(run):
            raise TrainError(f"{run}: already finished ({runs.MODEL} exists)")
        runs.check_data(run, cfg.data)  # the shards it started on, not re-made ones
    elif run.exists() and any(run.iterdir()):
        raise TrainError(f"{run} exists and is not empty; use --resume {run} to continue it, "
                         "or choose another --out")
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    if not resume:  # the options, and the identity of the shards it learns from
        runs.write_config(run, dataclasses.asdict(cfg), cfg.data)

    import keras

    from training.data import class_weights, make_dataset, split_counts  # TensorFlow
    from training.models import build, freeze

    keras.utils.set_random_seed(cfg.seed)
    strategy, devices = _setup_devices(cfg)
    log(f"devices: {devices['gpus']} GPU(s), mixed precision "
        f"{'on' if devices['mixed_precision'] else 'off'}, {devices['replicas']} replica(s)")

    counts = split_counts(cfg.data, cfg.train_split, cfg.min_score())
    n_train = sum(counts)
    if n_train == 0:
        raise TrainError(f"split {cfg.train_split!r} of {cfg.data} is empty"
                         + (f" at --min-quality {cfg.min_quality}" if cfg.min_quality else ""))
    if cfg.min_quality:
        log(f"--min-quality {cfg.min_quality}: {n_train} training photos reach it")
    steps = cfg.steps_per_epoch or max(1, math.ceil(n_train / cfg.batch_size))
    train_ds = make_dataset(cfg.data, cfg.train_split, image_size=cfg.image_size,
                            batch_size=cfg.batch_size, task=cfg.task, training=True,
                            balance=cfg.balance, target_distribution=cfg.target_distribution,
                            seed=cfg.seed, min_quality=cfg.min_score())
    val_ds = make_dataset(cfg.data, cfg.val_split, image_size=cfg.image_size,
                          batch_size=cfg.batch_size, task=cfg.task, min_quality=cfg.min_score())
    # Shuffled, with the split's own grade mix (not resampled): the photos inference sees.
    bn_ds = make_dataset(cfg.data, cfg.train_split, image_size=cfg.image_size,
                         batch_size=cfg.batch_size, task=cfg.task, training=True,
                         seed=cfg.seed + 1, min_quality=cfg.min_score()) if cfg.precise_bn else None
    weights = None
    if cfg.balance == "weights":
        cw = class_weights(counts)
        weights = cw if cfg.task == "grade" else None
        if cfg.task == "referable":
            pos = sum(counts[REFERABLE_MIN_GRADE:])
            weights = {0: n_train / (2 * max(n_train - pos, 1)), 1: n_train / (2 * max(pos, 1))}

    model = backbone = None
    phases = [(1, cfg.freeze, cfg.lr, 0, cfg.epochs)]
    if cfg.fine_tune_epochs:
        phases.append((2, "none", cfg.fine_tune_lr, cfg.epochs, cfg.total_epochs()))
    for phase, strategy_name, lr, first, last in phases:
        done_marker = run / f"phase{phase}.weights.h5"
        if done_marker.exists():
            continue
        with strategy.scope():
            model, backbone = build(_spec(cfg))
            if phase > 1:
                model.load_weights(run / f"phase{phase - 1}.weights.h5")
            freeze(model, backbone, strategy_name)
            _compile(model, cfg, lr)
        log(f"phase {phase}: epochs {first + 1}-{last}, freeze {strategy_name}, lr {lr:g}")
        model.fit(train_ds, epochs=last, initial_epoch=first,
                  steps_per_epoch=steps, class_weight=weights, shuffle=False,
                  callbacks=_callbacks(cfg, run, val_ds, bn_ds, phase, n_train), verbose=2)
        model.save_weights(done_marker)

    if model is None:  # killed after the last phase's weights, before model.keras
        phase, strategy_name, lr = phases[-1][:3]
        with strategy.scope():
            model, backbone = build(_spec(cfg))
            model.load_weights(run / f"phase{phase}.weights.h5")
            freeze(model, backbone, strategy_name)
            _compile(model, cfg, lr)
        log(f"phase {phase} had finished; writing the final model")
    model.save(runs.model_path(run))
    if backbone is not None:
        backbone.save_weights(run / "backbone.weights.h5")
    result = evaluate_model(model, cfg, cfg.val_split, run)
    runs.write_metrics(run, result)
    plot_history(run)
    for p in run.glob("phase*.weights.h5"):
        p.unlink()
    shutil.rmtree(run / "backup", ignore_errors=True)
    return result


def evaluate_model(model, cfg: TrainConfig, split: str, run: Path, data: str | None = None,
                   thresholds=None) -> dict:
    from training.data import make_dataset  # TensorFlow

    ds = make_dataset(data or cfg.data, split, image_size=cfg.image_size,
                      batch_size=cfg.batch_size, task=cfg.task, min_quality=cfg.min_score())
    y, out = model_outputs(model, ds, cfg.task)
    if cfg.task == "regression" and thresholds is None:
        thresholds = M.kappa_thresholds(y, out[:, 0]) if len(y) else None
    r = scores(cfg.task, y, out, thresholds)
    r.update(split=split, data=str(Path(data or cfg.data).resolve()), model=cfg.model,
             task=cfg.task, min_quality=cfg.min_quality)
    plot_confusion(r, run / f"confusion_{split}.png")
    return r


def evaluate(run: str | Path, data: str | None = None, split: str = "test",
             checkpoint: str = "final", min_quality: str | None = "run") -> dict:
    """``drpipe evaluate``: metrics of a finished run's model on any split. ``min_quality``:
    "run" (the run's own --min-quality), None (every photo) or usable / good / a score."""
    run = Path(run)
    cfg = load_config(run)
    if min_quality != "run":
        cfg = dataclasses.replace(cfg, min_quality=min_quality)
    own = data is None or Path(data).resolve() == Path(cfg.data).resolve()
    data_dir = cfg.data if data is None else data
    if split not in (names := runs.splits_of(data_dir)):  # a name, never a pattern
        raise TrainError(f"{data_dir} has no split {split!r} (has {', '.join(names)})")
    runs.check_data(run, data_dir, own=own)
    path = runs.require_model(run, checkpoint)
    import keras

    import training.models  # noqa: F401 - registers the custom layers for loading

    model = keras.saving.load_model(path)
    thresholds = runs.recorded_cuts(run) if cfg.task == "regression" else None
    r = evaluate_model(model, cfg, split, run, data, thresholds)
    runs.write_metrics(run, r, split)
    return r


