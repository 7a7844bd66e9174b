"""The configuration of a training run: what ``drpipe train`` resolves from its options and
records as the run's ``config.json`` (:mod:`training.runs` reads it back)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from tfrecord_writer.schema import N_GRADES

# The Pisa report balanced to equal counts per grade; "equal" is that distribution.
EQUAL = (1 / N_GRADES,) * N_GRADES


@dataclass(frozen=True)
class TrainConfig:
    data: str = "shards"
    model: str = "resnetv2-small"
    out: str = ""
    image_size: int = 224
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-4  # Adam 1e-4: the Pisa report's setting
    optimizer: str = "adam"
    task: str = "grade"
    balance: str = "none"
    augment: str = "pisa"
    freeze: str = "none"
    head: tuple[int, ...] = ()
    dropout: float = 0.0
    l1: float = 0.0
    l2: float = 0.0
    weights: str = "none"
    fine_tune_epochs: int = 0
    fine_tune_lr: float = 1e-5
    mixed_precision: str = "auto"
    seed: int = 0
    train_split: str = "train"
    val_split: str = "val"
    steps_per_epoch: int | None = None
    checkpoint_every: int = 5  # Zhong & Cao checkpointed every 5 epochs
    patience: int = 0  # early stopping on validation kappa; 0 = off
    # BatchNorm statistics recomputed from this many training batches after every epoch
    # (0 = off): see training.fit.recompute_batchnorm
    precise_bn: int = 100
    target_distribution: tuple[float, ...] = EQUAL
    # Train and validate only on photos whose recorded quality reaches this: "usable",
    # "good" or a score (pipeline/quality.py); None = all photos.
    min_quality: str | None = None

    def min_score(self) -> float | None:
        from pipeline.quality import parse_min_quality  # deferred: pipeline.quality loads cv2

        return None if self.min_quality is None else parse_min_quality(self.min_quality)

    def total_epochs(self) -> int:
        return self.epochs + self.fine_tune_epochs

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """From a recorded configuration (JSON lists back to tuples)."""
        d = dict(d)
        for k in ("head", "target_distribution"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


def default_run_dir() -> str:
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
