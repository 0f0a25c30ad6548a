"""The optimization wizard's Run and Result pages on the real engine, in the real window.

The INT8 preset runs on two bundled samples (few calibration tiles, small
speed tiles, so it takes seconds, not minutes); the result is compared with
the original on the open image (against itself: no disagreement; against a
copy whose post-processing thresholds are raised: the counts of an
independent computation), used (it appears in the Segment panel's list and
segments), and a pruning run is cancelled in the middle of its recovery and
resumed without redoing the pruning.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from segstudio.sample_data import sample_pairs

from segstudio.app.main_window import build_window, segment_widget
from segstudio.core.image.sources import read_image
from segstudio.core.jobs import run_sync
from segstudio.core.models.catalog import get_model, load_card
from segstudio.core.optimize.calibration import CalibrationSource
from segstudio.core.optimize.estimate import RunEstimate
from segstudio.core.optimize.report import EventKind, OptimizeEvent, OptimizeReport, StepStatus
from segstudio.core.optimize.steps import parse_steps
from segstudio.core.optimize.validate import ValidationSet
from segstudio.core.segment.options import SegmentOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_compare import independent_counts  # noqa: E402 - the count that shares no code with core/tasks/compare.py

pytest.importorskip("onnxruntime")
pytest.importorskip("torch")
pytestmark = pytest.mark.gui

SPEED_TILE = 128  # latencies measured on small tiles: the same comparisons, a fraction of the time


def _state(viewer, tmp_path, steps: str, max_drop=0.05):
    from napari.layers import Image

    from segstudio.napari_plugin._layers import layer_to_image
    from segstudio.qt.optimize_state import WizardState

    model = get_model("nuclei-light")
    pairs = [sample_pairs()[0], sample_pairs()[2]]  # 256 x 256 and 360 x 360
    images = [read_image(a) for a, _ in pairs]
    state = WizardState(
        model=model, calib=CalibrationSource(images, model.spec, n_tiles=8),
        vset=ValidationSet(images, [read_image(b).data for _, b in pairs], [a.stem for a, _ in pairs]),
        labelled=True, max_drop=max_drop, preset_key=None, steps=parse_steps(steps), out_dir=tmp_path / "run")
    state.speed_tile = SPEED_TILE
    n = len(state.steps)  # page 4 measures the estimate; here a given one saves its 20 s
    state.estimate = RunEstimate(total_s=60.0, per_step_s=(20.0,) * n, measure_s=20.0, basis="given by the test")

    def current_image():
        layer = next((la for la in reversed(viewer.layers) if isinstance(la, Image)), None)
        return layer_to_image(layer) if layer is not None else None

    def add_labels(data, name, colors):
        from napari.utils.colormaps import DirectLabelColormap

        if name in viewer.layers:
            viewer.layers.remove(name)
        cmap = DirectLabelColormap(color_dict={None: (0, 0, 0, 0), 0: (0, 0, 0, 0), **colors})
        viewer.add_labels(data, name=name, colormap=cmap)

    def use_model(model):
        from segstudio.core.models.user import keep_model

        kept = keep_model(model.card_path)
        segment_widget(viewer).panel.add_model(str(kept.card_path))

    state.current_image, state.add_labels, state.use_model = current_image, add_labels, use_model
    return state


def _degraded_copy(card: Path, dest: Path) -> Path:
    """The model with higher foreground / seed thresholds: fewer, smaller cells."""
    shutil.copytree(card.parent, dest)
    path = dest / card.name
    d = json.loads(path.read_text())
    d["spec"]["postprocess"].update(fg_threshold=0.9, seed_threshold=0.9)
    path.write_text(json.dumps(d))
    return path


def _two_samples(folder: Path) -> Path:
    """A folder with two of the bundled image / labels pairs (the 256 x 256 and 360 x 360 ones)."""
    folder.mkdir()
    for image, labels in (sample_pairs()[0], sample_pairs()[2]):
        shutil.copy(image, folder / image.name)
        shutil.copy(labels, folder / labels.name)
    return folder


def idle(page) -> bool:
    return not page.runner.is_running() and not getattr(page, "_queue", None)


def test_the_wizard_runs_int8_then_compares_and_uses_the_result(make_napari_viewer, qtbot, tmp_path,
                                                                 no_thread_left_running):
    from segstudio.app.main_window import optimize_widget

    viewer = build_window(viewer=make_napari_viewer(), show=False, show_sample=True)
    wizard = optimize_widget(viewer).wizard
    wizard.state.speed_tile = SPEED_TILE  # page 4's estimates and the run time small tiles: the same code, sooner
    samples = _two_samples(tmp_path / "samples")
    # 1. model, 2. calibration (8 tiles), 3. validation pairs with a 0.05 budget
    wizard.model_page.select("nuclei-light")
    qtbot.waitUntil(lambda: wizard.model_page.info is not None, timeout=60_000)
    assert wizard.next()
    calib = wizard.calibration_page
    calib.tiles_spin.setValue(8)
    calib.set_folder(samples)
    qtbot.waitUntil(lambda: idle(calib) and calib.build is not None, timeout=60_000)
    assert wizard.next()
    val = wizard.validation_page
    val.set_source("pairs", samples)
    val.drop_spin.setValue(0.05)
    qtbot.waitUntil(lambda: idle(val) and val.vset is not None, timeout=60_000)
    assert wizard.next() and wizard.state.max_drop == 0.05
    # 4. the INT8 preset; a bad Advanced value is refused with the allowed values, then a good one
    recipe = wizard.recipe_page
    recipe.advanced_button.setChecked(True)
    recipe.choose("prune-recover-int8")
    ratio = recipe.editor.box(0).field("ratio")
    ratio.set_raw(1.0)  # a pruning ratio is below 1
    assert ratio.spec.allowed() in recipe.editor.problems()[0]
    assert not wizard.next_button.isEnabled() and not wizard.next()
    recipe.choose("int8")
    assert recipe.editor.problems() == []
    recipe.editor.box(0).field("tiles").set_raw(8)
    qtbot.waitUntil(lambda: idle(recipe) and recipe.check_for(recipe.recipe_text()) is not None, timeout=120_000)
    assert wizard.next() and wizard.index == 4
    # 5. run
    run = wizard.run_page
    kinds = []
    run.runner.progress.connect(lambda p: kinds.append(p.event.kind) if isinstance(p.event, OptimizeEvent) else 0)
    with qtbot.waitSignal(run.finished, timeout=120_000) as done:
        run.start_button.click()
    report = done.args[0]
    qtbot.waitUntil(lambda: not run.is_running())
    assert isinstance(report, OptimizeReport) and run.error_view.report is None
    assert EventKind.BASELINE in kinds and EventKind.STEP_POINT in kinds and EventKind.STEP_FINISHED in kinds
    # the step list: one INT8 step, with its verdict and reason as the report has them
    row = report.steps[0]
    assert run.step_statuses() == [row.status] and row.status in (StepStatus.KEPT, StepStatus.ROLLED_BACK)
    cells = run.step_rows()[0]
    assert cells[1] == "quantize:int8:tiles=8" and cells[2] == row.status.value.replace("_", " ")
    assert cells[3] == f"{row.ap50:.4f}" and cells[6] == row.reason
    # the chart: the original and the step where the report puts them; guardrail; kept path and front from core
    data = run.chart_data
    finished = [(p.index, p.speedup, p.ap50) for p in data.points if not p.attempt]
    assert finished == [(-1, report.baseline.speedup_vs_baseline, report.baseline.ap50),
                        (0, row.speedup_vs_baseline, row.ap50)]
    assert data.guardrail == pytest.approx(report.baseline.ap50 - 0.05)
    assert list(data.pareto) == [(r.speedup_vs_baseline, r.ap50) for r in report.pareto()]
    assert list(data.kept_path) == [(r.speedup_vs_baseline, r.ap50) for r in report.kept_path()]
    assert len(run.points.getData()[0]) == len([p for p in data.points if p.index >= 0])

    # 6. the result (the wizard moves on by itself)
    assert wizard.index == 5
    result = wizard.result_page
    assert result.rows()[0][0] == "original" and result.rows()[1][0] == "1. " + row.name
    assert result.rows()[1][10] == row.reason and result.chosen is report.final
    # compare the original with itself: no disagreement
    result.roll_back_to(-1)
    with qtbot.waitSignal(result.comparison_ready, timeout=60_000) as same:
        result.compare()
    d = same.args[0].comparison.disagreement
    assert (d.only_reference, d.only_other, d.low_iou) == (0, 0, 0) and d.matched > 0
    assert not np.asarray(viewer.layers[result.overlay_name()].data).any()
    qtbot.waitUntil(lambda: result.compare_button.isEnabled())
    # against a degraded copy of the result: the counts of an independent computation, in the overlay layer
    degraded = _degraded_copy(Path(report.final.artifact), tmp_path / "degraded")
    result.show_report(replace(report, final=replace(report.final, artifact=degraded)))
    with qtbot.waitSignal(result.comparison_ready, timeout=60_000) as other:
        result.compare_button.click()
    c = other.args[0].comparison
    from segstudio.core.backends import auto_variant, create_backend
    from segstudio.core.segment.job import segment_job

    image = wizard.state.current_image()
    labels = []
    for card in (report.baseline.artifact, degraded):
        model = load_card(card)
        with create_backend(auto_variant(model), model) as backend:
            labels.append(run_sync(segment_job(image, model, backend, SegmentOptions(measure_cells=False))).labels)
    counts, overlay = independent_counts(*labels)
    d = c.disagreement
    assert (d.only_reference, d.only_other, d.low_iou, d.matched) == counts and d.disagreeing > 0
    np.testing.assert_array_equal(np.asarray(viewer.layers[result.overlay_name()].data), overlay)
    assert f"Only in the original: {counts[0]}" in result.compare_status.text()
    qtbot.waitUntil(lambda: result.compare_button.isEnabled())
    # use the run's model: it reaches the Segment panel's list, and it segments
    result.show_report(report)
    if report.final_from is None:
        pytest.skip("the run kept the original (INT8 rolled back on this machine): nothing new to use")
    with qtbot.waitSignal(wizard.model_added, timeout=30_000) as added:
        result.use_button.click()
    kept = added.args[0]
    panel = segment_widget(viewer).panel
    assert panel.model_combo.currentData() == str(kept.card_path)
    with qtbot.waitSignal(panel.result_ready, timeout=60_000) as seg:
        panel.run()
    assert seg.args[0].n_cells > 0 and "int8" in seg.args[0].backend
    qtbot.waitUntil(lambda: not panel.is_running())
    wizard.shutdown()


@pytest.mark.slow
def test_cancel_in_recovery_then_resume_keeps_the_pruning(make_napari_viewer, qtbot, tmp_path,
                                                          no_thread_left_running):
    from segstudio.qt.optimize_run import RunPage

    viewer = build_window(viewer=make_napari_viewer(), show=False)
    state = _state(viewer, tmp_path, "prune:0.5,recover:steps=5000:crop=64,quantize:int8:tiles=8", max_drop=0.5)
    page = RunPage(state)
    viewer.window.add_dock_widget(page, name="Optimize run", area="right")
    events = []
    page.runner.progress.connect(lambda p: events.append(p.event) if isinstance(p.event, OptimizeEvent) else 0)
    page.start()
    qtbot.waitUntil(lambda: len(page.model.loss.get(1, ())) >= 1, timeout=120_000)  # the first loss events
    assert page.step_statuses()[:2] == [StepStatus.KEPT, StepStatus.RUNNING]
    prune_dir = state.out_dir / "01-prune"
    mtime = prune_dir.stat().st_mtime_ns
    t0 = time.perf_counter()
    with qtbot.waitSignal(page.runner.cancelled, timeout=5_000):
        page.cancel_button.click()
    assert time.perf_counter() - t0 < 5
    assert page.step_statuses() == [StepStatus.KEPT, StepStatus.WAITING, StepStatus.WAITING]
    assert "Cancelled: 1 of 3" in page.headline.text() and page.resume_button.isEnabled()
    assert (state.out_dir / "state.json").is_file() and prune_dir.is_dir()
    # resume: the pruning is not redone, the recovery starts again; stop it once it trains
    events.clear()
    page.resume_button.click()
    qtbot.waitUntil(lambda: any(e.kind is EventKind.STEP_PROGRESS and e.step == 1 and e.loss is not None
                                for e in events), timeout=120_000)
    with qtbot.waitSignal(page.runner.cancelled, timeout=5_000):
        page.cancel()
    started = [e.step for e in events if e.kind is EventKind.STEP_STARTED]
    assert started == [1]
    assert [e.step for e in events if e.kind is EventKind.STEP_FINISHED] == [0]
    assert prune_dir.stat().st_mtime_ns == mtime
    page.close()
