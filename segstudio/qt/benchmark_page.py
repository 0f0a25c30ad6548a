"""The Benchmark page: ``segstudio bench`` in the app, with its table and chart.

Choose a model, tick the variants to compare (those that can run here,
from :func:`~segstudio.core.backends.runnable_variants`), the tile and
batch size, *Quick* (on by default: a full run takes tens of minutes on a
2-core CPU) and the image: the current image layer (given by
``get_image``, written to a temporary TIFF because the benchmark reads a
file) or the bundled 2048 x 2048 mosaic of the crowded sample
(:func:`~segstudio.core.tasks.benchmark.make_mosaic`).  Run starts
:func:`~segstudio.core.tasks.benchmark.bench_image_job` on a
:class:`~segstudio.qt.worker.JobRunner` thread, as one run of the inference
queue (:data:`~segstudio.core.service.INFERENCE`) and as a ``bench`` run of
the metrics hub; the progress bar and the status line show the job's
estimate and ETA.  At the end: one table row per variant (the naive
baseline included), a bar chart of network and end-to-end throughput, the
variants that were skipped with their reason, and *Save JSON…* (the report
dict, as ``segstudio bench --json`` writes it).

Qt only: no napari import here (the napari shell is
:mod:`segstudio.napari_plugin._benchmark`).  Every plot item is made and
changed on the GUI thread, in the slots.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QColor, QFont, QFontMetrics
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..core.backends import runnable_variants
from ..core.image.io import ImageData, atomic_path
from ..core.jobs import CancelToken, Job, Progress, Stage
from ..core.metrics import monitored
from ..core.models.catalog import Model
from ..core.optimize.estimate import format_seconds
from ..core.service import INFERENCE
from ..core.tasks.benchmark import BASELINE, MOSAIC_SIZE, BenchOptions, bench_image_job
from .charts import plot_widget
from .job_panel import JobPanel
from .segment_panel import available_models

LAYER, MOSAIC = "layer", "mosaic"
DEFAULT_TILE, DEFAULT_BATCH = 512, 4  # as ``segstudio bench``'s

# (title, tooltip) of the results table's columns
COLUMNS = (
    ("Variant", "the backend, device and precision (the baseline: PyTorch eager FP32 + scikit-image, sequential)"),
    ("Net Mpx/s", "network only: image megapixels per second of the network pass over the tiles"),
    ("E2E Mpx/s", "end to end: from the file on disk to labels (TIFF) and the per-cell table"),
    ("p50 ms", "latency of one tile (batch 1), median"),
    ("p95 ms", "latency of one tile (batch 1), 95th percentile"),
    ("RSS MB", "peak resident memory of the process while the variant ran"),
    ("Roofline", "network FLOP/s against the GEMM FLOP/s of the same device and precision, measured in this run"),
    ("Net ×", "network throughput against the naive baseline's"),
    ("E2E ×", "end-to-end throughput against the naive baseline's"),
)
NET_COLOUR, E2E_COLOUR = "#2f7cf6", "#f28e2b"
QUICK_NOTE = "Quick run: noisier numbers (untick Quick for figures to compare or publish)"
BASELINE_COLOUR = "#8a8a8a"


def fmt(value: float | None, digits: int = 3) -> str:
    """A figure for the table: ``digits`` significant digits, never exponent notation; ``-`` for none."""
    if value is None or not np.isfinite(value):
        return "-"
    if abs(value) >= 10 ** digits:
        return f"{value:.0f}"
    return f"{value:#.{digits}g}".rstrip(".")


def benchmark_page_job(model: Model, variants: list[str], image: ImageData | None, *, tile: int, batch_size: int,
                       quick: bool, cancel: CancelToken) -> Job[dict]:
    """The page's job (worker thread): :func:`bench_image_job`, as one ``bench`` run of the inference queue."""
    name = f"{model.name} on {image.name if image is not None else f'mosaic{MOSAIC_SIZE}'}"
    run = monitored(bench_image_job(model, variants, image, BenchOptions(tile=tile, batch_size=batch_size, quick=quick),
                                    cancel=cancel), "bench", name)
    report = yield from INFERENCE.turn(run, f"the benchmark of {model.name}", cancel)
    report["from"] = "the Benchmark page"
    return report


class BenchmarkPanel(JobPanel):
    """Model, variants, tile, batch, Quick and image; Run / Cancel / Save JSON…; progress; table and chart.

    Parameters
    ----------
    get_image : callable, optional
        Returns the :class:`ImageData` of the current image layer; called on
        the GUI thread when the user presses Run with "current image layer"
        chosen.  It may raise :class:`~segstudio.core.errors.SegStudioError`
        (shown in the panel).  Without it only the bundled mosaic is offered.

    Signals
    -------
    finished(dict)
        A run finished: its report.
    """

    finished = Signal(object)

    def __init__(self, get_image: Callable[[], ImageData] | None = None, *, parent: QWidget | None = None):
        super().__init__("Run", parent)
        self._get_image = get_image
        self._models = available_models()
        self._unticked: set[str] = set()
        self._t_start = 0.0
        self._estimate = ""
        self.report: dict | None = None
        self.bars: list = []  # the chart's items (GUI thread only)
        self._build_inputs(get_image is not None)
        self._build_results()
        self.run_button.setToolTip("benchmark the ticked variants and the baseline on the image")
        self.save_button = QPushButton("Save JSON…")
        self.save_button.setToolTip("the whole report, as segstudio bench --json writes it")
        self.progress_bar.setMaximumHeight(12)
        self.status.setText("Ready")
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.notice.setStyleSheet("color: #e8a33f;")
        layout = self.job_column(self._top(), self.save_button)
        for w in (self.table, self.skipped, self.legend):
            layout.addWidget(w)
        layout.addWidget(self.chart, 1)
        layout.addStretch(0)  # the inputs at the top until there are results
        self.model_combo.currentIndexChanged.connect(self._fill_variants)
        self.variant_list.itemChanged.connect(self._on_variant_toggled)
        self.save_button.clicked.connect(self._ask_json)
        self._fill_variants()
        self._set_idle()

    def _build_inputs(self, has_layer: bool) -> None:
        """Model, image source, tile and batch, Quick, the variants."""
        self.model_combo = QComboBox()
        for model in self._models.values():
            self.model_combo.addItem(model.name, model.name)
            self.model_combo.setItemData(self.model_combo.count() - 1, model.spec.title or model.name,
                                         Qt.ItemDataRole.ToolTipRole)
        self.image_combo = QComboBox()
        if has_layer:
            self.image_combo.addItem("current image layer", LAYER)
            self.image_combo.setItemData(0, "the selected image layer, else the top one (its first plane)",
                                         Qt.ItemDataRole.ToolTipRole)
        self.image_combo.addItem(f"bundled {MOSAIC_SIZE}x{MOSAIC_SIZE} mosaic", MOSAIC)
        self.image_combo.setItemData(self.image_combo.count() - 1,
                                     "a mirrored mosaic of the crowded sample: the same pixels on every machine",
                                     Qt.ItemDataRole.ToolTipRole)
        self.image_combo.setCurrentIndex(self.image_combo.findData(MOSAIC))
        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(32, 8192)
        self.tile_spin.setSingleStep(64)
        self.tile_spin.setValue(DEFAULT_TILE)
        self.tile_spin.setSuffix(" px")
        self.tile_spin.setToolTip("side of the network's tiles (as segstudio bench --tile)")
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 256)
        self.batch_spin.setValue(DEFAULT_BATCH)
        self.batch_spin.setToolTip("tiles per network call (as segstudio bench --batch-size)")
        self.quick_check = QCheckBox("Quick")
        self.quick_check.setChecked(True)
        self.quick_check.setToolTip(
            "a rough ranking in a couple of minutes: one run per variant, one batch of tiles for the network, end "
            "to end on the central 1024x1024 (noisier numbers). Unticked: 2 warm-up + 10 measured runs per "
            "variant over the whole image, tens of minutes on a 2-core CPU")
        self.variant_list = QListWidget()
        self.variant_list.setToolTip("the variants to compare (those that can run this model here); "
                                     "the naive baseline always runs")
        self.variant_list.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)

    def _build_results(self) -> None:
        """The results table, the skipped variants and the throughput chart (hidden until there are results)."""
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels([title for title, _ in COLUMNS])
        for i, (_, tip) in enumerate(COLUMNS):
            self.table.horizontalHeaderItem(i).setToolTip(tip)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        self.table.verticalHeader().setVisible(False)
        self.table.setWordWrap(False)
        self.table.verticalHeader().setDefaultSectionSize(self.table.fontMetrics().height() + 6)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        for column in range(1, len(COLUMNS)):
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.ResizeToContents)
        self.table.setVisible(False)
        self.skipped = QLabel("")
        self.skipped.setWordWrap(True)
        self.skipped.setVisible(False)
        self.chart, self.plot = plot_widget("Mpx/s", "", min_height=150)
        for axis in ("left", "bottom"):  # the variants' names say what the rows are, the legend the unit
            self.plot.getAxis(axis).showLabel(False)
        self.plot.invertY(True)
        self.plot.setMouseEnabled(x=False, y=False)
        self.plot.hideButtons()
        self.legend = QLabel(f"<span style='color:{NET_COLOUR}'>&#9632;</span> network only &nbsp; "
                             f"<span style='color:{E2E_COLOUR}'>&#9632;</span> end to end &nbsp; "
                             "(Mpx/s; the baseline's bars are grey)")
        self.chart.setVisible(False)
        self.legend.setVisible(False)

    def _top(self) -> QGridLayout:
        form = QFormLayout()
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow("Model", self.model_combo)
        form.addRow("Image", self.image_combo)
        sizes = QHBoxLayout()
        sizes.addWidget(self.tile_spin, 1)
        sizes.addWidget(QLabel("Batch"))
        sizes.addWidget(self.batch_spin, 1)
        form.addRow("Tile", sizes)
        form.addRow("", self.quick_check)
        variants = QVBoxLayout()
        variants.setContentsMargins(0, 0, 0, 0)
        variants.addWidget(QLabel("Variants"))
        variants.addWidget(self.variant_list, 1)
        top = QGridLayout()
        top.setContentsMargins(0, 0, 0, 0)
        top.addLayout(form, 0, 0)
        top.addLayout(variants, 0, 1)
        top.setColumnStretch(0, 3)
        top.setColumnStretch(1, 2)
        return top

    # ------------------------------------------------------------------ public

    @property
    def model_name(self) -> str:
        return self.model_combo.currentData() or ""

    def variants(self) -> list[str]:
        """The ticked variants, in the list's order."""
        out = []
        for i in range(self.variant_list.count()):
            item = self.variant_list.item(i)
            if item.checkState() == Qt.CheckState.Checked:
                out.append(item.text())
        return out

    def set_variants(self, names: list[str]) -> None:
        """Tick exactly ``names`` (others unticked); a name that cannot run here is ignored."""
        wanted = set(names)
        for i in range(self.variant_list.count()):
            item = self.variant_list.item(i)
            item.setCheckState(Qt.CheckState.Checked if item.text() in wanted else Qt.CheckState.Unchecked)

    def set_image_source(self, source: str) -> None:
        """``"layer"`` (the current image layer) or ``"mosaic"`` (the bundled mosaic)."""
        index = self.image_combo.findData(source)
        if index < 0:
            raise ValueError(f"no image source {source!r} here")
        self.image_combo.setCurrentIndex(index)

    def add_model(self, model: Model) -> None:
        """Offer ``model`` (e.g. one the optimization wizard kept as a user model) in the model list."""
        if model.name not in self._models:
            self._models[model.name] = model
            self.model_combo.addItem(model.name, model.name)

    def run(self) -> None:
        """Start the benchmark in the background (errors of the inputs are shown in the panel)."""
        if self.runner.is_running():
            return
        self.error_view.clear()
        model = self._models.get(self.model_name)
        variants = self.variants()
        if model is None:
            self.status.setText("No model to benchmark")
            return
        if not variants:
            self.status.setText("Tick at least one variant")
            return
        image = None
        if self.image_combo.currentData() == LAYER:
            try:
                image = self._get_image()
            except Exception as exc:  # noqa: BLE001 - shown to the user: verbatim if expected, as a bug otherwise
                self._show_error(exc)
                return
        tile, batch_size, quick = self.tile_spin.value(), self.batch_spin.value(), self.quick_check.isChecked()
        self._t_start = time.perf_counter()
        self._estimate = ""
        self._starting(f"Starting: {model.name}, {len(variants)} variant(s) and the baseline"
                       + (" (quick)" if quick else ""))
        self.runner.start(lambda cancel: benchmark_page_job(model, variants, image, tile=tile, batch_size=batch_size,
                                                            quick=quick, cancel=cancel))

    def save_json(self, path: str | Path) -> Path:
        """Write the last report as JSON at ``path``, atomically (readers never see half a file)."""
        if self.report is None:
            from ..core.errors import InputError

            raise InputError("no benchmark to save yet", hint="press Run first")
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.report, indent=1, default=str))
        return path

    def rows(self) -> list[list[str]]:
        """The results table's text, row by row."""
        return [[self.table.item(r, c).text() for c in range(self.table.columnCount())]
                for r in range(self.table.rowCount())]

    # ------------------------------------------------------------------ slots (GUI thread)

    def _on_progress(self, event: Progress) -> None:
        info = event.info
        if event.stage is Stage.NOTICE:
            self._add_notice(event.message)
            return
        if event.stage is Stage.ESTIMATE:
            self._estimate = info.get("text") or format_seconds(info.get("estimate_s", 0.0))
            self.status.setText(f"Estimate: about {self._estimate} on this machine\n{info.get('settings', '')}")
            self.status.setToolTip(event.message)
            return
        if event.stage is not Stage.BENCH:
            return
        if info.get("quick"):
            self._add_notice(QUICK_NOTE)
        if not event.total:  # setup
            self.status.setText(event.message[:1].upper() + event.message[1:] + "...")
            return
        fraction = info.get("fraction")
        fraction = event.done / event.total if fraction is None else fraction
        self.progress_bar.setValue(round(1000 * min(1.0, max(0.0, fraction))))
        left = info.get("eta_s")
        eta = f", about {format_seconds(left)} left" if left and event.done < event.total else ""
        estimate = f" (estimate {self._estimate})" if self._estimate else ""
        self.status.setText(f"Step {event.done} of {event.total}{eta}{estimate}\n"
                            f"{event.message} took {info.get('seconds', 0.0):.1f} s")

    def show_report(self, report: dict, elapsed_s: float | None = None) -> None:
        """Show ``report`` (a :func:`bench_job` report, e.g. one saved as JSON): status, table, chart."""
        self.report = report
        self.progress_bar.setValue(1000)
        img = report["image"]
        quick = " quick" if report.get("quick") else ""
        estimate = report["estimate"]
        rounds = (f"the timed rounds took {format_seconds(estimate.get('actual_s', 0.0))} "
                  f"(estimated {format_seconds(estimate['seconds'])})")
        done = f"Done in {format_seconds(elapsed_s)}; {rounds}" if elapsed_s is not None else rounds.capitalize()
        self.status.setText(f"{done}\n{report['model']['name']},{quick} {img['shape'][0]}x{img['shape'][1]}: "
                            f"{img.get('source', img['path'])}")
        if report.get("quick"):
            self._add_notice(QUICK_NOTE)
        self._fill_table(report)
        self._draw_chart(report)
        self.save_button.setEnabled(not self.runner.is_running())

    def _on_finished(self, report: dict) -> None:
        self.show_report(report, time.perf_counter() - self._t_start)
        self.finished.emit(report)

    def _on_cancelled(self) -> None:
        self.progress_bar.setValue(0)
        super()._on_cancelled()

    # ------------------------------------------------------------------ results

    def _fill_table(self, report: dict) -> None:
        rows = report["variants"]
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            roofline = row.get("roofline") or {}
            cells = (
                row["name"],
                fmt(row["net_mpix_s"]),
                fmt(row.get("e2e_mpix_s")),
                fmt(row["p50_ms"]),
                fmt(row["p95_ms"]),
                f"{row['peak_rss_mb']:.0f}",
                f"{100 * roofline['fraction']:.1f}%" if "fraction" in roofline else "-",
                f"{row['net_vs_baseline']:.2f}×" if "net_vs_baseline" in row else "-",
                f"{row['e2e_vs_baseline']:.2f}×" if "e2e_vs_baseline" in row else "-",
            )
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if c:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                if row["name"] == BASELINE:
                    item.setForeground(QColor(BASELINE_COLOUR))
                self.table.setItem(r, c, item)
            self.table.item(r, 0).setToolTip(row.get("describe", row["name"]))
            if "gemm" in roofline:
                self.table.item(r, 6).setToolTip(
                    f"{roofline['network_gflop_s']:.1f} GFLOP/s of {roofline['gemm_gflop_s']:.1f} "
                    f"({roofline['gemm']})")
        height = (self.table.horizontalHeader().sizeHint().height() + 2 * self.table.frameWidth()
                  + len(rows) * self.table.verticalHeader().defaultSectionSize())
        self.table.setFixedHeight(height + 2)
        self.table.setVisible(True)
        skipped = report.get("skipped") or {}
        self.skipped.setText("\n".join(f"Skipped {name}: {why}" for name, why in skipped.items()))
        self.skipped.setVisible(bool(skipped))

    def _draw_chart(self, report: dict) -> None:
        import pyqtgraph as pg

        for item in self.bars:
            self.plot.removeItem(item)
        self.bars = []
        rows = report["variants"]
        n = len(rows)
        net = np.array([r["net_mpix_s"] or 0.0 for r in rows], float)
        e2e = np.array([r.get("e2e_mpix_s") or 0.0 for r in rows], float)
        y = np.arange(n, dtype=float)
        grey = [r["name"] == BASELINE for r in rows]
        small = QFont(self.font())
        small.setPointSizeF(max(6.0, small.pointSizeF() * 0.85))
        for values, offset, colour, light in ((net, -0.2, NET_COLOUR, "#b5b5b5"), (e2e, 0.2, E2E_COLOUR, "#7a7a7a")):
            brushes = [pg.mkBrush(light if g else colour) for g in grey]
            bar = pg.BarGraphItem(x0=np.zeros(n), y=y + offset, width=values, height=0.38, brushes=brushes,
                                  pen=pg.mkPen(None))
            self.plot.addItem(bar)
            self.bars.append(bar)
            for yi, v in zip(y, values):
                if v > 0:
                    text = pg.TextItem(fmt(v), color="#333", anchor=(0, 0.5))
                    text.setFont(small)
                    text.setPos(v, yi + offset)
                    self.plot.addItem(text)
                    self.bars.append(text)
        left = self.plot.getAxis("left")
        left.setTicks([[(float(i), r["name"]) for i, r in enumerate(rows)]])
        # as wide as the longest name (pyqtgraph's own guess cuts the first letters off)
        metrics = QFontMetrics(left.style.get("tickFont") or self.chart.font())
        left.setWidth(max(metrics.horizontalAdvance(r["name"]) for r in rows) + 16 if rows else 40)
        top = float(max(net.max(initial=0.0), e2e.max(initial=0.0))) or 1.0
        self.plot.setXRange(0, top * 1.18, padding=0)  # room for the value at the end of the longest bar
        self.plot.setYRange(-0.6, n - 0.4, padding=0)
        self.chart.setVisible(True)
        self.legend.setVisible(True)

    def _ask_json(self) -> None:
        from ..core.errors import SegStudioError

        if self.report is None:
            self.status.setText("No benchmark to save yet: press Run first")
            return
        default = f"segstudio-bench-{self.report['model']['name']}-{self.report['date']}.json"
        path, _ = QFileDialog.getSaveFileName(self, "Save the benchmark report", default, "JSON (*.json)")
        if not path:
            return
        self.error_view.clear()
        try:
            self.save_json(path)
        except (SegStudioError, OSError) as exc:
            self._show_error(exc)
        else:
            self.status.setText(f"{self.status.text().splitlines()[0]}\nsaved {path}")

    # ------------------------------------------------------------------ state

    def _fill_variants(self) -> None:
        """The variants that can run the chosen model here, ticked unless the user unticked them before."""
        model = self._models.get(self.model_name)
        self.variant_list.blockSignals(True)
        try:
            self.variant_list.clear()
            for name in runnable_variants(model) if model is not None else []:
                item = QListWidgetItem(name)
                item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
                item.setCheckState(Qt.CheckState.Unchecked if name in self._unticked else Qt.CheckState.Checked)
                self.variant_list.addItem(item)
        finally:
            self.variant_list.blockSignals(False)
        shown = min(self.variant_list.count(), 6)  # up to six without scrolling
        row = self.variant_list.sizeHintForRow(0) if shown else 0
        self.variant_list.setMinimumHeight(shown * row + 2 * self.variant_list.frameWidth())
        self._update_run_button()

    def _on_variant_toggled(self, item: QListWidgetItem) -> None:
        if item.checkState() == Qt.CheckState.Checked:
            self._unticked.discard(item.text())
        else:
            self._unticked.add(item.text())
        self._update_run_button()

    def _update_run_button(self) -> None:
        if not self.runner.is_running():
            self.run_button.setEnabled(bool(self.variants()))

    def _inputs(self) -> list[QWidget]:
        return [self.model_combo, self.image_combo, self.tile_spin, self.batch_spin, self.quick_check,
                self.variant_list, self.save_button]

    def _set_idle(self) -> None:
        super()._set_idle()
        self.save_button.setEnabled(self.report is not None)
        self._update_run_button()
        if not self._models:
            self.run_button.setEnabled(False)
            self.status.setText("No built-in model is installed")
