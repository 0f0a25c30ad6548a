"""Error types.

``SegStudioError`` and its kinds are *expected* failures: bad input, a missing
backend, an artifact that does not fit.  Their message is shown to the user
verbatim (one line), with an optional ``hint`` saying what to do.  Anything
else that escapes the core is a bug and is reported as "unexpected error".
"""

from __future__ import annotations

import errno
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


class OutputError(InputError):
    """A file or folder segstudio was asked to write cannot be written (not a folder, not writable, disk full).

    ``fatal`` errors (a full disk, a read-only file system) stop a batch:
    every later file would fail the same way.
    """

    FATAL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})

    def __init__(self, message: str, *, hint: str | None = None, path: str | Path | None = None,
                 errno_: int | None = None):
        super().__init__(message, hint=hint)
        self.path = path
        self.errno = errno_

    @property
    def fatal(self) -> bool:
        return self.errno in self.FATAL

    @classmethod
    def from_oserror(cls, path: str | Path, e: OSError, what: str = "write") -> "OutputError":
        """The user-facing error for ``e`` raised while writing ``path``."""
        reasons = {
            errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
            errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied", errno.EFBIG: "the file is too large for this file system "
            "(or for this process's file-size limit)", errno.ENOTDIR: "a part of the path is a file, not a folder",
            errno.EISDIR: "it is a folder", errno.EEXIST: "a file of that name is in the way",
            errno.ENAMETOOLONG: "the name is too long",
        }
        reason = reasons.get(e.errno, e.strerror or type(e).__name__)
        where = e.filename if isinstance(e.filename, str) and e.filename else str(path)
        return cls(f"cannot {what} {where}: {reason}", path=path, errno_=e.errno,
                   hint="choose another output location" if e.errno not in cls.FATAL else "free some space or "
                   "choose another output location")


class BackendUnavailableError(SegStudioError):
    """The requested inference backend is not installed or cannot run here."""


class IncompatibleArtifactError(SegStudioError):
    """A model or engine file does not fit this model, machine or version."""


class DeviceOutOfMemoryError(SegStudioError):
    """The accelerator ran out of memory."""


class StepFailedError(SegStudioError):
    """An optimization step failed or broke its accuracy budget."""


def naming(e: SegStudioError, path) -> SegStudioError:
    """``e`` with the file ``path`` in front of its message, unless the message names it already.

    Checks deep in the core know only an image's stem (``img: image is 4x4
    pixels``); the user gets the path (``data/img.tif: image is 4x4 pixels``).
    """
    name = str(path)
    base = Path(name)
    if name in e.message or base.name in e.message.split(":", 1)[0]:  # "refused x.zip: ..." names it
        return e
    message = e.message
    for stem in (base.stem, Path(base.stem).stem, base.name):
        if message.startswith(stem + ": "):
            message = message[len(stem) + 2:]
            break
    out = type(e).__new__(type(e))
    out.__dict__.update(e.__dict__)
    out.message = f"{name}: {message}"
    out.args = (out.message,)
    return out


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
