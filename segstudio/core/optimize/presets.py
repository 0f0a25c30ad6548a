"""Recipes a biologist can pick without knowing the steps: the optimization wizard's presets.

Each preset is a step list in :func:`~segstudio.core.optimize.steps.parse_steps`
text, a sentence on what it does and costs, and the target it is for.
:meth:`Preset.unavailable` says, in words, why one cannot run here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..backends import gpu_available, installed, torch_hint
from ..errors import InputError


@dataclass(frozen=True)
class Preset:
    key: str
    title: str
    sentence: str
    steps: str
    target: str = "cpu"

    def unavailable(self) -> str | None:
        """Why this preset cannot run on this machine, or ``None``."""
        from .steps import parse_steps

        steps = parse_steps(self.steps)
        if {s.name for s in steps} & {"prune", "recover", "distill", "export", "qat"} and not installed("torch"):
            return f"needs PyTorch ({torch_hint()})"
        if any(s.name in ("quantize", "qat") or s.opts.get("qat") for s in steps) and not installed("onnxruntime"):
            return "needs ONNX Runtime (pip install segstudio[onnx])"
        if self.target == "gpu":
            if not gpu_available():
                return "no NVIDIA GPU is visible on this machine"
            if "engine" in self.steps and not installed("tensorrt"):
                return "TensorRT is not installed (the NVIDIA TensorRT Python package)"
        return None


PRESETS: tuple[Preset, ...] = (
    Preset("int8", "Quantize (INT8)",
           "Stores weights and activations as 8-bit integers calibrated on your images: usually the largest "
           "speed-up on a CPU for the smallest accuracy cost, and the shortest run.",
           "quantize:int8"),
    Preset("prune-recover-int8", "Prune + recover + INT8",
           "Removes half of the network's channels, trains it back against the original on your images, then "
           "quantizes to INT8: faster still, but the recovery is a long training run (its time here is "
           "estimated below).",
           "prune:0.5,recover:steps=2500,quantize:int8"),
    Preset("prune-qat", "Maximum speed (prune + QAT)",
           "Removes half of the channels of every layer, trains the network back against the original on your "
           "images, then goes on training it as the INT8 model it becomes (quantization-aware training): the "
           "fastest CPU model that keeps the accuracy, and a long training run (its time is estimated below).",
           "prune:0.5:keep=none,recover:steps=2500:qat=true"),
    Preset("light", "Light model (distillation)",
           "Trains a much smaller network to imitate the original on your images: the fastest result, with a "
           "larger accuracy cost, and the longest run.",
           "distill:8:steps=3000"),
    Preset("gpu-fp16-engine", "GPU: FP16 + TensorRT engine",
           "Converts to half precision and builds a TensorRT engine for this GPU: the fastest on NVIDIA "
           "hardware, at no measurable accuracy cost.",
           "quantize:fp16,engine:fp16", target="gpu"),
)


def preset(key: str) -> Preset:
    for p in PRESETS:
        if p.key == key:
            return p
    raise InputError(f"no preset {key!r}", hint=f"presets: {', '.join(p.key for p in PRESETS)}")
