"""The Batch panel: a folder in, labels and measurements for every file out.

Drop a folder on the panel (or choose one) and press Start: a table lists
every file with its live status (pending, running, done, failed, skipped),
cells, seconds and the reason of a failure; a progress bar with the ETA runs
below.  Cancel stops after the current image; Resume (the same button, when
the output folder holds a manifest) carries on where the last run, this one
or a killed one, stopped: :func:`segstudio.core.tasks.batch.batch_job` does the
work on a :class:`~segstudio.qt.worker.JobRunner` thread.  Clicking a
finished row emits :attr:`BatchPanel.open_requested` with the image and its
labels file; the napari widget and the standalone window open both.

Qt only: no napari import here (the napari shell is
:mod:`segstudio.napari_plugin._batch`).
"""

from __future__ import annotations

import time
from pathlib import Path

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QWidget,
)

from ..core.jobs import Progress, Stage
from ..core.metrics import monitored
from ..core.segment.options import SegmentOptions
from ..core.service import INFERENCE
from ..core.tasks.batch import MANIFEST, BatchReport, Compute, FileSelection, batch_job
from .job_panel import JobPanel
from .segment_panel import AUTO, BackendCache, available_models, fill_backends

COLUMNS = ("File", "Status", "Cells", "Seconds", "Reason")
STATUS_COLOURS = {"done": "#2e7d32", "failed": "#c62828", "skipped": "#9e9e9e", "running": "#1565c0"}


def default_output(folder: Path) -> Path:
    """Where a folder's results go unless the user says otherwise: ``<folder>_segstudio`` beside it."""
    return folder.with_name(folder.name + "_segstudio")


def dropped_folder(urls) -> Path | None:
    """The one local folder of a drop (not a zarr store, which is an image), else ``None``."""
    if len(urls) != 1 or not urls[0].isLocalFile():
        return None
    path = Path(urls[0].toLocalFile())
    return path if path.is_dir() and path.suffix.lower() != ".zarr" else None


class BatchPanel(JobPanel):
    """Folder, output, model and backend; Start / Resume, Cancel; the file table.

    Signals
    -------
    open_requested(Path, Path)
        The user clicked a finished row: the image and its labels file.
    finished(BatchReport)
        A run ended (also after a cancel: then with the files not reached as skipped).
    """

    open_requested = Signal(object, object)
    finished = Signal(object)
    CANCELLING = "Cancelling after the current image..."  # what is done stays done: Resume carries on

    def __init__(self, *, backends: BackendCache | None = None, parent: QWidget | None = None):
        super().__init__("Start", parent)
        self._backends = backends or BackendCache.shared()
        self._rows: dict[str, int] = {}
        self._in_dir: Path | None = None
        self._out_dir: Path | None = None
        self._t_start = 0.0
        self.report: BatchReport | None = None
        self.start_button = self.run_button  # "Start", or "Resume" when the output folder holds a run
        self._build_form()
        layout = self.job_column(self._form())
        layout.addWidget(self.table, 1)
        self.status.setText("Drop a folder of images")

        self.setAcceptDrops(True)
        self.folder_button.clicked.connect(self._choose_folder)
        self.folder_edit.editingFinished.connect(lambda: self.set_folder(self.folder_edit.text()))
        self.out_edit.editingFinished.connect(self._update_start_label)
        self.model_combo.currentIndexChanged.connect(self._update_backends)
        self.table.cellClicked.connect(self._on_row_clicked)
        self._update_backends()
        self._set_idle()

    def run(self) -> None:
        """Start (or resume) the batch: what Start does."""
        self.start()

    def _build_form(self) -> None:
        """The inputs (folder, sub-folders, output, model, backend, flips) and the table of files."""
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("drop a folder here")
        self.folder_button = QPushButton("Choose...")
        self.out_edit = QLineEdit()
        self.out_edit.setPlaceholderText("<folder>_segstudio")
        self.recursive_check = QCheckBox("include sub-folders")
        self.recursive_check.setChecked(True)
        self._models = available_models()
        self.model_combo = QComboBox()
        for name in self._models:
            self.model_combo.addItem(name, name)
        self.backend_combo = QComboBox()
        self.backend_combo.addItem(AUTO, AUTO)
        self.tta_check = QCheckBox("average over flips (4x slower)")
        self.tta_check.setToolTip("run the network on each tile as it is and flipped three ways and average: "
                                  "four times the network time for a little more accuracy")
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.verticalHeader().setVisible(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for column in (1, 2, 3):  # short values: as wide as they need, the rest to the file and the reason
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(4, QHeaderView.ResizeMode.Stretch)
        self.table.setToolTip("click a finished file to open it with its labels")

    def _form(self) -> QFormLayout:
        form = QFormLayout()
        form.setContentsMargins(0, 0, 0, 0)
        folder_row = QHBoxLayout()
        folder_row.addWidget(self.folder_edit, 1)
        folder_row.addWidget(self.folder_button)
        form.addRow("Folder", folder_row)
        form.addRow("", self.recursive_check)
        form.addRow("Output", self.out_edit)
        form.addRow("Model", self.model_combo)
        form.addRow("Backend", self.backend_combo)
        form.addRow("", self.tta_check)
        return form

    # ------------------------------------------------------------------ public

    def set_folder(self, folder: str | Path, out_dir: str | Path | None = None) -> None:
        """Use ``folder`` (its results go to ``out_dir``, default ``<folder>_segstudio``)."""
        if not str(folder).strip():
            return
        folder = Path(folder).expanduser()
        self._in_dir = folder
        self.folder_edit.setText(str(folder))
        self.out_edit.setText(str(Path(out_dir) if out_dir is not None else default_output(folder)))
        self._update_start_label()

    def add_model(self, model) -> None:
        """Offer ``model`` (a :class:`~segstudio.core.models.catalog.Model` found by its name, e.g. one the
        optimization wizard kept as a user model) in the model list."""
        if model.name not in self._models:
            self._models[model.name] = model
            self.model_combo.addItem(model.name, model.name)

    @property
    def out_dir(self) -> Path | None:
        text = self.out_edit.text().strip()
        return Path(text).expanduser() if text else (default_output(self._in_dir) if self._in_dir else None)

    def start(self) -> None:
        """Start (or resume) the batch in the background."""
        if self.runner.is_running():
            return
        if self._in_dir is None:
            self.status.setText("Choose or drop a folder first")
            return
        in_dir, out_dir = self._in_dir, self.out_dir
        model_name, backend_name = self.model_combo.currentData(), self.backend_combo.currentData()
        recursive, tta = self.recursive_check.isChecked(), self.tta_check.isChecked()
        backends = self._backends
        self._out_dir = out_dir
        self._t_start = time.perf_counter()
        self._starting(f"Loading {model_name} ({backend_name})...")  # notices: about the run as a whole

        def job(cancel):
            model, backend = backends.get(model_name, backend_name)
            run = monitored(batch_job(in_dir, out_dir, model, Compute(backend_name, backend), SegmentOptions(tta=tta),
                                      files=FileSelection(recursive=recursive), cancel=cancel), "batch", str(in_dir))
            return (yield from INFERENCE.turn(run, f"the batch of {Path(in_dir).name}", cancel))

        self.runner.start(job)

    def statuses(self) -> dict[str, str]:
        """File (relative path) -> the status shown in the table."""
        return {self.table.item(r, 0).text(): self.table.item(r, 1).text() for r in range(self.table.rowCount())}

    # ------------------------------------------------------------------ drops

    def dragEnterEvent(self, event) -> None:  # noqa: N802 - Qt override
        mime = event.mimeData()
        if mime is not None and mime.hasUrls() and dropped_folder(mime.urls()) is not None:
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:  # noqa: N802 - Qt override
        folder = dropped_folder(event.mimeData().urls())
        if folder is not None:
            event.acceptProposedAction()
            self.open_folder(folder)

    def open_folder(self, folder: Path) -> None:
        """What a dropped folder does: use it and start (or resume) at once."""
        if self.runner.is_running():
            self.status.setText("A batch is running: cancel it first")
            return
        self.set_folder(folder)
        self.start()

    # ------------------------------------------------------------------ slots (GUI thread)

    def _on_progress(self, event: Progress) -> None:
        if event.stage is Stage.NOTICE and event.info.get("warning"):
            self._add_notice(event.message)
        if event.stage is not Stage.BATCH:
            return
        info = event.info
        if "files" in info:
            self._fill(info["files"])
        if "file" in info:
            self._set_row(info["file"], info["status"], info.get("row", {}))
        if event.total:
            self.progress_bar.setValue(round(1000 * event.done / event.total))
            eta = info.get("eta_s")
            left = f", about {_duration(eta)} left" if eta is not None and event.done < event.total else ""
            self.status.setText(f"{event.done} of {event.total} files{left}\n{event.message}")

    def _on_finished(self, report: BatchReport) -> None:
        self.report = report
        for row in report.rows:
            self._set_row(row["file"], row["status"], row)
        c = report.counts
        self.progress_bar.setValue(1000)
        self.status.setText(f"{c.get('done', 0)} done, {c.get('failed', 0)} failed, {c.get('skipped', 0)} skipped "
                            f"in {time.perf_counter() - self._t_start:.1f} s\nresults in {report.out_dir}")
        self.finished.emit(report)

    def _on_cancelled(self) -> None:
        for r in range(self.table.rowCount()):
            if self.table.item(r, 1).text() == "running":
                self._set_row(self.table.item(r, 0).text(), "pending", {})
        self.status.setText("Cancelled: press Resume to carry on")

    def _on_row_clicked(self, row: int, _col: int) -> None:
        if self.table.item(row, 1).text() != "done" or self._in_dir is None or self._out_dir is None:
            return
        rel = self.table.item(row, 0).text()
        labels = self.table.item(row, 0).data(Qt.ItemDataRole.UserRole)
        if labels:
            self.open_requested.emit(self._in_dir / rel, self._out_dir / labels)

    # ------------------------------------------------------------------ table

    def _fill(self, files: dict[str, str]) -> None:
        self.table.setRowCount(0)
        self._rows.clear()
        self.table.setRowCount(len(files))
        for r, (rel, status) in enumerate(files.items()):
            self._rows[rel] = r
            self.table.setItem(r, 0, QTableWidgetItem(rel))
            for c in range(1, len(COLUMNS)):
                self.table.setItem(r, c, QTableWidgetItem(""))
            self._set_row(rel, status, {})

    def _set_row(self, rel: str, status: str, row: dict) -> None:
        r = self._rows.get(rel)
        if r is None:
            return
        item = self.table.item(r, 1)
        item.setText(status)
        item.setForeground(_brush(STATUS_COLOURS.get(status)))
        if row:
            self.table.item(r, 2).setText(str(row.get("cells", "")))
            seconds = row.get("seconds", "")
            self.table.item(r, 3).setText(f"{float(seconds):.2f}" if seconds not in ("", None) else "")
            text = str(row.get("reason") or row.get("notes") or "")
            self.table.item(r, 4).setText(text)
            self.table.item(r, 4).setToolTip(text)
            if row.get("labels"):
                self.table.item(r, 0).setData(Qt.ItemDataRole.UserRole, row["labels"])
        if status == "running":
            self.table.scrollToItem(item)

    # ------------------------------------------------------------------ state

    def _choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder of images", str(self._in_dir or Path.home()))
        if folder:
            self.set_folder(folder)

    def _update_backends(self) -> None:
        fill_backends(self.backend_combo, self._models.get(self.model_combo.currentData()))

    def _update_start_label(self) -> None:
        out = self.out_dir
        resumable = out is not None and (out / MANIFEST).is_file()
        self.start_button.setText("Resume" if resumable else "Start")
        self.start_button.setToolTip("carry on where the last run stopped: finished files are not redone"
                                     if resumable else "process every file of the folder")

    def _inputs(self) -> list[QWidget]:
        return [self.folder_edit, self.folder_button, self.out_edit, self.model_combo, self.backend_combo,
                self.recursive_check, self.tta_check]

    def _set_idle(self) -> None:
        super()._set_idle()
        self._update_start_label()


def _brush(colour: str | None):
    from qtpy.QtGui import QBrush, QColor

    return QBrush(QColor(colour)) if colour else QBrush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
