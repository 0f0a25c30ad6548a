"""The napari "Segment" widget: labels, measurements, responsiveness, cancel, errors."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from napari.layers import Image, Labels
from qtpy.QtCore import QTimer

from segstudio.core.errors import InputError
from segstudio.core.image.sources import read_image
from segstudio.core.tasks.evaluate import score
from segstudio.napari_plugin._layers import layer_to_image
from segstudio.napari_plugin._sample_data import sample_paths
from segstudio.napari_plugin._widget import SegmentWidget
from segstudio.qt import segment_panel
from segstudio.qt.worker import running_job_threads

pytestmark = pytest.mark.gui

JOB_TIMEOUT_MS = 120_000  # the machine may be busy; a normal run takes a few seconds
SHAPE_COLUMNS = ["label", "area_px", "centroid_y", "centroid_x", "eccentricity", "solidity"]


def add_widget(viewer) -> SegmentWidget:
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    return widget


def run_and_wait(qtbot, widget: SegmentWidget) -> None:
    with qtbot.waitSignal(widget.panel.runner.stopped, timeout=JOB_TIMEOUT_MS):
        widget.panel.run_button.click()


def test_segment_sample_adds_labels_with_measurements(make_napari_viewer, qtbot, monkeypatch):
    image_path, truth_path = sample_paths("4327d2759187")
    truth = read_image(truth_path).data
    viewer = make_napari_viewer()
    viewer.add_image(read_image(image_path).data, name="nuclei", scale=(0.5, 0.5), translate=(10, 20))
    widget = add_widget(viewer)
    assert widget.current_layer().name == "nuclei"

    job_threads, job_options = [], []
    real_segment_job = segment_panel.segment_job

    def recording_segment_job(*args, **kwargs):
        job_threads.append(threading.get_ident())
        job_options.append(args[3])  # the SegmentOptions the panel built
        return (yield from real_segment_job(*args, **kwargs))

    monkeypatch.setattr(segment_panel, "segment_job", recording_segment_job)
    run_and_wait(qtbot, widget)
    assert widget.panel.error_text() == ""
    assert job_threads and threading.get_ident() not in job_threads  # inference ran off the GUI thread

    labels = viewer.layers["nuclei labels"]
    assert isinstance(labels, Labels)
    assert labels.data.shape == truth.shape and labels.data.dtype == np.uint16
    np.testing.assert_allclose(labels.scale, (0.5, 0.5))
    np.testing.assert_allclose(labels.translate, (10, 20))
    assert score(truth, labels.data).ap[0.5] > 0.3

    features = labels.features
    ids = np.unique(labels.data)
    ids = ids[ids > 0]
    assert len(features) == len(ids) > 0
    np.testing.assert_array_equal(np.sort(features["label"].to_numpy()), ids)
    for column in [*SHAPE_COLUMNS, "mean_ch0", "max_ch0", "area_um2"]:
        assert column in features.columns, column
    np.testing.assert_allclose(features["area_um2"], features["area_px"] * 0.25)
    assert "objects" in widget.panel.status.text()

    # a second run (averaged over flips this time) replaces the labels in the same layer
    labels.opacity = 0.3
    n_layers = len(viewer.layers)
    widget.panel.tta_check.setChecked(True)
    run_and_wait(qtbot, widget)
    assert [o.tta for o in job_options] == [False, True]
    assert len(viewer.layers) == n_layers
    assert viewer.layers["nuclei labels"] is labels and labels.opacity == pytest.approx(0.3)
    assert score(truth, labels.data).ap[0.5] > 0.3


def mosaic() -> np.ndarray:
    """A 2048 x 2048 mosaic of a sample: big enough to cancel while it runs."""
    tile = read_image(sample_paths("0287e7ee5b00")[0]).data
    return np.tile(tile, (2048 // tile.shape[0], 2048 // tile.shape[1]))


def test_ui_stays_responsive_and_cancel_stops_the_job(make_napari_viewer, qtbot, no_thread_left_running):
    viewer = make_napari_viewer()
    viewer.add_image(mosaic(), name="mosaic")
    widget = add_widget(viewer)
    panel = widget.panel

    ticks = []
    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    try:
        with qtbot.waitSignal(
            panel.runner.progress,
            check_params_cb=lambda event: event.stage == "network" and event.done > 0,
            timeout=JOB_TIMEOUT_MS,
        ):
            t0 = time.perf_counter()
            panel.run_button.click()
        t1 = time.perf_counter()
        assert panel.is_running() and not panel.run_button.isEnabled() and panel.cancel_button.isEnabled()
        assert panel.progress_bar.value() > 0
        during = [t for t in ticks if t0 <= t <= t1]
        gaps = np.diff([t0, *during, t1])
        # the GUI thread kept serving timer events while the model ran on the worker thread
        assert len(during) >= 0.25 * (t1 - t0) / 0.020, (len(during), t1 - t0)
        assert gaps.max() < 1.0, gaps.max()

        with qtbot.waitSignal(panel.runner.cancelled, timeout=JOB_TIMEOUT_MS):
            panel.cancel_button.click()
    finally:
        timer.stop()
    assert not panel.is_running() and running_job_threads() == 0
    assert no_thread_left_running.running() == []
    assert "mosaic labels" not in viewer.layers
    assert panel.status.text() == "Cancelled" and panel.run_button.isEnabled()


def test_too_small_image_shows_the_error(make_napari_viewer, qtbot, no_thread_left_running):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((4, 4), np.uint8), name="tiny")
    widget = add_widget(viewer)
    widget.panel.run_button.click()
    message = widget.panel.error_text()
    assert "tiny: image is 4x4 pixels, too small to segment" in message
    assert not message.startswith("Unexpected")
    assert not widget.panel.is_running() and widget.panel.run_button.isEnabled()
    assert "tiny labels" not in viewer.layers
    assert no_thread_left_running.running() == []

    viewer.layers.clear()
    widget.panel.run_button.click()
    assert widget.panel.error_text().startswith("there is no image layer to segment")


def test_chooser_follows_the_layer_list(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = add_widget(viewer)
    assert widget.layer_combo.count() == 0
    viewer.add_image(np.zeros((16, 16)), name="a")
    viewer.add_labels(np.zeros((16, 16), np.uint16), name="not an image")
    viewer.add_image(np.zeros((16, 16, 3), np.uint8), name="colour", rgb=True)
    names = [widget.layer_combo.itemText(i) for i in range(widget.layer_combo.count())]
    assert names == ["colour", "a"]
    assert widget.current_layer().name == "colour"  # a newly opened image is chosen
    assert widget.panel.channel_combo.count() == 4  # auto, red, green, blue
    widget.set_current_layer("a")
    assert not widget.panel.channel_combo.isEnabled()
    viewer.layers["a"].name = "renamed"
    assert widget.current_layer().name == "renamed"
    viewer.layers.remove("renamed")
    assert [widget.layer_combo.itemText(i) for i in range(widget.layer_combo.count())] == ["colour"]


def test_layers_become_image_data():
    rgba = Image(np.zeros((2, 20, 30, 4), np.uint8), rgb=True, name="rgba", scale=(1, 0.2, 0.3))
    image = layer_to_image(rgba)
    assert image.axes == "ZCYX" and image.data.shape == (2, 3, 20, 30)  # alpha dropped
    assert image.channel_names == ["red", "green", "blue"] and image.pixel_size == pytest.approx((0.2, 0.3))

    stack = Image(np.zeros((3, 4, 20, 30), np.uint16), name="stack")
    image = layer_to_image(stack)
    assert image.axes == "TZYX" and image.pixel_size is None and image.name == "stack"

    with pytest.raises(InputError, match="5-D layer"):
        layer_to_image(Image(np.zeros((2, 2, 2, 20, 30)), name="five"))


def test_z_stack_is_segmented_plane_by_plane(make_napari_viewer, qtbot):
    plane = read_image(sample_paths("0287e7ee5b00")[0]).data
    viewer = make_napari_viewer()
    viewer.add_image(np.stack([plane, plane[::-1]]), name="stack")
    widget = add_widget(viewer)
    run_and_wait(qtbot, widget)
    labels = viewer.layers["stack labels"]
    assert labels.data.shape == (2, *plane.shape)
    features = labels.features
    assert set(features["z"]) == {0, 1}
    assert len(features) == len(np.unique(labels.data)) - 1
    assert widget.panel.progress_bar.value() == widget.panel.progress_bar.maximum()


def start_and_wait_for_network(qtbot, panel) -> None:
    with qtbot.waitSignal(
        panel.runner.progress, check_params_cb=lambda event: event.stage == "network", timeout=JOB_TIMEOUT_MS
    ):
        panel.run_button.click()
    assert panel.is_running()


def test_closing_the_window_or_deleting_the_widget_stops_the_job(make_napari_viewer, qtbot, no_thread_left_running):
    big = mosaic()[:1024, :1024]
    viewer = make_napari_viewer()
    viewer.add_image(big, name="big")
    widget = add_widget(viewer)
    start_and_wait_for_network(qtbot, widget.panel)
    viewer.window.remove_dock_widget(widget)
    widget.deleteLater()  # a widget deleted mid-job cancels it; the thread object outlives it
    del widget
    qtbot.waitUntil(lambda: running_job_threads() == 0, timeout=JOB_TIMEOUT_MS)

    widget = add_widget(viewer)
    start_and_wait_for_network(qtbot, widget.panel)
    viewer.close()  # closing the window cancels the job and joins its thread before returning
    assert running_job_threads() == 0 and no_thread_left_running.running() == []


def test_finetune_on_corrected_labels_adds_a_model(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    """Segment, "correct" the labels (here: the ground truth), fine-tune: curve shown, new model offered."""
    pytest.importorskip("torch")
    monkeypatch.setenv("SEGSTUDIO_HOME", str(tmp_path / "home"))
    image_path, truth_path = sample_paths("4327d2759187")
    viewer = make_napari_viewer()
    viewer.add_image(read_image(image_path).data, name="nuclei")
    widget = add_widget(viewer)
    run_and_wait(qtbot, widget)
    assert widget.labels_combo.currentText() == "nuclei labels"
    viewer.layers["nuclei labels"].data = read_image(truth_path).data.astype(np.int32)  # the user's corrections
    panel = widget.finetune
    panel.steps.setValue(25)
    with qtbot.waitSignal(panel.model_ready, timeout=300_000) as ready:
        panel.run_button.click()
        assert panel.is_running() and not panel.run_button.isEnabled()
    card = ready.args[0]
    assert card.startswith(str(tmp_path / "home" / "models"))
    assert not panel.curve.isHidden() and not panel.curve.pixmap().isNull()
    assert "Validation AP50" in panel.status.text()
    result = panel.last_result
    assert result["val_images"] == 1 and result["train_images"] >= 3  # one image cut into strips, one held out
    # the new model is in the model list, chosen, and segments
    assert widget.panel.model_combo.currentData() == card
    run_and_wait(qtbot, widget)
    assert widget.panel.error_text() == ""
    assert viewer.layers["nuclei labels"].data.max() > 5


def test_finetune_without_labels_layer_says_so(make_napari_viewer, qtbot):
    image_path, _ = sample_paths("4327d2759187")
    viewer = make_napari_viewer()
    viewer.add_image(read_image(image_path).data, name="nuclei")
    widget = add_widget(viewer)
    widget.finetune.run_button.click()
    assert "no Labels layer to train on" in widget.finetune.status.text()
    assert not widget.finetune.is_running()


def test_finetune_without_pytorch_is_greyed_out_with_the_reason(make_napari_viewer, monkeypatch):
    """The standard app bundle has no PyTorch: the button says why it cannot train instead of failing."""
    from segstudio.qt import finetune_panel

    assert finetune_panel.installed("torch")  # this environment has it: the button works
    viewer = make_napari_viewer()
    assert add_widget(viewer).finetune.run_button.isEnabled()
    monkeypatch.setattr(finetune_panel, "installed", lambda package: package != "torch")
    panel = add_widget(viewer).finetune
    assert not panel.run_button.isEnabled() and not panel.steps.isEnabled()
    assert "needs PyTorch" in panel.status.text() and "needs PyTorch" in panel.run_button.toolTip()
