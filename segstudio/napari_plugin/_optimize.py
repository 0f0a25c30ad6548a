"""The "Optimize" dock widget: :class:`~segstudio.qt.optimize_wizard.OptimizeWizard` in napari.

The widget fills the wizard's hooks from the viewer: the open image layers
(as ``(data, axes, name)``) and Labels layers for the calibration and
validation pages, the current image for the result page's comparison, and
a labels layer for its disagreement overlay.  A model the user chooses to
use is already kept as a user model (it is there after a restart); it is
also offered at once in the Segment and Batch docks of the same window
(the standalone window's, or napari's when those docks are open).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtWidgets import QVBoxLayout, QWidget

from ..core.errors import InputError
from ..core.image.io import ImageData
from ..core.models.catalog import Model
from ..qt.optimize_state import WizardState
from ..qt.optimize_wizard import OptimizeWizard
from ._layers import layer_axes, layer_to_image

if TYPE_CHECKING:
    import napari


class OptimizeWidget(QWidget):
    """Make a model faster on the images of ``napari_viewer``."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer", parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        state = WizardState(layer_images=self.layer_images, layer_labels=self.layer_labels,
                            current_image=self.current_image, add_labels=self.add_labels)
        self.wizard = OptimizeWizard(state)
        self.wizard.model_added.connect(self._offer)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.wizard)

    # ------------------------------------------------------------------ hooks

    def image_layers(self) -> list[Image]:
        return [layer for layer in reversed(self.viewer.layers) if isinstance(layer, Image)]

    def layer_images(self) -> list[tuple[np.ndarray, str, str]]:
        """The open image layers as ``(data, axes, name)`` (top first; unreadable layers left out)."""
        out = []
        for layer in self.image_layers():
            try:
                axes = layer_axes(layer)
            except InputError:
                continue
            data = layer.data[0] if layer.multiscale else layer.data
            out.append((np.asarray(data), axes, layer.name))
        return out

    def layer_labels(self) -> list[tuple[np.ndarray, str]]:
        return [(np.asarray(layer.data), layer.name) for layer in reversed(self.viewer.layers)
                if isinstance(layer, Labels)]

    def current_image(self) -> ImageData | None:
        """The selected image layer, else the top one, as ImageData (None when there is none)."""
        active = self.viewer.layers.selection.active
        layer = active if isinstance(active, Image) else next(iter(self.image_layers()), None)
        return layer_to_image(layer) if layer is not None else None

    def add_labels(self, data: np.ndarray, name: str, colors: dict | None = None):
        """Add (or replace) a labels layer ``name``; ``colors``: label value -> colour (others transparent)."""
        kwargs = {}
        if colors:
            from napari.utils.colormaps import DirectLabelColormap

            kwargs["colormap"] = DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", **colors})
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        return self.viewer.add_labels(data, name=name, **kwargs)

    # ------------------------------------------------------------------ results

    def _offer(self, model: Model) -> None:
        """Offer a kept model in the window's Segment, Batch and Benchmark docks (it is kept on disk already)."""
        from ._batch import BatchWidget
        from ._benchmark import BenchmarkWidget
        from ._widget import SegmentWidget

        window = getattr(getattr(self.viewer, "window", None), "_qt_window", None)
        if window is None:
            return
        for widget in window.findChildren(SegmentWidget):
            widget.panel.add_model(str(model.card_path))
        for widget in window.findChildren(BatchWidget):
            widget.panel.add_model(model)
        for widget in window.findChildren(BenchmarkWidget):  # to time it beside the original on the user's image
            widget.panel.add_model(model)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        self.wizard.shutdown()
        super().closeEvent(event)
