"""Running optimization steps with a guardrail, and reporting what each cost and bought.

:func:`optimize_job` measures the original model (accuracy on the
validation images, latency on its fastest backend, and PyTorch eager FP32
latency as the speed reference, all in this run), then runs the steps in
order.  After each step the child is validated against its parent
(:mod:`.validate`).  The **guardrail**: when the child's AP50 is more than
``max_drop`` below the original's, the step is rolled back (the next step
starts again from the parent) and the report says why.  A pruning step is
judged after the recovery that follows it: pruned and not yet recovered, a
network is expected to be worse, and rolling it back before recovery would
make pruning impossible.  Without labels, "AP50" is the agreement with the
original model's instances (AP50 of one against the other), so the original
scores 1.

Each step is timed when it runs (which picks its backend), and at the end
the original (eager and on its backend) and every step's model are timed
again round-robin in one loop: the report's speed-ups come from that
interleaved measurement, so they compare like with like on a shared,
noisy machine.

The report (``report.json``, and ``report.html``, self-contained, with a
speed-versus-accuracy chart) has one row per step.
"""

from __future__ import annotations

import html
import json
import shutil
import time
from pathlib import Path

import numpy as np

from ..errors import SegStudioError
from ..jobs import Job, Progress
from ..models.catalog import Model
from .steps import Context, Step
from .validate import ValidationSet, agreement, eager_baseline_ms, measure_artifact, public


PENDING = "judged after the recovery step that follows"


def _metric(meas: dict, labelled: bool) -> float:
    return meas["ap50"] if labelled else meas["agreement_original"]


def optimize_job(model: Model, steps: list[Step], ctx: Context, vset: ValidationSet, *,
                 max_drop: float = 0.01, speed_tile: int = 512) -> Job[dict]:
    t_start = time.perf_counter()
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labelled = vset.has_labels
    batch = vset.speed_batch(model, tile=speed_tile)
    yield Progress("optimize", 0, len(steps), "measuring the original model")
    eager_ms = eager_baseline_ms(model, batch)
    base = yield from measure_artifact(model, vset, batch, target=ctx.target, cancel=ctx.cancel)
    base["agreement_original"] = 1.0
    original_pred = base["_pred"]
    base_metric = _metric(base, labelled)

    def row_for(meas: dict) -> dict:
        return {
            "ap50": _metric(meas, labelled),
            "latency_ms": meas["latency_ms"],
            "speedup_vs_baseline": eager_ms / meas["latency_ms"],
            "size_mb": meas["size_mb"],
            "params": meas["params"],
            "gflops_per_tile": meas["gflops_per_tile"],
            "variant": meas["variant"],
            "latency_by_backend_ms": meas["latency_by_backend_ms"],
        }

    report = {
        "model": model.name,
        "baseline": {**row_for(base), "eager_fp32_ms": eager_ms,
                     "dice": base.get("dice"), "count_error": base.get("count_error"),
                     "note": "speedup_vs_baseline = PyTorch eager FP32 latency of the original model / latency, "
                             "both measured in this run on the same batch of real tiles"},
        "validation": {"images": len(vset.images), "labels": labelled,
                       "metric": "AP50 against the labels" if labelled else
                       "AP50 agreement with the original model's instances"},
        "calibration": ctx.calib.describe() if ctx.calib is not None else None,
        "target": ctx.target,
        "max_drop": max_drop,
        "steps": [],
    }
    current, cur_meas = model, base
    before_prune: tuple[Model, dict] | None = None
    pending: list[dict] = []  # rows of pruning steps waiting for their recovery's verdict
    for i, step in enumerate(steps):
        ctx.cancel.raise_if_cancelled()
        # every row has the same keys; what a skipped or failed step did not measure is None
        row = {"name": step.label, "doc": step.doc, "status": None, "ap50": None, "ap50_delta": None,
               "speedup_vs_baseline": None, "latency_ms": None, "size_mb": None, "reason": ""}
        problems = step.check(current, ctx)
        if problems:
            row.update(status="skipped", reason="; ".join(problems))
            report["steps"].append(row)
            yield Progress("optimize", i + 1, len(steps), f"{step.label}: skipped ({row['reason']})")
            continue
        yield Progress("optimize", i, len(steps), f"step {i + 1}/{len(steps)}: {step.label}")
        folder = out / f"{i + 1:02d}-{step.name}"
        t0 = time.perf_counter()
        try:
            child, details = yield from step.run(current, ctx, folder)
        except SegStudioError as e:
            row.update(status="failed", reason=str(e))
            report["steps"].append(row)
            shutil.rmtree(folder, ignore_errors=True)
            if before_prune is not None:  # the pruning this step was to recover goes too
                current, cur_meas = before_prune
                before_prune = None
                _settle_pending(pending, "rolled_back", "its recovery step failed")
            continue
        meas = yield from measure_artifact(child, vset, batch, target=ctx.target, parent=cur_meas, cancel=ctx.cancel)
        meas["agreement_original"] = agreement(meas["_pred"], original_pred)
        metric = _metric(meas, labelled)
        attempts = []
        # accuracy-aware retries (INT8: keep the most sensitive layers in float, one more each time)
        next_is_recovery = i + 1 < len(steps) and steps[i + 1].name == "recover"
        while base_metric - metric > max_drop and not (step.needs_recovery and next_is_recovery):
            attempts.append({"ap50": metric, "details": details})
            retry = yield from step.retry(current, ctx, folder)
            if not retry:
                break
            shutil.rmtree(folder, ignore_errors=True)
            child, details = yield from step.run(current, ctx, folder)
            meas = yield from measure_artifact(child, vset, batch, target=ctx.target, parent=cur_meas,
                                               cancel=ctx.cancel)
            meas["agreement_original"] = agreement(meas["_pred"], original_pred)
            metric = _metric(meas, labelled)
        step_s = time.perf_counter() - t0
        row.update(row_for(meas))
        row.update(
            ap50_delta=metric - _metric(cur_meas, labelled),
            speedup_vs_parent=cur_meas["latency_ms"] / meas["latency_ms"],
            drop_vs_original=base_metric - metric,
            seconds=step_s,
            artifact=str(child.card_path),
            parent=str(current.card_path),
            details=details,
            validation={k: v for k, v in public(meas).items() if k not in row},
        )
        if attempts:
            row["attempts"] = attempts
        if step.needs_recovery and next_is_recovery:
            row.update(status="kept", reason=PENDING)
            pending.append(row)
            before_prune = before_prune or (current, cur_meas)
            current, cur_meas = child, meas
        elif base_metric - metric > max_drop:
            row.update(status="rolled_back",
                       reason=f"AP50 {metric:.4f} is {base_metric - metric:.4f} below the original's "
                              f"{base_metric:.4f}, more than the allowed {max_drop}")
            if before_prune is not None:
                row["reason"] += "; the pruning it was recovering is rolled back too"
                current, cur_meas = before_prune
                _settle_pending(pending, "rolled_back",
                                "its recovery did not bring the accuracy back within the budget")
                before_prune = None
        else:
            drop = base_metric - metric
            row.update(status="kept", reason=(
                f"AP50 {metric:.4f}, {drop:.4f} below the original's, within the allowed {max_drop}" if drop > 0
                else f"AP50 {metric:.4f}, not below the original's {base_metric:.4f}"))
            current, cur_meas = child, meas
            before_prune = None
            _settle_pending(pending, "kept", "kept together with the recovery that followed")
        report["steps"].append(row)
        yield Progress("optimize", i + 1, len(steps), f"{step.label}: {row['status']} (AP50 {metric:.4f}, "
                                                     f"{row['speedup_vs_baseline']:.2f}x)")
    if before_prune is not None:  # the recovery never ran (cancelled steps, skipped): the pruning goes
        current, cur_meas = before_prune
        _settle_pending(pending, "rolled_back", "no recovery step ran after it")
    yield Progress("optimize", len(steps), len(steps), "measuring every model's speed again, interleaved")
    _remeasure_interleaved(report, model, batch, eager_ms)
    cur_row = next((r for r in report["steps"] if r.get("artifact") == str(current.card_path)), None)
    final = out / "final"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(current.card_path.parent, final)
    report["final"] = {
        "artifact": str(final / current.card_path.name),
        "from_step": None if current is model else next(
            (r["name"] for r in reversed(report["steps"]) if r.get("artifact") == str(current.card_path)), None),
        **row_for(cur_meas),
        "ap50_delta": _metric(cur_meas, labelled) - base_metric,
    }
    for key in ("latency_ms", "speedup_vs_baseline"):  # the interleaved measurement
        report["final"][key] = (cur_row or report["baseline"])[key]
    report["seconds"] = time.perf_counter() - t_start
    (out / "report.json").write_text(json.dumps(report, indent=1, default=_json_default))
    (out / "report.html").write_text(render_html(report))
    return report


def _settle_pending(pending: list[dict], status: str, reason: str) -> None:
    """Decide the pruning steps that waited for their recovery."""
    for r in pending:
        r.update(status=status, reason=reason)
    pending.clear()


def _remeasure_interleaved(report: dict, model: Model, batch: np.ndarray, eager_ms: float) -> None:
    """Measure the original (eager and on its backend) and every step's model again, round-robin.

    Each step was timed when it ran, minutes apart on a shared machine;
    the speed-ups in the report come from this one interleaved run, so
    they compare like with like.
    """
    from contextlib import ExitStack

    from ..backends import create_backend
    from ..benchmark import EagerTorch
    from ..models.catalog import load_card
    from .validate import interleaved_latencies

    rows = [r for r in report["steps"] if r.get("artifact") and Path(r["artifact"]).is_file()]
    with ExitStack() as stack:
        runners = [EagerTorch(model, "cpu"), stack.enter_context(create_backend(report["baseline"]["variant"], model))]
        for r in rows:
            runners.append(stack.enter_context(create_backend(r["variant"], load_card(r["artifact"]))))
        stack.callback(runners[0].close)
        times = interleaved_latencies(runners, batch)
    eager = times[0]
    latency = {str(model.card_path): times[1]}
    report["baseline"].update(eager_fp32_ms=eager, latency_ms=times[1], speedup_vs_baseline=eager / times[1],
                              eager_fp32_ms_alone=eager_ms)
    for r, ms in zip(rows, times[2:]):
        latency[r["artifact"]] = ms
        r.update(latency_ms_at_step=r["latency_ms"], latency_ms=ms, speedup_vs_baseline=eager / ms)
    for r in rows:
        if r.get("parent") in latency:
            r["speedup_vs_parent"] = latency[r["parent"]] / r["latency_ms"]


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialize {type(o).__name__}")


# ----------------------------------------------------------------------------- HTML report


def _chart(report: dict) -> str:
    """An inline SVG: speed-up (x) against AP50 (y), one point per step, kept steps joined."""
    pts = [("original", report["baseline"]["speedup_vs_baseline"], report["baseline"]["ap50"], "kept")]
    for r in report["steps"]:
        if r.get("ap50") is not None:
            pts.append((r["name"], r["speedup_vs_baseline"], r["ap50"], r["status"]))
    w, h, m = 640, 380, 56
    xs = [p[1] for p in pts] + [1.0]
    ys = [p[2] for p in pts]
    x0, x1 = 0.0, max(xs) * 1.15
    y_lo = min(min(ys), report["baseline"]["ap50"] - report["max_drop"]) - 0.02
    y0, y1 = max(0.0, y_lo), min(1.0, max(ys) + 0.02)

    def sx(v):
        return m + (v - x0) / (x1 - x0 or 1) * (w - 2 * m)

    def sy(v):
        return h - m - (v - y0) / (y1 - y0 or 1) * (h - 2 * m)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="#444"/>',
             f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="#444"/>',
             f'<text x="{w / 2}" y="{h - 14}" text-anchor="middle">speed-up over PyTorch eager FP32 (x)</text>',
             f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" text-anchor="middle">AP50</text>']
    budget = report["baseline"]["ap50"] - report["max_drop"]
    parts.append(f'<line x1="{m}" y1="{sy(budget):.1f}" x2="{w - m}" y2="{sy(budget):.1f}" stroke="#d33" '
                 f'stroke-dasharray="4 3"/><text x="{w - m}" y="{sy(budget) - 4:.1f}" text-anchor="end" '
                 f'fill="#d33">guardrail: AP50 {budget:.3f}</text>')
    for i in range(6):
        xv = x0 + (x1 - x0) * i / 5
        yv = y0 + (y1 - y0) * i / 5
        parts.append(f'<text x="{sx(xv):.1f}" y="{h - m + 16}" text-anchor="middle">{xv:.1f}</text>')
        parts.append(f'<text x="{m - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.3f}</text>')
    kept = [p for p in pts if p[3] == "kept"]
    if len(kept) > 1:
        path = " ".join(f"{sx(p[1]):.1f},{sy(p[2]):.1f}" for p in kept)
        parts.append(f'<polyline points="{path}" fill="none" stroke="#2f7cf6" stroke-width="1.5"/>')
    colors = {"kept": "#2f7cf6", "rolled_back": "#d33", "failed": "#999"}
    for name, x, y, status in pts:
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="{colors.get(status, "#999")}"/>')
        parts.append(f'<text x="{sx(x) + 8:.1f}" y="{sy(y) - 6:.1f}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: dict) -> str:
    b, f = report["baseline"], report["final"]
    rows = []
    for r in report["steps"]:
        def cell(key, fmt):
            return fmt.format(r[key]) if key in r and r[key] is not None else "-"

        rows.append(
            "<tr>" + "".join(f"<td>{c}</td>" for c in (
                html.escape(r["name"]), html.escape(r["status"]), cell("ap50", "{:.4f}"), cell("ap50_delta", "{:+.4f}"),
                cell("speedup_vs_baseline", "{:.2f}x"), cell("latency_ms", "{:.1f}"), cell("size_mb", "{:.2f}"),
                html.escape(r.get("variant", "-")), html.escape(r.get("reason", "")))) + "</tr>")
    metric = report["validation"]["metric"]
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>segstudio optimization report: {html.escape(report['model'])}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;width:100%;font-size:13px}}td,th{{border:1px solid #ccc;padding:4px 6px;text-align:left}}
th{{background:#f3f5f9}}.kept{{color:#2f7cf6}}</style></head><body>
<h1>Optimizing {html.escape(report['model'])}</h1>
<p>Accuracy: {html.escape(metric)} on {report['validation']['images']} validation image(s).
Speed: latency of a batch of real tiles on the fastest installed backend, against PyTorch eager FP32
({b['eager_fp32_ms']:.1f} ms) measured in the same run. Guardrail: at most {report['max_drop']} AP50 below the
original. Target: {html.escape(report['target'])}.</p>
<p><b>Result:</b> AP50 {f['ap50']:.4f} ({f['ap50_delta']:+.4f}) at {f['speedup_vs_baseline']:.2f}x the speed of
PyTorch eager FP32 ({f['latency_ms']:.1f} ms on {html.escape(f['variant'])}), model file
{html.escape(f['artifact'])}.</p>
{_chart(report)}
<table><tr><th>step</th><th>status</th><th>AP50</th><th>change</th><th>speed-up</th><th>latency ms</th>
<th>size MB</th><th>backend</th><th>why</th></tr>
<tr><td>original</td><td>-</td><td>{b['ap50']:.4f}</td><td></td><td>{b['speedup_vs_baseline']:.2f}x</td>
<td>{b['latency_ms']:.1f}</td><td>{b['size_mb']:.2f}</td><td>{html.escape(b['variant'])}</td><td></td></tr>
{''.join(rows)}</table>
<p>Calibration set: {html.escape(json.dumps({k: v for k, v in (report.get('calibration') or {}).items() if k != 'files'}))}</p>
<p style="color:#777">Written by segstudio in {report['seconds']:.0f} s.</p>
</body></html>
"""
