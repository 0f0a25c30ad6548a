"""The Batch dock: drop a folder, watch the table fill, cancel, resume, open a finished file."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from segstudio.sample_data import sample_pairs
from test_app import drop  # noqa: E402 - tests/gui is on sys.path (rootdir-relative test modules)

from segstudio.app.main_window import batch_widget, build_window
from segstudio.core.image.sources import read_image
from segstudio.core.tasks.batch import MANIFEST

pytestmark = pytest.mark.gui


@pytest.fixture
def folder(tmp_path):
    """12 crops of a real sample image (two in a sub-folder), one corrupt file and a text file."""
    src = tmp_path / "plate"
    (src / "sub").mkdir(parents=True)
    image = read_image(sample_pairs()[1][0]).data
    for i in range(12):
        y, x = 16 * i, 8 * i
        name = f"sub/im{i:02d}.tif" if i >= 10 else f"im{i:02d}.tif"
        tifffile.imwrite(src / name, image[y:y + 128, x:x + 160])
    (src / "broken.tif").write_bytes(b"not a tiff at all")
    (src / "readme.txt").write_text("plate map")
    return src


def test_dropped_folder_runs_with_live_status_then_a_row_opens_image_and_labels(
        make_napari_viewer, qtbot, folder, no_thread_left_running):
    viewer = build_window(viewer=make_napari_viewer(), show=False)
    widget = batch_widget(viewer)
    panel = widget.panel
    panel.model_combo.setCurrentIndex(panel.model_combo.findData("nuclei-light"))
    seen = []
    panel.runner.progress.connect(lambda e: seen.append(e.info.get("status")))
    drop(viewer.window._qt_viewer, [folder])  # a folder dropped on the window goes to the Batch dock
    assert panel.is_running() and panel.out_dir == folder.with_name("plate_segstudio")
    qtbot.waitUntil(lambda: not panel.is_running(), timeout=120_000)
    assert panel.error_text() == ""
    statuses = panel.statuses()
    assert len(statuses) == 14 and sorted(set(statuses.values())) == ["done", "failed", "skipped"]
    assert statuses["broken.tif"] == "failed" and statuses["readme.txt"] == "skipped"
    assert statuses["sub/im10.tif"] == "done"
    assert seen.count("running") == 13 and seen.count("done") == 12  # every per-file event reached the GUI
    row = [panel.table.item(r, 0).text() for r in range(panel.table.rowCount())].index("broken.tif")
    assert "TIFF" in panel.table.item(row, 4).text()
    assert panel.report.counts == {"done": 12, "failed": 1, "skipped": 1}
    assert panel.progress_bar.value() == 1000 and "12 done, 1 failed" in panel.status.text()

    row = [panel.table.item(r, 0).text() for r in range(panel.table.rowCount())].index("sub/im10.tif")
    panel.table.cellClicked.emit(row, 0)
    assert "im10 labels" in viewer.layers and "im10" in viewer.layers
    labels = viewer.layers["im10 labels"]
    saved = tifffile.imread(panel.out_dir / "sub" / "im10_labels.tif")
    np.testing.assert_array_equal(labels.data, saved)
    assert len(labels.features) == len(np.unique(saved)) - 1 and "area_px" in labels.features


def test_cancel_then_resume_finishes_without_redoing(make_napari_viewer, qtbot, folder, no_thread_left_running):
    viewer = make_napari_viewer()
    from segstudio.napari_plugin._batch import BatchWidget

    widget = BatchWidget(viewer)
    panel = widget.panel
    panel.model_combo.setCurrentIndex(panel.model_combo.findData("nuclei-light"))
    out = folder.parent / "results"
    panel.set_folder(folder, out)
    assert panel.start_button.text() == "Start"
    done = []

    def on_progress(event):
        if event.info.get("status") == "done":
            done.append(event.info["file"])
            if len(done) == 3:
                panel.cancel()

    panel.runner.progress.connect(on_progress)
    panel.start()
    qtbot.waitUntil(lambda: not panel.is_running(), timeout=120_000)
    statuses = panel.statuses()
    assert "Cancelled" in panel.status.text() and "pending" in statuses.values() and "running" not in statuses.values()
    assert 3 <= list(statuses.values()).count("done") < 12
    assert panel.start_button.text() == "Resume"
    first_run = [ln for ln in (out / MANIFEST).read_text().splitlines() if '"done"' in ln]
    panel.runner.progress.disconnect(on_progress)
    again = []
    panel.runner.progress.connect(lambda e: again.append(e.info["file"]) if e.info.get("status") == "done" else None)
    panel.start()
    qtbot.waitUntil(lambda: not panel.is_running(), timeout=120_000)
    assert list(panel.statuses().values()).count("done") == 12
    assert len(again) == 12 - len(first_run)  # only the rest was processed
    widget.close()


def test_a_damaged_manifest_and_nan_pixels_are_shown(make_napari_viewer, qtbot, tmp_path, no_thread_left_running):
    """What the batch had to skip or make background is on screen: a notice, and the file's notes."""
    from segstudio.napari_plugin._batch import BatchWidget

    src, out = tmp_path / "plate", tmp_path / "results"
    src.mkdir()
    image = read_image(sample_pairs()[1][0]).data.astype(np.float32)
    image[10:20, 10:20] = np.nan
    tifffile.imwrite(src / "nan.tif", image[:128, :160])
    out.mkdir()
    (out / MANIFEST).write_bytes(b'{"file": 3}\n\x00\x00\n')
    widget = BatchWidget(make_napari_viewer())
    panel = widget.panel
    panel.model_combo.setCurrentIndex(panel.model_combo.findData("nuclei-light"))
    panel.set_folder(src, out)
    panel.start()
    qtbot.waitUntil(lambda: not panel.is_running(), timeout=120_000)
    assert not panel.notice.isHidden() and "skipped 2 damaged line(s)" in panel.notice.text()
    assert panel.statuses() == {"nan.tif": "done"}
    assert "100 of 20,480 pixels" in panel.table.item(0, 4).text()
