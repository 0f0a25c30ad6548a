"""Inference backends behind one protocol, imported lazily.

A backend is asked for by a *variant* string ``name[@device][:precision][+option...]``:

==============  ===================  ==========================================  ================
name            devices              precisions                                  options
==============  ===================  ==========================================  ================
``torch``       cpu, cuda            cpu: fp32; cuda: fp32, fp16, bf16           cl, graph, compile
``onnxruntime`` cpu, cuda, tensorrt  cpu: fp32, int8; cuda: fp32, fp16;          -
                                     tensorrt: fp32, fp16, int8
``openvino``    cpu                  fp32, int8                                  -
``tensorrt``    cuda                 fp32, fp16, int8                            -
==============  ===================  ==========================================  ================

(aliases: ``ort``, ``ov``, ``trt``, ``pytorch``).  The table lives on the
backend classes; a request outside it is refused with the allowed values,
never quietly changed.  ``auto`` measures the FP32 variants that can run
here and takes the fastest (see :mod:`.autoselect`); precision is never
changed behind the user's back.  GPU backends live on their device's
thread (:mod:`.device`).
"""

from __future__ import annotations

from ..models.catalog import Model
from .base import Backend, BackendBase
from .registry import (
    ALIASES,
    CPU_BATCH,
    GPU_BATCH,
    REGISTRY,
    Variant,
    available_backends,
    backend_class,
    create_variant,
    gpu_available,
    installed,
    nvidia_driver_present,
    parse_variant,
    resolve_name,
    torch_hint,
)

__all__ = [
    "ALIASES", "CPU_BATCH", "GPU_BATCH", "REGISTRY", "Backend", "BackendBase", "Variant", "auto_variant",
    "available_backends", "backend_class", "create_backend", "create_variant", "gpu_available", "installed",
    "nvidia_driver_present", "parse_variant", "resolve_name", "runnable_variants", "torch_hint",
]


def create_backend(variant: str, model: Model, **options) -> Backend:
    """Create the backend for ``variant`` (or ``"auto"``) and ``model``.

    ``tile`` and ``batch_size`` (the segmentation's) tell ``auto`` the
    shape to measure and a fixed-shape engine (TensorRT) the profile to
    build (:func:`.registry.create_variant`); other keyword options go to
    the backend (``threads``...).  GPU variants are created on, and called
    through, their device thread.
    """
    if variant.strip().lower() == "auto":
        variant = auto_variant(model, **{k: v for k, v in options.items() if k in ("tile", "batch_size") and v})
    return create_variant(variant, model, **options)


def runnable_variants(model: Model) -> list[str]:
    """Variants that can run ``model`` on this machine in its precision, GPU ones first."""
    from .autoselect import candidates

    return candidates(model)


def auto_variant(model: Model, **options) -> str:
    """The variant ``auto`` stands for here (measured once per machine, then cached)."""
    from .autoselect import auto_variant as pick

    return pick(model, **options)
