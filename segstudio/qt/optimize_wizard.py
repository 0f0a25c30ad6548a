"""The optimization wizard: make a model faster on the user's own images, page by page.

:class:`OptimizeWizard` is a stack of six pages with Back / Next and a
header ("Step k of 6: ..."):

1. **Model and target** (:class:`ModelPage`): a built-in or imported model,
   or an earlier optimize result (a ``report.json``'s final model or any
   model card); this CPU or this GPU, with the backends found here and what
   each runs (the GPU is offered only when one is visible, else the reason
   is shown).
2. **Calibration images** (:class:`CalibrationPage`): a folder, files or
   the open image layers; the tiles calibration will use, as thumbnails,
   and plain warnings (:func:`~segstudio.core.optimize.calibration.calibration_warnings`).
3. **Validation** (:class:`ValidationPage`): images with labels (a folder of
   pairs, or Labels layers the user corrected) for AP50 against them, or
   images without labels for agreement with the original model; the
   allowed AP50 loss and the minimum speed-up.
4. **Recipe** (:class:`RecipePage`): the presets (core's
   :data:`~segstudio.core.optimize.presets.PRESETS`) with their expected
   time here (:func:`~segstudio.core.optimize.estimate.estimate_job`), and
   an **Advanced** view (:class:`StepEditor`) generated from the steps'
   typed specifications (:data:`~segstudio.core.optimize.steps.STEP_SPECS`):
   no option has GUI code of its own, so an option added in core appears
   here as it does on the command line.
5. **Run** and 6. **Result**: :class:`segstudio.qt.optimize_run.RunPage` and
   :class:`segstudio.qt.optimize_result.ResultPage`.

Next checks the page and says, under the buttons, why it cannot go on.
Everything slow runs on a :class:`~segstudio.qt.worker.JobRunner` thread:
importing a model, probing the backends, reading images and choosing
tiles, making thumbnails, checking the recipe and estimating its time.

The wizard knows neither napari nor its window: the shell fills the hooks of
its :class:`~segstudio.qt.optimize_state.WizardState` and listens to
:attr:`OptimizeWizard.model_added` (a model the user chose to use, already
kept as a user model by :func:`~segstudio.core.models.user.keep_model`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QRadioButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QStackedWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..core.errors import InputError, SegStudioError
from ..core.jobs import Job, Progress
from ..core.models.catalog import Model
from ..core.optimize.calibration import DEFAULT_TILES, CalibrationSource
from ..core.optimize.options import OptionSpec
from ..core.optimize.presets import PRESETS, Preset
from ..core.optimize.steps import STEP_SPECS, Step, format_steps, parse_steps
from ..core.optimize.validate import ValidationSet
from .job_panel import ErrorView
from .optimize_state import WizardState, optimize_root
from .segment_panel import available_models
from .worker import JobRunner, describe_error, with_crash_log

try:  # pages 5 and 6 live in their own modules
    from .optimize_run import RunPage
except ImportError:  # pragma: no cover - a checkout without them still shows pages 1 to 4
    RunPage = None
try:
    from .optimize_result import ResultPage
except ImportError:  # pragma: no cover
    ResultPage = None

TITLES = ("Model and target", "Calibration images", "Validation", "Recipe", "Run", "Result")
THUMB_PX = 64  # thumbnails of the calibration tiles, in screen pixels
MAX_CALIB_IMAGES = 200  # as the command line (--calib-max)
WHY_CALIBRATION = (
    "Why this matters: INT8 keeps each layer's values in 256 steps, and these images decide where the steps go. "
    "Use images like the ones you will segment (same stain, exposure and density, dim and bright regions), or "
    "the faster model will be less accurate on yours.")


def wrapped(text: str = "", *, style: str = "") -> QLabel:
    """A word-wrapped label that fits a narrow dock."""
    label = QLabel(text)
    label.setWordWrap(True)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    label.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
    if style:
        label.setStyleSheet(style)
    return label


WARN_STYLE = "color: #e0a030;"
ERROR_STYLE = "color: #ff6b6b;"
NOTE_STYLE = "color: palette(mid);"


def _describe(exc: BaseException) -> str:
    report = describe_error(exc)
    return report.message + (f" ({report.hint})" if report.hint else "")


# ====================================================================== page base


class WizardPage(QWidget):
    """One page: fills the state on :meth:`commit`; :meth:`problem` says why Next cannot go on."""

    title = ""
    changed = Signal()  # what Next may do changed (validity, busy)

    def __init__(self, state: WizardState, parent: QWidget | None = None):
        super().__init__(parent)
        self.state = state
        self.runner = JobRunner(self)
        self.runner.stopped.connect(self.changed)

    def enter(self) -> None:
        """The page is shown (again): refresh what depends on earlier pages."""

    def problem(self) -> str | None:
        """Why Next cannot go on (None: it can)."""
        return None

    def blocked(self) -> bool:
        """True while Next must stay disabled (a value on the page is refused)."""
        return False

    def commit(self) -> None:
        """Write the page's choices into the state (Next was accepted)."""

    def shutdown(self, timeout_ms: int | None = None) -> bool:
        self._queue_clear()
        return self.runner.shutdown(timeout_ms)

    def _queue_clear(self) -> None:
        """Forget queued work (pages that queue jobs override this)."""


def _folder_row(edit: QLineEdit, button: QPushButton) -> QHBoxLayout:
    row = QHBoxLayout()
    row.setContentsMargins(0, 0, 0, 0)
    row.addWidget(edit, 1)
    row.addWidget(button)
    return row


# ====================================================================== page 1: model and target


@dataclass
class TargetInfo:
    """What this machine can run the model on (probed on a worker thread)."""

    variants: dict[str, list[str]]  # target -> variants that run this model there, best first
    gpu_reason: str | None  # why there is no GPU target, or None
    backends: list[str]  # one line per backend: what it runs here, or that it is not installed
    presets: dict[str, str | None]  # preset key -> why it cannot run here (None: it can)


def _probe(model: Model) -> Job[TargetInfo]:
    """The backends that run ``model`` here, on the CPU and the GPU (PyTorch is imported only where a driver is)."""
    from ..core.backends import REGISTRY, backend_class, gpu_available, installed
    from ..core.optimize.validate import target_variants

    yield Progress("probe", 0, 1, "looking for backends")
    gpu = gpu_available()
    lines = []
    for name in REGISTRY:
        cls = backend_class(name)
        if not installed(cls.package):
            lines.append(f"{name}: not installed")
            continue
        devices = [d for d in cls.devices if gpu or d not in cls.gpu_devices]
        runs = "; ".join(f"{'CPU' if d == 'cpu' else d.upper()} {', '.join(cls.precisions[d])}" for d in devices)
        lines.append(f"{name}: {runs}" if runs else f"{name}: needs a GPU (none here)")
    reason = None
    if not gpu:
        reason = ("PyTorch is not installed, so no GPU can be used" if not installed("torch")
                  else "no NVIDIA GPU is visible on this machine")
    variants = {"cpu": target_variants(model, "cpu"), "gpu": target_variants(model, "gpu") if gpu else []}
    if gpu and not variants["gpu"]:
        reason = f"no installed GPU backend runs {model.name}"
    presets = {p.key: p.unavailable() for p in PRESETS}
    yield Progress("probe", 1, 1)
    return TargetInfo(variants, reason, lines, presets)


def _open_model(path: str) -> Job[Model]:
    """A ``report.json``'s final model, or the model of a card (or any model file, imported)."""
    from ..core.models.catalog import get_model, load_card
    from ..core.optimize.report import OptimizeReport

    yield Progress("load", 0, 1, f"opening {Path(path).name}")
    p = Path(path)
    if p.name == "report.json" or (p.is_dir() and (p / "report.json").is_file()):
        report = OptimizeReport.load(p)
        if report.final.artifact is None:
            raise InputError(f"{p}: the run has no final model")
        card = Path(report.final.artifact)
        if not card.is_absolute():
            card = report.out_dir / card
        return load_card(card)
    return get_model(p)


class ModelPage(WizardPage):
    title = TITLES[0]

    def __init__(self, state: WizardState, parent: QWidget | None = None):
        super().__init__(state, parent)
        self.info: TargetInfo | None = None
        self._infos: dict[str, TargetInfo] = {}
        self._models: dict[str, Model] = {}
        self._probing: str | None = None
        self.runner.finished.connect(self._on_probed)
        self.runner.failed.connect(self._on_probe_failed)
        self.open_runner = JobRunner(self)
        self.open_runner.finished.connect(self._on_opened)
        self.open_runner.failed.connect(self._on_open_failed)
        self.open_runner.stopped.connect(self.changed)

        self.model_combo = QComboBox()
        self.model_combo.setToolTip("a built-in model, one you imported, or an earlier optimize result")
        self.model_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.model_combo.setMinimumContentsLength(12)
        self.open_button = QPushButton("Open...")
        self.open_button.setToolTip("an earlier optimize result (its report.json) or any model card (.json)")
        self.model_info = wrapped()
        self.cpu_radio = QRadioButton("This CPU")
        self.gpu_radio = QRadioButton("This GPU")
        self.cpu_radio.setChecked(True)
        self.target_group = QButtonGroup(self)
        self.target_group.addButton(self.cpu_radio)
        self.target_group.addButton(self.gpu_radio)
        self.gpu_radio.setEnabled(False)
        self.gpu_reason = wrapped(style=NOTE_STYLE)
        self.variants_label = wrapped()
        self.backends_label = wrapped(style=NOTE_STYLE)
        self.error_view = ErrorView()

        form = QFormLayout()
        form.setContentsMargins(0, 0, 0, 0)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        row = QHBoxLayout()
        row.addWidget(self.model_combo, 1)
        row.addWidget(self.open_button)
        form.addRow("Model", row)
        form.addRow("", self.model_info)
        targets = QHBoxLayout()
        targets.addWidget(self.cpu_radio)
        targets.addWidget(self.gpu_radio)
        targets.addStretch(1)
        form.addRow("Target", targets)
        form.addRow("", self.gpu_reason)
        form.addRow("Runs on", self.variants_label)
        form.addRow("Backends", self.backends_label)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.error_view)
        layout.addStretch(1)

        for model in available_models().values():
            self._add(model)
        self.model_combo.currentIndexChanged.connect(self._on_model_changed)
        self.open_button.clicked.connect(self._choose)
        self.target_group.buttonToggled.connect(lambda *_: self._show_info())
        self._on_model_changed()

    # ------------------------------------------------------------------ public

    @property
    def model(self) -> Model | None:
        return self._models.get(self.model_combo.currentData())

    @property
    def target(self) -> str:
        return "gpu" if self.gpu_radio.isChecked() else "cpu"

    def select(self, name_or_card: str) -> None:
        """Choose a listed model by name or card path."""
        for i in range(self.model_combo.count()):
            model = self._models[self.model_combo.itemData(i)]
            if name_or_card in (model.name, str(model.card_path)):
                self.model_combo.setCurrentIndex(i)
                return
        raise ValueError(f"no model {name_or_card!r} in the list")

    def open_path(self, path: str | Path) -> None:
        """Open a ``report.json``, a model card or a model file on a worker thread, then choose it."""
        if self.open_runner.is_running():
            return
        self.error_view.clear()
        self.model_info.setText(f"Opening {Path(path).name}...")
        self.open_runner.start(lambda cancel: _open_model(str(path)))
        self.changed.emit()

    def add_model(self, model: Model) -> None:
        """Offer ``model`` (e.g. one kept from a result) without choosing it."""
        self._add(model)

    # ------------------------------------------------------------------ page

    def problem(self) -> str | None:
        if self.open_runner.is_running():
            return "Opening the model..."
        model = self.model
        if model is None:
            return "Choose a model."
        if self.info is None:
            return "Looking for the backends that run this model..."
        if self.target == "gpu" and self.info.gpu_reason:
            return f"The GPU cannot be the target: {self.info.gpu_reason}."
        if not self.info.variants[self.target]:
            return f"No backend installed here runs {model.name} on the {self.target.upper()}."
        return None

    def commit(self) -> None:
        changed = self.state.model is None or self.state.model.card_path != self.model.card_path
        self.state.model = self.model
        self.state.target = self.target
        self.state.backends = list(self.info.variants[self.target])
        if changed:
            self.state.follow_model_name()

    def shutdown(self, timeout_ms: int | None = None) -> bool:
        opening = self.open_runner.shutdown(timeout_ms)
        return super().shutdown(timeout_ms) and opening

    # ------------------------------------------------------------------ internals

    def _add(self, model: Model) -> None:
        key = str(model.card_path)
        if key in self._models:
            return
        self._models[key] = model
        where = model.card_path.parent.name
        self.model_combo.addItem(model.name if where == "builtin" else f"{model.name} ({where})", key)
        self.model_combo.setItemData(self.model_combo.count() - 1, key, Qt.ItemDataRole.ToolTipRole)

    def _choose(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open an optimize result or a model card", str(optimize_root()),
                                              "Optimize reports and model cards (*.json);;All files (*)")
        if path:
            self.open_path(path)

    def _on_opened(self, model: Model) -> None:
        self._add(model)
        self.model_combo.setCurrentIndex(self.model_combo.findData(str(model.card_path)))
        self._on_model_changed()

    def _on_open_failed(self, exc: BaseException) -> None:
        self.error_view.show_report(with_crash_log(describe_error(exc)))
        self._on_model_changed()

    def _on_model_changed(self, *_) -> None:
        model = self.model
        self.info = None
        if model is None:
            self.model_info.setText("")
            self._show_info()
            return
        spec = model.spec
        made = model.provenance.get("step") if isinstance(model.provenance, dict) else None
        files = ", ".join(sorted(model.files))
        self.model_info.setText(f"{spec.title or spec.name}. Files: {files}."
                                + (f" Made by the {made} step of an earlier run." if made else ""))
        key = str(model.card_path)
        if key in self._infos:
            self.info = self._infos[key]
        elif not self.runner.is_running():
            self._probing = key
            self.runner.start(lambda cancel: _probe(model))
        self._show_info()
        self.changed.emit()

    def _on_probed(self, info: TargetInfo) -> None:
        if self._probing is not None:
            self._infos[self._probing] = info
        self._probing = None
        model = self.model
        if model is not None and str(model.card_path) not in self._infos:
            self._on_model_changed()  # the choice changed while probing: probe the new one
            return
        self.info = info
        self._show_info()
        self.changed.emit()

    def _on_probe_failed(self, exc: BaseException) -> None:
        self._probing = None
        self.error_view.show_report(with_crash_log(describe_error(exc)))

    def _show_info(self) -> None:
        info = self.info
        if info is None:
            self.variants_label.setText("looking..." if self.model is not None else "")
            self.backends_label.setText("")
            self.gpu_reason.setVisible(False)
            return
        self.gpu_radio.setEnabled(info.gpu_reason is None)
        if info.gpu_reason is not None and self.gpu_radio.isChecked():
            self.cpu_radio.setChecked(True)
        self.gpu_reason.setText(f"GPU: {info.gpu_reason}." if info.gpu_reason else "")
        self.gpu_reason.setVisible(info.gpu_reason is not None)
        variants = info.variants[self.target]
        self.variants_label.setText(
            ", ".join(variants) + " (the run measures each and keeps the fastest)" if variants
            else f"nothing installed here runs this model on the {self.target.upper()}")
        self.backends_label.setText("\n".join(info.backends))


# ====================================================================== page 2: calibration


@dataclass
class CalibrationBuild:
    """A calibration set ready to use, with what the page shows of it (made on a worker thread)."""

    source: CalibrationSource
    description: str
    thumbnails: list[tuple[str, int, int, np.ndarray]]  # (entry, y, x, uint8 (h, w))
    warnings: list[str]


def thumbnail(tile: np.ndarray, size: int = THUMB_PX) -> np.ndarray:
    """A ``(1, C, t, t)`` normalized tile as an 8-bit grey picture of about ``size`` pixels (0 and 1 = black, white)."""
    plane = tile[0].mean(axis=0) if tile.shape[1] > 1 else tile[0, 0]
    step = max(1, plane.shape[0] // size)
    small = plane[::step, ::step]
    return np.ascontiguousarray((np.clip(np.nan_to_num(small), 0.0, 1.0) * 255).astype(np.uint8))


def _build_calibration(what: str, value: Any, model: Model, n_tiles: int) -> Job[CalibrationBuild]:
    from ..core.image.sources import read_image
    from ..core.optimize.calibration import calibration_warnings

    yield Progress("calibration", 0, 2, "reading the images")
    kw = dict(n_tiles=n_tiles, max_images=MAX_CALIB_IMAGES)
    if what == "folder":
        source = CalibrationSource.from_folder(value, model.spec, **kw)
    elif what == "files":
        source = CalibrationSource([read_image(p) for p in value], model.spec, **kw)
    else:
        if not value:
            raise InputError("there are no image layers open", hint="open your images in the viewer first")
        source = CalibrationSource.from_arrays(value, model.spec, **kw)
    yield Progress("calibration", 1, 2, "choosing tiles across the images and their intensities")
    chosen = source.chosen_tiles()
    thumbs = [(name, y, x, thumbnail(tile)) for name, y, x, tile in chosen]
    warnings = calibration_warnings(source)
    files = len({name for name, *_ in chosen})
    n_images = len(source.entries)
    description = (f"{len(chosen)} tile{'s' * (len(chosen) != 1)} of {source.tile} px, from {files} of "
                   f"{n_images} image{'s' * (n_images != 1)}"
                   + (f" (fewer than the {n_tiles} asked: the images hold no more tile positions)"
                      if len(chosen) < n_tiles else ""))
    yield Progress("calibration", 2, 2)
    return CalibrationBuild(source, description, thumbs, warnings)


class ThumbnailGrid(QWidget):
    """Small pictures in as many columns as fit the width."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self._labels: list[QLabel] = []
        self._columns = 0
        self._grid = QGridLayout(self)
        self._grid.setContentsMargins(0, 0, 0, 0)
        self._grid.setSpacing(3)
        self._grid.setSizeConstraint(QGridLayout.SizeConstraint.SetNoConstraint)
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Minimum)

    def set_pictures(self, pictures: list[tuple[np.ndarray, str]]) -> None:
        for label in self._labels:
            self._grid.removeWidget(label)
            label.deleteLater()
        self._labels = []
        for data, tip in pictures:
            h, w = data.shape
            image = QImage(data.data, w, h, w, QImage.Format.Format_Grayscale8).copy()
            label = QLabel()
            label.setPixmap(QPixmap.fromImage(image).scaled(
                THUMB_PX, THUMB_PX, Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.SmoothTransformation))
            label.setFixedSize(THUMB_PX, THUMB_PX)
            label.setToolTip(tip)
            self._labels.append(label)
        self._columns = 0
        self._relayout()

    def count(self) -> int:
        return len(self._labels)

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt override
        super().resizeEvent(event)
        self._relayout()

    def _relayout(self) -> None:
        columns = max(1, (self.width() + 3) // (THUMB_PX + 3))
        if columns == self._columns:
            return
        self._columns = columns
        for label in self._labels:
            self._grid.removeWidget(label)
        for i, label in enumerate(self._labels):
            self._grid.addWidget(label, i // columns, i % columns)
        for c in range(self._grid.columnCount()):
            self._grid.setColumnStretch(c, 0)
        self._grid.setColumnStretch(columns, 1)
        # the grid asks for the height of its rows, never for a width (the dock may be narrow)
        rows = math.ceil(len(self._labels) / columns)
        self.setMinimumHeight(max(0, rows * (THUMB_PX + 3) - 3))


SOURCES_CALIB = (("folder", "A folder of images"), ("files", "Image files"), ("layers", "The open image layers"))


class CalibrationPage(WizardPage):
    title = TITLES[1]

    def __init__(self, state: WizardState, parent: QWidget | None = None):
        super().__init__(state, parent)
        self.build: CalibrationBuild | None = None
        self._built_for: tuple | None = None  # (source, model card, tiles) of self.build
        self._building: tuple | None = None
        self._error = ""
        self._files: list[str] = []
        self.runner.finished.connect(self._on_built)
        self.runner.failed.connect(self._on_failed)
        self.runner.progress.connect(lambda p: self.status.setText(p.message[:1].upper() + p.message[1:] + "...")
                                     if p.message else None)

        self.source_combo = QComboBox()
        for key, text in SOURCES_CALIB:
            self.source_combo.addItem(text, key)
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("a folder of your images")
        self.folder_button = QPushButton("Choose...")
        self.files_button = QPushButton("Choose files...")
        self.files_label = wrapped()
        self.layers_button = QPushButton("Use the open image layers")
        self.tiles_spin = QSpinBox()
        self.tiles_spin.setRange(1, 100_000)
        self.tiles_spin.setValue(DEFAULT_TILES)
        self.tiles_spin.setToolTip("how many tiles INT8 calibration measures (the command line's --calib-tiles)")
        self.status = wrapped("No calibration images yet: the INT8 and distillation recipes need them.")
        self.grid = ThumbnailGrid()
        self.warnings_label = wrapped(style=WARN_STYLE)
        self.warnings_label.setVisible(False)
        self.error_view = ErrorView()
        self.why = wrapped(WHY_CALIBRATION, style=NOTE_STYLE)

        self.folder_row = QWidget()
        self.folder_row.setLayout(_folder_row(self.folder_edit, self.folder_button))
        self.files_row = QWidget()
        files = QVBoxLayout(self.files_row)
        files.setContentsMargins(0, 0, 0, 0)
        files.addWidget(self.files_button)
        files.addWidget(self.files_label)
        self.layers_row = QWidget()
        layers = QVBoxLayout(self.layers_row)
        layers.setContentsMargins(0, 0, 0, 0)
        layers.addWidget(self.layers_button)

        form = QFormLayout()
        form.setContentsMargins(0, 0, 0, 0)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        form.addRow("From", self.source_combo)
        form.addRow("", self.folder_row)
        form.addRow("", self.files_row)
        form.addRow("", self.layers_row)
        form.addRow("Tiles", self.tiles_spin)
        layout = QVBoxLayout(self)
        layout.addWidget(self.why)
        layout.addLayout(form)
        layout.addWidget(self.status)
        layout.addWidget(self.warnings_label)
        layout.addWidget(self.error_view)
        layout.addWidget(self.grid)
        layout.addStretch(1)

        self.source_combo.currentIndexChanged.connect(self._on_source_changed)
        self.folder_button.clicked.connect(self._choose_folder)
        self.folder_edit.editingFinished.connect(self.rebuild)
        self.files_button.clicked.connect(self._choose_files)
        self.layers_button.clicked.connect(self.rebuild)
        self.tiles_spin.editingFinished.connect(self.rebuild)
        self._on_source_changed()

    # ------------------------------------------------------------------ public

    @property
    def source_kind(self) -> str:
        return self.source_combo.currentData()

    def set_folder(self, folder: str | Path) -> None:
        """Calibrate on the images of ``folder`` (built in the background)."""
        self.source_combo.setCurrentIndex(self.source_combo.findData("folder"))
        self.folder_edit.setText(str(folder))
        self.rebuild()

    def set_files(self, paths: list[str | Path]) -> None:
        self.source_combo.setCurrentIndex(self.source_combo.findData("files"))
        self._files = [str(p) for p in paths]
        self.files_label.setText(", ".join(Path(p).name for p in self._files))
        self.rebuild()

    def use_layers(self) -> None:
        self.source_combo.setCurrentIndex(self.source_combo.findData("layers"))
        self.rebuild()

    def source_spec(self) -> tuple[str, Any] | None:
        """The images chosen, as ``(kind, value)`` (the validation page can reuse them); None if none."""
        kind = self.source_kind
        if kind == "folder":
            text = self.folder_edit.text().strip()
            return ("folder", str(Path(text).expanduser())) if text else None
        if kind == "files":
            return ("files", list(self._files)) if self._files else None
        return ("layers", self.state.layer_images())

    def thumbnail_count(self) -> int:
        return self.grid.count()

    def warnings(self) -> list[str]:
        return list(self.build.warnings) if self.build is not None else []

    def rebuild(self) -> None:
        """Build the calibration set for the chosen source and model (on a worker; again once it finishes)."""
        if self.runner.is_running() or self.state.model is None:
            return
        spec = self.source_spec()
        if spec is None:
            return
        key = self._key(spec)
        if key == self._built_for and self.build is not None:
            return
        self._error = ""
        self.error_view.clear()
        kind, value = spec
        model, n_tiles = self.state.model, self.tiles_spin.value()
        self._building = key
        self.status.setText("Reading the images...")
        self.runner.start(lambda cancel: _build_calibration(kind, value, model, n_tiles))
        self.changed.emit()

    # ------------------------------------------------------------------ page

    def enter(self) -> None:
        self.rebuild()  # the model (its normalization) may have changed

    def problem(self) -> str | None:
        if self.runner.is_running():
            return "Choosing the calibration tiles..."
        if self._error:
            return f"The calibration images cannot be used: {self._error}"
        spec = self.source_spec()
        if spec is not None and self.build is not None and self._key(spec) != self._built_for:
            return "The calibration set is out of date: press Enter in the folder field or choose the images again."
        return None

    def commit(self) -> None:
        spec = self.source_spec()
        if self.build is not None and spec is not None and self._key(spec) == self._built_for:
            self.state.calib = self.build.source
            self.state.calib_description = self.build.description
        else:
            self.state.calib = None
            self.state.calib_description = ""

    # ------------------------------------------------------------------ internals

    def _key(self, spec) -> tuple:
        kind, value = spec
        if kind == "layers":
            value = tuple((name, getattr(data, "shape", None)) for data, _, name in value)
        elif kind == "files":
            value = tuple(value)
        model = str(self.state.model.card_path) if self.state.model is not None else ""
        return kind, value, model, self.tiles_spin.value()

    def _on_source_changed(self, *_) -> None:
        kind = self.source_kind
        self.folder_row.setVisible(kind == "folder")
        self.files_row.setVisible(kind == "files")
        self.layers_row.setVisible(kind == "layers")
        self.changed.emit()

    def _choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Calibration images", self.folder_edit.text())
        if folder:
            self.set_folder(folder)

    def _choose_files(self) -> None:
        from ..core.image.io import IMAGE_SUFFIXES

        pattern = " ".join(f"*{s}" for s in sorted(IMAGE_SUFFIXES))
        paths, _ = QFileDialog.getOpenFileNames(self, "Calibration images", "", f"Images ({pattern});;All files (*)")
        if paths:
            self.set_files(paths)

    def _on_built(self, build: CalibrationBuild) -> None:
        self.build = build
        self._built_for = self._building
        self.status.setText(f"{build.description}. These are the tiles calibration will measure:")
        self.grid.set_pictures([(data, f"{name}, y {y}, x {x}") for name, y, x, data in build.thumbnails])
        self.warnings_label.setText("\n".join(f"Warning: {w}" for w in build.warnings))
        self.warnings_label.setVisible(bool(build.warnings))
        self.changed.emit()

    def _on_failed(self, exc: BaseException) -> None:
        self.build = None
        self._built_for = None
        self._error = _describe(exc)
        self.status.setText("")
        self.grid.set_pictures([])
        self.warnings_label.setVisible(False)
        self.error_view.show_report(with_crash_log(describe_error(exc)))
        self.changed.emit()


# ====================================================================== page 3: validation


SOURCES_VAL = (
    ("pairs", "A folder of images with labels (X_img / X_labels)"),
    ("layers", "Labels layers you corrected, with their images"),
    ("calib", "The calibration images (no labels)"),
    ("folder", "A folder of images without labels"),
    ("images", "The open image layers (no labels)"),
)


def pair_labels(labels: list[tuple[np.ndarray, str]], images: list[tuple[np.ndarray, Any, str]]
                ) -> list[tuple[int, int | None]]:
    """For each Labels layer, the image layer it belongs to (index into ``images``, or None).

    The image whose name begins the labels' name ("cells labels", "cells
    ground truth" -> "cells"; the longest such name), else the first image of
    the labels' height and width.
    """
    out = []
    for i, (data, name) in enumerate(labels):
        named = [j for j, (_, _, image_name) in enumerate(images) if name.startswith(image_name)]
        if named:
            out.append((i, max(named, key=lambda j: len(images[j][2]))))
            continue
        shape = tuple(np.shape(data)[-2:])
        same = [j for j, (image, axes, _) in enumerate(images) if _plane_shape(image, axes) == shape]
        out.append((i, same[0] if same else None))
    return out


def _plane_shape(data, axes) -> tuple[int, int]:
    shape = tuple(np.shape(data))
    if axes and axes.endswith("C"):
        return shape[-3], shape[-2]
    return shape[-2], shape[-1]


def _build_validation(kind: str, value: Any) -> Job[ValidationSet]:
    from ..core.image.io import as_image
    from ..core.image.sources import read_image

    yield Progress("validation", 0, 1, "reading the validation images")
    if kind == "pairs":
        vset = ValidationSet.from_folders(value, value)
    elif kind == "folder":
        vset = ValidationSet.from_folders(value)
    elif kind == "files":
        images = [read_image(p) for p in value]
        vset = ValidationSet(images, None, [im.name for im in images])
    elif kind == "images":
        if not value:
            raise InputError("there are no image layers open", hint="open your images in the viewer first")
        images = [as_image(data, axes, name=name) for data, axes, name in value]
        vset = ValidationSet(images, None, [im.name for im in images])
    else:  # "layers": [(image (data, axes, name), labels (data, name))]
        if not value:
            raise InputError("no Labels layer is chosen", hint="tick the Labels layers you corrected")
        images, labels = [], []
        for (data, axes, name), (lab, lab_name) in value:
            image = as_image(data, axes, name=name)
            lab = np.asarray(lab)
            if lab.ndim > 2 and lab.size == image.plane_shape[0] * image.plane_shape[1]:
                lab = lab.reshape(image.plane_shape)
            if lab.shape[-2:] != tuple(image.plane_shape):
                raise InputError(f"the labels {lab_name!r} ({lab.shape[-2]} x {lab.shape[-1]}) do not match the "
                                 f"image {name!r} ({image.plane_shape[0]} x {image.plane_shape[1]})")
            images.append(image)
            labels.append(lab.astype(np.int32))
        vset = ValidationSet(images, labels, [im.name for im in images])
    yield Progress("validation", 1, 1)
    return vset


class ValidationPage(WizardPage):
    title = TITLES[2]

    def __init__(self, state: WizardState, calibration: CalibrationPage, parent: QWidget | None = None):
        super().__init__(state, parent)
        self._calibration = calibration
        self.vset: ValidationSet | None = None
        self._built_for: tuple | None = None
        self._building: tuple | None = None
        self._error = ""
        self._pairs: list[tuple] = []
        self.runner.finished.connect(self._on_built)
        self.runner.failed.connect(self._on_failed)

        self.source_combo = QComboBox()
        for key, text in SOURCES_VAL:
            self.source_combo.addItem(text, key)
        self.source_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.source_combo.setMinimumContentsLength(16)
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("a folder")
        self.folder_button = QPushButton("Choose...")
        self.labels_list = QListWidget()
        self.labels_list.setToolTip("tick the Labels layers to validate against; each is paired with its image layer")
        self.labels_list.setMaximumHeight(120)
        self.refresh_button = QPushButton("Refresh layers")
        self.metric_label = wrapped()
        self.status = wrapped()
        self.error_view = ErrorView()
        self.drop_spin = QDoubleSpinBox()
        self.drop_spin.setRange(0.0, 1.0)
        self.drop_spin.setDecimals(3)
        self.drop_spin.setSingleStep(0.005)
        self.drop_spin.setValue(state.max_drop)
        self.drop_spin.setToolTip("a step that lowers AP50 by more than this (from the original) is rolled back")
        self.speed_spin = QDoubleSpinBox()
        self.speed_spin.setRange(1.0, 100.0)
        self.speed_spin.setDecimals(2)
        self.speed_spin.setSingleStep(0.05)
        self.speed_spin.setSuffix(" x")
        self.speed_spin.setValue(state.min_speedup)
        self.speed_spin.setToolTip("a step that does not make the model at least this much faster than before it, "
                                   "on this machine's best backend, is rolled back")

        self.folder_row = QWidget()
        self.folder_row.setLayout(_folder_row(self.folder_edit, self.folder_button))
        self.layers_row = QWidget()
        layers = QVBoxLayout(self.layers_row)
        layers.setContentsMargins(0, 0, 0, 0)
        layers.addWidget(self.labels_list)
        layers.addWidget(self.refresh_button)

        form = QFormLayout()
        form.setContentsMargins(0, 0, 0, 0)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        form.addRow("Images", self.source_combo)
        form.addRow("", self.folder_row)
        form.addRow("", self.layers_row)
        form.addRow("Measures", self.metric_label)
        form.addRow("Largest AP50 loss", self.drop_spin)
        form.addRow("Smallest speed-up", self.speed_spin)
        layout = QVBoxLayout(self)
        layout.addWidget(wrapped("Every step is checked on these images: a step that costs more accuracy than you "
                                 "allow, or does not make the model faster here, is undone.", style=NOTE_STYLE))
        layout.addLayout(form)
        layout.addWidget(self.status)
        layout.addWidget(self.error_view)
        layout.addStretch(1)

        self.source_combo.setCurrentIndex(self.source_combo.findData("calib"))
        self.source_combo.currentIndexChanged.connect(self._on_source_changed)
        self.folder_button.clicked.connect(self._choose_folder)
        self.folder_edit.editingFinished.connect(self.rebuild)
        self.refresh_button.clicked.connect(self._refresh_layers)
        self.labels_list.itemChanged.connect(lambda *_: self.rebuild())
        self._on_source_changed()

    # ------------------------------------------------------------------ public

    @property
    def source_kind(self) -> str:
        return self.source_combo.currentData()

    def set_source(self, kind: str, folder: str | Path | None = None) -> None:
        """Choose a source (``pairs``, ``layers``, ``calib``, ``folder``, ``images``) and build the set."""
        self.source_combo.setCurrentIndex(self.source_combo.findData(kind))
        if folder is not None:
            self.folder_edit.setText(str(folder))
        self.rebuild()

    def source_spec(self) -> tuple[str, Any] | None:
        kind = self.source_kind
        if kind in ("pairs", "folder"):
            text = self.folder_edit.text().strip()
            return (kind, str(Path(text).expanduser())) if text else None
        if kind == "images":
            return "images", self.state.layer_images()
        if kind == "calib":
            spec = self._calibration.source_spec()
            if spec is None:
                return None
            return ({"folder": "folder", "files": "files", "layers": "images"}[spec[0]], spec[1])
        images = self.state.layer_images()
        labels = self.state.layer_labels()
        chosen = []
        for row, (i, j) in enumerate(self._pairs):
            item = self.labels_list.item(row)
            if item is not None and item.checkState() == Qt.CheckState.Checked and j is not None \
                    and i < len(labels) and j < len(images):
                chosen.append((images[j], labels[i]))
        return "layers", chosen

    def rebuild(self) -> None:
        if self.runner.is_running():
            return
        spec = self.source_spec()
        self._show_metric()
        if spec is None:
            return
        key = self._key(spec)
        if key == self._built_for and self.vset is not None:
            return
        self._error = ""
        self.error_view.clear()
        self._building = key
        self.status.setText("Reading the validation images...")
        kind, value = spec
        self.runner.start(lambda cancel: _build_validation(kind, value))
        self.changed.emit()

    # ------------------------------------------------------------------ page

    def enter(self) -> None:
        if self.source_kind == "layers":
            self._refresh_layers()
        self.rebuild()

    def problem(self) -> str | None:
        if self.runner.is_running():
            return "Reading the validation images..."
        if self._error:
            return f"The validation images cannot be used: {self._error}"
        spec = self.source_spec()
        if spec is None:
            if self.source_kind == "calib":
                return "There are no calibration images to validate on: choose validation images here."
            return "Choose a folder of validation images."
        if self.vset is None or self._key(spec) != self._built_for:
            return "The validation set is not read yet: press Enter in the folder field."
        return None

    def commit(self) -> None:
        self.state.vset = self.vset
        self.state.labelled = bool(self.vset is not None and self.vset.has_labels)
        self.state.max_drop = float(self.drop_spin.value())
        self.state.min_speedup = float(self.speed_spin.value())

    # ------------------------------------------------------------------ internals

    def _key(self, spec) -> tuple:
        kind, value = spec
        if isinstance(value, list):
            value = tuple(repr(_shapes(v)) for v in value)
        return kind, value

    def _show_metric(self) -> None:
        labelled = self.source_kind in ("pairs", "layers")
        self.metric_label.setText(
            "AP50 against your labels (cells matched at IoU 0.5 over all cells of either)" if labelled else
            "agreement with the original model: AP50 of the faster model's cells against the original's")

    def _on_source_changed(self, *_) -> None:
        kind = self.source_kind
        self.folder_row.setVisible(kind in ("pairs", "folder"))
        self.layers_row.setVisible(kind == "layers")
        if kind == "layers":
            self._refresh_layers()
        self._show_metric()
        self.rebuild()
        self.changed.emit()

    def _refresh_layers(self) -> None:
        images = self.state.layer_images()
        labels = self.state.layer_labels()
        checked = {self.labels_list.item(r).text() for r in range(self.labels_list.count())
                   if self.labels_list.item(r).checkState() == Qt.CheckState.Checked}
        self._pairs = pair_labels(labels, images)
        self.labels_list.blockSignals(True)
        try:
            self.labels_list.clear()
            for i, j in self._pairs:
                name = labels[i][1]
                text = f"{name}  ->  {images[j][2]}" if j is not None else f"{name}  (no image of its size)"
                item = QListWidgetItem(text)
                item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
                on = j is not None and (text in checked or not checked)
                item.setCheckState(Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)
                if j is None:
                    item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEnabled)
                self.labels_list.addItem(item)
        finally:
            self.labels_list.blockSignals(False)
        if not self._pairs:
            self.status.setText("There are no Labels layers open.")
        self.rebuild()

    def _choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Validation images", self.folder_edit.text())
        if folder:
            self.folder_edit.setText(folder)
            self.rebuild()

    def _on_built(self, vset: ValidationSet) -> None:
        self.vset = vset
        self._built_for = self._building
        n = len(vset.images)
        what = "with labels" if vset.has_labels else "without labels"
        self.status.setText(f"{n} image{'s' * (n != 1)} {what}: "
                            + ", ".join(vset.names[:6]) + (f" and {n - 6} more" if n > 6 else ""))
        self._show_metric()
        self.changed.emit()
        if self._key(self.source_spec() or ("", "")) != self._built_for:
            self.rebuild()

    def _on_failed(self, exc: BaseException) -> None:
        self.vset = None
        self._built_for = None
        self._error = _describe(exc)
        self.status.setText("")
        self.error_view.show_report(with_crash_log(describe_error(exc)))
        self.changed.emit()


def _shapes(v):
    """Something that identifies layer data without hashing the pixels: names and shapes."""
    if isinstance(v, tuple):
        return tuple(_shapes(x) for x in v)
    if isinstance(v, np.ndarray) or hasattr(v, "shape"):
        return ("array", tuple(v.shape), id(v))
    return v


# ====================================================================== page 4: recipe


class GSpinBox(QDoubleSpinBox):
    """A number field that shows values as the command line writes them (``0.002``, ``1e-05``)."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setDecimals(12)

    def textFromValue(self, value: float) -> str:  # noqa: N802 - Qt override
        return f"{value:g}"

    def valueFromText(self, text: str) -> float:  # noqa: N802 - Qt override
        try:
            return float(text.strip())
        except ValueError:
            return self.value()

    def validate(self, text: str, pos: int):
        from qtpy.QtGui import QValidator

        t = text.strip()
        try:
            float(t)
            return QValidator.State.Acceptable, text, pos
        except ValueError:
            if t in ("", "-", "+", ".", "-.") or t.lower().endswith(("e", "e-", "e+")):
                return QValidator.State.Intermediate, text, pos
            return QValidator.State.Invalid, text, pos


class OptionField:
    """The widget of one :class:`OptionSpec`, chosen by its kind; its value is parsed by the spec."""

    def __init__(self, spec: OptionSpec, value: Any, where: str):
        self.spec = spec
        self.where = where
        if spec.kind is bool:
            w = QCheckBox()
            w.setChecked(bool(value))
        elif spec.choices is not None:
            w = QComboBox()
            w.addItems(list(spec.choices))
            w.setCurrentText(str(value))
        elif spec.kind is int:
            w = QSpinBox()
            lo = int(spec.low) if spec.low is not None else -(2**31 - 1)
            hi = int(spec.high) if spec.high is not None else 2**31 - 1
            w.setRange(lo, hi)
            w.setGroupSeparatorShown(abs(hi) >= 10_000 and spec.high is not None)
            w.setValue(int(value))
        elif spec.kind is float:
            w = GSpinBox()
            w.setRange(spec.low if spec.low is not None else -1e15, spec.high if spec.high is not None else 1e15)
            if spec.low is not None and spec.high is not None and spec.high - spec.low <= 1:
                w.setSingleStep(0.05)
            else:
                w.setSingleStep(max(abs(float(spec.default)) / 10, 1e-6) if spec.default else 1.0)
            w.setValue(float(value))
        else:
            w = QLineEdit(str(value))
        w.setToolTip(f"{spec.help}\n{spec.name}: {spec.allowed()} (default {spec.text(spec.default)})".strip())
        self.widget = w

    def raw(self) -> Any:
        w = self.widget
        if isinstance(w, QCheckBox):
            return w.isChecked()
        if isinstance(w, QComboBox):
            return w.currentText()
        if isinstance(w, (QSpinBox, QDoubleSpinBox)):
            return w.value()
        return w.text()

    def set_raw(self, value: Any) -> None:
        """Put ``value`` in the field as a user would (text for a text field)."""
        w = self.widget
        if isinstance(w, QCheckBox):
            w.setChecked(bool(value))
        elif isinstance(w, QComboBox):
            w.setCurrentText(str(value))
        elif isinstance(w, (QSpinBox, QDoubleSpinBox)):
            w.setValue(value)
        else:
            w.setText(str(value))
            w.editingFinished.emit()

    def parse(self) -> Any:
        return self.spec.parse(self.raw(), self.where)

    def connect(self, slot) -> None:
        w = self.widget
        if isinstance(w, QCheckBox):
            w.toggled.connect(slot)
        elif isinstance(w, QComboBox):
            w.currentIndexChanged.connect(slot)
        elif isinstance(w, (QSpinBox, QDoubleSpinBox)):
            w.valueChanged.connect(slot)
        else:
            w.editingFinished.connect(slot)


class StepBox(QGroupBox):
    """One step of the recipe: a field per option of its spec, each with its refusal under it."""

    removed = Signal(object)
    edited = Signal()

    def __init__(self, step: Step, index: int, parent: QWidget | None = None):
        spec = step.spec
        super().__init__(f"{index + 1}. {spec.title} ({spec.name})", parent)
        self.spec = spec
        self.had_arg = step.arg is not None
        self.setToolTip(spec.doc)
        self.fields: list[OptionField] = []
        self.errors: dict[str, QLabel] = {}
        form = QFormLayout(self)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        form.addRow(wrapped(spec.doc, style=NOTE_STYLE))
        specs = ([spec.argument] if spec.argument is not None else []) + list(spec.options)
        for i, option in enumerate(specs):
            value = step.value if i == 0 and spec.argument is not None else step.opts.get(option.name, option.default)
            where = f"{spec.name}'s {option.name}" if i == 0 and spec.argument is not None else \
                f"{spec.name}:{option.name}"
            field_ = OptionField(option, value, where)
            field_.connect(lambda *_: self.edited.emit())
            label = QLabel(option.name)
            label.setToolTip(field_.widget.toolTip())
            form.addRow(label, field_.widget)
            error = wrapped(style=ERROR_STYLE)
            error.setVisible(False)
            form.addRow(error)
            self.errors[option.name] = error
            self.fields.append(field_)
        self.remove_button = QPushButton("Remove this step")
        self.remove_button.clicked.connect(lambda: self.removed.emit(self))
        form.addRow(self.remove_button)

    def field(self, name: str) -> OptionField:
        return next(f for f in self.fields if f.spec.name == name)

    def make(self) -> tuple[Step | None, list[str]]:
        """The step these fields describe, or None and the refusals (also shown under the fields)."""
        problems = []
        values = {}
        for f in self.fields:
            try:
                values[f.spec.name] = f.parse()
                self.errors[f.spec.name].setVisible(False)
            except SegStudioError as e:
                self.errors[f.spec.name].setText(e.message)
                self.errors[f.spec.name].setVisible(True)
                problems.append(e.message)
        if problems:
            return None, problems
        arg = None
        opts = {}
        for i, f in enumerate(self.fields):
            value = values[f.spec.name]
            if i == 0 and self.spec.argument is not None:
                arg = value if (self.had_arg or value != f.spec.default) else None
            elif value != f.spec.default:
                opts[f.spec.name] = value
        try:
            return self.spec.make(arg, **opts), []
        except SegStudioError as e:
            return None, [f"{self.spec.name}: {e.message}"]


class StepEditor(QWidget):
    """The Advanced view: the recipe's steps, each a :class:`StepBox` made from its spec; add and remove steps."""

    changed = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.boxes: list[StepBox] = []
        self._steps: list[Step] = []
        self._problems: list[str] = []
        self._list = QVBoxLayout()
        self._list.setContentsMargins(0, 0, 0, 0)
        self.add_combo = QComboBox()
        for name, spec in STEP_SPECS.items():
            self.add_combo.addItem(f"{spec.title} ({name})", name)
            self.add_combo.setItemData(self.add_combo.count() - 1, spec.doc, Qt.ItemDataRole.ToolTipRole)
        self.add_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.add_combo.setMinimumContentsLength(12)
        self.add_button = QPushButton("Add step")
        add = QHBoxLayout()
        add.addWidget(self.add_combo, 1)
        add.addWidget(self.add_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(self._list)
        layout.addLayout(add)
        self.add_button.clicked.connect(lambda: self.add_step(self.add_combo.currentData()))

    def set_steps(self, steps: list[Step]) -> None:
        for box in self.boxes:
            self._list.removeWidget(box)
            box.deleteLater()
        self.boxes = []
        for step in steps:
            self._append(step)
        self._update(emit=False)

    def add_step(self, name: str) -> None:
        self._append(STEP_SPECS[name].make())
        self._update()

    def steps(self) -> list[Step]:
        return list(self._steps)

    def problems(self) -> list[str]:
        return list(self._problems)

    def box(self, index: int) -> StepBox:
        return self.boxes[index]

    def _append(self, step: Step) -> None:
        box = StepBox(step, len(self.boxes))
        box.removed.connect(self._remove)
        box.edited.connect(self._update)
        self.boxes.append(box)
        self._list.addWidget(box)

    def _remove(self, box: StepBox) -> None:
        self.boxes.remove(box)
        self._list.removeWidget(box)
        box.deleteLater()
        for i, b in enumerate(self.boxes):
            b.setTitle(f"{i + 1}. {b.spec.title} ({b.spec.name})")
        self._update()

    def _update(self, *_, emit: bool = True) -> None:
        steps, problems = [], []
        for box in self.boxes:
            step, refused = box.make()
            problems += refused
            if step is not None:
                steps.append(step)
        if not self.boxes:
            problems.append("The recipe has no step: add one.")
        self._steps, self._problems = (steps if not problems else []), problems
        if emit:
            self.changed.emit()


@dataclass
class RecipeCheck:
    """What the worker found about a recipe: why its steps cannot run here (empty: they can)."""

    key: str
    problems: list[str] = field(default_factory=list)


def _check_recipe(key: str, steps: list[Step], state: WizardState) -> Job[RecipeCheck]:
    """Each step's own check (:meth:`Step.check`) against the chosen model, calibration and target."""
    from ..core.optimize.steps import Context

    yield Progress("check", 0, len(steps), "checking the recipe")
    ctx = Context(original=state.model, calib=state.calib, out_dir=Path(state.out_dir), target=state.target)
    problems = []
    for i, step in enumerate(steps):
        for p in step.check(state.model, ctx):
            problems.append(f"Step {i + 1} ({step.label}) cannot run here: {p}.")
        yield Progress("check", i + 1, len(steps))
    return RecipeCheck(key, problems)


def cancellable(job: Job, cancel) -> Job:
    """``job``, stopped at its next event once ``cancel`` is set (for core jobs that take no token)."""
    while True:
        cancel.raise_if_cancelled()
        try:
            event = next(job)
        except StopIteration as stop:
            return stop.value
        yield event


def _estimate(recipes: list[tuple[str, list[Step]]], state: WizardState, cancel) -> Job[dict]:
    """The run time of each recipe here (:func:`estimate_job`), or why it could not be estimated."""
    from ..core.optimize.estimate import estimate_job

    out: dict[str, Any] = {}
    for key, steps in recipes:
        try:
            job = estimate_job(state.model, steps, state.calib, state.vset, target=state.target,
                               speed_tile=state.speed_tile)
            out[key] = yield from cancellable(job, cancel)
        except SegStudioError as e:
            out[key] = e
    return out


class RecipePage(WizardPage):
    title = TITLES[3]

    def __init__(self, state: WizardState, model_page: ModelPage, parent: QWidget | None = None):
        super().__init__(state, parent)
        self._model_page = model_page
        self._checks: dict[str, RecipeCheck] = {}
        self._estimates: dict[str, Any] = {}  # recipe text -> RunEstimate or SegStudioError
        self._inputs: tuple | None = None
        self._queue: list[tuple[str, Any]] = []
        self._job_kind = ""
        self._preset_steps: dict[str, list[Step]] = {p.key: parse_steps(p.steps) for p in PRESETS}
        self.runner.finished.connect(self._on_job_finished)
        self.runner.failed.connect(self._on_job_failed)
        self.runner.stopped.connect(self._pump)
        self._debounce = QTimer(self)  # an edit checks and estimates the recipe once typing pauses
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(400)
        self._debounce.timeout.connect(self._refresh_recipe)

        self.preset_group = QButtonGroup(self)
        self.radios: dict[str, QRadioButton] = {}
        self.times: dict[str, QLabel] = {}
        self.reasons: dict[str, QLabel] = {}
        presets = QVBoxLayout()
        presets.setSpacing(2)
        for p in PRESETS:
            radio = QRadioButton(p.title)
            radio.setToolTip(f"steps: {p.steps}")
            self.preset_group.addButton(radio)
            self.radios[p.key] = radio
            sentence = wrapped(p.sentence, style=NOTE_STYLE)
            sentence.setContentsMargins(22, 0, 0, 0)
            when = wrapped()
            when.setContentsMargins(22, 0, 0, 6)
            self.times[p.key] = when
            presets.addWidget(radio)
            presets.addWidget(sentence)
            presets.addWidget(when)
            radio.toggled.connect(lambda on, key=p.key: on and self._on_preset(key))
        self.custom_radio = QRadioButton("Custom recipe (edited in Advanced)")
        self.preset_group.addButton(self.custom_radio)
        self.custom_radio.setEnabled(False)
        presets.addWidget(self.custom_radio)

        self.advanced_button = QToolButton()
        self.advanced_button.setText("Advanced: every option of every step")
        self.advanced_button.setCheckable(True)
        self.advanced_button.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.advanced_button.setArrowType(Qt.ArrowType.RightArrow)
        self.editor = StepEditor()
        self.editor.setVisible(False)
        self.recipe_label = wrapped()
        self.estimate_label = wrapped()
        self.problems_label = wrapped(style=ERROR_STYLE)
        self.problems_label.setVisible(False)
        self.out_edit = QLineEdit()
        self.out_edit.setToolTip("the run's models, report.json and report.html go here")
        self.out_button = QPushButton("Choose...")

        out = QFormLayout()
        out.setContentsMargins(0, 0, 0, 0)
        out.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        out.addRow("Output", _folder_row(self.out_edit, self.out_button))
        layout = QVBoxLayout(self)
        layout.addLayout(presets)
        layout.addWidget(self.advanced_button)
        layout.addWidget(self.editor)
        layout.addWidget(self.recipe_label)
        layout.addWidget(self.estimate_label)
        layout.addWidget(self.problems_label)
        layout.addLayout(out)
        layout.addStretch(1)

        self.advanced_button.toggled.connect(self._on_advanced)
        self.editor.changed.connect(self._on_edited)
        self.out_button.clicked.connect(self._choose_out)
        start = state.preset_key if state.preset_key in self.radios else PRESETS[0].key
        self.radios[start].setChecked(True)

    # ------------------------------------------------------------------ public

    @property
    def preset_key(self) -> str | None:
        for key, radio in self.radios.items():
            if radio.isChecked():
                return key
        return None

    def choose(self, key: str) -> None:
        self.radios[key].setChecked(True)

    def steps(self) -> list[Step]:
        return self.editor.steps()

    def recipe_text(self) -> str:
        steps = self.steps()
        return format_steps(steps) if steps else ""

    def check_for(self, text: str) -> RecipeCheck | None:
        return self._checks.get(text)

    def estimate_for(self, text: str):
        return self._estimates.get(text)

    def _queue_clear(self) -> None:
        self._debounce.stop()
        self._queue.clear()

    def is_checking(self) -> bool:
        return self.runner.is_running() or bool(self._queue)

    # ------------------------------------------------------------------ page

    def enter(self) -> None:
        inputs = (str(self.state.model.card_path) if self.state.model else "", self.state.target,
                  id(self.state.calib), id(self.state.vset))
        if inputs != self._inputs:  # what the checks and estimates depend on changed
            self._inputs = inputs
            self._checks.clear()
            self._estimates.clear()
        if not self.state.out_dir_chosen or not self.out_edit.text():
            self.out_edit.setText(str(self.state.out_dir))
        self._show_availability()
        self._request_current()
        info = self._model_page.info
        others = [(format_steps(self._preset_steps[p.key]), self._preset_steps[p.key]) for p in PRESETS
                  if p.target == self.state.target and (info is None or info.presets.get(p.key) is None)]
        self._queue.append(("estimate", others))
        self._pump()
        self._show()

    def blocked(self) -> bool:
        return bool(self.editor.problems())

    def problem(self) -> str | None:
        if self.editor.problems():
            return "A value is refused: " + " ".join(self.editor.problems())
        text = self.recipe_text()
        if not text:
            return "Choose a recipe."
        key = self.preset_key
        info = self._model_page.info
        if key is not None and info is not None and info.presets.get(key):
            return f"{PRESETS_BY_KEY[key].title} cannot run here: {info.presets[key]}."
        if not self.out_edit.text().strip():
            return "Choose an output folder."
        check = self._checks.get(text)
        if check is None:
            return "Checking the recipe..."
        if check.problems:
            return "\n".join(check.problems)
        return None

    def commit(self) -> None:
        text = self.recipe_text()
        self.state.steps = self.steps()
        self.state.preset_key = self.preset_key
        estimate = self._estimates.get(text)
        from ..core.optimize.estimate import RunEstimate

        self.state.estimate = estimate if isinstance(estimate, RunEstimate) else None
        out = Path(self.out_edit.text().strip()).expanduser()
        if out != Path(self.state.out_dir):
            self.state.out_dir = out
            self.state.out_dir_chosen = True

    # ------------------------------------------------------------------ internals

    def _on_preset(self, key: str) -> None:
        self.editor.set_steps(parse_steps(PRESETS_BY_KEY[key].steps))
        self.custom_radio.setEnabled(False)
        self._request_current()
        self._pump()
        self._show()
        self.changed.emit()

    def _on_edited(self) -> None:
        steps = self.steps()
        preset = self.preset_key
        if preset is None or not steps or format_steps(steps) != format_steps(self._preset_steps[preset]):
            self.custom_radio.setEnabled(True)
            self.custom_radio.setChecked(True)
        self._show()
        self.changed.emit()
        self._debounce.start()

    def _refresh_recipe(self) -> None:
        self._request_current()
        self._pump()
        self._show()

    def _on_advanced(self, on: bool) -> None:
        self.editor.setVisible(on)
        self.advanced_button.setArrowType(Qt.ArrowType.DownArrow if on else Qt.ArrowType.RightArrow)

    def _choose_out(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Output folder", str(optimize_root()))
        if folder:
            self.out_edit.setText(folder)
            self.changed.emit()

    def _request_current(self) -> None:
        steps = self.steps()
        if not steps or self.state.model is None:
            return
        text = format_steps(steps)
        # requests for recipes edited since are dropped (the presets' estimates stay queued)
        self._queue = [(k, v) for k, v in self._queue if (k == "estimate" and len(v) != 1) or
                       (v[0] == text if k == "check" else v[0][0] == text)]
        if text not in self._checks and not any(k == "check" and v[0] == text for k, v in self._queue):
            self._queue.insert(0, ("check", (text, steps)))
        if text not in self._estimates and self.state.vset is not None and \
                not any(k == "estimate" and len(v) == 1 and v[0][0] == text for k, v in self._queue):
            self._queue.insert(1, ("estimate", [(text, steps)]))

    def _pump(self) -> None:
        if self.runner.is_running() or not self._queue or self.state.model is None:
            return
        kind, value = self._queue.pop(0)
        state = self.state
        if kind == "check":
            text, steps = value
            if text in self._checks:
                return self._pump()
            self._job_kind = "check"
            self.runner.start(lambda cancel: _check_recipe(text, steps, state))
        else:
            todo = [(text, steps) for text, steps in value if text not in self._estimates]
            if not todo or state.vset is None:
                return self._pump()
            self._job_kind = "estimate"
            self.runner.start(lambda cancel: _estimate(todo, state, cancel))
        self._show()

    def _on_job_finished(self, result) -> None:
        if isinstance(result, RecipeCheck):
            self._checks[result.key] = result
        else:
            self._estimates.update(result)
        self._show()
        self.changed.emit()

    def _on_job_failed(self, exc: BaseException) -> None:
        if self._job_kind == "check":
            text = self.recipe_text()
            self._checks[text] = RecipeCheck(text, [f"The recipe could not be checked: {_describe(exc)}"])
        else:
            self.estimate_label.setText(f"The run time could not be estimated: {_describe(exc)}")
        self._show()
        self.changed.emit()

    def _show_availability(self) -> None:
        info = self._model_page.info
        for p in PRESETS:
            reason = info.presets.get(p.key) if info is not None else None
            if reason is None and p.target != self.state.target:
                reason = f"for a {p.target.upper()} target (step 1)"
            self.radios[p.key].setEnabled(reason is None)
            self.times[p.key].setProperty("reason", reason)
        if not self.radios[self.preset_key or PRESETS[0].key].isEnabled() and self.preset_key is not None:
            for p in PRESETS:
                if self.radios[p.key].isEnabled():
                    self.radios[p.key].setChecked(True)
                    break

    def _show(self) -> None:
        from ..core.optimize.estimate import RunEstimate, format_seconds

        for p in PRESETS:
            reason = self.times[p.key].property("reason")
            label = self.times[p.key]
            if reason:
                label.setText(f"Not here: {reason}.")
                label.setStyleSheet(WARN_STYLE)
                continue
            label.setStyleSheet("")
            est = self._estimates.get(format_steps(self._preset_steps[p.key]))
            if isinstance(est, RunEstimate):
                label.setText(f"Expected here: about {format_seconds(est.total_s)}")
            elif est is not None:
                label.setText(f"No estimate: {_describe(est)}")
            else:
                label.setText("Expected here: measuring..." if self.state.vset is not None else "")
        text = self.recipe_text()
        self.recipe_label.setText(f"Steps: {text}" if text else "")
        est = self._estimates.get(text)
        if isinstance(est, RunEstimate):
            self.estimate_label.setText(f"This recipe: {est.describe()}.")
        elif est is not None:
            self.estimate_label.setText(f"No estimate for this recipe: {_describe(est)}")
        else:
            self.estimate_label.setText("This recipe: estimating the run time..." if text else "")
        problems = self.editor.problems() or (self._checks[text].problems if text in self._checks else [])
        self.problems_label.setText("\n".join(problems))
        self.problems_label.setVisible(bool(problems))


PRESETS_BY_KEY: dict[str, Preset] = {p.key: p for p in PRESETS}


# ====================================================================== the wizard


class OptimizeWizard(QWidget):
    """The six pages, Back / Next, the header and the reason Next cannot go on.

    Signals
    -------
    model_added(Model)
        The user chose to use a model (from the result page): it is kept as a
        user model already; the shell offers it in the Segment and Batch lists.
    comparison_ready(object)
        The result page compared two models on the current image
        (:class:`segstudio.qt.optimize_result.CompareResult`); its overlay is
        already shown through the state's ``add_labels`` hook.
    page_changed(int)
        The page shown (0 to 5).
    """

    model_added = Signal(object)
    comparison_ready = Signal(object)
    page_changed = Signal(int)

    def __init__(self, state: WizardState | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        self.state = state or WizardState()
        self.state.use_model = self.use_model
        self.keep_runner = JobRunner(self)
        self.keep_runner.finished.connect(self._on_kept)
        self.keep_runner.failed.connect(lambda e: self.reason.setText(f"The model could not be kept: {_describe(e)}"))

        self.model_page = ModelPage(self.state)
        self.calibration_page = CalibrationPage(self.state)
        self.validation_page = ValidationPage(self.state, self.calibration_page)
        self.recipe_page = RecipePage(self.state, self.model_page)
        self.setup_pages: list[WizardPage] = [self.model_page, self.calibration_page, self.validation_page,
                                              self.recipe_page]
        self.run_page = RunPage(self.state) if RunPage is not None else None
        self.result_page = None
        if ResultPage is not None:
            self.result_page = ResultPage(self.state, self._current_image)
            # the page calls state.use_model and state.add_labels itself; its signals are passed on
            self.result_page.comparison_ready.connect(self.comparison_ready)
        if self.run_page is not None:
            self.run_page.finished.connect(self._on_run_finished)
            self.run_page.running_changed.connect(lambda running: self._update_buttons())

        self.header = QLabel()
        self.header.setWordWrap(True)
        font = self.header.font()
        font.setBold(True)
        font.setPointSizeF(font.pointSizeF() * 1.15)
        self.header.setFont(font)
        self.stack = QStackedWidget()
        for page in self.setup_pages:
            scroll = QScrollArea()
            scroll.setWidgetResizable(True)
            scroll.setFrameShape(QFrame.Shape.NoFrame)
            scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
            scroll.setWidget(page)
            self.stack.addWidget(scroll)
            page.changed.connect(self._update_buttons)
        for page in (self.run_page, self.result_page):
            if page is not None:
                self.stack.addWidget(page)
        self.reason = wrapped(style=ERROR_STYLE)
        self.back_button = QPushButton("Back")
        self.next_button = QPushButton("Next")
        self.next_button.setDefault(True)
        buttons = QHBoxLayout()
        buttons.addWidget(self.back_button)
        buttons.addStretch(1)
        buttons.addWidget(self.next_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.header)
        layout.addWidget(self.stack, 1)
        layout.addWidget(self.reason)
        layout.addLayout(buttons)

        self.back_button.clicked.connect(self.back)
        self.next_button.clicked.connect(self.next)
        self._index = 0
        self._show(0)

    # ------------------------------------------------------------------ navigation

    @property
    def index(self) -> int:
        return self._index

    def page(self, index: int | None = None) -> QWidget:
        i = self._index if index is None else index
        return self.setup_pages[i] if i < len(self.setup_pages) else (self.run_page, self.result_page)[i - 4]

    def next(self) -> bool:
        """Go on if the page allows it; else show why.  True if the wizard moved on."""
        i = self._index
        if i < len(self.setup_pages):
            page = self.setup_pages[i]
            why = page.problem()
            if why:
                self.reason.setText(why)
                return False
            page.commit()
            if i + 1 >= self.stack.count():
                self.reason.setText("The run page is not installed in this version.")
                return False
            self._show(i + 1)
            return True
        if i == 4:
            report = getattr(self.run_page, "report", None)
            if report is None or self.result_page is None:
                self.reason.setText("Start the run first; the result follows when it finishes.")
                return False
            self._show(5)
            return True
        return False

    def back(self) -> None:
        if self._index > 0 and not (self.run_page is not None and self.run_page.is_running()):
            self._show(self._index - 1)

    def _show(self, index: int) -> None:
        self._index = index
        self.stack.setCurrentIndex(index)
        self.header.setText(f"Step {index + 1} of {len(TITLES)}: {TITLES[index]}")
        self.reason.setText("")
        if index < len(self.setup_pages):
            self.setup_pages[index].enter()
        elif index == 4 and self.run_page is not None and not self.run_page.is_running():
            self.run_page.reset()
        self._update_buttons()
        self.page_changed.emit(index)

    def _update_buttons(self) -> None:
        i = self._index
        running = self.run_page is not None and self.run_page.is_running()
        self.back_button.setEnabled(i > 0 and not running)
        self.next_button.setVisible(i < len(TITLES) - 1)
        if i < len(self.setup_pages):
            page = self.setup_pages[i]
            self.next_button.setEnabled(not page.blocked())
            if self.reason.text() and not page.problem():
                self.reason.setText("")
        else:
            self.next_button.setEnabled(not running and getattr(self.run_page, "report", None) is not None)

    def _on_run_finished(self, report) -> None:
        if self.result_page is not None:
            self.result_page.show_report(report)
            self._show(5)

    # ------------------------------------------------------------------ shell hooks

    def current_image(self):
        """The shell's current image layer as ImageData, or None."""
        return self.state.current_image()

    def _current_image(self):
        image = self.state.current_image()
        if image is None:
            raise InputError("there is no image layer to compare on", hint="open an image, or choose one")
        return image

    def add_labels(self, data, name: str, colors=None):
        """Show labels through the shell (``colors``: label value -> colour)."""
        return self.state.add_labels(data, name, colors)

    def use_model(self, model) -> None:
        """Keep ``model`` (a Model or a card path) as a user model on a worker, then emit :attr:`model_added`."""
        if self.keep_runner.is_running():
            return
        card = model.card_path if isinstance(model, Model) else Path(model)

        def job(cancel):
            from ..core.models.user import keep_model

            yield Progress("keep", 0, 1, "keeping the model")
            return keep_model(card)

        self.keep_runner.start(job)

    def _on_kept(self, model: Model) -> None:
        self.model_page.add_model(model)
        self.model_added.emit(model)

    # ------------------------------------------------------------------ lifetime

    def shutdown(self, timeout_ms: int | None = None) -> bool:
        """Cancel every job of every page and join the threads; True if none is left running."""
        ok = self.keep_runner.shutdown(timeout_ms)
        for page in [*self.setup_pages, self.run_page, self.result_page]:
            if page is not None and hasattr(page, "shutdown"):
                ok = page.shutdown(timeout_ms) and ok
        return ok

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        self.shutdown()
        super().closeEvent(event)
