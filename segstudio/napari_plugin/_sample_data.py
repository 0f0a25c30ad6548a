"""Sample data contributions: each bundled sample image with its ground truth.

Every sample in :mod:`segstudio.sample_data` has one contribution (see
``napari.yaml``): the image, read with :func:`~segstudio.core.image.io.read_image`
like any file the app opens, and its ground-truth instance labels as a
hidden labels layer named ``"<sample> ground truth"``.
"""

from __future__ import annotations

from pathlib import Path

from ..core.image.sources import read_image
from ..sample_data import sample_pairs
from ._layers import LayerData, image_layer_data, labels_layer_data


def sample_id(image_path: Path) -> str:
    """The id of a sample from its image file name (``<id>_img.tif``)."""
    return image_path.name.split("_img")[0]


def sample_paths(key: str) -> tuple[Path, Path]:
    """The (image, ground-truth labels) paths of sample ``key``."""
    for image_path, labels_path in sample_pairs():
        if sample_id(image_path) == key:
            return image_path, labels_path
    raise KeyError(f"no bundled sample {key!r}")


def load_sample(key: str, *, ground_truth: bool = True) -> list[LayerData]:
    """Layer data of sample ``key``: the image, then (hidden) its ground truth."""
    image_path, labels_path = sample_paths(key)
    image = read_image(image_path)
    layers = image_layer_data(image)
    if ground_truth:
        truth = read_image(labels_path)
        layers.append(
            labels_layer_data(truth.data, f"{image.name} ground truth", pixel_size=image.pixel_size, visible=False)
        )
    return layers


def sample_6fe2df6de1d9() -> list[LayerData]:
    """Nuclei, crowded and touching (520 x 696), with ground truth."""
    return load_sample("6fe2df6de1d9")


def sample_0287e7ee5b00() -> list[LayerData]:
    """Nuclei, medium density (256 x 256), with ground truth."""
    return load_sample("0287e7ee5b00")


def sample_4327d2759187() -> list[LayerData]:
    """Nuclei, dim and low contrast (360 x 360), with ground truth."""
    return load_sample("4327d2759187")


def sample_20c37b1ad2f5() -> list[LayerData]:
    """Nuclei, very dim (512 x 640), with ground truth."""
    return load_sample("20c37b1ad2f5")
