"""The Benchmark page: a real quick run fills the table and the chart and saves its JSON; Cancel stops it.

Kept small: the 256x256 sample, nuclei-light, ONNX Runtime and the baseline, quick settings.  Figures are
checked for presence and sign only (the machine is shared); nothing here is timed.
"""

from __future__ import annotations

import json

import pytest
from segstudio.sample_data import sample_pairs

from segstudio.core.backends import installed, runnable_variants
from segstudio.core.image.sources import read_image
from segstudio.core.models.catalog import get_model
from segstudio.core.tasks.benchmark import BASELINE

pytestmark = [pytest.mark.gui, pytest.mark.skipif(not (installed("torch") and installed("onnxruntime")),
                                                  reason="needs torch (the baseline) and ONNX Runtime")]

ORT = "onnxruntime@cpu:fp32"


@pytest.fixture(scope="module")
def small():
    """The 256x256 sample (0287e7ee5b00)."""
    path = next(p for p, _ in sample_pairs() if p.name.startswith("0287e7ee5b00"))
    image = read_image(path)
    assert image.data.shape == (256, 256)
    return image


def _light(panel) -> None:
    panel.model_combo.setCurrentIndex(panel.model_combo.findData("nuclei-light"))
    panel.set_variants([ORT])


def test_a_quick_run_on_the_image_layer_fills_table_and_chart_and_saves_json(
        make_napari_viewer, qtbot, tmp_path, small, no_thread_left_running):
    from segstudio.core.metrics import HUB, RunStarted
    from segstudio.napari_plugin._benchmark import BenchmarkWidget

    viewer = make_napari_viewer()
    viewer.add_image(small.data, name="small")
    widget = BenchmarkWidget(viewer)
    panel = widget.panel
    for name in ("nuclei", "nuclei-light"):  # the list is re-filled from what can run the chosen model here
        panel.model_combo.setCurrentIndex(panel.model_combo.findData(name))
        listed = [panel.variant_list.item(i).text() for i in range(panel.variant_list.count())]
        assert listed == runnable_variants(get_model(name)) and panel.variants() == listed
    assert ORT in listed and panel.quick_check.isChecked()
    assert (panel.tile_spin.value(), panel.batch_spin.value()) == (512, 4)
    _light(panel)
    assert panel.variants() == [ORT]
    panel.set_image_source("layer")
    events, kinds = [], []
    panel.runner.progress.connect(events.append)
    unsubscribe = HUB.subscribe(lambda e: kinds.append(e.kind) if isinstance(e, RunStarted) else None)
    try:
        panel.run_button.click()
        assert panel.is_running() and not panel.run_button.isEnabled()
        qtbot.waitUntil(lambda: not panel.is_running(), timeout=180_000)
    finally:
        unsubscribe()
    assert panel.error_text() == "" and panel.report is not None, panel.status.text()
    assert kinds == ["bench"]  # one run of the metrics hub, of kind bench
    assert any(str(e.stage) == "estimate" for e in events) and "Done in" in panel.status.text()
    assert "Quick run" in panel.notice.text()

    rows = panel.rows()
    assert [r[0] for r in rows] == [BASELINE, ORT]  # one row per variant, the baseline included
    for row in rows:
        for text in row[1:6]:  # network and end-to-end Mpx/s, p50, p95, peak RSS
            assert float(text) > 0
        assert float(row[6].rstrip("%")) > 0 and float(row[7].rstrip("×")) > 0 and float(row[8].rstrip("×")) > 0
    assert rows[0][7] == "1.00×"
    assert len([b for b in panel.bars if type(b).__name__ == "BarGraphItem"]) == 2  # network and end to end
    report = panel.report
    assert report["quick"] and report["image"]["shape"] == [256, 256] and "'small'" in report["image"]["source"]

    assert panel.save_button.isEnabled()
    out = panel.save_json(tmp_path / "bench.json")
    back = json.loads(out.read_text())
    assert [v["name"] for v in back["variants"]] == [BASELINE, ORT]
    assert back["variants"][1]["net_mpix_s"] == pytest.approx(report["variants"][1]["net_mpix_s"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]  # written in place, atomically
    widget.close()


def test_cancel_mid_run_stops_and_an_input_error_is_shown(qtbot, small, no_thread_left_running):
    from segstudio.core.errors import InputError
    from segstudio.qt.benchmark_page import BenchmarkPanel

    layer = []  # no image layer yet

    def current_image():
        if not layer:
            raise InputError("there is no image layer to benchmark on", hint="open an image")
        return layer[0]

    panel = BenchmarkPanel(current_image)
    qtbot.addWidget(panel)
    _light(panel)
    panel.set_image_source("layer")
    panel.run_button.click()
    assert not panel.is_running() and "no image layer" in panel.error_text() and "open an image" in panel.error_text()

    layer.append(small)
    stages = []

    def on_progress(event):
        stages.append(str(event.stage))
        if stages[-1] == "estimate":  # the timed rounds start: cancel now
            panel.cancel_button.click()

    panel.runner.progress.connect(on_progress)
    panel.run_button.click()
    assert panel.error_text() == "" and panel.is_running()
    qtbot.waitUntil(lambda: not panel.is_running(), timeout=180_000)
    assert "estimate" in stages and panel.status.text() == "Cancelled"
    assert panel.report is None and panel.table.rowCount() == 0 and not panel.save_button.isEnabled()
    assert panel.run_button.isEnabled() and not panel.cancel_button.isEnabled()


def test_the_page_is_a_tab_next_to_optimize_in_the_window(make_napari_viewer):
    from qtpy.QtWidgets import QDockWidget

    from segstudio.app.main_window import benchmark_widget, build_window, optimize_widget

    viewer = build_window(viewer=make_napari_viewer(), show=False)
    window = viewer.window._qt_window
    panel = benchmark_widget(viewer).panel
    docks = {name: next(d for d in window.findChildren(QDockWidget) if d.isAncestorOf(w))
             for name, w in (("benchmark", benchmark_widget(viewer)), ("optimize", optimize_widget(viewer)))}
    assert docks["benchmark"].windowTitle() == "Benchmark"
    assert docks["benchmark"] in window.tabifiedDockWidgets(docks["optimize"])
    assert panel.image_combo.currentData() == "mosaic" and panel.image_combo.findData("layer") >= 0
    assert not panel.is_running() and panel.table.isHidden() and panel.chart.isHidden()
