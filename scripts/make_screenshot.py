"""Make docs/screenshot.png: the app segmenting the crowded sample.

Opens the standalone window on sample 6fe2df6de1d9, presses Run in the
Segment panel, waits for the labels and saves a PNG of the whole window
(labels over the image, the panel with its status line).  Needs a display:

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/make_screenshot.py
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_BYTES = 1_000_000
WINDOW_SIZE = (1500, 930)


def _wait_for_run(panel, timeout_s: float) -> bool:
    """Press Run and spin the event loop until the job stops; True if labels came back."""
    from qtpy.QtCore import QEventLoop, QTimer

    results = []
    loop = QEventLoop()
    panel.result_ready.connect(results.append)
    panel.runner.stopped.connect(loop.quit)
    QTimer.singleShot(int(timeout_s * 1000), loop.quit)
    panel.run_button.click()
    if panel.is_running():
        loop.exec()
    if panel.is_running():
        panel.shutdown()
    return bool(results)


def _settle(ms: int = 500) -> None:
    """Let Qt and vispy draw for ``ms`` milliseconds."""
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    QTimer.singleShot(ms, loop.quit)
    loop.exec()


def _save_png(image, out: Path) -> int:
    """Save a screenshot array as PNG under MAX_BYTES (a 256-colour palette if needed)."""
    from PIL import Image

    picture = Image.fromarray(image[..., :3])
    data = io.BytesIO()
    picture.save(data, format="PNG", optimize=True)
    if data.tell() > MAX_BYTES:
        data = io.BytesIO()
        picture.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(data, format="PNG", optimize=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data.getvalue())
    return data.tell()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", default="6fe2df6de1d9", help="bundled sample id (default: the crowded one)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshot.png")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the segmentation")
    args = parser.parse_args(argv)

    from segstudio.app.main_window import application, build_window, segment_widget
    from segstudio.napari_plugin._sample_data import sample_paths
    from segstudio.qt.binding import check_qt_binding

    check_qt_binding()
    application()
    image_path, _ = sample_paths(args.sample)
    viewer = build_window([image_path])
    viewer.window._qt_window.resize(*WINDOW_SIZE)
    widget = segment_widget(viewer)
    try:
        if not _wait_for_run(widget.panel, args.timeout):
            print(f"segmentation did not finish: {widget.panel.status.text()} {widget.panel.error_text()}",
                  file=sys.stderr)
            return 1
        labels = viewer.layers[f"{widget.current_layer().name} labels"]
        viewer.layers.selection.active = labels
        viewer.reset_view()
        _settle()
        shot = viewer.window.screenshot(canvas_only=False, flash=False)
        size = _save_png(shot, args.out)
        print(f"wrote {args.out} ({shot.shape[1]}x{shot.shape[0]}, {size / 1e3:.0f} kB); "
              f"{widget.panel.status.text().splitlines()[0]}")
    finally:
        viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
