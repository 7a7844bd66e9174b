"""tf.data over drpipe shards: parallel interleave, parse (the writer's schema), decode,
resize, label for the task, balance, shuffle, batch, prefetch.

Images leave this pipeline as float32 in [0, 255], unnormalised: normalisation and
augmentation are layers at the front of the model (:mod:`training.models`), so they run on
the accelerator when there is one and travel with the saved model — ``predict`` cannot
normalise differently from training.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipeline.encode import encode
from pipeline.process import ProcessConfig, Rejection, prepare_or_reject, read_photo
from tfrecord_writer.info import load_info
from tfrecord_writer.schema import N_GRADES, REFERABLE_MIN_GRADE, tf_feature_spec
from training.config import EQUAL  # noqa: F401 - the default target distribution

AUTOTUNE = tf.data.AUTOTUNE
TASKS = ("grade", "referable", "regression")


def shard_files(data_dir: str | Path, split: str) -> list[str]:
    try:  # the shards drpipe lists (a versioned output holds shards of earlier versions too)
        listed = load_info(data_dir)["splits"][split]["shards"]
        if listed:
            return [str(Path(data_dir) / f["name"]) for f in listed]
    except (OSError, KeyError, TypeError, ValueError):
        pass
    files = sorted(str(p) for p in Path(data_dir).glob(f"{split}-*-of-*.tfrecord"))
    if not files:
        raise FileNotFoundError(f"no shards for split {split!r} in {data_dir} "
                                f"(expected {split}-00000-of-NNNNN.tfrecord)")
    return files


def split_counts(data_dir: str | Path, split: str,
                 min_quality: float | None = None) -> list[int]:
    """Photos per grade in a split, from drpipe_info.json (no pass over the data); with
    ``min_quality``, of the photos whose recorded quality score reaches it (manifest)."""
    if min_quality is not None:
        return quality_counts(data_dir, split, min_quality)
    info = load_info(data_dir)
    return list(info["counts"][split])


def quality_counts(data_dir: str | Path, split: str, min_quality: float) -> list[int]:
    """Photos per grade in ``split`` scoring at least ``min_quality``, from the manifest the
    shards were written with; compared in float32, as the filter on the shards compares."""
    path = Path(data_dir) / "data_manifest.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "quality_score" not in rows[0]:
        raise ValueError(f"{data_dir}: these shards have no recorded quality (preprocessed by "
                         "an older drpipe); re-run drpipe preprocess to use --min-quality")
    counts = [0] * N_GRADES
    bar = np.float32(min_quality)
    for r in rows:
        if r["status"] == "ok" and r["split"] == split and r["quality_score"] and \
                np.float32(r["quality_score"]) >= bar:
            counts[int(r["label"])] += 1
    return counts


def target_for(task: str, grade: tf.Tensor) -> tf.Tensor:
    if task == "grade":
        return grade
    if task == "referable":
        return tf.cast(grade >= REFERABLE_MIN_GRADE, tf.float32)
    if task == "regression":
        return tf.cast(grade, tf.float32)
    raise ValueError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")


def stored_image(data_dir: str | Path) -> tuple[int, str]:
    """(side in pixels, "jpeg" | "png") of the images in the shards (drpipe_info.json)."""
    info = load_info(data_dir)
    proc = info["config"]["process"]
    return int(proc["size"]), str(proc["format"])


def dct_ratio(stored: int, image_size: int) -> int:
    """The largest JPEG DCT reduction (1, 2, 4, 8) keeping the image >= image_size: 512 px
    records decode straight to 256 px for 224 px training, at a fraction of the cost."""
    for r in (8, 4, 2):
        if stored // r >= image_size:
            return r
    return 1


def image_decoder(stored: int, fmt: str, image_size: int):
    """The function turning a record's encoded image into the model's input: float32
    [S, S, 3] in 0..255. Training, evaluation and ``drpipe predict`` all use it, so a photo
    reaches the model the same way whichever command it came through."""
    ratio = dct_ratio(stored, image_size) if fmt == "jpeg" else 1
    decoded = stored // ratio

    def decode(encoded):
        if fmt == "jpeg":
            img = tf.io.decode_jpeg(encoded, channels=3, ratio=ratio)
        else:
            img = tf.io.decode_png(encoded, channels=3)
        img.set_shape([None, None, 3])
        if decoded != image_size:
            # Bilinear reads 2x2 neighbours: no aliasing while shrinking by under 1.25x (256
            # -> 224 after a ratio-2 decode), and 20 % cheaper per photo than area here.
            method = "bilinear" if decoded < 1.25 * image_size else "area"
            img = tf.image.resize(img, [image_size, image_size], method=method)
        return tf.cast(img, tf.float32)
    return decode


def photo_input(proc: ProcessConfig, image_size: int, with_quality: bool = False):
    """The function turning a photo file into the model's input as its training photos
    reached it: the same ``pipeline.process`` steps (``proc``, the run's recorded
    preprocessing), encoded as the records were, decoded by :func:`image_decoder`. It
    returns float32 [S, S, 3] in 0..255 (with ``with_quality``: and the photo's measured
    pipeline.quality.Quality), or the Rejection of a photo that cannot be processed.
    ``drpipe predict`` and ``drpipe explain`` both use it."""
    decode = image_decoder(proc.size, proc.format, image_size)

    def to_input(path: str | Path):
        data = read_photo(path)
        result = data if isinstance(data, Rejection) else prepare_or_reject(data, proc)
        if isinstance(result, Rejection):
            return result
        x = decode(tf.constant(encode(result.image, proc.format, proc.quality))).numpy()
        return (x, result.quality) if with_quality else x
    return to_input


def _parse(data_dir, image_size: int):
    spec = tf_feature_spec()
    decode = image_decoder(*stored_image(data_dir), image_size)

    def parse(serialized):
        ex = tf.io.parse_single_example(serialized, spec)
        return decode(ex["image/encoded"]), ex["image/class/label"]
    return parse


def make_dataset(data_dir: str | Path, split: str, *, image_size: int, batch_size: int,
                 task: str = "grade", training: bool = False, balance: str = "none",
                 target_distribution=EQUAL, seed: int = 0,
                 shuffle_buffer: int = 1024,
                 min_quality: float | None = None) -> tf.data.Dataset:
    """(images [B, S, S, 3] float32 0..255, targets) batches from a split's shards.

    Args:
      balance: "none", "weights" (the caller passes class weights to fit; the data is
        unchanged) or "resample" (draw grades in ``target_distribution`` from per-grade
        streams — no records duplicated on disk).
      min_quality: keep only records whose recorded ``image/quality/score`` reaches it
        (``drpipe train --min-quality``); shards need not be written again.
    """
    files = shard_files(data_dir, split)
    parse = _parse(data_dir, image_size)
    opts = tf.data.Options()
    opts.deterministic = not training  # evaluation order must match the labels read back

    ds = tf.data.Dataset.from_tensor_slices(files)
    if training:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 8),
                       num_parallel_calls=AUTOTUNE, deterministic=not training)
    if min_quality is not None:
        quality_spec = {"image/quality/score": tf_feature_spec()["image/quality/score"]}
        bar = tf.constant(min_quality, tf.float32)
        ds = ds.filter(lambda s: tf.io.parse_single_example(
            s, quality_spec)["image/quality/score"] >= bar)
    # Shuffle and resample serialised records (~75 KB each), before decoding: a buffer of
    # decoded images costs hundreds of MB and decodes the data several times over before
    # the first batch.
    if training and balance == "resample":
        label_spec = {"image/class/label": tf_feature_spec()["image/class/label"]}

        def grade(s):
            return tf.io.parse_single_example(s, label_spec)["image/class/label"]

        counts = split_counts(data_dir, split, min_quality)
        if task == "referable" and tuple(target_distribution) == EQUAL:
            target_distribution = referable_balance(counts)
        present = [k for k, n in enumerate(counts) if n > 0]
        per_grade = [ds.filter(lambda s, k=k: tf.equal(grade(s), k)).repeat()
                     .shuffle(max(64, shuffle_buffer // 5), seed=seed + k) for k in present]
        ds = tf.data.Dataset.sample_from_datasets(
            per_grade, weights=[float(target_distribution[k]) for k in present], seed=seed)
    elif training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.map(parse, num_parallel_calls=AUTOTUNE, deterministic=not training)
    ds = ds.map(lambda img, g: (img, target_for(task, g)), num_parallel_calls=AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=False)
    return ds.with_options(opts).prefetch(AUTOTUNE)


def referable_balance(counts: list[int]) -> tuple[float, ...]:
    """Grade distribution for resampling the binary referable task: half non-referable,
    half referable, each half in its own grade mix — up-sampling the minority class (Zhong
    & Cao) rather than equal grades, which would make 3/5 of the stream referable."""
    neg = sum(counts[:REFERABLE_MIN_GRADE])
    pos = sum(counts[REFERABLE_MIN_GRADE:])
    total = neg + pos
    if not neg or not pos:  # one class only: nothing to balance
        return tuple(n / total for n in counts) if total else EQUAL
    return tuple(0.5 * n / (neg if k < REFERABLE_MIN_GRADE else pos)
                 for k, n in enumerate(counts))


def class_weights(counts: list[int]) -> dict[int, float]:
    """Inverse-frequency weights, mean 1 over the samples (Keras ``class_weight``)."""
    total = sum(counts)
    present = [k for k, n in enumerate(counts) if n]
    return {k: total / (len(present) * counts[k]) for k in present}
