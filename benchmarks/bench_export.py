"""Deployment: size and CPU latency per photo of drpipe export's formats against the Keras
model they come from, on one core.

    python benchmarks/bench_export.py [--models resnet50v2,mobilenetv2,resnetv2-small]

The 31 EyePACS sample photos are preprocessed at 256 px (split train=0.5,val=0.5); for each
model a run is trained for one step at 224 px (weights none: latency and size do not depend
on the weights' values; the agreement column then compares an untrained model's nearly
uniform outputs, a harder case for quantisation than a trained model), then exported as a
SavedModel and as TFLite in float32, dynamic-range, float16 and int8. Latency: batch of one,
median of --repeats calls after 3 warm-ups, every side on ONE thread (TensorFlow's intra-
and inter-op pools are set to 1 here; the LiteRT interpreter gets num_threads=1).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's packages
from benchmarks._common import DRPIPE, SAMPLE, arguments, preprocess, report  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

FORMATS = [("savedmodel", None), ("tflite", None), ("tflite", "dynamic"),
           ("tflite", "float16"), ("tflite", "int8")]


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--sample", default=str(SAMPLE))
    ap.add_argument("--models", default="resnet50v2,mobilenetv2,resnetv2-small")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from training.export import export

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        preprocess(args.sample, tmp / "shards", "--size", 256, "--split", "train=0.5,val=0.5",
                   "--workers", 1)
        for model in args.models.split(","):
            run = tmp / model
            subprocess.run([DRPIPE, "train", "--data", str(tmp / "shards"), "--model", model,
                            "--image-size", str(args.image_size), "--epochs", "1",
                            "--steps-per-epoch", "1", "--batch-size", "4", "--out", str(run)],
                           check=True, capture_output=True)
            for fmt, quant in FORMATS:
                r = export(run, fmt, quantize=quant, repeats=args.repeats, threads=1,
                           log=lambda *a: None)
                row = {"model": model, "format": fmt, "quantize": quant, "bytes": r.bytes,
                       "keras_bytes": r.keras_bytes, "latency_ms": r.latency_ms_median,
                       "latency_p90_ms": r.latency_ms_p90,
                       "keras_latency_ms": r.keras_latency_ms_median,
                       "same_grade": f"{r.same_grade}/{r.checked_photos}",
                       "max_abs_diff": r.max_abs_diff}
                results.append(row)
                print(f"{model:15s} {fmt:10s} {quant or '-':8s} {r.bytes / 1e6:8.2f} MB "
                      f"(keras {r.keras_bytes / 1e6:6.2f})  {r.latency_ms_median:8.2f} ms "
                      f"(keras {r.keras_latency_ms_median:7.2f})  same grade "
                      f"{r.same_grade}/{r.checked_photos}  max diff {r.max_abs_diff:.2g}",
                      flush=True)
    out = {"command": "python " + " ".join(sys.argv), "image_size": args.image_size,
           "threads": 1, "repeats": args.repeats, "results": results}
    report(out, args.json, echo=False)


if __name__ == "__main__":
    main()
