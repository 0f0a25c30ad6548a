"""The segmentation panel shared by the napari plugin and the standalone app.

:class:`SegmentPanel` lets the user pick a model, a backend and a channel,
runs :func:`~segstudio.core.segment.segment_job` on a background thread
(:class:`~segstudio.qt.worker.JobRunner`), shows progress, a status line and
errors, and emits :attr:`SegmentPanel.result_ready` with the
:class:`~segstudio.core.segment.SegmentationResult`.

It does not know napari: the shell gives it ``get_image() -> ImageData``,
called on the GUI thread when the user presses Run, and listens to
``result_ready``.  Models and backends are created on the worker thread and
cached per (model, backend) in a :class:`BackendCache` shared by every panel
of the process, so the second run does not load the model again and the GUI
thread never runs inference.

A model file opened with *Open...* is imported on a background thread too.
A TorchScript file holds code: it is refused unless the user ticks "Allow
model files that contain code (TorchScript)", which shows what that means
(a conversion to ONNX in a confined process, and the confinement this
machine gives it: :func:`~segstudio.core.models.confine.describe_confinement`).
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from typing import Callable

from qtpy.QtCore import QEvent, QObject, Qt, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QWidget,
)

from ..core.backends import Backend, auto_variant, create_backend, runnable_variants
from ..core.image.io import ImageData
from ..core.jobs import CancelToken, Job, Progress, Stage
from ..core.metrics import monitored
from ..core.models.catalog import Model, builtin_models, get_model
from ..core.models.user import user_models
from ..core.segment.job import SegmentationResult, segment_job, warm_up
from ..core.segment.options import SegmentOptions
from ..core.service import INFERENCE
from .job_panel import JobPanel
from .worker import JobRunner

AUTO = "auto"


def available_models() -> dict[str, Model]:
    """The built-in and imported models by name (what the panels' model lists offer)."""
    return {m.name: m for m in builtin_models() + user_models()}


def fill_backends(combo: QComboBox, model: Model | None) -> None:
    """Offer ``auto`` and every backend that can run ``model`` here; keep the choice when still offered."""
    current = combo.currentData() or AUTO
    combo.clear()
    combo.addItem(AUTO, AUTO)
    for name in runnable_variants(model) if model is not None else []:
        combo.addItem(name, name)
    combo.setCurrentIndex(max(combo.findData(current), 0))


class BackendCache:
    """Models and ready backends, created on first use and kept per (model, backend).

    :meth:`get` is called on worker threads; a lock makes concurrent calls
    from several panels safe.  ``"auto"`` is resolved to a concrete backend
    first, so ``auto`` and the backend it picks share one instance.
    """

    _shared: "BackendCache | None" = None

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, Model] = {}
        self._backends: dict[tuple[str, str], Backend] = {}

    @classmethod
    def shared(cls) -> "BackendCache":
        """The process-wide cache used by panels that are not given one."""
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def get(self, model_name: str, backend_name: str) -> tuple[Model, Backend]:
        """The model and a ready backend for it (slow the first time: call off the GUI thread)."""
        with self._lock:
            model = self._models.get(model_name)
            if model is None:
                model = self._models[model_name] = get_model(model_name)
            name = auto_variant(model) if backend_name == AUTO else backend_name
            backend = self._backends.get((model_name, name))
            if backend is None:
                backend = create_backend(name, model)
                warm_up(model, backend)  # compile / autotune now, on this worker thread
                self._backends[(model_name, name)] = backend
            return model, backend


class SegmentPanel(JobPanel):
    """Model, backend and channel choice, Run / Cancel, progress, status and errors.

    Parameters
    ----------
    get_image : callable
        Returns the :class:`ImageData` to segment; called on the GUI thread
        when the user presses Run.  It may raise
        :class:`~segstudio.core.errors.SegStudioError` (shown in the panel).
    backends : BackendCache, optional
        Where models and backends are cached (default: the process-wide one).
    tile : int
        Tile size passed to :func:`segment_job`.
    parent : QWidget, optional

    Signals
    -------
    result_ready(SegmentationResult)
        A run finished.
    """

    result_ready = Signal(object)

    def __init__(
        self,
        get_image: Callable[[], ImageData],
        *,
        backends: BackendCache | None = None,
        tile: int = 512,
        parent: QWidget | None = None,
    ):
        super().__init__("Run", parent)
        self._get_image = get_image
        self._backends = backends or BackendCache.shared()
        self._tile = tile
        self._n_planes = 1
        self._planes_done = 0
        self._t_start = 0.0
        self._watched: list[weakref.ref] = []
        self._models = available_models()
        self.import_runner = JobRunner(self)
        self.import_runner.finished.connect(self._on_model_imported)
        self.import_runner.failed.connect(self._on_import_failed)
        self.import_runner.stopped.connect(self._set_idle)
        self._build_form()
        self.job_column(self._form())
        self.run_button.setToolTip("segment the image")
        self.status.setText("Ready")
        self.status.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
        self.model_combo.currentIndexChanged.connect(self._update_backends)
        self.open_model_button.clicked.connect(self._choose_model)
        self.trust_check.toggled.connect(self._on_trust_toggled)
        self._update_backends()
        self.set_channels([])
        self._set_idle()

    def _build_form(self) -> None:
        """The inputs: model (and Open...), trust, backend, channel, diameter, flips."""
        self.model_combo = QComboBox()
        for model in self._models.values():
            self.model_combo.addItem(model.name, model.name)
            self.model_combo.setItemData(
                self.model_combo.count() - 1, model.spec.title or model.name, Qt.ItemDataRole.ToolTipRole
            )
        self.open_model_button = QPushButton("Open...")
        self.open_model_button.setToolTip(
            "use a model card (.json, e.g. from segstudio optimize), an ONNX, TorchScript or state-dict file, "
            "or a BioImage.IO package")
        self.trust_check = QCheckBox("Allow model files that contain code (TorchScript)")
        self.trust_check.setToolTip(
            "TorchScript files (and BioImage.IO packages with only torchscript weights) are programs, not just "
            "weights; unticked, segstudio refuses them")
        self.trust_warning = QLabel()
        self.trust_warning.setObjectName("segstudioTrustWarning")
        self.trust_warning.setWordWrap(True)
        self.trust_warning.setStyleSheet("color: #e8a33f;")
        self.trust_warning.setVisible(False)
        self.backend_combo = QComboBox()
        self.backend_combo.setToolTip("auto picks the fastest backend installed for this model")
        self.channel_combo = QComboBox()
        self.channel_combo.setToolTip(
            "the channel the model reads; auto: the only channel, or the mean of colour channels"
        )
        self.diameter_spin = QDoubleSpinBox()
        self.diameter_spin.setRange(0.0, 1000.0)
        self.diameter_spin.setDecimals(1)
        self.diameter_spin.setSpecialValueText("auto")
        self.diameter_spin.setSuffix(" px")
        self.diameter_spin.setToolTip(
            "typical nucleus diameter in image pixels; auto: estimated from the image. The image is resampled "
            "so its nuclei match the size the model was trained on")
        self.tta_check = QCheckBox("average over flips (4x slower)")
        self.tta_check.setToolTip(
            "run the network on each tile as it is and flipped three ways and average: four times the network "
            "time for a little more accuracy (DSB2018 val: see the README)")

    def _form(self) -> QFormLayout:
        form = QFormLayout()
        form.setContentsMargins(0, 0, 0, 0)
        model_row = QHBoxLayout()
        model_row.addWidget(self.model_combo, 1)
        model_row.addWidget(self.open_model_button)
        form.addRow("Model", model_row)
        form.addRow("", self.trust_check)
        form.addRow("", self.trust_warning)
        form.addRow("Backend", self.backend_combo)
        form.addRow("Channel", self.channel_combo)
        form.addRow("Diameter", self.diameter_spin)
        form.addRow("", self.tta_check)
        return form

    # ------------------------------------------------------------------ public

    @property
    def model_name(self) -> str:
        """The chosen model's name."""
        return self.model_combo.currentData() or ""

    @property
    def backend_name(self) -> str:
        """The chosen backend (``"auto"`` or a registry name)."""
        return self.backend_combo.currentData() or AUTO

    @property
    def channel(self) -> int | None:
        """The chosen channel index, or None for auto."""
        return self.channel_combo.currentData()

    @property
    def trust_code(self) -> bool:
        """Whether model files that contain code (TorchScript) may be converted (in a confined process)."""
        return self.trust_check.isChecked()

    def add_model(self, path: str) -> Model | None:
        """Offer the model card at ``path`` (or a folder holding one) and select it; errors are shown.

        Runs on the calling (GUI) thread: for a model file that needs
        importing, :meth:`open_model` does it in the background.
        """
        try:
            model = get_model(path, trust_code=self.trust_code)
        except Exception as exc:  # noqa: BLE001 - shown to the user: verbatim if expected, as a bug otherwise
            self._show_error(exc)
            return None
        return self._offer(model)

    def open_model(self, path: str) -> None:
        """Import the model at ``path`` on a background thread, then offer and select it (errors are shown)."""
        if self.runner.is_running() or self.import_runner.is_running():
            return
        from pathlib import Path

        self.error_view.clear()
        trust = self.trust_code
        self.status.setText(f"Importing {Path(path).name}..." + (
            " (a file with code is converted in a confined process)" if trust else ""))
        self._set_busy(cancellable=False)
        self.import_runner.start(lambda cancel: _import(path, trust))

    def _on_model_imported(self, model: Model) -> None:
        self._offer(model)
        self.status.setText(f"Opened {model.name}")

    def _on_import_failed(self, exc: BaseException) -> None:
        self.status.setText("Ready")
        self._show_error(exc)

    def _on_trust_toggled(self, checked: bool) -> None:
        if checked:
            from ..core.models.confine import describe_confinement

            try:
                where = describe_confinement()
            except Exception as exc:  # noqa: BLE001 - e.g. an unknown SEGSTUDIO_SANDBOX: say so
                where = f"no confinement is possible ({exc})"
            self.trust_warning.setText(
                "Warning: a TorchScript file is a program. Allow it only from people you trust. segstudio converts "
                f"it to ONNX in a separate process and keeps only the ONNX file. Here: {where}.")
        self.trust_warning.setVisible(checked)

    def _offer(self, model: Model) -> Model:
        key = str(model.card_path)
        if key not in self._models:
            self._models[key] = model
            self.model_combo.addItem(f"{model.name} ({model.card_path.parent.name})", key)
            self.model_combo.setItemData(self.model_combo.count() - 1, key, Qt.ItemDataRole.ToolTipRole)
        self.model_combo.setCurrentIndex(self.model_combo.findData(key))
        self.error_view.clear()
        self._set_idle()
        return model

    def _choose_model(self) -> None:
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getOpenFileName(
            self, "Open a model", "",
            "Models (*.json *.onnx *.pt *.pth *.zip);;Model cards (*.json);;ONNX (*.onnx);;PyTorch (*.pt *.pth);;"
            "BioImage.IO packages (*.zip)")
        if path:
            self.open_model(path)

    def set_channels(self, names: list[str], current: int | None = None) -> None:
        """Offer ``names`` as channels (besides auto); the combo is disabled for one channel."""
        self.channel_combo.clear()
        self.channel_combo.addItem(AUTO, None)
        if len(names) > 1:
            for i, name in enumerate(names):
                self.channel_combo.addItem(f"{i}: {name}", i)
        if current is not None and len(names) > 1:
            self.channel_combo.setCurrentIndex(current + 1)
        self.channel_combo.setEnabled(len(names) > 1 and not self.is_running())

    def run(self) -> None:
        """Fetch the image and start segmenting it in the background."""
        if self.runner.is_running() or self.import_runner.is_running():
            return
        self.error_view.clear()
        try:
            image = self._get_image()
        except Exception as exc:  # noqa: BLE001 - shown to the user: verbatim if expected, as a bug otherwise
            self._show_error(exc)
            return
        model_name, backend_name = self.model_name, self.backend_name
        options = SegmentOptions(channel=self.channel, tile=self._tile, diameter=self.diameter_spin.value() or None,
                                 tta=self.tta_check.isChecked())
        self._n_planes = max(1, math.prod(image.stack_shape))
        self._planes_done = 0
        self._t_start = time.perf_counter()
        self._starting(f"Loading {model_name} ({backend_name})...")
        backends = self._backends
        self.runner.start(lambda cancel: _segment(image, backends, model_name, backend_name, options, cancel))

    def shutdown(self, timeout_ms: int | None = None) -> bool:
        """Cancel a running job (an import runs to its end) and join its thread; True if no thread is left running."""
        segmenting = self.runner.shutdown(timeout_ms)
        return self.import_runner.shutdown(timeout_ms) and segmenting

    # ------------------------------------------------------------------ slots (GUI thread)

    def _on_progress(self, event: Progress) -> None:
        plane = min(self._planes_done + 1, self._n_planes)
        if event.stage is Stage.NETWORK and event.total:
            fraction = (self._planes_done + event.done / event.total) / self._n_planes
            where = f"plane {plane}/{self._n_planes}, " if self._n_planes > 1 else ""
            self.status.setText(f"Segmenting: {where}tiles {event.done}/{event.total}")
        elif event.stage is Stage.PLANE and event.total:
            self._planes_done = event.done
            fraction = event.done / event.total
            self.status.setText(f"Segmenting: {event.message}")
        elif event.stage is Stage.NOTICE:  # notices stay for the whole run (a GPU fallback to the CPU)
            self._add_notice(event.message)
            return
        else:
            if event.message:
                self.status.setText(event.message[:1].upper() + event.message[1:] + "...")
            return
        self.progress_bar.setValue(round(1000 * min(1.0, fraction)))

    def _on_finished(self, result: SegmentationResult) -> None:
        elapsed = time.perf_counter() - self._t_start
        split = ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items())
        self.progress_bar.setValue(1000)
        self.status.setText(f"{result.n_cells} objects in {elapsed:.1f} s ({split})\n{result.backend}")
        self.result_ready.emit(result)

    def _on_cancelled(self) -> None:
        self.progress_bar.setValue(0)
        super()._on_cancelled()

    def _update_backends(self) -> None:
        fill_backends(self.backend_combo, self._models.get(self.model_name))

    def _set_busy(self, cancellable: bool = True) -> None:
        for w in (self.run_button, self.model_combo, self.open_model_button, self.backend_combo, self.channel_combo,
                  self.diameter_spin, self.tta_check, self.trust_check):
            w.setEnabled(False)
        self.cancel_button.setEnabled(cancellable)

    def _set_idle(self) -> None:
        self.run_button.setEnabled(bool(self._models))
        self.model_combo.setEnabled(True)
        self.open_model_button.setEnabled(True)
        self.trust_check.setEnabled(True)
        self.backend_combo.setEnabled(True)
        self.diameter_spin.setEnabled(True)
        self.tta_check.setEnabled(True)
        self.channel_combo.setEnabled(self.channel_combo.count() > 1)
        self.cancel_button.setEnabled(False)
        if not self._models:
            self.status.setText("No built-in model is installed")

    # ------------------------------------------------------------------ lifetime
    #
    # A job must not outlive the window that shows the panel.  The panel
    # filters the events of its ancestors: a ParentChange anywhere up the
    # chain (docking, floating, undocking) re-targets the watch, and a Close
    # of the top-level window stops the job (cancel, then join the thread).

    def event(self, event: QEvent) -> bool:
        """Re-target the window watch when the panel is re-parented or shown."""
        if event.type() in (QEvent.Type.ParentChange, QEvent.Type.Show):
            self._watch_ancestors()
        return super().event(event)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt override
        """Follow re-parenting of ancestors; stop the job when the top-level window closes."""
        kind = event.type()
        if kind == QEvent.Type.ParentChange:
            self._watch_ancestors()
        elif kind == QEvent.Type.Close and watched is self.window() and watched is not self:
            self.shutdown()
        return False

    def _watch_ancestors(self) -> None:
        ancestors = []
        widget = self.parentWidget()
        while widget is not None:
            ancestors.append(widget)
            widget = widget.parentWidget()
        if ancestors == [ref() for ref in self._watched]:
            return
        for ref in self._watched:
            widget = ref()
            if widget is None:
                continue
            try:
                widget.removeEventFilter(self)
            except RuntimeError:  # already deleted
                pass
        for widget in ancestors:
            widget.installEventFilter(self)
        # weak references: the panel must not keep its window alive
        self._watched = [weakref.ref(widget) for widget in ancestors]


def _import(path: str, trust_code: bool) -> Job[Model]:
    """The Open... job, run on a worker thread: find or import the model."""
    yield Progress("load", 0, 0, f"importing {path}")
    return get_model(path, trust_code=trust_code)


def _segment(
    image: ImageData,
    backends: BackendCache,
    model_name: str,
    backend_name: str,
    options: SegmentOptions,
    cancel: CancelToken,
) -> Job[SegmentationResult]:
    """The panel's job, run on the worker thread: load (or reuse) the backend, then segment."""
    yield Progress("load", 0, 0, f"loading {model_name} ({backend_name})")
    model, backend = backends.get(model_name, backend_name)
    cancel.raise_if_cancelled()
    yield Progress("load", 1, 1, f"running on {backend.describe()}")
    job = monitored(segment_job(image, model, backend, options, cancel=cancel), "segment", image.name)
    result = yield from INFERENCE.turn(job, f"the segmentation of {image.name}", cancel)
    return result
