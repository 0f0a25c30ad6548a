"""The "Batch" dock widget: :class:`~segstudio.qt.batch_panel.BatchPanel` in napari.

Clicking a finished file opens the image (one layer per channel, as the
standalone window reads files) with its labels and their measurements.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from napari.utils.notifications import show_error
from qtpy.QtWidgets import QVBoxLayout, QWidget

from ..core.errors import SegStudioError
from ..core.image.sources import read_image
from ..core.segment.measure import read_csv
from ..qt.batch_panel import BatchPanel
from ._layers import image_layer_data, import_labels_support_in_background, labels_features

if TYPE_CHECKING:
    import napari


class BatchWidget(QWidget):
    """Batch-process a folder; open any finished file in ``napari_viewer``."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer", parent: QWidget | None = None):
        super().__init__(parent)
        import_labels_support_in_background()
        self.viewer = napari_viewer
        self.panel = BatchPanel()
        self.panel.layout().setContentsMargins(0, 0, 0, 0)
        self.panel.open_requested.connect(self.open_result)
        layout = QVBoxLayout(self)
        layout.addWidget(self.panel)

    def open_result(self, image_path: Path, labels_path: Path) -> None:
        """Add the image's layers and its labels (named ``"<image> labels"``, replacing an older one)."""
        try:
            image = read_image(image_path)
            labels = read_image(labels_path).data
        except SegStudioError as exc:
            show_error(str(exc))
            return
        first = None
        for data, kwargs, layer_type in image_layer_data(image):
            layer = getattr(self.viewer, f"add_{layer_type}")(data, **kwargs)
            first = first or layer
        name = f"{image.name} labels"
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        csv = labels_path.with_name(labels_path.name.removesuffix("_labels.tif") + "_cells.csv")
        features = read_csv(csv) if csv.is_file() else {}
        kwargs = {"scale": first.scale[-labels.ndim:]} if first is not None else {}
        self.viewer.add_labels(labels, name=name, features=labels_features(features), **kwargs)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        self.panel.shutdown()
        super().closeEvent(event)

