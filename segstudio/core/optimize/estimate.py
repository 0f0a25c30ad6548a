"""How long an optimization run will take on this machine, from costs measured here.

:func:`estimate_job` times, in a few seconds, what a run is made of on this
machine: one batch of real tiles through the original model on its fastest
backend and in PyTorch eager FP32, one validation image segmented end to
end, and (when the recipe trains) two training steps.  Each step's time is
then its work in those units (training steps, calibration tiles, validation
passes), plus fixed costs measured on the development machine for what does
not scale (an ONNX export, an INT8 conversion, a TensorRT build).  The
runner refines the estimate as it goes: finished steps rescale the rest by
how far off the estimate was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..backends import create_backend, installed
from ..jobs import Job, Progress, run_sync
from ..models.catalog import Model
from .calibration import CalibrationSource
from .steps import Step
from .validate import ValidationSet, target_variants

# Seconds of work that does not scale with the images (2-core CPU, 2026-12-02): exporting ONNX
# and checking it, converting to INT8 once the ranges are known, a TensorRT build (minutes).
FIXED_S = {"prune": 8.0, "recover": 8.0, "distill": 8.0, "sparsify": 8.0, "export": 8.0, "quantize": 12.0,
           "engine": 240.0}
LATENCY_PREDICTS = 9  # warm-up and timed calls of validate.latency_ms per backend
RETUNE_IMAGES = 40  # distill.retune_postprocess looks at this many calibration images
# a training step with INT8 fake quantization (qat.QDQNet) against a float step of the same network, batch 8 of
# 192 px crops on the 2-core CPU, 2026-12-04: 3.3 s against 1.7-2.2 s (/tmp measurement while a run went on)
QAT_TRAIN_FACTOR = 1.8


@dataclass(frozen=True)
class RunEstimate:
    total_s: float
    per_step_s: tuple[float, ...]
    measure_s: float  # the original's measurement and the final interleaved timing
    basis: str

    def describe(self) -> str:
        return f"about {format_seconds(self.total_s)} on this machine ({self.basis})"


def format_seconds(s: float) -> str:
    if s < 90:
        return f"{max(1, round(s))} s"
    if s < 5400:
        return f"{round(s / 60)} min"
    return f"{s / 3600:.1f} h"


def estimate_job(model: Model, steps: list[Step], calib: CalibrationSource | None, vset: ValidationSet, *,
                 target: str = "cpu", speed_tile: int = 512) -> Job[RunEstimate]:
    """Measure this machine's unit costs (a few seconds) and estimate every step (a job)."""
    yield Progress("estimate", 0, 3, "timing a batch of tiles")
    batch = vset.speed_batch(model, tile=speed_tile)
    variants = target_variants(model, target) or ["torch@cpu"]
    with create_backend(variants[0], model) as backend:
        backend.predict(batch)
        t0 = time.perf_counter()
        backend.predict(batch)
        batch_s = time.perf_counter() - t0
        yield Progress("estimate", 1, 3, "segmenting a validation image")
        image = min(vset.images, key=lambda im: int(np.prod(im.data.shape)))
        from ..segment.job import segment_job
        from ..segment.options import SegmentOptions

        t0 = time.perf_counter()
        run_sync(segment_job(image, model, backend, SegmentOptions(measure_cells=False)))
        per_px = (time.perf_counter() - t0) / max(1, int(np.prod(image.data.shape[-2:])))
    eager_s = batch_s * 3.5  # replaced by a measurement below when PyTorch is here
    train_s: dict[int, float] = {}
    if installed("torch") and "torch" in model.files:
        from ..backends.eager import EagerTorch

        net = EagerTorch(model, "cpu")
        net.predict(batch[:1])
        t0 = time.perf_counter()
        net.predict(batch)
        eager_s = time.perf_counter() - t0
        net.close()
        train_s = {}
        for i, step in enumerate(steps):
            if step.name in ("recover", "distill", "qat"):
                yield Progress("estimate", 2, 3, f"timing training steps of {step.label}")
                train_s[i] = _train_step_s(_student_config(model, steps, i), crop=int(step.opts.get("crop", 192)))
    yield Progress("estimate", 3, 3)
    val_px = sum(int(np.prod(im.data.shape[-2:])) for im in vset.images)
    validate_s = val_px * per_px + len(variants) * LATENCY_PREDICTS * batch_s
    calib_px = sum(int(np.prod(e.plane.shape[-2:])) for e in calib.entries) if calib is not None else 0
    tile_px = batch.shape[-1] * batch.shape[-2] * batch.shape[0]
    per_step = []
    for i, step in enumerate(steps):
        s = FIXED_S.get(step.name, 8.0) + validate_s
        if i in train_s:
            qat_steps = _qat_steps(step)
            n = (int(step.opts["steps"]) if step.name != "qat" else 0) * train_s[i]
            n += qat_steps * train_s[i] * QAT_TRAIN_FACTOR
            teacher_s = calib_px * eager_s / tile_px
            retune_s = 2 * teacher_s * min(1.0, RETUNE_IMAGES / max(1, len(calib.entries))) if calib else 0.0
            s += n + teacher_s + retune_s
            if qat_steps:  # the INT8 start, the PTQ model measured beside it and both re-tuned
                s += FIXED_S["quantize"] + validate_s + 2 * retune_s
                s += 2.0 * calib.n_tiles * (calib.tile ** 2) * batch_s / tile_px if calib else 0.0
        elif step.name == "quantize" and step.value == "int8" and calib is not None:
            tiles = int(step.opts["tiles"]) or calib.n_tiles
            s += 2.0 * tiles * (calib.tile ** 2) * batch_s / tile_px  # the augmented model keeps every tensor
        per_step.append(s)
    measure_s = (LATENCY_PREDICTS * 2 * eager_s / 3 + validate_s
                 + (2 + len(steps)) * (LATENCY_PREDICTS + 2) * batch_s)
    basis = (f"measured here: {1e3 * batch_s:.0f} ms per batch of {batch.shape[0]} tiles on {variants[0]}, "
             f"{1e6 * per_px:.2f} µs per validation pixel"
             + "".join(f", {t:.2f} s per training step of {steps[i].label}" for i, t in train_s.items()))
    return RunEstimate(total_s=float(sum(per_step) + measure_s), per_step_s=tuple(float(x) for x in per_step),
                       measure_s=float(measure_s), basis=basis)


def estimate_run(model: Model, steps: list[Step], calib: CalibrationSource | None, vset: ValidationSet, *,
                 target: str = "cpu", speed_tile: int = 512) -> RunEstimate:
    return run_sync(estimate_job(model, steps, calib, vset, target=target, speed_tile=speed_tile))


def _qat_steps(step: Step) -> int:
    """Steps of quantization-aware training in ``step`` (``qat``, or ``recover:qat=true``)."""
    if step.name == "qat":
        return int(step.opts["steps"])
    return int(step.opts["qat_steps"]) if step.name == "recover" and step.opts.get("qat") else 0


def _student_config(model: Model, steps: list[Step], i: int):
    """The network step ``i`` trains: a distillation's student, or (recovery) the pruned network before it."""
    from dataclasses import replace

    cfg = model.spec.config
    step = steps[i]
    if step.name == "distill":
        return replace(cfg, width=int(step.value), depth=int(step.opts["depth"]) or cfg.depth,
                       separable=bool(step.opts["separable"]))
    prior = next((s for s in reversed(steps[:i]) if s.name == "prune"), None)
    if prior is None:
        return cfg
    keep = 1.0 - float(prior.value)  # channels left per group (the full-resolution blocks stay whole: a bit more)
    return replace(cfg, width=max(2, round(cfg.width * keep)), max_width=max(2, round(cfg.max_width * keep)))


def _train_step_s(cfg, *, crop: int = 192, batch: int = 8) -> float:
    """Seconds of one distillation step (forward and backward of a batch of crops) of a network of ``cfg``."""
    import torch

    from ..models.unet import build_unet

    torch.manual_seed(0)
    net = build_unet(cfg).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(batch, cfg.in_channels, crop, crop)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = net(x)
        loss = out.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


class EtaTracker:
    """Step and run ETAs from an estimate, refined by how long finished steps really took."""

    def __init__(self, estimate: RunEstimate | None, steps: int):
        self.estimate = estimate
        self.steps = steps
        self.actual: dict[int, float] = {}
        self.t0 = time.perf_counter()
        self.step_t0 = self.t0
        self.current: int | None = None

    def start(self, i: int) -> None:
        self.current, self.step_t0 = i, time.perf_counter()

    def finish(self, i: int, seconds: float | None = None) -> None:
        self.actual[i] = seconds if seconds is not None else time.perf_counter() - self.step_t0
        self.current = None

    def _factor(self) -> float:
        if self.estimate is None:
            return 1.0
        done = [i for i in self.actual if i < len(self.estimate.per_step_s) and self.estimate.per_step_s[i] > 0]
        if not done:
            return 1.0
        est = sum(self.estimate.per_step_s[i] for i in done)
        return min(10.0, max(0.1, sum(self.actual[i] for i in done) / est))

    def etas(self, inner_fraction: float | None = None, training: bool = False) -> tuple[float | None, ...]:
        """(step fraction, step ETA s, run fraction, run ETA s) now."""
        if self.estimate is None:
            return None, None, None, None
        k = self._factor()
        now = time.perf_counter()
        step_eta = None
        left = [i for i in range(self.steps) if i not in self.actual and i != self.current]
        if self.current is not None:
            elapsed = now - self.step_t0
            step_eta = max(0.0, k * self.estimate.per_step_s[self.current] - elapsed)
            if training and inner_fraction:  # the training loop knows its own progress best
                step_eta = max(step_eta, elapsed * (1 - inner_fraction) / max(inner_fraction, 1e-3))
        run_eta = (step_eta or 0.0) + k * (sum(self.estimate.per_step_s[i] for i in left)
                                           + 0.5 * self.estimate.measure_s)
        elapsed_run = now - self.t0
        step_fraction = None
        if self.current is not None:
            e = now - self.step_t0
            step_fraction = e / (e + step_eta) if (e + step_eta) > 0 else 0.0
        run_fraction = elapsed_run / (elapsed_run + run_eta) if elapsed_run + run_eta > 0 else 0.0
        return step_fraction, step_eta, run_fraction, run_eta
