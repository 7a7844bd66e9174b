"""Training input pipeline, no model: drpipe shards vs keras.utils.image_dataset_from_directory.

    python benchmarks/bench_input.py [--copies 8] [--image-size 224] [--rounds 3]

The 31 EyePACS sample photos (linked under ``--copies`` sets of ids, in a temporary
directory) go through ``drpipe preprocess`` at 512 px into one split. The very same
processed JPEG bytes are then written as files, one folder per grade, for
``image_dataset_from_directory``. Both pipelines decode, resize to ``--image-size``,
augment with the Pisa preset (random flips, rotation by any angle, zoom +-10 %, black fill),
batch (32) and prefetch; photos/s over ``--passes`` passes (steady state), median over
rounds, the two alternating.

Each side as its users would run it: drpipe's reader (DCT-scaled decode of the records,
its fused RandomAffine), against image_dataset_from_directory followed by the Keras
layers a Keras user writes for that augmentation (RandomFlip, RandomRotation,
RandomZoom). ``--same-augment`` gives both drpipe's augmentation, to separate the reader's
share of the difference from the augmentation's.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's packages
from benchmarks._common import (  # noqa: E402
    SAMPLE,
    arguments,
    command_line,
    linked_source,
    preprocess,
    report,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--sample", default=str(SAMPLE))
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--passes", type=int, default=4,
                    help="passes over the photos per measurement (steady state, not start-up)")
    ap.add_argument("--same-augment", action="store_true",
                    help="give both pipelines drpipe's augmentation")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = linked_source(Path(args.sample).resolve(), args.copies, tmp / "raw")
        preprocess(tmp / "raw", tmp / "shards", "--split", "train=1")
        files_dir = _export_files(tmp / "shards", tmp / "files")
        result = _measure(tmp / "shards", files_dir, n, args)
    result["command"] = command_line()
    report(result, args.json)


def _export_files(shards: Path, out: Path) -> Path:
    """The records' JPEG bytes as files in grade folders (what a Keras user would have)."""
    import tensorflow as tf

    from tfrecord_writer.schema import tf_feature_spec

    spec = tf_feature_spec()
    for shard in sorted(shards.glob("*.tfrecord")):
        for raw in tf.data.TFRecordDataset(str(shard)):
            ex = tf.io.parse_single_example(raw, spec)
            d = out / str(int(ex["image/class/label"]))
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{ex['image/id'].numpy().decode()}.jpeg").write_bytes(
                ex["image/encoded"].numpy())
    return out


def _measure(shards: Path, files: Path, n: int, args) -> dict:
    import keras
    import tensorflow as tf

    from training.data import make_dataset
    from training.models import augmentation_layers

    ours = keras.Sequential(augmentation_layers("pisa", seed=0))
    fill = {"fill_mode": "constant", "fill_value": 0.0}
    theirs = ours if args.same_augment else keras.Sequential([
        keras.layers.RandomFlip("horizontal_and_vertical", seed=0),
        keras.layers.RandomRotation(0.5, seed=1, **fill),
        keras.layers.RandomZoom((-0.1, 0.1), seed=2, **fill)])

    def aug(x, y):
        return ours(x, training=True), y

    def keras_aug(x, y):
        return theirs(x, training=True), y

    steps = -(-n // args.batch_size)

    def drpipe_ds():
        return make_dataset(shards, "train", image_size=args.image_size,
                            batch_size=args.batch_size, training=True, seed=0).map(
            aug, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE).take(
            steps * args.passes)

    def keras_ds():
        ds = keras.utils.image_dataset_from_directory(
            files, image_size=(args.image_size, args.image_size), batch_size=args.batch_size,
            shuffle=True, seed=0, interpolation="area", verbose=False)
        return ds.repeat(args.passes).map(keras_aug, num_parallel_calls=tf.data.AUTOTUNE).prefetch(
            tf.data.AUTOTUNE)

    def epoch(ds) -> float:
        t = time.perf_counter()
        count = 0
        for x, _ in ds:
            count += int(x.shape[0])
        return count / (time.perf_counter() - t)

    contenders = {"drpipe_shards": drpipe_ds, "image_dataset_from_directory": keras_ds}
    for make in contenders.values():
        epoch(make())  # warm-up: tracing, file cache
    rates: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(args.rounds):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name in order:
            rates[name].append(epoch(contenders[name]()))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in rates.items()),
              file=sys.stderr)
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratios = [a / b for a, b in zip(rates["drpipe_shards"],
                                    rates["image_dataset_from_directory"], strict=True)]
    return {
        "photos": n, "image_size": args.image_size, "batch_size": args.batch_size,
        "stored_size": 512, "rounds": args.rounds, "passes": args.passes,
        "same_augment": args.same_augment,
        "photos_per_s": {k: round(v, 1) for k, v in med.items()},
        "drpipe_over_keras": round(med["drpipe_shards"] / med["image_dataset_from_directory"],
                                   2),
        # each round's pair ran back to back: the fairest view on a noisy machine
        "per_round_ratio": {
            "median": round(statistics.median(ratios), 2), "min": round(min(ratios), 2),
            "max": round(max(ratios), 2)},
    }


if __name__ == "__main__":
    main()
