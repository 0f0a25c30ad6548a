"""Run a core job generator on a background ``QThread``.

A core *job* is a generator that yields :class:`~segstudio.core.jobs.Progress`
events and returns its result; it is stopped through a
:class:`~segstudio.core.jobs.CancelToken`.  :class:`JobRunner` runs one job at
a time on a fresh ``QThread`` and turns what happens into Qt signals that are
delivered on the GUI thread:

* ``progress(Progress)`` while the job runs (throttled, so a job that yields
  thousands of events cannot flood the event loop; events that carry a
  ``file`` in their ``info``, a batch's per-file status, and typed events
  (``Progress.event``) not marked ``frequent`` always go through);
* exactly one of ``finished(result)``, ``failed(exception)`` or
  ``cancelled()`` at the end, emitted only *after* the thread has been joined,
  so when a slot sees the outcome no thread of the job is left running.

The job is created by a factory called *inside* the worker thread
(``factory(cancel_token) -> Job``): slow set-up such as loading a model never
runs on the GUI thread.

Errors follow the rule of :mod:`segstudio.core.errors`: a
:class:`~segstudio.core.errors.SegStudioError` is expected and its message is
shown verbatim; anything else is a bug, reported as "unexpected error" with
its traceback (see :func:`describe_error`).
"""

from __future__ import annotations

import functools
import logging
import time
import traceback
from dataclasses import dataclass, replace
from typing import Any, Callable

from qtpy.QtCore import QCoreApplication, QObject, QThread, Signal

from ..core.errors import Cancelled, SegStudioError, write_crash_log
from ..core.jobs import CancelToken, Job, Progress, Stage

log = logging.getLogger(__name__)

JobFactory = Callable[[CancelToken], Job]

# Seconds between two progress signals of the same stage (the last event of a
# stage, ``done == total``, always goes through).
PROGRESS_INTERVAL_S = 0.05

# Threads that are running, held here so that a QThread object is never
# destroyed while its thread runs, even if the widget that started it is gone.
_LIVE: set["_JobThread"] = set()


@dataclass(frozen=True)
class ErrorReport:
    """How an exception is shown to the user.

    Attributes
    ----------
    message : str
        One line for the panel: the :class:`SegStudioError` message verbatim,
        or ``"Unexpected error: <type>: <text>"`` for anything else.
    hint : str
        What the user can do about it (empty when there is no hint).
    details : str
        The formatted traceback of an unexpected error (empty for expected
        errors, whose message says it all).
    expected : bool
        True for :class:`SegStudioError` and its kinds.
    log_path : str
        The crash log holding ``details`` (see :func:`with_crash_log`), or ``""``.
    """

    message: str
    hint: str = ""
    details: str = ""
    expected: bool = True
    log_path: str = ""


def describe_error(exc: BaseException) -> ErrorReport:
    """The :class:`ErrorReport` for ``exc`` (see the module docstring)."""
    if isinstance(exc, SegStudioError):
        return ErrorReport(message=exc.message, hint=exc.hint or "", expected=True)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    summary = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return ErrorReport(
        message=f"Unexpected error: {summary}",
        hint="this is a bug in segstudio; please report it with the details below",
        details=details,
        expected=False,
    )


def with_crash_log(report: ErrorReport) -> ErrorReport:
    """Write the details of an unexpected error to a crash log; the report then names it.

    Expected errors, and a log that cannot be written, leave the report as it is.
    """
    if report.expected or not report.details:
        return report
    try:
        path = write_crash_log(report.details)
    except OSError:
        log.warning("could not write a crash log", exc_info=True)
        return report
    return replace(report, hint=f"{report.hint}; details in {path}", log_path=str(path))


class _JobThread(QThread):
    """Drains one job in ``run()``; the outcome is read after ``wait()``."""

    progress = Signal(object)

    def __init__(self, factory: JobFactory, token: CancelToken):
        super().__init__()
        self._factory = factory
        self.token = token
        self.outcome: tuple[str, Any] = ("cancelled", None)

    def run(self) -> None:  # runs on the worker thread
        last_emit: dict[str, float] = {}
        try:
            job = self._factory(self.token)
            while True:
                try:
                    event = next(job)
                except StopIteration as stop:
                    result = stop.value
                    break
                if isinstance(event, Progress):
                    now = time.monotonic()
                    # the last event of a stage, every notice, every per-file event of a batch and every
                    # typed event (an optimization step's row) go through; typed events that say they come
                    # in floods (``frequent``: a training loss per step) are throttled like the rest
                    typed = getattr(event, "event", None)
                    final = ((bool(event.total) and event.done >= event.total) or event.stage is Stage.NOTICE
                             or "file" in event.info
                             or (typed is not None and not getattr(typed, "frequent", False)))
                    if final or now - last_emit.get(event.stage, 0.0) >= PROGRESS_INTERVAL_S:
                        last_emit[event.stage] = now
                        self.progress.emit(event)
        except Cancelled:
            self.outcome = ("cancelled", None)
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the GUI, never kill the thread
            if not isinstance(exc, SegStudioError):
                log.error("unexpected error in a background job", exc_info=exc)
            self.outcome = ("failed", exc)
        else:
            self.outcome = ("cancelled", None) if self.token.cancelled else ("finished", result)
        finally:
            self._factory = None  # drop references to the job's inputs


class JobRunner(QObject):
    """Runs one job at a time on a background ``QThread``.

    Signals (all delivered on the thread that owns the runner, normally the
    GUI thread):

    ``started()``
        A job was started.
    ``progress(Progress)``
        An event from the running job.
    ``finished(object)``
        The job returned this result.
    ``failed(BaseException)``
        The job raised; pass the exception to :func:`describe_error`.
    ``cancelled()``
        The job stopped at a cancellation point after :meth:`cancel`.
    ``stopped()``
        Emitted after any of the three outcomes (to reset a UI).
    """

    started = Signal()
    progress = Signal(object)
    finished = Signal(object)
    failed = Signal(object)
    cancelled = Signal()
    stopped = Signal()

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self._thread: _JobThread | None = None
        # Shared with the ``destroyed`` handler, which must not touch ``self``:
        # a runner deleted while its job runs (its widget was deleted) cancels the job.
        self._current: list[_JobThread | None] = [None]
        self.destroyed.connect(functools.partial(_cancel_orphan, self._current))
        app = QCoreApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.shutdown)

    def is_running(self) -> bool:
        """True from :meth:`start` until the outcome signal."""
        return self._thread is not None

    def start(self, factory: JobFactory) -> None:
        """Run ``factory(token)`` (called on the worker thread) and drain the job it returns.

        Raises ``RuntimeError`` if a job is already running.
        """
        if self._thread is not None:
            raise RuntimeError("a job is already running")
        thread = _JobThread(factory, CancelToken())
        thread.progress.connect(self.progress)
        thread.finished.connect(self._on_thread_finished)
        self._thread = self._current[0] = thread
        _prune_live()
        _LIVE.add(thread)
        thread.start()
        self.started.emit()

    def cancel(self) -> None:
        """Ask the running job to stop at its next cancellation point (no-op when idle).

        The outcome is then ``cancelled``, even if the job happened to finish first.
        """
        if self._thread is not None:
            self._thread.token.cancel()

    def wait(self, timeout_ms: int | None = None) -> bool:
        """Block until the running job's thread ends; True if no thread is left running.

        The outcome signal still comes later, from the event loop.
        """
        thread = self._thread
        if thread is None:
            return True
        return thread.wait() if timeout_ms is None else thread.wait(timeout_ms)

    def shutdown(self, timeout_ms: int | None = None) -> bool:
        """Cancel the running job and join its thread (for closing a window or quitting).

        Returns True if no thread is left running.
        """
        self.cancel()
        return self.wait(timeout_ms)

    def _on_thread_finished(self) -> None:
        thread = self._thread
        if thread is None or thread is not self.sender():
            return
        thread.quit()
        thread.wait()
        self._thread = self._current[0] = None
        _LIVE.discard(thread)
        kind, value = thread.outcome
        thread.outcome = ("cancelled", None)
        thread.deleteLater()
        if kind == "finished":
            self.finished.emit(value)
        elif kind == "failed":
            self.failed.emit(value)
        else:
            self.cancelled.emit()
        self.stopped.emit()


def _cancel_orphan(current: list, *_) -> None:
    """Cancel the job of a runner that is being destroyed (its thread stays in ``_LIVE``)."""
    thread = current[0]
    if thread is not None:
        thread.token.cancel()


def _prune_live() -> None:
    """Forget finished threads whose runner was deleted before it could join them."""
    for thread in list(_LIVE):
        if thread.isFinished():
            _LIVE.discard(thread)


def shutdown_all(timeout_ms: int | None = None) -> bool:
    """Cancel every running job of every runner and join the threads.

    Returns True if no job thread is left running.
    """
    for thread in list(_LIVE):
        thread.token.cancel()
    ok = True
    for thread in list(_LIVE):
        done = thread.wait() if timeout_ms is None else thread.wait(timeout_ms)
        ok &= done
    _prune_live()
    return ok


def running_job_threads() -> int:
    """How many job threads are running now (for diagnostics and tests)."""
    return sum(1 for t in _LIVE if t.isRunning())
