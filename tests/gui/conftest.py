"""Fixtures for the GUI tests (Qt, napari, a display: pytest-xvfb starts Xvfb).

Every test module here is marked ``gui`` (``pytestmark``); an autouse fixture
fails a test that leaves a thread running: a ``QThread`` (every ``QThread.start`` is tracked),
a ``QThreadPool`` task, or a Python thread started during the test.
"""

from __future__ import annotations

import threading
import traceback
from weakref import WeakKeyDictionary

import pytest

pytest.importorskip("napari")
pytest.importorskip("qtpy")

GRACE_MS = 2000  # a thread that is exiting gets this long to finish


@pytest.fixture(scope="session", autouse=True)
def healthy_qt_binding():
    """Stop at once, with the reason, on a Qt binding that would abort the interpreter at exit."""
    from segstudio.core.errors import SegStudioError
    from segstudio.qt.binding import check_qt_binding

    try:
        check_qt_binding()
    except SegStudioError as exc:
        pytest.exit(str(exc), returncode=3)


class ThreadTracker:
    """Records where each ``QThread`` was started, to find those left running."""

    def __init__(self) -> None:
        self.started: WeakKeyDictionary = WeakKeyDictionary()
        self.python_before = set(threading.enumerate())

    def record(self, thread) -> None:
        self.started[thread] = "".join(traceback.format_stack(limit=8)[:-2])

    def running(self) -> list[str]:
        """A description of every thread started during the test that still runs."""
        from qtpy.QtCore import QThreadPool

        out = []
        for thread, where in list(self.started.items()):
            try:
                alive = thread.isRunning()
            except RuntimeError:  # the C++ object is gone, so is the thread
                continue
            if alive:
                out.append(f"QThread {thread!r} started at:\n{where}")
        active = QThreadPool.globalInstance().activeThreadCount()
        if active:
            out.append(f"{active} QThreadPool task(s)")
        for thread in set(threading.enumerate()) - self.python_before:
            # the GPU device thread lives as long as the process, by design (core/backends/device.py)
            if thread.name.startswith("segstudio-device"):
                continue
            # tqdm's monitor is a daemon that lives as long as the process (the ONNX exporter's progress bars)
            if thread.name == "tqdm_monitor":
                continue
            if thread.is_alive() and not isinstance(thread, threading._DummyThread):
                out.append(f"Python thread {thread.name!r}")
        return out


@pytest.fixture(autouse=True)
def segstudio_home(tmp_path, monkeypatch):
    """Crash logs and other per-user files go to a temporary folder."""
    monkeypatch.setenv("SEGSTUDIO_HOME", str(tmp_path / "segstudio_home"))
    return tmp_path / "segstudio_home"


@pytest.fixture(autouse=True)
def no_thread_left_running(qtbot, monkeypatch):
    """Fail the test if a thread it started is still running at its end."""
    from qtpy.QtCore import QThread

    tracker = ThreadTracker()
    original_start = QThread.start

    def tracked_start(self, *args, **kwargs):
        tracker.record(self)
        return original_start(self, *args, **kwargs)

    monkeypatch.setattr(QThread, "start", tracked_start)
    yield tracker
    monkeypatch.setattr(QThread, "start", original_start)
    try:
        qtbot.waitUntil(lambda: not tracker.running(), timeout=GRACE_MS)
    except qtbot.TimeoutError:
        leaked = tracker.running()
        from segstudio.qt.worker import shutdown_all

        shutdown_all()  # do not let the leak crash the tests that follow
        pytest.fail("threads left running after the test:\n" + "\n".join(leaked), pytrace=False)
