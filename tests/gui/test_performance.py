"""The Performance dock charts a real segmentation and a real batch: one point per network batch, stage totals
equal to the run's timings, plausible memory, and plot items touched on the GUI thread only."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tifffile
from segstudio.sample_data import sample_pairs

from segstudio.app.main_window import batch_widget, build_window, performance_widget, segment_widget
from segstudio.core import metrics
from segstudio.core.image.sources import read_image

pytestmark = pytest.mark.gui


@pytest.fixture
def pipeline_batches(monkeypatch):
    """The network calls the streaming pipeline makes, counted per image (the charts must show as many)."""
    import segstudio.core.segment.job as segment

    counts: list[int] = []
    real = segment.segment_plane_job

    def counting(plane, spec, predict, *args, **kwargs):
        counts.append(0)
        k = len(counts) - 1

        def counted(batch, crop=None):
            counts[k] += 1
            return predict(batch, crop)

        return real(plane, spec, counted, *args, **kwargs)

    monkeypatch.setattr(segment, "segment_plane_job", counting)
    return counts


@pytest.fixture
def gui_thread_only(monkeypatch):
    """Every call that changes a plot item, with whether it came from the GUI thread."""
    import pyqtgraph as pg

    calls: list[tuple[str, bool]] = []

    def watch(cls, name):
        real = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            calls.append((f"{cls.__name__}.{name}", threading.current_thread() is threading.main_thread()))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    watch(pg.PlotDataItem, "setData")
    watch(pg.BarGraphItem, "setOpts")
    watch(pg.InfiniteLine, "setValue")
    watch(pg.TextItem, "setText")
    return calls


def _plausible_memory(record):
    import psutil

    rss = [r.rss for r in record.resources]
    assert rss and min(rss) > 0
    assert all(r.rss <= r.peak_rss for r in record.resources)
    assert max(r.peak_rss for r in record.resources) < psutil.virtual_memory().total


def test_a_segmentation_is_charted_batch_by_batch(make_napari_viewer, qtbot, pipeline_batches, gui_thread_only,
                                                   no_thread_left_running, tmp_path):
    viewer = build_window(viewer=make_napari_viewer(), show=False)
    perf = performance_widget(viewer).panel
    widget = segment_widget(viewer)
    panel = widget.panel
    panel.model_combo.setCurrentIndex(panel.model_combo.findData("nuclei-light"))
    panel._tile = 128  # several network batches
    image = np.tile(read_image(sample_pairs()[0][0]).data, (2, 2))
    viewer.add_image(image, name="nuclei")
    widget.set_current_layer(viewer.layers["nuclei"])
    results = []
    panel.result_ready.connect(results.append)
    with qtbot.waitSignal(panel.runner.stopped, timeout=120_000):
        panel.run_button.click()
    qtbot.waitUntil(lambda: perf.shown is not None and perf.shown.finished is not None, timeout=5_000)
    record = perf.shown
    (result,) = results
    assert record.started.kind == "segment" and record.finished.outcome == "finished"
    assert sum(pipeline_batches) >= 2
    assert len(record.batches) == sum(pipeline_batches)  # one chart point per network batch
    x, y = perf.latency.getData()
    assert len(x) == len(record.batches)
    np.testing.assert_allclose(y, [b.seconds * 1000 for b in record.batches])
    totals = record.stage_totals()
    assert totals == pytest.approx({k: v for k, v in result.timings.items() if k != "wall"}, rel=1e-9)
    assert len(perf.stage_bars) == 6  # one stacked bar per stage
    _plausible_memory(record)
    assert "p50" in perf.summary.text() and "Mpx/s" in perf.summary.text()
    assert perf.p50.isVisible() and perf.p50.value() == pytest.approx(record.percentile_ms(50))
    # what the pointer is over, in words
    assert metrics_hover(perf, "latency", 1).startswith("batch 1: ")
    # saving: the CSV has a row per batch, per sample and per image; the PNG is an image
    perf.save_csv_to(tmp_path / "run.csv")
    rows = (tmp_path / "run.csv").read_text().splitlines()
    assert sum(r.startswith("batch,") for r in rows) == len(record.batches)
    assert sum(r.startswith("stages,") for r in rows) == 1
    perf.save_png_to(tmp_path / "run.png")
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert gui_thread_only and all(on_gui for _, on_gui in gui_thread_only), \
        [name for name, on_gui in gui_thread_only if not on_gui]

    # a second run is shown, with the first kept for comparison
    with qtbot.waitSignal(panel.runner.stopped, timeout=120_000):
        panel.run_button.click()
    qtbot.waitUntil(lambda: perf.shown is not record and perf.shown.finished is not None, timeout=5_000)
    assert [r.run for r in perf.records.runs] == [record.run, perf.shown.run]
    assert perf.run_box.count() == 2
    assert perf.run_box.currentText().startswith(f"#{perf.shown.run} segment")  # the newest, shown, is picked
    assert len(perf.prev_latency.getData()[0]) == len(record.batches)  # the run before, in grey


def metrics_hover(perf, chart, x):
    from segstudio.qt.performance import hover_text

    return hover_text(perf.shown, chart, x)


def test_a_batch_is_charted_image_by_image(make_napari_viewer, qtbot, tmp_path, pipeline_batches, gui_thread_only,
                                           no_thread_left_running):
    src = tmp_path / "plate"
    src.mkdir()
    image = read_image(sample_pairs()[1][0]).data
    for i in range(4):
        tifffile.imwrite(src / f"im{i}.tif", image[16 * i:16 * i + 160, :192])
    viewer = build_window(viewer=make_napari_viewer(), show=False)
    perf = performance_widget(viewer).panel
    panel = batch_widget(viewer).panel
    panel.model_combo.setCurrentIndex(panel.model_combo.findData("nuclei-light"))
    panel.set_folder(src, tmp_path / "out")
    panel.start()
    qtbot.waitUntil(lambda: not panel.is_running(), timeout=120_000)
    assert panel.report.counts == {"done": 4}
    qtbot.waitUntil(lambda: perf.shown is not None and perf.shown.finished is not None, timeout=5_000)
    record = perf.shown
    assert record.started.kind == "batch"
    assert len(record.batches) == sum(pipeline_batches)
    assert [s.image for s in record.stages] == [f"im{i}" for i in range(4)]
    for s in record.stages:  # each image's network stage is the sum of its batches' latencies
        mine = [b.seconds for b in record.batches if b.image == s.image]
        assert sum(mine) == pytest.approx(s.seconds["network"], rel=1e-9)
    assert len(perf.stage_bars) == 6 and len(perf.stage_bars[0].opts["x"]) == 4  # a bar per image
    _plausible_memory(record)
    assert all(on_gui for _, on_gui in gui_thread_only)


def test_the_dock_stops_listening_when_the_window_closes(make_napari_viewer, qtbot):
    viewer = build_window(viewer=make_napari_viewer(), show=False)
    perf = performance_widget(viewer).panel
    assert metrics.listening()
    perf.shutdown()
    assert not metrics.listening()


def test_what_a_first_labels_layer_imports_is_imported_off_the_gui_thread():
    """napari imports pandas and skimage.color on the GUI thread for the first labels layer (1.1 s + 0.6 s frozen):
    the Segment and Batch widgets start their import on one background thread, once per process. Checked in a
    fresh process, where neither is imported yet."""
    import subprocess
    import sys

    code = (
        "import sys, threading\n"
        "from segstudio.napari_plugin._layers import import_labels_support_in_background as start\n"
        "assert 'pandas' not in sys.modules and 'skimage.color' not in sys.modules\n"
        "t = start()\n"
        "assert t is not threading.current_thread() and t.name == 'segstudio-import-for-labels'\n"
        "assert start() is t\n"  # once per process
        "t.join(120)\n"
        "assert not t.is_alive() and 'pandas' in sys.modules and 'skimage.color' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
