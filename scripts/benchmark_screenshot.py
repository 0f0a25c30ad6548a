"""Make docs/benchmark-page.png: the Benchmark tab after a quick run on the bundled 2048x2048 mosaic.

Opens the standalone window (1400x900) with the mosaic of the crowded sample
shown, raises the Benchmark tab, runs a quick benchmark of the default
variants (every one that runs here, and the naive baseline) on the bundled
mosaic with the default model, and saves the whole window once the table
and the chart are filled.  ``--report FILE`` shows a report saved with
*Save JSON…* (or ``segstudio bench --json``) instead of running one.  Needs
a display:

    xvfb-run -a -s "-screen 0 1920x1200x24" python scripts/benchmark_screenshot.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from make_screenshot import _save_png, _settle  # noqa: E402

WINDOW_SIZE = (1400, 900)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmark-page.png")
    parser.add_argument("--report", type=Path, default=None, help="show this saved report instead of running")
    parser.add_argument("--save-report", type=Path, default=None, help="also write the run's report here")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds to wait for the benchmark")
    args = parser.parse_args(argv)

    from segstudio.app.main_window import application, benchmark_widget, build_window
    from segstudio.core.tasks.benchmark import MOSAIC_SIZE, make_mosaic
    from segstudio.qt.binding import check_qt_binding

    check_qt_binding()
    application()
    with tempfile.TemporaryDirectory() as tmp:
        mosaic = make_mosaic(Path(tmp) / f"mosaic{MOSAIC_SIZE}.tif")
        viewer = build_window([mosaic])
        window = viewer.window._qt_window
        window.resize(*WINDOW_SIZE)
        widget = benchmark_widget(viewer)
        widget.parentWidget().raise_()  # the Benchmark tab in front
        panel = widget.panel
        try:
            _settle(300)
            if args.report is not None:
                panel.show_report(json.loads(args.report.read_text()))
            else:
                panel.set_image_source("mosaic")
                t0 = time.monotonic()
                panel.run_button.click()
                while panel.is_running():
                    if time.monotonic() - t0 > args.timeout:
                        panel.shutdown()
                        print(f"the benchmark did not finish in {args.timeout:.0f} s", file=sys.stderr)
                        return 1
                    _settle(200)
                if panel.report is None:
                    print(f"the benchmark did not finish: {panel.status.text()} {panel.error_text()}",
                          file=sys.stderr)
                    return 1
                if args.save_report:
                    panel.save_json(args.save_report)
            _settle(800)
            shot = viewer.window.screenshot(canvas_only=False, flash=False)
            size = _save_png(shot, args.out)
            print(f"wrote {args.out} ({shot.shape[1]}x{shot.shape[0]}, {size / 1e3:.0f} kB); "
                  f"{panel.status.text().splitlines()[0]}")
            for row in panel.rows():
                print("  " + " | ".join(row))
        finally:
            panel.shutdown()
            viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
