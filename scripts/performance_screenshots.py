"""Make docs/performance-running.png and docs/performance-done.png: the Performance dock during and after a run.

Opens the standalone window (1400x900) on a mosaic of the crowded sample
(``--size`` pixels square, default 2048), segments it twice with the
default model (the second run is drawn against the first) and saves the
whole window while the second run is under way and once it has finished.
Needs a display:

    xvfb-run -a -s "-screen 0 1920x1200x24" python scripts/performance_screenshots.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from make_screenshot import _save_png, _settle  # noqa: E402

WINDOW_SIZE = (1400, 900)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="side of the mosaic in pixels (default 2048)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "docs")
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)

    from scaling import make_image

    from segstudio.app.main_window import application, build_window, performance_widget, segment_widget
    from segstudio.qt.binding import check_qt_binding

    check_qt_binding()
    application()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"mosaic{args.size}.tif"
        make_image(path, args.size, "contiguous")
        viewer = build_window([path])
        window = viewer.window._qt_window
        window.resize(*WINDOW_SIZE)
        perf = performance_widget(viewer).panel
        panel = segment_widget(viewer).panel
        try:
            t0 = time.monotonic()

            def wait(condition, what):
                while not condition():
                    if time.monotonic() - t0 > args.timeout:
                        raise TimeoutError(f"waited {args.timeout:.0f} s for {what}")
                    _settle(100)

            panel.run_button.click()  # the first run: the one the second is compared with
            wait(lambda: not panel.is_running(), "the first run")
            _settle(300)
            print(f"first run: {perf.records.runs[-1].summary()}", flush=True)
            panel.run_button.click()
            first = perf.records.runs[-1]
            half = max(1, len(first.batches) // 2)
            wait(lambda: perf.shown is not first and perf.shown is not None
                 and (len(perf.shown.batches) >= half or perf.shown.finished is not None),
                 "half of the second run's batches")
            _settle(300)
            shot = viewer.window.screenshot(canvas_only=False, flash=False)
            size = _save_png(shot, args.out_dir / "performance-running.png")
            print(f"wrote performance-running.png ({shot.shape[1]}x{shot.shape[0]}, {size / 1e3:.0f} kB)")
            wait(lambda: not panel.is_running() and perf.shown.finished is not None, "the second run")
            _settle(500)
            shot = viewer.window.screenshot(canvas_only=False, flash=False)
            size = _save_png(shot, args.out_dir / "performance-done.png")
            print(f"wrote performance-done.png ({shot.shape[1]}x{shot.shape[0]}, {size / 1e3:.0f} kB); "
                  f"{perf.shown.summary()}")
        finally:
            panel.shutdown()
            viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
