"""The optimization wizard, driven as a user drives it, on a real data set: does it give the CLI's figures?

Opens the standalone window (under Xvfb when there is no display), fills
pages 1 to 4 (the model; a folder of calibration images; a folder of
validation images with labels and the allowed AP50 loss; a preset), runs it
on page 5 and copies the run's ``report.json`` / ``report.html`` to
``benchmarks/results/optimize-wizard-<preset>-<machine>-<date>.*``.  With
``--cli-report`` it prints the step table of both side by side: the same
engine runs behind both, so AP50 must agree within run-to-run noise (the
recovery trains the same seeds; speed-ups are timed on a shared machine).

The recorded comparison (DSB2018 fluorescence: train for calibration, val
for validation, budget 0.01; a folder of symbolic links to the fluorescence
images, since neither the wizard's folder picker nor this command filters by
``index.json``)::

    segstudio optimize --model nuclei-v1 --calib /tmp/dsbf/train --val-images /tmp/dsbf/val \\
        --val-labels /tmp/dsbf/val --steps prune:0.5,recover:steps=300,quantize:int8 --out /tmp/optcmp/cli
    python benchmarks/optimize_wizard.py --model nuclei-v1 --calib /tmp/dsbf/train --val /tmp/dsbf/val \\
        --preset prune-recover-int8 --steps prune:0.5,recover:steps=300,quantize:int8 --out /tmp/optcmp/wizard \\
        --cli-report /tmp/optcmp/cli/report.json --name wizard-prune-recover300-int8

(300 recovery steps instead of the preset's 2500, edited in the Advanced view: the full preset takes hours on
this shared 2-core machine; both sides run the same steps.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def drive(model: str, calib: Path, val: Path, preset: str, out: Path, max_drop: float, steps: str | None) -> dict:
    from gui_heartbeat import Heartbeat, wait

    from segstudio.app.main_window import build_window, optimize_widget
    from segstudio.core.optimize.report import OptimizeReport

    viewer = build_window(show=True)
    try:
        wizard = optimize_widget(viewer).wizard
        wizard.model_page.select(model)
        wait(lambda: wizard.model_page.info is not None, "the backends")
        assert wizard.next(), wizard.reason.text()
        page = wizard.calibration_page
        page.set_folder(calib)
        wait(lambda: not page.runner.is_running() and page.build is not None, "the calibration tiles", 1800)
        assert wizard.next(), wizard.reason.text()
        page = wizard.validation_page
        page.set_source("pairs", val)
        page.drop_spin.setValue(max_drop)
        wait(lambda: not page.runner.is_running() and page.vset is not None, "the validation set", 1800)
        assert wizard.next(), wizard.reason.text()
        page = wizard.recipe_page
        page.choose(preset)
        if steps:  # the preset's steps edited in the Advanced view, as a user would
            from segstudio.core.optimize.steps import parse_steps

            page.advanced_button.setChecked(True)
            page.editor.set_steps(parse_steps(steps))
            page.editor.changed.emit()
        page.out_edit.setText(str(out))
        wait(lambda: not page.is_checking() and page.check_for(page.recipe_text()) is not None,
             "the recipe's check and estimate", 1800)
        estimate = page.estimate_for(page.recipe_text())
        assert wizard.next(), wizard.reason.text()
        beat = Heartbeat()
        run = wizard.run_page
        done = []
        run.runner.finished.connect(lambda r: done.append(("finished", r)))
        run.runner.failed.connect(lambda e: done.append(("failed", e)))
        run.runner.cancelled.connect(lambda: done.append(("cancelled", None)))
        t0 = time.perf_counter()
        beat.start()
        run.start_button.click()
        wait(lambda: bool(done) and not run.is_running(), "the run", timeout_s=6 * 3600)
        beat.stop()
        kind, value = done[0]
        if kind != "finished":
            raise SystemExit(f"the wizard's run {kind}: {value}")
        report: OptimizeReport = value
        return {"report": report, "seconds": time.perf_counter() - t0, "heartbeat": beat.summary(),
                "estimate_s": getattr(estimate, "total_s", None)}
    finally:
        viewer.close()


def table(report: dict) -> list[tuple]:
    rows = [("original", "", report["baseline"]["ap50"], report["baseline"]["speedup_vs_baseline"])]
    for r in report["steps"]:
        rows.append((r["name"], r["status"], r["ap50"], r["speedup_vs_baseline"]))
    f = report["final"]
    rows.append(("final", f.get("from_step") or "original", f["ap50"], f["speedup_vs_baseline"]))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="nuclei")
    ap.add_argument("--calib", type=Path, required=True)
    ap.add_argument("--val", type=Path, required=True, help="folder of X_img / X_labels pairs")
    ap.add_argument("--preset", default="prune-recover-int8")
    ap.add_argument("--steps", default=None, help="edit the preset's steps in the Advanced view to these")
    ap.add_argument("--max-drop", type=float, default=0.01)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cli-report", type=Path, default=None, help="the CLI's report.json of the same recipe")
    ap.add_argument("--name", default=None, help="results file name part (default: wizard-<preset>)")
    args = ap.parse_args()
    if not os.environ.get("DISPLAY") and shutil.which("xvfb-run") and not os.environ.get("SEGSTUDIO_UNDER_XVFB"):
        env = {**os.environ, "SEGSTUDIO_UNDER_XVFB": "1"}
        return subprocess.call(["xvfb-run", "-a", "-s", "-screen 0 1920x1200x24", sys.executable, *sys.argv], env=env)
    if args.out.exists():
        shutil.rmtree(args.out)
    result = drive(args.model, args.calib, args.val, args.preset, args.out, args.max_drop, args.steps)
    report = json.loads((args.out / "report.json").read_text())
    machine = f"cpu-{os.cpu_count()}core" if platform.machine() else "cpu"
    name = args.name or f"wizard-{args.preset}"
    dest = ROOT / "benchmarks" / "results" / f"optimize-{name}-{machine}-{time.strftime('%Y-%m-%d')}"
    shutil.copy(args.out / "report.json", dest.with_suffix(".json"))
    shutil.copy(args.out / "report.html", dest.with_suffix(".html"))
    summary = {"command": "python benchmarks/optimize_wizard.py " + " ".join(sys.argv[1:]),
               "wizard_seconds": round(result["seconds"], 1), "estimate_s": result["estimate_s"],
               "heartbeat": result["heartbeat"], "wizard": table(report)}
    print(f"wizard: {result['seconds'] / 60:.1f} min (estimated {(result['estimate_s'] or 0) / 60:.0f} min), "
          f"heartbeat p99 {result['heartbeat'].get('p99_ms', float('nan')):.1f} ms")
    print(f"{'row':<34} {'status':<12} {'wizard AP50':>11} {'speed-up':>9}" +
          (f" {'CLI AP50':>9} {'speed-up':>9}" if args.cli_report else ""))
    cli = table(json.loads(args.cli_report.read_text())) if args.cli_report and args.cli_report.is_file() else None
    if cli:
        summary["cli"] = cli
    for i, (n, st, ap50, sp) in enumerate(table(report)):
        line = f"{n:<34} {st:<12} {ap50 if ap50 is not None else float('nan'):11.4f} {sp or float('nan'):8.2f}x"
        if cli and i < len(cli):
            line += f" {cli[i][2] if cli[i][2] is not None else float('nan'):9.4f} {cli[i][3] or float('nan'):8.2f}x"
        print(line)
    dest.with_name(dest.name + "-summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {dest.with_suffix('.json')} and {dest.name}-summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
