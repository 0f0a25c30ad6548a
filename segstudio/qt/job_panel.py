"""``JobPanel``: what every panel that runs one background job at a time shares.

A runner (:class:`~segstudio.qt.worker.JobRunner`) whose signals go to the
panel's slots, the Run and Cancel buttons, a progress bar, a status line,
notices (what the user should know about the run, in amber), the error
view, and the busy / idle switching of the panel's inputs.  A subclass
builds its form, lays the parts out (:meth:`JobPanel.job_column` puts them
in the usual order), and implements :meth:`run`, ``_on_progress`` and
``_on_finished``; it lists the inputs to lock while a job runs in
:meth:`_inputs`.
"""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QHBoxLayout, QLabel, QLayout, QPlainTextEdit, QProgressBar, QPushButton, QToolButton, QVBoxLayout, QWidget,
)

from .worker import ErrorReport, JobRunner, describe_error, with_crash_log


class ErrorView(QWidget):
    """One error: its message and hint, and for bugs a "Details" toggle with the traceback."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.message = QLabel()
        self.message.setObjectName("segstudioErrorMessage")
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.message.setStyleSheet("color: #e8543f;")
        self.details_button = QToolButton()
        self.details_button.setText("Details")
        self.details_button.setCheckable(True)
        self.details = QPlainTextEdit()
        self.details.setReadOnly(True)
        self.details.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        self.details.setMinimumHeight(120)
        self.details.setVisible(False)
        self.details_button.toggled.connect(self.details.setVisible)
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.message, 1)
        row.addWidget(self.details_button, 0, Qt.AlignmentFlag.AlignTop)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.details)
        self.report: ErrorReport | None = None
        self.clear()

    def show_report(self, report: ErrorReport) -> None:
        """Show ``report``; the details toggle only appears when there is a traceback."""
        self.report = report
        text = report.message + (f"\nHint: {report.hint}" if report.hint else "")
        self.message.setText(text)
        self.details.setPlainText(report.details)
        self.details_button.setChecked(False)
        self.details_button.setVisible(bool(report.details))
        self.setVisible(True)

    def clear(self) -> None:
        """Hide the view and forget the error."""
        self.report = None
        self.message.clear()
        self.details.clear()
        self.details_button.setChecked(False)
        self.setVisible(False)

    def text(self) -> str:
        """The message (and hint) shown, or ``""``."""
        return self.message.text() if self.report is not None else ""


class JobPanel(QWidget):
    """Runner, Run / Cancel, progress, status, notices and errors of a panel that runs one job at a time.

    A subclass defines ``run()`` (the Run button's slot: start the job with
    ``self.runner.start``), ``_on_progress(event)`` and
    ``_on_finished(result)``; the runner's signals and the buttons are
    connected to them here.  Qt's metaclass rules out ``abc``, so a
    subclass without them fails at construction with the missing name.

    Parameters
    ----------
    run_text : str
        The Run button's text.
    parent : QWidget, optional
    """

    CANCELLING = "Cancelling..."  # the status while a cancelled job winds down
    CANCELLED = "Cancelled"

    def __init__(self, run_text: str = "Run", parent: QWidget | None = None):
        super().__init__(parent)
        self.runner = JobRunner(self)
        self.runner.progress.connect(self._on_progress)
        self.runner.finished.connect(self._on_finished)
        self.runner.failed.connect(self._on_failed)
        self.runner.cancelled.connect(self._on_cancelled)
        self.runner.stopped.connect(self._set_idle)
        self.run_button = QPushButton(run_text)
        self.cancel_button = QPushButton("Cancel")
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setTextVisible(False)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.notice = QLabel("")
        self.notice.setWordWrap(True)
        self.notice.setVisible(False)
        self.error_view = ErrorView()
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)

    def job_column(self, top: QLayout, *extra_buttons: QWidget) -> QVBoxLayout:
        """The panel's layout: ``top`` (the form), the buttons, progress, status, notices and errors.

        Returns the layout, for the subclass to add its results below.
        """
        buttons = QHBoxLayout()
        for b in (self.run_button, self.cancel_button, *extra_buttons):
            buttons.addWidget(b)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addLayout(buttons)
        for w in (self.progress_bar, self.status, self.notice, self.error_view):
            layout.addWidget(w)
        return layout

    # ------------------------------------------------------------------ public

    def is_running(self) -> bool:
        """True while a job runs."""
        return self.runner.is_running()

    def cancel(self) -> None:
        """Ask the running job to stop."""
        if self.runner.is_running():
            self.runner.cancel()
            self.cancel_button.setEnabled(False)
            self.status.setText(self.CANCELLING)

    def shutdown(self, timeout_ms: int | None = None) -> bool:
        """Cancel a running job and join its thread; True if no thread is left running."""
        return self.runner.shutdown(timeout_ms)

    def error_text(self) -> str:
        """The error shown in the panel, or ``""``."""
        return self.error_view.text()

    # ------------------------------------------------------------------ for subclasses (GUI thread)

    def _starting(self, status: str) -> None:
        """A new run: errors and notices of the last one cleared, the bar at 0, the inputs locked."""
        self.error_view.clear()
        self.notice.clear()
        self.notice.setVisible(False)
        self.progress_bar.setValue(0)
        self.status.setText(status)
        self._set_busy()

    def _add_notice(self, text: str) -> None:
        """Add ``text`` to the notices (once: a notice already shown is not repeated)."""
        old = self.notice.text()
        if text in old.splitlines():
            return
        self.notice.setText(f"{old}\n{text}" if old else text)
        self.notice.setVisible(True)

    def _show_error(self, exc: BaseException) -> None:
        self.error_view.show_report(with_crash_log(describe_error(exc)))

    def _on_failed(self, exc: BaseException) -> None:
        self.status.setText("Failed")
        self._show_error(exc)

    def _on_cancelled(self) -> None:
        self.status.setText(self.CANCELLED)

    def _inputs(self) -> list[QWidget]:
        """The widgets locked while a job runs (the Run button is locked too)."""
        return []

    def _set_busy(self) -> None:
        for w in (self.run_button, *self._inputs()):
            w.setEnabled(False)
        self.cancel_button.setEnabled(True)

    def _set_idle(self) -> None:
        for w in (self.run_button, *self._inputs()):
            w.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt override
        self.shutdown()
        super().closeEvent(event)
