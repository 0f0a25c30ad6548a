"""What an optimization run reports, as typed objects, and the events it yields while it runs.

:class:`StepReport` is one row (the original model, or a step), and
:class:`OptimizeReport` the whole run; ``report.json`` is
:meth:`OptimizeReport.to_dict` and loads back with :meth:`OptimizeReport.load`.
While it runs, :func:`~segstudio.core.optimize.runner.optimize_job` yields
:class:`~segstudio.core.jobs.Progress` events whose ``event`` is an
:class:`OptimizeEvent`: a typed kind, the step index, progress and ETA,
the training loss, and the row or report it is about.  Shells switch on
:class:`EventKind` and read attributes; none of them parses stage names or
dict keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any

from ..errors import InputError


class StepStatus(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    KEPT = "kept"
    ROLLED_BACK = "rolled_back"
    SKIPPED = "skipped"
    FAILED = "failed"

    @property
    def words(self) -> str:
        return self.value.replace("_", " ")


@dataclass(frozen=True)
class LayerSensitivity:
    """How much INT8 hurts one layer: the output error removed when it stays in float."""

    layer: str
    gain: float
    in_float: bool


@dataclass
class StepReport:
    """One row of the report: the original model (``index == -1``) or a step."""

    index: int
    name: str
    doc: str = ""
    status: StepStatus = StepStatus.WAITING
    reason: str = ""
    ap50: float | None = None
    ap50_delta: float | None = None
    drop_vs_original: float | None = None
    speedup_vs_baseline: float | None = None
    speedup_vs_parent: float | None = None
    latency_ms: float | None = None
    latency_ms_at_step: float | None = None
    backend: str | None = None
    size_mb: float | None = None
    params: int | None = None
    gflops_per_tile: float | None = None
    seconds: float | None = None
    artifact: Path | None = None
    parent: Path | None = None
    sensitivity: tuple[LayerSensitivity, ...] = ()
    loss_curve: tuple[tuple[int, float], ...] = ()
    latency_by_backend_ms: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    attempts: list = field(default_factory=list)
    details: dict = field(default_factory=dict)
    # how much of the accuracy budget this step (with the pruning it recovers) used: AP50 of the model it
    # started from minus its own; and its own allowance (--budget), None when only --max-drop applies
    budget_used: float | None = None
    allowance: float | None = None
    # other models of the same network made by the step, measured beside it: name -> ap50, latency_ms,
    # speedup_vs_baseline, backend, artifact (e.g. "ptq" beside quantization-aware training)
    compare: dict = field(default_factory=dict)
    # per-layer relative error of each INT8 variant against the float network: layer -> name -> error
    layer_error: dict = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        return self.ap50 is not None and self.speedup_vs_baseline is not None

    @property
    def float_layers(self) -> tuple[str, ...]:
        return tuple(s.layer for s in self.sensitivity if s.in_float)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "status":
                v = v.value
            elif f.name == "backend":
                d["variant"] = v  # the name report.json has always used
                continue
            elif isinstance(v, Path):
                v = str(v)
            elif f.name == "sensitivity":
                v = [[s.layer, s.gain, s.in_float] for s in v]
            elif f.name == "loss_curve":
                v = [[int(a), float(b)] for a, b in v]
            d[f.name] = v
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StepReport":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["status"] = StepStatus(d.get("status") or "waiting")
        kw["backend"] = d.get("variant")
        for key in ("artifact", "parent"):
            kw[key] = Path(d[key]) if d.get(key) else None
        kw["sensitivity"] = tuple(LayerSensitivity(str(a), float(b), bool(c)) for a, b, c in d.get("sensitivity") or ())
        kw["loss_curve"] = tuple((int(a), float(b)) for a, b in d.get("loss_curve") or ())
        return cls(**kw)


@dataclass
class OptimizeReport:
    """A whole optimization run: the original, every step, the chosen model."""

    model: str
    out_dir: Path
    labelled: bool
    metric: str
    images: int
    max_drop: float
    min_speedup: float
    target: str
    eager_fp32_ms: float
    baseline: StepReport
    steps: list[StepReport]
    final: StepReport | None = None
    final_from: int | None = None
    calibration: dict | None = None
    seconds: float = 0.0
    budget: dict = field(default_factory=dict)  # the per-step allowances (--budget), by step kind

    @property
    def guardrail_ap50(self) -> float:
        """The lowest AP50 a kept step may have."""
        return (self.baseline.ap50 or 0.0) - self.max_drop

    def kept_path(self) -> list[StepReport]:
        """The original, then every kept step in order: the path the final model came along."""
        return [self.baseline] + [r for r in self.steps if r.status is StepStatus.KEPT and r.measured]

    def pareto(self) -> list[StepReport]:
        """Measured rows (the original included) that no other row beats in both speed-up and AP50."""
        rows = [r for r in [self.baseline, *self.steps] if r.measured]

        def beaten(r):
            return any(o is not r and o.speedup_vs_baseline >= r.speedup_vs_baseline and o.ap50 >= r.ap50
                       and (o.speedup_vs_baseline > r.speedup_vs_baseline or o.ap50 > r.ap50) for o in rows)

        return sorted((r for r in rows if not beaten(r)), key=lambda r: r.speedup_vs_baseline)

    def row(self, index: int) -> StepReport:
        return self.baseline if index < 0 else self.steps[index]

    def to_dict(self) -> dict:
        baseline = self.baseline.to_dict()
        baseline["eager_fp32_ms"] = self.eager_fp32_ms
        baseline["note"] = ("speedup_vs_baseline = PyTorch eager FP32 latency of the original model / latency, "
                            "both measured in this run on the same batch of real tiles")
        final = None
        if self.final is not None:
            final = self.final.to_dict()
            final["from_step"] = self.steps[self.final_from].name if self.final_from is not None else None
            final["from_index"] = self.final_from
        return {
            "model": self.model, "out_dir": str(self.out_dir), "baseline": baseline,
            "validation": {"images": self.images, "labels": self.labelled, "metric": self.metric},
            "calibration": self.calibration, "target": self.target, "max_drop": self.max_drop,
            "min_speedup": self.min_speedup, "budget": dict(self.budget), "steps": [r.to_dict() for r in self.steps],
            "final": final, "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "OptimizeReport":
        try:
            final = d.get("final")
            return cls(
                model=d["model"], out_dir=Path(d.get("out_dir") or "."), labelled=bool(d["validation"]["labels"]),
                metric=d["validation"]["metric"], images=int(d["validation"]["images"]),
                max_drop=float(d["max_drop"]), min_speedup=float(d.get("min_speedup", 1.0)), target=d["target"],
                eager_fp32_ms=float(d["baseline"]["eager_fp32_ms"]), baseline=StepReport.from_dict(d["baseline"]),
                steps=[StepReport.from_dict(r) for r in d["steps"]],
                final=StepReport.from_dict(final) if final else None,
                final_from=final.get("from_index") if final else None, calibration=d.get("calibration"),
                seconds=float(d.get("seconds") or 0.0), budget=dict(d.get("budget") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"not a segstudio optimization report ({type(e).__name__}: {e})") from None

    @classmethod
    def load(cls, path: str | Path) -> "OptimizeReport":
        """``report.json`` (or the folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "report.json"
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: cannot read the optimization report ({e})") from None
        report = cls.from_dict(d)
        report.out_dir = path.parent
        return report

    def copy(self) -> "OptimizeReport":
        """A snapshot (rows copied) that a GUI thread may keep while the run goes on."""
        return replace(self, baseline=replace(self.baseline), steps=[replace(r) for r in self.steps],
                       final=replace(self.final) if self.final is not None else None)


class EventKind(Enum):
    ESTIMATE = "estimate"            # the run's time estimate before it starts
    BASELINE = "baseline"            # the original is measured (row: the baseline)
    STEP_STARTED = "step_started"
    STEP_PROGRESS = "step_progress"  # fraction / loss / phase within a step
    STEP_POINT = "step_point"        # a measured attempt of a step (a chart point)
    STEP_FINISHED = "step_finished"  # the row with its final status
    REMEASURED = "remeasured"        # the interleaved speed-ups (report: every row updated)
    FINISHED = "finished"            # report: the final report


@dataclass(frozen=True)
class OptimizeEvent:
    kind: EventKind
    step: int | None
    steps: int
    message: str = ""
    phase: str = ""
    fraction: float | None = None
    run_fraction: float | None = None
    step_eta_s: float | None = None
    run_eta_s: float | None = None
    train_step: int | None = None
    loss: float | None = None
    row: StepReport | None = None
    report: OptimizeReport | None = None

    @property
    def frequent(self) -> bool:
        """Progress within a step (many per second while training): a shell may drop some of them."""
        return self.kind is EventKind.STEP_PROGRESS
