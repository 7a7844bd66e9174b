"""The model registry: builds, trains a step, freezes as documented, loads weights."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras")

from training.models import (  # noqa: E402
    MIN_SIZE,
    REGISTRY,
    ModelSpec,
    WeightsUnavailable,
    augmentation_layers,
    build,
    freeze,
    trainable_count,
)

QUICK = ["resnetv2-small", "cnn-small", "mobilenetv2", "resnet50v2", "efficientnetb0"]


def _one_step(name, task="grade", size=None):
    size = size or max(64, MIN_SIZE.get(name, 32))
    model, _ = build(ModelSpec(model=name, image_size=size, task=task, head=(8,),
                               augment="full"))
    loss = {"grade": "sparse_categorical_crossentropy", "referable": "binary_crossentropy",
            "regression": "mse"}[task]
    model.compile(keras.optimizers.Adam(1e-3), loss)
    x = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype("float32")
    y = np.array([0, 3]) if task == "grade" else np.array([0.0, 1.0])
    before = [w.copy() for w in model.get_weights()]
    loss = float(model.train_on_batch(x, y))
    assert np.isfinite(loss)
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights(),
                                                       strict=True))
    # BatchNorm statistics recomputed through the backbone (nested models too)
    import tensorflow as tf

    from training.fit import recompute_batchnorm

    bns = [layer for layer in model._flatten_layers()
           if isinstance(layer, keras.layers.BatchNormalization)]
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(2)
    assert recompute_batchnorm(model, ds, 1) == len(bns)
    out = np.asarray(model(x, training=False))
    assert out.shape == ((2, 5) if task == "grade" else (2, 1))
    assert np.isfinite(out).all()
    return model


@pytest.mark.parametrize("name", QUICK)
def test_representative_models_train_a_step(name):
    _one_step(name)


@pytest.mark.slow
@pytest.mark.registry  # 18 large models, minutes each: not in CI's run (.ci/run)
@pytest.mark.parametrize("name", [n for n in REGISTRY if n not in QUICK])
def test_every_registry_model_trains_a_step(name):
    # One process per model: TensorFlow keeps what 18 large models allocated (15 GB of the
    # machine's 24 at the end of the slow run, and minutes of teardown); exit returns it.
    import subprocess
    import sys
    from pathlib import Path

    code = ("import os; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'; "
            "from tests.training.test_models import _one_step; import sys; "
            "_one_step(sys.argv[1])")
    r = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[2], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("task", ["referable", "regression"])
def test_tasks(task):
    _one_step("resnetv2-small", task)


def test_cli_model_names_match_the_registry():
    from training import MODEL_NAMES

    assert set(MODEL_NAMES) == set(REGISTRY)


def test_registry_covers_the_reference_works():
    for name in ["resnet50", "resnet101", "resnet152", "resnet50v2", "resnet101v2",
                 "resnet152v2", "vgg16", "mobilenetv2", "inceptionv3", "densenet121",
                 "xception", "efficientnetv2b0"] + [f"efficientnetb{k}" for k in range(8)]:
        assert name in REGISTRY


def test_freeze_strategies_trainable_counts():
    model, backbone = build(ModelSpec(model="resnet50", image_size=64, head=(32, 16)))
    head_params = (2048 * 32 + 32) + (32 * 16 + 16) + (16 * 5 + 5)
    freeze(model, backbone, "none")
    everything = trainable_count(model)
    assert everything == trainable_count(backbone) + head_params
    freeze(model, backbone, "all")
    assert trainable_count(model) == head_params  # feature extraction: head only
    freeze(model, backbone, "50%")
    half = trainable_count(model)
    assert head_params < half < everything
    frozen = backbone.layers[: round(len(backbone.layers) / 2)]
    assert all(not layer.trainable for layer in frozen)
    assert all(layer.trainable for layer in backbone.layers[len(frozen):])
    freeze(model, backbone, "conv4_block6_out")
    names = [layer.name for layer in backbone.layers]
    cut = names.index("conv4_block6_out")
    assert not backbone.layers[cut].trainable and backbone.layers[cut + 1].trainable
    # only conv5 (and its BN) plus the head train: the Keras count for conv5_* layers
    conv5 = sum(int(np.prod(w.shape)) for layer in backbone.layers[cut + 1:]
                for w in layer.trainable_weights)
    assert trainable_count(model) == conv5 + head_params
    with pytest.raises(ValueError, match="not all, none, N%"):
        freeze(model, backbone, "no_such_layer")


def test_backbone_weights_file_loads_into_a_new_model(tmp_path):
    a, bb_a = build(ModelSpec(model="mobilenetv2", image_size=64))
    rng = np.random.default_rng(0)
    bb_a.set_weights([rng.normal(size=w.shape).astype("float32") for w in bb_a.get_weights()])
    path = tmp_path / "backbone.weights.h5"
    bb_a.save_weights(path)
    b, bb_b = build(ModelSpec(model="mobilenetv2", image_size=64, weights=str(path)))
    for wa, wb in zip(bb_a.get_weights(), bb_b.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
    _, bb_c = build(ModelSpec(model="mobilenetv2", image_size=64))  # no weights given
    # the same backbone layout, and none of its arrays is the file's
    assert all(not np.array_equal(x, y) for x, y in zip(bb_a.get_weights(), bb_c.get_weights(),
                                                        strict=True))


def test_model_keras_round_trip_keeps_normalisation(tmp_path):
    model, _ = build(ModelSpec(model="resnet50", image_size=48, augment="pisa"))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    x = np.random.default_rng(3).uniform(0, 255, (2, 48, 48, 3)).astype("float32")
    np.testing.assert_allclose(model(x, training=False), loaded(x, training=False), atol=1e-5)
    assert loaded.get_layer("normalize").mode == "caffe"


def test_imagenet_weights_unavailable_offline_is_explained(monkeypatch):
    import keras.src.utils.file_utils as fu

    def offline(*a, **k):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(fu, "get_file", offline)
    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(WeightsUnavailable, match="--weights PATH"):
        build(ModelSpec(model="mobilenetv2", image_size=96, weights="imagenet"))
    with pytest.raises(WeightsUnavailable, match="from scratch"):
        build(ModelSpec(model="resnetv2-small", weights="imagenet"))


def test_augmentation_specs():
    assert augmentation_layers("none") == []
    assert [type(la).__name__ for la in augmentation_layers("full")] == [
        "RandomAffine", "RandomBrightness"]
    (affine,) = augmentation_layers("flip,rotate=90")
    assert (affine.flip, affine.rotate, affine.zoom) == (True, 90.0, 0.0)
    with pytest.raises(ValueError, match="unknown augmentation 'blur'"):
        augmentation_layers("flip,blur=2")
    x = np.full((1, 64, 64, 3), 200.0, "float32")
    rot = keras.Sequential(augmentation_layers("rotate=45"))
    out = np.asarray(rot(x, training=True))
    assert out.min() == 0.0  # uncovered corners are filled black


def _disc_batch(n=6, size=64):
    import cv2

    x = np.zeros((n, size, size, 3), "float32")
    for i in range(n):
        img = np.zeros((size, size, 3), np.uint8)
        cv2.circle(img, (size // 2, size // 2), size // 3, (200, 120, 60), -1)
        cv2.rectangle(img, (8, 8), (20, 14), (255, 255, 255), -1)  # asymmetric marker
        x[i] = img
    return x


def test_random_affine_identity_and_flips_are_exact():
    from training.models import RandomAffine

    x = _disc_batch()
    ident = RandomAffine(seed=1)(x, training=True)
    np.testing.assert_allclose(ident, x, atol=1e-3)
    out = np.asarray(RandomAffine(flip=True, seed=2)(x, training=True))
    seen = set()
    for o, i in zip(out, x, strict=True):
        variants = {"id": i, "h": i[:, ::-1], "v": i[::-1], "hv": i[::-1, ::-1]}
        match = [k for k, v in variants.items() if np.abs(o - v).max() < 1e-3]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) >= 2  # random per image
    np.testing.assert_array_equal(RandomAffine(flip=True, rotate=90)(x, training=False), x)


def test_random_affine_zoom_and_rotation_geometry():
    from training.models import RandomAffine

    x = _disc_batch(n=16)
    area = (x.max(axis=3) > 0).sum(axis=(1, 2))
    zoomed = np.asarray(RandomAffine(zoom=0.3, seed=3)(x, training=True))
    ratio = (zoomed.max(axis=3) > 50).sum(axis=(1, 2)) / area
    assert ratio.min() > 1 / 1.3 ** 2 - 0.08 and ratio.max() < 1 / 0.7 ** 2 + 0.08
    assert ratio.std() > 0.05  # a different zoom per image
    rotated = np.asarray(RandomAffine(rotate=180, seed=4)(x, training=True))
    disc = rotated[:, 32 - 3:32 + 3, 32 - 3:32 + 3, 0]
    assert (disc > 150).all()  # rotation about the centre keeps the centred disc there
    assert not np.allclose(rotated[:, 8:14, 8:20], x[:, 8:14, 8:20])  # the marker moved
