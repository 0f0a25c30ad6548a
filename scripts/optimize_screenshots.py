"""Make docs/optimize-*.png: the optimization wizard's pages in the standalone window at 1400x900.

Opens the window on a bundled sample, raises the Optimize tab and walks the
wizard on the bundled samples (calibration: the sample folder; validation:
its image / labels pairs), saving one PNG of the whole window per page.
Needs a display:

    xvfb-run -a -s "-screen 0 1920x1200x24" python scripts/optimize_screenshots.py [--pages 1,2,3,4]

Each page is made by a function in :data:`PAGES` (number -> (file name,
maker)); a maker gets the :class:`Shot` context, brings the wizard to its
page and waits until the page shows what it should.  Pages 5 and 6 (Run,
Result) are added to :data:`PAGES` the same way.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from make_screenshot import _save_png, _settle  # noqa: E402

WINDOW_SIZE = (1400, 900)
SAMPLES = ROOT / "sample_data"


@dataclass
class Shot:
    viewer: object
    widget: object  # the OptimizeWidget
    out_dir: Path
    timeout_s: float

    @property
    def wizard(self):
        return self.widget.wizard

    def wait(self, condition: Callable[[], bool], what: str) -> None:
        t0 = time.monotonic()
        while not condition():
            if time.monotonic() - t0 > self.timeout_s:
                raise TimeoutError(f"waited {self.timeout_s:.0f} s for {what}")
            _settle(100)

    def go(self, index: int) -> None:
        """Next until the wizard shows page ``index`` (0-based); fail with the reason it gives."""
        while self.wizard.index < index:
            if not self.wizard.next():
                raise RuntimeError(f"Next refused on page {self.wizard.index + 1}: {self.wizard.reason.text()}")


def idle(page) -> bool:
    return not page.runner.is_running() and not getattr(page, "_queue", None)


def page_model(s: Shot) -> None:
    page = s.wizard.model_page
    page.select("nuclei")
    s.wait(lambda: page.info is not None, "the backends")


def page_calibration(s: Shot) -> None:
    s.go(1)
    page = s.wizard.calibration_page
    page.set_folder(SAMPLES)
    s.wait(lambda: idle(page) and page.build is not None, "the calibration tiles")


def page_validation(s: Shot) -> None:
    s.go(2)
    page = s.wizard.validation_page
    page.set_source("pairs", SAMPLES)
    s.wait(lambda: idle(page) and page.vset is not None, "the validation set")


def page_recipe(s: Shot) -> None:
    s.go(3)
    page = s.wizard.recipe_page
    page.choose("int8")
    s.wait(lambda: idle(page) and page.check_for(page.recipe_text()) is not None, "the recipe's checks and estimates")


# number -> (file name, maker); pages 5 and 6 (Run, Result) are added here by their makers
PAGES: dict[int, tuple[str, Callable[[Shot], None]]] = {
    1: ("optimize-1-model.png", page_model),
    2: ("optimize-2-calibration.png", page_calibration),
    3: ("optimize-3-validation.png", page_validation),
    4: ("optimize-4-recipe.png", page_recipe),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", default=",".join(map(str, PAGES)), help="pages to shoot, in order (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--sample", default="6fe2df6de1d9", help="bundled sample shown in the viewer")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for a page")
    args = parser.parse_args(argv)
    pages = [int(p) for p in args.pages.split(",") if p.strip()]

    from segstudio.app.main_window import application, build_window, optimize_widget
    from segstudio.napari_plugin._sample_data import sample_paths
    from segstudio.qt.binding import check_qt_binding

    check_qt_binding()
    application()
    image_path, _ = sample_paths(args.sample)
    viewer = build_window([image_path])
    window = viewer.window._qt_window
    window.resize(*WINDOW_SIZE)
    widget = optimize_widget(viewer)
    widget.parentWidget().raise_()  # the Optimize tab in front
    shot = Shot(viewer, widget, args.out, args.timeout)
    try:
        for number in sorted(pages):
            name, make = PAGES[number]
            make(shot)
            _settle(600)
            picture = viewer.window.screenshot(canvas_only=False, flash=False)
            size = _save_png(picture, args.out / name)
            print(f"wrote {args.out / name} ({picture.shape[1]}x{picture.shape[0]}, {size / 1e3:.0f} kB): "
                  f"{shot.wizard.header.text()}")
    finally:
        widget.wizard.shutdown()
        viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
