"""The model registry: from-scratch networks of the reference works and Keras Applications
backbones, with a configurable head, freeze strategies, and the three tasks.

Every model takes float images in [0, 255]. Its first layers are the augmentation (active
only in training, so on the GPU when there is one) and the backbone's own input
normalisation; both are serialisable layers, so ``model.keras`` carries them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
from keras import layers

from tfrecord_writer.schema import N_GRADES
from training import WeightsUnavailable  # noqa: F401 - re-exported

# ------------------------------------------------------------------ normalisation

_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN, _TORCH_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="drpipe")
class Normalize(layers.Layer):
    """The backbone's ImageNet input convention, from [0, 255] RGB.

    modes: "caffe" (BGR, mean subtracted: ResNet v1, VGG), "tf" ([-1, 1]: ResNet v2,
    MobileNetV2, Inception, Xception), "torch" ([0, 1], mean/std: DenseNet), "unit"
    ([0, 1]: from-scratch models), "raw" (the backbone normalises itself: EfficientNet).
    """

    def __init__(self, mode: str = "unit", **kw):
        super().__init__(**kw)
        if mode not in ("caffe", "tf", "torch", "unit", "raw"):
            raise ValueError(f"unknown normalisation {mode!r}")
        self.mode = mode

    def call(self, x):
        ops = keras.ops
        if self.mode == "caffe":
            return x[..., ::-1] - ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=x.dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_TORCH_MEAN, dtype=x.dtype)
            std = ops.convert_to_tensor(_TORCH_STD, dtype=x.dtype)
            return (x / 255.0 - mean) / std
        if self.mode == "unit":
            return x / 255.0
        return x

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


# ------------------------------------------------------------------ augmentation

AUGMENT_PRESETS = {
    "none": "",
    "flip": "flip",
    # The Pisa report: random flips H+V, zoom +-10 %, rotation by any angle, black fill.
    "pisa": "flip,rotate=180,zoom=0.1",
    # Zhong & Cao: rotation, shift, zoom, brightness, flip, shear.
    "full": "flip,rotate=180,zoom=0.1,shift=0.1,brightness=0.2,shear=0.1",
}


@keras.saving.register_keras_serializable(package="drpipe")
class RandomAffine(layers.Layer):
    """Flip, rotation, zoom, shift and shear as ONE random affine map per image.

    Keras' separate RandomFlip/RandomRotation/RandomZoom/... layers each resample the whole
    batch; composing the transforms into one matrix resamples once (bilinear), about 3x
    cheaper for the Pisa preset (benchmarks/bench_input.py) and without the blur of repeated
    interpolation. Uncovered areas are filled black. Active only with ``training=True``.
    """

    def __init__(self, flip=False, rotate=0.0, zoom=0.0, shift=0.0, shear=0.0, seed=None, **kw):
        super().__init__(**kw)
        self.flip, self.rotate, self.zoom = bool(flip), float(rotate), float(zoom)
        self.shift, self.shear, self.seed = float(shift), float(shear), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=False):
        if not training:
            return images
        ops = keras.ops
        shape = ops.shape(images)
        b, h, w = shape[0], shape[1], shape[2]
        dtype = "float32"

        def uniform(lo, hi):
            return keras.random.uniform((b,), lo, hi, dtype=dtype, seed=self.seed_generator)

        theta = uniform(-1.0, 1.0) * (self.rotate * np.pi / 180.0)
        z = uniform(1.0 - self.zoom, 1.0 + self.zoom)  # > 1: sample wider = zoom out
        sh = uniform(-self.shear, self.shear)
        fx = ops.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0) if self.flip else ops.ones((b,))
        fy = ops.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0) if self.flip else ops.ones((b,))
        wf, hf = ops.cast(w, dtype), ops.cast(h, dtype)
        tx, ty = uniform(-self.shift, self.shift) * wf, uniform(-self.shift, self.shift) * hf
        cos, sin = ops.cos(theta), ops.sin(theta)
        # output pixel p -> input pixel  R(theta) . Shear(sh) . diag(z fx, z fy) (p - c) + c + t
        m00, m01 = cos * z * fx, (cos * sh - sin) * z * fy
        m10, m11 = sin * z * fx, (sin * sh + cos) * z * fy
        cx, cy = (wf - 1.0) / 2.0, (hf - 1.0) / 2.0
        a2 = cx - m00 * cx - m01 * cy + tx
        b2 = cy - m10 * cx - m11 * cy + ty
        zero = ops.zeros((b,))
        transform = ops.stack([m00, m01, a2, m10, m11, b2, zero, zero], axis=1)
        out = ops.image.affine_transform(ops.cast(images, dtype), transform,
                                         interpolation="bilinear", fill_mode="constant",
                                         fill_value=0)
        return ops.cast(out, images.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "flip": self.flip, "rotate": self.rotate,
                "zoom": self.zoom, "shift": self.shift, "shear": self.shear, "seed": self.seed}


def augmentation_layers(spec: str, seed: int = 0) -> list[layers.Layer]:
    """Layers for a preset name or a spec like ``flip,rotate=180,zoom=0.1,shift=0.05,
    brightness=0.2,shear=0.1`` (rotate in degrees either way, others as fractions):
    one fused :class:`RandomAffine` for the geometry, RandomBrightness for the rest."""
    spec = AUGMENT_PRESETS.get(spec, spec)
    geometry: dict[str, float | bool] = {}
    brightness = None
    defaults = {"rotate": 180.0, "zoom": 0.1, "shift": 0.1, "shear": 0.1}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        try:
            v = float(value) if value else None
        except ValueError:
            raise ValueError(f"augmentation {part!r}: {value!r} is not a number") from None
        if name == "flip":
            geometry["flip"] = True
        elif name in defaults:
            geometry[name] = defaults[name] if v is None else v
        elif name == "brightness":
            brightness = 0.2 if v is None else v
        else:
            raise ValueError(f"unknown augmentation {name!r} (presets: "
                             f"{', '.join(AUGMENT_PRESETS)}; parts: flip, rotate=DEG, "
                             "zoom=F, shift=F, brightness=F, shear=F)")
    out: list[layers.Layer] = []
    if geometry:
        out.append(RandomAffine(**geometry, seed=seed, name="augment_affine"))
    if brightness:
        out.append(layers.RandomBrightness(brightness, value_range=(0, 255), seed=seed + 1,
                                           name="augment_brightness"))
    return out


# ------------------------------------------------------------------ backbones


# BatchNorm momentum of the from-scratch networks: Keras' 0.99 needs thousands of steps for
# the moving statistics to catch up (until then inference-mode predictions collapse to one
# grade while training-mode ones are right); 0.9 converges within a short run.
BN_MOMENTUM = 0.9


def _bn(name):
    return layers.BatchNormalization(momentum=BN_MOMENTUM, name=name)


def resnetv2_small(inputs, widths=(16, 32, 64)):
    """Zhong & Cao's network: 7x7 conv stride 2, BN, ReLU, 3x3 max-pool stride 2, then
    pre-activation residual blocks (stride 2) with 16, 32, 64 channels, BN-ReLU, GAP."""
    x = layers.Conv2D(widths[0], 7, strides=2, padding="same", use_bias=False,
                      name="stem_conv")(inputs)
    x = _bn("stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    for i, w in enumerate(widths):
        pre = layers.ReLU(name=f"block{i}_pre_relu")(
            _bn(f"block{i}_pre_bn")(x))
        shortcut = layers.Conv2D(w, 1, strides=2, name=f"block{i}_shortcut")(pre)
        y = layers.Conv2D(w, 3, strides=2, padding="same", use_bias=False,
                          name=f"block{i}_conv1")(pre)
        y = layers.ReLU(name=f"block{i}_relu")(_bn(f"block{i}_bn")(y))
        y = layers.Conv2D(w, 3, padding="same", name=f"block{i}_conv2")(y)
        x = layers.Add(name=f"block{i}_add")([shortcut, y])
    x = layers.ReLU(name="post_relu")(_bn("post_bn")(x))
    return layers.GlobalAveragePooling2D(name="avg_pool")(x)


def cnn_small(inputs, widths=(32, 64, 128, 256)):
    """The Pisa report's from-scratch CNN: conv-BN-ReLU-maxpool blocks, then GAP."""
    x = inputs
    for i, w in enumerate(widths):
        x = layers.Conv2D(w, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = layers.ReLU(name=f"relu{i}")(_bn(f"bn{i}")(x))
        x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    return layers.GlobalAveragePooling2D(name="avg_pool")(x)


@dataclass(frozen=True)
class Backbone:
    name: str
    normalize: str
    application: Callable | None = None  # keras.applications constructor
    scratch: Callable | None = None  # builder on an input tensor
    imagenet: bool = True


def _apps() -> dict[str, Backbone]:
    a = keras.applications
    reg = {
        "resnet50": (a.ResNet50, "caffe"), "resnet101": (a.ResNet101, "caffe"),
        "resnet152": (a.ResNet152, "caffe"), "resnet50v2": (a.ResNet50V2, "tf"),
        "resnet101v2": (a.ResNet101V2, "tf"), "resnet152v2": (a.ResNet152V2, "tf"),
        "vgg16": (a.VGG16, "caffe"), "mobilenetv2": (a.MobileNetV2, "tf"),
        "inceptionv3": (a.InceptionV3, "tf"), "densenet121": (a.DenseNet121, "torch"),
        "xception": (a.Xception, "tf"),
        "efficientnetv2b0": (a.EfficientNetV2B0, "raw"),
        "efficientnetv2s": (a.EfficientNetV2S, "raw"),
    }
    for k in range(8):
        reg[f"efficientnetb{k}"] = (getattr(a, f"EfficientNetB{k}"), "raw")
    return {n: Backbone(n, norm, application=ctor) for n, (ctor, norm) in reg.items()}


REGISTRY: dict[str, Backbone] = {
    "resnetv2-small": Backbone("resnetv2-small", "unit", scratch=resnetv2_small, imagenet=False),
    "cnn-small": Backbone("cnn-small", "unit", scratch=cnn_small, imagenet=False),
    **_apps(),
}
# Smallest input each application accepts (Keras checks it).
MIN_SIZE = {"inceptionv3": 75, "xception": 71}


# ------------------------------------------------------------------ assembly


@dataclass(frozen=True)
class ModelSpec:
    model: str = "resnetv2-small"
    image_size: int = 224
    task: str = "grade"
    head: tuple[int, ...] = ()
    dropout: float = 0.0
    l1: float = 0.0
    l2: float = 0.0
    weights: str = "none"  # none | imagenet | PATH
    augment: str = "none"
    seed: int = 0


def build(spec: ModelSpec) -> tuple[keras.Model, keras.Model | None]:
    """(model, backbone submodel — None for from-scratch networks)."""
    if spec.model not in REGISTRY:
        raise ValueError(f"unknown model {spec.model!r}; choose from {', '.join(REGISTRY)}")
    bb = REGISTRY[spec.model]
    if spec.image_size < MIN_SIZE.get(spec.model, 32):
        raise ValueError(f"{spec.model} needs --image-size >= {MIN_SIZE.get(spec.model, 32)}")
    inputs = keras.Input((spec.image_size, spec.image_size, 3), name="image")
    x = inputs
    for layer in augmentation_layers(spec.augment, spec.seed):
        x = layer(x)
    x = Normalize(bb.normalize, name="normalize")(x)
    backbone = None
    if bb.scratch:
        if spec.weights == "imagenet":
            raise WeightsUnavailable(f"{spec.model} is trained from scratch: no ImageNet "
                                     "weights exist (use --weights none or PATH)")
        features = bb.scratch(x)
    else:
        backbone = _application(bb, spec)
        features = backbone(x)
    reg = keras.regularizers.L1L2(spec.l1, spec.l2) if (spec.l1 or spec.l2) else None
    for i, units in enumerate(spec.head):
        features = layers.Dense(units, activation="relu", kernel_regularizer=reg,
                                name=f"head_dense{i}")(features)
        if spec.dropout:
            features = layers.Dropout(spec.dropout, name=f"head_dropout{i}")(features)
    if not spec.head and spec.dropout:
        features = layers.Dropout(spec.dropout, name="head_dropout")(features)
    # float32 outputs even under mixed precision: softmax/sigmoid in float16 lose precision
    if spec.task == "grade":
        out = layers.Dense(N_GRADES, activation="softmax", dtype="float32",
                           name="grade")(features)
    elif spec.task == "referable":
        out = layers.Dense(1, activation="sigmoid", dtype="float32", name="referable")(features)
    elif spec.task == "regression":
        out = layers.Dense(1, dtype="float32", name="grade_score")(features)
    else:
        raise ValueError(f"unknown task {spec.task!r}")
    model = keras.Model(inputs, out, name=f"drpipe_{spec.model.replace('-', '_')}")
    if spec.weights not in ("none", "imagenet"):
        load_backbone_weights(model, backbone, spec.weights)
    return model, backbone


def _application(bb: Backbone, spec: ModelSpec) -> keras.Model:
    shape = (spec.image_size, spec.image_size, 3)
    kw = {"include_top": False, "input_shape": shape, "pooling": "avg"}
    if bb.name.startswith("efficientnetv2"):
        kw["include_preprocessing"] = True  # v1 always rescales inside; v2 makes it optional
    weights = "imagenet" if spec.weights == "imagenet" else None
    try:
        net = bb.application(weights=weights, **kw)
    except Exception as e:  # noqa: BLE001 - urllib, HTTP and SSL errors all mean "offline"
        if weights == "imagenet":
            raise WeightsUnavailable(
                f"could not fetch ImageNet weights for {bb.name} ({type(e).__name__}: "
                f"{str(e)[:120]}); offline? Download the 'notop' weights file once and "
                "pass it with --weights PATH") from None
        raise
    net.name = "backbone"  # one name for every architecture: weights files line up
    return net


def load_backbone_weights(model: keras.Model, backbone: keras.Model | None, path: str) -> None:
    """Load weights from PATH: a run directory or its model.keras (all matching layers,
    e.g. to continue from another run), or a backbone weights file (.weights.h5 / .h5 —
    what drpipe saves as backbone.weights.h5, or Keras' ImageNet 'notop' files)."""
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        p = p / "model.keras"
    if not p.exists():
        raise FileNotFoundError(f"--weights {path}: no such file")
    if p.suffix == ".keras":
        source = keras.saving.load_model(p, compile=False)
        copied = 0
        mine = {layer.name: layer for layer in model.layers}
        for layer in source.layers:
            target = mine.get(layer.name)
            if target is not None and layer.weights and [w.shape for w in layer.weights] == [
                    w.shape for w in target.weights]:
                target.set_weights(layer.get_weights())
                copied += 1
        if not copied:
            raise ValueError(f"--weights {path}: no layer matches this model")
        return
    if backbone is None:
        raise ValueError(f"--weights {path}: a backbone weights file needs a Keras "
                         "Applications model; from-scratch models take a run or model.keras")
    backbone.load_weights(str(p))


def freeze(model: keras.Model, backbone: keras.Model | None, strategy: str) -> None:
    """Freeze strategies of Nyaupane & Sah and Barh: "all" (feature extraction: the whole
    backbone frozen), "none" (everything trains), "N%" (the first N % of the backbone's
    layers frozen, e.g. "50%" = half frozen), or a layer name (frozen up to and including
    it). From-scratch models have no backbone: their feature layers are frozen instead.
    BatchNormalization layers in the frozen part run in inference mode."""
    body = backbone.layers if backbone is not None else [
        layer for layer in model.layers if not layer.name.startswith(("head_", "grade",
                                                                        "referable"))]
    # Reset every layer one by one: in Keras 3, trainable=True on a functional backbone does
    # not reach sublayers that were set to False one by one before (a second phase after
    # "all" would silently train nothing but the head).
    for layer in [*model.layers, *body]:
        layer.trainable = True
    if strategy == "none":
        return
    if strategy == "all":
        n = len(body)
    elif m := re.fullmatch(r"(\d+(?:\.\d+)?)%", strategy):
        n = round(len(body) * float(m.group(1)) / 100)
    else:
        names = [layer.name for layer in body]
        if strategy not in names:
            raise ValueError(f"--freeze {strategy!r}: not all, none, N% or a layer name of "
                             f"the backbone (e.g. {names[len(names) // 2]})")
        n = names.index(strategy) + 1
    for layer in body[:n]:
        layer.trainable = False


def trainable_count(model: keras.Model) -> int:
    return int(sum(keras.ops.size(w) for w in model.trainable_weights))
