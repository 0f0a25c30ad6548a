"""A check of the Qt binding before the app starts.

PySide6 6.12.0 on Python 3.11 (where ``None`` is not yet immortal) drops one
reference to ``None`` on every call of a C++ method that returns nothing.
After a few thousand such calls the interpreter aborts with "Fatal Python
error: none_dealloc: deallocating None", in the middle of a session or at
exit.  :func:`check_qt_binding` measures this directly instead of trusting a
version number, so the app can refuse to start with a clear message.
"""

from __future__ import annotations

import sys

from ..core.errors import SegStudioError

_CALLS = 200


def none_refcount_drift(calls: int = _CALLS) -> int:
    """How many references to ``None`` ``calls`` void Qt method calls lose (0 when healthy)."""
    from qtpy.QtCore import QObject

    probe = QObject()
    before = sys.getrefcount(None)
    for _ in range(calls):
        probe.setObjectName("segstudio-probe")
    return before - sys.getrefcount(None)


def check_qt_binding() -> None:
    """Raise :class:`SegStudioError` if the Qt binding corrupts ``None``'s reference count."""
    if sys.version_info >= (3, 12):  # None is immortal: the bug cannot crash the interpreter
        return
    drift = none_refcount_drift()
    if drift >= _CALLS // 2:
        import qtpy

        version = getattr(qtpy, "PYSIDE_VERSION", None) or getattr(qtpy, "PYQT_VERSION", None) or ""
        raise SegStudioError(
            f"the Qt binding {qtpy.API_NAME} {version} loses a reference to None on every call "
            "and would crash segstudio",
            hint='install another version, e.g. pip install "PySide6-Essentials<6.12"',
        )
