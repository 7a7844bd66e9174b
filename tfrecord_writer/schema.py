"""The record schema, defined once: the writer encodes with it, the reader parses with it.

Every record is a ``tf.train.Example`` with the features of :data:`FEATURES` (one line per
key below, with its meaning; docs/FORMAT.md). :class:`Record` is one photo's values, and
:meth:`Record.features` reads them off it through the same table, so a new key is added in
one place (and a field of ``Record``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

# The five grades of the International Clinical DR scale, in label order (0-4).
GRADE_NAMES = ("no_dr", "mild", "moderate", "severe", "proliferative")
N_GRADES = len(GRADE_NAMES)
REFERABLE_MIN_GRADE = 2  # "referable" DR: moderate non-proliferative or worse


class Feature(NamedTuple):
    kind: str  # the Example list type: "bytes", "int64" or "float"
    field: str  # the Record attribute holding the value


FEATURES: dict[str, Feature] = {
    "image/encoded": Feature("bytes", "encoded"),  # the processed photo (JPEG or PNG)
    "image/format": Feature("bytes", "format"),  # b"jpeg" | b"png"
    "image/height": Feature("int64", "height"),  # pixels
    "image/width": Feature("int64", "width"),  # pixels
    "image/class/label": Feature("int64", "label"),  # DR grade 0-4
    # 1 if grade >= REFERABLE_MIN_GRADE else 0
    "image/class/referable": Feature("int64", "referable"),
    "image/id": Feature("bytes", "image_id"),  # image id, e.g. b"10_left"
    "image/patient_id": Feature("bytes", "patient_id"),  # e.g. b"10"
    "image/eye": Feature("bytes", "eye"),  # b"left" | b"right" | b""
    # hex SHA-256 of the original file's bytes
    "image/source_sha256": Feature("bytes", "source_sha256"),
    # gradability score in [0, 1] (pipeline/quality.py)
    "image/quality/score": Feature("float", "quality_score"),
    "image/quality/label": Feature("bytes", "quality_label"),  # b"good" | b"usable" | b"reject"
}
# What a parser reads for the quality of shards written before it was recorded.
QUALITY_UNKNOWN = (-1.0, b"")


@dataclass(frozen=True)
class Record:
    """One photo as stored in a shard."""

    encoded: bytes
    format: str
    height: int
    width: int
    label: int
    image_id: str
    patient_id: str
    eye: str
    source_sha256: str
    quality_score: float = QUALITY_UNKNOWN[0]
    quality_label: str = ""

    @property
    def referable(self) -> int:
        return int(self.label >= REFERABLE_MIN_GRADE)

    def features(self) -> dict[str, bytes | str | int | float]:
        """{record key: value} for :func:`tfrecord_writer.example.serialize_example`."""
        return {key: getattr(self, f.field) for key, f in FEATURES.items()}


def tf_feature_spec():
    """The ``tf.io.parse_single_example`` spec for :data:`FEATURES` (imports TensorFlow)."""
    import tensorflow as tf  # deferred: the writer and the pipeline never load TensorFlow

    dtype = {"bytes": tf.string, "int64": tf.int64, "float": tf.float32}
    spec = {k: tf.io.FixedLenFeature([], dtype[kind]) for k, (kind, _) in FEATURES.items()}
    # Shards written before quality was recorded still parse (score -1, label b"").
    spec["image/quality/score"] = tf.io.FixedLenFeature([], tf.float32, QUALITY_UNKNOWN[0])
    spec["image/quality/label"] = tf.io.FixedLenFeature([], tf.string, QUALITY_UNKNOWN[1])
    return spec
