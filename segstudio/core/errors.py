"""Error types.

``SegStudioError`` and its kinds are *expected* failures: bad input, a missing
backend, an artifact that does not fit.  Their message is shown to the user
verbatim (one line), with an optional ``hint`` saying what to do.  Anything
else that escapes the core is a bug and is reported as "unexpected error".
"""

from __future__ import annotations

from pathlib import Path


class SegStudioError(Exception):
    """A user-facing, actionable error.

    Parameters
    ----------
    message : str
        One line saying what is wrong.
    hint : str, optional
        One line saying what the user can do about it.
    """

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class InputError(SegStudioError):
    """The user's input (file, array, option) cannot be used."""


class BackendUnavailableError(SegStudioError):
    """The requested inference backend is not installed or cannot run here."""


class IncompatibleArtifactError(SegStudioError):
    """A model or engine file does not fit this model, machine or version."""


class DeviceOutOfMemoryError(SegStudioError):
    """The accelerator ran out of memory."""


class StepFailedError(SegStudioError):
    """An optimization step failed or broke its accuracy budget."""


class InternalError(Exception):
    """A bug: an invariant of segstudio itself does not hold."""


class Cancelled(Exception):
    """The user cancelled a job; raised at the next cancellation point."""


def log_dir() -> Path:
    """Where crash logs go: ``$SEGSTUDIO_HOME/logs``, else ``~/.segstudio/logs``."""
    import os

    return Path(os.environ.get("SEGSTUDIO_HOME") or Path.home() / ".segstudio") / "logs"


def write_crash_log(details: str) -> Path:
    """Write the traceback of an unexpected error to a new file in :func:`log_dir`.

    Raises ``OSError`` when the log cannot be written.
    """
    import os
    import time

    folder = log_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path.write_text(details)
    return path
