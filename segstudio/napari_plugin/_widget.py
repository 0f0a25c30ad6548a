"""The "Segment" dock widget: an image-layer chooser on top of :class:`SegmentPanel`.

The chooser lists the viewer's image layers (grey, multi-channel and RGB)
and follows ``viewer.layers``: layers added, removed, moved or renamed.
When a run finishes, the labels go to a layer named ``"<image> labels"``
(added, or replaced when it exists) with the image's scale and translate and
the per-object measurements in ``layer.features``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtWidgets import QComboBox, QFormLayout, QGroupBox, QVBoxLayout, QWidget

from ..core.errors import InputError
from ..core.image.io import ImageData
from ..core.segment.job import SegmentationResult
from ..qt.finetune_panel import FinetunePanel
from ..qt.segment_panel import SegmentPanel
from ._layers import (
    META_KEY,
    import_labels_support_in_background,
    labels_features,
    labels_geometry,
    layer_axes,
    layer_to_image,
)

if TYPE_CHECKING:
    import napari


class SegmentWidget(QWidget):
    """Segment an image layer of ``napari_viewer`` with a segstudio model."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer", parent: QWidget | None = None):
        super().__init__(parent)
        import_labels_support_in_background()
        self.viewer = napari_viewer
        self._source: Image | None = None
        self._choices: list[Image] = []
        self.layer_combo = QComboBox()
        self.layer_combo.setToolTip("the image layer to segment")
        self.panel = SegmentPanel(self._get_image)
        self.panel.layout().setContentsMargins(0, 0, 0, 0)  # aligned with the Image row
        self.panel.result_ready.connect(self._on_result)
        self.layer_combo.currentIndexChanged.connect(self._on_layer_changed)

        # fine-tuning on the chosen image and a Labels layer the user corrected
        self.labels_combo = QComboBox()
        self.labels_combo.setToolTip("the labels to train on (e.g. the model's labels after your corrections)")
        self.finetune = FinetunePanel(self._finetune_data)
        self.finetune.model_ready.connect(self.panel.add_model)
        tune_box = QGroupBox("Fine-tune")
        tune_form = QFormLayout(tune_box)
        tune_form.addRow("Labels", self.labels_combo)
        tune_form.addRow(self.finetune)

        form = QFormLayout()
        form.addRow("Image", self.layer_combo)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.panel)
        layout.addWidget(tune_box)
        layout.addStretch(1)

        events = self.viewer.layers.events
        self._connections = [
            (events.inserted, self._on_inserted),
            (events.removed, self._refresh),
            (events.moved, self._refresh),
            (events.reordered, self._refresh),
        ]
        for emitter, callback in self._connections:
            emitter.connect(callback)
        for layer in self.viewer.layers:
            self._follow_name(layer)
        connections = self._connections
        self.destroyed.connect(lambda *_: _disconnect(connections))
        self._refresh()

    # ------------------------------------------------------------------ chooser

    def image_layers(self) -> list[Image]:
        """The viewer's image layers, top first (as in napari's layer list)."""
        return [layer for layer in reversed(self.viewer.layers) if isinstance(layer, Image)]

    def current_layer(self) -> Image | None:
        """The chosen image layer, or None."""
        index = self.layer_combo.currentIndex()
        if not 0 <= index < len(self._choices):
            return None
        layer = self._choices[index]
        return layer if layer in self.viewer.layers else None

    def set_current_layer(self, layer: Image | str) -> None:
        """Choose ``layer`` (a layer or its name) in the chooser."""
        for index, choice in enumerate(self._choices):
            if choice is layer or choice.name == layer:
                self.layer_combo.setCurrentIndex(index)
                return
        raise ValueError(f"no image layer {layer!r} in the chooser")

    def _on_inserted(self, event) -> None:
        layer = event.value
        self._follow_name(layer)
        self._refresh(select=layer if isinstance(layer, Image) else None)

    def _follow_name(self, layer) -> None:
        layer.events.name.connect(self._refresh)
        self._connections.append((layer.events.name, self._refresh))

    def _refresh(self, event=None, *, select: Image | None = None) -> None:
        """Rebuild the chooser from ``viewer.layers``, keeping (or moving to) a choice."""
        keep = select if select is not None else self.current_layer()
        self._choices = self.image_layers()
        self.layer_combo.blockSignals(True)
        try:
            self.layer_combo.clear()
            for layer in self._choices:
                self.layer_combo.addItem(layer.name)
            index = next((i for i, layer in enumerate(self._choices) if layer is keep), 0 if self._choices else -1)
            self.layer_combo.setCurrentIndex(index)
        finally:
            self.layer_combo.blockSignals(False)
        self._on_layer_changed()
        self._refresh_labels()

    def labels_layers(self) -> list[Labels]:
        return [layer for layer in reversed(self.viewer.layers) if isinstance(layer, Labels)]

    def _refresh_labels(self) -> None:
        current = self.labels_combo.currentText()
        self.labels_combo.clear()
        for layer in self.labels_layers():
            self.labels_combo.addItem(layer.name)
        index = self.labels_combo.findText(current)
        if index >= 0:
            self.labels_combo.setCurrentIndex(index)

    def _finetune_data(self):
        """(base model, [(plane, labels)], image name) for the fine-tune panel (GUI thread)."""
        layer = self.current_layer()
        if layer is None:
            raise InputError("there is no image layer to train on", hint="open an image, or choose an image layer")
        name = self.labels_combo.currentText()
        if not name or name not in self.viewer.layers or not isinstance(self.viewer.layers[name], Labels):
            raise InputError("there is no Labels layer to train on",
                             hint="segment the image, correct its labels, and choose that layer under Fine-tune")
        image = layer_to_image(layer)
        if sum(1 for _ in image.planes()) != 1:
            raise InputError("fine-tuning works on a single 2-D plane; this image has several",
                             hint="open (or duplicate) one plane as its own layer")
        plane = next(image.planes())[1]
        labels = np.asarray(self.viewer.layers[name].data)
        labels = labels.reshape(labels.shape[-2:]) if labels.size == plane.shape[-2] * plane.shape[-1] else labels
        if labels.shape != plane.shape[-2:]:
            raise InputError(f"the labels ({labels.shape}) do not match the image ({plane.shape[-2:]})")
        return self.panel.model_name, [(plane, labels.astype(np.int32))], layer.name

    def _on_layer_changed(self, *_) -> None:
        layer = self.current_layer()
        names: list[str] = []
        if layer is not None:
            try:
                axes = layer_axes(layer)
            except InputError:
                axes = ""
            meta_names = (layer.metadata or {}).get(META_KEY, {}).get("channel_names") or []
            if layer.rgb:
                names = ["red", "green", "blue"]
            elif "C" in axes and len(meta_names) > 1:
                names = list(meta_names)
        self.panel.set_channels(names)

    # ------------------------------------------------------------------ panel hooks

    def _get_image(self) -> ImageData:
        layer = self.current_layer()
        if layer is None:
            raise InputError("there is no image layer to segment", hint="open an image, or choose an image layer")
        image = layer_to_image(layer)
        self._source = layer
        return image

    def _on_result(self, result: SegmentationResult) -> None:
        source = self._source
        self._source = None
        if source is None:
            return
        name = f"{source.name} labels"
        geometry = labels_geometry(source)
        features = labels_features(result.table)
        metadata = {META_KEY: {"model": result.model, "backend": result.backend, "timings": dict(result.timings)}}
        existing = self.viewer.layers[name] if name in self.viewer.layers else None
        if isinstance(existing, Labels) and existing.data.ndim == result.labels.ndim:
            existing.data = result.labels
            existing.scale = geometry["scale"]
            existing.translate = geometry["translate"]
            existing.features = features
            existing.metadata = {**existing.metadata, **metadata}
            existing.refresh()
            return
        if existing is not None:
            self.viewer.layers.remove(existing)
        self.viewer.add_labels(result.labels, name=name, features=features, metadata=metadata, **geometry)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        """Stop a running job and stop following the viewer's layers."""
        self.panel.shutdown()
        self.finetune.shutdown()
        _disconnect(self._connections)
        super().closeEvent(event)


def _disconnect(connections) -> None:
    for emitter, callback in connections:
        try:
            emitter.disconnect(callback)
        except (RuntimeError, ValueError, TypeError):
            pass
    connections.clear()
