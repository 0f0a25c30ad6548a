"""The stall meter: how late the GUI thread gets while the app works, with the Performance dock open.

Starts the real standalone window (1400x900; run it under Xvfb when there is
no display), runs a 10 ms heartbeat ``QTimer`` on the GUI thread (the
``Heartbeat`` of ``benchmarks/gui_heartbeat.py``) and records how late each
tick comes while, one after the other:

``segment``
    the Segment panel segments a 2048x2048 mosaic of the crowded sample
    (``--size``) with the default model: labels layer and features table
    added at the end;
``batch``
    the Batch panel processes 50 files (crops of the bundled samples);
``optimize``
    the Optimize wizard runs the INT8 recipe on nuclei-light with the
    bundled samples as calibration and validation images;
``benchmark``
    the Benchmark page (its tab raised) runs a quick benchmark of the
    default model's default variants and the baseline on the bundled
    2048x2048 mosaic: table and chart drawn at the end.

The Performance dock charts every run meanwhile (``--no-dock``: it is
stopped, to measure what the dock itself costs).  p50 / p95 / p99 /
max lateness per scenario go to
``benchmarks/results/gui-stall-<date>.json``; targets: p99 <= 50 ms and
max <= 250 ms.  ``--trace`` names the longest stalls by the GUI thread's
stack, scheduler state and CPU time sampled during each (``--scenarios``
picks some).

    xvfb-run -a -s "-screen 0 1920x1200x24" .venv/bin/python benchmarks/gui_stall.py
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from gui_heartbeat import Heartbeat, set_up_wizard, wait, write_result  # noqa: E402

from segstudio.app.self_test import spin  # noqa: E402

SCENARIOS = ("segment", "batch", "optimize", "benchmark")
TARGET_P99_MS, TARGET_MAX_MS = 50.0, 250.0
TRACE_MS = 40  # a tick this late has its stall's GUI-thread stack sampled (the causes in the JSON)


def _outcome(beat: Heartbeat, seconds: float, perf, **extra) -> dict:
    record = perf.shown
    out = {"seconds": round(seconds, 2), **beat.summary(), **extra}
    if beat.tracing:
        out["longest_stalls"] = beat.stalls()
    if record is not None and perf.timer.isActive():
        out["charted_batches"] = len(record.batches)
        out["charted_images"] = len(record.stages)
        out["run"] = record.summary()
    out["targets_met"] = bool(out.get("p99_ms", 1e9) <= TARGET_P99_MS and out.get("max_ms", 1e9) <= TARGET_MAX_MS)
    return out


def _beat_while(beat, perf, start, running, what: str, settle_ms: int = 0) -> float:
    """Heartbeat from ``start()`` until ``running()`` is false and the dock has the run's end; the seconds."""
    t0 = time.perf_counter()
    beat.start()
    start()
    try:
        wait(lambda: not running(), what, timeout_s=1800)
        if perf.timer.isActive():
            wait(lambda: perf.shown is not None and perf.shown.finished is not None, "the dock")
        if settle_ms:
            spin(settle_ms)  # what the run's end adds (a labels layer, a table) drawn
    finally:
        beat.stop()
    return time.perf_counter() - t0


def segment_scenario(viewer, beat, perf, size: int, root: Path) -> dict:
    from scaling import make_image

    from segstudio.app.main_window import open_paths, segment_widget

    path = root / f"mosaic{size}.tif"
    make_image(path, size, "contiguous")
    open_paths(viewer, [path])
    widget = segment_widget(viewer)
    widget.set_current_layer(viewer.layers[-1])
    panel = widget.panel
    seconds = _beat_while(beat, perf, panel.run_button.click, panel.is_running, "the segmentation", settle_ms=500)
    return _outcome(beat, seconds, perf, image=f"{size}x{size}", status=panel.status.text())


def batch_scenario(viewer, beat, perf, root: Path, n: int = 50) -> dict:
    import tifffile
    from segstudio.sample_data import sample_pairs

    from segstudio.app.main_window import batch_widget
    from segstudio.core.image.sources import read_image

    src = root / "plate"
    src.mkdir()
    images = [read_image(p).data for p, _ in sample_pairs()]
    for i in range(n):
        image = images[i % len(images)]
        y, x = (7 * i) % max(1, image.shape[0] - 192), (11 * i) % max(1, image.shape[1] - 192)
        tifffile.imwrite(src / f"im{i:02d}.tif", image[y:y + 192, x:x + 192])
    panel = batch_widget(viewer).panel
    panel.set_folder(src, root / "plate_out")
    seconds = _beat_while(beat, perf, panel.start, panel.is_running, "the batch")
    return _outcome(beat, seconds, perf, files=n, counts=panel.report.counts if panel.report else {})


def optimize_scenario(viewer, beat, perf, root: Path) -> dict:
    from gui_heartbeat import heartbeat_run

    from segstudio.app.main_window import optimize_widget

    widget = optimize_widget(viewer)
    wizard = widget.wizard
    wizard.state.out_dir = root / "optimize"
    set_up_wizard(wizard, "quantize:int8", 0.01, 16)
    wizard.state.out_dir = root / "optimize"
    run = heartbeat_run(wizard, beat)
    return _outcome(beat, run["seconds"], perf, outcome=run["outcome"], steps=run.get("steps"))


def benchmark_scenario(viewer, beat, perf) -> dict:
    from segstudio.app.main_window import benchmark_widget

    widget = benchmark_widget(viewer)
    widget.parentWidget().raise_()  # the Benchmark tab in front: its progress, table and chart are drawn
    panel = widget.panel
    panel.set_image_source("mosaic")
    panel.quick_check.setChecked(True)
    spin(300)
    seconds = _beat_while(beat, perf, panel.run_button.click, panel.is_running, "the benchmark", settle_ms=500)
    report = panel.report or {}
    return _outcome(beat, seconds, perf, image="bundled 2048x2048 mosaic", quick=True,
                    model=panel.model_name, variants=[v["name"] for v in report.get("variants", [])],
                    status=panel.status.text(), error=panel.error_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--size", type=int, default=2048, help="side of the mosaic segmented (default 2048)")
    parser.add_argument("--no-dock", action="store_true",
                        help="the Performance dock stopped (not listening): what the dock itself costs")
    parser.add_argument("--trace", action="store_true",
                        help="name each long stall by the GUI thread's stack, sampled from another thread (CPython "
                             "3.11's sys._current_frames can crash the process while it samples: off for the "
                             "recorded figures)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    os.environ.setdefault("SEGSTUDIO_HOME", tempfile.mkdtemp(prefix="segstudio-stall-home-"))
    from segstudio.app.main_window import application, build_window, performance_widget
    from segstudio.qt.binding import check_qt_binding

    check_qt_binding()
    application()
    viewer = build_window()
    viewer.window._qt_window.resize(1400, 900)
    perf = performance_widget(viewer).panel
    if args.no_dock:
        perf.shutdown()
    root = Path(tempfile.mkdtemp(prefix="segstudio-stall-"))
    beat = Heartbeat(trace_ms=TRACE_MS if args.trace else None)
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.node(), "cpus": os.cpu_count(),
              "load_average_start": os.getloadavg(), "targets": {"p99_ms": TARGET_P99_MS, "max_ms": TARGET_MAX_MS},
              "performance_dock": "stopped" if args.no_dock else "open (refreshing at 10 Hz)", "scenarios": {}}
    try:
        for name in [s.strip() for s in args.scenarios.split(",") if s.strip()]:
            if name == "segment":
                r = segment_scenario(viewer, beat, perf, args.size, root)
            elif name == "batch":
                r = batch_scenario(viewer, beat, perf, root)
            elif name == "optimize":
                r = optimize_scenario(viewer, beat, perf, root)
            elif name == "benchmark":
                r = benchmark_scenario(viewer, beat, perf)
            else:
                raise SystemExit(f"unknown scenario {name!r} (choose from {', '.join(SCENARIOS)})")
            result["scenarios"][name] = r
            print(f"{name:9s} {r['seconds']:7.1f} s  p50 {r['p50_ms']:6.1f}  p95 {r['p95_ms']:6.1f}  "
                  f"p99 {r['p99_ms']:6.1f}  max {r['max_ms']:7.1f} ms  "
                  f"({'targets met' if r['targets_met'] else 'targets NOT met'}; "
                  f"{r.get('charted_batches', 0)} batches charted)", flush=True)
            for stall in r.get("longest_stalls", [])[:4]:
                print(f"    {stall['late_ms']:7.1f} ms (GUI CPU {stall['gui_cpu_ms']} ms, {', '.join(stall['gui_states'])})  {stall['where']}\n{'':18s}others: {stall['other_threads'][:300]}", flush=True)
    finally:
        result["load_average_end"] = os.getloadavg()
        from segstudio.qt.worker import shutdown_all

        shutdown_all()
        viewer.close()
        shutil.rmtree(root, ignore_errors=True)
        write_result(result, args.out, "gui-stall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
