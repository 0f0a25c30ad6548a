"""JobRunner and SegmentPanel without napari: outcomes, errors, threads."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from qtpy.QtCore import QThread

from segstudio.core.errors import InputError
from segstudio.core.image.io import as_image
from segstudio.core.jobs import Progress
from segstudio.core.models.catalog import get_model
from segstudio.qt import segment_panel
from segstudio.qt.segment_panel import SegmentPanel
from segstudio.qt.worker import JobRunner, describe_error, running_job_threads

pytestmark = pytest.mark.gui

TIMEOUT_MS = 20_000


def counting_job(n, cancel, *, fail=None, delay=0.0):
    """A job yielding ``n`` progress events; returns ``n`` or raises ``fail``."""
    for i in range(n):
        cancel.raise_if_cancelled()
        if delay:
            time.sleep(delay)
        yield Progress("count", i + 1, n)
    if fail is not None:
        raise fail
    return n


def test_runner_delivers_result_after_joining_the_thread(qtbot):
    runner = JobRunner()
    events, threads = [], []

    def factory(cancel):
        threads.append(threading.get_ident())
        return counting_job(5, cancel)

    runner.progress.connect(events.append)
    with qtbot.waitSignal(runner.finished, timeout=TIMEOUT_MS) as blocker:
        runner.start(factory)
    assert blocker.args == [5]
    assert threads and threads[0] != threading.get_ident()  # the job ran off the GUI thread
    assert events[-1] == Progress("count", 5, 5)  # the last event of a stage is never dropped
    assert not runner.is_running() and running_job_threads() == 0


def test_runner_reports_expected_and_unexpected_errors(qtbot):
    runner = JobRunner()
    with qtbot.waitSignal(runner.failed, timeout=TIMEOUT_MS) as blocker:
        runner.start(lambda cancel: counting_job(2, cancel, fail=InputError("bad input", hint="fix it")))
    report = describe_error(blocker.args[0])
    assert report.expected and report.message == "bad input" and report.hint == "fix it"
    assert report.details == ""

    with qtbot.waitSignal(runner.failed, timeout=TIMEOUT_MS) as blocker:
        runner.start(lambda cancel: counting_job(2, cancel, fail=ZeroDivisionError("boom")))
    report = describe_error(blocker.args[0])
    assert not report.expected
    assert report.message == "Unexpected error: ZeroDivisionError: boom"
    assert "Traceback" in report.details and "counting_job" in report.details


def test_runner_cancel_and_shutdown(qtbot):
    runner = JobRunner()
    with qtbot.waitSignal(runner.progress, timeout=TIMEOUT_MS):
        runner.start(lambda cancel: counting_job(10_000, cancel, delay=0.01))
    with pytest.raises(RuntimeError):
        runner.start(lambda cancel: counting_job(1, cancel))
    with qtbot.waitSignal(runner.cancelled, timeout=TIMEOUT_MS):
        runner.cancel()
    assert not runner.is_running()

    with qtbot.waitSignal(runner.progress, timeout=TIMEOUT_MS):
        runner.start(lambda cancel: counting_job(10_000, cancel, delay=0.01))
    assert runner.shutdown(5000)  # what closing a window does: cancel and join
    assert running_job_threads() == 0
    qtbot.waitSignal(runner.cancelled, timeout=TIMEOUT_MS).wait()


class FakeBackend:
    """Stands in for a backend that the patched ``segment_job`` below never calls."""

    def describe(self):
        return "fake backend"


class FakeBackends:
    """A BackendCache stand-in that loads no model."""

    def get(self, model_name, backend_name):
        return get_model(model_name), FakeBackend()


def fail_with(exc):
    def fake_segment_job(*args, **kwargs):
        yield Progress("network", 0, 1)
        raise exc

    return fake_segment_job


@pytest.fixture
def panel(qtbot):
    image = as_image(np.zeros((32, 32), np.uint8), "YX", name="blank")
    widget = SegmentPanel(lambda: image, backends=FakeBackends())
    qtbot.addWidget(widget)
    return widget


def test_panel_shows_expected_error_verbatim(panel, qtbot, monkeypatch):
    monkeypatch.setattr(segment_panel, "segment_job", fail_with(InputError("channel 3 does not exist")))
    with qtbot.waitSignal(panel.runner.stopped, timeout=TIMEOUT_MS):
        panel.run_button.click()
    assert panel.error_text() == "channel 3 does not exist"
    assert not panel.error_view.details_button.isVisibleTo(panel)
    assert panel.run_button.isEnabled() and not panel.cancel_button.isEnabled()


def test_panel_shows_unexpected_error_with_details(panel, qtbot, monkeypatch, segstudio_home):
    monkeypatch.setattr(segment_panel, "segment_job", fail_with(KeyError("spec")))
    with qtbot.waitSignal(panel.runner.stopped, timeout=TIMEOUT_MS):
        panel.run_button.click()
    assert panel.error_text().startswith("Unexpected error: KeyError")
    view = panel.error_view
    assert view.details_button.isVisibleTo(panel)
    view.details_button.click()
    assert view.details.isVisibleTo(panel) and "Traceback" in view.details.toPlainText()
    logs = list((segstudio_home / "logs").glob("crash-*.log"))
    assert len(logs) == 1 and str(logs[0]) in panel.error_text()
    assert logs[0].read_text() == view.details.toPlainText()
    panel.error_view.clear()
    assert panel.error_text() == ""


def test_panel_lists_models_backends_and_channels(panel):
    assert panel.model_name == "nuclei"
    backends = [panel.backend_combo.itemText(i) for i in range(panel.backend_combo.count())]
    from segstudio.core.backends import runnable_variants
    from segstudio.core.models.catalog import get_model

    assert backends[0] == "auto" and backends[1:] == runnable_variants(get_model("nuclei"))
    assert all("@" in b and ":" in b for b in backends[1:])
    panel.set_channels(["red", "green", "blue"], current=2)
    assert panel.channel == 2 and panel.channel_combo.isEnabled()
    panel.set_channels([])
    assert panel.channel is None and not panel.channel_combo.isEnabled()


def test_panel_opens_a_model_card_and_refuses_a_bad_one(panel, tmp_path):
    import shutil

    from segstudio.core.models.catalog import BUILTIN_DIR

    folder = tmp_path / "my-model"
    folder.mkdir()
    for f in BUILTIN_DIR.glob("nuclei.*"):
        shutil.copy(f, folder / f.name)
    model = panel.add_model(str(folder / "nuclei.json"))
    assert model is not None and panel.model_name == str(folder / "nuclei.json")
    assert panel.model_combo.currentText() == "nuclei (my-model)" and panel.backend_combo.count() > 1
    count = panel.model_combo.count()
    assert panel.add_model(str(folder)) is not None and panel.model_combo.count() == count  # the same card once
    (tmp_path / "bad.json").write_text("{}")
    assert panel.add_model(str(tmp_path / "bad.json")) is None
    assert "model card" in panel.error_text() and panel.model_name == str(folder / "nuclei.json")


def test_thread_fixture_sees_a_running_qthread(no_thread_left_running):
    stop = threading.Event()

    class Sleeper(QThread):
        def run(self):
            while not stop.wait(0.01):
                pass

    thread = Sleeper()
    thread.start()
    try:
        assert any(line.startswith("QThread") for line in no_thread_left_running.running())
    finally:
        stop.set()
        thread.wait()
    assert no_thread_left_running.running() == []


def test_notices_stay_visible_for_the_run(panel):
    from segstudio.core.jobs import Progress

    panel._on_progress(Progress("notice", 1, 4, "GPU out of memory: continuing with batches of 2 tile(s)"))
    panel._on_progress(Progress("network", 2, 4))
    panel._on_progress(Progress("notice", 2, 4, "GPU out of memory even for small tiles: continuing on the CPU"))
    assert panel.notice.isVisibleTo(panel)
    assert panel.notice.text().splitlines() == [
        "GPU out of memory: continuing with batches of 2 tile(s)",
        "GPU out of memory even for small tiles: continuing on the CPU",
    ]
    assert "tiles 2/4" in panel.status.text()
