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
"""

from __future__ import annotations

from dataclasses import dataclass

# key -> (kind, python type). kind is the Example list type: "bytes" or "int64".
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
}

REFERABLE_MIN_GRADE = 2  # "referable" DR: moderate non-proliferative or worse


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
        }


def tf_feature_spec():
    """The ``tf.io.parse_single_example`` spec for :data:`FEATURES` (imports TensorFlow)."""
    import tensorflow as tf

    dtype = {"bytes": tf.string, "int64": tf.int64}
    return {k: tf.io.FixedLenFeature([], dtype[kind]) for k, (kind, _) in FEATURES.items()}
