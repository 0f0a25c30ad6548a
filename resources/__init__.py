"""Application resources (icon), installed as ``segstudio.resources``."""

from pathlib import Path

RESOURCE_DIR = Path(__file__).parent
ICON = RESOURCE_DIR / "segstudio.svg"
