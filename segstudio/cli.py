"""Command line: ``segstudio segment | eval | models | gui | start | self-test``.

User errors (:class:`SegStudioError`) print one line and exit with code 2;
anything unexpected prints one line pointing to a log file holding the
traceback, and exits with code 3.  Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

from . import __version__
from .core.errors import Cancelled, InputError, OutputError, SegStudioError, naming, write_crash_log
from .core.jobs import Stage
from .core.segment.options import DIAMETER_PX, Diameter, SegmentOptions

EXIT_FAILED = 1  # some inputs failed, the rest were processed
EXIT_USAGE = 2  # bad input or options
EXIT_BUG = 3  # unexpected error


def _err(msg: str) -> None:
    print(f"segstudio: error: {msg}", file=sys.stderr)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``segstudio: error: ...``, exit code 2), like every other error."""

    def error(self, message: str):
        print(f"segstudio: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


# ----------------------------------------------------------------------------- option types
# Every option is checked when the command line is parsed, with its allowed range in the message.


def _bounds(lo, hi) -> str:
    return f"from {lo:g} to {hi:g}" if hi is not None else f"at least {lo:g}"


def _int_opt(lo: int, hi: int | None = None):
    """An argparse type: a whole number in ``[lo, hi]``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number {_bounds(lo, hi)}, not {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {_bounds(lo, hi)}, not {value}")
        return value

    return parse


def _float_opt(lo: float, hi: float | None = None, *, above: bool = False):
    """An argparse type: a finite number in ``[lo, hi]`` (``(lo, hi]`` with ``above``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        low_ok = value > lo if above else value >= lo
        if not (math.isfinite(value) and low_ok and (hi is None or value <= hi)):
            what = f"above {lo:g}" + (f" and at most {hi:g}" if hi is not None else "") if above else _bounds(lo, hi)
            raise argparse.ArgumentTypeError(f"must be a number {what}, not {text!r}")
        return value

    return parse


def _diameter(value: str):
    """``--diameter``: auto (estimate), native (no resampling), a size in pixels, or in micrometres (``12um``)."""
    try:
        return Diameter.parse(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _segment_options(args):
    """The :class:`~segstudio.core.segment.options.SegmentOptions` the command line asked for."""
    return SegmentOptions(channel=args.channel, tile=args.tile, batch_size=getattr(args, "batch_size", None),
                          diameter=args.diameter, tta=args.tta)


def _channel(value: str):
    if value == "mean":
        return value
    try:
        index = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a channel index (0, 1, ...) or 'mean', not {value!r}") from None
    if index < 0:
        raise argparse.ArgumentTypeError(f"must be a channel index (0, 1, ...) or 'mean', not {value!r}")
    return index


def _normalization(value: str):
    """``--normalize``: ``percentile[:LOW,HIGH]``, ``meanstd`` or ``none``."""
    from .core.models.spec import Normalization

    mode, sep, rest = value.strip().partition(":")
    usage = f"must be percentile[:LOW,HIGH] (0 <= LOW < HIGH <= 100), meanstd or none, not {value!r}"
    if mode in ("meanstd", "none") and not sep:
        return Normalization(mode=mode)
    if mode != "percentile":
        raise argparse.ArgumentTypeError(usage)
    if not sep:
        return Normalization()
    lo, comma, hi = rest.partition(",")
    try:
        low, high = float(lo), float(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(usage) from None
    if not comma or not (math.isfinite(low) and math.isfinite(high) and 0 <= low < high <= 100):
        raise argparse.ArgumentTypeError(usage)
    return Normalization(low=low, high=high)


# ----------------------------------------------------------------------------- helpers


def expand_inputs(paths: list[str], pattern: str | None = None) -> list[Path]:
    """Files named on the command line, and the image files inside named folders."""
    from .core.image.io import IMAGE_SUFFIXES

    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir() and p.suffix.lower() == ".zarr":
            files.append(p)  # a zarr store is one image
        elif p.is_dir():
            found = sorted(
                f for f in (p.glob(pattern) if pattern else p.iterdir())
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
            )
            if not found:
                raise InputError(f"{p}: no image files in this folder", hint="segstudio reads .tif, .tiff, .png, .jpg, .npy")
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    return files


class _Bar:
    """A tqdm progress bar fed by Progress events (quiet when stderr is not a terminal)."""

    def __init__(self, desc: str, total: int, quiet: bool):
        from tqdm import tqdm

        # disable=None: no bar when stderr is not a terminal (logs, pipes, tests)
        self.bar = tqdm(total=total, desc=desc, unit="img", disable=True if quiet else None, file=sys.stderr)

    def update(self, event) -> None:
        if event.stage in ("network", "eval_image"):
            self.bar.set_postfix_str(f"{event.stage} {event.done}/{event.total}", refresh=False)

    def step(self, n: int = 1) -> None:
        self.bar.update(n)

    def goto(self, done: int) -> None:
        self.bar.update(max(0, done - self.bar.n))

    def write(self, text: str) -> None:
        self.bar.write(text, file=sys.stdout)

    def close(self) -> None:
        self.bar.close()


def _model_and_backend(args):
    from .core.backends import create_backend
    from .core.models.catalog import get_model

    model = get_model(args.model, trust_code=args.trust_code)
    options = {"tile": getattr(args, "tile", None), "batch_size": getattr(args, "batch_size", None)}
    if args.threads:
        options["threads"] = args.threads
    backend = create_backend(args.backend, model, **options)  # tile and batch: auto's trial, an engine's profile
    return model, backend


# ----------------------------------------------------------------------------- commands


def output_stems(files: list[Path], out: Path) -> list[str]:
    """The output name of each input (``<stem>_labels.tif``, ``<stem>_cells.csv``); refuses names that collide.

    Two inputs with one stem (``a/img.tif``, ``b/img.tif``, or ``img.tif``
    and ``img.png``) would write one pair of outputs: the first would be
    lost.  An output that would replace one of the inputs is refused too.
    """
    from .core.image.io import check_output_file, check_replaceable, image_stem, safe_stem

    fold = str.casefold if sys.platform in ("win32", "darwin") else (lambda t: t)  # case-insensitive file systems
    seen: dict[str, Path] = {}
    inputs = {p.resolve() for p in files}
    stems = []
    for path in files:
        stem = safe_stem(image_stem(path))
        if fold(stem) in seen:
            raise InputError(f"{seen[fold(stem)]} and {path} would both be written as {out / stem}_labels.tif",
                             hint="segment them into separate --out folders, or use `segstudio batch`, "
                             "which mirrors the input folders")
        seen[fold(stem)] = path
        for suffix in ("_labels.tif", "_cells.csv"):
            target = out / f"{stem}{suffix}"
            if target.resolve() in inputs:
                raise InputError(f"{path}: its output {target} is one of the inputs", hint="choose another --out")
            check_replaceable(check_output_file(target))
        stems.append(stem)
    return stems


def cmd_segment(args) -> int:
    from .core.image.io import ensure_folder
    from .core.image.sources import open_source
    from .core.jobs import run_sync
    from .core.segment.job import segment_to_files, warm_up

    files = list(dict.fromkeys(expand_inputs(args.paths, args.pattern)))  # a file named twice is done once
    out = Path(args.out)
    stems = output_stems(files, out)
    ensure_folder(out)
    opened = {}
    if len(files) == 1:  # a bad single input is reported at once, not after the model has loaded
        opened[files[0]] = open_source(files[0])
    backend = None
    try:
        model, backend = _model_and_backend(args)
        warm = warm_up(model, backend, tile=args.tile, batch_size=args.batch_size)
    except BaseException:
        for source in opened.values():
            source.close()
        if backend is not None:
            backend.close()
        raise
    print(f"model {model.name} v{model.spec.version} on {backend.describe()} (ready in {warm:.1f} s)")
    bar = _Bar("segment", len(files), args.quiet)
    failures, rows = [], []
    try:
        for path, stem in zip(files, stems):
            t0 = time.perf_counter()

            def on_progress(event, name=path.name):
                if event.stage is Stage.NOTICE and event.info.get("warning"):
                    bar.bar.write(f"segstudio: warning: {name}: {event.message}", file=sys.stderr)
                elif event.stage is Stage.NOTICE and not args.quiet:
                    bar.write(f"{name}: {event.message}")
                else:
                    bar.update(event)

            try:
                with opened.pop(path, None) or open_source(path) as source:
                    result = run_sync(
                        segment_to_files(source, model, backend, out / f"{stem}_labels.tif", out / f"{stem}_cells.csv",
                                         _segment_options(args)),
                        on_progress,
                    )
                rows.append((path.name, result.n_cells, time.perf_counter() - t0, result.timings))
            except SegStudioError as e:
                if isinstance(e, OutputError) and e.fatal:  # a full disk: the next images would fail the same way
                    raise
                e = naming(e, path)
                failures.append((path, str(e)))
                bar.bar.write(f"segstudio: error: {e}", file=sys.stderr)
            bar.step()
    finally:
        bar.close()
        backend.close()
    for name, n, dt, timings in rows:
        split = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in timings.items() if k != "wall")
        print(f"{name}: {n} cells in {dt:.2f} s ({split})")
    if rows:
        print(f"wrote labels and measurements for {len(rows)} image(s) to {out}")
    if failures:
        if len(files) > 1:
            print(f"{len(failures)} of {len(files)} image(s) failed", file=sys.stderr)
        return EXIT_FAILED if rows else EXIT_USAGE
    return 0


def cmd_batch(args) -> int:
    import signal

    from .core.jobs import CancelToken, run_sync
    from .core.models.catalog import get_model
    from .core.tasks.batch import Compute, FileSelection, batch_job, check_folders

    check_folders(args.in_dir, args.out)  # before the model loads
    cancel = CancelToken()
    distributed = args.workers > 1 or args.scheduler
    backend = None
    if not distributed:
        model, backend = _model_and_backend(args)
        print(f"model {model.name} v{model.spec.version} on {backend.describe()}")
    else:
        model = get_model(args.model, trust_code=args.trust_code)  # each Dask worker creates its own backend
        print(f"model {model.name} v{model.spec.version}, backend {args.backend} on "
              + (f"the Dask cluster at {args.scheduler}" if args.scheduler else f"{args.workers} local Dask workers"))
    bar = None

    def on_progress(event):
        nonlocal bar
        if event.stage is Stage.NOTICE and event.info.get("warning"):
            print(f"segstudio: warning: {event.message}", file=sys.stderr)
        if event.stage is not Stage.BATCH:
            return
        if bar is None:
            bar = _Bar("batch", event.total, args.quiet)
        bar.goto(event.done)
        status = event.info.get("status")
        if status == "failed":
            bar.bar.write(f"failed: {event.message}", file=sys.stderr)
        elif event.info.get("eta_s") is not None:
            bar.bar.set_postfix_str(event.message[-40:], refresh=False)
        elif "files" in event.info or not status:
            bar.bar.write(event.message, file=sys.stdout)

    def on_sigint(*_):
        if cancel.cancelled:
            raise KeyboardInterrupt
        cancel.cancel()
        print("\nstopping after the current image (Ctrl-C again to stop at once)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        report = run_sync(
            batch_job(args.in_dir, args.out, model,
                      Compute(args.backend, backend, workers=args.workers, scheduler=args.scheduler,
                              threads=args.threads),
                      _segment_options(args),
                      files=FileSelection(args.pattern, args.recursive, retry_failed=not args.no_retry),
                      cancel=cancel),
            on_progress,
        )
    except Cancelled as e:
        _err(f"{e} (summary in {Path(args.out) / 'batch_summary.csv'})")
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
        if bar is not None:
            bar.close()
        if backend is not None:
            backend.close()
    c = report.counts
    print(f"{c.get('done', 0)} done, {c.get('failed', 0)} failed, {c.get('skipped', 0)} skipped "
          f"({report.processed} processed in this run, {report.seconds:.1f} s); "
          f"summary: {report.out_dir / 'batch_summary.csv'}")
    for r in report.failed:
        print(f"  failed: {r['file']}: {r['reason']}", file=sys.stderr)
    return EXIT_FAILED if report.failed else 0


def cmd_eval(args) -> int:
    from .core.image.io import atomic_path, check_output_file
    from .core.jobs import run_sync
    from .core.tasks.evaluate import evaluate_job
    from .core.training.datasets import find_pairs

    pairs = find_pairs(args.images, args.labels or args.images, kind=args.kind)
    for target in (args.json, args.worst_png):
        if target:
            check_output_file(target)  # before the work, not after it
    model, backend = _model_and_backend(args)
    print(f"model {model.name} v{model.spec.version} on {backend.describe()}; {len(pairs)} image(s)")
    bar = _Bar("eval", len(pairs), args.quiet)

    def on_progress(event):
        if event.stage is Stage.EVAL and event.done:
            bar.step()

    try:
        report = run_sync(evaluate_job(pairs, model, backend, _segment_options(args),
                                       keep_worst=args.worst, by_size=args.by_size),
                         on_progress)
    finally:
        bar.close()
        backend.close()
    worst = report.pop("worst", [])
    report["model"] = model.name
    report["backend"] = backend.describe()
    if not args.quiet:
        print(f"{'image':<24} {'AP50':>6} {'AP75':>6} {'F1':>6} {'Dice':>6} {'true':>5} {'pred':>5}")
        for r in report["images"]:
            print(f"{r['name']:<24} {r['ap50']:6.3f} {r['ap75']:6.3f} {r['f1']:6.3f} {r['dice']:6.3f} "
                  f"{r['n_true']:5d} {r['n_pred']:5d}")
    m = report["mean"]
    print(f"mean over {len(pairs)} image(s): AP50 {m['ap50']:.4f}  AP75 {m['ap75']:.4f}  F1 {m['f1']:.4f}  "
          f"Dice {m['dice']:.4f}  PQ {m['pq']:.4f}")
    if report.get("by_size"):
        print("by nucleus diameter (true objects pooled over the images; AP50 = TP / (TP + FP + FN)):")
        print(f"{'diameter px':>12} {'true':>6} {'TP':>6} {'FP':>6} {'FN':>6} {'AP50':>6} {'recall':>6}")
        for r in report["by_size"]:
            print(f"{r['diameter_px']:>12} {r['n_true']:6d} {r['tp']:6d} {r['fp']:6d} {r['fn']:6d} "
                  f"{r['ap50']:6.3f} {r['recall']:6.3f}")
    if worst:
        print("worst images: " + ", ".join(f"{name} ({ap:.3f})" for ap, name, *_ in worst))
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    png = args.worst_png or (str(Path(args.json).with_suffix("")) + "_worst.png" if args.json else None)
    if worst and png:
        from .core.tasks.evaluate import worst_images_png

        worst_images_png(png, worst)
        print(f"wrote {png} (the {len(worst)} lowest-AP50 images: truth green, prediction magenta)")
    return 0


class _BenchProgress:
    """``segstudio bench``'s progress: a tqdm bar when stdout is a terminal, else plain lines.

    Plain lines (logs, pipes, CI): each setup step, the estimate before the
    rounds, then one line per variant per round, throttled to one every
    ``throttle_s`` seconds after the first round (the first round's and the
    last line always show).
    """

    def __init__(self, quiet: bool, *, tty: bool | None = None, throttle_s: float = 10.0):
        self.quiet = quiet
        self.tty = (sys.stdout.isatty() and sys.stderr.isatty()) if tty is None else tty
        self.throttle_s = throttle_s
        self.bar = None
        self._last = -math.inf

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def __call__(self, event) -> None:
        from .core.optimize.estimate import format_seconds

        if self.quiet:
            return
        if event.stage is Stage.ESTIMATE:
            self._line(f"bench: {event.message}")
            if self.tty:
                from tqdm import tqdm

                self.bar = tqdm(total=event.info.get("steps", 0), desc="bench", unit="step", file=sys.stderr,
                                # our ETA (from the estimate), not tqdm's rate: rounds differ by variant
                                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
            return
        if event.stage is not Stage.BENCH:
            return
        info = event.info
        if not event.total:  # setup
            self._line(f"bench: {event.message}")
            return
        left = info.get("eta_s")
        eta = f", about {format_seconds(left)} left" if left else ""
        if self.bar is not None:
            self.bar.update(event.done - self.bar.n)
            self.bar.set_postfix_str(f"{event.message}: {info.get('seconds', 0):.1f} s{eta}", refresh=True)
            return
        now = time.monotonic()
        if info.get("round") == 1 or event.done == event.total or now - self._last >= self.throttle_s:
            self._last = now
            self._line(f"bench {event.done}/{event.total}: {event.message} took {info.get('seconds', 0):.1f} s{eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_bench(args) -> int:
    from .core.backends import runnable_variants
    from .core.image.io import atomic_path, check_output_file
    from .core.jobs import run_sync
    from .core.models.catalog import get_model
    from .core.optimize.estimate import format_seconds
    from .core.tasks.benchmark import QUICK_NOTE, BenchOptions, bench_job, write_chart

    for target in (args.json, args.png):
        if target:
            check_output_file(target)  # before the work, not after it
    model = get_model(args.model, trust_code=args.trust_code)
    variants = [v for v in args.backends.split(",") if v] if args.backends else runnable_variants(model)
    progress = _BenchProgress(args.quiet)
    t0 = time.perf_counter()
    try:
        report = run_sync(
            bench_job(model, args.image, variants,
                      BenchOptions(repeats=args.repeats, warmup=args.warmup, tile=args.tile,
                                   batch_size=args.batch_size, e2e=not args.no_e2e, quick=args.quick)),
            progress,
        )
    finally:
        progress.close()
    report["command"] = "segstudio " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("segstudio") else None
    if not args.quiet:
        print(f"bench: done in {format_seconds(time.perf_counter() - t0)} "
              f"(the rounds were estimated at {format_seconds(report['estimate']['seconds'])})")
    print(f"{'variant':<34} {'net Mpx/s':>9} {'e2e Mpx/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'RSS MB':>7} "
          f"{'GPU MB':>7} {'roofline':>8} {'post %':>6}")
    for r in report["variants"]:
        e2e = f"{r['e2e_mpix_s']:9.3f}" if r["e2e_mpix_s"] else f"{'-':>9}"
        gpu = f"{r['peak_gpu_mb']:7.0f}" if r["peak_gpu_mb"] is not None else f"{'-':>7}"
        share = f"{100 * r['post_share']:5.1f}%" if "post_share" in r else f"{'-':>6}"
        print(f"{r['name']:<34} {r['net_mpix_s']:9.3f} {e2e} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} "
              f"{r['peak_rss_mb']:7.0f} {gpu} {100 * r['roofline']['fraction']:7.1f}% {share}")
    for name, why in report["skipped"].items():
        print(f"skipped {name}: {why}")
    base = report["baseline"]
    if base:
        best_net = max(report["variants"], key=lambda r: r["net_mpix_s"])
        print(f"fastest network: {best_net['name']} at {best_net['net_vs_baseline']:.2f}x the baseline")
        e2e_rows = [r for r in report["variants"] if r.get("e2e_vs_baseline")]
        if e2e_rows:
            best = max(e2e_rows, key=lambda r: r["e2e_mpix_s"])
            print(f"fastest end to end: {best['name']} at {best['e2e_vs_baseline']:.2f}x the baseline")
    if report.get("quick"):
        print(QUICK_NOTE)
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    png = args.png or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    if png:
        try:
            print(f"wrote {write_chart(report, png)}")
        except ImportError:
            print("matplotlib is not installed: no chart", file=sys.stderr)
    return 0


_OPTIMIZE_INPUTS = ("model", "steps", "calib", "calib_kind", "calib_labels", "calib_tiles", "calib_max", "val_images",
                    "val_labels", "val_limit", "kind", "max_drop", "min_speedup", "target", "threads", "speed_tile")


def cmd_optimize(args) -> int:
    from .core.jobs import CancelToken, run_sync
    from .core.models.catalog import get_model
    from .core.optimize.calibration import CalibrationSource
    from .core.optimize.estimate import format_seconds
    from .core.optimize.report import EventKind, OptimizeEvent
    from .core.optimize.runner import OptimizeOptions, optimize_job, read_state
    from .core.optimize.steps import Context, parse_budget, parse_steps
    from .core.optimize.validate import ValidationSet

    if args.resume:
        recorded = read_state(args.resume).get("inputs") or {}
        missing = [k for k in _OPTIMIZE_INPUTS if k not in recorded]
        if missing:
            raise InputError(f"{args.resume}: the run's state does not record {', '.join(missing)}",
                             hint="it was not started by segstudio optimize; run it again with --out")
        for k in _OPTIMIZE_INPUTS:
            setattr(args, k, recorded[k])
        args.budget = recorded.get("budget")  # runs recorded before --budget existed have none
        args.out = args.resume
    elif not args.out:
        raise InputError("give an output folder (--out), or --resume a run's folder")
    model = get_model(args.model, trust_code=args.trust_code)
    steps = parse_steps(args.steps)
    budget = parse_budget(args.budget)
    calib = None
    if args.calib:
        calib = CalibrationSource.from_folder(args.calib, model.spec, kind=args.calib_kind or args.kind,
                                              with_labels=args.calib_labels, n_tiles=args.calib_tiles,
                                              max_images=args.calib_max)
    val_dir = args.val_images or args.calib
    if val_dir is None:
        raise InputError("give validation images (--val-images) or calibration images (--calib)")
    vset = ValidationSet.from_folders(val_dir, args.val_labels, kind=args.kind, limit=args.val_limit)
    ctx = Context(original=model, calib=calib, out_dir=Path(args.out), target=args.target, cancel=CancelToken(),
                  threads=args.threads)
    print(f"{'resuming' if args.resume else 'optimizing'} {model.name}: {', '.join(s.label for s in steps)}; "
          f"{len(vset.images)} validation image(s)"
          f"{' with labels' if vset.has_labels else ' (no labels: agreement with the original)'}"
          + (f"; calibration {len(calib.entries)} image(s)" if calib else ""))
    inputs = {k: getattr(args, k) for k in _OPTIMIZE_INPUTS}
    inputs["budget"] = args.budget
    for k in ("calib", "val_images", "val_labels"):
        if inputs[k]:
            inputs[k] = str(Path(inputs[k]).resolve())
    if Path(str(inputs["model"])).exists():  # a file or folder, not a built-in or imported model's name
        inputs["model"] = str(Path(inputs["model"]).resolve())

    def on_progress(p):
        ev = p.event
        if args.quiet or not isinstance(ev, OptimizeEvent):
            return
        stamp = time.strftime("%H:%M:%S")
        left = f" (about {format_seconds(ev.run_eta_s)} left)" if ev.run_eta_s else ""
        if ev.kind in (EventKind.ESTIMATE, EventKind.BASELINE, EventKind.STEP_STARTED, EventKind.STEP_FINISHED,
                       EventKind.FINISHED):
            print(f"[{stamp}] {ev.message}{left if ev.kind is not EventKind.FINISHED else ''}", flush=True)
        elif ev.kind is EventKind.STEP_PROGRESS and ev.loss is not None and ev.train_step and ev.train_step % 100 == 0:
            print(f"    training step {ev.train_step}: loss {ev.loss:.4f}{left}", flush=True)

    report = run_sync(optimize_job(model, steps, ctx, vset,
                                   OptimizeOptions(max_drop=args.max_drop, min_speedup=args.min_speedup,
                                                   speed_tile=args.speed_tile, resume=bool(args.resume),
                                                   budget=budget),
                                   inputs=inputs),
                      on_progress)
    _print_optimize_summary(report)
    print(f"wrote {Path(args.out) / 'report.json'} and report.html in {report.seconds / 60:.1f} min")
    return 0


def _print_optimize_summary(report) -> None:
    """The run's table: every step's verdict, accuracy, speed, budget used and the models beside it."""
    from .core.optimize.report import StepStatus

    b = report.baseline
    print(f"{'step':<34} {'status':<12} {'AP50':>7} {'change':>8} {'speed-up':>9} {'ms':>8}  backend")
    print(f"{'original':<34} {'':<12} {b.ap50:7.4f} {'':>8} {b.speedup_vs_baseline:8.2f}x "
          f"{b.latency_ms:8.1f}  {b.backend}")
    for r in report.steps:
        if r.measured:
            print(f"{r.name:<34} {r.status.words:<12} {r.ap50:7.4f} {r.ap50_delta:+8.4f} "
                  f"{r.speedup_vs_baseline:8.2f}x {r.latency_ms:8.1f}  {r.backend}")
        else:
            print(f"{r.name:<34} {r.status.words:<12} {r.reason}")
        if r.status is StepStatus.ROLLED_BACK:
            print(f"{'':<34} why: {r.reason}")
        if r.budget_used is not None:
            own = f", its allowance {r.allowance:g}" if r.allowance is not None else ""
            print(f"{'':<34} budget: used {r.budget_used:+.4f} AP50 of --max-drop {report.max_drop:g}{own}")
        for name, c in r.compare.items():
            print(f"{'':<34} {name:<12} AP50 {c['ap50']:.4f}, {c['speedup_vs_baseline']:.2f}x, {c['backend']}")
    f = report.final
    print(f"final: AP50 {f.ap50:.4f} ({f.ap50_delta:+.4f}), {f.speedup_vs_baseline:.2f}x PyTorch eager FP32, "
          f"{f.artifact}")


def cmd_train(args) -> int:
    from .core.jobs import run_sync
    from .core.models.catalog import get_model
    from .core.training.datasets import find_pairs
    from .core.training.finetune import FinetuneConfig, finetune_job

    base = get_model(args.base, trust_code=args.trust_code)
    pairs = find_pairs(args.images, args.labels or args.images, kind=args.kind)
    if args.limit:
        pairs = pairs[: args.limit]
    if len(pairs) < 2:
        raise InputError(f"found {len(pairs)} image / label pair(s) in {args.images}",
                         hint="fine-tuning needs at least two labelled images; labels are matched by file name")
    cfg = FinetuneConfig(steps=args.steps, lr=args.lr, patience=args.patience, val_fraction=args.val_fraction,
                         eval_every=args.eval_every, threads=args.threads)
    print(f"fine-tuning {base.name} v{base.spec.version} on {len(pairs)} labelled image(s) -> {args.out}")
    bar = _Bar("train", cfg.steps, args.quiet)
    t0 = time.perf_counter()

    def on_progress(event):
        if event.stage is Stage.FINETUNE:
            bar.goto(event.done)
            if event.message and not args.quiet and ("AP50" in event.message or "resumed" in event.message):
                bar.write(f"  step {event.done}: {event.message}")

    try:
        result = run_sync(finetune_job(base, pairs, args.out, cfg, name=args.name), on_progress)
    finally:
        bar.close()
    verdict = "improved" if result["improved"] else "no gain: the base weights are kept"
    print(f"validation AP50 {result['best_val_ap50']:.4f} (base {result['base_val_ap50']:.4f}, "
          f"{result['val_images']} held-out image(s)); {verdict}; {time.perf_counter() - t0:.0f} s")
    print(f"wrote {result['card']} and {result['png']}; use it with --model {Path(result['card']).parent}")
    return 0


def cmd_models(args) -> int:
    from .core.backends import runnable_variants
    from .core.models.catalog import builtin_models
    from .core.models.user import ImportHints, import_model, user_models

    if args.action == "import":
        if not args.path:
            raise InputError("segstudio models import needs the model file or package", hint="segstudio models import PATH")
        norm = args.normalize
        hints = ImportHints(representation=args.representation, output_kind=args.output_kind,
                            diameter=args.diameter, normalization=norm)
        model = import_model(args.path, name=args.name, hints=hints, overwrite=args.overwrite,
                             trust_code=args.trust_code)
        print(model.spec.card())
        print(f"imported as {model.name!r} ({model.card_path}); use it with --model {model.name}")
        return 0
    for model in builtin_models() + user_models():
        print(model.spec.card())
        print(f"  files: {', '.join(f'{k}: {v.name}' for k, v in model.files.items())}")
        print(f"  backends here: {', '.join(runnable_variants(model)) or 'none installed'}")
        print()
    return 0


def has_display() -> bool:
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def cmd_gui(args) -> int:
    if not has_display():
        raise SegStudioError("no display to open a window on", hint="run `segstudio start` to segment the sample without one")
    from .app.main_window import run_app

    return run_app([Path(p) for p in args.paths], show_sample=not args.paths)


def sample_folder() -> Path:
    from .sample_data import SAMPLE_DIR

    return SAMPLE_DIR


def cmd_start(args) -> int:
    """Open the app on the sample; with no display, segment the sample from the CLI."""
    if has_display() and not args.no_gui:
        try:
            import napari  # noqa: F401
        except ImportError:
            print("napari is not installed: segmenting the sample from the command line instead", file=sys.stderr)
        else:
            args.paths = []
            return cmd_gui(args)
    else:
        print("no display: segmenting the bundled sample from the command line", file=sys.stderr)
    sample = sample_folder()
    images = sorted(str(p) for p in sample.glob("*_img.tif"))
    # the same commands a user would type (every other option at its default)
    parser = build_parser()
    code = cmd_segment(parser.parse_args(["segment", *images, "--out", str(args.out)] + (["-q"] if args.quiet else [])))
    if code == 0:
        print("accuracy against the sample's ground truth:")
        code = cmd_eval(parser.parse_args(["eval", "--images", str(sample), "--worst", "0", "-q"]))
    return code


def cmd_self_test(args) -> int:
    """Segment the sample with every installed backend and check the accuracy (``--gui``: through the window)."""
    if args.gui:
        return _gui_self_test(args)
    from .core.backends import create_backend, runnable_variants
    from .core.jobs import run_sync
    from .core.models.catalog import get_model
    from .core.tasks.evaluate import evaluate_job
    from .core.training.datasets import find_pairs

    model = get_model("nuclei")
    pairs = find_pairs(sample_folder(), sample_folder())
    names = runnable_variants(model)
    if not names:
        raise SegStudioError("no inference backend installed", hint="pip install segstudio[onnx]")
    ok = True
    for name in names:
        with create_backend(name, model) as backend:
            report = run_sync(evaluate_job(pairs, model, backend))
        ap = report["mean"]["ap50"]
        passed = ap >= args.min_ap50
        ok &= passed
        print(f"{'PASS' if passed else 'FAIL'} {backend.describe()}: mean AP50 {ap:.3f} on {len(pairs)} sample images")
    return 0 if ok else EXIT_FAILED


def _gui_self_test(args) -> int:
    if not has_display():
        raise SegStudioError("self-test --gui needs a display", hint="run it under Xvfb: xvfb-run segstudio self-test --gui")
    from .app.self_test import run_gui_self_test

    result = run_gui_self_test(Path(args.screenshot) if args.screenshot else None, min_ap50=args.min_ap50)
    print(f"PASS window: shown {result.window_shown_s:.1f} s after start, the sample in it at {result.sample_shown_s:.1f} s; "
          f"the Segment panel found {result.objects} "
          f"objects in {result.first_segmentation_s:.1f} s, AP50 {result.ap50:.3f} on the sample"
          + (f"; screenshot {result.screenshot}" if result.screenshot else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(result.as_dict(), indent=1) + "\n")
    return 0


# ----------------------------------------------------------------------------- parser


def _add_trust_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-code", action="store_true",
                   help="allow a model file that contains code (TorchScript, or a BioImage.IO package with only "
                   "torchscript weights): it is converted to ONNX in a confined process (see the README's threat "
                   "model); without it such files are refused")


def _add_model_opts(p: argparse.ArgumentParser) -> None:
    _add_trust_opt(p)
    p.add_argument("--model", default="nuclei", help="built-in model name or model card path (default: nuclei)")
    p.add_argument("--backend", default="auto", help="auto, torch or onnxruntime (default: auto)")
    p.add_argument("--channel", type=_channel, default=None, help="channel index for one-channel models, or 'mean'")
    p.add_argument("--tile", type=_int_opt(32, 8192), default=512, help="tile size in pixels, 32 to 8192 (default: 512)")
    p.add_argument("--diameter", type=_diameter, default="auto",
                   help="nuclei diameter: auto (estimate it, default), native (no resampling), pixels (e.g. 24) "
                   "or micrometres (e.g. 9um, with the pixel size the file records)")
    p.add_argument("--tta", action="store_true",
                   help="average the network over four flips of each tile: 4x its time, a little more accurate")
    p.add_argument("--threads", type=_int_opt(0, 1024), default=0, help="CPU threads (default 0: all)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar or per-image lines")


def _add_metrics_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics", default=None, metavar="FILE.jsonl",
                   help="write the run's metrics (per network batch, per image's stages, memory and CPU 10 times a "
                        "second) here as JSON lines")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="segstudio", description="Fast microscopy segmentation.")
    parser.add_argument("--version", action="version", version=f"segstudio {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_segment_command(sub)
    _add_batch_command(sub)
    _add_eval_command(sub)
    _add_bench_command(sub)
    _add_optimize_command(sub)
    _add_train_command(sub)
    _add_models_command(sub)
    _add_gui_command(sub)
    _add_start_command(sub)
    _add_self_test_command(sub)
    return parser


def _add_segment_command(sub) -> None:
    """``segstudio segment``'s arguments."""
    p = sub.add_parser("segment", help="segment images: labels (.tif) and measurements (.csv) per image")
    p.add_argument("paths", nargs="+", help="image files or folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--pattern", default=None, help="glob for files inside folders (default: all images)")
    p.add_argument("--batch-size", type=_int_opt(1, 256), default=None,
                   help="tiles per network call (default: 4 on a CPU, 16 on a GPU)")
    _add_model_opts(p)
    _add_metrics_opt(p)
    p.set_defaults(func=cmd_segment)


def _add_batch_command(sub) -> None:
    """``segstudio batch``'s arguments."""
    p = sub.add_parser("batch", help="segment every image of a folder (resumable; one machine or a Dask cluster)")
    p.add_argument("in_dir", help="folder of images (never modified)")
    p.add_argument("--out", required=True, help="output folder: the input tree mirrored, batch_summary.csv")
    p.add_argument("--pattern", default=None, help='glob for files, e.g. "*.tif" (default: every file)')
    p.add_argument("--recursive", action="store_true", help="also the files in sub-folders")
    p.add_argument("--workers", type=_int_opt(1, 1024), default=1,
                   help="N > 1: a local Dask cluster of N process workers (default 1: this process)")
    p.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler (tcp://host:port)")
    p.add_argument("--no-retry", action="store_true", help="do not try again the files that failed before")
    _add_model_opts(p)
    _add_metrics_opt(p)
    p.set_defaults(func=cmd_batch)


def _add_eval_command(sub) -> None:
    """``segstudio eval``'s arguments."""
    p = sub.add_parser("eval", help="accuracy against ground-truth labels (AP50, AP75, F1, Dice)")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--labels", default=None, help="folder of label images (default: the images folder)")
    p.add_argument("--kind", default=None, help="keep only images of this kind in index.json (e.g. fluorescence)")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.add_argument("--by-size", action="store_true",
                   help="also AP50 per nucleus-diameter bin (8, 12, 16, 24, 32, 48, 64, 100 px): where the model fails")
    p.add_argument("--worst", type=_int_opt(0, 100), default=8, help="how many lowest-AP50 images to draw (default 8; 0: none)")
    p.add_argument("--worst-png", default=None,
                   help="PNG of the worst images' predictions over the truth (default: next to --json)")
    _add_model_opts(p)
    p.set_defaults(func=cmd_eval)


def _add_bench_command(sub) -> None:
    """``segstudio bench``'s arguments."""
    p = sub.add_parser("bench", help="benchmark backends side by side (and the naive baseline) on one image")
    p.add_argument("--model", default="nuclei")
    p.add_argument("--image", required=True, help="image file (the first plane is used)")
    p.add_argument("--backends", default=None,
                   help="comma-separated variants, e.g. torch:fp32,ort:fp32,openvino,torch@cuda:fp16+graph "
                        "(default: every FP32 variant that runs here)")
    p.add_argument("--repeats", type=_int_opt(1, 1000), default=None,
                   help="measured runs per variant (default 10; 1 with --quick)")
    p.add_argument("--warmup", type=_int_opt(0, 100), default=None,
                   help="warm-up rounds before them (default 2; 0 with --quick), after one warm-up call per variant")
    p.add_argument("--quick", action="store_true",
                   help="a rough ranking in a couple of minutes: one run, one batch of tiles for the network, "
                        "end to end on the central 1024x1024 (noisier numbers)")
    p.add_argument("--tile", type=_int_opt(32, 8192), default=512)
    p.add_argument("--batch-size", type=_int_opt(1, 256), default=4)
    p.add_argument("--no-e2e", action="store_true", help="network only (no end-to-end runs)")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--png", default=None, help="write the chart here (default: next to --json)")
    p.add_argument("--quiet", "-q", action="store_true")
    _add_trust_opt(p)
    _add_metrics_opt(p)
    p.set_defaults(func=cmd_bench)


def _add_optimize_command(sub) -> None:
    """``segstudio optimize``'s arguments."""
    p = sub.add_parser("optimize", help="make a model faster step by step, measuring what each step costs")
    p.add_argument("--model", default="nuclei")
    p.add_argument("--calib", default=None, help="folder of your images (unlabeled) for calibration and distillation")
    p.add_argument("--calib-kind", default=None, help="keep only calibration images of this kind (index.json)")
    p.add_argument("--calib-labels", action="store_true",
                   help="the calibration folder has X_img / X_labels pairs: recovery also fine-tunes on them")
    p.add_argument("--calib-tiles", type=_int_opt(1, 100000), default=64, help="INT8 calibration tiles (default 64)")
    p.add_argument("--calib-max", type=_int_opt(1), default=200, help="at most this many calibration images (default 200)")
    p.add_argument("--val-images", default=None, help="validation images (default: the calibration folder)")
    p.add_argument("--val-labels", default=None, help="their labels (AP50); without, agreement with the original")
    p.add_argument("--val-limit", type=_int_opt(1), default=None, help="use at most this many validation images")
    p.add_argument("--kind", default=None, help="keep only images of this kind (index.json), e.g. fluorescence")
    p.add_argument("--steps", default="prune:0.5,recover,quantize:int8",
                   help="comma-separated: prune[:ratio], recover, distill[:width], sparsify[:ratio], export, "
                        "quantize[:int8|fp16], engine[:fp32|fp16|int8]; options as :key=value")
    p.add_argument("--max-drop", type=_float_opt(0.0, 1.0), default=0.01, help="largest AP50 loss allowed (default 0.01)")
    p.add_argument("--min-speedup", type=_float_opt(0.0, 1000.0), default=1.05,
                   help="a step must make the model at least this many times faster than its parent on this "
                        "machine, or it is rolled back (default 1.05; 0: no speed guardrail)")
    p.add_argument("--budget", default=None, metavar="KIND=AP50,...",
                   help="where to spend --max-drop: per-step allowances by kind (prune, int8, fp16, distill, ...), "
                        "e.g. prune=0.006,int8=0.004; a recovery spends the allowance of the pruning before it "
                        "(and int8's with qat=true)")
    p.add_argument("--target", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--threads", type=_int_opt(0, 1024), default=0)
    p.add_argument("--speed-tile", type=_int_opt(32, 8192), default=512, help="tile size of the latency measurement (default 512)")
    p.add_argument("--out", default=None, help="output folder (artifacts, report.json, report.html)")
    p.add_argument("--resume", default=None, metavar="OUT",
                   help="continue the cancelled or interrupted run in OUT (its steps and images as recorded); "
                        "finished steps are not redone")
    p.add_argument("--quiet", "-q", action="store_true")
    _add_trust_opt(p)
    _add_metrics_opt(p)
    p.set_defaults(func=cmd_optimize)


def _add_train_command(sub) -> None:
    """``segstudio train``'s arguments."""
    p = sub.add_parser("train", help="fine-tune a model on your own labelled images")
    p.add_argument("--from", dest="base", default="nuclei", help="the model to start from (default: nuclei)")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--labels", default=None, help="folder of their label images (default: the images folder)")
    p.add_argument("--kind", default=None, help="keep only images of this kind in index.json")
    p.add_argument("--limit", type=_int_opt(1), default=None, help="use the first N labelled images only")
    p.add_argument("--out", required=True, help="folder of the new model")
    p.add_argument("--name", default=None, help="the new model's name (default: the --out folder's name)")
    p.add_argument("--steps", type=_int_opt(1, 1_000_000), default=300, help="training steps at most (default 300)")
    p.add_argument("--lr", type=_float_opt(0.0, 1.0, above=True), default=3e-4)
    p.add_argument("--eval-every", type=_int_opt(1), default=25, help="validate every N steps (default 25)")
    p.add_argument("--patience", type=_int_opt(1), default=4, help="stop after N validations without gain (default 4)")
    p.add_argument("--val-fraction", type=_float_opt(0.0, 0.9, above=True), default=0.2, help="share of images held out (at least one)")
    p.add_argument("--threads", type=_int_opt(0, 1024), default=0)
    p.add_argument("--quiet", "-q", action="store_true")
    _add_trust_opt(p)
    p.set_defaults(func=cmd_train)


def _add_models_command(sub) -> None:
    """``segstudio models``'s arguments."""
    p = sub.add_parser("models", help="list the built-in and imported models; import one of your own")
    p.add_argument("action", nargs="?", choices=["list", "import"], default="list")
    p.add_argument("path", nargs="?", help="import: an ONNX, TorchScript or state-dict file, or a BioImage.IO package")
    p.add_argument("--name", default=None, help="import: the model's name (default: the file name)")
    p.add_argument("--representation", choices=["fg_dist", "fg"], default=None,
                   help="import: output channels are foreground + distance (fg_dist) or foreground only (fg)")
    p.add_argument("--output-kind", choices=["logit", "probability"], default=None,
                   help="import: outputs are logits or probabilities (default: guessed from a trial run)")
    p.add_argument("--diameter", type=_float_opt(*DIAMETER_PX), default=None,
                   help="import: nuclei diameter (px) the model expects")
    p.add_argument("--normalize", type=_normalization, default=None,
                   help="import: input normalization, percentile[:LOW,HIGH] (default 1,99.8), meanstd or none")
    p.add_argument("--overwrite", action="store_true", help="import: replace a model of the same name")
    _add_trust_opt(p)
    p.set_defaults(func=cmd_models)


def _add_gui_command(sub) -> None:
    """``segstudio gui``'s arguments."""
    p = sub.add_parser("gui", help="open the standalone app")
    p.add_argument("paths", nargs="*", help="images to open")
    p.set_defaults(func=cmd_gui)


def _add_start_command(sub) -> None:
    """``segstudio start``'s arguments."""
    p = sub.add_parser("start", help="open the app on the sample (or segment the sample when there is no display)")
    p.add_argument("--out", default="segstudio_output", help="output folder without a display")
    p.add_argument("--no-gui", action="store_true", help="segment the sample from the command line")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_start)


def _add_self_test_command(sub) -> None:
    """``segstudio self-test``'s arguments."""
    p = sub.add_parser("self-test", help="segment the sample with every installed backend and check accuracy")
    # nuclei v2.0 scores a mean AP50 of 0.683 on the four samples (0.746 on the first, which --gui segments) with
    # every backend; a backend that runs wrongly scores near 0
    p.add_argument("--min-ap50", type=_float_opt(0.0, 1.0), default=0.65,
                   help="the accuracy every backend must reach on the sample (default 0.65)")
    p.add_argument("--gui", action="store_true",
                   help="instead, open the window on the sample, segment it through the Segment panel, check and close")
    p.add_argument("--screenshot", default=None, metavar="PNG", help="with --gui: save the window here")
    p.add_argument("--json", default=None, metavar="FILE", help="with --gui: the timings (start to window, first "
                   "segmentation) and the accuracy as JSON")
    p.set_defaults(func=cmd_self_test)


def _run_command(args) -> int:
    """The command, its metrics events written to ``--metrics`` as JSON lines when asked (one run per command)."""
    path = getattr(args, "metrics", None)
    if path is None:
        return args.func(args)
    from .core import metrics

    name = (", ".join(str(p) for p in getattr(args, "paths", [])) or getattr(args, "in_dir", None)
            or getattr(args, "image", None) or args.model)
    with metrics.recording(path), metrics.run_scope(args.command, str(name)):
        return args.func(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run_command(args)
    except SegStudioError as e:
        _err(str(e))
        return EXIT_USAGE
    except (Cancelled, KeyboardInterrupt):
        out = getattr(args, "resume", None) or getattr(args, "out", None)
        if args.func is cmd_optimize and out and (Path(out) / "state.json").is_file():
            _err(f"cancelled; the finished steps are kept: segstudio optimize --resume {out} goes on from there")
        else:
            _err("cancelled")
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that reports bugs
        try:
            where = f"details in {write_crash_log(''.join(traceback.format_exception(e)))}"
        except OSError:
            where = "the crash log could not be written"
        _err(f"unexpected error: {type(e).__name__}: {e} (this is a bug; {where})")
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
