"""Sample images shipped with segstudio (installed as ``segstudio.sample_data``)."""

from pathlib import Path

SAMPLE_DIR = Path(__file__).parent


def sample_pairs() -> list[tuple[Path, Path]]:
    """(image, labels) paths of the bundled samples, sorted by name."""
    return [(p, p.with_name(p.name.replace("_img", "_labels"))) for p in sorted(SAMPLE_DIR.glob("*_img.tif"))]
