"""Make docs/optimize-*.png: the optimization wizard's pages in the standalone window at 1400x900.

Opens the window on a bundled sample, raises the Optimize tab and walks the
wizard on the bundled samples (calibration: the sample folder; validation:
its image / labels pairs), saving one PNG of the whole window per page.
Needs a display:

    xvfb-run -a -s "-screen 0 1920x1200x24" python scripts/optimize_screenshots.py [--pages 1,2,3,4,4a,5,6]

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


def page_advanced(s: Shot) -> None:
    """Page 4 with the Advanced view open on the Prune + recover + INT8 preset: every option of every step."""
    s.go(3)
    page = s.wizard.recipe_page
    page.choose("prune-recover-int8")
    page.advanced_button.setChecked(True)
    s.wait(lambda: idle(page) and page.check_for(page.recipe_text()) is not None, "the recipe's checks and estimates")


# the run shot on page 5: three kinds of step (a short recovery, so it takes a minute), small speed tiles
RUN_RECIPE = "prune:0.5,recover:steps=60:crop=64,quantize:int8"


def page_run(s: Shot) -> None:
    """Page 5 after a short prune + recover + INT8 run: the step list, the chart with its guardrail and front."""
    from segstudio.core.optimize.steps import format_steps, parse_steps

    page = s.wizard.recipe_page
    if s.wizard.index < 3:  # shot alone (--pages 5,6): the set-up pages first
        for make in (page_model, page_calibration, page_validation, page_recipe):
            make(s)
    page.advanced_button.setChecked(True)
    page.choose("prune-recover-int8")  # then shortened in the Advanced view, as a user would
    recover = page.editor.box(1)
    recover.field("steps").set_raw(60)
    recover.field("crop").set_raw(64)
    assert page.recipe_text() == format_steps(parse_steps(RUN_RECIPE)), page.recipe_text()
    s.wait(lambda: idle(page) and page.check_for(page.recipe_text()) is not None, "the recipe's checks")
    s.wizard.state.speed_tile = 128
    s.go(4)
    run = s.wizard.run_page
    reports = []
    run.finished.connect(reports.append)
    run.start_button.click()
    s.wait(lambda: bool(reports) or (not run.is_running() and run.error_view.report is not None), "the run")
    if not reports:
        raise RuntimeError(f"the run failed: {run.error_view.text()}")
    # the wizard moves on to the result by itself; page 5 is shown again as the run left it (showing it through
    # the wizard's navigation would reset it for a new run)
    w = s.wizard
    w._index = 4
    w.stack.setCurrentIndex(4)
    w.header.setText("Step 5 of 6: Run")
    w._update_buttons()
    run.tabs.setCurrentIndex(0)
    run.steps_table.selectRow(len(run.model.labels) - 1)


def page_result(s: Shot) -> None:
    """Page 6 with the comparison on the open image, its overlay in the viewer."""
    if s.wizard.run_page.report is None:
        page_run(s)
    s.wizard._show(5)
    result = s.wizard.result_page
    done = []
    result.comparison_ready.connect(done.append)
    result.compare_button.click()
    s.wait(lambda: bool(done) or result.error_view.report is not None, "the comparison")
    if not done:
        raise RuntimeError(f"the comparison failed: {result.error_view.text()}")
    s.wait(lambda: result.compare_button.isEnabled(), "the compare runner to stop")
    result.table.selectRow(len(result.rows()) - 1)


# number -> (file name, maker); pages 5 and 6 (Run, Result) are added here by their makers
PAGES: dict[str, tuple[str, Callable[[Shot], None]]] = {  # shot in this order
    "1": ("optimize-1-model.png", page_model),
    "2": ("optimize-2-calibration.png", page_calibration),
    "3": ("optimize-3-validation.png", page_validation),
    "4": ("optimize-4-recipe.png", page_recipe),
    "4a": ("optimize-4-advanced.png", page_advanced),
    "5": ("optimize-5-run.png", page_run),
    "6": ("optimize-6-result.png", page_result),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", default=",".join(map(str, PAGES)), help="pages to shoot, in order (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--sample", default="6fe2df6de1d9", help="bundled sample shown in the viewer")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for a page")
    args = parser.parse_args(argv)
    wanted = {p.strip() for p in args.pages.split(",") if p.strip()}
    unknown = wanted - set(PAGES)
    if unknown:
        parser.error(f"no page {', '.join(sorted(unknown))} (pages: {', '.join(PAGES)})")
    pages = [p for p in PAGES if p in wanted]

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
        for number in pages:
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
