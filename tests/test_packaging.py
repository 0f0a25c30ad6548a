"""Packaging: every package is listed, model and sample files ship, nothing big is committed."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    mapped = {v: k for k, v in cfg["package-dir"].items()}
    found = set()
    for init in ROOT.glob("segstudio/**/__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT).parts))
    for folder, pkg in mapped.items():
        assert (ROOT / folder / "__init__.py").is_file(), folder
        found.add(pkg)
    assert found == listed, f"missing from pyproject: {found - listed}; stale: {listed - found}"


def test_sample_data_is_small_and_credited():
    files = list((ROOT / "sample_data").iterdir())
    assert sum(f.stat().st_size for f in files) < 5 * 2**20
    assert "CC0" in (ROOT / "sample_data" / "README.md").read_text()
