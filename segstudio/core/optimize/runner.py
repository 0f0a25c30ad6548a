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

A second guardrail is about **speed**: a step that does not make the model
at least ``min_speedup`` times faster than its parent on this machine's best
backend (the two timed round-robin when the step is judged) is rolled back
too, like an accuracy loss; export and sparsify are not judged on speed, and
a recovery is judged against the model before the pruning it recovers.

The report is typed (:class:`~.report.OptimizeReport`, one
:class:`~.report.StepReport` per step); ``report.json`` is its dictionary
and ``report.html`` a self-contained page with a speed-versus-accuracy chart.
Every event the job yields carries an :class:`~.report.OptimizeEvent`
(``Progress.event``): step started, progress and loss, measured points,
step finished, with step and run ETAs from :mod:`.estimate`.

After the original is measured and after every step, ``state.json`` records
where the run is; ``optimize_job(..., resume=True)`` on the same folder (the
CLI: ``segstudio optimize --resume OUT``) continues a cancelled or crashed
run without redoing finished steps.
"""

from __future__ import annotations

import html
import json
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import InputError, SegStudioError
from ..image.io import atomic_path
from ..jobs import Job, Progress, Stage
from ..models.catalog import Model, load_card
from .estimate import EtaTracker, RunEstimate, estimate_job, format_seconds
from .report import EventKind, OptimizeEvent, OptimizeReport, StepReport, StepStatus
from .steps import Context, Step, format_steps
from .validate import ValidationSet, agreement, eager_baseline_ms, interleaved_latencies, measure_artifact, public

PENDING = "judged after the recovery step that follows"
STATE = "state.json"
STATE_VERSION = 1

_PHASES = {"distill": "training", "validate": "validating", "quantize": "quantizing", "prune": "pruning",
           "export": "exporting", "engine": "building the engine", "sparsify": "sparsifying",
           "estimate": "estimating"}


def _metric(meas: dict, labelled: bool) -> float:
    return meas["ap50"] if labelled else meas["agreement_original"]


class _Run:
    """The bookkeeping of one run: events with ETAs, the training losses, pruning rows settled late."""

    def __init__(self, n: int, estimate: RunEstimate | None):
        self.n = n
        self.eta = EtaTracker(estimate, n)
        self.losses: list[tuple[int, float]] = []
        self.settled: list[StepReport] = []  # decided by their recovery's verdict, not yet announced

    def settle(self, pending: list[StepReport], status: StepStatus, reason: str) -> None:
        """Decide the pruning steps that waited for their recovery."""
        for r in pending:
            r.status, r.reason = status, reason
        self.settled.extend(pending)
        pending.clear()

    def announce_settled(self, report: OptimizeReport):
        """Tell the shells about the rows :meth:`settle` decided after their own event."""
        rows, self.settled = self.settled, []
        for r in rows:
            yield self.event(EventKind.STEP_FINISHED, r.index, f"{r.name}: {r.status.words} ({r.reason})",
                             done=r.index + 1, row=replace(r), report=report.copy())

    def event(self, kind: EventKind, step: int | None = None, message: str = "", *, done: int | None = None,
              phase: str = "", inner: float | None = None, training: bool = False, **kw) -> Progress:
        frac, step_eta, run_frac, run_eta = self.eta.etas(inner, training)
        ev = OptimizeEvent(kind, step, self.n, message, phase, fraction=inner if training and inner else frac,
                           run_fraction=run_frac, step_eta_s=step_eta, run_eta_s=run_eta, **kw)
        finished = done if done is not None else (step if step is not None else 0)
        return Progress("optimize", finished, self.n, message, event=ev)

    def relay(self, job, i: int | None):
        """Run an inner job, turning its events into step-progress events (returns its result)."""
        while True:
            try:
                p = next(job)
            except StopIteration as stop:
                return stop.value
            loss = p.info.get("loss") if p.info else None
            training = p.stage is Stage.DISTILL and p.total > 0
            if loss is not None and i is not None:
                self.losses.append((p.done, float(loss)))
            phase = _PHASES.get(p.stage, p.stage)
            yield self.event(EventKind.STEP_PROGRESS, i, p.message or phase, phase=phase,
                             inner=p.fraction, training=training, train_step=p.done if training else None,
                             loss=float(loss) if loss is not None else None)


@dataclass(frozen=True)
class OptimizeOptions:
    """The guardrails and how speed is measured (:func:`optimize_job`).

    ``max_drop``: the AP50 a kept step may lose against the original;
    ``min_speedup``: how much faster than its parent a step must be (0: not
    judged on speed); ``speed_tile``: the tile side latencies are measured
    on; ``resume``: continue the run recorded in the output folder (same
    steps); ``budget``: per-step allowances by kind (``{"prune": 0.006,
    "int8": 0.004}``, :func:`~.steps.parse_budget`): a step whose kinds all
    have one may lose at most their sum against the model it started from
    (a recovery together with the pruning it follows); ``max_drop`` still
    bounds the whole run.
    """

    max_drop: float = 0.01
    min_speedup: float = 1.05
    speed_tile: int = 512
    resume: bool = False
    budget: dict = field(default_factory=dict)


def optimize_job(model: Model, steps: list[Step], ctx: Context, vset: ValidationSet,
                 options: OptimizeOptions | None = None, *, estimate: RunEstimate | None = None,
                 inputs: dict | None = None) -> Job[OptimizeReport]:
    """Run ``steps`` from ``model`` with both guardrails; a job returning the :class:`OptimizeReport`.

    ``estimate``: a :class:`RunEstimate` made before (else one is
    measured); ``inputs``: how the calibration and validation sets were
    given (folders, kinds), recorded in ``state.json`` so the CLI can
    resume from it alone.
    """
    opt = _Optimizer(model, steps, ctx, vset, options or OptimizeOptions(), inputs)
    yield from opt.measure_original(estimate)
    first = 0
    if opt.state is not None:
        first = yield from opt.restore()
    opt.save(first)
    for i in range(first, len(steps)):
        ctx.cancel.raise_if_cancelled()
        yield from opt.step(i)
        opt.save(i + 1)
    return (yield from opt.finish())


class _Optimizer:
    """The state of one :func:`optimize_job`: the report, the current model, pruning waiting for its recovery."""

    def __init__(self, model: Model, steps: list[Step], ctx: Context, vset: ValidationSet, options: OptimizeOptions,
                 inputs: dict | None):
        self.t_start = time.perf_counter()
        self.model, self.steps, self.ctx, self.vset, self.options, self.inputs = model, steps, ctx, vset, options, inputs
        self.out = Path(ctx.out_dir)
        self.state = _read_state(self.out, steps) if options.resume else None
        self.out.mkdir(parents=True, exist_ok=True)
        self.labelled = vset.has_labels
        self.before_prune: tuple[Model, dict] | None = None  # the model before a pruning not yet recovered
        self.pending: list[StepReport] = []  # pruning steps waiting for their recovery's verdict

    def measure_original(self, estimate: RunEstimate | None) -> Job[None]:
        """The estimate (measured unless given), the eager reference and the original model's accuracy and speed."""
        model, ctx, vset, options = self.model, self.ctx, self.vset, self.options
        if estimate is None:
            estimate = yield from _Run(len(self.steps), None).relay(
                estimate_job(model, self.steps, ctx.calib, vset, target=ctx.target, speed_tile=options.speed_tile),
                None)
        run = self.run = _Run(len(self.steps), estimate)
        yield run.event(EventKind.ESTIMATE, None, f"estimated run time: {estimate.describe()}")
        self.batch = vset.speed_batch(model, tile=options.speed_tile)
        yield run.event(EventKind.STEP_PROGRESS, None, "measuring the original model", phase="measuring the original")
        self.eager_ms = eager_baseline_ms(model, self.batch, cancel=ctx.cancel)
        base = yield from run.relay(measure_artifact(model, vset, self.batch, target=ctx.target, cancel=ctx.cancel),
                                    None)
        base["agreement_original"] = 1.0
        self.base, self.original_pred = base, base["_pred"]
        self.base_metric = _metric(base, self.labelled)
        baseline = StepReport(index=-1, name="original", doc=f"{model.name} as it is", status=StepStatus.KEPT,
                              reason="the starting point", artifact=Path(model.card_path) if model.card_path else None,
                              validation={k: v for k, v in public(base).items()
                                          if k in ("dice", "count_error", "ap75", "f1", "batch")},
                              **_measured(base, self.labelled, self.eager_ms))
        self.report = OptimizeReport(
            model=model.name, out_dir=self.out, labelled=self.labelled,
            metric="AP50 against the labels" if self.labelled else "AP50 agreement with the original model's instances",
            images=len(vset.images), max_drop=options.max_drop, min_speedup=options.min_speedup, target=ctx.target,
            eager_fp32_ms=self.eager_ms, baseline=baseline,
            steps=[StepReport(index=i, name=s.label, doc=s.doc) for i, s in enumerate(self.steps)],
            calibration=ctx.calib.describe() if ctx.calib is not None else None, budget=dict(options.budget))
        yield run.event(EventKind.BASELINE, None, f"original: AP50 {self.base_metric:.4f}, "
                        f"{base['latency_ms']:.1f} ms on {base['variant']}", row=replace(baseline),
                        report=self.report.copy())
        self.current, self.cur_meas = model, base

    def restore(self) -> Job[int]:
        """Continue a recorded run: its finished rows, its current model and pruning; returns the steps done."""
        state, report, run = self.state, self.report, self.run
        first = state["done"]
        for i in range(first):
            report.steps[i] = StepReport.from_dict(state["rows"][i])
            run.eta.finish(i, report.steps[i].seconds or 0.0)
        yield run.event(EventKind.STEP_PROGRESS, None, f"resuming after step {first}/{len(self.steps)}",
                        phase="resuming")
        for r in report.steps[:first]:
            yield run.event(EventKind.STEP_FINISHED, r.index, f"{r.name}: {r.status.words} (finished before)",
                            done=r.index + 1, row=replace(r), report=report.copy())
        if state.get("current"):
            self.current = load_card(state["current"])
            self.cur_meas = yield from self._measure(None, self.current, self.base,
                                                     original_scale=bool(state.get("before_prune")))
        if state.get("before_prune"):
            bp = load_card(state["before_prune"]) if state["before_prune"] != "original" else self.model
            bp_meas = self.base if bp is self.model else (yield from self._measure(None, bp, self.base))
            self.before_prune = (bp, bp_meas)
        self.pending = [report.steps[i] for i in state.get("pending", [])]
        return first

    def save(self, done: int, finished: bool = False) -> None:
        """``state.json``: where the run is now."""
        original, report = self.model, self.report

        def card(m: Model | None):
            if m is None:
                return None
            return "original" if m is original else str(m.card_path)

        state = {
            "version": STATE_VERSION, "model": str(original.card_path) if original.card_path else original.name,
            "model_name": original.name, "steps": format_steps(self.steps), "done": done, "finished": finished,
            "rows": [r.to_dict() for r in report.steps[:done]],
            "current": None if self.current is original else card(self.current),
            "before_prune": card(self.before_prune[0]) if self.before_prune is not None else None,
            "pending": [r.index for r in self.pending], "inputs": self.inputs or {},
            "max_drop": self.options.max_drop, "min_speedup": self.options.min_speedup,
            "speed_tile": self.options.speed_tile, "target": report.target, "budget": dict(self.options.budget),
            "seconds": sum(r.seconds or 0.0 for r in report.steps[:done]),
        }
        with atomic_path(self.out / STATE) as tmp:
            tmp.write_text(json.dumps(state, indent=1, default=_json_default))

    def _measure(self, i: int | None, child: Model, parent_meas: dict, *, original_scale: bool = False) -> Job[dict]:
        """Measure ``child``; ``original_scale``: at the nuclei diameters the original estimated (a pruned
        network before its recovery, whose own size estimate may be far off and resample an image 8x)."""
        diameters = self.base["_diameters"] if original_scale else None
        meas = yield from self.run.relay(measure_artifact(child, self.vset, self.batch, target=self.ctx.target,
                                                          parent=parent_meas, cancel=self.ctx.cancel,
                                                          diameters=diameters), i)
        meas["agreement_original"] = agreement(meas["_pred"], self.original_pred)
        return meas

    def _fill(self, row: StepReport, meas: dict) -> None:
        """A row's measured fields: accuracy, speed, size, against the parent and the original."""
        for k, v in _measured(meas, self.labelled, self.eager_ms).items():
            setattr(row, k, v)
        metric = _metric(meas, self.labelled)
        row.ap50_delta = metric - _metric(self.cur_meas, self.labelled)
        row.speedup_vs_parent = self.cur_meas["latency_ms"] / meas["latency_ms"]
        row.drop_vs_original = self.base_metric - metric

    def _point(self, i: int, row: StepReport, step: Step, meas: dict) -> Progress:
        point = replace(row, status=StepStatus.RUNNING)
        self._fill(point, meas)
        point.sensitivity = step.sensitivity()
        return self.run.event(EventKind.STEP_POINT, i, f"{step.label}: AP50 {point.ap50:.4f}, "
                              f"{point.speedup_vs_baseline:.2f}x", row=point)

    def _finished(self, i: int, row: StepReport, message: str) -> Job[None]:
        self.run.eta.finish(i, 0.0 if row.status is StepStatus.SKIPPED else None)
        yield self.run.event(EventKind.STEP_FINISHED, i, message, done=i + 1, row=replace(row),
                             report=self.report.copy())
        yield from self.run.announce_settled(self.report)

    def _roll_back_pruning(self, reason: str) -> None:
        """The pruning a failed or rejected recovery was recovering goes too."""
        if self.before_prune is not None:
            self.current, self.cur_meas = self.before_prune
            self.before_prune = None
            self.run.settle(self.pending, StepStatus.ROLLED_BACK, reason)

    def step(self, i: int) -> Job[None]:
        """Step ``i``: run it (with accuracy-aware retries), measure it, judge it, record the verdict."""
        step, row, run = self.steps[i], self.report.steps[i], self.run
        problems = step.check(self.current, self.ctx)
        if problems:
            row.status, row.reason = StepStatus.SKIPPED, "; ".join(problems)
            yield from self._finished(i, row, f"{step.label}: skipped ({row.reason})")
            return
        run.eta.start(i)
        run.losses = []
        row.status = StepStatus.RUNNING
        yield run.event(EventKind.STEP_STARTED, i, f"step {i + 1}/{len(self.steps)}: {step.label}", row=replace(row))
        folder = self.out / f"{i + 1:02d}-{step.name}"
        if folder.exists():  # a step that was interrupted: it starts again
            shutil.rmtree(folder)
        t0 = time.perf_counter()
        try:
            child, details = yield from run.relay(step.run(self.current, self.ctx, folder), i)
        except SegStudioError as e:
            row.status, row.reason = StepStatus.FAILED, str(e)
            shutil.rmtree(folder, ignore_errors=True)
            self._roll_back_pruning("its recovery step failed")
            yield from self._finished(i, row, f"{step.label}: failed ({e})")
            return
        child, details, meas, attempts = yield from self._with_retries(i, step, row, folder, child, details)
        if details.get("compare"):
            yield from self._compare(i, row, child, meas, details)
        self._fill(row, meas)
        row.seconds = time.perf_counter() - t0
        row.artifact = Path(child.card_path)
        row.parent = Path(self.current.card_path) if self.current.card_path else None
        row.details, row.attempts = details, attempts
        row.sensitivity = step.sensitivity()
        row.loss_curve = tuple(run.losses)
        row.validation = {k: v for k, v in public(meas).items()
                          if k not in ("variant", "latency_ms", "size_mb", "params", "gflops_per_tile",
                                       "latency_by_backend_ms")}
        yield from self._judge(i, step, row, child, meas, details)
        metric = _metric(meas, self.labelled)
        verdict = "measured, judged after its recovery" if row.reason == PENDING else row.status.words
        yield from self._finished(i, row, f"{step.label}: {verdict} (AP50 {metric:.4f})")

    def _compare(self, i: int, row: StepReport, child: Model, meas: dict, details: dict) -> Job[None]:
        """Measure the models a step made beside its child (PTQ beside QAT) and their per-layer INT8 error."""
        row.compare = {"this step": self._summary(child, meas)}
        int8 = {"this step": child.files.get("onnx_int8")}
        for name, card in details["compare"].items():
            if card == "parent":
                other, other_meas = self.current, self.cur_meas
            else:
                other = load_card(card)
                yield self.run.event(EventKind.STEP_PROGRESS, i, f"measuring the {name} model beside it",
                                     phase="validating")
                other_meas = yield from self._measure(i, other, self.cur_meas)
            row.compare[name] = self._summary(other, other_meas)
            int8[name] = other.files.get("onnx_int8")
        float_onnx = details.get("float_onnx")
        if float_onnx and all(int8.values()):
            from .qat import layer_errors

            yield self.run.event(EventKind.STEP_PROGRESS, i, "per-layer INT8 error on validation tiles",
                                 phase="validating")
            row.layer_error = layer_errors(int8, float_onnx, [t[None] for t in self.batch])

    def _summary(self, model: Model, meas: dict) -> dict:
        return {"ap50": _metric(meas, self.labelled), "latency_ms": meas["latency_ms"],
                "speedup_vs_baseline": self.eager_ms / meas["latency_ms"], "backend": meas["variant"],
                "artifact": str(model.card_path) if model.card_path else None}

    def _allowance(self, step: Step) -> float | None:
        """The step's own AP50 allowance (with the pruning it recovers), or None when only max_drop applies."""
        budget = self.options.budget
        keys = list(step.budget_keys()) + [k for r in self.pending for k in self.steps[r.index].budget_keys()]
        if not budget or not keys or any(k not in budget for k in keys):
            return None
        return float(sum(budget[k] for k in dict.fromkeys(keys)))

    def _start(self) -> tuple[Model, dict]:
        """The model the current step is judged against: before the pruning it recovers, else its parent."""
        return self.before_prune or (self.current, self.cur_meas)

    def _over_budget(self, step: Step, meas: dict) -> bool:
        metric = _metric(meas, self.labelled)
        if self.base_metric - metric > self.options.max_drop:
            return True
        allowance = self._allowance(step)
        return allowance is not None and _metric(self._start()[1], self.labelled) - metric > allowance

    def _reject(self, row: StepReport, reason: str, pruning_reason: str) -> None:
        """Roll the step back (and the pruning it was recovering, if any), saying why."""
        row.status, row.reason = StepStatus.ROLLED_BACK, reason
        if self.before_prune is not None:
            row.reason += "; the pruning it was recovering is rolled back too"
        self._roll_back_pruning(pruning_reason)

    def _awaits_recovery(self, i: int, step: Step) -> bool:
        return step.needs_recovery and i + 1 < len(self.steps) and self.steps[i + 1].name == "recover"

    def _with_retries(self, i: int, step: Step, row: StepReport, folder: Path, child: Model, details: dict):
        """Measure the child; while it loses too much, let the step try again (INT8: one more layer in float)."""
        meas = yield from self._measure(i, child, self.cur_meas, original_scale=self._awaits_recovery(i, step))
        yield self._point(i, row, step, meas)
        attempts = []
        while self._over_budget(step, meas) and not self._awaits_recovery(i, step):
            attempts.append({"ap50": _metric(meas, self.labelled), "details": details})
            retry = yield from self.run.relay(step.retry(self.current, self.ctx, folder), i)
            if not retry:
                break
            shutil.rmtree(folder, ignore_errors=True)
            child, details = yield from self.run.relay(step.run(self.current, self.ctx, folder), i)
            meas = yield from self._measure(i, child, self.cur_meas)
            yield self._point(i, row, step, meas)
        return child, details, meas, attempts

    def _judge(self, i: int, step: Step, row: StepReport, child: Model, meas: dict, details: dict) -> Job[None]:
        """The guardrails' verdict on a measured step: kept, rolled back, or waiting for its recovery."""
        metric, base_metric, max_drop = _metric(meas, self.labelled), self.base_metric, self.options.max_drop
        if self._awaits_recovery(i, step):
            row.status, row.reason = StepStatus.KEPT, PENDING
            self.pending.append(row)
            self.before_prune = self._start()
            self.current, self.cur_meas = child, meas
            return
        speed_parent, speed_meas = self._start()
        row.budget_used = _metric(speed_meas, self.labelled) - metric
        row.allowance = allowance = self._allowance(step)
        if base_metric - metric > max_drop:
            self._reject(row, f"AP50 {metric:.4f} is {base_metric - metric:.4f} below the original's "
                         f"{base_metric:.4f}, more than the allowed {max_drop}",
                         "its recovery did not bring the accuracy back within the budget")
            return
        if allowance is not None and row.budget_used > allowance:
            self._reject(row, f"it lost {row.budget_used:.4f} AP50 against the model it started from, more than "
                         f"its allowance of {allowance:g} (--budget)", "its recovery used more than its allowance")
            return
        faster = None
        if step.judged_on_speed and self.options.min_speedup > 0:
            yield self.run.event(EventKind.STEP_PROGRESS, i, "timing it against its parent, round-robin",
                                 phase="timing against the parent")
            faster = _speedup(speed_parent, speed_meas["variant"], child, meas["variant"], self.batch,
                              self.ctx.cancel)
            row.details = {**details, "speedup_vs_parent_at_verdict": faster}
        if faster is not None and faster < self.options.min_speedup:
            self._reject(row, f"not faster on this machine: {faster:.2f}x its parent ({meas['variant']} against "
                         f"{speed_meas['variant']}, timed round-robin), less than the "
                         f"{self.options.min_speedup:.2f}x asked for", "the pruned and recovered model was not faster")
            return
        drop = base_metric - metric
        row.status = StepStatus.KEPT
        row.reason = (f"AP50 {metric:.4f}, {drop:.4f} below the original's, within the allowed {max_drop}"
                      if drop > 0 else f"AP50 {metric:.4f}, not below the original's {base_metric:.4f}")
        if faster is not None:
            row.reason += f"; {faster:.2f}x faster than its parent"
        self.current, self.cur_meas = child, meas
        self.before_prune = None
        self.run.settle(self.pending, StepStatus.KEPT, "kept together with the recovery that followed")

    def finish(self) -> Job[OptimizeReport]:
        """Settle what is left, time every model round-robin, write the final model and the report."""
        run, report, n = self.run, self.report, len(self.steps)
        self._roll_back_pruning("no recovery step ran after it")  # the recovery never ran (skipped or failed)
        yield from run.announce_settled(report)
        yield run.event(EventKind.STEP_PROGRESS, None, "measuring every model's speed again, interleaved",
                        phase="timing every model, round-robin", done=n)
        _remeasure_interleaved(report, self.model, self.batch, self.ctx.cancel)
        yield run.event(EventKind.REMEASURED, None, "speed-ups measured round-robin", done=n, report=report.copy())
        current, final = self.current, self.out / "final"
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(Path(current.card_path).parent, final)
        from_index = next((r.index for r in reversed(report.steps)
                           if r.artifact is not None and current.card_path is not None
                           and Path(r.artifact) == Path(current.card_path)), None) if current is not self.model else None
        source = report.steps[from_index] if from_index is not None else report.baseline
        report.final = replace(source, artifact=final / Path(current.card_path).name,
                               ap50_delta=_metric(self.cur_meas, self.labelled) - self.base_metric)
        report.final_from = from_index
        report.seconds = time.perf_counter() - self.t_start + (self.state.get("seconds", 0.0) if self.state else 0.0)
        with atomic_path(self.out / "report.json") as tmp:
            tmp.write_text(json.dumps(report.to_dict(), indent=1, default=_json_default))
        with atomic_path(self.out / "report.html") as tmp:
            tmp.write_text(render_html(report))
        self.save(n, finished=True)
        yield run.event(EventKind.FINISHED, None, f"done in {format_seconds(report.seconds)}", done=n,
                        report=report.copy())
        return report


def _measured(meas: dict, labelled: bool, eager_ms: float) -> dict:
    """The StepReport fields a measurement fills."""
    return dict(ap50=_metric(meas, labelled), latency_ms=meas["latency_ms"],
                speedup_vs_baseline=eager_ms / meas["latency_ms"], backend=meas["variant"], size_mb=meas["size_mb"],
                params=int(meas["params"]), gflops_per_tile=meas["gflops_per_tile"],
                latency_by_backend_ms=dict(meas["latency_by_backend_ms"]))


def _speedup(parent: Model, parent_variant: str, child: Model, child_variant: str, batch: np.ndarray,
             cancel=None) -> float:
    """How many times faster ``child`` is than ``parent``, each on its best backend, timed round-robin."""
    from ..backends import create_backend

    with ExitStack() as stack:
        runners = [stack.enter_context(create_backend(parent_variant, parent)),
                   stack.enter_context(create_backend(child_variant, child))]
        p_ms, c_ms = interleaved_latencies(runners, batch, repeats=5, warmup=1, cancel=cancel)
    return p_ms / c_ms


# ----------------------------------------------------------------------------- state (resume)


def read_state(out: str | Path) -> dict:
    """The ``state.json`` of a run folder (:class:`InputError` when there is none or it is damaged)."""
    path = Path(out) / STATE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{out} holds no optimization run to resume (no {STATE})") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read it ({e})") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or not isinstance(state.get("rows"), list):
        raise InputError(f"{path} is not a segstudio run state (of this version)")
    return state


def can_resume(out: str | Path) -> str | None:
    """Where a run in ``out`` stopped, in words, when it can be resumed; else ``None``."""
    try:
        state = read_state(out)
    except InputError:
        return None
    if state.get("finished"):
        return None
    n = len([s for s in state["steps"].split(",") if s])
    return f"{state['done']} of {n} step(s) finished ({state['steps']})"


def _read_state(out: Path, steps: list[Step]) -> dict:
    state = read_state(out)
    if state["steps"] != format_steps(steps):
        raise InputError(f"{out} holds a run of other steps ({state['steps']}), not {format_steps(steps)}",
                         hint="resume with the same steps, or choose another output folder")
    if state.get("finished"):
        raise InputError(f"the run in {out} is finished: nothing to resume")
    state["done"] = min(int(state["done"]), len(state["rows"]), len(steps))
    return state


def _remeasure_interleaved(report: OptimizeReport, model: Model, batch: np.ndarray, cancel=None) -> None:
    """Measure the original (eager and on its backend) and every step's model again, round-robin.

    Each step was timed when it ran, minutes apart on a shared machine;
    the speed-ups in the report come from this one interleaved run, so
    they compare like with like.
    """
    from ..backends import create_backend
    from ..backends.eager import EagerTorch

    rows = [r for r in report.steps if r.artifact is not None and Path(r.artifact).is_file() and r.backend]
    known = {str(r.artifact) for r in rows} | {str(model.card_path)}
    extras = list(dict.fromkeys(  # models measured beside a step (PTQ beside QAT) that no row is
        (c["artifact"], c["backend"]) for r in report.steps for c in r.compare.values()
        if c.get("artifact") and c["artifact"] not in known and Path(c["artifact"]).is_file()))
    with ExitStack() as stack:
        runners = [EagerTorch(model, "cpu"), stack.enter_context(create_backend(report.baseline.backend, model))]
        for r in rows:
            runners.append(stack.enter_context(create_backend(r.backend, load_card(r.artifact))))
        for card, backend in extras:
            runners.append(stack.enter_context(create_backend(backend, load_card(card))))
        stack.callback(runners[0].close)
        times = interleaved_latencies(runners, batch, cancel=cancel)
    eager = times[0]
    latency = {str(model.card_path): times[1]}
    latency.update({card: ms for (card, _), ms in zip(extras, times[2 + len(rows):])})
    report.baseline.details = {**report.baseline.details, "eager_fp32_ms_alone": report.eager_fp32_ms}
    report.eager_fp32_ms = eager
    report.baseline.latency_ms, report.baseline.speedup_vs_baseline = times[1], eager / times[1]
    for r, ms in zip(rows, times[2:]):
        latency[str(r.artifact)] = ms
        r.latency_ms_at_step, r.latency_ms, r.speedup_vs_baseline = r.latency_ms, ms, eager / ms
    for r in rows:
        if r.parent is not None and str(r.parent) in latency:
            r.speedup_vs_parent = latency[str(r.parent)] / r.latency_ms
    for r in report.steps:
        for c in r.compare.values():
            if c.get("artifact") in latency:
                c["latency_ms"] = latency[c["artifact"]]
                c["speedup_vs_baseline"] = eager / c["latency_ms"]


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, StepStatus):
        return o.value
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


def _budget_cell(row: dict, max_drop: float) -> str:
    """How much of the run's AP50 budget a step used (and of its own allowance)."""
    used = row.get("budget_used")
    if used is None:
        return ""
    text = f"{used:+.4f} of {max_drop:g}"
    if row.get("allowance") is not None:
        text += f" (allowance {row['allowance']:g})"
    return text


def _compare_html(row: dict) -> str:
    """The models one step made side by side (PTQ beside QAT): accuracy, speed and per-layer INT8 error."""
    names = list(row["compare"])
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    lines = [f"<h2>{html.escape(row['name'])}: {' and '.join(html.escape(n) for n in names)} of the same network</h2>",
             f"<table><tr><th></th>{head}</tr>"]
    for key, label, fmt in (("ap50", "AP50", "{:.4f}"), ("speedup_vs_baseline", "speed-up", "{:.2f}x"),
                            ("latency_ms", "latency ms", "{:.1f}"), ("backend", "backend", "{}")):
        lines.append(f"<tr><td>{label}</td>" + "".join(
            f"<td>{html.escape(fmt.format(row['compare'][n][key]))}</td>" for n in names) + "</tr>")
    lines.append("</table>")
    errors = row.get("layer_error") or {}
    if errors:
        models = [n for n in names if any(n in by for by in errors.values())]
        sub = "".join(f"<th>{html.escape(n)}: vs start</th><th>{html.escape(n)}: vs own float</th>" for n in models)
        lines.append("<p>Per-layer error of the INT8 activations on the validation tiles (mean |INT8 - float| / "
                     "mean |float|): against the float network both started from (QAT also moves away from it on "
                     "purpose, learning from the original model), and against each graph's own weights run in "
                     "float (what quantizing its activations costs). AP50 above is the judge.</p>"
                     f"<table><tr><th>layer</th>{sub}</tr>")
        for layer, by in errors.items():
            cells = "".join(f"<td>{by[n]['vs_start']:.4f}</td><td>{by[n]['vs_own_float']:.4f}</td>" if n in by
                            else "<td>-</td><td>-</td>" for n in models)
            lines.append(f"<tr><td>{html.escape(layer)}</td>{cells}</tr>")
        lines.append("</table>")
    return "".join(lines)


def render_html(report: OptimizeReport | dict) -> str:
    if isinstance(report, OptimizeReport):
        report = json.loads(json.dumps(report.to_dict(), default=_json_default))
    b, f = report["baseline"], report["final"]
    rows = []
    for r in report["steps"]:
        def cell(key, fmt):
            return fmt.format(r[key]) if key in r and r[key] is not None else "-"

        rows.append(
            "<tr>" + "".join(f"<td>{c}</td>" for c in (
                html.escape(r["name"]), html.escape(r["status"]), cell("ap50", "{:.4f}"), cell("ap50_delta", "{:+.4f}"),
                cell("speedup_vs_baseline", "{:.2f}x"), cell("latency_ms", "{:.1f}"), cell("size_mb", "{:.2f}"),
                html.escape(r.get("variant") or "-"), _budget_cell(r, report["max_drop"]),
                html.escape(r.get("reason") or ""))) + "</tr>")
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
<th>size MB</th><th>backend</th><th>budget used</th><th>why</th></tr>
<tr><td>original</td><td>-</td><td>{b['ap50']:.4f}</td><td></td><td>{b['speedup_vs_baseline']:.2f}x</td>
<td>{b['latency_ms']:.1f}</td><td>{b['size_mb']:.2f}</td><td>{html.escape(b['variant'])}</td><td></td><td></td></tr>
{''.join(rows)}</table>
{''.join(_compare_html(r) for r in report["steps"] if r.get("compare"))}
<p>Calibration set: {html.escape(json.dumps({k: v for k, v in (report.get('calibration') or {}).items() if k != 'files'}))}</p>
<p style="color:#777">Written by segstudio in {report['seconds']:.0f} s.</p>
</body></html>
"""
