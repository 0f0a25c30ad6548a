"""The "Benchmark" dock widget: :class:`~segstudio.qt.benchmark_page.BenchmarkPanel` in napari.

The panel's "current image layer" is the selected image layer of the
viewer, else the top one (its first plane is benchmarked).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from napari.layers import Image
from qtpy.QtWidgets import QVBoxLayout, QWidget

from ..core.errors import InputError
from ..core.image.io import ImageData
from ..qt.benchmark_page import BenchmarkPanel
from ._layers import layer_to_image

if TYPE_CHECKING:
    import napari


class BenchmarkWidget(QWidget):
    """Benchmark backends side by side (and the naive baseline) on an image of ``napari_viewer``."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer", parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.panel = BenchmarkPanel(self.current_image)
        self.panel.layout().setContentsMargins(0, 0, 0, 0)
        layout = QVBoxLayout(self)
        layout.addWidget(self.panel)

    def current_image(self) -> ImageData:
        """The selected image layer, else the top one, as ImageData (called on the GUI thread)."""
        active = self.viewer.layers.selection.active
        layer = active if isinstance(active, Image) else next(
            (layer for layer in reversed(self.viewer.layers) if isinstance(layer, Image)), None)
        if layer is None:
            raise InputError("there is no image layer to benchmark on",
                             hint="open an image, or choose the bundled mosaic")
        return layer_to_image(layer)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        self.panel.shutdown()
        super().closeEvent(event)
