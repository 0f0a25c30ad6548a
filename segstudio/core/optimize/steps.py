"""The optimization steps: each ``Artifact -> Artifact`` with its details.

A step is written ``name[:argument][:option=value...]`` (``prune:0.5``,
``prune:0.3:importance=l1:mode=global``, ``recover:steps=800``,
``quantize:int8:method=entropy``).  Every step

* declares its options; unknown ones are refused, never ignored;
* says what would stop it, in words, before it runs (:meth:`Step.check`);
* is a job: it yields :class:`Progress` and stops on the cancel token;
* writes its artifact in its own folder with the provenance in the card.

The plain functions behind them live in :mod:`.prune`, :mod:`.distill`,
:mod:`.quantize` and :mod:`segstudio.core.models.onnx_export`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from ..backends import installed, torch_hint
from ..errors import InputError
from ..jobs import CancelToken, Job, Progress
from ..models.catalog import Model
from .artifact import OnnxExport, load_torch, new_artifact, provenance, renamed
from .calibration import CalibrationSource
from .options import OptionSpec, StepSpec


@dataclass
class Context:
    """What every step may use."""

    original: Model
    calib: CalibrationSource | None
    out_dir: Path
    target: str = "cpu"
    cancel: CancelToken = field(default_factory=CancelToken)
    threads: int = 0
    _teacher: object = None
    _teacher_logits: list | None = None

    def teacher(self):
        if self._teacher is None:
            self._teacher = load_torch(self.original)
        return self._teacher

    def teacher_logits(self) -> list:
        """The original model's outputs on every calibration image (computed once per run)."""
        if self._teacher_logits is None:
            from .distill import tiled_outputs

            self._teacher_logits = tiled_outputs(self.teacher(), self.calib.images(), self.cancel)
        return self._teacher_logits


class Step(ABC):
    """One optimization step.  Subclasses declare their argument and options as :class:`OptionSpec`."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    doc: ClassVar[str] = ""
    argument: ClassVar[OptionSpec | None] = None  # the positional value (prune:0.5)
    option_specs: ClassVar[tuple[OptionSpec, ...]] = ()
    needs_recovery: ClassVar[bool] = False
    judged_on_speed: ClassVar[bool] = True  # the speed guardrail applies (not to export / sparsify)

    def __init__(self, arg=None, **opts):
        specs = {o.name: o for o in self.option_specs}
        unknown = set(opts) - set(specs)
        if unknown:
            raise InputError(f"step {self.name} has no option {', '.join(sorted(unknown))}"
                             f" (options: {', '.join(specs) or 'none'})")
        if arg is not None and str(arg).strip() == "":
            arg = None
        if arg is not None and self.argument is None:
            raise InputError(f"step {self.name} takes no argument, not {arg!r}")
        self.arg = None if arg is None else self.argument.parse(arg, f"{self.name}'s {self.argument.name}")
        self.opts = {o.name: o.default for o in self.option_specs}
        self.opts.update({k: specs[k].parse(v, f"{self.name}:{k}") for k, v in opts.items()})

    @property
    def value(self):
        """The argument, or its default when none was given."""
        return self.arg if self.arg is not None else (self.argument.default if self.argument else None)

    @classmethod
    def step_spec(cls) -> StepSpec:
        return StepSpec(cls.name, cls.title, cls.doc, cls.argument, cls.option_specs, cls)

    @property
    def spec(self) -> StepSpec:
        return self.step_spec()

    @property
    def label(self) -> str:
        specs = {o.name: o for o in self.option_specs}
        return self.name + (f":{self.argument.text(self.arg)}" if self.arg is not None else "") + "".join(
            f":{k}={specs[k].text(v)}" for k, v in self.opts.items() if specs[k].default != v)

    def budget_keys(self) -> tuple[str, ...]:
        """The kinds of accuracy loss this step spends (``--budget prune=0.006,int8=0.004`` names them)."""
        return (self.name,)

    def sensitivity(self) -> tuple:
        """Per-layer INT8 sensitivity measured by this step (:class:`LayerSensitivity`), if any."""
        return ()

    def check(self, parent: Model, ctx: Context) -> list[str]:
        return []

    @abstractmethod
    def run(self, parent: Model, ctx: Context, out: Path) -> Job[tuple[Model, dict]]:
        """Make the child artifact in ``out``; a job returning ``(child, details)``."""

    def params(self) -> dict:
        return {"arg": self.arg, **self.opts}

    def retry(self, parent: Model, ctx: Context, out: Path) -> Job[bool]:
        """After a run broke the accuracy budget: adjust and return True to run again (default: no)."""
        return False
        yield  # a generator, like every job


def _need_torch(parent: Model) -> list[str]:
    problems = []
    if not installed("torch"):
        problems.append(f"PyTorch is not installed ({torch_hint()})")
    if "torch" not in parent.files:
        problems.append(f"{parent.name} has no PyTorch weights (an INT8 or FP16 file cannot be retrained)")
    return problems


def _ratio_spec(name: str, default: float, help: str) -> OptionSpec:
    return OptionSpec(name, float, default, help, low=0.0, high=1.0, open_low=True, open_high=True)


class PruneStep(Step):
    name = "prune"
    title = "Structured pruning"
    argument = _ratio_spec("ratio", 0.5, "the share of channels (or with of=flops, of FLOPs) removed")
    option_specs = (
        OptionSpec("of", str, "channels", "what the ratio is of: channels per layer group, or the network's FLOPs",
                   choices=("channels", "flops")),
        OptionSpec("importance", str, "bn", "how channels are ranked: BatchNorm scale, or L1 / L2 norm of the "
                   "filters", choices=("bn", "l1", "l2")),
        OptionSpec("mode", str, "uniform", "uniform: the same ratio in every group; global: ranked across the "
                   "network", choices=("uniform", "global")),
        OptionSpec("round", int, 8, "channel counts are rounded to a multiple of this (fast kernels)", low=1,
                   high=256),
        OptionSpec("keep", str, "full-res", "groups left whole: full-res (the full-resolution blocks), none, or "
                   "names joined by + (enc0.out+dec0.mid)"),
    )
    needs_recovery = True
    doc = ("structured channel pruning: the ratio is of channels removed per layer group, or with of=flops "
           "of the FLOPs removed; keep=full-res (default) leaves the full-resolution blocks whole, keep=none "
           "prunes them too, keep=enc0.out+dec0.mid names groups")

    def __init__(self, arg=None, **opts):
        super().__init__(arg, **opts)
        self.ratio = self.value

    def check(self, parent, ctx):
        problems = _need_torch(parent)
        if not problems:
            from .prune import channel_groups

            unknown = set(self._keep(parent.spec.config)) - set(channel_groups(parent.spec.config))
            if unknown:
                problems.append(f"keep={self.opts['keep']}: no layer group(s) {', '.join(sorted(unknown))} "
                                f"(groups: {', '.join(channel_groups(parent.spec.config))})")
        return problems

    def _keep(self, config) -> tuple[str, ...]:
        from .prune import full_resolution_groups

        keep = str(self.opts["keep"])
        if keep == "full-res":
            return full_resolution_groups(config)
        return () if keep in ("none", "") else tuple(keep.split("+"))

    def run(self, parent, ctx, out):
        from .prune import plan_pruning, prune_structured, ratio_for_flops

        net = load_torch(parent)
        kw = dict(method=self.opts["importance"], mode=self.opts["mode"], round_to=int(self.opts["round"]),
                  keep=self._keep(net.config))
        ratio = ratio_for_flops(net, self.ratio, **kw) if self.opts["of"] == "flops" else self.ratio
        yield Progress("prune", 0, 1, f"pruning {ratio:.0%} of the channels ({self.opts['importance']})")
        pruned = prune_structured(net, plan_pruning(net, ratio, **kw))
        ctx.cancel.raise_if_cancelled()  # the ONNX export below cannot be stopped half-way
        spec = renamed(ctx.original.spec, "-pruned", config=pruned.config)
        child = new_artifact(out, spec, net=pruned, prov=provenance(parent, self.name, self.params()), cancel=ctx.cancel)
        ctx.cancel.raise_if_cancelled()
        yield Progress("prune", 1, 1)
        cfg = pruned.config
        return child, {"layers": cfg.layer_widths().as_dict(), "channel_ratio": ratio,
                       "flops_left": cfg.flops(512, 512) / net.config.flops(512, 512),
                       "params_left": cfg.parameters() / net.config.parameters()}


def _retune(step: Step, student, parent: Model, ctx: Context, with_labels: bool, info: dict):
    """Re-choose the post-processing thresholds for a retrained network (a job; see ``retune_postprocess``)."""
    if step.opts["retune"] == "off":
        return parent.spec.postprocess
    from .distill import retune_postprocess

    yield Progress(step.name, 0, 1, "re-tuning the post-processing thresholds")
    post, info["postprocess"] = retune_postprocess(
        student, ctx.calib.images(), parent.spec.postprocess, instances=ctx.calib.instances if with_labels else None,
        teacher=ctx.teacher(), teacher_params=ctx.original.spec.postprocess, cancel=ctx.cancel)
    return post


# training against the original model: recover and qat take these the same way
_TEACHER_OPTIONS = (
    OptionSpec("temperature", float, 3.0, "distillation temperature T: softens the teacher's outputs",
               low=0.01, high=100.0),
    OptionSpec("alpha", float, 0.5, "weight of the distillation term against the hard targets (0 to 1)",
               low=0.0, high=1.0),
    OptionSpec("labels", str, "auto", "also fine-tune on labelled calibration images: auto (when there are), "
               "yes or no", choices=("auto", "yes", "no")),
    OptionSpec("crop", int, 192, "training crop size in pixels", low=32, high=4096),
    OptionSpec("retune", str, "auto", "re-choose the post-processing thresholds afterwards (off keeps them)",
               choices=("auto", "off")),
)


def _training_labels(step: Step, ctx: Context):
    """The calibration labels the step trains on (its ``labels`` option), or None; refuses yes without labels."""
    if step.opts["labels"] == "yes" and ctx.calib.labels is None:
        raise InputError(f"{step.name}:labels=yes needs labelled calibration images (--calib-labels)")
    return ctx.calib.labels if step.opts["labels"] in ("auto", "yes") else None


class RecoverStep(Step):
    name = "recover"
    title = "Recovery by distillation"
    option_specs = (
        OptionSpec("steps", int, 2500, "training steps (batches of 8 crops)", low=1, high=10**6),
        OptionSpec("lr", float, 1e-3, "peak learning rate (one-cycle schedule)", low=1e-8, high=1.0),
        *_TEACHER_OPTIONS,
        OptionSpec("qat", bool, False, "then quantization-aware training: fine-tune with INT8 fake quantization "
                   "on and export the INT8 model (the guardrail judges that INT8 model)"),
        OptionSpec("qat_steps", int, 400, "with qat=true: steps of quantization-aware training after the float "
                   "recovery", low=1, high=10**6),
        OptionSpec("qat_lr", float, 4e-5, "with qat=true: peak learning rate of the quantization-aware training",
                   low=1e-9, high=1.0),
    )
    doc = ("distill from the unpruned model on the calibration images (and fine-tune on labels when given), "
           "then re-tune the post-processing thresholds (retune=off keeps them); with qat=true, then train "
           "with INT8 fake quantization and export INT8")

    def budget_keys(self):  # a recovery spends the budget of the pruning it follows (and of INT8 with qat)
        return ("int8",) if self.opts["qat"] else ()

    def check(self, parent, ctx):
        problems = _need_torch(parent)
        if ctx.calib is None:
            problems.append("recovery needs the user's images (--calib)")
        return problems

    def run(self, parent, ctx, out):
        from .distill import KDConfig, distill_job

        student = load_torch(parent)
        use_labels = _training_labels(self, ctx)
        steps, qat = int(self.opts["steps"]), bool(self.opts["qat"])
        total = steps + (int(self.opts["qat_steps"]) if qat else 0)
        cfg = KDConfig(steps=steps, lr=float(self.opts["lr"]), crop=int(self.opts["crop"]),
                       temperature=float(self.opts["temperature"]), alpha=float(self.opts["alpha"]),
                       threads=ctx.threads)
        logits = ctx.teacher_logits() if qat else None
        info = yield from _shifted(distill_job(student, ctx.teacher(), ctx.calib.images(), cfg, labels=use_labels,
                                               cancel=ctx.cancel, teacher_logits=logits), 0, total)
        prov = provenance(parent, self.name, self.params(), calibration=ctx.calib.digest, teacher=ctx.original.name)
        if not qat:
            post = yield from _retune(self, student, parent, ctx, use_labels is not None, info)
            spec = renamed(ctx.original.spec, "-recovered", config=student.config, postprocess=post)
            return new_artifact(out, spec, net=student, prov=prov, cancel=ctx.cancel), info
        spec = renamed(ctx.original.spec, "-recovered", config=student.config)
        floating = new_artifact(out / "float", spec, net=student, prov=prov, cancel=ctx.cancel)
        child, qinfo = yield from _quantization_aware(
            self, floating, None, ctx, out, _Phase(int(self.opts["qat_steps"]), float(self.opts["qat_lr"]), steps,
                                                   total), labels=use_labels, prov=prov)
        details = {**info, "qat": qinfo}
        details["compare"], details["float_onnx"] = qinfo.pop("compare"), qinfo.pop("float_onnx")
        return child, details


def _shifted(job, offset: int, total: int):
    """Relay a training job's events as steps ``offset + k`` of ``total`` (two phases, one loss curve)."""
    while True:
        try:
            p = next(job)
        except StopIteration as stop:
            return stop.value
        if p.stage == "distill" and p.total:
            p = replace(p, done=p.done + offset, total=total)
        yield p


@dataclass(frozen=True)
class _Phase:
    """A training phase: ``steps`` at peak ``lr``, shown as steps ``offset + 1 ..`` of ``total`` (one curve)."""

    steps: int
    lr: float
    offset: int = 0
    total: int | None = None


def _quantization_aware(step: Step, parent: Model, ptq: Path | None, ctx: Context, out: Path, phase: _Phase, *,
                        labels, prov: dict):
    """Quantization-aware training of ``parent``'s float network (a job returning ``(child, details)``).

    ``ptq``: its post-training INT8 graph when there is one (else it is
    calibrated here on the calibration tiles, as ``quantize:int8`` does).
    QAT starts from that graph's activation ranges and ``parent``'s float
    weights and learns both against the original model
    (:func:`~segstudio.core.optimize.qat.qat_job`); the child carries the
    exported INT8 graph beside ``parent``'s float files.  The post-training
    INT8 model of the same network is kept beside it (``details["compare"]``)
    so the report puts PTQ and QAT side by side.
    """
    from .distill import KDConfig
    from .qat import qat_job, qdq_net
    from .quantize import quantize_int8

    name = parent.spec.name
    made_ptq = ptq is None
    if made_ptq:
        yield Progress("quantize", 0, 1, f"calibrating INT8 on {len(ctx.calib.tiles())} tiles (the QAT start)")
        (out / "ptq").mkdir(parents=True, exist_ok=True)
        ptq = quantize_int8(parent.files["onnx"], out / "ptq" / f"{name}_int8.onnx", ctx.calib.tiles(),
                            cancel=ctx.cancel)
    steps, total = phase.steps, phase.total or phase.steps
    kd = KDConfig(steps=steps, lr=phase.lr, crop=int(step.opts["crop"]), temperature=float(step.opts["temperature"]),
                  alpha=float(step.opts["alpha"]), threads=ctx.threads, weight_decay=0.0, photometric=False)
    yield Progress("distill", phase.offset, total, "quantization-aware training (INT8 fake quantization)")
    net, info = yield from _shifted(qat_job(ptq, parent.files["onnx"], parent.spec.config, ctx.teacher(),
                                            ctx.calib.images(), kd, labels=labels, cancel=ctx.cancel,
                                            teacher_logits=ctx.teacher_logits()), phase.offset, total)
    out.mkdir(parents=True, exist_ok=True)
    qat_path = net.export(out / f"{name}_qat_int8.onnx")
    post = yield from _retune(step, net, parent, ctx, labels is not None, info)
    files = {k: v for k, v in parent.files.items() if k in ("torch", "onnx")}
    child = new_artifact(out, replace(parent.spec, postprocess=post), copy=files, new_files={"onnx_int8": qat_path},
                         prov={**prov, "qat": {"steps": steps, "lr": phase.lr, "from": "ptq"}})
    compare = {}
    if made_ptq:
        ptq_info: dict = {}
        ptq_post = yield from _retune(step, qdq_net(ptq, None, parent.spec.config), parent, ctx, labels is not None,
                                      ptq_info)
        sibling = new_artifact(out / "ptq", replace(parent.spec, postprocess=ptq_post), copy=files,
                               new_files={"onnx_int8": ptq}, prov=provenance(parent, "quantize", {"arg": "int8"},
                                                                           calibration=ctx.calib.digest))
        compare["ptq"] = str(sibling.card_path)
    else:
        compare["ptq"] = "parent"
    info.update(compare=compare, float_onnx=str(parent.files["onnx"]))
    return child, info


class QatStep(Step):
    name = "qat"
    title = "Quantization-aware training (INT8)"
    option_specs = (
        OptionSpec("steps", int, 400, "training steps with INT8 fake quantization (batches of 8 crops)", low=1,
                   high=10**6),
        OptionSpec("lr", float, 4e-5, "peak learning rate (one-cycle schedule)", low=1e-9, high=1.0),
        *_TEACHER_OPTIONS,
    )
    doc = ("quantization-aware training: fine-tune the INT8 model (the one quantize:int8 made, or calibrated "
           "here) with fake quantization against the original model, learning weights and activation ranges, "
           "and export INT8")

    def budget_keys(self):
        return ("int8",)

    def check(self, parent, ctx):
        problems = []
        if "onnx" not in parent.files:
            problems.append(f"{parent.name} has no ONNX file to train")
        for package, why in (("torch", torch_hint()), ("onnxruntime", "pip install segstudio[onnx]")):
            if not installed(package):
                problems.append(f"quantization-aware training needs {package} ({why})")
        if ctx.calib is None:
            problems.append("quantization-aware training needs the user's images (--calib)")
        return problems

    def run(self, parent, ctx, out):
        labels = _training_labels(self, ctx)
        prov = provenance(parent, self.name, self.params(), calibration=ctx.calib.digest, teacher=ctx.original.name)
        child, info = yield from _quantization_aware(
            self, parent, parent.files.get("onnx_int8"), ctx, out,
            _Phase(int(self.opts["steps"]), float(self.opts["lr"])), labels=labels, prov=prov)
        return child, info


class DistillStep(Step):
    name = "distill"
    title = "Light model (distillation)"
    argument = OptionSpec("width", int, 8, "channels of the student's first layer (the original has 32)", low=2,
                          high=1024)
    option_specs = (
        OptionSpec("separable", bool, False, "depthwise-separable convolutions (fewer FLOPs per channel)"),
        OptionSpec("depth", int, 0, "levels of the student U-Net (0: as many as the original)", low=0, high=8),
        OptionSpec("steps", int, 3000, "training steps (batches of 8 crops)", low=1, high=10**6),
        OptionSpec("lr", float, 2e-3, "peak learning rate (one-cycle schedule)", low=1e-8, high=1.0),
        OptionSpec("temperature", float, 3.0, "distillation temperature T", low=0.01, high=100.0),
        OptionSpec("alpha", float, 0.5, "weight of the distillation term against the hard targets", low=0.0,
                   high=1.0),
        OptionSpec("feature_kd", float, 0.0, "weight of matching the last decoder features (0: off)", low=0.0,
                   high=100.0),
        OptionSpec("retune", str, "auto", "re-choose the post-processing thresholds afterwards (off keeps them)",
                   choices=("auto", "off")),
    )
    doc = "train a smaller student U-Net (narrower and/or depthwise-separable) from the model"

    def __init__(self, arg=None, **opts):
        super().__init__(arg, **opts)
        self.width, self.depth = int(self.value), int(self.opts["depth"])

    def check(self, parent, ctx):
        problems = _need_torch(ctx.original)
        if ctx.calib is None:
            problems.append("distillation needs the user's images (--calib)")
        return problems

    def run(self, parent, ctx, out):
        import torch

        from ..models.unet import build_unet
        from .distill import KDConfig, distill_job

        base = ctx.original.spec.config
        sep = bool(self.opts["separable"])
        cfg = base.__class__(in_channels=base.in_channels, out_channels=base.out_channels,
                             depth=self.depth or base.depth, width=self.width,
                             max_width=base.max_width, separable=sep)
        torch.manual_seed(0)
        student = build_unet(cfg)
        kd = KDConfig(steps=int(self.opts["steps"]), lr=float(self.opts["lr"]),
                      temperature=float(self.opts["temperature"]), alpha=float(self.opts["alpha"]),
                      feature_kd=float(self.opts["feature_kd"]), threads=ctx.threads)
        info = yield from distill_job(student, ctx.teacher(), ctx.calib.images(), kd, labels=ctx.calib.labels,
                                      cancel=ctx.cancel)
        post = yield from _retune(self, student, parent, ctx, ctx.calib.labels is not None, info)
        spec = renamed(ctx.original.spec, "-student", config=cfg, postprocess=post)
        child = new_artifact(out, spec, net=student, prov=provenance(
            parent, self.name, self.params(), calibration=ctx.calib.digest, teacher=ctx.original.name),
            cancel=ctx.cancel)
        return child, info


class SparsifyStep(Step):
    name = "sparsify"
    title = "Unstructured sparsity (smaller file only)"
    argument = _ratio_spec("sparsity", 0.5, "the share of weights set to zero")
    judged_on_speed = False
    doc = "unstructured magnitude pruning: smaller file, NOT faster (dense kernels compute the zeros)"

    def __init__(self, arg=None, **opts):
        super().__init__(arg, **opts)
        self.sparsity = self.value

    def check(self, parent, ctx):
        return _need_torch(parent)

    def run(self, parent, ctx, out):
        from .prune import compressed_size, prune_unstructured

        net = load_torch(parent)
        info = prune_unstructured(net, self.sparsity)
        ctx.cancel.raise_if_cancelled()  # the export cannot be stopped half-way
        spec = renamed(ctx.original.spec, "-sparse", config=net.config)
        child = new_artifact(out, spec, net=net, prov=provenance(parent, self.name, self.params()), cancel=ctx.cancel)
        ctx.cancel.raise_if_cancelled()
        yield Progress("sparsify", 1, 1)
        info.update(
            compressed_mb=compressed_size(child.files["onnx"], ctx.cancel) / 2**20,
            parent_compressed_mb=(compressed_size(parent.files["onnx"], ctx.cancel) / 2**20
                                  if "onnx" in parent.files else None),
            note="zeros are still multiplied by dense convolution kernels: no speed-up is claimed or expected",
        )
        return child, info


class ExportStep(Step):
    name = "export"
    title = "ONNX export"
    option_specs = (OptionSpec("opset", int, 18, "ONNX operator set version", low=13, high=23),)
    judged_on_speed = False
    doc = "ONNX export (dynamic batch, height, width; BatchNorm folded) verified against PyTorch"

    def check(self, parent, ctx):
        problems = _need_torch(parent)
        if not installed("onnxscript"):
            problems.append(f"the ONNX exporter needs onnxscript ({torch_hint()})")
        return problems

    def run(self, parent, ctx, out):
        import numpy as np
        import torch

        from ..models.onnx_export import compare_outputs
        from ..models.unet import fold_batchnorm

        net = load_torch(parent)
        ctx.cancel.raise_if_cancelled()  # the export cannot be stopped half-way
        child = new_artifact(out, replace(parent.spec), net=net,
                             export=OnnxExport(fold_batchnorm(load_torch(parent)), int(self.opts["opset"])),
                             prov=provenance(parent, self.name, self.params()), cancel=ctx.cancel)
        x = np.random.default_rng(0).standard_normal((2, parent.spec.input_channels, 96, 128)).astype(np.float32)
        with torch.no_grad():
            ref = net(torch.from_numpy(x)).numpy()
        import onnxruntime as ort

        sess = ort.InferenceSession(str(child.files["onnx"]), providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        yield Progress("export", 1, 1)
        import onnx

        m = onnx.load(str(child.files["onnx"]))
        return child, {"verification": compare_outputs(ref, got), "ir_version": m.ir_version,
                       "opset": next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
                       "nodes": len(m.graph.node)}


class QuantizeStep(Step):
    name = "quantize"
    title = "Quantization (INT8 or FP16)"
    argument = OptionSpec("precision", str, "int8", "int8 (calibrated on your images) or fp16 (GPU only)",
                          choices=("int8", "fp16"))
    option_specs = (
        OptionSpec("method", str, "percentile", "how activation ranges are calibrated", choices=("percentile",
                   "minmax", "entropy")),
        OptionSpec("percentile", float, 99.999, "with method=percentile: the percentile of activations that sets "
                   "each range", low=90.0, high=100.0),
        OptionSpec("tiles", int, 0, "calibration tiles used (0: every tile of the calibration set)", low=0,
                   high=100_000),
        OptionSpec("fallback", str, "auto", "when INT8 costs too much accuracy, keep the most sensitive layers in "
                   "float (off: never)", choices=("auto", "off")),
        OptionSpec("max_fallback", int, 6, "at most this many layers kept in float", low=0, high=100),
    )
    doc = "INT8 (Q/DQ, calibrated on your images, sensitive layers kept in float if needed) or FP16"

    def __init__(self, arg=None, **opts):
        super().__init__(arg, **opts)
        self.precision = self.value
        self.exclude: list[str] = []
        self.ranking: list[tuple[str, float]] | None = None

    def _ranges(self, parent, ctx) -> Path:
        """Where the activation ranges of ``parent`` on the calibration set are kept (measured once)."""
        from ..models.catalog import model_digest

        method = self.opts["method"] + (f"{self.opts['percentile']:g}" if self.opts["method"] == "percentile" else "")
        return ctx.out_dir / "calibration" / f"{model_digest(parent)[:12]}-{ctx.calib.digest}-{method}.json"

    def budget_keys(self):
        return (self.precision,)

    def retry(self, parent, ctx, out):
        """Keep the next most sensitive layer in float (measured once per layer, then reused)."""
        if self.precision != "int8" or self.opts["fallback"] == "off":
            return False
        if len(self.exclude) >= int(self.opts["max_fallback"]):
            return False
        if self.ranking is None:
            from .quantize import layer_sensitivity

            tiles = ctx.calib.tiles()[: max(8, len(ctx.calib.tiles()) // 4)]
            yield Progress("quantize", 0, 1, "measuring each layer's sensitivity to INT8")
            self.ranking = yield from layer_sensitivity(parent.files["onnx"], tiles, method=self.opts["method"],
                                                        cache=self._ranges(parent, ctx), cancel=ctx.cancel,
                                                        percentile=float(self.opts["percentile"]))
        remaining = [node for node, gain in self.ranking if node not in self.exclude and gain > 0]
        if not remaining:
            return False
        self.exclude.append(remaining[0])
        yield Progress("quantize", 0, 1, f"keeping {remaining[0]} in float")
        return True

    def sensitivity(self):
        from .report import LayerSensitivity

        return tuple(LayerSensitivity(node, float(gain), node in self.exclude) for node, gain in self.ranking or ())

    def check(self, parent, ctx):
        problems = []
        if "onnx" not in parent.files:
            problems.append(f"{parent.name} has no ONNX file to quantize (add an export step first)")
        if not installed("onnxruntime"):
            problems.append("quantization needs onnxruntime")
        if self.precision == "int8" and ctx.calib is None:
            problems.append("INT8 calibration needs the user's images (--calib)")
        if self.precision == "fp16" and ctx.target == "cpu":
            problems.append("FP16 is not faster on a CPU (no native FP16 arithmetic here): it only pays on a GPU "
                            "target (--target gpu)")
        return problems

    def run(self, parent, ctx, out):
        from .quantize import convert_fp16, quantize_int8

        out.mkdir(parents=True, exist_ok=True)
        copy = {k: v for k, v in parent.files.items() if k in ("torch", "onnx")}
        if self.precision == "fp16":
            path = convert_fp16(parent.files["onnx"], out / f"{parent.spec.name}_fp16.onnx")
            child = new_artifact(out, parent.spec, copy=copy, new_files={"onnx_fp16": path},
                                 prov=provenance(parent, self.name, self.params()))
            yield Progress("quantize", 1, 1)
            return child, {"precision": "fp16"}
        tiles = ctx.calib.tiles()
        if int(self.opts["tiles"]):
            tiles = tiles[: int(self.opts["tiles"])]
        yield Progress("quantize", 0, 1, f"calibrating INT8 on {len(tiles)} tiles ({self.opts['method']})")
        ranges = self._ranges(parent, ctx) if not int(self.opts["tiles"]) else None
        path = quantize_int8(parent.files["onnx"], out / f"{parent.spec.name}_int8.onnx", tiles,
                             method=self.opts["method"], exclude=self.exclude, cache=ranges,
                             percentile=float(self.opts["percentile"]), cancel=ctx.cancel)
        child = new_artifact(out, parent.spec, copy=copy, new_files={"onnx_int8": path}, prov=provenance(
            parent, self.name, {**self.params(), "float_layers": list(self.exclude)},
            calibration=ctx.calib.digest, calibration_set=ctx.calib.describe()))
        yield Progress("quantize", 1, 1)
        return child, {"precision": "int8", "method": self.opts["method"], "tiles": len(tiles),
                       "float_layers": list(self.exclude), "calibration": ctx.calib.describe(),
                       "sensitivity": self.ranking}


class EngineStep(Step):
    name = "engine"
    title = "TensorRT engine (GPU)"
    argument = OptionSpec("precision", str, "fp16", "the engine's precision", choices=("fp32", "fp16", "int8"))
    option_specs = (
        OptionSpec("workspace_gb", float, 4.0, "GPU memory the builder may use for tactics, in GiB", low=0.25,
                   high=1024),
        OptionSpec("level", int, 3, "builder optimization level (higher: longer build, maybe faster engine)",
                   low=0, high=5),
        OptionSpec("min_tile", int, 0, "shape profile: smallest tile side (0: one network stride)", low=0,
                   high=8192),
        OptionSpec("tile", int, 512, "shape profile: the tile side it is optimized for (opt and max)", low=32,
                   high=8192),
        OptionSpec("batch", int, 16, "shape profile: largest batch (opt and max)", low=1, high=256),
        OptionSpec("timing_cache", bool, True, "reuse and update this machine's TensorRT timing cache"),
    )
    doc = "TensorRT engine (GPU) from the FP32, FP16 or Q/DQ INT8 ONNX"

    def __init__(self, arg=None, **opts):
        super().__init__(arg, **opts)
        self.precision = self.value

    def _source(self, parent: Model) -> str:
        """The ONNX file the engine is built from: Q/DQ for INT8, the FP16 graph when there is one for FP16."""
        if self.precision == "int8":
            return "onnx_int8"
        return "onnx_fp16" if self.precision == "fp16" and "onnx_fp16" in parent.files else "onnx"

    def check(self, parent, ctx):
        problems = []
        if not installed("tensorrt"):
            problems.append("TensorRT is not installed here, so no engine can be built (the other steps are "
                            "unaffected)")
        if not installed("torch"):
            problems.append("the TensorRT step uses PyTorch for GPU buffers")
        elif not problems:
            import torch

            if not torch.cuda.is_available():
                problems.append("no NVIDIA GPU is visible")
        fmt = self._source(parent)
        if fmt not in parent.files:
            problems.append(f"{parent.name} has no {fmt} file for a {self.precision} engine")
        return problems

    def run(self, parent, ctx, out):
        import queue
        import threading

        from ..backends.engine_cache import EngineCache, default_profile
        from ..backends.tensorrt_backend import build_engine, machine_key
        from ..errors import log_dir
        from ..models.spec import file_sha256
        from ..segment.tiling import plan_tiles

        spec = parent.spec
        fmt = self._source(parent)
        onnx = parent.files[fmt]
        plan = plan_tiles((int(self.opts["tile"]),) * 2, tile=int(self.opts["tile"]), halo=spec.halo,
                          multiple=spec.multiple)
        profile = default_profile(spec.input_channels, spec.multiple, plan.tile_shape, int(self.opts["batch"]),
                                  min_side=int(self.opts["min_tile"]))
        key = machine_key(file_sha256(onnx), self.precision, profile)
        cache = EngineCache(log_dir().parent / "engines")
        events: queue.Queue = queue.Queue()
        result: dict = {}

        def build():  # TensorRT's builder blocks: run it beside the job and relay its progress
            try:
                result["blob"] = build_engine(
                    onnx, profile, self.precision, workspace_bytes=int(float(self.opts["workspace_gb"]) * 2**30),
                    optimization_level=int(self.opts["level"]),
                    timing_cache=cache.root / "timing.cache" if self.opts["timing_cache"] else None,
                    on_progress=lambda phase, step, steps: events.put((phase, step, steps)), cancel=ctx.cancel)
            except BaseException as e:  # noqa: BLE001 - handed to the job's thread below
                result["error"] = e
            finally:
                events.put(None)

        threading.Thread(target=build, name="segstudio-trt-build", daemon=True).start()
        phases = set()
        while (ev := events.get()) is not None:
            phases.add(ev[0])
            yield Progress("engine", ev[1], max(ev[2], 1), f"TensorRT: {ev[0]}")
        if "error" in result:
            raise result["error"]
        blob = result["blob"]
        path = cache.store(key, blob, {"model": parent.name, "step": self.label})
        yield Progress("engine", 1, 1, f"engine cached as {path.name}")
        child = new_artifact(out, parent.spec, copy=dict(parent.files), prov=provenance(
            parent, self.name, self.params(), engine=str(path), engine_key=key.to_json()))
        return child, {"engine": str(path), "from": fmt, "phases": len(phases)}


STEPS: dict[str, type[Step]] = {cls.name: cls for cls in (PruneStep, RecoverStep, DistillStep, SparsifyStep,
                                                             ExportStep, QuantizeStep, QatStep, EngineStep)}
BUDGET_KINDS = ("prune", "distill", "sparsify", "export", "int8", "fp16", "engine")


def parse_budget(text: str | None) -> dict[str, float]:
    """``prune=0.006,int8=0.004`` -> per-kind AP50 allowances (refusing unknown kinds and bad numbers)."""
    spec = OptionSpec("allowance", float, 0.0, low=0.0, high=1.0)
    budget: dict[str, float] = {}
    for item in [p.strip() for p in (text or "").split(",") if p.strip()]:
        kind, sep, value = item.partition("=")
        kind = kind.strip().lower()
        if not sep or kind not in BUDGET_KINDS:
            raise InputError(f"--budget: {item!r} is not KIND=AP50", hint=f"kinds: {', '.join(BUDGET_KINDS)}; "
                             "e.g. --budget prune=0.006,int8=0.004")
        budget[kind] = spec.parse(value, f"--budget {kind}")
    return budget


STEP_SPECS: dict[str, StepSpec] = {name: cls.step_spec() for name, cls in STEPS.items()}


def parse_steps(text: str) -> list[Step]:
    """``prune:0.5,recover,quantize:int8`` -> steps (refusing unknown names and options)."""
    steps = []
    for item in [s.strip() for s in text.split(",") if s.strip()]:
        name, *parts = item.split(":")
        if name not in STEPS:
            raise InputError(f"unknown step {name!r}", hint=f"steps: {', '.join(STEPS)}")
        arg = None
        opts = {}
        for part in parts:
            if "=" in part:
                k, v = part.split("=", 1)
                opts[k] = v
            elif arg is None:
                arg = part
            else:
                raise InputError(f"step {item!r}: more than one argument")
        steps.append(STEPS[name](arg, **opts))
    if not steps:
        raise InputError("no optimization steps given")
    return steps


def format_steps(steps: list[Step]) -> str:
    """The text :func:`parse_steps` reads back into the same steps."""
    return ",".join(s.label for s in steps)
