"""The "Performance" dock widget: :class:`~segstudio.qt.performance.PerformancePanel` in napari.

It charts every segstudio run of this napari session (Segment, Batch, Optimize).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qtpy.QtWidgets import QVBoxLayout, QWidget

from ..qt.performance import PerformancePanel

if TYPE_CHECKING:
    import napari


class PerformanceWidget(QWidget):
    """Live latency, throughput, memory and CPU of segstudio's runs, and the stage timeline."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer", parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.panel = PerformancePanel()
        self.panel.layout().setContentsMargins(0, 0, 0, 0)
        layout = QVBoxLayout(self)
        layout.addWidget(self.panel)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        self.panel.shutdown()
        super().closeEvent(event)
