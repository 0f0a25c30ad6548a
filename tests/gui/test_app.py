"""The standalone window: docked panel, sample, icon, files and drag and drop."""

from __future__ import annotations

import numpy as np
import pytest
from qtpy.QtCore import QMimeData, QPointF, Qt, QUrl
from qtpy.QtGui import QDragEnterEvent, QDropEvent, QIcon
from qtpy.QtWidgets import QApplication, QDockWidget
from segstudio.resources import ICON
from segstudio.sample_data import sample_pairs

from segstudio.app.main_window import (
    TITLE,
    batch_widget,
    benchmark_widget,
    build_window,
    optimize_widget,
    segment_widget,
)
from segstudio.core.image.sources import read_image
from segstudio.napari_plugin._sample_data import sample_id, sample_paths

pytestmark = pytest.mark.gui


def same_icon(a: QIcon, b: QIcon) -> bool:
    return a.pixmap(32, 32).toImage() == b.pixmap(32, 32).toImage()


def test_window_builds_with_panel_docked_and_sample_shown(make_napari_viewer):
    viewer = build_window(show_sample=True, viewer=make_napari_viewer(), show=False)
    window = viewer.window._qt_window
    assert viewer.title == TITLE and window.windowTitle() == TITLE
    assert not window.windowIcon().isNull() and same_icon(window.windowIcon(), QIcon(str(ICON)))

    widget = segment_widget(viewer)
    docks = [d for d in window.findChildren(QDockWidget) if d.isAncestorOf(widget)]
    assert len(docks) == 1 and docks[0].windowTitle() == "Segment"
    assert widget.panel.model_name == "nuclei" and widget.panel.run_button.isEnabled()

    first = sample_pairs()[0][0]
    image = viewer.layers[0]
    np.testing.assert_array_equal(image.data, read_image(first).data)
    assert f"{image.name} ground truth" in viewer.layers
    assert widget.current_layer() is image


def test_files_from_the_command_line_open_and_bad_ones_do_not_stop_the_app(make_napari_viewer, tmp_path):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"not a tiff")
    good = sample_paths("4327d2759187")[0]
    viewer = build_window([bad, good], viewer=make_napari_viewer(), show=False)
    assert [layer.name for layer in viewer.layers] == ["4327d2759187_img"]
    assert segment_widget(viewer).current_layer().name == "4327d2759187_img"


def drop(widget, paths) -> QDropEvent:
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths])
    pos = QPointF(widget.width() / 2, widget.height() / 2)
    enter = QDragEnterEvent(pos.toPoint(), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                            Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(widget, enter)
    assert enter.isAccepted()
    event = QDropEvent(pos, Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                       Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(widget, event)
    return event


def test_dropping_files_on_the_window_opens_them(make_napari_viewer):
    viewer = build_window(viewer=make_napari_viewer(), show=False)
    first, second = (pair[0] for pair in sample_pairs()[:2])
    drop(viewer.window._qt_viewer, [first])
    assert [layer.name for layer in viewer.layers] == [read_image(first).name]
    assert "segstudio" in viewer.layers[0].metadata  # opened by segstudio's reader, not napari's
    drop(segment_widget(viewer), [second])  # on the panel: the drop reaches the main window
    assert [layer.name for layer in viewer.layers] == [read_image(first).name, read_image(second).name]
    assert segment_widget(viewer).current_layer().name == sample_id(second) + "_img"


def test_multichannel_file_opens_one_layer_per_channel_and_measures_by_name(make_napari_viewer, qtbot, tmp_path):
    import tifffile

    nuclei = read_image(sample_paths("0287e7ee5b00")[0]).data
    path = tmp_path / "two.ome.tif"
    tifffile.imwrite(
        path, np.stack([nuclei // 2, nuclei]), ome=True,
        metadata={"axes": "CYX", "PhysicalSizeX": 0.4, "PhysicalSizeY": 0.4, "Channel": {"Name": ["GFP", "DAPI"]}},
    )
    viewer = build_window([path], viewer=make_napari_viewer(), show=False)
    assert [layer.name for layer in viewer.layers] == ["two [GFP]", "two [DAPI]"]
    dapi = viewer.layers["two [DAPI]"]
    np.testing.assert_allclose(dapi.scale, (0.4, 0.4))

    widget = segment_widget(viewer)
    widget.set_current_layer(dapi)
    with qtbot.waitSignal(widget.panel.runner.stopped, timeout=120_000):
        widget.panel.run_button.click()
    labels = viewer.layers["two [DAPI] labels"]
    assert {"mean_DAPI", "max_DAPI", "area_um2"} <= set(labels.features.columns)
    np.testing.assert_allclose(labels.scale, (0.4, 0.4))


def test_run_app_shows_the_window_then_returns_0(qtbot, monkeypatch):
    import gc

    import napari

    from segstudio.app import main_window

    seen = {}

    def fake_event_loop():
        viewer = napari.current_viewer()
        window = viewer.window._qt_window
        layers = [layer.name for layer in viewer.layers]
        seen.update(title=window.windowTitle(), visible=window.isVisible(), layers=layers)
        viewer.close()

    monkeypatch.setattr(main_window.napari, "run", fake_event_loop)
    assert main_window.run_app([], show_sample=True) == 0
    first = read_image(sample_pairs()[0][0]).name
    assert seen == {"title": TITLE, "visible": True, "layers": [first, f"{first} ground truth"]}
    qtbot.wait(50)  # let Qt delete the closed window
    gc.collect()


def test_a_model_the_optimize_wizard_keeps_is_offered_in_segment_batch_and_benchmark(make_napari_viewer):
    """What the wizard keeps can be used at once: segmented with, run on a folder, timed beside the original."""
    import dataclasses

    from segstudio.core.models.catalog import get_model

    viewer = build_window(viewer=make_napari_viewer(), show=False)
    base = get_model("nuclei-light")
    kept = dataclasses.replace(base, spec=dataclasses.replace(base.spec, name="nuclei-light-int8-kept"))
    optimize_widget(viewer)._offer(kept)
    assert segment_widget(viewer).panel.model_combo.currentData() == str(kept.card_path)
    for panel in (batch_widget(viewer).panel, benchmark_widget(viewer).panel):
        names = [panel.model_combo.itemData(i) for i in range(panel.model_combo.count())]
        assert names.count("nuclei-light-int8-kept") == 1, names


@pytest.mark.slow
def test_gui_self_test_opens_the_window_segments_the_sample_and_saves_a_screenshot(tmp_path):
    """`segstudio self-test --gui`, what the installers' smoke test runs inside each package, in a fresh process."""
    import json
    import os
    import subprocess
    import sys

    from qtpy.QtGui import QImage

    shot, report = tmp_path / "window.png", tmp_path / "gui.json"
    code = ("import sys; from segstudio.cli import main; "
            f"sys.exit(main(['self-test', '--gui', '--screenshot', {str(shot)!r}, '--json', {str(report)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SEGSTUDIO_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("PASS window")
    result = json.loads(report.read_text())
    assert 0 < result["window_shown_s"] < 600 and 0 < result["first_segmentation_s"] < 600
    assert result["objects"] > 20 and result["ap50"] >= 0.65  # the first sample: 55 objects, AP50 0.746
    image = QImage(str(shot))
    assert not image.isNull() and image.width() >= 800  # the whole window (1400x900 where the screen is as large)
