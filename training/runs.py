"""Run directories: load a run, tell a drpipe run from any folder, and tie a run to the
data it learnt from.

At train time ``config.json`` records, beside the options, the identity of the shards
(:func:`data_identity`: their configuration hash, input hash and preprocessing) under
``"data_identity"``. Afterwards:

- ``predict`` and ``explain`` preprocess photos with the *recorded* preprocessing, so
  re-running ``preprocess`` into the same folder with other settings never changes what
  an existing run predicts (:func:`process_config`);
- ``evaluate``, ``export``, ``ensemble`` and ``train --resume`` read shards only after
  :func:`check_data` has said they are the ones the run was trained on (its own ``data``),
  or, for other shards given with ``--data``, that they were preprocessed the same way.

Runs made before the record existed have none: for them the shards' current
``dataset_info.json`` is used, as before.

The ONE module that knows a run directory's layout (training.fit's docstring draws it):
which file holds the configuration (:func:`read_config`, :func:`load_config`), the model
(:func:`model_path`, :func:`require_model`), the cut points of a regression run
(:func:`recorded_cuts`), and what tells a run (:func:`is_run`) from an ensemble's
directory (:func:`is_ensemble`, :func:`ensemble_record`). Files are written whole
(:func:`write_json`: temp-then-rename).
"""

from __future__ import annotations

import json
from pathlib import Path

from tfrecord_writer.info import load_info
from tfrecord_writer.writer import atomic_write_bytes
from training.config import TrainConfig

CONFIG = "config.json"
MODEL = "model.keras"  # the final model
BEST = "checkpoints/best.keras"  # best by validation kappa
METRICS = "metrics.json"  # validation metrics (and a regression run's cut points)
ENSEMBLE = "ensemble.json"  # what drpipe ensemble fitted: marks an ensemble's directory
DATA_KEY = "data_identity"  # config.json key of the recorded data identity
# What decides the pixels a model sees: compared when other shards are given with --data.
PROCESS_KEY = "process"


class RunError(RuntimeError):
    """A one-line reason a run directory cannot be used as asked."""


def write_json(path: str | Path, obj) -> None:
    """A JSON file of a run (or an ensemble, a tuning) written whole: a kill never leaves
    half of one under its final name."""
    atomic_write_bytes(Path(path), json.dumps(obj, indent=2).encode())


def dataset_info(data_dir: str | Path) -> dict:
    """drpipe's information about the shards (tfrecord_writer.info.load_info: drpipe_info.json,
    or an earlier output's dataset_info.json). The ONE place the run side reads it."""
    try:
        return load_info(data_dir)
    except FileNotFoundError:
        raise RunError(f"{data_dir}: no drpipe shards here (no dataset_info.json); run drpipe "
                       "preprocess first, or give --data") from None


def data_identity(data_dir: str | Path) -> dict:
    """What a run records about its shards: where, which configuration and inputs (hashes),
    the preprocessing, and the splits with their photo counts."""
    info = dataset_info(data_dir)
    return {"path": str(Path(data_dir).resolve()),
            "config_hash": info.get("config_hash"), "input_hash": info.get("input_hash"),
            PROCESS_KEY: info["config"]["process"],
            "split": info["config"].get("split"), "seed": info["config"].get("seed"),
            "counts": info.get("counts", {})}


def splits_of(data_dir: str | Path) -> list[str]:
    """The split names of the shards (from their record, not from file names)."""
    return list(dataset_info(data_dir).get("counts", {}))


def read_config(run: str | Path) -> dict:
    """``config.json`` of a run as a dict; RunError "not a drpipe run" when missing."""
    path = Path(run) / CONFIG
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{run}: not a drpipe run (no {CONFIG})") from None
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: cannot be read ({e})") from None
    if not isinstance(d, dict) or "model" not in d:
        raise RunError(f"{run}: not a drpipe run ({CONFIG} is not a training configuration)")
    return d


def is_run(path: str | Path) -> bool:
    """A directory ``drpipe train`` made (it has a config.json)."""
    return (Path(path) / CONFIG).is_file()


def load_config(run: str | Path) -> TrainConfig:
    """A run's TrainConfig (RunError "not a drpipe run" without config.json)."""
    d = read_config(run)
    d.pop(DATA_KEY, None)
    return TrainConfig.from_dict(d)


def model_path(run: str | Path, checkpoint: str = "final") -> Path:
    """A run's model file: ``final`` (model.keras) or ``best`` (by validation kappa)."""
    return Path(run) / (MODEL if checkpoint == "final" else BEST)


def is_finished(run: str | Path) -> bool:
    """The run wrote its final model (``train --resume`` has nothing left to do)."""
    return model_path(run).exists()


def require_model(run: str | Path, checkpoint: str = "final") -> Path:
    """The model file of a finished run; RunError when it is not there."""
    path = model_path(run, checkpoint)
    if not path.exists():
        raise RunError(f"{path} does not exist (is the run finished?)")
    return path


def recorded_cuts(run: str | Path) -> list[float] | None:
    """The cut points a regression run fitted on its validation split (metrics.json), or
    None (not recorded: the default cuts apply)."""
    path = Path(run) / METRICS
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("thresholds")


def write_metrics(run: str | Path, metrics: dict, split: str | None = None) -> None:
    """``metrics.json`` (validation, at train time) or ``metrics-SPLIT.json`` (evaluate)."""
    write_json(Path(run) / (METRICS if split is None else f"metrics-{split}.json"), metrics)


def is_ensemble(path: str | Path) -> bool:
    """A directory ``drpipe ensemble --out`` wrote (it has an ensemble.json)."""
    return (Path(path) / ENSEMBLE).exists()


def ensemble_record(path: str | Path) -> dict:
    """An ensemble directory's ensemble.json: its method, fitted weights, members, checkpoint."""
    return json.loads((Path(path) / ENSEMBLE).read_text())


def members_of(path: str | Path, checkpoint: str = "final") -> tuple[list[Path], str]:
    """(the runs, the checkpoint) a prediction with ``path`` uses: an ensemble's members at
    the checkpoint it was fitted with, or the run itself."""
    if not is_ensemble(path):
        return [Path(path)], checkpoint
    rec = ensemble_record(path)
    return [Path(m["run"]) for m in rec["members"]], rec["checkpoint"]


def own_dataset_info(run: str | Path, data_dir: str | Path, why: str) -> dict:
    """The information of the shards a run was trained on, which it needs (``why``)."""
    try:
        return dataset_info(data_dir)
    except RunError:
        raise RunError(f"{run} was trained on {data_dir}, whose dataset_info.json is missing "
                       f"({why})") from None


def check_servable(run: str | Path, checkpoint: str = "final",
                   need_model: bool = True) -> TrainConfig:
    """A run that can grade new photos: its config, the preprocessing to repeat (recorded
    at train time, else its shards' dataset_info.json) and, with ``need_model``, the
    model. Returns its TrainConfig."""
    cfg = load_config(run)
    if not recorded_identity(run):
        own_dataset_info(run, cfg.data, "the preprocessing to repeat")
    if need_model:
        require_model(run, checkpoint)
    return cfg


def recorded_identity(run: str | Path) -> dict | None:
    """The data identity recorded at train time; None for runs made before it existed."""
    return read_config(run).get(DATA_KEY)


def write_config(run: Path, config: dict, data_dir: str | Path) -> None:
    """A new run's ``config.json``: the options and the identity of its shards."""
    write_json(Path(run) / CONFIG, {**config, DATA_KEY: data_identity(data_dir)})


def _process(proc: dict):
    from pipeline.filters import FilterParams  # deferred: OpenCV, for what reads runs only
    from pipeline.process import ProcessConfig

    proc = dict(proc)
    proc["filter_params"] = FilterParams(**proc.get("filter_params", {}))
    return ProcessConfig(**proc)


def process_config_of(data_dir: str | Path):
    """The ProcessConfig the shards were made with (from drpipe_info.json)."""
    return _process(load_info(data_dir)["config"]["process"])


def process_config(run: str | Path, data_dir: str | Path):
    """The ProcessConfig a run's photos must get: the recorded one, else (an older run)
    that of ``data_dir``'s dataset_info.json."""
    rec = recorded_identity(run)
    return _process(rec[PROCESS_KEY] if rec else dataset_info(data_dir)["config"]["process"])


def _differences(a: dict, b: dict) -> str:
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(f"{k} {b.get(k)!r} (trained on {a.get(k)!r})" for k in keys[:4])


def check_data(run: str | Path, data_dir: str | Path, own: bool = True) -> dict | None:
    """Refuse, in one line, shards that are not what ``run`` was trained on.

    ``own``: ``data_dir`` stands for the run's own shards, which must be the very data it
    learnt from (same configuration and input hashes: re-made shards are refused). Other
    shards (``--data``) must have been preprocessed the same way. Returns the recorded
    identity (None for an older run, which is not checked)."""
    rec = recorded_identity(run)
    if rec is None:
        return None
    now = data_identity(data_dir)
    if rec[PROCESS_KEY] != now[PROCESS_KEY]:
        raise RunError(f"{data_dir} was preprocessed with other settings than {run} was "
                       f"trained on: {_differences(rec[PROCESS_KEY], now[PROCESS_KEY])}")
    if own and (rec["config_hash"], rec["input_hash"]) != (now["config_hash"],
                                                           now["input_hash"]):
        what = ("configuration" if rec["config_hash"] != now["config_hash"]
                else "input photos or labels")
        raise RunError(f"{data_dir} is not the data {run} was trained on (re-made since, with "
                       f"another {what}); re-create it as it was, or train a new run")
    return rec


def same_photos(a: dict | None, b: dict | None) -> bool:
    """Two recorded identities over the same photos, labels and splits (the preprocessing
    may differ): what lets an ensemble score each member on its own shards."""
    if a is None or b is None:
        return a is b
    return all(a.get(k) == b.get(k) for k in ("input_hash", "split", "seed"))
