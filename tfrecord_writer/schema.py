"""The record schema, defined once: the writer encodes with it, the reader parses with it.

Every record is a ``tf.train.Example`` with these features (docs/FORMAT.md):

    image/encoded          bytes   the processed photo (JPEG or PNG)
    image/format           bytes   b"jpeg" | b"png"
    image/height           int64   pixels
    image/width            int64   pixels
    image/class/label      int64   DR grade 0-4
    image/class/referable  int64   1 if grade >= 2 else 0
    image/id               bytes   image id, e.g. b"10_left"
    image/patient_id       bytes   e.g. b"10"
    image/eye              bytes   b"left" | b"right" | b""
    image/source_sha256    bytes   hex SHA-256 of the original file's bytes
    image/quality/score    float   gradability score in [0, 1] (pipeline/quality.py)
    image/quality/label    bytes   b"good" | b"usable" | b"reject"
"""

from __future__ import annotations

from dataclasses import dataclass

# key -> (kind, python type). kind is the Example list type: "bytes", "int64" or "float".
FEATURES: dict[str, tuple[str, type]] = {
    "image/encoded": ("bytes", bytes),
    "image/format": ("bytes", str),
    "image/height": ("int64", int),
    "image/width": ("int64", int),
    "image/class/label": ("int64", int),
    "image/class/referable": ("int64", int),
    "image/id": ("bytes", str),
    "image/patient_id": ("bytes", str),
    "image/eye": ("bytes", str),
    "image/source_sha256": ("bytes", str),
    "image/quality/score": ("float", float),
    "image/quality/label": ("bytes", str),
}
# What a parser reads for the quality of shards written before it was recorded.
QUALITY_UNKNOWN = (-1.0, b"")

REFERABLE_MIN_GRADE = 2  # "referable" DR: moderate non-proliferative or worse
N_GRADES = 5  # DR grades 0-4 (International Clinical DR scale)


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

    def features(self) -> dict[str, bytes | str | int]:
        return {
            "image/encoded": self.encoded,
            "image/format": self.format,
            "image/height": self.height,
            "image/width": self.width,
            "image/class/label": self.label,
            "image/class/referable": self.referable,
            "image/id": self.image_id,
            "image/patient_id": self.patient_id,
            "image/eye": self.eye,
            "image/source_sha256": self.source_sha256,
            "image/quality/score": self.quality_score,
            "image/quality/label": self.quality_label,
        }


def tf_feature_spec():
    """The ``tf.io.parse_single_example`` spec for :data:`FEATURES` (imports TensorFlow)."""
    import tensorflow as tf

    dtype = {"bytes": tf.string, "int64": tf.int64, "float": tf.float32}
    spec = {k: tf.io.FixedLenFeature([], dtype[kind]) for k, (kind, _) in FEATURES.items()}
    # Shards written before quality was recorded still parse (score -1, label b"").
    spec["image/quality/score"] = tf.io.FixedLenFeature([], tf.float32, QUALITY_UNKNOWN[0])
    spec["image/quality/label"] = tf.io.FixedLenFeature([], tf.string, QUALITY_UNKNOWN[1])
    return spec
