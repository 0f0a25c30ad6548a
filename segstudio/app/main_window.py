"""The standalone segstudio window: a napari viewer with the segstudio panels docked.

:func:`run_app` is what ``segstudio gui`` (and ``python -m segstudio``) call;
:func:`build_window` sets the window up without entering the event loop, for
tests and scripts.

Files given on the command line and files dropped onto the window are read
with :func:`~segstudio.core.image.io.read_image`, so the pixel size becomes the
layer scale and channels become one layer each, exactly as the command line
reads them.  A dropped folder goes to the
*Batch* dock, which processes every image in it (see
:mod:`segstudio.qt.batch_panel`).  Drops of anything else (zarr stores, or a
drop with Shift or Alt held, napari's "open as stack" / "choose plugin") go
to napari's own drop handling.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Iterable

import napari
from napari.qt import get_qapp
from napari.utils.notifications import show_error
from qtpy.QtCore import QEvent, QObject, Qt
from qtpy.QtGui import QGuiApplication, QIcon
from qtpy.QtWidgets import QApplication, QMainWindow

from ..core.errors import SegStudioError
from ..core.image.io import IMAGE_SUFFIXES
from ..core.image.sources import read_image
from ..napari_plugin._batch import BatchWidget
from ..napari_plugin._benchmark import BenchmarkWidget
from ..napari_plugin._layers import image_layer_data
from ..napari_plugin._optimize import OptimizeWidget
from ..napari_plugin._performance import PerformanceWidget
from ..napari_plugin._sample_data import load_sample, sample_id
from ..napari_plugin._widget import SegmentWidget
from ..qt.batch_panel import dropped_folder
from ..qt.binding import check_qt_binding
from ..qt.worker import shutdown_all
from ..resources import ICON
from ..sample_data import sample_pairs

TITLE = "segstudio"
WINDOW_SIZE = (1400, 900)
PERFORMANCE_HEIGHT = 300  # the Performance dock's charts, under the canvas


def open_paths(viewer: napari.Viewer, paths: Iterable[str | Path]) -> list[str]:
    """Open image files in ``viewer`` through :func:`read_image`.

    A file that cannot be read does not stop the others: its message is shown
    as a napari notification and returned.

    Returns
    -------
    list of str
        One message per file that could not be opened.
    """
    errors = []
    for path in paths:
        try:
            image = read_image(path)
        except SegStudioError as exc:
            errors.append(str(exc))
            show_error(str(exc))
            continue
        for data, kwargs, layer_type in image_layer_data(image):
            getattr(viewer, f"add_{layer_type}")(data, **kwargs)
    return errors


def show_first_sample(viewer: napari.Viewer) -> None:
    """Open the first bundled sample (with its hidden ground truth)."""
    pairs = sample_pairs()
    if not pairs:
        return
    for data, kwargs, layer_type in load_sample(sample_id(pairs[0][0])):
        getattr(viewer, f"add_{layer_type}")(data, **kwargs)


def droppable_files(urls) -> list[Path]:
    """The local image files of a drop, or ``[]`` when the drop holds anything else."""
    paths = []
    for url in urls:
        if not url.isLocalFile():
            return []
        path = Path(url.toLocalFile())
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            return []
        paths.append(path)
    return paths


class FileDropFilter(QObject):
    """Event filter that opens dropped image files with :func:`open_paths`.

    With ``batch``, a dropped folder goes to that :class:`BatchWidget`, which
    starts (or resumes) processing it.
    """

    def __init__(self, viewer: napari.Viewer, parent: QObject | None = None, batch: "BatchWidget | None" = None):
        super().__init__(parent)
        self._viewer = weakref.ref(viewer)  # the filter is owned by the window: no cycle back to it
        self._batch = weakref.ref(batch) if batch is not None else None

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt override
        """Accept drags of image files and open them on drop; leave other events alone."""
        kind = event.type()
        if kind not in (QEvent.Type.DragEnter, QEvent.Type.DragMove, QEvent.Type.Drop):
            return False
        modifiers = QGuiApplication.keyboardModifiers()
        if modifiers & (Qt.KeyboardModifier.ShiftModifier | Qt.KeyboardModifier.AltModifier):
            return False  # napari's own "open as stack" / "choose a reader"
        mime = event.mimeData()
        batch = self._batch() if self._batch is not None else None
        folder = dropped_folder(mime.urls()) if batch is not None and mime is not None and mime.hasUrls() else None
        if folder is not None:
            event.acceptProposedAction()
            if kind == QEvent.Type.Drop:
                dock = batch.parentWidget()
                if dock is not None:
                    dock.raise_()  # show the Batch tab
                batch.panel.open_folder(folder)
            return True
        paths = droppable_files(mime.urls()) if mime is not None and mime.hasUrls() else []
        if not paths:
            return False
        viewer = self._viewer()
        if viewer is None:
            return False
        event.acceptProposedAction()
        if kind == QEvent.Type.Drop:
            open_paths(viewer, paths)
        return True


def application() -> QApplication:
    """napari's QApplication, created with segstudio's icon when there is none yet."""
    if QApplication.instance() is None:
        return get_qapp(icon=str(ICON))
    return get_qapp()


def build_window(
    paths: Iterable[str | Path] = (),
    show_sample: bool = False,
    *,
    viewer: napari.Viewer | None = None,
    show: bool = True,
) -> napari.Viewer:
    """Set up the segstudio window and return its viewer, without running the event loop.

    Parameters
    ----------
    paths : iterable of path
        Image files to open.
    show_sample : bool
        Open the first bundled sample.
    viewer : napari.Viewer, optional
        Set up this viewer (tests pass one from ``make_napari_viewer``)
        instead of creating one.
    show : bool
        Show the window.
    """
    icon = QIcon(str(ICON))
    if viewer is None:
        application()
        viewer = napari.Viewer(title=TITLE, show=False)
    viewer.title = TITLE
    window: QMainWindow = viewer.window._qt_window
    window._window_icon = str(ICON)  # napari re-reads this when the theme changes
    window.setWindowIcon(icon)
    QGuiApplication.setWindowIcon(icon)
    window.resize(*WINDOW_SIZE)

    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment", area="right")
    batch = BatchWidget(viewer)
    viewer.window.add_dock_widget(batch, name="Batch", area="right", tabify=True)
    optimize = OptimizeWidget(viewer)
    viewer.window.add_dock_widget(optimize, name="Optimize", area="right", tabify=True)
    benchmark = BenchmarkWidget(viewer)
    viewer.window.add_dock_widget(benchmark, name="Benchmark", area="right", tabify=True)
    widget.parentWidget().raise_()  # Segment in front; Batch, Optimize and Benchmark a tab away
    performance = PerformanceWidget(viewer)
    dock = viewer.window.add_dock_widget(performance, name="Performance", area="bottom")
    window.resizeDocks([dock], [PERFORMANCE_HEIGHT], Qt.Orientation.Vertical)

    drop_filter = FileDropFilter(viewer, window, batch)
    window.setAcceptDrops(True)
    window.installEventFilter(drop_filter)
    viewer.window._qt_viewer.installEventFilter(drop_filter)

    if show:
        # on screen, panels drawn, before the images load (reading and adding them is seconds of a cold start)
        window.show()
        QApplication.processEvents()
    if show_sample:
        show_first_sample(viewer)
    open_paths(viewer, paths)
    if show and len(viewer.layers):
        QApplication.processEvents()  # the canvas at its final size
        viewer.reset_view()  # napari fitted the first layer to the canvas as it was when the layer came
    return viewer


def _docked(viewer: napari.Viewer, cls):
    widgets = viewer.window._qt_window.findChildren(cls)
    if not widgets:
        raise LookupError(f"this viewer has no segstudio {cls.__name__}")
    return widgets[0]


def segment_widget(viewer: napari.Viewer) -> SegmentWidget:
    """The :class:`SegmentWidget` docked in a window made by :func:`build_window`."""
    return _docked(viewer, SegmentWidget)


def batch_widget(viewer: napari.Viewer) -> BatchWidget:
    """The :class:`BatchWidget` docked in a window made by :func:`build_window`."""
    return _docked(viewer, BatchWidget)


def optimize_widget(viewer: napari.Viewer) -> OptimizeWidget:
    """The :class:`OptimizeWidget` docked in a window made by :func:`build_window`."""
    return _docked(viewer, OptimizeWidget)


def benchmark_widget(viewer: napari.Viewer) -> BenchmarkWidget:
    """The :class:`BenchmarkWidget` docked in a window made by :func:`build_window`."""
    return _docked(viewer, BenchmarkWidget)


def performance_widget(viewer: napari.Viewer) -> PerformanceWidget:
    """The :class:`PerformanceWidget` docked in a window made by :func:`build_window`."""
    return _docked(viewer, PerformanceWidget)


def run_app(paths: list[Path], show_sample: bool) -> int:
    """Open the standalone window and run the event loop until it closes.

    Returns the process exit code.
    """
    check_qt_binding()
    application()
    build_window(paths, show_sample)
    try:
        napari.run()
    finally:
        shutdown_all()
    return 0
