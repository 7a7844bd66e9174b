"""The ``drpipe`` command line: one command, one function; stages live in their packages.

Exit codes (documented in README.md):
  0  the command completed (rejected photos are listed, not failures)
  1  the run failed: a one-line reason on stderr
  2  usage error: a bad option, a missing input
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from drpipe import __version__

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp"}


class DrpipeError(click.ClickException):
    """A user-facing failure: printed as one line, exit code 1, no traceback."""

    exit_code = 1

    def show(self, file=None):
        click.echo(f"drpipe: error: {self.format_message()}", err=True)


def _filter_option(f):
    from pipeline.filters import available

    return click.option(
        "--filter", "filter_", default="graham", show_default=True,
        help=f"Contrast filter: {', '.join(available())}, or several joined by '+' "
             "(e.g. graham+clahe), applied left to right.")(f)


def _process_options(f):
    f = click.option("--clahe-tiles", type=click.IntRange(1, 64), default=8, show_default=True,
                      help="CLAHE tile grid (N x N).")(f)
    f = click.option("--clahe-clip", type=click.FloatRange(0.1, 100), default=2.0,
                     show_default=True, help="CLAHE clip limit.")(f)
    f = click.option("--quality", type=click.IntRange(1, 100), default=95, show_default=True,
                     help="JPEG quality of the processed photos.")(f)
    f = _filter_option(f)
    f = click.option("--size", type=click.IntRange(32, 4096), default=512, show_default=True,
                     help="Side of the square output in pixels; the retina spans it.")(f)
    return f


def make_process_config(size, filter_, quality, clahe_clip, clahe_tiles, fmt="jpeg"):
    from pipeline.filters import FilterParams, get_filter
    from pipeline.process import ProcessConfig

    params = FilterParams(clahe_clip=clahe_clip, clahe_tiles=clahe_tiles)
    try:
        get_filter(filter_, params)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--filter") from None
    return ProcessConfig(size=size, filter=filter_, format=fmt, quality=quality,
                         filter_params=params)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="drpipe")
def main():
    """drpipe: retinal fundus photographs to clean, reproducible, sharded TensorFlow datasets.

    \b
    Typical use:
      drpipe synth --out raw                  # built-in demo data (Kaggle layout)
      drpipe preview raw/train --out preview  # check a configuration on a few photos
    """


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory to write train/*.jpeg and trainLabels.csv into.")
@click.option("--n", type=click.IntRange(2, 1_000_000), default=200, show_default=True,
              help="Number of photos (even: two eyes per patient).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def synth(out: Path, n: int, seed: int, quiet: bool):
    """Write a deterministic synthetic fundus dataset in the Kaggle/EyePACS layout.

    Discs on black with varied frame sizes, clipping, off-centre placement, exposure, notch
    markers, vessels, glare, and lesions whose number grows with the grade (0-4). The same
    --n and --seed always give the same bytes.
    """
    from tqdm import tqdm

    from pipeline.synth import synth_dataset

    if n % 2:
        raise click.BadParameter(f"must be even (two eyes per patient), got {n}",
                                 param_hint="--n")
    with tqdm(total=n, unit="photo", desc="synth", disable=quiet or None) as bar:
        truth = synth_dataset(out, n=n, seed=seed, progress=bar.update)
    counts = [sum(p.level == g for p in truth) for g in range(5)]
    click.echo(f"wrote {len(truth)} photos of {len(truth) // 2} patients to {out}/train, "
               f"labels in {out}/trainLabels.csv; grades 0-4: "
               + " / ".join(map(str, counts)))


@main.command()
@click.argument("src", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for {id}.jpeg outputs and contact_sheet.jpeg.")
@_process_options
@click.option("--limit", type=click.IntRange(1), default=None,
              help="Process at most this many photos (folders are read in name order).")
def preview(src, out, size, filter_, quality, clahe_clip, clahe_tiles, limit):
    """Process SRC photos (files or folders) in this process, for a quick visual check.

    Writes OUT/{id}.jpeg for each photo, a before/after OUT/contact_sheet.jpeg (original
    with the fitted retina circle | processed), and lists rejected files with their reasons.
    """
    from tqdm import tqdm

    from pipeline.encode import encode
    from pipeline.preview import SheetEntry, contact_sheet
    from pipeline.process import prepare_or_reject

    cfg = make_process_config(size, filter_, quality, clahe_clip, clahe_tiles)
    files = _expand_sources(src)[:limit]
    if not files:
        raise click.UsageError("no photos found in " + ", ".join(map(str, src)))
    out.mkdir(parents=True, exist_ok=True)
    entries, rejected = [], []
    for path in tqdm(files, unit="photo", desc="preview", disable=None):
        image_id = path.stem
        try:
            data = path.read_bytes()
        except OSError as e:
            from pipeline.process import Rejection
            result = Rejection("unreadable", e.strerror or str(e))
        else:
            result = prepare_or_reject(data, cfg)
        if hasattr(result, "image"):
            (out / f"{image_id}.jpeg").write_bytes(encode(result.image, "jpeg", quality))
        else:
            rejected.append((path, result))
        entries.append(SheetEntry(image_id, result))
    sheet = contact_sheet(entries)
    (out / "contact_sheet.jpeg").write_bytes(encode(sheet, "jpeg", 90))
    ok = len(files) - len(rejected)
    click.echo(f"processed {ok} of {len(files)} photos into {out}/ "
               f"(contact sheet: {out / 'contact_sheet.jpeg'})")
    if rejected:
        click.echo(f"rejected {len(rejected)}:")
        for path, rej in rejected:
            click.echo(f"  {path}: {rej}")


def _expand_sources(src) -> list[Path]:
    files: list[Path] = []
    for s in src:
        if s.is_dir():
            files += sorted(p for p in s.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                            and not any(part.startswith(".") for part in p.relative_to(s).parts))
        else:
            files.append(s)
    return files


def run() -> None:
    """Entry point with a last-resort guard: a bug prints one line, not a traceback
    (DRPIPE_DEBUG=1 shows it)."""
    import os

    try:
        main(standalone_mode=True)
    except Exception as e:  # noqa: BLE001
        if os.environ.get("DRPIPE_DEBUG"):
            raise
        click.echo(f"drpipe: internal error: {type(e).__name__}: {e} "
                   "(set DRPIPE_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)
