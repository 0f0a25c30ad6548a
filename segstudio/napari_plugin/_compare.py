"""The optimization wizard's disagreement overlay as a napari labels layer.

:func:`show_disagreement` adds (or replaces) a labels layer with the
:class:`~segstudio.core.compare.Disagreement` overlay of a comparison: 1
only in the original, 2 only in the optimized model, 3 matched with IoU <
0.8, in the colours of :data:`segstudio.qt.optimize_result.OVERLAY_COLOURS`,
over the image it was computed on (same scale and translate).  The counts
go to the layer's metadata.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from napari.layers import Labels
from napari.utils.colormaps import DirectLabelColormap

from ..qt.optimize_result import OVERLAY_COLOURS, OVERLAY_NAMES, CompareResult
from ._layers import META_KEY, labels_geometry

if TYPE_CHECKING:
    import napari


def disagreement_colormap() -> DirectLabelColormap:
    transparent = (0.0, 0.0, 0.0, 0.0)
    return DirectLabelColormap(color_dict={None: transparent, 0: transparent, **OVERLAY_COLOURS})


def show_disagreement(viewer: "napari.viewer.Viewer", result: CompareResult, like=None) -> Labels:
    """Add or replace the layer ``"disagreement: <original> vs <optimized>"``; returns it.

    ``like``: the image layer the comparison ran on (its scale and translate are used).
    """
    d = result.comparison.disagreement
    name = f"disagreement: {result.original} vs {result.optimized}"
    geometry = labels_geometry(like) if like is not None else {}
    metadata = {META_KEY: {"only_reference": d.only_reference, "only_other": d.only_other, "low_iou": d.low_iou,
                           "matched": d.matched, "iou": d.iou, "kinds": {str(k): v for k, v in OVERLAY_NAMES.items()},
                           "seconds_original": result.comparison.seconds_a,
                           "seconds_optimized": result.comparison.seconds_b}}
    existing = viewer.layers[name] if name in viewer.layers else None
    if existing is not None:
        viewer.layers.remove(existing)
    return viewer.add_labels(d.overlay, name=name, colormap=disagreement_colormap(), opacity=0.8,
                             metadata=metadata, **geometry)
