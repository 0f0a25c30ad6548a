"""Wizard pages 5 (Run) and 6 (Result) fed with hand-made typed events and reports.

The job behind the Run page is replaced by a generator that yields the
:class:`OptimizeEvent` sequence a run yields (through the real
:class:`JobRunner` thread and its throttle); the whole-wizard test on the
real engine is ``test_optimize_wizard.py``.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

from segstudio.core.errors import Cancelled
from segstudio.core.jobs import Progress
from segstudio.core.models.catalog import get_model
from segstudio.core.optimize.report import (
    EventKind,
    LayerSensitivity,
    OptimizeEvent,
    OptimizeReport,
    StepReport,
    StepStatus,
)

pytestmark = pytest.mark.gui

LABELS = ["prune:0.5", "recover:steps=40", "quantize:int8", "engine:fp16"]


def _state(tmp_path):
    return SimpleNamespace(model=get_model("nuclei-light"), target="cpu", calib=None, vset=None, labelled=True,
                           max_drop=0.01, min_speedup=1.05, preset_key="prune-recover-int8",
                           steps=[SimpleNamespace(label=s) for s in LABELS], estimate=None, out_dir=tmp_path / "out")


def _row(i, status, ap50, speed, reason="", **kw):
    return StepReport(index=i, name=LABELS[i] if i >= 0 else "original", status=status, reason=reason, ap50=ap50,
                      speedup_vs_baseline=speed, latency_ms=100 / speed if speed else None, seconds=3.0,
                      backend="openvino:fp32", **kw)


def _report(tmp_path, rows, baseline, final=True):
    return OptimizeReport(model="nuclei-light", out_dir=tmp_path / "out", labelled=True, metric="AP50 against the labels",
                          images=4, max_drop=0.01, min_speedup=1.05, target="cpu", eager_fp32_ms=100.0,
                          baseline=baseline, steps=list(rows), final=rows[2] if final else None,
                          final_from=2 if final else None, seconds=12.0)


SENS = (LayerSensitivity("enc0.conv1", 0.31, True), LayerSensitivity("dec0.conv2", 0.02, False),
        LayerSensitivity("head", 0.12, True))


def fake_run(tmp_path, log):
    """A job yielding a run's events: prune (pending), recover (kept, loss), INT8 (two attempts, kept), engine skipped."""
    def job(state, resume, cancel):
        log.append(resume)
        n = len(LABELS)

        def ev(kind, step=None, **kw):
            return Progress("optimize", step or 0, n, kw.get("message", ""), event=OptimizeEvent(kind, step, n, **kw))

        base = _row(-1, StepStatus.KEPT, 0.80, 3.0)
        rows = [StepReport(index=i, name=s) for i, s in enumerate(LABELS)]

        def snap():  # the report so far, as the core sends it with the baseline and every finished step
            return _report(tmp_path, rows, base, final=False).copy()

        yield ev(EventKind.BASELINE, row=base, run_fraction=0.05, run_eta_s=90, report=snap())
        yield ev(EventKind.STEP_STARTED, 0, phase="pruning")
        rows[0] = _row(0, StepStatus.KEPT, 0.70, 4.0, "judged after the recovery step that follows")
        yield ev(EventKind.STEP_POINT, 0, row=rows[0])
        yield ev(EventKind.STEP_FINISHED, 0, row=rows[0], run_fraction=0.2, report=snap())
        yield ev(EventKind.STEP_STARTED, 1, phase="training")
        for k in range(1, 41):
            cancel.raise_if_cancelled()
            yield ev(EventKind.STEP_PROGRESS, 1, phase="training", fraction=k / 40, train_step=k, loss=1.0 / k,
                     step_eta_s=40 - k, run_eta_s=60)
            time.sleep(0.002)
        rows[1] = _row(1, StepStatus.KEPT, 0.795, 4.1, "AP50 0.7950, 0.0050 below the original's",
                       loss_curve=tuple((k, 1.0 / k) for k in range(1, 41)))
        yield ev(EventKind.STEP_POINT, 1, row=rows[1])
        yield ev(EventKind.STEP_FINISHED, 1, row=rows[1], report=snap())
        yield ev(EventKind.STEP_STARTED, 2, phase="quantizing")
        yield ev(EventKind.STEP_POINT, 2, row=_row(2, StepStatus.RUNNING, 0.77, 9.0))  # over budget: retried
        rows[2] = _row(2, StepStatus.KEPT, 0.792, 8.0, "within the allowed 0.01", sensitivity=SENS)
        yield ev(EventKind.STEP_POINT, 2, row=rows[2])
        yield ev(EventKind.STEP_FINISHED, 2, row=rows[2], report=snap())
        rows[3] = _row(3, StepStatus.SKIPPED, None, None, "no GPU here")
        yield ev(EventKind.STEP_FINISHED, 3, row=rows[3], report=snap())
        report = _report(tmp_path, rows, base)
        yield ev(EventKind.REMEASURED, report=report.copy())
        yield ev(EventKind.FINISHED, report=report, run_fraction=1.0)
        return report
    return job


def test_run_page_shows_steps_chart_loss_and_sensitivity(qtbot, tmp_path, monkeypatch, no_thread_left_running):
    from segstudio.qt import optimize_run
    from segstudio.qt.optimize_run import RunPage

    log = []
    monkeypatch.setattr(optimize_run, "_run", fake_run(tmp_path, log))
    page = RunPage(_state(tmp_path))
    qtbot.addWidget(page)
    page.resize(420, 800)
    page.show()
    assert page.step_statuses() == [StepStatus.WAITING] * 4
    with qtbot.waitSignal(page.finished, timeout=20_000) as done:
        page.start()
        assert page.is_running() and not page.start_button.isEnabled()
    report = done.args[0]
    assert isinstance(report, OptimizeReport) and log == [False]
    qtbot.waitUntil(lambda: not page.is_running())
    assert page.step_statuses() == [StepStatus.KEPT, StepStatus.KEPT, StepStatus.KEPT, StepStatus.SKIPPED]
    rows = page.step_rows()
    assert [r[2] for r in rows] == ["kept", "kept", "kept", "skipped"]
    assert rows[2][3] == "0.7920" and rows[2][4] == "8.00x" and rows[3][6] == "no GPU here"
    assert "Finished" in page.headline.text() and page.run_bar.value() == 1000
    # the chart: the original, the three measured steps, the retried INT8 attempt; kept path and front from core
    data = page.chart_data
    named = [(p.index, p.ap50, p.speedup, p.attempt) for p in data.points]
    assert (-1, 0.80, 3.0, False) in named and (2, 0.77, 9.0, True) in named
    assert [(p.index, p.status) for p in data.points if not p.attempt] == [
        (-1, StepStatus.KEPT), (0, StepStatus.KEPT), (1, StepStatus.KEPT), (2, StepStatus.KEPT)]
    assert list(data.kept_path) == [(r.speedup_vs_baseline, r.ap50) for r in report.kept_path()]
    assert list(data.pareto) == [(r.speedup_vs_baseline, r.ap50) for r in report.pareto()]
    assert data.guardrail == pytest.approx(0.79)
    xs, ys = page.points.getData()
    assert len(xs) == 4 and page.guardrail.value() == pytest.approx(0.79)
    assert len(page.kept_line.getData()[0]) == len(report.kept_path())
    # the loss curve of the recovery, all 40 points
    lx, ly = page.loss_curve.getData()
    assert list(lx) == list(range(1, 41)) and ly[-1] == pytest.approx(1 / 40)
    # the INT8 layers, most sensitive first, which stayed in float
    t = page.sensitivity_table
    assert [(t.item(r, 0).text(), t.item(r, 2).text()) for r in range(t.rowCount())] == [
        ("enc0.conv1", "yes"), ("head", "yes"), ("dec0.conv2", "no")]
    assert "2 kept in float" in page.sensitivity_title.text()
    page.close()


def test_run_page_cancel_keeps_finished_steps_and_resume_reruns_with_resume(
        qtbot, tmp_path, monkeypatch, no_thread_left_running):
    from segstudio.qt import optimize_run
    from segstudio.qt.optimize_run import RunPage

    log = []
    started = []

    def slow(state, resume, cancel):
        log.append(resume)
        n = len(LABELS)
        base = _row(-1, StepStatus.KEPT, 0.8, 3.0)
        yield Progress("optimize", 0, n, event=OptimizeEvent(EventKind.BASELINE, None, n, row=base))
        row = _row(0, StepStatus.KEPT, 0.7, 4.0, "pending")
        yield Progress("optimize", 1, n, event=OptimizeEvent(EventKind.STEP_FINISHED, 0, n, row=row))
        yield Progress("optimize", 1, n, event=OptimizeEvent(EventKind.STEP_STARTED, 1, n))
        k = 0
        while True:
            k += 1
            if cancel.cancelled:
                raise Cancelled("cancelled by the user")
            yield Progress("optimize", 1, n, event=OptimizeEvent(EventKind.STEP_PROGRESS, 1, n, train_step=k,
                                                                 loss=1.0 / k))
            started.append(k)
            time.sleep(0.01)

    monkeypatch.setattr(optimize_run, "_run", slow)
    page = RunPage(_state(tmp_path))
    qtbot.addWidget(page)
    page.start()
    qtbot.waitUntil(lambda: len(page.model.loss.get(1, ())) >= 3, timeout=10_000)
    assert page.step_statuses()[:2] == [StepStatus.KEPT, StepStatus.RUNNING]
    t0 = time.perf_counter()
    with qtbot.waitSignal(page.runner.cancelled, timeout=5_000):
        page.cancel_button.click()
    assert time.perf_counter() - t0 < 5
    qtbot.waitUntil(lambda: page.resume_button.isEnabled())
    assert "Cancelled: 1 of 4" in page.headline.text()
    assert page.step_statuses()[:2] == [StepStatus.KEPT, StepStatus.WAITING]
    assert page.step_rows()[0][2] == "kept"
    monkeypatch.setattr(optimize_run, "_run", fake_run(tmp_path, log))
    with qtbot.waitSignal(page.finished, timeout=20_000):
        page.resume_button.click()
    assert log == [False, True]
    qtbot.waitUntil(lambda: not page.is_running())
    page.close()


def test_result_page_table_rollback_use_export_and_compare(qtbot, tmp_path, no_thread_left_running):
    from segstudio.sample_data import sample_pairs

    from segstudio.core.image.sources import read_image
    from segstudio.core.tasks.compare import disagreement
    from segstudio.qt.optimize_result import ResultPage

    light, full = get_model("nuclei-light"), get_model("nuclei")
    base = _row(-1, StepStatus.KEPT, 0.80, 3.0, artifact=light.card_path, size_mb=1.5, params=120_000,
                gflops_per_tile=2.5)
    rows = [_row(0, StepStatus.ROLLED_BACK, 0.6, 4.0, "AP50 0.6 is 0.2 below"),
            _row(1, StepStatus.KEPT, 0.795, 4.1, "kept", artifact=full.card_path),
            _row(2, StepStatus.KEPT, 0.792, 8.0, "kept", artifact=light.card_path, sensitivity=SENS),
            _row(3, StepStatus.SKIPPED, None, None, "no GPU here")]
    report = _report(tmp_path, rows, base)
    report.final = _row(2, StepStatus.KEPT, 0.792, 8.0, "kept", artifact=light.card_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.html").write_text("<html></html>")
    image = read_image(sample_pairs()[0][0])
    state = _state(tmp_path)
    shown, kept = [], []
    state.current_image = lambda: image
    state.add_labels = lambda data, name, colors: shown.append((data, name, colors))
    state.use_model = kept.append
    page = ResultPage(state)
    qtbot.addWidget(page)
    page.show_report(report)
    cells = page.rows()
    assert [r[0] for r in cells] == ["original", "1. prune:0.5", "2. recover:steps=40", "3. quantize:int8",
                                     "4. engine:fp16"]
    assert cells[0][2:6] == ["0.8000", "", "3.00x", "33.3"] and cells[0][8] == "120,000"
    assert cells[1][1] == "rolled back" and cells[1][10] == "AP50 0.6 is 0.2 below" and cells[4][2] == "-"
    assert "final model, from step 3" in page.chosen_label.text()
    # roll back: only kept rows (and the original)
    page.table.selectRow(1)
    assert not page.rollback_button.isEnabled()
    page.table.selectRow(3)  # the step the final model came from
    assert not page.rollback_button.isEnabled()
    page.table.selectRow(2)
    assert page.rollback_button.isEnabled() and "recover" in page.details.text()
    page.rollback_button.click()
    assert page.chosen is rows[1] and "rolled back to step 2" in page.chosen_label.text()
    with pytest.raises(Exception, match="not kept"):
        page.roll_back_to(0)
    page.roll_back_to(2)
    assert page.chosen_model().name == "nuclei-light"
    with qtbot.waitSignal(page.model_added) as added:
        page.use_button.click()
    assert added.args[0].card_path == light.card_path and kept == [added.args[0]]
    # export the folder and the ONNX file
    with qtbot.waitSignal(page.export_runner.finished, timeout=10_000):
        page.export_folder(tmp_path / "exported")
    assert (tmp_path / "exported" / light.card_path.name).is_file()
    with qtbot.waitSignal(page.export_runner.finished, timeout=10_000):
        page.export_onnx(tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx").stat().st_size == page.onnx_file().stat().st_size
    # compare the original (nuclei-light) with the chosen model: itself, then nuclei
    with qtbot.waitSignal(page.comparison_ready, timeout=60_000) as same:
        page.compare_button.click()
    d = same.args[0].comparison.disagreement
    assert (d.only_reference, d.only_other, d.low_iou) == (0, 0, 0) and d.matched > 0
    assert "Only in the original: 0" in page.compare_status.text()
    assert shown[-1][1] == "disagreement: nuclei-light vs nuclei-light" and not shown[-1][0].any()
    assert set(shown[-1][2]) == {1, 2, 3}
    qtbot.waitUntil(lambda: page.compare_button.isEnabled())
    page.roll_back_to(1)
    with qtbot.waitSignal(page.comparison_ready, timeout=60_000) as other:
        page.compare()
    c = other.args[0].comparison
    expect = disagreement(c.labels_a, c.labels_b)
    assert c.disagreement.only_reference == expect.only_reference
    np.testing.assert_array_equal(c.disagreement.overlay, expect.overlay)
    assert shown[-1][1] == "disagreement: nuclei-light vs nuclei" and shown[-1][0] is c.disagreement.overlay
    assert f"only in the optimized model: {expect.only_other}" in page.compare_status.text()
    qtbot.waitUntil(lambda: page.compare_button.isEnabled())
    page.close()
