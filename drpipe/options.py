"""Options the data commands share, and their parsing: the TOML ``--config`` file, the
photo-processing options of preview and preprocess (:func:`process_options`, declared once),
and callbacks that turn option values into what the packages take (click.BadParameter,
exit 2, for a bad one)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline import storage
from pipeline.filters import available as available_filters
from pipeline.quality import parse_min_quality
from pipeline.split import parse_split_spec

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


STORAGE_HELP = ("An fsspec option for URLs (e.g. endpoint_url=http://minio:9000, anon=true); "
                "repeatable. Credentials come from the environment or the instance's role and "
                "are never stored.")


def storage_option(expose: bool = False):
    """--storage-option KEY=VALUE for a command that takes URLs: parsed and given to
    pipeline.storage before the other options (eager), so that a ``--data s3://...``
    callback staging the shards already uses them."""
    def configure(ctx, param, values):
        options = key_value_pairs(ctx, param, values)
        storage.configure(options)
        return options

    return click.option("--storage-option", "storage_options", multiple=True,
                        metavar="KEY=VALUE", is_eager=True, expose_value=expose,
                        callback=configure, help=STORAGE_HELP)


def config_option(f):
    """--config FILE (TOML) for a command: its keys are the command's option names."""
    return click.option(
        "--config", type=click.Path(exists=True, dir_okay=False), callback=load_config_file,
        is_eager=True, expose_value=False,
        help="TOML file with any of these options (keys as option names).")(f)


def load_config_file(ctx, param, value):
    """--config FILE: TOML whose keys are option names (dashes or underscores); command-line
    options override it."""
    if value is None:
        return None
    try:
        data = tomllib.loads(Path(value).read_text())
    except OSError as e:
        raise click.BadParameter(f"cannot read {value}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise click.BadParameter(f"{value}: invalid TOML: {e}") from None
    # TOML keys are the long option names, with dashes or underscores: shard-size, filter.
    by_option = {opt[2:].replace("-", "_"): p.name for p in ctx.command.params
                 for opt in p.opts if opt.startswith("--") and p.name}
    by_option.pop("config", None)
    params = {p.name: p for p in ctx.command.params}
    defaults = {}
    for key, v in data.items():
        name = by_option.get(key.replace("-", "_"))
        if name is None:
            raise click.BadParameter(f"{value}: unknown option {key!r}")
        defaults[name] = _config_value(value, key, v, params[name])
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def local_file_or_url(ctx, param, value):
    """A local file that must exist, or a store URL (checked when read)."""
    if value is None or "://" in value:
        return value
    if not Path(value).is_file():
        raise click.BadParameter(f"{value}: no such file", ctx, param)
    return value


def local_paths_or_urls(ctx, param, values):
    """Local files or folders that must exist (as Paths), and store URLs (as given)."""
    out = []
    for v in values:
        if storage.is_url(v):
            out.append(v)
        elif not Path(v).exists():
            raise click.BadParameter(f"Path {v!r} does not exist.", ctx, param)
        else:
            out.append(Path(v))
    return tuple(out)


def key_value_pairs(ctx, param, values) -> dict:
    """KEY=VALUE pairs; a value that parses as JSON (true, 5, {...}) is taken as such."""
    out = {}
    for v in values:
        key, sep, raw = v.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{v!r}: expected KEY=VALUE", ctx, param)
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def _config_value(file, key, v, param):
    """A TOML value checked against its option: click would turn 64.7 into 64 and fail
    on a list with a traceback."""
    def bad(what):
        return click.BadParameter(f"{file}: {key} = {v!r}: {what}")
    if isinstance(v, (list, dict)) and not (param.multiple or param.nargs != 1):
        raise bad("expected a single value")
    flag = getattr(param, "is_flag", False)
    if flag != isinstance(v, bool):
        raise bad("expected true or false" if flag else "expected a value, not a boolean")
    if isinstance(param.type, click.types.IntParamType) and isinstance(v, float):
        raise bad("expected an integer")
    return v


def filter_option(f):
    return click.option(
        "--filter", "filter_", default="graham", show_default=True,
        help=f"Contrast filter: {', '.join(available_filters())}, or several joined by '+' "
             "(e.g. graham+clahe), applied left to right.")(f)


def process_options(f):
    f = click.option("--min-side", type=click.IntRange(16), default=128, show_default=True,
                     help="Reject photos whose short side is under this many pixels "
                          "(too_small).")(f)
    f = click.option("--max-megapixels", type=click.FloatRange(1, 1000), default=100.0,
                     show_default=True,
                     help="Reject photos larger than this, from their header, before decoding "
                          "(too_large: decompression bombs).")(f)
    f = click.option("--max-file-mb", type=click.FloatRange(0.001), default=256.0,
                     show_default=True,
                     help="Reject files larger than this before reading them (too_large: "
                          "a padded or wrong file would take a worker's memory).")(f)
    f = click.option("--clahe-tiles", type=click.IntRange(1, 64), default=8, show_default=True,
                      help="CLAHE tile grid (N x N).")(f)
    f = click.option("--clahe-clip", type=click.FloatRange(0.1, 100), default=2.0,
                     show_default=True, help="CLAHE clip limit.")(f)
    f = click.option("--quality", type=click.IntRange(1, 100), default=95, show_default=True,
                     help="JPEG quality of the processed photos.")(f)
    f = filter_option(f)
    f = click.option("--size", type=click.IntRange(32, 4096), default=512, show_default=True,
                     help="Side of the square output in pixels; the retina spans it.")(f)
    return f


def process_config(size, filter_, quality, clahe_clip, clahe_tiles, max_megapixels, min_side,
                   max_file_mb, fmt="jpeg", min_quality=None):
    from pipeline.process import ProcessConfig  # loads PIL: deferred, see cli.py

    try:
        return ProcessConfig.from_options(size, filter_, quality, clahe_clip, clahe_tiles,
                                          max_megapixels, min_side, fmt, max_file_mb,
                                          min_quality)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--filter") from None


def split_ratios(split_spec) -> dict[str, float]:
    try:
        return parse_split_spec(split_spec)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--split") from None


def min_quality_score(ctx, param, value):
    """--min-quality usable|good|SCORE -> the minimum score (None: no gate)."""
    if value is None:
        return None
    try:
        return parse_min_quality(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
