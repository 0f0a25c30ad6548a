"""Page 6 of the optimization wizard: the result, and a comparison on the user's image.

:class:`ResultPage` shows an :class:`~segstudio.core.optimize.report.OptimizeReport`:

* a table of the original and every step: AP50, its change, speed-up
  against PyTorch eager FP32, latency, backend, file size, parameters,
  FLOPs per tile, and why the step was kept or rolled back (all
  :class:`StepReport` attributes); a selected row is spelled out under it;
* the **chosen model** (the run's final model), and **Roll back to** a
  kept intermediate step (or the original): that step's artifact becomes
  the chosen model;
* **Compare on this image**: the original and the chosen model segment the
  current image on a worker thread (backends from the shared
  :class:`~segstudio.qt.segment_panel.BackendCache`, so the second compare
  loads nothing) with :func:`~segstudio.core.tasks.compare.compare_job`; the counts
  (only in the original, only in the optimized model, matched with IoU <
  0.8) and both latencies are shown and ``comparison_ready`` carries the
  :class:`~segstudio.core.tasks.compare.Comparison`; the overlay goes to the
  shell's ``state.add_labels`` hook as a three-colour labels layer
  (:data:`OVERLAY_COLOURS`);
* **Use this model** calls the wizard's ``state.use_model`` hook (keep it
  as a user model, add it to the Segment and Batch lists) and emits
  ``model_added(Model)``;
* **Open report** opens ``report.html``; **Export** copies the chosen
  model's folder or its ONNX file where the user says.

The page does not know napari: the image comes from ``get_image()`` or
the state's ``current_image()`` hook (called on the GUI thread when
Compare is pressed; it may raise a
:class:`~segstudio.core.errors.SegStudioError`, shown on the page).
"""

from __future__ import annotations

import html
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qtpy.QtCore import Qt, QUrl, Signal
from qtpy.QtGui import QDesktopServices
from qtpy.QtWidgets import (
    QFileDialog,
    QGridLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from ..core.errors import InputError
from ..core.jobs import CancelToken, Job, Progress
from ..core.models.catalog import Model, load_card
from ..core.optimize.report import OptimizeReport, StepReport, StepStatus
from ..core.tasks.compare import Comparison, compare_job
from .job_panel import ErrorView
from .optimize_run import STATUS_COLOURS, fit_rows, fmt, fmt_duration, set_cell, status_words, table
from .segment_panel import AUTO, BackendCache
from .worker import JobRunner, describe_error, with_crash_log

# the disagreement overlay's values and colours (0 is transparent)
OVERLAY_NAMES = {1: "only in the original", 2: "only in the optimized model", 3: "matched, IoU < 0.8"}
OVERLAY_COLOURS = {1: "#ff3df5", 2: "#35d435", 3: "#ffb000"}
ONNX_KINDS = ("onnx_int8", "onnx_fp16", "onnx")  # the file the chosen model runs, most specific first


@dataclass(frozen=True)
class CompareResult:
    """What Compare produced: the comparison and the two models' names (for layer names)."""

    comparison: Comparison
    original: str
    optimized: str


def _compare(image, backends: BackendCache, key_a: str, key_b: str, cancel: CancelToken) -> Job[Comparison]:
    """The Compare job, on the worker thread: ready both backends (cached), then compare."""
    yield Progress("load", 0, 2, "loading the original model")
    model_a, backend_a = backends.get(key_a, AUTO)
    cancel.raise_if_cancelled()
    yield Progress("load", 1, 2, "loading the optimized model")
    model_b, backend_b = backends.get(key_b, AUTO)
    cancel.raise_if_cancelled()
    yield Progress("load", 2, 2, "segmenting")
    return (yield from compare_job(image, model_a, backend_a, model_b, backend_b, cancel))


def _copy(source: Path, dest: Path, folder: bool) -> Job[Path]:
    """Copy a model folder or file (a job, so a slow disk does not hold the window)."""
    yield Progress("export", 0, 1, f"copying to {dest}")
    if folder:
        if dest.exists() and any(dest.iterdir()):
            raise InputError(f"{dest} is not empty", hint="choose a new or empty folder")
        shutil.copytree(source, dest, dirs_exist_ok=True)
    else:
        shutil.copy2(source, dest)
    yield Progress("export", 1, 1)
    return dest


class ResultPage(QWidget):
    """The report, the chosen model and the comparison (see the module docstring).

    Signals
    -------
    model_added(Model)
        "Use this model": the chosen model.
    comparison_ready(CompareResult)
        A comparison finished (the shell shows its overlay).
    chosen_changed(StepReport)
        The chosen model changed (the run's final model, or a rolled-back-to row).
    """

    model_added = Signal(object)
    comparison_ready = Signal(object)
    chosen_changed = Signal(object)

    COLUMNS = ["Step", "Status", "AP50", "Change", "Speed-up", "Latency ms", "Backend", "Size MB", "Parameters",
               "GFLOPs/tile", "Why"]

    def __init__(self, state, get_image: Callable | None = None, *, backends: BackendCache | None = None,
                 parent: QWidget | None = None):
        super().__init__(parent)
        self.state = state
        self._get_image = get_image or getattr(state, "current_image", None)
        self._backends = backends or BackendCache.shared()
        self.report: OptimizeReport | None = None
        self.chosen: StepReport | None = None
        self.comparison: CompareResult | None = None
        self._rows: list[StepReport] = []
        self._connect_runners()
        self._build_report_view()
        grid = self._build_actions()
        self._lay_out(grid)
        self.rollback_button.clicked.connect(self.roll_back_to_selected)
        self.use_button.clicked.connect(self.use_model)
        self.compare_button.clicked.connect(self.compare)
        self.report_button.clicked.connect(self.open_report)
        self.export_folder_button.clicked.connect(self._choose_export_folder)
        self.export_onnx_button.clicked.connect(self._choose_export_onnx)
        self._set_idle()

    def _connect_runners(self) -> None:
        """The comparison's and the export's background runners."""
        self.compare_runner = JobRunner(self)
        self.compare_runner.progress.connect(self._on_compare_progress)
        self.compare_runner.finished.connect(self._on_compared)
        self.compare_runner.failed.connect(self._show_error)
        self.compare_runner.cancelled.connect(lambda: self.compare_status.setText("Comparison cancelled"))
        self.compare_runner.stopped.connect(self._set_idle)
        self.export_runner = JobRunner(self)
        self.export_runner.finished.connect(lambda dest: self.export_status.setText(f"Exported to {dest}"))
        self.export_runner.failed.connect(self._show_error)
        self.export_runner.stopped.connect(self._set_idle)

    def _build_report_view(self) -> None:
        """The summary line, the steps' table, the selected row's details and the chosen model."""
        self.summary = QLabel("No result yet")
        self.summary.setWordWrap(True)
        self.summary.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.table = table(self.COLUMNS, {
            "Change": "AP50 change against the step's parent",
            "Speed-up": "against PyTorch eager FP32 of the original, measured in this run",
            "Latency ms": "one batch of real tiles on the backend the model runs on",
            "Why": "why the step was kept, rolled back, skipped or failed"})
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.itemSelectionChanged.connect(self._on_selection)
        self.details = QLabel("")
        self.details.setWordWrap(True)
        self.details.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.details.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.chosen_label = QLabel("")
        self.chosen_label.setWordWrap(True)
        self.chosen_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)

    def _build_actions(self) -> QGridLayout:
        """The action buttons (in a grid), the comparison's progress and legend, the export status, errors."""
        self.rollback_button = QPushButton("Roll back to selected")
        self.rollback_button.setToolTip("make the selected kept step (or the original) the chosen model")
        self.use_button = QPushButton("Use this model")
        self.use_button.setToolTip("add the chosen model to the Segment and Batch model lists, now and after a restart")
        self.compare_button = QPushButton("Compare on this image")
        self.compare_button.setToolTip("segment the current image with the original and the chosen model and show "
                                       "where they disagree")
        self.report_button = QPushButton("Open report")
        self.report_button.setToolTip("report.html in the browser")
        self.export_folder_button = QPushButton("Export folder...")
        self.export_folder_button.setToolTip("copy the chosen model's folder (card and weights)")
        self.export_onnx_button = QPushButton("Export ONNX...")
        self.export_onnx_button.setToolTip("copy the chosen model's ONNX file")
        grid = QGridLayout()
        grid.setContentsMargins(0, 0, 0, 0)
        for k, b in enumerate((self.use_button, self.rollback_button, self.compare_button, self.report_button,
                               self.export_folder_button, self.export_onnx_button)):
            grid.addWidget(b, k // 2, k % 2)

        self.compare_bar = QProgressBar()
        self.compare_bar.setRange(0, 0)  # busy: two segmentations, their lengths unknown beforehand
        self.compare_bar.setTextVisible(False)
        self.compare_bar.setVisible(False)
        self.compare_status = QLabel("")
        self.compare_status.setWordWrap(True)
        self.compare_status.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.legend = QLabel(" ".join(
            f'<span style="color:{OVERLAY_COLOURS[k]}">&#9632;</span>&nbsp;{html.escape(OVERLAY_NAMES[k])}'
            for k in (1, 2, 3)))
        self.legend.setWordWrap(True)
        self.legend.setVisible(False)
        self.export_status = QLabel("")
        self.export_status.setWordWrap(True)
        self.export_status.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.error_view = ErrorView()
        return grid

    def _lay_out(self, grid: QGridLayout) -> None:
        """The summary above a splitter: the table on top, details and actions below."""
        top = QWidget()
        top_layout = QVBoxLayout(top)
        top_layout.setContentsMargins(0, 0, 0, 0)
        top_layout.addWidget(self.table, 1)
        bottom = QWidget()
        bottom_layout = QVBoxLayout(bottom)
        bottom_layout.setContentsMargins(0, 0, 0, 0)
        bottom_layout.addWidget(self.details)
        bottom_layout.addWidget(self.chosen_label)
        bottom_layout.addLayout(grid)
        bottom_layout.addWidget(self.compare_bar)
        bottom_layout.addWidget(self.compare_status)
        bottom_layout.addWidget(self.legend)
        bottom_layout.addWidget(self.export_status)
        bottom_layout.addWidget(self.error_view)
        bottom_layout.addStretch(1)
        self.splitter = QSplitter(Qt.Orientation.Vertical)
        self.splitter.addWidget(top)
        self.splitter.addWidget(bottom)
        self.splitter.setChildrenCollapsible(False)
        self.splitter.setStretchFactor(0, 1)
        self.splitter.setStretchFactor(1, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.summary)
        layout.addWidget(self.splitter, 1)

    # ------------------------------------------------------------------ the report

    def show_report(self, report: OptimizeReport) -> None:
        """Show ``report``; its final model becomes the chosen one."""
        self.report = report
        self._rows = [report.baseline, *report.steps]
        t = self.table
        t.setRowCount(len(self._rows))
        for r, row in enumerate(self._rows):
            name = "original" if row.index < 0 else f"{row.index + 1}. {row.name}"
            status = "-" if row.index < 0 else status_words(row.status)
            colour = None if row.index < 0 else STATUS_COLOURS[row.status]
            speed = fmt(row.speedup_vs_baseline, ".2f")
            cells = [name, status, fmt(row.ap50, ".4f"), fmt(row.ap50_delta, "+.4f", ""),
                     speed + "x" if speed != "-" else speed, fmt(row.latency_ms, ".1f"), row.backend or "-",
                     fmt(row.size_mb, ".2f"), fmt(row.params, ","), fmt(row.gflops_per_tile, ".2f"), row.reason]
            for c, text in enumerate(cells):
                set_cell(t, r, c, text, tip=row.doc if c == 0 and row.doc else "", colour=colour if c == 1 else None)
        for c in range(t.columnCount() - 1):
            t.resizeColumnToContents(c)
        fit_rows(t, 8)
        f = report.final
        self.summary.setText(
            f"{report.model}: {report.metric or 'AP50'} on {getattr(report, 'images', 0) or 'the'} validation "
            f"image(s), at most {report.max_drop:g} below the original, steps at least {report.min_speedup:g}x "
            f"faster than their parent. Finished in {fmt_duration(report.seconds)}."
            + (f" Result: AP50 {fmt(f.ap50, '.4f')}"
               + (f" ({-f.drop_vs_original:+.4f})" if f.drop_vs_original is not None else "")
               + f" at {fmt(f.speedup_vs_baseline, '.2f')}x." if f is not None else ""))
        self.error_view.clear()
        self.compare_status.setText("")
        self.legend.setVisible(False)
        self.comparison = None
        self._choose(f if f is not None else report.baseline)
        self.table.clearSelection()
        self._on_selection()

    def rows(self) -> list[list[str]]:
        """The table's cell texts (the original first)."""
        t = self.table
        return [[t.item(r, c).text() if t.item(r, c) else "" for c in range(t.columnCount())]
                for r in range(t.rowCount())]

    def _selected(self) -> StepReport | None:
        rows = self.table.selectionModel().selectedRows()
        return self._rows[rows[0].row()] if rows and rows[0].row() < len(self._rows) else None

    def _on_selection(self) -> None:
        row = self._selected()
        self.rollback_button.setEnabled(self._can_roll_back(row))
        if row is None:
            self.details.setText("Select a row for its details; a kept step can be rolled back to.")
            return
        parts = [("original" if row.index < 0 else f"{row.index + 1}. {row.name}")
                 + ("" if row.index < 0 else f" - {status_words(row.status)}")]
        if row.reason:
            parts.append(row.reason)
        if row.measured:
            parts.append(f"AP50 {fmt(row.ap50, '.4f')}, {fmt(row.speedup_vs_baseline, '.2f')}x "
                         f"({fmt(row.latency_ms, '.1f')} ms on {row.backend or '-'}), {fmt(row.size_mb, '.2f')} MB, "
                         f"{fmt(row.params, ',')} parameters, {fmt(row.gflops_per_tile, '.2f')} GFLOPs per tile")
        if row.seconds is not None:
            parts.append(f"took {fmt_duration(row.seconds)}")
        if row.sensitivity:
            parts.append("in float: " + (", ".join(row.float_layers) or "no layer"))
        if row.budget_used is not None and self.report is not None:
            parts.append(f"used {row.budget_used:+.4f} of the {self.report.max_drop:g} AP50 budget"
                         + (f" (its allowance {row.allowance:g})" if row.allowance is not None else ""))
        if row.compare:  # the same network made two ways (PTQ beside QAT)
            parts.append("side by side: " + "; ".join(
                f"{name} AP50 {fmt(c.get('ap50'), '.4f')} at {fmt(c.get('speedup_vs_baseline'), '.2f')}x"
                for name, c in row.compare.items()))
        self.details.setText(". ".join(parts))

    def _can_roll_back(self, row: StepReport | None) -> bool:
        if row is None or self.report is None or row.artifact is None:
            return False
        if row.index >= 0 and row.status is not StepStatus.KEPT:
            return False
        if row is self.chosen:
            return False
        # the final model is a copy of the row it came from: choosing that row changes nothing
        return not (self.chosen is self.report.final and row.index == self.report.final_from and row.index >= 0)

    # ------------------------------------------------------------------ chosen model

    def _choose(self, row: StepReport) -> None:
        self.chosen = row
        final = self.report is not None and row is self.report.final
        where = ("the run's final model" + (f", from step {self.report.final_from + 1}"
                                            if final and self.report.final_from is not None else "")) if final else (
            "the original model" if row.index < 0 else f"rolled back to step {row.index + 1}, {row.name}")
        self.chosen_label.setText(f"Chosen: {where} - AP50 {fmt(row.ap50, '.4f')} at "
                                  f"{fmt(row.speedup_vs_baseline, '.2f')}x ({row.artifact.name if row.artifact else '-'})")
        self._set_idle()
        self.chosen_changed.emit(row)

    def roll_back_to(self, index: int) -> None:
        """Make step ``index`` (-1: the original) the chosen model; it must be kept."""
        row = self.report.row(index) if self.report is not None else None
        if row is None or row.artifact is None or (index >= 0 and row.status is not StepStatus.KEPT):
            raise InputError(f"step {index + 1} was not kept: it cannot be rolled back to")
        self._choose(row)

    def roll_back_to_selected(self) -> None:
        row = self._selected()
        if self._can_roll_back(row):
            self._choose(row)

    def chosen_model(self) -> Model:
        """The chosen model, loaded from its card."""
        if self.chosen is None or self.chosen.artifact is None:
            raise InputError("there is no chosen model yet")
        return load_card(self.chosen.artifact)

    def original_model(self) -> Model:
        if self.report is not None and self.report.baseline.artifact is not None:
            return load_card(self.report.baseline.artifact)
        return self.state.model

    def use_model(self) -> None:
        """Emit ``model_added`` with the chosen model (errors are shown)."""
        try:
            model = self.chosen_model()
        except Exception as exc:  # noqa: BLE001 - shown to the user: verbatim if expected, as a bug otherwise
            self._show_error(exc)
            return
        use = getattr(self.state, "use_model", None)
        try:
            if use is not None:
                use(model)  # the wizard's hook: keep it as a user model and announce it
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self._show_error(exc)
            return
        self.export_status.setText(f"{model.name} added to the model lists ({model.card_path.parent.name})")
        self.model_added.emit(model)

    # ------------------------------------------------------------------ compare

    def compare(self) -> None:
        """Segment the current image with the original and the chosen model, on a worker thread."""
        if self._busy() or self.chosen is None:
            return
        self.error_view.clear()
        try:
            if self._get_image is None:
                raise InputError("this window has no image to compare on")
            image = self._get_image()
            if image is None:
                raise InputError("there is no image to compare on", hint="open an image, or choose an image layer")
            key_a, key_b = str(self.original_model().card_path), str(self.chosen_model().card_path)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self._show_error(exc)
            return
        self._compare_names = (self.original_model().name, self.chosen_model().name)
        self.compare_status.setText("Loading the models...")
        self.compare_bar.setVisible(True)
        backends = self._backends
        self.compare_runner.start(lambda cancel: _compare(image, backends, key_a, key_b, cancel))
        self._set_idle()

    def _on_compare_progress(self, p: Progress) -> None:
        if p.message:
            self.compare_status.setText(p.message[:1].upper() + p.message[1:] + "...")

    def _on_compared(self, comparison: Comparison) -> None:
        d = comparison.disagreement
        self.compare_bar.setVisible(False)
        self.comparison = CompareResult(comparison, *self._compare_names)
        self.compare_status.setText(
            f"Only in the original: {d.only_reference}; only in the optimized model: {d.only_other}; matched with "
            f"IoU < {d.iou:g}: {d.low_iou}; agreeing: {d.matched}. Original {comparison.seconds_a:.2f} s "
            f"({comparison.backend_a}), optimized {comparison.seconds_b:.2f} s ({comparison.backend_b}).")
        self.legend.setVisible(True)
        add_labels = getattr(self.state, "add_labels", None)
        if add_labels is not None:
            add_labels(d.overlay, self.overlay_name(), dict(OVERLAY_COLOURS))
        self.comparison_ready.emit(self.comparison)

    def overlay_name(self) -> str:
        """The disagreement layer's name."""
        c = self.comparison
        return f"disagreement: {c.original} vs {c.optimized}" if c is not None else "disagreement"

    # ------------------------------------------------------------------ report and export

    def report_path(self) -> Path | None:
        return Path(self.report.out_dir) / "report.html" if self.report is not None else None

    def open_report(self) -> bool:
        path = self.report_path()
        if path is None or not path.is_file():
            self._show_error(InputError(f"there is no report at {path}"))
            return False
        return QDesktopServices.openUrl(QUrl.fromLocalFile(str(path)))

    def onnx_file(self) -> Path:
        """The ONNX file the chosen model runs (INT8 before FP16 before FP32)."""
        model = self.chosen_model()
        for kind in ONNX_KINDS:
            if kind in model.files:
                return model.files[kind]
        raise InputError(f"{model.name} has no ONNX file (it has: {', '.join(model.files)})")

    def export_folder(self, dest: str | Path) -> None:
        """Copy the chosen model's folder to ``dest`` (a new or empty folder), on a worker thread."""
        self._export(lambda: self.chosen_model().card_path.parent, Path(dest), folder=True)

    def export_onnx(self, dest: str | Path) -> None:
        """Copy the chosen model's ONNX file to ``dest``, on a worker thread."""
        self._export(self.onnx_file, Path(dest), folder=False)

    def _export(self, source: Callable[[], Path], dest: Path, folder: bool) -> None:
        if self._busy():
            return
        self.error_view.clear()
        try:
            src = source()
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self._show_error(exc)
            return
        self.export_status.setText(f"Copying to {dest}...")
        self.export_runner.start(lambda cancel: _copy(src, dest, folder))
        self._set_idle()

    def _choose_export_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Export the model folder to")
        if path:
            name = self.chosen_model().card_path.parent.name if self.chosen else "model"
            target = Path(path)
            self.export_folder(target / name if any(target.iterdir()) else target)

    def _choose_export_onnx(self) -> None:
        try:
            default = self.onnx_file().name
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self._show_error(exc)
            return
        path, _ = QFileDialog.getSaveFileName(self, "Export the ONNX file", default, "ONNX (*.onnx)")
        if path:
            self.export_onnx(path)

    # ------------------------------------------------------------------ state

    def _busy(self) -> bool:
        return self.compare_runner.is_running() or self.export_runner.is_running()

    def _set_idle(self) -> None:
        have = self.chosen is not None and self.chosen.artifact is not None and not self._busy()
        for b in (self.use_button, self.compare_button, self.export_folder_button, self.export_onnx_button):
            b.setEnabled(have)
        self.report_button.setEnabled(self.report is not None)
        self.rollback_button.setEnabled(not self._busy() and self._can_roll_back(self._selected()))
        if not self.compare_runner.is_running():
            self.compare_bar.setVisible(False)

    def _show_error(self, exc: BaseException) -> None:
        self.error_view.show_report(with_crash_log(describe_error(exc)))

    def shutdown(self, timeout_ms: int | None = None) -> bool:
        a = self.compare_runner.shutdown(timeout_ms)
        return self.export_runner.shutdown(timeout_ms) and a

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        self.shutdown()
        super().closeEvent(event)
