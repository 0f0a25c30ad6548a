"""Page 5 of the optimization wizard: the run.

:class:`RunPage` runs :func:`~segstudio.core.optimize.runner.optimize_job`
on a background thread (:class:`~segstudio.qt.worker.JobRunner`) with the
choices of the earlier pages (a :class:`~segstudio.qt.optimize_state.WizardState`)
and shows, live:

* the step list: waiting, running, kept, rolled back, skipped, failed, with the reason;
* progress and time left, of the step and of the run;
* the training loss of a recovery or distillation step as it trains;
* the accuracy-versus-speed chart: one point per measured attempt, the
  original, the guardrail (the lowest AP50 a kept step may have), the kept
  path joined and the Pareto front marked (both from
  :meth:`OptimizeReport.kept_path` / :meth:`OptimizeReport.pareto`: core
  decides, the page draws);
* the INT8 per-layer sensitivity: which layers stayed in float, and what each cost.

**Cancel** stops the run within seconds (the steps already finished stay
on disk); **Resume** runs ``optimize_job(..., resume=True)`` in the same
output folder, which does not redo them.

Everything comes from typed core objects: :class:`OptimizeEvent` (switched
on :class:`EventKind`) in ``Progress.event`` and :class:`StepReport`
attributes.  Events only change the page's model of the run; a single-shot
timer redraws at most every :data:`REDRAW_MS` (plot items and table cells
change on the GUI thread only, and only those that changed), so a flood of
training-loss events cannot make the window lag.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from ..core.jobs import CancelToken, Job, Progress
from ..core.metrics import monitored
from ..core.service import INFERENCE
from ..core.optimize.report import EventKind, OptimizeEvent, OptimizeReport, StepReport, StepStatus
from .charts import plot_widget
from .job_panel import ErrorView
from .worker import JobRunner, describe_error, with_crash_log

REDRAW_MS = 100  # at most 10 redraws a second

STATUS_COLOURS = {
    StepStatus.WAITING: "#8a8f98",
    StepStatus.RUNNING: "#e8a33f",
    StepStatus.KEPT: "#2f7cf6",
    StepStatus.ROLLED_BACK: "#e8543f",
    StepStatus.SKIPPED: "#8a8f98",
    StepStatus.FAILED: "#b03a2e",
}


# ----------------------------------------------------------------------------- formatting (shared with page 6)


def fmt(value, spec: str, empty: str = "-") -> str:
    """``format(value, spec)``, or ``empty`` for None / NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return empty
    return format(value, spec)


def fmt_duration(seconds: float | None) -> str:
    """``"1 h 02 min"``, ``"3 min 05 s"``, ``"42 s"``, or ``""``."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return ""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def status_words(status: StepStatus) -> str:
    return status.value.replace("_", " ")


def table(columns: list[str], tooltips: dict[str, str] | None = None) -> QTableWidget:
    """A read-only, row-selecting table with these column titles."""
    t = QTableWidget(0, len(columns))
    t.setHorizontalHeaderLabels(columns)
    for i, name in enumerate(columns):
        tip = (tooltips or {}).get(name)
        if tip:
            t.horizontalHeaderItem(i).setToolTip(tip)
    t.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    t.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    t.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
    t.verticalHeader().setVisible(False)
    t.setWordWrap(False)
    t.setHorizontalScrollMode(QAbstractItemView.ScrollMode.ScrollPerPixel)
    t.verticalHeader().setDefaultSectionSize(t.fontMetrics().height() + 8)  # compact rows: more of them in a dock
    return t


def fit_rows(t: QTableWidget, most: int = 8) -> None:
    """Make ``t`` at least as tall as its first ``most`` rows (so a short list is never scrolled)."""
    rows = min(t.rowCount(), most)
    height = t.horizontalHeader().height() + rows * t.verticalHeader().defaultSectionSize()
    t.setMinimumHeight(height + 2 * t.frameWidth() + t.horizontalScrollBar().sizeHint().height())


def set_cell(t: QTableWidget, row: int, col: int, text: str, *, tip: str = "", colour: str | None = None) -> None:
    """Set one cell's text (and tooltip, colour), creating the item once; unchanged cells are left alone."""
    item = t.item(row, col)
    if item is None:
        item = QTableWidgetItem()
        t.setItem(row, col, item)
    if item.text() != text:
        item.setText(text)
    if item.toolTip() != (tip or text):
        item.setToolTip(tip or text)
    if colour is not None:
        item.setForeground(QColor(colour))


# ----------------------------------------------------------------------------- the run as the page knows it


@dataclass
class RunModel:
    """What the events have said so far (no Qt): rows, chart points, loss curves, progress."""

    labels: list[str]
    rows: dict[int, StepReport] = field(default_factory=dict)
    baseline: StepReport | None = None
    report: OptimizeReport | None = None  # the latest snapshot the run sent
    attempts: list[tuple[int, StepReport]] = field(default_factory=list)  # STEP_POINT rows
    loss: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    current: int | None = None
    phase: str = ""
    message: str = ""
    fraction: float | None = None
    run_fraction: float | None = None
    step_eta_s: float | None = None
    run_eta_s: float | None = None
    finished_steps: set[int] = field(default_factory=set)

    def status(self, i: int) -> StepStatus:
        row = self.rows.get(i)
        if row is not None:
            return row.status
        return StepStatus.RUNNING if i == self.current else StepStatus.WAITING

    def apply(self, ev: OptimizeEvent) -> set[str]:
        """Take one event in; returns what needs redrawing (``"progress"``, ``"rows"``, ``"chart"``, ``"loss"``)."""
        dirty = {"progress"}
        for name in ("phase", "message", "fraction", "run_fraction", "step_eta_s", "run_eta_s"):
            value = getattr(ev, name)
            if value not in (None, ""):
                setattr(self, name, value)
        kind = ev.kind
        if ev.report is not None:
            self.report = ev.report
            self.baseline = ev.report.baseline
            for r in ev.report.steps:
                if r.index >= 0 and (r.status is not StepStatus.WAITING or r.index not in self.rows):
                    self.rows[r.index] = r
                    if r.status not in (StepStatus.WAITING, StepStatus.RUNNING):
                        self.finished_steps.add(r.index)
            dirty |= {"rows", "chart"}
        if kind is EventKind.BASELINE and ev.row is not None:
            self.baseline = ev.row
            dirty.add("chart")
        elif kind is EventKind.STEP_STARTED and ev.step is not None:
            self.current = ev.step
            self.fraction = ev.fraction or 0.0
            self.step_eta_s = ev.step_eta_s
            if ev.row is not None:
                self.rows[ev.step] = ev.row
            else:
                self.rows.pop(ev.step, None)  # running again (resume, retry): shown as running
            dirty.add("rows")
        elif kind is EventKind.STEP_PROGRESS:
            if ev.loss is not None and ev.train_step is not None and ev.step is not None:
                curve = self.loss.setdefault(ev.step, [])
                if not curve or ev.train_step > curve[-1][0]:
                    curve.append((ev.train_step, ev.loss))
                    dirty.add("loss")
        elif kind is EventKind.STEP_POINT and ev.row is not None and ev.step is not None:
            self.attempts.append((ev.step, ev.row))
            dirty.add("chart")
        elif kind is EventKind.STEP_FINISHED and ev.row is not None and ev.step is not None:
            self.rows[ev.step] = ev.row
            self.finished_steps.add(ev.step)
            if ev.row.loss_curve and len(ev.row.loss_curve) >= len(self.loss.get(ev.step, ())):
                self.loss[ev.step] = list(ev.row.loss_curve)
                dirty.add("loss")
            if self.current == ev.step:
                self.current = None
            dirty |= {"rows", "chart"}
        elif kind is EventKind.FINISHED:
            self.current = None
            self.run_fraction = 1.0
        return dirty

    def take_report(self, report: OptimizeReport) -> None:
        """The job's result: every row from it."""
        self.report = report
        self.baseline = report.baseline
        self.current = None
        self.run_fraction = 1.0
        for r in report.steps:
            self.rows[r.index] = r
            self.finished_steps.add(r.index)
        for r in report.steps:
            if r.loss_curve:
                self.loss[r.index] = list(r.loss_curve)

    def working_report(self) -> OptimizeReport | None:
        """The latest report the run sent, with the newest rows in it (for the kept path and the Pareto front)."""
        if self.report is None or self.baseline is None:
            return None
        from dataclasses import replace

        steps = [self.rows.get(i) or StepReport(index=i, name=label) for i, label in enumerate(self.labels)]
        return replace(self.report, baseline=self.baseline, steps=steps)

    def sensitivity_row(self) -> StepReport | None:
        """The last row (finished, else attempted) that has a per-layer sensitivity."""
        rows = [self.rows[i] for i in sorted(self.rows)] + [r for _, r in self.attempts]
        finished = [r for r in rows if r.sensitivity and r.status is not StepStatus.RUNNING]
        rows = finished or [r for r in rows if r.sensitivity]
        return rows[-1] if rows else None


@dataclass(frozen=True)
class ChartPoint:
    """One point of the accuracy-versus-speed chart."""

    index: int  # -1 the original
    name: str
    speedup: float
    ap50: float
    status: StepStatus
    attempt: bool = False  # an earlier attempt of a step (INT8 with more layers in float after it)


@dataclass(frozen=True)
class ChartData:
    points: tuple[ChartPoint, ...]
    kept_path: tuple[tuple[float, float], ...]
    pareto: tuple[tuple[float, float], ...]
    guardrail: float | None


def chart_data(model: RunModel) -> ChartData:
    """The chart's points, kept path, Pareto front and guardrail from what the run said (no Qt)."""
    report = model.working_report()
    if report is None:
        return ChartData((), (), (), None)
    points = [ChartPoint(-1, "original", report.baseline.speedup_vs_baseline, report.baseline.ap50,
                         StepStatus.KEPT)] if report.baseline.measured else []
    finished = {r.index for r in report.steps if r.measured and r.status is not StepStatus.RUNNING}
    last = {i: k for k, (i, _) in enumerate(model.attempts)}
    for k, (i, r) in enumerate(model.attempts):
        # a finished step's last attempt is its row (re-timed at the end): drawn once, as the row; earlier
        # attempts (INT8 before more layers stayed in float) stay as faint triangles
        if not r.measured or (i in finished and last[i] == k):
            continue
        points.append(ChartPoint(i, r.name, r.speedup_vs_baseline, r.ap50, StepStatus.RUNNING, attempt=i in finished))
    for r in report.steps:
        if r.measured and r.index in finished:
            points.append(ChartPoint(r.index, r.name, r.speedup_vs_baseline, r.ap50, r.status))
    kept = tuple((r.speedup_vs_baseline, r.ap50) for r in report.kept_path() if r.measured)
    front = tuple((r.speedup_vs_baseline, r.ap50) for r in report.pareto())
    guard = report.guardrail_ap50 if report.baseline.ap50 is not None else None
    return ChartData(tuple(points), kept, front, guard)


# ----------------------------------------------------------------------------- the page


def _run(state, resume: bool, cancel: CancelToken) -> Job[OptimizeReport]:
    """The page's job, run on the worker thread."""
    from ..core.optimize.runner import OptimizeOptions, optimize_job
    from ..core.optimize.steps import Context

    ctx = Context(original=state.model, calib=state.calib, out_dir=Path(state.out_dir), target=state.target,
                  cancel=cancel)
    options = OptimizeOptions(max_drop=state.max_drop, min_speedup=state.min_speedup,
                              speed_tile=int(state.speed_tile), resume=resume)  # latencies measured on that tile
    estimate = getattr(state, "estimate", None)  # measured on page 4: not measured again
    run = monitored(optimize_job(state.model, list(state.steps), ctx, state.vset, options, estimate=estimate),
                    "optimize", state.model.name)
    report = yield from INFERENCE.turn(run, f"the optimization of {state.model.name}", cancel)
    return report


class RunPage(QWidget):
    """Runs the optimization and shows it live (see the module docstring).

    Signals
    -------
    finished(OptimizeReport)
        The run finished; its report.
    running_changed(bool)
        A run started (True) or stopped (False), for the wizard's buttons.
    """

    finished = Signal(object)
    running_changed = Signal(bool)

    STEP_COLUMNS = ["#", "Step", "Status", "AP50", "Speed-up", "Time", "Why"]

    def __init__(self, state, parent: QWidget | None = None):
        super().__init__(parent)
        self.state = state
        self.model = RunModel(labels=[])
        self.report: OptimizeReport | None = None
        self._dirty: set[str] = set()
        self._t_start = 0.0
        self._outcome = ""

        self.runner = JobRunner(self)
        self.runner.progress.connect(self._on_progress)
        self.runner.finished.connect(self._on_finished)
        self.runner.failed.connect(self._on_failed)
        self.runner.cancelled.connect(self._on_cancelled)
        self.runner.stopped.connect(self._on_stopped)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(REDRAW_MS)
        self._timer.timeout.connect(self._flush)
        self._build_progress()
        self._build_steps_view()
        self._build_plots()
        self._lay_out(self._build_sensitivity())
        self.start_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        self.resume_button.clicked.connect(self.resume)
        self.reset()

    def _build_progress(self) -> None:
        """The headline, the run's and the step's bars, Start / Cancel / Resume and the error view."""
        self.headline = QLabel("Not started")
        self.headline.setWordWrap(True)
        self.headline.setObjectName("segstudioRunHeadline")
        self.run_bar = QProgressBar()
        self.run_bar.setRange(0, 1000)
        self.run_bar.setFormat("run %p%")
        self.run_eta = QLabel("")
        self.run_eta.setWordWrap(True)
        self.step_bar = QProgressBar()
        self.step_bar.setRange(0, 1000)
        self.step_bar.setFormat("step %p%")
        self.step_phase = QLabel("")
        self.step_phase.setWordWrap(True)
        self.step_phase.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.start_button = QPushButton("Start")
        self.start_button.setToolTip("run the steps on a background thread")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("stop within seconds; the steps already finished stay on disk")
        self.resume_button = QPushButton("Resume")
        self.resume_button.setToolTip("continue the stopped run in the same folder without redoing finished steps")
        self.error_view = ErrorView()

    def _build_steps_view(self) -> None:
        """The steps' table and the selected step's reason."""
        self.steps_table = table(self.STEP_COLUMNS, {
            "AP50": "accuracy on the validation images (or agreement with the original without labels)",
            "Speed-up": "against PyTorch eager FP32 of the original, measured on this machine",
            "Time": "how long the step took",
            "Why": "why the step was kept, rolled back, skipped or failed"})
        self.steps_table.horizontalHeader().setStretchLastSection(True)
        self.steps_table.itemSelectionChanged.connect(self._show_reason)
        self.reason = QLabel("")
        self.reason.setWordWrap(True)
        self.reason.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.reason.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)

    def _build_sensitivity(self) -> QWidget:
        """The INT8 layers' tab: how sensitive each layer is and which stay in float."""
        self.sensitivity_title = QLabel("No INT8 step has measured its layers yet.")
        self.sensitivity_title.setWordWrap(True)
        self.sensitivity_table = table(["Layer", "Error removed in float", "Stays in float"], {
            "Error removed in float": "how much of the INT8 model's output error goes away when this layer stays "
                                      "in float (larger: more sensitive)"})
        self.sensitivity_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        sens = QWidget()
        sens_layout = QVBoxLayout(sens)
        sens_layout.setContentsMargins(0, 0, 0, 0)
        sens_layout.addWidget(self.sensitivity_title)
        sens_layout.addWidget(self.sensitivity_table, 1)
        return sens

    def _lay_out(self, sens: QWidget) -> None:
        """Progress and buttons on top; below, a splitter: the steps' table over the tabs of charts."""
        self.tabs = QTabWidget()
        self.tabs.addTab(self.chart, "Accuracy vs speed")
        self.tabs.addTab(self.loss_plot, "Training loss")
        self.tabs.addTab(sens, "INT8 layers")

        top = QWidget()
        top_layout = QVBoxLayout(top)
        top_layout.setContentsMargins(0, 0, 0, 0)
        top_layout.addWidget(self.steps_table, 1)
        top_layout.addWidget(self.reason)
        self.splitter = QSplitter(Qt.Orientation.Vertical)
        self.splitter.addWidget(top)
        self.splitter.addWidget(self.tabs)
        self.splitter.setStretchFactor(0, 2)
        self.splitter.setStretchFactor(1, 3)
        self.splitter.setChildrenCollapsible(False)

        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.resume_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.headline)
        layout.addWidget(self.run_bar)
        layout.addWidget(self.run_eta)
        layout.addWidget(self.step_bar)
        layout.addWidget(self.step_phase)
        layout.addLayout(buttons)
        layout.addWidget(self.error_view)
        layout.addWidget(self.splitter, 1)

    def _build_plots(self) -> None:
        import pyqtgraph as pg

        self.chart, plot = plot_widget("speed-up vs PyTorch eager FP32 (x)", "AP50")
        plot.addLegend(offset=(-5, -5), labelTextSize="8pt", brush=pg.mkBrush(255, 255, 255, 200))
        self.guardrail = pg.InfiniteLine(angle=0, movable=False, pen=pg.mkPen("#e8543f", width=1.5,
                                                                              style=Qt.PenStyle.DashLine),
                                         label="guardrail", labelOpts={"position": 0.02, "color": "#e8543f",
                                                                       "anchors": [(0, 0), (0, 0)]})
        self.guardrail.setVisible(False)
        plot.addItem(self.guardrail, ignoreBounds=True)
        self.kept_line = plot.plot([], [], pen=pg.mkPen("#2f7cf6", width=2), name="kept path")
        self.pareto_line = plot.plot([], [], pen=pg.mkPen("#3aa55d", width=1.5, style=Qt.PenStyle.DotLine),
                                     symbol="o", symbolSize=15, symbolBrush=None,
                                     symbolPen=pg.mkPen("#3aa55d", width=2), name="Pareto front")
        self.points = pg.ScatterPlotItem(size=9, pen=pg.mkPen("k", width=0.5), name="steps")
        plot.addItem(self.points)
        self.original_point = pg.ScatterPlotItem(size=14, symbol="star", brush=pg.mkBrush("#222"),
                                                 pen=pg.mkPen("k"), name="original")
        plot.addItem(self.original_point)
        self._point_labels: list = []
        self.chart_data = ChartData((), (), (), None)

        self.loss_plot, lp = plot_widget("training step", "loss")
        self.loss_curve = lp.plot([], [], pen=pg.mkPen("#2f7cf6", width=1.5))
        self.loss_title = "no training step yet"
        lp.setTitle(self.loss_title, size="9pt")

    # ------------------------------------------------------------------ public

    def reset(self) -> None:
        """Forget the shown run; the step list shows the state's steps as waiting."""
        if self.runner.is_running():
            return
        self.model = RunModel(labels=[s.label for s in self.state.steps])
        self.report = None
        self._outcome = ""
        self.steps_table.setRowCount(0)
        self.steps_table.setRowCount(len(self.model.labels))
        self.error_view.clear()
        estimate = getattr(self.state, "estimate", None)
        self.headline.setText(f"{len(self.model.labels)} step(s) to run" + (
            f", about {fmt_duration(estimate.total_s)} on this machine ({estimate.basis})" if estimate else ""))
        self.run_bar.setValue(0)
        self.step_bar.setValue(0)
        self.run_eta.setText("")
        self.step_phase.setText("")
        self._dirty = {"progress", "rows", "chart", "loss"}
        self._flush()
        self._set_idle()

    def is_running(self) -> bool:
        return self.runner.is_running()

    def start(self) -> None:
        """Run the steps from the beginning (the output folder's earlier steps are not reused)."""
        self._start(resume=False)

    def resume(self) -> None:
        """Continue the stopped run in the same folder; finished steps are not redone."""
        self._start(resume=True)

    def cancel(self) -> None:
        """Ask the run to stop (it does within seconds; finished steps stay)."""
        if self.runner.is_running():
            self.runner.cancel()
            self.cancel_button.setEnabled(False)
            self.headline.setText("Cancelling...")

    def shutdown(self, timeout_ms: int | None = None) -> bool:
        """Stop the redraw timer, cancel the run and join its thread (the dock is closing)."""
        self._timer.stop()
        return self.runner.shutdown(timeout_ms)

    def step_statuses(self) -> list[StepStatus]:
        """Each step's status as the list shows it."""
        return [self.model.status(i) for i in range(len(self.model.labels))]

    def step_rows(self) -> list[list[str]]:
        """The step list's cell texts."""
        t = self.steps_table
        return [[t.item(r, c).text() if t.item(r, c) else "" for c in range(t.columnCount())]
                for r in range(t.rowCount())]

    # ------------------------------------------------------------------ running

    def _start(self, resume: bool) -> None:
        if self.runner.is_running():
            return
        if not resume:
            self.reset()
        else:
            self._outcome = ""
            self.error_view.clear()
        self.headline.setText("Resuming..." if resume else "Starting...")
        self._t_start = time.perf_counter()
        state = self.state
        self.runner.start(lambda cancel: _run(state, resume, cancel))
        self._set_busy()
        self.running_changed.emit(True)

    def _on_progress(self, p: Progress) -> None:
        ev = p.event
        if not isinstance(ev, OptimizeEvent):
            if p.message:  # a message from inside a step without a typed event
                self.model.message = p.message
                self._schedule({"progress"})
            return
        self._schedule(self.model.apply(ev))

    def _on_finished(self, report: OptimizeReport) -> None:
        self.report = report
        self.model.take_report(report)
        self._outcome = "finished"
        self._dirty |= {"progress", "rows", "chart", "loss"}
        self._flush()
        self.finished.emit(report)

    def _on_failed(self, exc: BaseException) -> None:
        self._outcome = "failed"
        self._stop_current()
        self.error_view.show_report(with_crash_log(describe_error(exc)))
        self._dirty |= {"progress", "rows"}
        self._flush()

    def _on_cancelled(self) -> None:
        self._outcome = "cancelled"
        self._stop_current()
        self._dirty |= {"progress", "rows"}
        self._flush()

    def _stop_current(self) -> None:
        """The step that was running did not finish: it waits (a resume runs it again)."""
        m = self.model
        if m.current is not None and m.current not in m.finished_steps:
            m.rows.pop(m.current, None)
        m.current = None

    def _on_stopped(self) -> None:
        self._set_idle()
        self.running_changed.emit(False)

    def _set_busy(self) -> None:
        self.start_button.setEnabled(False)
        self.resume_button.setEnabled(False)
        self.cancel_button.setEnabled(True)

    def _set_idle(self) -> None:
        self.start_button.setEnabled(bool(self.model.labels))
        self.start_button.setText("Run again" if self._outcome else "Start")
        self.cancel_button.setEnabled(False)
        self.resume_button.setEnabled(self._outcome in ("cancelled", "failed"))

    # ------------------------------------------------------------------ drawing (GUI thread, throttled)

    def _schedule(self, what: set[str]) -> None:
        self._dirty |= what
        if not self._timer.isActive():
            self._timer.start()

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, set()
        if "progress" in dirty:
            self._draw_progress()
        if "rows" in dirty:
            self._draw_rows()
        if "chart" in dirty:
            self._draw_chart()
            self._draw_sensitivity()
        if "loss" in dirty:
            self._draw_loss()

    def _draw_progress(self) -> None:
        m, n = self.model, len(self.model.labels)
        done = len(m.finished_steps)
        if self._outcome == "finished" and self.report is not None:
            f = self.report.final
            text = f"Finished in {fmt_duration(self.report.seconds)}"
            if f is not None:
                text += (f": AP50 {fmt(f.ap50, '.4f')} at {fmt(f.speedup_vs_baseline, '.2f')}x the speed of PyTorch "
                         f"eager FP32 on {f.backend or '-'}")
            self.headline.setText(text)
        elif self._outcome == "cancelled":
            self.headline.setText(f"Cancelled: {done} of {n} step(s) finished and kept on disk; Resume continues "
                                  "from there")
        elif self._outcome == "failed":
            self.headline.setText(f"Stopped by an error after {done} of {n} step(s); Resume continues from there")
        elif self.runner.is_running():
            if m.current is not None and 0 <= m.current < n:
                self.headline.setText(f"Step {m.current + 1} of {n}: {m.labels[m.current]}")
            elif m.message:
                self.headline.setText(m.message[:1].upper() + m.message[1:])
        run_f = 1.0 if self._outcome == "finished" else m.run_fraction
        if run_f is None and n:
            run_f = done / n
        self.run_bar.setValue(round(1000 * min(1.0, max(0.0, run_f or 0.0))))
        left = fmt_duration(m.run_eta_s) if self.runner.is_running() else ""
        elapsed = fmt_duration(time.perf_counter() - self._t_start) if self._t_start else ""
        self.run_eta.setText(" - ".join(x for x in (f"{elapsed} elapsed" if elapsed else "",
                                                    f"about {left} left" if left else "") if x))
        step_f = m.fraction if m.current is not None else (1.0 if self._outcome == "finished" else None)
        self.step_bar.setValue(round(1000 * min(1.0, max(0.0, step_f or 0.0))))
        phase = m.phase if m.current is not None else ""
        step_left = fmt_duration(m.step_eta_s) if m.current is not None else ""
        self.step_phase.setText(" - ".join(x for x in (phase[:1].upper() + phase[1:],
                                                       f"about {step_left} left in this step" if step_left else "")
                                           if x))

    def _draw_rows(self) -> None:
        t, m = self.steps_table, self.model
        if t.rowCount() != len(m.labels):
            t.setRowCount(len(m.labels))
        for i, label in enumerate(m.labels):
            row = m.rows.get(i)
            status = m.status(i)
            colour = STATUS_COLOURS[status]
            set_cell(t, i, 0, str(i + 1))
            set_cell(t, i, 1, row.name if row is not None and row.name else label, tip=row.doc if row else "")
            set_cell(t, i, 2, status_words(status), colour=colour)
            finished = row is not None and i in m.finished_steps
            set_cell(t, i, 3, fmt(row.ap50, ".4f") if finished else "")
            set_cell(t, i, 4, (fmt(row.speedup_vs_baseline, ".2f") + "x") if finished and row.speedup_vs_baseline
                     else "")
            set_cell(t, i, 5, fmt_duration(row.seconds) if finished else "")
            set_cell(t, i, 6, row.reason if finished else "")
        for c in range(t.columnCount() - 1):
            t.resizeColumnToContents(c)
        fit_rows(t, 6)
        self._show_reason()

    def _show_reason(self) -> None:
        rows = self.steps_table.selectionModel().selectedRows()
        i = rows[0].row() if rows else None
        if i is None:  # the last finished step, else nothing
            done = sorted(self.model.finished_steps)
            i = done[-1] if done else None
        row = self.model.rows.get(i) if i is not None else None
        if row is None or i not in self.model.finished_steps:
            self.reason.setText("")
            return
        self.reason.setText(f"{i + 1}. {row.name}: {status_words(row.status)}" + (
            f" - {row.reason}" if row.reason else ""))

    def _draw_chart(self) -> None:
        import pyqtgraph as pg

        data = chart_data(self.model)
        self.chart_data = data
        steps = [p for p in data.points if p.index >= 0]
        spots = [{"pos": (p.speedup, p.ap50), "brush": pg.mkBrush(STATUS_COLOURS[p.status] + ("80" if p.attempt else "")),
                  "symbol": "t" if p.attempt else "o", "data": p.name} for p in steps]
        self.points.setData(spots)
        orig = [p for p in data.points if p.index < 0]
        self.original_point.setData([p.speedup for p in orig], [p.ap50 for p in orig])
        self.kept_line.setData([x for x, _ in data.kept_path], [y for _, y in data.kept_path])
        self.pareto_line.setData([x for x, _ in data.pareto], [y for _, y in data.pareto])
        if data.guardrail is not None:
            self.guardrail.setValue(data.guardrail)
            self.guardrail.label.setFormat(f"guardrail: AP50 {data.guardrail:.3f}")
            self.guardrail.setVisible(True)
        else:
            self.guardrail.setVisible(False)
        plot = self.chart.getPlotItem()
        # one label per finished step (attempts stay unlabelled); text items reused
        labelled = [p for p in data.points if not p.attempt]
        while len(self._point_labels) < len(labelled):
            item = pg.TextItem(color="#333", anchor=(0, 1))
            plot.addItem(item)
            self._point_labels.append(item)
        for item, p in zip(self._point_labels, labelled):
            text = "original" if p.index < 0 else f"{p.index + 1}. {p.name}"
            if item.textItem.toPlainText() != text:
                item.setText(text)
            item.setPos(p.speedup, p.ap50)
            item.setVisible(True)
        for item in self._point_labels[len(labelled):]:
            item.setVisible(False)
        ys = [p.ap50 for p in data.points] + ([data.guardrail] if data.guardrail is not None else [])
        xs = [p.speedup for p in data.points] + [1.0]
        if ys:
            pad = max(0.01, (max(ys) - min(ys)) * 0.15)
            plot.setYRange(min(ys) - pad, max(ys) + pad, padding=0)
            plot.setXRange(0, max(xs) * 1.25, padding=0)

    def _draw_loss(self) -> None:
        m = self.model
        if not m.loss:
            self.loss_curve.setData([], [])
            title = "No recovery or distillation step has trained yet"
        else:
            i = m.current if m.current in m.loss else max(m.loss)
            curve = m.loss[i]
            self.loss_curve.setData([s for s, _ in curve], [v for _, v in curve])
            label = m.labels[i] if 0 <= i < len(m.labels) else str(i)
            title = f"{i + 1}. {label}: {len(curve)} point(s), last {curve[-1][1]:.4g}"
        if title != self.loss_title:
            self.loss_title = title
            self.loss_plot.getPlotItem().setTitle(title, size="9pt")

    def _draw_sensitivity(self) -> None:
        row = self.model.sensitivity_row()
        t = self.sensitivity_table
        if row is None:
            t.setRowCount(0)
            return
        layers = sorted(row.sensitivity, key=lambda s: -s.gain)
        n_float = sum(1 for s in layers if s.in_float)
        self.sensitivity_title.setText(
            f"{row.name}: {len(layers)} layer(s) measured, {n_float} kept in float (largest error first).")
        t.setRowCount(len(layers))
        for r, s in enumerate(layers):
            set_cell(t, r, 0, s.layer)
            set_cell(t, r, 1, f"{s.gain:.3g}")
            set_cell(t, r, 2, "yes" if s.in_float else "no", colour="#2f7cf6" if s.in_float else None)
        t.resizeColumnToContents(1)
        t.resizeColumnToContents(2)

    # ------------------------------------------------------------------ lifetime

    def hideEvent(self, event) -> None:  # noqa: N802 - Qt override
        """Nothing to redraw while hidden; the next event or showEvent redraws."""
        self._timer.stop()
        self._dirty |= {"progress", "rows", "chart", "loss"}
        super().hideEvent(event)

    def showEvent(self, event) -> None:  # noqa: N802 - Qt override
        super().showEvent(event)
        if self._dirty:
            self._timer.start()

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        self.shutdown()
        super().closeEvent(event)
