"""The Performance dock: live charts of whatever runs (Segment, Batch, Optimize, Benchmark).

The engine publishes metrics events on :data:`segstudio.core.metrics.HUB`
from its own threads; this panel subscribes a
:class:`~segstudio.core.metrics.MetricsBuffer` (an append, nothing more, on
the publishing thread) and drains it on the GUI thread from a timer at
:data:`REFRESH_MS` (10 Hz), so plot items are only ever touched on the GUI
thread and a flood of events costs one redraw per tick; only the charts
whose data changed are redrawn (a redraw repaints the chart's axes).

Charts, over the run shown: latency per network batch with its p50 and p95
lines, network throughput (Mpx/s) per batch, memory (RSS, and GPU memory on
CUDA) and CPU % over time, and the stage timeline: seconds per stage
(read, normalize, network, post, measure, write) per image as stacked bars.
The last :data:`KEEP_RUNS` runs are kept; pick one to look at it, with the
run before it drawn in grey to compare.  Hovering a chart shows the value
under the pointer; *Save PNG* and *Save CSV* write the run shown.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from ..core import metrics
from ..core.metrics import STAGE_ORDER, RunRecord, RunRecords
from .charts import plot_widget

REFRESH_MS = 100  # at most 10 redraws a second (the GUI's budget is 20)
RESOURCES_EVERY_S = 0.5  # the memory and CPU charts are redrawn at most twice a second
KEEP_RUNS = 5
STAGE_COLOURS = {"read": "#8c564b", "normalize": "#bcbd22", "network": "#2f7cf6", "post": "#ff7f0e",
                 "measure": "#3aa55d", "write": "#9467bd"}
CURRENT, PREVIOUS = "#2f7cf6", "#b0b0b0"


class PerformancePanel(QWidget):
    """Live latency, throughput, memory and CPU charts and the stage timeline (see the module docstring).

    Signals
    -------
    refreshed(int)
        After a refresh that took events from the engine: how many.
    """

    refreshed = Signal(int)

    def __init__(self, parent: QWidget | None = None, *, hub: metrics.MetricsHub | None = None):
        super().__init__(parent)
        self.records = RunRecords(keep=KEEP_RUNS)
        self.buffer = metrics.MetricsBuffer()
        self._hub = hub or metrics.HUB
        self._unsubscribe = self._hub.subscribe(self.buffer)
        self._shown: RunRecord | None = None
        self._drawn_key: tuple | None = None  # (run shown, run compared) when the charts were last drawn
        self._drawn: dict = {}  # how many batches, samples, images they showed then
        self._resources_drawn_at = 0.0
        self._ranges: dict[int, tuple] = {}  # the ranges each chart was given (see _set_range)
        self._follow = True  # show the newest run as it comes

        self.run_box = QComboBox()
        self.run_box.setToolTip("the last runs; the run before the one shown is drawn in grey")
        self.run_box.currentIndexChanged.connect(self._picked)
        self.compare = QCheckBox("compare with the run before")
        self.compare.setChecked(True)
        self.compare.toggled.connect(lambda _: self._redraw(force=True))
        self.save_png = QPushButton("Save PNG…")
        self.save_png.clicked.connect(self._ask_png)
        self.save_csv = QPushButton("Save CSV…")
        self.save_csv.clicked.connect(self._ask_csv)
        top = QHBoxLayout()
        top.addWidget(QLabel("Run:"))
        top.addWidget(self.run_box, 1)
        top.addWidget(self.compare)
        top.addWidget(self.save_png)
        top.addWidget(self.save_csv)

        self.summary = QLabel("No run yet: segment an image, run a batch or an optimization and it shows here.")
        self.summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        # a new text must not change the label's size hint: that lays the whole window (and canvas) out again
        # (one line: its height hint is the font's, whatever the text; its width is the dock's)
        self.summary.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Fixed)
        self.key = QLabel(colour_key())
        self.key.setTextFormat(Qt.TextFormat.RichText)

        self.charts = QWidget()
        grid = QGridLayout(self.charts)
        grid.setContentsMargins(0, 0, 0, 0)
        self.latency_widget, self.latency_plot = plot_widget("network batch", "latency (ms)", min_height=150)
        self.throughput_widget, self.throughput_plot = plot_widget("network batch", "Mpx/s", min_height=150)
        self.memory_widget, self.memory_plot = plot_widget("seconds since the run started", "memory (GB)",
                                                           min_height=150)
        self.cpu_widget, self.cpu_plot = plot_widget("seconds since the run started", "CPU %", min_height=150)
        self.cpu_widget.setToolTip("CPU time of the process over wall time: 100% is one core busy")
        self.stage_widget, self.stage_plot = plot_widget("image", "seconds per stage", min_height=150)
        for i, w in enumerate((self.latency_widget, self.throughput_widget, self.memory_widget, self.cpu_widget,
                               self.stage_widget)):
            grid.addWidget(w, 0, i)
        self._make_items()

        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.summary)
        layout.addWidget(self.key)
        layout.addWidget(self.charts, 1)

        self.timer = QTimer(self)
        self.timer.setInterval(REFRESH_MS)
        self.timer.timeout.connect(self.refresh)
        self.timer.start()
        self.destroyed.connect(self._unsubscribe)

    # ------------------------------------------------------------------ plot items

    def _make_items(self) -> None:
        import pyqtgraph as pg

        def line(plot, colour, name=None, width=1.5, style=None):
            pen = pg.mkPen(colour, width=width, **({"style": style} if style else {}))
            return plot.plot([], [], pen=pen, name=name)

        self.prev_latency = line(self.latency_plot, PREVIOUS, "run before")
        self.latency = self.latency_plot.plot([], [], pen=pg.mkPen(CURRENT, width=1.5), symbol="o", symbolSize=4,
                                              symbolBrush=CURRENT, symbolPen=None, name="latency")
        self.p50 = pg.InfiniteLine(angle=0, movable=False, pen=pg.mkPen("#3aa55d", width=1, style=Qt.PenStyle.DashLine),
                                   label="p50", labelOpts={"position": 0.12, "color": "#3aa55d", "anchors": [(0, 0), (0, 0)]})
        self.p95 = pg.InfiniteLine(angle=0, movable=False, pen=pg.mkPen("#e8543f", width=1, style=Qt.PenStyle.DashLine),
                                   label="p95", labelOpts={"position": 0.88, "color": "#e8543f", "anchors": [(1, 1), (1, 1)]})
        for item in (self.p50, self.p95):
            item.setVisible(False)
            self.latency_plot.addItem(item)
        self.prev_throughput = line(self.throughput_plot, PREVIOUS)
        self.throughput = line(self.throughput_plot, CURRENT)
        self.prev_rss = line(self.memory_plot, PREVIOUS, "run before (RSS)")
        self.rss = line(self.memory_plot, CURRENT, "RSS")
        self.gpu_allocated = line(self.memory_plot, "#e8543f", "GPU allocated")
        self.gpu_reserved = line(self.memory_plot, "#e8543f", "GPU reserved", width=1, style=Qt.PenStyle.DotLine)
        self.prev_cpu = line(self.cpu_plot, PREVIOUS)
        self.cpu = line(self.cpu_plot, CURRENT)
        self.stage_bars: list = []
        self.hover = {}
        for name, widget, plot in (("latency", self.latency_widget, self.latency_plot),
                                   ("throughput", self.throughput_widget, self.throughput_plot),
                                   ("memory", self.memory_widget, self.memory_plot),
                                   ("cpu", self.cpu_widget, self.cpu_plot),
                                   ("stages", self.stage_widget, self.stage_plot)):
            text = pg.TextItem(color="#222", anchor=(0, 1), fill=pg.mkBrush(255, 255, 255, 220))
            text.setZValue(100)
            text.setVisible(False)
            plot.addItem(text, ignoreBounds=True)
            self.hover[name] = text
            widget.scene().sigMouseMoved.connect(lambda pos, n=name: self._hovered(n, pos))

    # ------------------------------------------------------------------ events

    def refresh(self) -> int:
        """Take the events published since the last refresh and redraw what they changed (GUI thread)."""
        events = self.buffer.drain()
        if not events:
            return 0
        changed = False
        for event in events:
            record = self.records.add(event)
            if isinstance(event, metrics.RunStarted):
                if self._follow:
                    self._shown = record
                    changed = True
                self._runs_changed()
            elif isinstance(event, metrics.RunFinished):
                self._runs_changed()
            if record is not None and record is self._shown:
                changed = True
        if changed:
            self._redraw()
        self.refreshed.emit(len(events))
        return len(events)

    def _runs_changed(self) -> None:
        box = self.run_box
        box.blockSignals(True)
        box.clear()
        for record in reversed(self.records.runs):
            box.addItem(record.label, record.run)
        if self._shown is not None:
            i = box.findData(self._shown.run)
            box.setCurrentIndex(max(0, i))
        box.blockSignals(False)

    def _picked(self, index: int) -> None:
        run = self.run_box.itemData(index)
        record = next((r for r in self.records.runs if r.run == run), None)
        if record is not None:
            self._follow = record is self.records.runs[-1]
            self._show(record)

    def _show(self, record: RunRecord | None) -> None:
        self._shown = record
        self._redraw(force=True)

    @property
    def shown(self) -> RunRecord | None:
        """The run the charts show."""
        return self._shown

    def _previous(self) -> RunRecord | None:
        runs = self.records.runs
        if self._shown is None or self._shown not in runs:
            return None
        i = runs.index(self._shown)
        return runs[i - 1] if i > 0 and self.compare.isChecked() else None

    # ------------------------------------------------------------------ drawing (GUI thread only)

    def _redraw(self, force: bool = False) -> None:
        """Redraw the charts whose data changed since they were last drawn (all with ``force``).

        A chart redrawn repaints its axes, and a label whose text changes can
        lay the whole window out again: each costs the GUI thread
        milliseconds, so nothing is redrawn that did not change.
        """
        record = self._shown
        if record is None:
            return
        prev = self._previous()
        key = (record.run, prev.run if prev is not None else None)
        if key != self._drawn_key:
            force = True
            self._drawn_key = key
            self._drawn = {}
        counts = {"batches": len(record.batches), "resources": len(record.resources), "stages": len(record.stages),
                  "finished": record.finished is not None}
        dirty = {k for k, v in counts.items() if force or self._drawn.get(k) != v}
        now = time.monotonic()
        if ("resources" in dirty and not force and not counts["finished"]
                and now - self._resources_drawn_at < RESOURCES_EVERY_S):
            dirty.discard("resources")  # memory and CPU: a few redraws a second are enough
            counts["resources"] = self._drawn.get("resources")
        if not dirty:
            return
        if "resources" in dirty:
            self._resources_drawn_at = now
        self._drawn = counts
        if dirty - {"resources"}:  # its memory figure may wait for the next batch
            text = record.summary()
            if text != self.summary.text():
                self.summary.setText(text)
        if force:  # the run compared with changes only when the run shown or the checkbox does
            self._draw_batches(prev, self.prev_latency, self.prev_throughput)
            self._draw_resources(prev, self.prev_rss, self.prev_cpu)
        if "batches" in dirty:
            self._draw_batches(record, self.latency, self.throughput)
            n = max(len(record.batches), len(prev.batches) if prev is not None else 0)
            for plot, curves in ((self.latency_plot, (self.latency, self.prev_latency)),
                                 (self.throughput_plot, (self.throughput, self.prev_throughput))):
                _integer_ticks(plot, n)
                # the latency chart keeps room above the data for the p95 label, drawn above its line
                headroom = 1.3 if plot is self.latency_plot else 1.0
                self._set_range(plot, (0.5, _nice_ceiling(max(n, 1)) + 0.5), (0, _curves_max(curves, scale=headroom)))
            p50, p95 = record.percentile_ms(50), record.percentile_ms(95)
            for item, value in ((self.p50, p50), (self.p95, p95)):
                item.setVisible(value is not None)
                if value is not None:
                    item.setValue(value)
                    item.label.setFormat(f"{'p50' if item is self.p50 else 'p95'} {value:.0f} ms")
        if "resources" in dirty:
            self._draw_resources(record, self.rss, self.cpu)
            span = max(record.since_start(record.resources[-1].t) if record.resources else 1.0,
                       prev.since_start(prev.resources[-1].t) if prev is not None and prev.resources else 0.0)
            x = (0, _nice_ceiling(span))
            self._set_range(self.memory_plot, x, (0, _curves_max((self.rss, self.prev_rss, self.gpu_reserved))))
            self._set_range(self.cpu_plot, x, (0, _curves_max((self.cpu, self.prev_cpu), floor=100.0)))
            t = np.array([record.since_start(r.t) for r in record.resources])
            alloc = [r.gpu_allocated for r in record.resources]
            if any(a is not None for a in alloc):
                self.gpu_allocated.setData(t, np.array([a or 0 for a in alloc], float) / 2**30)
                self.gpu_reserved.setData(t, np.array([r.gpu_reserved or 0 for r in record.resources], float) / 2**30)
            elif force:
                self.gpu_allocated.setData([], [])
                self.gpu_reserved.setData([], [])
        if "stages" in dirty:
            self._draw_stages(record)

    def _set_range(self, plot, x: tuple, y: tuple) -> None:
        """Set a chart's ranges, only when they change: they move in steps, so the axes are not redrawn each time."""
        key = (x, y)
        if self._ranges.get(id(plot)) == key:
            return
        self._ranges[id(plot)] = key
        plot.setXRange(*x, padding=0)
        plot.setYRange(*y, padding=0)

    @staticmethod
    def _draw_batches(record: RunRecord | None, latency, throughput) -> None:
        batches = record.batches if record is not None else []
        n = np.arange(1, len(batches) + 1)
        latency.setData(n, np.array([b.seconds * 1000 for b in batches], float))
        throughput.setData(n, np.array([b.mpx_per_s for b in batches], float))

    @staticmethod
    def _draw_resources(record: RunRecord | None, rss, cpu) -> None:
        samples = record.resources if record is not None else []
        t = np.array([record.since_start(r.t) for r in samples]) if samples else np.array([])
        rss.setData(t, np.array([r.rss for r in samples], float) / 2**30)
        cpu.setData(t, np.array([r.cpu_percent for r in samples], float))

    def _draw_stages(self, record: RunRecord) -> None:
        import pyqtgraph as pg

        for bar in self.stage_bars:
            self.stage_plot.removeItem(bar)
        self.stage_bars = []
        legend = self.stage_plot.legend
        if legend is not None:
            legend.clear()
        images = record.stages[-50:]  # the last 50 images of a batch
        if not images:
            return
        x = np.arange(1, len(images) + 1)
        bottom = np.zeros(len(images))
        for stage in STAGE_ORDER:
            height = np.array([s.seconds.get(stage, 0.0) for s in images])
            bar = pg.BarGraphItem(x=x, height=height, y0=bottom.copy(), width=0.7, brush=STAGE_COLOURS[stage],
                                  pen=pg.mkPen(None), name=stage)
            self.stage_plot.addItem(bar)
            self.stage_bars.append(bar)
            bottom += height
        self.stage_plot.setXRange(0.3, len(images) + 0.7, padding=0)
        _integer_ticks(self.stage_plot, len(images))
        self.stage_plot.setYRange(0, _nice_ceiling(max(float(bottom.max()), 1e-3) * 1.05), padding=0)

    def _hovered(self, name: str, pos) -> None:
        text = self.hover[name]
        record = self._shown
        plot = {"latency": self.latency_plot, "throughput": self.throughput_plot, "memory": self.memory_plot,
                "cpu": self.cpu_plot, "stages": self.stage_plot}[name]
        if record is None or not plot.sceneBoundingRect().contains(pos):
            text.setVisible(False)
            return
        point = plot.vb.mapSceneToView(pos)
        label = hover_text(record, name, point.x())
        text.setVisible(bool(label))
        if label:
            text.setText(label)
            text.setPos(point.x(), point.y())

    # ------------------------------------------------------------------ saving

    def save_png_to(self, path: str | Path) -> Path:
        """The charts of the run shown as a PNG."""
        path = Path(path)
        if not self.charts.grab().save(str(path), "PNG"):
            from ..core.errors import OutputError

            raise OutputError(f"cannot write {path}", path=path, hint="choose another folder")
        return path

    def save_csv_to(self, path: str | Path) -> Path:
        """Every event of the run shown, one row each (:meth:`RunRecord.write_csv`)."""
        if self._shown is None:
            from ..core.errors import InputError

            raise InputError("no run to save yet")
        return self._shown.write_csv(path)

    def _ask_png(self) -> None:
        self._ask("PNG image (*.png)", ".png", self.save_png_to)

    def _ask_csv(self) -> None:
        self._ask("CSV table (*.csv)", ".csv", self.save_csv_to)

    def _ask(self, filter_: str, suffix: str, save) -> None:
        from ..core.errors import SegStudioError

        if self._shown is None:
            self.summary.setText("No run to save yet.")
            return
        name = f"segstudio-run{self._shown.run}-{self._shown.started.kind}{suffix}"
        path, _ = QFileDialog.getSaveFileName(self, "Save", name, filter_)
        if not path:
            return
        try:
            save(path)
        except (SegStudioError, OSError) as e:
            self.summary.setText(f"Could not save: {e}")
        else:
            self.summary.setText(f"{self._shown.summary()} — saved {path}")

    def shutdown(self) -> None:
        """Stop listening (the window closes)."""
        self.timer.stop()
        self._unsubscribe()

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        self.shutdown()
        super().closeEvent(event)


def _nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 5 x 10^k at or above ``value`` (a range that grows in a few steps)."""
    if value <= 0:
        return 1.0
    k = 10 ** np.floor(np.log10(value))
    for m in (1, 2, 5, 10):
        if m * k >= value * 0.999999:
            return float(m * k)
    return float(10 * k)


def _curves_max(curves, floor: float = 0.0, scale: float = 1.0) -> float:
    """A stepped upper bound of what the curves hold (so a y range changes seldom)."""
    top = floor
    for curve in curves:
        y = curve.getData()[1]
        if y is not None and len(y):
            top = max(top, float(np.nanmax(y)))
    return _nice_ceiling(top * 1.05 * scale) if top > 0 else 1.0


def _integer_ticks(plot, n: int) -> None:
    """Whole-number ticks on the bottom axis of a chart of ``n`` batches or images (not 1.5, 2.5)."""
    step = max(1, int(np.ceil(n / 8)))
    plot.getAxis("bottom").setTickSpacing(major=step, minor=step)


def colour_key() -> str:
    """The charts' colours in words (rich text): one line instead of legends over the data."""
    def swatch(colour, text, dash=False):
        mark = "┅" if dash else "■"
        return f'<span style="color:{colour}">{mark}</span>&nbsp;{text}'

    runs = [swatch(CURRENT, "this run"), swatch(PREVIOUS, "the run before"), swatch("#3aa55d", "p50", True),
            swatch("#e8543f", "p95", True), swatch("#e8543f", "GPU memory")]
    stages = [swatch(STAGE_COLOURS[s], s) for s in STAGE_ORDER]
    return "&nbsp;&nbsp;".join(runs) + "&nbsp;&nbsp;&nbsp;&nbsp;stages: " + "&nbsp;&nbsp;".join(stages)


def hover_text(record: RunRecord, chart: str, x: float) -> str:
    """What the pointer at ``x`` on ``chart`` points at, in words ("" when nothing)."""
    if chart in ("latency", "throughput", "stages"):
        i = int(round(x)) - 1
        if chart == "stages":
            images = record.stages[-50:]
            if not 0 <= i < len(images):
                return ""
            s = images[i]
            parts = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in s.seconds.items() if v >= 0.0005)
            return f"{s.image}: {parts} (wall {s.wall:.2f} s)"
        if not 0 <= i < len(record.batches):
            return ""
        b = record.batches[i]
        return f"batch {i + 1}: {b.seconds * 1000:.0f} ms, {b.tiles} tile(s), {b.mpx_per_s:.2f} Mpx/s"
    if not record.resources:
        return ""
    times = np.array([record.since_start(r.t) for r in record.resources])
    r = record.resources[int(np.argmin(np.abs(times - x)))]
    if chart == "memory":
        gpu = (f", GPU {r.gpu_allocated / 2**30:.2f} GB allocated / {r.gpu_reserved / 2**30:.2f} reserved"
               if r.gpu_allocated is not None else "")
        return f"{record.since_start(r.t):.1f} s: RSS {r.rss / 2**30:.2f} GB (peak {r.peak_rss / 2**30:.2f}){gpu}"
    return f"{record.since_start(r.t):.1f} s: CPU {r.cpu_percent:.0f}%"
