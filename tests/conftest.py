"""Shared fixtures. Real-photo tests read ../shared/data/eyepacs-sample from its own path
(competition data: never copied into the repository)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("DRPIPE_SAMPLE", ROOT.parent / "shared/data/eyepacs-sample"))


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    if not (SAMPLE / "train").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"EyePACS sample missing at {SAMPLE} (CI must have ../shared)")
        pytest.skip(f"EyePACS sample not found at {SAMPLE}")
    return SAMPLE


@pytest.fixture(scope="session")
def sample_photos(sample_dir) -> list[Path]:
    photos = sorted((sample_dir / "train").glob("*.jpeg"))
    assert len(photos) == 31
    return photos


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from pipeline.synth import synth_dataset

    out = tmp_path_factory.mktemp("synth")
    synth_dataset(out, n=40, seed=7)
    return out
