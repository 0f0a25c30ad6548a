"""Conversions between segstudio's data and napari layers.

* :func:`image_layer_data` turns an :class:`~segstudio.core.image.io.ImageData`
  (from :func:`~segstudio.core.image.io.read_image`) into napari layer-data tuples:
  one image layer, or one layer per channel (napari's ``channel_axis``
  convention) for multi-channel images, or an RGB layer for 8-bit colour
  images.  The pixel size becomes the layer scale, and each layer remembers
  its axes and channel name in ``metadata["segstudio"]``.
* :func:`layer_to_image` goes back from an image layer to ``ImageData`` for
  segmentation: the axes come from that metadata when present, else from
  ``layer.data.ndim`` and ``layer.rgb``; the pixel size from ``layer.scale``
  when it is not 1.
* :func:`labels_features` turns a measurement table into ``layer.features``.
"""

from __future__ import annotations

import functools
import importlib
import threading
from typing import Any

import numpy as np

from ..core.errors import InputError
from ..core.image.io import ImageData, as_image

META_KEY = "segstudio"
RGB_NAMES = ["red", "green", "blue"]
# colormaps of channel layers, in order (napari's own default for 2 channels starts the same)
CHANNEL_COLORMAPS = ["magenta", "green", "cyan", "yellow", "red", "blue", "gray"]
# non-RGB layer axes by number of dimensions
_AXES_BY_NDIM = {2: "YX", 3: "ZYX", 4: "TZYX"}

LayerData = tuple[Any, dict, str]


def _scale(image: ImageData, ndim: int) -> list[float]:
    py, px = image.pixel_size or (1.0, 1.0)
    return [1.0] * (ndim - 2) + [float(py), float(px)]


def _looks_rgb(image: ImageData) -> bool:
    """An 8-bit, 3- or 4-channel image without channel names: a colour picture."""
    unnamed = image.channel_names == [f"ch{i}" for i in range(image.n_channels)]
    return "C" in image.axes and image.n_channels in (3, 4) and image.data.dtype == np.uint8 and unnamed


def image_layer_data(image: ImageData) -> list[LayerData]:
    """Layer-data tuples that show ``image`` in napari (see the module docstring)."""
    axes = image.axes
    if "C" not in axes:
        meta = {META_KEY: {"axes": axes, "channel_names": list(image.channel_names)}}
        kwargs = dict(name=image.name, scale=_scale(image, image.data.ndim), metadata=meta)
        return [(image.data, kwargs, "image")]
    c = axes.index("C")
    if _looks_rgb(image):
        data = np.moveaxis(image.data, c, -1)
        layer_axes = axes.replace("C", "") + "C"
        meta = {META_KEY: {"axes": layer_axes, "channel_names": RGB_NAMES[: image.n_channels]}}
        kwargs = dict(name=image.name, rgb=True, scale=_scale(image, data.ndim - 1), metadata=meta)
        return [(data, kwargs, "image")]
    plane_axes = axes.replace("C", "")
    out = []
    for i, channel in enumerate(image.channel_names):
        data = np.take(image.data, i, axis=c)
        meta = {META_KEY: {"axes": plane_axes, "channel_names": [channel]}}
        kwargs = dict(
            name=f"{image.name} [{channel}]",
            scale=_scale(image, data.ndim),
            metadata=meta,
            colormap=CHANNEL_COLORMAPS[i % len(CHANNEL_COLORMAPS)],
            blending="additive",
        )
        out.append((data, kwargs, "image"))
    return out


def labels_layer_data(labels: np.ndarray, name: str, *, pixel_size: tuple[float, float] | None = None,
                      **kwargs) -> LayerData:
    """A labels layer-data tuple with the scale of ``pixel_size``."""
    py, px = pixel_size or (1.0, 1.0)
    scale = [1.0] * (labels.ndim - 2) + [float(py), float(px)]
    return labels, dict(name=name, scale=scale, **kwargs), "labels"


def layer_axes(layer) -> str:
    """Axes of an image layer's data (see the module docstring)."""
    data = layer.data[0] if layer.multiscale else layer.data
    ndim = len(data.shape)
    meta = (layer.metadata or {}).get(META_KEY, {})
    axes = meta.get("axes")
    if (
        isinstance(axes, str)
        and len(axes) == ndim
        and layer.rgb == axes.endswith("C")
        and axes.rstrip("C").endswith("YX")
    ):
        return axes
    if layer.rgb:
        stack = ndim - 3
        if stack > 2:
            raise InputError(f"{layer.name}: a {ndim}-D colour layer; segstudio reads colour images with Z and T")
        return "TZ"[2 - stack:] + "YXC" if stack else "YXC"
    if ndim not in _AXES_BY_NDIM:
        raise InputError(
            f"{layer.name}: a {ndim}-D layer; segstudio reads 2-D images and Z or T stacks (2 to 4 dimensions)"
        )
    return _AXES_BY_NDIM[ndim]


def layer_to_image(layer) -> ImageData:
    """The :class:`ImageData` to segment for a napari image layer.

    Raises :class:`~segstudio.core.errors.InputError` for data segstudio
    cannot read (too small, wrong type, too many dimensions).
    """
    axes = layer_axes(layer)
    data = np.asarray(layer.data[0] if layer.multiscale else layer.data)
    channel_names = list((layer.metadata or {}).get(META_KEY, {}).get("channel_names") or [])
    if layer.rgb:
        if data.shape[-1] == 4:  # alpha is not a channel to segment or measure
            data = data[..., :3]
        channel_names = channel_names[:3] if len(channel_names) >= 3 else RGB_NAMES[: data.shape[-1]]
    scale = tuple(float(s) for s in layer.scale[-2:])
    pixel_size = None if np.allclose(scale, 1.0) else scale
    return as_image(data, axes, pixel_size=pixel_size, name=layer.name, channel_names=channel_names or None)


def labels_geometry(layer) -> dict[str, list[float]]:
    """``scale`` and ``translate`` for a labels layer over image ``layer``.

    The labels have the image's stack and plane axes but no channel axis.
    """
    axes = layer_axes(layer)
    if layer.rgb:
        keep = list(range(len(axes) - 1))
    else:
        keep = [i for i, a in enumerate(axes) if a != "C"]
    scale, translate = list(layer.scale), list(layer.translate)
    return {"scale": [float(scale[i]) for i in keep], "translate": [float(translate[i]) for i in keep]}


@functools.cache
def import_labels_support_in_background() -> threading.Thread:
    """Import, on a background thread and once per process, what napari imports lazily for a first labels layer.

    napari imports pandas (for ``features``) and scikit-image's colour module
    (for the label colours) on the GUI thread when the first labels layer is
    added: 1.1 s and 0.6 s with the window frozen at the end of the first
    segmentation (``benchmarks/gui_stall.py`` named them). Imported early off
    the GUI thread, that first layer finds them ready; an import still
    running makes it wait for the rest, never longer. Returns the thread
    (the same one on every call).
    """
    def _import() -> None:
        for name in ("pandas", "skimage.color"):
            try:
                importlib.import_module(name)
            except ImportError:  # napari then fails in its own words when it needs it
                pass

    thread = threading.Thread(target=_import, name="segstudio-import-for-labels", daemon=True)
    thread.start()
    return thread


def labels_features(table: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``layer.features`` for a measurement table: one row per label.

    Adds the ``index`` column (the label value) that napari uses to find a
    label's row.
    """
    if not table:
        return {}
    return {"index": np.asarray(table["label"]), **table}
