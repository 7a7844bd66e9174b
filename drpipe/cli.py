"""The ``drpipe`` command line: one command, one function; stages live in their packages.

Exit codes (documented in README.md):
  0  the command completed (rejected photos are listed, not failures)
  1  the run failed: a one-line reason on stderr
  2  usage error: a bad option, a missing input, the training stack not installed
  3  bad input data: a labels file or source layout that cannot be used as it is
  75 skipped: another run holds the output's lock (EX_TEMPFAIL; a scheduler retries later)
  130 interrupted (Ctrl-C), in any command: one line; the same command continues
"""

# Imports inside functions are only those that would slow every start (``drpipe --help``
# imports none of them): TensorFlow and the training stack; Dask and the job's pandas/pyarrow
# (pipeline.job, pipeline.preprocess, pipeline.remote_out); PIL (pipeline.preview); tqdm
# (importlib.metadata: ~70 ms). OpenCV and simplejpeg are loaded at start (pipeline.synth,
# the filters behind the shared options): ~0.25 s for drpipe --help, as before.

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import click

from drpipe import __version__
from drpipe.options import (
    config_option,
    local_file_or_url,
    local_paths_or_urls,
    min_quality_score,
    process_config,
    process_options,
    split_ratios,
    storage_option,
)
from drpipe.options import (
    load_config_file as _load_config_file,  # train's --config
)
from pipeline import outputs, storage
from pipeline.outputs import OutputRefused
from pipeline.quality import parse_min_quality
from pipeline.sources import LabelError, SourceError
from pipeline.split import NotAPlan, PlanWriteError, plan_split
from pipeline.synth import synth_dataset
from reporting.report import NoShards, ReportError, make_report
from tfrecord_writer.info import has_info
from training.tflogs import install as quiet_tf_logs

SPLIT_QUOTA_HELP = ("none: the stratified split alone (each split within a photo or two of "
                    "its share of each grade); floor: every split but the first gets exactly "
                    "floor(fraction x n) photos of each grade (n: the grade's photos), the "
                    "first the rest, by moving whole patients after the stratified split; "
                    "exit 3 when drpipe finds no patient-safe split that meets it (the "
                    "split and grade named; the message says when none can exist).")


def _no_quota_is_none(ctx, param, value):
    """--split-quota none is the split without quotas: None, as pipeline.split takes it."""
    return None if value == "none" else value


class DrpipeError(click.ClickException):
    """A user-facing failure: printed as one line, exit code 1, no traceback."""

    exit_code = 1

    def show(self, file=None):
        click.echo(f"drpipe: error: {self.format_message()}", err=True)


class MissingInputError(DrpipeError):
    """A missing input (--src, --data): one line, exit code 2, as a usage error."""

    exit_code = 2


def _need_shards(data) -> None:
    if not has_info(data):
        raise MissingInputError(f"{data}: no drpipe shards here (no dataset_info.json); run "
                                "drpipe preprocess first, or give --data")


class Busy(DrpipeError):
    """Another run holds the output's lock: this run is skipped, exit 75 (EX_TEMPFAIL)."""

    exit_code = 75


class InputDataError(DrpipeError):
    """Bad labels or an unknown source layout: one line, exit code 3."""

    exit_code = 3


class Interrupted(DrpipeError):
    """Ctrl-C (SIGINT): one line, exit code 130 (128 + SIGINT), as shells expect."""

    exit_code = 130


class RefusedError(DrpipeError):
    """An output that would replace or delete what drpipe did not create: one line, exit 2."""

    exit_code = 2


def _check_replaceable(target, what, kind, is_own, inputs=()) -> None:
    try:
        outputs.check_replaceable(target, what, kind, is_own, inputs)
    except outputs.OutputRefused as e:
        raise RefusedError(str(e)) from None


def _check_folder(out, what, kind, marker) -> None:
    try:
        outputs.check_folder(out, what, kind, marker)
    except outputs.OutputRefused as e:
        raise RefusedError(str(e)) from None


def _data_dir(ctx, param, value):
    """--data: a local folder as a Path; a store URL staged to the local cache first
    (TensorFlow has no s3:// filesystem)."""
    if value is None:
        return None
    if "://" not in str(value):
        return Path(value)
    from pipeline.job import JobError
    from pipeline.remote_out import NoShardsHere, stage_shards

    try:
        return stage_shards(str(value))
    except NoShardsHere as e:
        raise MissingInputError(str(e)) from None
    except JobError as e:
        raise DrpipeError(str(e)) from None
    except OSError as e:
        raise DrpipeError(f"{value}: {str(e).splitlines()[0] if str(e) else e}") from None


def _quality_spec(ctx, param, value):
    """train/evaluate --min-quality: checked here, kept as written (config.json records it)."""
    if value is None or value == "all" and "all" in (param.metavar or ""):
        return value
    try:
        parse_min_quality(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return str(value).strip().lower()


class _Commands(click.Group):
    """drpipe's group: Ctrl-C in any command is one line and exit 130 (click's own handler
    says "Aborted!" and exits 1). preprocess and train say more: how they resume."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            command = f"drpipe {ctx.invoked_subcommand}" if ctx.invoked_subcommand else "it"
            raise Interrupted(f"interrupted; nothing half-written is kept: run {command} "
                              "again") from None


@click.group(cls=_Commands,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="drpipe")
def main():
    """drpipe: retinal fundus photographs to clean, reproducible, sharded TensorFlow datasets.

    \b
    Typical use:
      drpipe synth --out raw                  # built-in demo data (Kaggle layout)
      drpipe preview raw/train --out preview  # check a configuration on a few photos
      drpipe preprocess --src raw --out shards
      drpipe train --data shards --out runs/first
      drpipe evaluate runs/first --split test
      drpipe predict runs/first --src new_photos/ --out preds.csv
      drpipe tune --lr 1e-3,1e-4 --batch-size 16,32 --out runs/tune
      drpipe ensemble runs/tune/*/ --method stack --split test
      drpipe export runs/first --format tflite --quantize int8
      drpipe report --run runs/first --out report.html

    Exit codes: 0 done (rejected photos are listed, not failures), 1 the run failed,
    2 usage error (or an --out drpipe may not write over), 3 bad input data (labels, source
    layout), 75 skipped (another run holds --out's lock; retry later), 130 interrupted
    (Ctrl-C; re-run to resume).

    TensorFlow's start-up logging (absl, oneDNN, CUDA probes) is hidden; DRPIPE_TF_LOGS=1
    shows it.
    """
    _need_training_stack(click.get_current_context().invoked_subcommand)


# Commands of the drpipe[train] extra (TensorFlow): without it they say what to install.
TRAIN_COMMANDS = {"train", "evaluate", "predict", "explain", "ensemble", "export", "tune"}


def _need_training_stack(command: str | None) -> None:
    """Before any work: one line and exit 2 if ``command`` needs TensorFlow and it is not
    installed (``pip install 'drpipe[train]'``)."""
    if command not in TRAIN_COMMANDS or {"-h", "--help"} & set(sys.argv):
        return
    try:
        found = importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        click.echo(f"drpipe: error: drpipe {command} needs the training stack (TensorFlow "
                   "is not installed): pip install 'drpipe[train]'", err=True)
        sys.exit(2)


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory to write train/*.jpeg and trainLabels.csv into.")
@click.option("--n", type=click.IntRange(2, 1_000_000), default=200, show_default=True,
              help="Number of photos (even: two eyes per patient).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def synth(out: Path, n: int, seed: int, quiet: bool):
    """Write a deterministic synthetic fundus dataset in the Kaggle/EyePACS layout.

    OUT must be new, empty, or an earlier synth's output (a folder holding anything else,
    e.g. a real dataset, is refused: exit 2).

    Discs on black with varied frame sizes, clipping, off-centre placement, exposure, notch
    markers, vessels, glare, and lesions whose number grows with the grade (0-4). The same
    --n and --seed always give the same bytes.
    """
    from tqdm import tqdm

    if n % 2:
        raise click.BadParameter(f"must be even (two eyes per patient), got {n}",
                                 param_hint="--n")
    try:
        with tqdm(total=n, unit="photo", desc="synth", disable=quiet or None) as bar:
            truth = synth_dataset(out, n=n, seed=seed, progress=bar.update)
    except OutputRefused as e:
        raise RefusedError(str(e)) from None
    counts = [sum(p.level == g for p in truth) for g in range(5)]
    click.echo(f"wrote {len(truth)} photos of {len(truth) // 2} patients to {out}/train, "
               f"labels in {out}/trainLabels.csv; grades 0-4: "
               + " / ".join(map(str, counts)))


@main.command()
@click.argument("src", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for {id}.jpeg outputs and contact_sheet.jpeg.")
@process_options
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Process at most this many photos (folders are read in name order).")
def preview(src, out, size, filter_, quality, clahe_clip, clahe_tiles, max_megapixels, min_side,
            limit, max_file_mb):
    """Process SRC photos (files or folders) in this process, for a quick visual check.

    Writes OUT/{id}.jpeg for each photo, a before/after OUT/contact_sheet.jpeg (original
    with the fitted retina circle | processed, captioned with the quality score and verdict
    that preprocess --min-quality would act on), and lists rejected files with their reasons.
    Nothing is written over an input or a file no preview wrote: OUT may not be (or lie in)
    a source folder (exit 2), and a name already taken (two photos with one stem, a file in
    OUT) gets the next free one, {id}~2.jpeg.
    """
    from tqdm import tqdm

    from pipeline.preview import NoPhotos
    from pipeline.preview import preview as run_preview

    cfg = process_config(size, filter_, quality, clahe_clip, clahe_tiles, max_megapixels,
                         min_side, max_file_mb)
    try:
        result = run_preview(src, out, cfg, limit, progress=lambda files: tqdm(
            files, unit="photo", desc="preview", disable=None))
    except NoPhotos as e:
        raise click.UsageError(str(e)) from None
    except OutputRefused as e:
        raise RefusedError(str(e)) from None
    for line in result.lines():
        click.echo(line)


@main.command()
@config_option
@click.option("--src", type=click.Path(), metavar="PATH|URL", default="raw", show_default=True,
              help="Source directory: Kaggle (train/ + trainLabels.csv, test/ + "
                   "retinopathy_solution.csv), APTOS (train.csv + train_images/), folders "
                   "0/..4/, or any folder with --labels; Kaggle's archive volumes "
                   "(train.zip.001... and test.zip.001..., labels beside them as .csv or "
                   ".csv.zip) or one .zip, read in place; or any of these in an object store "
                   "(s3://bucket/raw, gs://...).")
@click.option("--out", type=click.Path(file_okay=False), metavar="PATH|URL", default="shards",
              show_default=True, help="Output directory for shards, manifest, "
                                      "dataset_info.json; or a store URL (s3://bucket/shards): "
                                      "staged on this disk, each shard uploaded whole.")
@process_options
@click.option("--format", "fmt", type=click.Choice(["jpeg", "png"]), default="jpeg",
              show_default=True, help="Encoding of the processed photos in the records.")
@click.option("--split", "split_spec", default="train=0.8,val=0.1,test=0.1", show_default=True,
              help="Split names and fractions; patients are never divided between splits.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the split and of the record order in shards.")
@click.option("--split-quota", type=click.Choice(["none", "floor"]), default="none",
              show_default=True, help=SPLIT_QUOTA_HELP, callback=_no_quota_is_none)
@click.option("--shard-size", type=click.FloatRange(0.01), default=128.0, show_default=True,
              help="Target shard size in MB.")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="Worker processes of the local Dask cluster [default: all cores].")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Join an existing Dask cluster (e.g. tcp://10.0.0.5:8786) instead of "
                   "starting a local one; workers must see --src, or reach its store when "
                   "it is a URL.")
@click.option("--source", "source_kind", type=click.Choice(["kaggle", "aptos", "folders", "csv"]),
              default=None, help="Source layout [default: detected].")
@click.option("--labels", callback=local_file_or_url, metavar="FILE|URL", default=None,
              help="Labels CSV for any layout (photos matched by file name).")
@storage_option(expose=True)
@click.option("--id-col", default="image", show_default=True, help="--labels: image id column.")
@click.option("--label-col", default="level", show_default=True,
              help="--labels: grade (0-4) column.")
@click.option("--patient-col", default=None,
              help="--labels: patient id column [default: from {patient}_{left|right} names].")
@click.option("--limit", type=click.IntRange(1), default=None,
              help="A trial on the first N photos (in id order).")
@click.option("--follow-links", is_flag=True,
              help="Read photos through symlinks (of files or folders) that lead outside "
                   "--src [default: rejected outside_source].")
@click.option("--strict", is_flag=True, help="Fail (exit 1) if any photo is rejected.")
@click.option("--min-quality", callback=min_quality_score, default=None,
              metavar="usable|good|SCORE",
              help="Reject photos whose gradability score (docs/QUALITY.md) is under this, as "
                   "ungradable, with the measures in the reason [default: record the quality, "
                   "reject nothing for it].")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing output made with another configuration.")
@click.option("--quiet", is_flag=True, help="No progress bar and no summary on stdout.")
@click.option("--summary-json", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the run summary as JSON here (an existing file only if it "
                   "is an earlier drpipe summary; else exit 2).")
def preprocess(src, out, size, filter_, quality, clahe_clip, clahe_tiles, max_megapixels,
               min_side, fmt, split_spec, seed, shard_size, workers, scheduler, source_kind,
               labels, id_col, label_col, patient_col, limit, strict, min_quality, overwrite,
               quiet, summary_json, storage_options, max_file_mb, follow_links, split_quota):
    """Verify, crop, resize and filter every photo in parallel on Dask, split patients
    safely, and write sharded TFRecords with a manifest that accounts for every photo.

    Re-running resumes an interrupted run (same bytes as an uninterrupted one) and is a
    no-op on a finished one. Re-running on a grown or changed source commits a new dataset
    version: only new, replaced and relabelled photos are processed, earlier shards stay as
    they are, no patient changes split (versions/, docs/FORMAT.md "Versions"). Off a terminal
    (cron, systemd): no progress bar, a one-line summary; every run appends a JSON line to
    OUT/history.jsonl; exit 75 when another run holds OUT's lock.

    Outputs: {split}-{i:05d}-of-{n:05d}.tfrecord,
    data_manifest.csv, manifest.parquet, drpipe_info.json, and the TensorFlow Datasets
    files (features.json; dataset_info.json, written last), so that
    tfds.builder_from_directory opens the output (docs/FORMAT.md).
    """
    from tqdm import tqdm

    from pipeline.job import JobConfig, JobError, LockHeld, RunOptions
    from pipeline.preprocess import SUMMARY_KEYS, short_summary, summary_lines
    from pipeline.preprocess import preprocess as run_preprocess

    storage.configure(storage_options)
    ratios = split_ratios(split_spec)
    # Before --out is created: a typo leaves nothing behind. (A store URL is checked when
    # listed; a file may be one .zip.)
    if not storage.is_url(src) and not Path(src).exists():
        raise MissingInputError(f"--src {src}: no such directory")
    if summary_json:
        _check_replaceable(summary_json, "--summary-json", "a drpipe summary JSON",
                           outputs.json_has_keys(SUMMARY_KEYS),
                           [p for p in (src, labels) if p and not storage.is_url(p)])
    cfg = JobConfig(src=str(src), out=str(out),
                    process=process_config(size, filter_, quality, clahe_clip, clahe_tiles,
                                           max_megapixels, min_side, max_file_mb, fmt,
                                           min_quality),
                    split=ratios, seed=seed, shard_size_mb=shard_size,
                    source_kind=source_kind, labels=str(labels) if labels else None,
                    id_col=id_col, label_col=label_col, patient_col=patient_col, limit=limit,
                    follow_links=follow_links,
                    split_quota=split_quota)
    opts = RunOptions(workers=workers, scheduler=scheduler, strict=strict,
                      overwrite=overwrite, quiet=quiet)
    terminal = sys.stdout.isatty()  # a scheduler's log: no bar, a one-line summary

    def bar(total, initial):
        return tqdm(total=total, initial=initial, unit="photo", desc="preprocess",
                    disable=True if quiet or not terminal else None, smoothing=0.1)

    def show(summary):
        for line in (summary_lines if terminal else short_summary)(summary, out):
            click.echo(line)

    try:
        run_preprocess(cfg, opts, summary_json, progress_factory=bar,
                       show=None if quiet else show)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; what was committed to {out} is kept (re-run the "
                          "same command to resume)") from None
    except LockHeld as e:
        raise Busy(f"skipped: {e}") from None
    except (LabelError, SourceError) as e:
        raise InputDataError(str(e)) from None
    except JobError as e:
        raise DrpipeError(str(e)) from None


@main.command()
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, multiple=True,
              help="Labels CSV (e.g. Kaggle trainLabels.csv); repeatable: a Kaggle source with "
                   "test/ is split on trainLabels.csv and retinopathy_solution.csv together.")
@click.option("--id-col", default="image", show_default=True, help="Image id column.")
@click.option("--label-col", default="level", show_default=True, help="Grade (0-4) column.")
@click.option("--patient-col", default=None,
              help="Patient id column [default: from {patient}_{left|right} names].")
@click.option("--split", "split_spec", default="train=0.8,val=0.1,test=0.1", show_default=True,
              help="Split names and fractions.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed.")
@click.option("--split-quota", type=click.Choice(["none", "floor"]), default="none",
              show_default=True, help=SPLIT_QUOTA_HELP, callback=_no_quota_is_none)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="CSV to write: image, patient_id, eye, label, split.")
@click.option("--previous", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="An earlier plan (drpipe split --out): its patients keep "
                                 "their split; only new patients are assigned.")
def split(labels, id_col, label_col, patient_col, split_spec, seed, out, previous,
          split_quota):
    """Plan a patient-safe stratified split from a labels file alone (no photos needed).

    Uses the same code as preprocess: with the same labels, --split, --seed and
    --split-quota, the shards get exactly this split. With --previous, the plan of a grown
    labels file: as an incremental preprocess run, every earlier patient stays in its split
    and new patients are assigned from the current counts.
    """
    ratios = split_ratios(split_spec)
    try:
        plan = plan_split(labels, ratios, seed, out, id_col, label_col, patient_col, previous,
                          split_quota)
    except LabelError as e:
        raise InputDataError(str(e)) from None
    except NotAPlan as e:
        raise click.BadParameter(str(e), param_hint="--out") from None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--split") from None
    except PlanWriteError as e:
        raise DrpipeError(str(e)) from None
    for line in plan.lines():
        click.echo(line)


def _int_list(ctx, param, value):
    if value in (None, ""):
        return ()
    try:
        return tuple(int(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        raise click.BadParameter("expected comma-separated integers, e.g. 32,16") from None


@main.command()
@click.option("--config", type=click.Path(exists=True, dir_okay=False), callback=_load_config_file,
              is_eager=True, expose_value=False,
              help="TOML file with any of these options (keys as option names).")
@storage_option()
@click.option("--data", type=click.Path(file_okay=False), callback=_data_dir, metavar="DIR|URL",
              default="shards", show_default=True,
              help="Output of drpipe preprocess; a store URL (s3://...) is copied to the "
                   "local cache first, each shard verified by size and SHA-256.")
@click.option("--model", default="resnetv2-small", show_default=True,
              help="resnetv2-small, cnn-small, or a Keras Applications backbone (resnet50, "
                   "resnet50v2, ..., vgg16, mobilenetv2, inceptionv3, efficientnetb0-b7, "
                   "efficientnetv2b0/s, densenet121, xception).")
@click.option("--out", default=None, help="Run directory [default: runs/<timestamp>].")
@click.option("--resume", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Continue the run in this directory from its last epoch.")
@click.option("--image-size", type=click.IntRange(32, 2048), default=224, show_default=True)
@click.option("--epochs", type=click.IntRange(1), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Learning rate.")
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam",
              show_default=True)
@click.option("--task", type=click.Choice(["grade", "referable", "regression"]),
              default="grade", show_default=True,
              help="5-grade softmax, referable DR (grade >= 2) or regression on the grade.")
@click.option("--balance", type=click.Choice(["none", "weights", "resample"]), default="none",
              show_default=True, help="Class weights, or resampling to equal grades.")
@click.option("--augment", default="pisa", show_default=True,
              help="none, flip, pisa, full, or a spec: flip,rotate=180,zoom=0.1,shift=0.1,"
                   "brightness=0.2,shear=0.1.")
@click.option("--freeze", default="none", show_default=True,
              help="all, none, N% (of the backbone's layers, from the input) or a layer name.")
@click.option("--head", callback=_int_list, default="", help="Dense head units, e.g. 32,16.")
@click.option("--dropout", type=click.FloatRange(0, 0.95), default=0.0, show_default=True)
@click.option("--l1", type=click.FloatRange(0), default=0.0, show_default=True)
@click.option("--l2", type=click.FloatRange(0), default=0.0, show_default=True)
@click.option("--weights", default="none", show_default=True,
              help="none, imagenet (needs internet), or PATH: a run, a model.keras or a "
                   "backbone .weights.h5 file.")
@click.option("--fine-tune-epochs", type=click.IntRange(0), default=0, show_default=True,
              help="A second phase with everything unfrozen.")
@click.option("--fine-tune-lr", type=float, default=1e-5, show_default=True)
@click.option("--mixed-precision", type=click.Choice(["auto", "on", "off"]), default="auto",
              show_default=True, help="auto = on when a GPU is present.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps-per-epoch", type=click.IntRange(1), default=None,
              help="[default: one pass over the training split]")
@click.option("--checkpoint-every", type=click.IntRange(0), default=5, show_default=True)
@click.option("--patience", type=click.IntRange(0), default=0, show_default=True,
              help="Stop after this many epochs without a better validation kappa (0 = off).")
@click.option("--precise-bn", type=click.IntRange(0), default=100, show_default=True,
              help="After every epoch, recompute the BatchNorm statistics from this many "
                   "training batches (0 = off): the moving averages trail the weights, and "
                   "inference-mode predictions with them can be far worse.")
@click.option("--min-quality", callback=_quality_spec, default=None,
              metavar="usable|good|SCORE",
              help="Train and validate only on photos whose quality recorded in the shards "
                   "reaches this (docs/QUALITY.md); no preprocessing again [default: all].")
@click.option("--version", "data_version", type=click.IntRange(1), default=None,
              help="The dataset version of --data to train on [default: the latest]; the run "
                   "records it (its data is that version's folder), evaluate and predict "
                   "stay on it.")
def train(resume, data_version, **kw):
    """Train a grading model on the shards: tf.data into ResNetV2 or transfer learning.

    Writes a run directory: config.json, history.csv, TensorBoard logs, checkpoints (best by
    validation quadratic kappa, and every N epochs), model.keras, metrics.json, plots.
    A killed run continues with --resume RUN.
    """
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from training import WeightsUnavailable
    from training.fit import OptionError, metrics_line, new_config, resume_config
    from training.fit import train as run_training
    from training.runs import RunError

    ctx = click.get_current_context()
    try:
        if resume:  # the options given with it must agree with the run
            cfg = resume_config(resume, {k: v for k, v in kw.items() if ctx.get_parameter_source(
                k) not in (None, click.core.ParameterSource.DEFAULT)}, data_version)
        else:
            cfg = new_config(kw, data_version)
    except OptionError as e:
        if e.param:
            raise click.BadParameter(str(e), param_hint=e.param) from None
        raise click.UsageError(str(e)) from None
    except RunError as e:
        raise DrpipeError(str(e)) from None
    _need_shards(cfg.data)
    try:
        result = run_training(cfg, resume=bool(resume), log=click.echo)
    except KeyboardInterrupt:  # click would say "Aborted!" and exit 1
        raise Interrupted(f"interrupted; drpipe train --resume {cfg.out} continues from the "
                          "last epoch") from None
    except (RunError, WeightsUnavailable, FileNotFoundError, ValueError) as e:
        raise DrpipeError(str(e)) from None
    click.echo(metrics_line(result, cfg.out))


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@storage_option()
@click.option("--data", default=None, callback=_data_dir,
              help="Shards directory or store URL [default: the run's].")
@click.option("--split", default="test", show_default=True)
@click.option("--checkpoint", type=click.Choice(["final", "best"]), default="final",
              show_default=True, help="model.keras or the best-kappa checkpoint.")
@click.option("--min-quality", callback=_quality_spec, default=None,
              metavar="usable|good|SCORE|all",
              help="Evaluate only photos whose recorded quality reaches this; all = every "
                   "photo [default: the run's --min-quality].")
def evaluate(run, data, split, checkpoint, min_quality):
    """Metrics of a trained RUN on any split: accuracy, quadratic kappa, per-class
    precision/recall/F1, confusion matrix (AUC, sensitivity, specificity for referable).
    Writes RUN/metrics-SPLIT.json and RUN/confusion_SPLIT.png."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from training.fit import evaluate as run_eval
    from training.fit import metrics_line
    from training.runs import RunError

    try:
        r = run_eval(run, data, split, checkpoint,
                     "run" if min_quality is None else None if min_quality == "all"
                     else min_quality)
    except (RunError, FileNotFoundError) as e:
        raise DrpipeError(str(e)) from None
    click.echo(metrics_line(r, run))


def _local_csv(ctx, param, value):
    """predict --out: a local file (a store URL would be taken for a local path)."""
    if "://" in str(value):
        raise click.BadParameter(f"{value}: a local file (write it, then copy it to the "
                                 "store)", ctx, param)
    return Path(value)


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@storage_option()
@click.option("--src", "sources", multiple=True, required=True, callback=local_paths_or_urls,
              help="A photo or a folder of photos, or a store URL of either "
                   "(s3://bucket/photos); repeatable.")
@click.option("--out", callback=_local_csv, default="preds.csv", metavar="FILE",
              show_default=True, help="CSV: grade, per-grade and referable probabilities, "
                                      "rejected photos with their reasons (an existing file "
                                      "only if it is an earlier drpipe predictions CSV; else "
                                      "exit 2).")
@click.option("--checkpoint", type=click.Choice(["final", "best"]), default="final",
              show_default=True)
@click.option("--exported", type=click.Path(exists=True, path_type=Path), default=None,
              help="Run this model from drpipe export (SavedModel dir or .tflite) instead of "
                   "the run's Keras model, with the same preprocessing.")
def predict(run, sources, out, checkpoint, exported):
    """Grade raw photos with a trained RUN, preprocessed exactly as its training data was
    (settings recorded in the run's config.json at train time): no train/serve skew.

    RUN may also be the output of drpipe ensemble: each member grades with its own
    preprocessing and the ensemble combines them as it was fitted (--checkpoint and
    --exported are then the ensemble's)."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tqdm import tqdm

    from pipeline.sources import expand_photo_paths
    from training.ensemble import EnsembleError
    from training.predict import PRED_HEADER, check_predictor, write_csv
    from training.predict import predict as run_predict
    from training.runs import RunError, is_ensemble

    _check_replaceable(out, "--out", "a drpipe predictions CSV",  # before any model loads
                       outputs.csv_header_is(PRED_HEADER), sources)
    if exported and is_ensemble(run):
        raise click.UsageError("--exported applies to a run, not an ensemble")
    try:
        members = check_predictor(run, checkpoint, exported)
    except RunError as e:
        raise DrpipeError(str(e)) from None
    total = len(expand_photo_paths(sources))
    if not total:
        raise click.UsageError("no photos found in " + ", ".join(map(str, sources)))
    try:
        with tqdm(total=total * len(members), unit="photo", desc="predict",
                  disable=None) as bar:
            preds = run_predict(run, sources, checkpoint, progress=bar.update,
                                exported=exported)
    except (RunError, EnsembleError) as e:
        raise DrpipeError(str(e)) from None
    write_csv(preds, out)
    ok = [p for p in preds if p.status == "ok"]
    click.echo(f"{len(ok)} of {len(preds)} photos graded -> {out}")
    rejected = [p for p in preds if p.status != "ok"]
    if rejected:
        click.echo(f"rejected {len(rejected)}:")
        for p in rejected:
            click.echo(f"  {p.path}: {p.reason}")


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="A new .png (or .jpg) file for one photo (an existing file is never "
                   "replaced: exit 2), else a directory ({id}_gradcam.png each; photos "
                   "sharing a name, or a name taken by a file explain did not write, get "
                   "{id}~2_gradcam.png).")
@click.option("--class", "class_index", type=click.IntRange(0, 4), default=None,
              help="Grade to explain [default: the predicted one].")
def explain(run, images, out, class_index):
    """Grad-CAM heat maps: where in the processed photo the RUN's model saw the evidence
    for the predicted (or a chosen) grade. Each PNG: the photo | the heat map over it."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from training.explain import ExplainError, ExplainTargetRefused, explain_photos
    from training.runs import RunError

    try:
        results = explain_photos(run, images, out, class_index)
    except ExplainTargetRefused as e:
        raise RefusedError(str(e)) from None
    except (ExplainError, RunError) as e:
        raise DrpipeError(str(e)) from None
    for target, result in results:
        if isinstance(result, tuple):
            click.echo(f"{target}: grade {result[0]}")
        else:
            click.echo(f"{target}: rejected, {result}")


@main.command()
@click.argument("runs", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--method", type=click.Choice(["vote", "weighted-mean", "weighted", "stack", "mean"]),
              default="weighted-mean", show_default=True,
              help="vote: majority, ties to the best member; weighted-mean: validation-"
                   "accuracy-weighted average (mean: its earlier name); weighted: per-grade "
                   "F1-weighted average; stack: logistic regression fitted on validation "
                   "predictions.")
@storage_option()
@click.option("--data", default=None, callback=_data_dir,
              help="Shards directory or store URL [default: the first run's].")
@click.option("--split", default="test", show_default=True, help="Split to score.")
@click.option("--val-split", default=None,
              help="Split the weights / stacker are fitted on [default: the run's val].")
@click.option("--checkpoint", type=click.Choice(["final", "best"]), default="final",
              show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for ensemble.json and the confusion matrix: new, empty or an "
                   "earlier ensemble output (else exit 2) "
                   "[default: runs/ensemble-METHOD-<timestamp>].")
def ensemble(runs, method, data, split, val_split, checkpoint, out):
    """Combine trained grade models (RUNS) and score the combination beside each member,
    with the metrics of drpipe evaluate."""
    import os
    import time

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from training.ensemble import EnsembleError
    from training.ensemble import ensemble as run_ensemble
    from training.runs import RunError

    out = out or Path("runs") / f"ensemble-{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    _check_folder(out, "--out", "an earlier ensemble output", "ensemble.json")
    try:
        r = run_ensemble(list(runs), method, data, split, val_split, checkpoint, out,
                         log=click.echo)
    except (EnsembleError, RunError) as e:
        raise DrpipeError(str(e)) from None
    rows = [(f"ensemble ({method})", r["ensemble"])] + [
        (str(run), m) for run, m in zip(runs, r["members"], strict=True)]
    width = max(len(name) for name, _ in rows)
    click.echo(f"{split} (n={r['ensemble']['n']}):")
    click.echo(f"  {'':{width}}   kappa  accuracy  val kappa")
    for name, m in rows:
        val = f"{m['val_quadratic_kappa']:9.3f}" if "val_quadratic_kappa" in m else ""
        click.echo(f"  {name:{width}}  {m['quadratic_kappa']:6.3f}  {m['accuracy']:8.3f}  {val}")
    click.echo(f"-> {out}/ensemble.json")


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["savedmodel", "tflite"]),
              default="savedmodel", show_default=True,
              help="SavedModel (TF Serving) or TensorFlow Lite (LiteRT: phones, edge devices).")
@click.option("--quantize", type=click.Choice(["dynamic", "float16", "int8"]), default=None,
              is_flag=False, flag_value="dynamic",
              help="TFLite only. --quantize alone = dynamic (int8 weights); float16; int8 "
                   "(weights and activations, calibrated on training photos; the fastest "
                   "measured, and the one for MobileNetV2, where dynamic ran slower than "
                   "float: docs/BENCHMARKS.md).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="[default: RUN/export/FORMAT[-QUANT][.tflite]]")
@click.option("--checkpoint", type=click.Choice(["final", "best"]), default="final",
              show_default=True)
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True,
              help="LiteRT interpreter threads for the latency measurement.")
def export(run, fmt, quantize, out, checkpoint, threads):
    """A deployable model from a trained RUN, with its size and CPU latency per photo.

    Checks the export against the Keras model on photos of the run's validation split (same
    grades, largest output difference) and writes OUT's settings, preprocessing and those
    numbers to a .export.json beside it. Input: float32 [n, S, S, 3] RGB in [0, 255], the
    processed photo (drpipe predict makes it from a raw photo).

    An existing OUT is replaced only if it is an earlier export (anything else: exit 2).
    """
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from training.export import ExportError, ExportTargetRefused
    from training.export import export as run_export

    try:
        r = run_export(run, fmt, out, quantize, checkpoint, threads=threads, log=click.echo)
    except ExportTargetRefused as e:
        raise RefusedError(str(e)) from None
    except ExportError as e:
        raise DrpipeError(str(e)) from None
    click.echo(r.summary())
    if r.same_grade < r.checked_photos:
        click.echo(f"note: {r.checked_photos - r.same_grade} photo(s) graded differently "
                   "(quantisation moves outputs near a decision boundary)")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@storage_option()
@click.option("--data", type=click.Path(file_okay=False), callback=_data_dir, metavar="DIR|URL",
              default="shards", show_default=True,
              help="Output of drpipe preprocess; a store URL (s3://...) is copied to the "
                   "local cache first, each shard verified by size and SHA-256.")
@click.option("--lr", "lrs", default="1e-3,1e-4", show_default=True,
              help="Learning rates to try (comma-separated; '' = not a grid axis).")
@click.option("--batch-size", "batch_sizes", default="16,32", show_default=True,
              help="Batch sizes to try (comma-separated; '' = not a grid axis).")
@click.option("--grid", "grids", multiple=True, metavar="OPTION=V1,V2,...",
              help="Any other drpipe train option as a grid axis (repeatable), e.g. "
                   "--grid model=resnetv2-small,cnn-small --grid augment=pisa,full; values "
                   "that hold commas separated by ';': --grid 'head=16;32,16'.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Tuning directory [default: runs/tune-<timestamp>]; repeat the command with "
                   "the same --out to continue an interrupted tuning. A non-empty folder "
                   "that is not a tuning directory (no tune.json) is refused (exit 2).")
@click.argument("train_args", nargs=-1, type=click.UNPROCESSED)
def tune(data, lrs, batch_sizes, grids, out, train_args):
    """A grid over learning rate x batch size (Zhong & Cao) or any drpipe train options:
    one complete run per point, and a summary sorted by validation kappa.

    Other drpipe train options are passed to every point, e.g.

    \b
      drpipe tune --lr 1e-3,3e-4 --batch-size 16,32 --model resnetv2-small --epochs 20
      drpipe tune --lr '' --batch-size '' --grid data=shards-graham,shards-clahe --grid seed=1,2

    Writes OUT/summary.csv, OUT/tune.png, one run directory and one log per point.
    """
    from tqdm import tqdm

    from training.runs import RunError
    from training.tune import TuneError, TuneUsageError, prepare, ranking
    from training.tune import tune as run_tune

    if out is not None:  # before anything else: its files are not drpipe's to replace
        _check_folder(out, "--out", "a tuning directory", "tune.json")

    def options_of(args: list[str]) -> dict:  # drpipe train's parser, for each point
        try:
            params = train.make_context("drpipe train", args).params
        except click.ClickException as e:
            raise TuneError(e.format_message()) from None
        params.pop("resume", None)
        return params

    try:
        tuning = prepare(data, lrs, batch_sizes, grids, train_args, out, options_of)
    except TuneUsageError as e:
        raise click.UsageError(str(e)) from None
    except RunError as e:
        raise MissingInputError(str(e)) from None
    except TuneError as e:
        raise DrpipeError(str(e)) from None
    out = tuning.out
    click.echo(tuning.describe())
    try:
        with tqdm(total=len(tuning.points), unit="run", desc="tune", disable=None) as bar:
            ranked = run_tune(tuning, progress=bar.update, log=tqdm.write)
    except TuneError as e:
        raise DrpipeError(str(e)) from None
    for line in ranking(ranked):
        click.echo(line)
    click.echo(f"-> {out}/summary.csv, {out}/tune.png")
    failed = [p for p in ranked if p.status != "done"]
    if failed:
        raise DrpipeError(f"{len(failed)} of {len(ranked)} points failed (logs in {out})")


@main.command()
@storage_option()
@click.option("--data", type=click.Path(file_okay=False), callback=_data_dir, default=None,
              help="Shards (output of drpipe preprocess; a store URL is copied to the local "
                   "cache first) [default: the first run's, else "
                   "./shards].")
@click.option("--run", "runs", multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A training run to include (repeatable).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default="report.html",
              show_default=True, help="The page; an existing file only if it is an earlier "
                                      "drpipe report (else exit 2).")
@click.option("--examples", type=click.IntRange(0, 64), default=8, show_default=True,
              help="Processed example photos per grade.")
def report(data, runs, out, examples):
    """One self-contained HTML page: preprocessing settings, grades per split, rejection
    reasons, processed examples per grade, and for each --run its training curves,
    confusion matrix, kappa and per-grade scores. Opens offline; nothing to fetch."""
    _check_replaceable(out, "--out", "a drpipe report", outputs.text_starts_with(
        "<title>drpipe report"), [*runs, data] if data else runs)
    try:
        made = make_report(data, runs, out, per_grade=examples)
    except NoShards as e:
        raise MissingInputError(str(e)) from None
    except ReportError as e:
        raise DrpipeError(str(e)) from None
    click.echo(made.summary())


# Modules of the drpipe[train] extra: a command that needs one says what to install (exit 2).
TRAIN_MODULES = {"tensorflow", "keras", "tensorboard", "ai_edge_litert", "tf_keras"}


def run() -> None:
    """Entry point with a last-resort guard: a bug prints one line, not a traceback
    (DRPIPE_DEBUG=1 shows it)."""
    quiet_tf_logs()  # TensorFlow's native start-up lines hidden unless DRPIPE_TF_LOGS=1
    try:
        main(standalone_mode=True)
    except Exception as e:  # noqa: BLE001
        if os.environ.get("DRPIPE_DEBUG"):
            raise
        if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] in TRAIN_MODULES:
            command = next((a for a in sys.argv[1:] if not a.startswith("-")), "this command")
            click.echo(f"drpipe: error: drpipe {command} needs the training stack (no module "
                       f"{e.name!r}): pip install 'drpipe[train]'", err=True)
            sys.exit(2)
        store = _store_failure(e)
        if store:
            click.echo(f"drpipe: error: {store[0]}", err=True)
            sys.exit(store[1])
        click.echo(f"drpipe: internal error: {type(e).__name__}: {e} "
                   "(set DRPIPE_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)


STORE_PACKAGES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "adlfs", "fsspec")


def _store_failure(e: Exception) -> tuple[str, int] | None:
    """A failure raised inside an object store's client (an endpoint that does not answer,
    options it cannot take): one line and an exit code, else None."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    if not (type(e).__module__.split(".")[0] in STORE_PACKAGES or any(
            f"{os.sep}{p}{os.sep}" in f.filename for f in frames for p in STORE_PACKAGES)):
        return None
    what = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if storage.OPTIONS and isinstance(e, (TypeError, AttributeError, ValueError, KeyError)):
        return (f"the store does not accept these --storage-option values ({what})", 2)
    return (f"the object store cannot be used ({what}); check the URL, the endpoint, "
            "--storage-option and the credentials", 1)
