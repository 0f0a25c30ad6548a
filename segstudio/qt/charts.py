"""The look every segstudio chart shares (pyqtgraph)."""

from __future__ import annotations


def plot_widget(bottom: str, left: str, *, min_height: int = 180):
    """A white pyqtgraph plot with its axis labels and a light grid, without SI prefixes (AP50 0.800, not 800 x0.001).

    Returns ``(widget, plot_item)``.
    """
    import pyqtgraph as pg
    from qtpy.QtWidgets import QGraphicsItem

    widget = pg.PlotWidget(background="w")
    widget.setMinimumHeight(min_height)
    plot = widget.getPlotItem()
    plot.setLabel("bottom", bottom)
    plot.setLabel("left", left)
    plot.showGrid(x=True, y=True, alpha=0.25)
    for axis in ("left", "bottom"):
        plot.getAxis(axis).enableAutoSIPrefix(False)
    for axis in plot.axes.values():
        # An axis draws its grid over the whole chart, so every new point repainted it (ticks, labels and grid
        # replayed from a QPicture: most of a chart's repaint, 10-25 ms in software). Cached as a pixmap it is
        # only redrawn when its range or size changes (benchmarks/gui_stall.py).
        axis["item"].setCacheMode(QGraphicsItem.CacheMode.DeviceCoordinateCache)
    return widget, plot
