"""The metadata beside the shards: drpipe's own information, and TensorFlow Datasets' files.

An output directory holds (docs/FORMAT.md):

    drpipe_info.json                 drpipe's information: schema, counts, shards, the full
                                     configuration and its hash, the input fingerprint, the
                                     drpipe version, the run's summary and timings
    features.json                    TFDS: the features (FeaturesDict of Image, ClassLabel, ...)
    image.class.label.labels.txt     TFDS: the five grade names of the ClassLabel
    metadata.json                    TFDS ``builder.info.metadata``: configuration and hashes
    dataset_info.json                TFDS: name, version, splits with exact shard lengths.
                                     Written LAST: its presence marks a finished run.

so ``tfds.builder_from_directory(out)`` opens the shards as they are. The TFDS files are
written by hand here, in the JSON form TFDS 4.9 reads (``FeatureConnector.to_json`` and the
``DatasetInfo`` proto as JSON): preprocessing never imports TensorFlow.

Outputs of drpipe 0.1.0 and earlier have a single ``dataset_info.json`` holding drpipe's
information (it has a ``drpipe_version`` key); :func:`load_info` reads both.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
from collections.abc import Callable
from pathlib import Path

from tfrecord_writer.files import atomic_write_bytes
from tfrecord_writer.schema import FEATURES, GRADE_NAMES

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

INFO_FILE = "dataset_info.json"  # the TFDS DatasetInfo; the completion marker
DRPIPE_INFO_FILE = "drpipe_info.json"
FEATURES_FILE = "features.json"
LABELS_FILE = "image.class.label.labels.txt"  # TFDS names it after the key, "/" -> "."
METADATA_FILE = "metadata.json"
# Every file written here, the marker last (pipeline.job treats them as its own).
FILES = (FEATURES_FILE, LABELS_FILE, METADATA_FILE, DRPIPE_INFO_FILE, INFO_FILE)

TFDS_NAME = "drpipe"
# The version of the record layout as TFDS sees it (x.y.z, required by TFDS).
TFDS_VERSION = "1.0.0"
# Expands to today's shard names, train-00000-of-00003.tfrecord (writer.shard_name).
FILEPATH_TEMPLATE = "{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}"
IMAGE_KEY = "image/encoded"
LABEL_KEY = "image/class/label"

_TFDS = "tensorflow_datasets.core.features."


@functools.cache
def drpipe_version() -> str:
    """The version of drpipe recorded with its outputs: the installed distribution's
    (``importlib.metadata``), or, in a source tree run without installing it, the version
    in its ``pyproject.toml``."""
    try:
        return importlib.metadata.version("drpipe")
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "0+unknown"


def has_info(data_dir: str | Path) -> bool:
    """True if ``data_dir`` holds a finished drpipe output (of this or an earlier version)."""
    return (Path(data_dir) / INFO_FILE).is_file()


def load_info(data_dir: str | Path) -> dict:
    """drpipe's information about an output directory (``drpipe_info.json``, or the
    ``dataset_info.json`` of an output written before the TFDS layout).

    Raises FileNotFoundError (one line) if ``data_dir`` holds no finished drpipe output.
    """
    d = Path(data_dir)
    return info_from(lambda name: (d / name).read_bytes() if (d / name).is_file() else None, d)


def info_from(read: Callable[[str], bytes | None], where, *, finished: bool = True) -> dict:
    """drpipe's information from the files of an output anywhere (a folder, an object
    store): ``read(name)`` gives the bytes of the file ``name`` there, or None if there is
    none. The one place that tells the formats apart: a ``dataset_info.json`` with a
    ``drpipe_version`` key is drpipe's own (drpipe 0.1.0 and earlier), else drpipe's
    information is ``drpipe_info.json``.

    ``finished=False`` (an output a run may have left half written): without the marker,
    ``drpipe_info.json`` if there, else ``{}``. Raises FileNotFoundError (one line, naming
    ``where``) for a missing file, ValueError for one that is not JSON."""
    marker = read(INFO_FILE)
    if marker is not None:
        info = json.loads(marker)
        if "drpipe_version" in info:  # the previous format: drpipe's info under TFDS's name
            return info
    elif finished:
        raise FileNotFoundError(f"{where}: no drpipe shards here (no {INFO_FILE})")
    own = read(DRPIPE_INFO_FILE)
    if own is None:
        if marker is None:
            return {}
        raise FileNotFoundError(f"{where}: {INFO_FILE} is there but {DRPIPE_INFO_FILE} "
                                "is missing")
    return json.loads(own)


def write_info(out: str | Path, info: dict) -> None:
    """Write drpipe's ``info`` and the TFDS files derived from it, each atomically, the
    completion marker (``dataset_info.json``) last."""
    out = Path(out)
    proc = info["config"]["process"]
    features = tfds_features(proc["format"], int(proc["size"]))
    metadata = {k: info[k] for k in ("drpipe_version", "config_hash", "input_hash", "config")}
    for name, blob in ((FEATURES_FILE, _json(features)),
                       (LABELS_FILE, "".join(f"{n}\n" for n in GRADE_NAMES).encode()),
                       (METADATA_FILE, _json(metadata)),
                       (DRPIPE_INFO_FILE, _json(info)),
                       (INFO_FILE, _json(tfds_dataset_info(info)))):
        atomic_write_bytes(out / name, blob)


def tfds_features(image_format: str, size: int) -> dict:
    """``features.json``: a flat FeaturesDict over the record keys of
    :data:`~tfrecord_writer.schema.FEATURES`. The image is an ``Image`` (size × size × 3,
    ``image_format``), the grade a ``ClassLabel``; any other key follows its kind (int64 ->
    int64 scalar, bytes -> Text, float -> float32 scalar), so new schema keys appear in TFDS."""
    if image_format not in ("jpeg", "png"):
        raise ValueError(f"image format {image_format!r} is not jpeg or png")
    features = {}
    for key, (kind, _) in FEATURES.items():
        if key == IMAGE_KEY:
            features[key] = {
                "pythonClassName": _TFDS + "image_feature.Image",
                "image": {"shape": {"dimensions": [str(size), str(size), "3"]},
                          "dtype": "uint8", "encodingFormat": image_format}}
        elif key == LABEL_KEY:
            features[key] = {"pythonClassName": _TFDS + "class_label_feature.ClassLabel",
                             "classLabel": {"numClasses": str(len(GRADE_NAMES))}}
        elif kind == "bytes":
            features[key] = {"pythonClassName": _TFDS + "text_feature.Text", "text": {}}
        elif kind in ("int64", "float"):
            features[key] = {
                "pythonClassName": _TFDS + "tensor_feature.Tensor",
                "tensor": {"shape": {}, "dtype": "int64" if kind == "int64" else "float32",
                           "encoding": "none"}}
        else:
            raise ValueError(f"feature {key!r}: no TFDS feature for kind {kind!r}")
    return {"type": _TFDS + "features_dict.FeaturesDict",
            "content": {"features": features},
            "proto_cls": "tensorflow_datasets.FeaturesDict"}


def tfds_dataset_info(info: dict) -> dict:
    """``dataset_info.json`` (the ``DatasetInfo`` proto as JSON) for drpipe's ``info``.
    Shard lengths are the exact record counts: TFDS slices ``train[:10%]`` with them."""
    splits = []
    for name, split in info["splits"].items():
        shards = split["shards"]
        if not shards:  # TFDS cannot describe a split without files
            continue
        splits.append({"name": name,
                       "numBytes": str(sum(s["bytes"] for s in shards)),
                       "shardLengths": [str(s["records"]) for s in shards],
                       # A later version's shards are read through its versions/ folder.
                       "filepathTemplate": info.get("tfds_template", FILEPATH_TEMPLATE)})
    return {
        "name": TFDS_NAME,
        "version": TFDS_VERSION,
        "description": ("Fundus photographs graded for diabetic retinopathy (0-4), "
                        f"preprocessed by drpipe {info.get('drpipe_version', '')}; "
                        "see drpipe_info.json and docs/FORMAT.md."),
        "fileFormat": "tfrecord",
        # The records are already in a seeded random order (pipeline.job); TFDS reads
        # them as stored, so train[:10%] is the first tenth of the shards, as tf.data sees it.
        "disableShuffling": True,
        "splits": splits,
        "supervisedKeys": {"tuple": {"items": [{"featureKey": IMAGE_KEY},
                                               {"featureKey": LABEL_KEY}]}},
    }


def _json(obj) -> bytes:
    return json.dumps(obj, indent=2).encode()
