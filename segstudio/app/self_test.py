"""``segstudio self-test --gui``: the window, checked the way a user would use it.

Opens the standalone window on the first bundled sample, segments it through
the Segment panel (its Run button, the default model and backend), checks the
labels layer against the sample's ground truth, saves a screenshot of the
whole window and closes.  It measures what an installer is judged by: the
seconds from the process's start to the window on screen (cold start) and of
the first segmentation.  ``packaging/smoke_test.sh`` runs it inside every
package it tests; on a lab PC it tells whether the app works there.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
from qtpy.QtCore import QEvent, QEventLoop, QObject, QTimer

from ..core.errors import SegStudioError

TIMEOUT_S = 600.0


@dataclass
class GuiSelfTest:
    window_shown_s: float  # process start -> the window exposed on screen (cold start)
    sample_shown_s: float  # process start -> the sample image in the window
    first_segmentation_s: float  # Run clicked -> the labels layer in the viewer
    objects: int
    ap50: float
    status: str
    screenshot: str | None

    def as_dict(self) -> dict:
        return asdict(self)


def _process_age_s() -> float:
    return time.time() - psutil.Process().create_time()


class _FirstExposure(QObject):
    """Notes the process's age when a window of the application is first exposed (drawn on screen)."""

    def __init__(self, app):
        super().__init__()
        self.age_s: float | None = None
        app.installEventFilter(self)

    def eventFilter(self, watched, event) -> bool:  # noqa: N802 - Qt override
        if self.age_s is None and event.type() == QEvent.Type.Expose:
            self.age_s = _process_age_s()
        return False


def spin(ms: int) -> None:
    """Run the Qt event loop for ``ms`` milliseconds (what a script driving the window waits with)."""
    loop = QEventLoop()
    QTimer.singleShot(ms, loop.quit)
    loop.exec()


def wait_until(condition, what: str, timeout_s: float = TIMEOUT_S, poll_ms: int = 20) -> None:
    """Run the event loop until ``condition()`` is true; :class:`SegStudioError` after ``timeout_s``."""
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout_s:
            raise SegStudioError(f"waited {timeout_s:.0f} s for {what}")
        spin(poll_ms)


def run_gui_self_test(screenshot: Path | None = None, *, min_ap50: float = 0.65) -> GuiSelfTest:
    """Open the window on the sample, segment it from the Segment panel, check and close.

    Raises
    ------
    SegStudioError
        When the window, the segmentation or its accuracy fails.
    """
    from napari.layers import Labels

    from ..core.tasks.evaluate import score
    from ..qt.binding import check_qt_binding
    from ..qt.worker import shutdown_all
    from .main_window import application, build_window, segment_widget

    check_qt_binding()
    app = application()
    first_shown = _FirstExposure(app)
    viewer = build_window(show_sample=True)
    sample_s = _process_age_s()
    try:
        window = viewer.window._qt_window
        wait_until(lambda: first_shown.age_s is not None, "the window to be shown")
        app.removeEventFilter(first_shown)
        truth = next((layer for layer in viewer.layers if layer.name.endswith(" ground truth")), None)
        if truth is None:
            raise SegStudioError("self-test: the bundled sample did not open (no ground truth layer)")
        image = next(layer for layer in viewer.layers if not isinstance(layer, Labels))
        widget = segment_widget(viewer)
        widget.set_current_layer(image)
        panel = widget.panel
        t0 = time.perf_counter()
        panel.run_button.click()
        # the labels layer is added in the same GUI-thread call that ends the run
        wait_until(lambda: not panel.is_running(), "the segmentation")
        seconds = time.perf_counter() - t0
        name = f"{image.name} labels"
        if name not in viewer.layers:
            raise SegStudioError("self-test: the Segment panel did not segment the sample: "
                                 f"{panel.error_text() or panel.status.text()}")
        labels = viewer.layers[name]
        scores = score(truth.data, labels.data)
        spin(300)  # the labels layer drawn
        path = None
        if screenshot is not None:
            screenshot = Path(screenshot)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            if not window.grab().save(str(screenshot)):
                raise SegStudioError(f"self-test: could not save the screenshot to {screenshot}")
            path = str(screenshot)
        result = GuiSelfTest(round(first_shown.age_s, 2), round(sample_s, 2), round(seconds, 2), int(scores.n_pred), round(scores.ap[0.5], 3),
                             panel.status.text(), path)
    finally:
        viewer.close()
        shutdown_all()
    if result.ap50 < min_ap50:
        raise SegStudioError(f"self-test: AP50 {result.ap50:.3f} on the sample through the Segment panel, "
                             f"below {min_ap50}")
    return result
