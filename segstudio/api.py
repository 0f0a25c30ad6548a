"""``segstudio.segment``: one call from an array or a file to labels and measurements.

For scripts and notebooks, beside the CLI and the GUIs; everything they
offer is in :mod:`segstudio.core` (jobs with progress and cancel, streaming
to files, batches).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def segment(
    image,
    model="nuclei",
    *,
    backend: str = "auto",
    axes: str | None = None,
    channel: int | str | None = None,
    diameter: float | str | None = None,
    tile: int = 512,
    tta: bool = False,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Segment one image: instance labels and a per-object table.

    Parameters
    ----------
    image : numpy.ndarray, str, pathlib.Path or ImageData
        A 2-D ``(Y, X)`` array, or one with channels or planes (name them
        with ``axes``, e.g. ``"CYX"``, ``"ZYX"``, ``"YXC"``; guessed when not
        given), or the path of an image file segstudio reads (TIFF, OME-TIFF,
        OME-Zarr, PNG, ...).
    model : str, pathlib.Path or Model
        A built-in model name (``"nuclei"``, ``"nuclei-light"``,
        ``"viability"``), an imported model's name, or a model file or card.
    backend : str
        ``"auto"`` (the fastest installed for this machine) or a variant
        such as ``"openvino"``, ``"onnxruntime"``, ``"torch@cuda:fp16"``.
    axes : str, optional
        Axis names of an array ``image``.
    channel : int or str, optional
        The channel holding the nuclei (index or name) in a multi-channel image.
    diameter : float, str or Diameter, optional
        Nucleus diameter in image pixels (``24``), or micrometres
        (``"9um"``, for a file that records its pixel size); estimated when
        not given; ``"native"`` runs the image at its own scale.
    tile : int
        Tile size in network pixels (the result does not depend on it).
    tta : bool
        Average over four flips (four times the work, a little more accurate).

    Returns
    -------
    labels : numpy.ndarray of unsigned integers
        Shaped like the image without its channel axis (``(Y, X)``, or
        ``(Z, Y, X)`` ...), of the smallest unsigned dtype that holds the
        count; 0 is background, objects are numbered 1..n in raster order
        of their first pixel, plane after plane.
    table : dict of str to numpy.ndarray
        One row per object (``label``, ``area_px``, centroids, intensities
        per channel, shape measures; ``z`` / ``t`` for stacks).

    Examples
    --------
    >>> import segstudio
    >>> labels, table = segstudio.segment("sample_data/6fe2df6de1d9_img.tif")  # doctest: +SKIP
    >>> len(table["label"]) == labels.max()  # doctest: +SKIP
    True
    """
    from .core.backends import create_backend
    from .core.image.io import ImageData, as_image
    from .core.image.sources import read_image
    from .core.jobs import run_sync
    from .core.models.catalog import Model, get_model
    from .core.segment.job import segment_job
    from .core.segment.options import SegmentOptions

    if isinstance(image, (str, Path)):
        image = read_image(image)
    elif not isinstance(image, ImageData):
        image = as_image(np.asarray(image), axes)
    options = SegmentOptions(channel=channel, diameter=diameter, tile=tile, tta=tta)  # checked before the model loads
    if not isinstance(model, Model):
        model = get_model(model)
    with create_backend(backend, model, tile=tile) as runner:
        result = run_sync(segment_job(image, model, runner, options))
    return result.labels, result.table
