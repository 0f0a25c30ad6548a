"""Shared fixtures: the bundled sample data and, when present, the DSB2018 copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from segstudio.sample_data import SAMPLE_DIR, sample_pairs

ROOT = Path(__file__).resolve().parents[1]
DSB2018 = Path(os.environ.get("SEGSTUDIO_DSB2018", ROOT.parent / "shared" / "data" / "dsb2018"))


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def samples() -> list[tuple[Path, Path]]:
    pairs = sample_pairs()
    assert len(pairs) >= 3, "sample_data/ must hold the bundled images"
    return pairs


@pytest.fixture(scope="session")
def dsb2018() -> Path:
    if not (DSB2018 / "index.json").is_file():
        pytest.skip(f"DSB2018 copy not found at {DSB2018} (set SEGSTUDIO_DSB2018)")
    return DSB2018


@pytest.fixture(scope="session")
def nuclei():
    from segstudio.core.models.catalog import get_model

    return get_model("nuclei")
