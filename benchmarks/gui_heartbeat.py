"""How responsive the window stays while the optimization wizard runs, and how fast Cancel is.

Opens the standalone window (under Xvfb when there is no display), walks the
Optimize wizard's pages 1 to 4 on the bundled samples (calibration and
validation: the sample folder), starts the run (the INT8 preset by default,
or ``--recipe``), and measures the GUI event loop with a heartbeat: a
``QTimer`` every 10 ms records how late each tick is (actual interval minus
10 ms) for the whole run.  p50 / p95 / p99 / max lateness are printed and
written to ``benchmarks/results/gui-heartbeat-<date>.json``.  Target: p99 <=
50 ms.

Then the cancel latency: for every step kind that runs on a CPU (and the
phases around the steps: the original's measurement, the final interleaved
timing), a run is started, Cancel is pressed a while into that step, and
the time from Cancel to the JobRunner's ``cancelled`` signal (the worker
thread joined) is recorded in the same JSON.

    xvfb-run -a -s "-screen 0 1920x1200x24" .venv/bin/python benchmarks/gui_heartbeat.py
    ... --recipe "prune:0.5,recover:steps=60:crop=64,quantize:int8" --no-cancel
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from segstudio.app.self_test import wait_until as wait

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_data"
INTERVAL_MS = 10
CANCEL_SPEED_TILE = 128

# step kind -> (recipe, index of the step to cancel in, seconds into it); "measure" cancels while the original is
# measured, "remeasure" in the final interleaved timing (after the last step finished)
CANCEL_CASES = {
    "measure": ("quantize:int8", None, 3.0),
    "prune": ("prune:0.5", 0, 1.0),
    "recover": ("prune:0.5,recover:steps=5000:crop=64", 1, 4.0),
    "distill": ("distill:8:steps=5000", 0, 4.0),
    "sparsify": ("sparsify:0.5", 0, 1.0),
    "export": ("export", 0, 0.5),
    "quantize": ("quantize:int8:fallback=off", 0, 1.5),
    "remeasure": ("quantize:int8:fallback=off", "end", 0.5),
}


class Heartbeat:
    """A 10 ms QTimer; ``lateness_ms`` holds how late each tick came (interval - 10 ms).

    With ``trace_ms`` a watcher thread samples the GUI thread's Python stack
    every 5 ms while a tick is more than ``trace_ms`` late, so that each long
    stall is named by where the GUI thread was (:meth:`stalls`), not guessed.
    """

    def __init__(self, trace_ms: float | None = None) -> None:
        from qtpy.QtCore import Qt, QTimer

        self.timer = QTimer()
        self.timer.setTimerType(Qt.TimerType.PreciseTimer)
        self.timer.setInterval(INTERVAL_MS)
        self.timer.timeout.connect(self._tick)
        self.lateness_ms: list[float] = []
        self._last = 0.0
        self._trace_s = None if trace_ms is None else trace_ms / 1000
        self._gui_thread = threading.get_ident()
        self._gui_native = threading.get_native_id()
        self._samples: list[tuple[str, str]] = []  # (GUI stack, other threads' stacks) sampled in this stall
        self._cpu_at_stall: float | None = None  # the GUI thread's CPU seconds when this stall was first seen
        self._stalls: list[tuple[float, list, float | None]] = []
        self._watching = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        self.lateness_ms.clear()
        self._stalls.clear()
        self._samples = []
        self._last = time.perf_counter()
        self.timer.start()
        if self._trace_s is not None and self._watcher is None:
            self._watching.set()
            self._watcher = threading.Thread(target=self._watch, name="stall-tracer", daemon=True)
            self._watcher.start()

    def stop(self) -> None:
        self.timer.stop()
        self._watching.clear()
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None

    def _tick(self) -> None:
        now = time.perf_counter()
        late = max(0.0, (now - self._last) * 1000 - INTERVAL_MS)
        self.lateness_ms.append(late)
        self._last = now
        samples, self._samples = self._samples, []
        if samples:
            cpu0, self._cpu_at_stall = self._cpu_at_stall, None
            cpu = None if cpu0 is None else (_thread_cpu_s(self._gui_native) - cpu0) * 1000
            self._stalls.append((late, samples, cpu))

    def _watch(self) -> None:
        while self._watching.is_set():
            time.sleep(0.005)
            if time.perf_counter() - self._last > self._trace_s:
                frames = sys._current_frames()  # noqa: SLF001 - a profiler's own tool
                frame = frames.get(self._gui_thread)
                if frame is None:
                    continue
                if not self._samples:
                    self._cpu_at_stall = _thread_cpu_s(self._gui_native)
                others = " | ".join(sorted(_where(f, depth=2, keep=None) for t, f in frames.items()
                                           if t not in (self._gui_thread, threading.get_ident())))
                self._samples.append((_where(frame), others, _thread_state(self._gui_native)))
                del frames, frame  # no frame outlives its sample

    @property
    def tracing(self) -> bool:
        return self._trace_s is not None

    def stalls(self, n: int = 8) -> list[dict]:
        """The ``n`` longest stalls: lateness and the GUI thread's most sampled stack in each."""
        from collections import Counter

        out = []
        for late, samples, cpu in sorted(self._stalls, key=lambda s: -s[0])[:n]:
            stack, count = Counter(s[0] for s in samples).most_common(1)[0]
            others, _ = Counter(s[1] for s in samples).most_common(1)[0]
            states = Counter(s[2] for s in samples).most_common(3)
            out.append({"late_ms": round(late, 1), "samples": len(samples), "share": round(count / len(samples), 2),
                        # CPU the GUI thread used in the stall: near its length, it worked; near 0, it waited (the
                        # GIL held by another thread, a lock)
                        "gui_cpu_ms": None if cpu is None else round(cpu), "where": stack,
                        # the GUI thread's scheduler state and kernel wait channel when sampled: "R" runnable
                        # (working or waiting for a core), "S futex_wait_queue" (a lock: the GIL), "S do_poll" (a
                        # socket: the X server)
                        "gui_states": [f"{k} x{n}" for k, n in states], "other_threads": others})
        return out

    def summary(self) -> dict:
        a = np.asarray(self.lateness_ms)
        if not len(a):
            return {"ticks": 0}
        return {"ticks": int(len(a)), "p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
                "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max()),
                "over_50ms": int((a > 50).sum()), "over_100ms": int((a > 100).sum())}


_KEEP = ("segstudio", "napari", "pyqtgraph", "vispy", "superqt", "magicgui", "benchmarks")


def _task_stat(native_id: int) -> list[str] | None:
    """The fields of /proc/self/task/<id>/stat after the command name (field 3 on), None off Linux."""
    try:
        return Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _thread_cpu_s(native_id: int) -> float:
    """CPU seconds (user + system) a thread of this process has used (Linux; 0 elsewhere)."""
    fields = _task_stat(native_id)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _thread_state(native_id: int) -> str:
    """A thread's scheduler state and kernel wait channel (Linux; "" elsewhere)."""
    fields = _task_stat(native_id)
    if fields is None:
        return ""
    try:
        wchan = Path(f"/proc/self/task/{native_id}/wchan").read_text().strip()
    except OSError:
        wchan = ""
    return f"{fields[0]} {wchan}" if wchan and wchan != "0" else fields[0]


def _where(frame, depth: int = 6, keep=_KEEP) -> str:
    """The innermost frames of a stack (those in the app's own code or its GUI libraries), innermost first."""
    parts = []
    while frame is not None and len(parts) < depth:
        code = frame.f_code
        path = code.co_filename
        if keep is None or any(f"/{k}/" in path for k in keep):
            short = path.split("/site-packages/")[-1].split("/work/main/")[-1]
            parts.append(f"{short}:{frame.f_lineno} {code.co_name}")
        frame = frame.f_back
    return " <- ".join(parts) or "(outside Python: Qt's event loop or a C extension)"


def set_up_wizard(wizard, recipe: str, max_drop: float, tiles: int) -> None:
    """Pages 1 to 4 as a user fills them: nuclei-light, the sample folder for calibration and validation."""
    from segstudio.core.optimize.steps import parse_steps

    def idle(page):
        return not page.runner.is_running() and not getattr(page, "_queue", None)

    wizard.model_page.select("nuclei-light")
    wait(lambda: wizard.model_page.info is not None, "the backends")
    assert wizard.next(), wizard.reason.text()
    calib = wizard.calibration_page
    calib.tiles_spin.setValue(tiles)
    calib.set_folder(SAMPLES)
    wait(lambda: idle(calib) and calib.build is not None, "the calibration tiles")
    assert wizard.next(), wizard.reason.text()
    val = wizard.validation_page
    val.set_source("pairs", SAMPLES)
    val.drop_spin.setValue(max_drop)
    wait(lambda: idle(val) and val.vset is not None, "the validation set")
    assert wizard.next(), wizard.reason.text()
    recipe_page = wizard.recipe_page
    recipe_page.advanced_button.setChecked(True)
    recipe_page.editor.set_steps(parse_steps(recipe))
    recipe_page.editor.changed.emit()  # as after an edit: the page checks and estimates the recipe
    wait(lambda: idle(recipe_page) and recipe_page.check_for(recipe_page.recipe_text()) is not None,
         "the recipe's check and estimate")
    assert wizard.next(), wizard.reason.text()


def heartbeat_run(wizard, beat: Heartbeat) -> dict:
    """Start the run on page 5 and beat until it finishes; the lateness figures and the run's outline."""
    from segstudio.core.optimize.report import OptimizeEvent

    run = wizard.run_page
    counts = {"events": 0, "typed": 0}

    def count(p):
        counts["events"] += 1
        counts["typed"] += isinstance(p.event, OptimizeEvent)

    outcome = []
    slots = [(run.runner.progress, count),
             (run.runner.finished, lambda r: outcome.append(("finished", r))),
             (run.runner.failed, lambda e: outcome.append(("failed", e))),
             (run.runner.cancelled, lambda: outcome.append(("cancelled", None)))]
    for signal, slot in slots:
        signal.connect(slot)
    t0 = time.perf_counter()
    beat.start()
    run.start_button.click()
    try:
        wait(lambda: bool(outcome) and not run.is_running(), "the run", timeout_s=3600)
    finally:
        beat.stop()
        for signal, slot in slots:
            signal.disconnect(slot)
    seconds = time.perf_counter() - t0
    kind, value = outcome[0]
    out = {"outcome": kind, "seconds": seconds, "progress_signals": counts["events"],
           "typed_events": counts["typed"], **beat.summary()}
    if kind == "finished":
        out["steps"] = [{"name": r.name, "status": r.status.value, "ap50": r.ap50,
                         "speedup_vs_baseline": r.speedup_vs_baseline} for r in value.steps]
    elif kind == "failed":
        out["error"] = str(value)
    return out


def cancel_case(wizard, beat: Heartbeat, kind: str, recipe: str, index, delay_s: float, root: Path) -> dict:
    """Start ``recipe``, cancel ``delay_s`` into step ``index``; seconds from Cancel to ``cancelled``."""
    from segstudio.core.optimize.estimate import RunEstimate
    from segstudio.core.optimize.report import EventKind, OptimizeEvent
    from segstudio.core.optimize.steps import parse_steps

    state, run = wizard.state, wizard.run_page
    state.steps = parse_steps(recipe)
    n = len(state.steps)
    state.estimate = RunEstimate(total_s=60.0, per_step_s=(20.0,) * n, measure_s=20.0, basis="benchmark")
    state.out_dir = root / f"cancel-{kind}"
    state.speed_tile = CANCEL_SPEED_TILE  # latencies on small tiles: the same code paths, sooner at the step
    run.reset()
    marks: dict[str, float] = {}

    def on_progress(p):
        ev = p.event
        if not isinstance(ev, OptimizeEvent):
            return
        if index is None and "start" not in marks:
            marks["start"] = time.perf_counter()
        elif index == "end" and ev.kind is EventKind.STEP_FINISHED and ev.step == n - 1:
            marks.setdefault("start", time.perf_counter())
        elif ev.kind is EventKind.STEP_STARTED and ev.step == index:
            marks.setdefault("start", time.perf_counter())

    outcome = []
    slots = [(run.runner.progress, on_progress),
             (run.runner.cancelled, lambda: outcome.append(("cancelled", time.perf_counter()))),
             (run.runner.finished, lambda r: outcome.append(("finished", time.perf_counter()))),
             (run.runner.failed, lambda e: outcome.append(("failed", time.perf_counter(), str(e))))]
    for signal, slot in slots:
        signal.connect(slot)
    beat.start()
    run.start()
    try:
        wait(lambda: "start" in marks or outcome, f"the {kind} step", timeout_s=900)
        if outcome:
            return {"kind": kind, "recipe": recipe, "error": f"the run ended ({outcome[0][0]}) before the step"}
        wait(lambda: time.perf_counter() - marks["start"] >= delay_s or outcome, "the delay")
        phase = run.model.phase
        t_cancel = time.perf_counter()
        run.cancel_button.click()
        wait(lambda: bool(outcome), "the cancel", timeout_s=120)
        wait(lambda: not run.is_running(), "the runner to stop")
    finally:
        beat.stop()
        for signal, slot in slots:
            signal.disconnect(slot)
    end = outcome[0]
    return {"kind": kind, "recipe": recipe, "outcome": end[0], "cancel_s": end[1] - t_cancel,
            "into_step_s": t_cancel - marks["start"], "phase_at_cancel": phase,
            "heartbeat_p99_ms": beat.summary().get("p99_ms")}


def write_result(result: dict, out: Path | None, name: str) -> Path:
    """``result`` as JSON at ``out`` (default ``benchmarks/results/<name>-<date>.json``)."""
    out = out or ROOT / "benchmarks" / "results" / f"{name}-{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quantize:int8", help="the run whose heartbeat is measured")
    parser.add_argument("--max-drop", type=float, default=0.01)
    parser.add_argument("--tiles", type=int, default=16, help="calibration tiles (page 2)")
    parser.add_argument("--no-cancel", action="store_true", help="skip the cancel latencies")
    parser.add_argument("--no-heartbeat", action="store_true", help="only the cancel latencies")
    parser.add_argument("--cancel-kinds", default=",".join(CANCEL_CASES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    os.environ.setdefault("SEGSTUDIO_HOME", tempfile.mkdtemp(prefix="segstudio-heartbeat-home-"))
    from segstudio.app.main_window import application, build_window, optimize_widget
    from segstudio.qt.binding import check_qt_binding

    check_qt_binding()
    application()
    viewer = build_window(show_sample=True)
    viewer.window._qt_window.resize(1400, 900)
    widget = optimize_widget(viewer)
    widget.parentWidget().raise_()
    wizard = widget.wizard
    root = Path(tempfile.mkdtemp(prefix="segstudio-heartbeat-"))
    beat = Heartbeat()
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.node(), "cpus": os.cpu_count(),
              "load_average_start": os.getloadavg(), "interval_ms": INTERVAL_MS, "recipe": args.recipe,
              "samples": str(SAMPLES.relative_to(ROOT)), "model": "nuclei-light", "calibration_tiles": args.tiles}
    try:
        wizard.state.out_dir = root / "run"
        set_up_wizard(wizard, args.recipe, args.max_drop, args.tiles)
        wizard.state.out_dir = root / "run"
        if not args.no_heartbeat:
            result["run"] = hb = heartbeat_run(wizard, beat)
            print(f"heartbeat during the run ({hb['seconds']:.0f} s, {hb['ticks']} ticks, {hb['progress_signals']} "
                  f"progress signals): p50 {hb['p50_ms']:.1f} ms, p95 {hb['p95_ms']:.1f} ms, p99 {hb['p99_ms']:.1f} "
                  f"ms, max {hb['max_ms']:.1f} ms (target p99 <= 50 ms: {'met' if hb['p99_ms'] <= 50 else 'NOT met'})",
                  flush=True)
        if not args.no_cancel:
            wizard._show(4)  # back on the run page with the same choices
            result["cancel"] = []
            result["cancel_speed_tile"] = CANCEL_SPEED_TILE
            for kind in [k.strip() for k in args.cancel_kinds.split(",") if k.strip()]:
                recipe, index, delay = CANCEL_CASES[kind]
                case = cancel_case(wizard, beat, kind, recipe, index, delay, root)
                result["cancel"].append(case)
                if "cancel_s" in case:
                    print(f"cancel in {kind:9s} ({case['phase_at_cancel'] or '-'}, {case['into_step_s']:.1f} s in): "
                          f"{case['cancel_s']:.2f} s to cancelled ({case['outcome']})", flush=True)
                else:
                    print(f"cancel in {kind}: {case['error']}", flush=True)
    finally:
        result["load_average_end"] = os.getloadavg()
        wizard.shutdown()
        viewer.close()
        shutil.rmtree(root, ignore_errors=True)
        write_result(result, args.out, "gui-heartbeat")
    return 0


if __name__ == "__main__":
    sys.exit(main())
