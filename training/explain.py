"""``drpipe explain``: Grad-CAM heat maps over the processed photo.

Grad-CAM (Selvaraju et al. 2017): the gradient of the class score with respect to the last
convolutional feature map, averaged over space, weights the map's channels; their ReLU'd
sum, upsampled, says where the evidence for that class is. Works for the from-scratch
networks and for Keras Applications backbones (whose last convolution sits inside the
nested backbone model).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from pipeline.outputs import foreign_names, record_names, unique_names
from pipeline.process import Rejection
from pipeline.sources import expand_photo_paths
from tfrecord_writer.writer import atomic_write_bytes
from training import runs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
RECORD = ".drpipe-explain.json"  # the names earlier explains wrote in a folder --out


class ExplainError(RuntimeError):
    """A one-line reason (a write that failed, an --out that cannot be used)."""


class ExplainTargetRefused(ExplainError):
    """--out is an existing image file: never replaced (exit 2)."""


def plan_targets(files, out: Path) -> list[Path]:
    """Where each photo's panel goes. ``out`` with an image suffix is one file (one photo
    only); otherwise a folder, ``{stem}_gradcam.png`` each, never two alike, never over a
    file no explain wrote there."""
    out = Path(out)
    if out.suffix.lower() in IMAGE_SUFFIXES:
        if len(files) != 1:
            raise ExplainError(f"--out {out} is one image file, but {len(files)} photos were "
                               "given; give a folder")
        if out.is_dir():
            raise ExplainError(f"--out {out} is a folder; name a new file or a folder")
        return [out]
    if out.exists() and not out.is_dir():
        raise ExplainError(f"--out {out} is a file; give a folder (or a .png name for one "
                           "photo)")
    names = unique_names(files, "{stem}_gradcam.png", reserved=foreign_names(out, RECORD))
    return [out / n for n in names]


def write_panel(target: Path, panel_rgb: np.ndarray) -> None:
    """Encode (by the suffix) and write, checked: a failure is an ExplainError naming it."""
    ext = ".png" if target.suffix.lower() not in IMAGE_SUFFIXES else target.suffix.lower()
    ok, buf = cv2.imencode(ext, cv2.cvtColor(panel_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ExplainError(f"cannot encode {target}")
    try:
        atomic_write_bytes(target, buf.tobytes())
    except OSError as e:
        raise ExplainError(f"cannot write {target}: {e.strerror or e}") from None


def _last_4d_layer(layers) -> str:
    for layer in reversed(layers):
        shape = getattr(layer, "output", None)
        if shape is not None and len(layer.output.shape) == 4:
            return layer.name
    raise ValueError("no convolutional feature map in this model")


def grad_cam(model, image: np.ndarray, class_index: int | None = None
             ) -> tuple[np.ndarray, int, np.ndarray]:
    """(heat map in [0, 1] at the image's size, the class explained, model output).

    ``image``: float32 [S, S, 3] in 0..255, as the model takes it. For one-output models
    (referable, regression) the explained score is that output.
    """
    import keras
    import tensorflow as tf

    names = [layer.name for layer in model.layers]
    x = tf.convert_to_tensor(image[None], tf.float32)
    if "backbone" in names:
        bb = model.get_layer("backbone")
        i = names.index("backbone")
        conv = bb.get_layer(_last_4d_layer(bb.layers))
        inner = keras.Model(bb.inputs, [conv.output, bb.output])
        before, after = model.layers[1:i], model.layers[i + 1:]
    else:
        i = names.index(_last_4d_layer(model.layers))
        inner = keras.Model(model.inputs, [model.layers[i].output])
        before, after = [], model.layers[i + 1:]
    with tf.GradientTape() as tape:
        h = x
        for layer in before:
            h = layer(h, training=False)
        if "backbone" in names:
            fmap, h = inner(h, training=False)
        else:
            fmap = h = inner(h, training=False)
        for layer in after:
            h = layer(h, training=False)
        y = h
        if y.shape[-1] > 1:
            idx = int(tf.argmax(y[0])) if class_index is None else int(class_index)
        else:
            idx = 0
        score = y[:, idx]
    grads = tape.gradient(score, fmap)
    weights = tf.reduce_mean(grads, axis=(1, 2))  # per channel
    cam = tf.nn.relu(tf.reduce_sum(fmap * weights[:, None, None, :], axis=-1))[0].numpy()
    cam = cam / cam.max() if cam.max() > 0 else cam
    cam = cv2.resize(cam.astype(np.float32), image.shape[1::-1], interpolation=cv2.INTER_CUBIC)
    return np.clip(cam, 0, 1), idx, np.asarray(y[0])


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The heat map (JET: blue = none, red = most) blended over the RGB photo."""
    heat = cv2.applyColorMap((cam * 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(image.astype(np.uint8), 1 - alpha, heat, alpha, 0)


def check_explain(run: Path, images, out: Path) -> tuple[list[Path], list[Path]]:
    """(the photos, where each panel goes), once ``run`` can grade photos (a final model, its
    preprocessing) and ``out`` can be written (RunError, ExplainError)."""
    runs.require_model(run)
    if out.suffix.lower() in IMAGE_SUFFIXES and os.path.lexists(out):
        raise ExplainTargetRefused(f"--out {out} exists; explain never replaces a file (move it "
                                   "away, or give a folder: the next free name is used there)")
    runs.check_servable(run)
    files = expand_photo_paths(images)
    return files, plan_targets(files, out)


def explain_photos(run: str | Path, images, out: str | Path,
                   class_index: int | None = None) -> list[tuple[str, object]]:
    """Write one PNG per photo (photo | heat map overlay). Returns [(path, result)], the
    result being (class, output) or the Rejection of a photo that cannot be processed."""
    run, out = Path(run), Path(out)
    files, targets = check_explain(run, images, out)  # before TensorFlow loads (seconds)

    import keras  # deferred: TensorFlow

    import training.models  # noqa: F401 - registers the custom layers
    from training.data import photo_input

    cfg = runs.load_config(run)
    to_input = photo_input(runs.process_config(run, cfg.data), cfg.image_size)  # as trained
    model = keras.saving.load_model(runs.model_path(run))
    single = targets == [out]
    if not single:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ExplainError(f"cannot create {out}: {e.strerror or e}") from None
    done = []
    for path, target in zip(files, targets, strict=True):
        img = to_input(path)
        if isinstance(img, Rejection):
            done.append((str(path), img))
            continue
        cam, idx, y = grad_cam(model, img, class_index)
        panel = np.hstack([img.astype(np.uint8), overlay(img, cam)])
        label = (f"grade {idx}: p={y[idx]:.2f}" if len(y) > 1 else f"output {y[0]:.2f}")
        cv2.putText(panel, label, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1,
                    cv2.LINE_AA)
        if not single:
            record_names(out, RECORD, [target.name])
        write_panel(target, panel)
        done.append((str(target), (idx, y)))
    return done
