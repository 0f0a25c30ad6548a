"""The backend registry: names, variants, what is installed, and creating a named variant.

:mod:`segstudio.core.backends` re-exports all of it and adds ``auto``
(:mod:`.autoselect`, which measures variants created here).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from functools import lru_cache

from ..errors import BackendUnavailableError, InputError
from ..models.catalog import Model
from .base import Backend, BackendBase, Variant

# name -> (module, class)
REGISTRY = {
    "torch": (".torch_backend", "TorchBackend"),
    "onnxruntime": (".ort_backend", "OrtBackend"),
    "openvino": (".openvino_backend", "OpenVinoBackend"),
    "tensorrt": (".tensorrt_backend", "TensorRTBackend"),
}
ALIASES = {"ort": "onnxruntime", "pytorch": "torch", "ov": "openvino", "trt": "tensorrt"}


def resolve_name(name: str) -> str:
    name = ALIASES.get(name.lower(), name.lower())
    if name != "auto" and name not in REGISTRY:
        raise InputError(f"unknown backend {name!r}", hint=f"choose one of: auto, {', '.join(REGISTRY)}")
    return name


def backend_class(name: str) -> type[BackendBase]:
    module, cls = REGISTRY[resolve_name(name)]
    return getattr(importlib.import_module(module, __package__), cls)


def parse_variant(text: str) -> Variant:
    """Parse and check ``name[@device][:precision][+option...]`` against the backend's table."""
    base, *opts = text.strip().split("+")
    head, _, precision = base.partition(":")
    name, _, device = head.partition("@")
    name = resolve_name(name)
    if name == "auto":
        raise InputError("'auto' is not a concrete backend variant")
    cls = backend_class(name)
    device = (device or cls.devices[0]).lower()
    if device not in cls.devices:
        raise InputError(f"{name} runs on {', '.join(cls.devices)}, not {device!r}")
    allowed = cls.precisions[device]
    precision = (precision or "fp32").lower()
    if precision not in allowed:
        raise InputError(f"{name} on {device} supports {', '.join(allowed)}, not {precision!r}",
                         hint="FP16 / BF16 are not faster on CPUs without native support" if device == "cpu" else None)
    options = frozenset(o.lower() for o in opts if o)
    unknown = options - cls.options
    if unknown:
        offered = ", ".join(sorted(cls.options)) or "none"
        raise InputError(f"{name} has no option {', '.join(sorted(unknown))} (options: {offered})")
    return Variant(name, device, precision, options, on_gpu=device in cls.gpu_devices)


def installed(package: str) -> bool:
    """Whether ``package`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def torch_hint() -> str:
    """How to get PyTorch: the full app package when this is the standalone app, else the pip extra."""
    if getattr(sys, "frozen", False):
        return "install the segstudio-full package: the app with PyTorch"
    return 'pip install "segstudio[torch]"'


def nvidia_driver_present() -> bool:
    """Whether this machine has an NVIDIA driver loaded, without importing any CUDA library.

    Linux: the driver's ``/proc`` entry or its control device; Windows: the
    CUDA driver DLL; macOS has no CUDA.
    """
    if sys.platform.startswith("linux"):
        return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")
    if sys.platform == "win32":
        return os.path.exists(os.path.join(os.environ.get("SystemRoot", r"C:\Windows"), "System32", "nvcuda.dll"))
    return False


@lru_cache(maxsize=1)
def gpu_available() -> bool:
    """An NVIDIA GPU that PyTorch can use (the check every GPU variant's availability starts from).

    Importing PyTorch takes seconds; on a machine without an NVIDIA driver
    (most lab PCs) it is not imported at all.
    """
    if not nvidia_driver_present() or not installed("torch"):
        return False
    import torch

    return bool(torch.cuda.is_available())


def available_backends(model: Model | None = None) -> list[str]:
    """Backends whose library is installed (and, given a model, whose FP32 file it has)."""
    out = []
    for name in REGISTRY:
        cls = backend_class(name)
        if not installed(cls.package):
            continue
        if model is not None and cls.model_file(cls.devices[0], "fp32") not in model.files:
            continue
        out.append(name)
    return out


CPU_BATCH = 4
GPU_BATCH = 16  # the H100 bench: network 1.5x faster at 16 tiles a call than at 4 (benchmarks/results)


def create_variant(variant: str, model: Model, *, tile: int | None = None, batch_size: int | None = None,
                   **options) -> Backend:
    """Create the backend of one named ``variant`` (not ``"auto"``) for ``model``.

    Parameters
    ----------
    variant : str
        ``name[@device][:precision][+option...]``.
    model : Model
    tile, batch_size : int, optional
        The tile (network pixels, default 512) and tiles per call (default
        4 on a CPU, 16 on a GPU) the segmentation will use: a backend that
        builds for fixed shapes (``takes_profile``: TensorRT) builds its
        profile for the largest input that tiling sends
        (:meth:`~segstudio.core.segment.scale.GridScaling.bound`) and that batch.
    **options
        Passed to the backend (``threads``...).

    Returns
    -------
    Backend
        GPU variants are created on, and called through, their device thread.
    """
    v = parse_variant(variant)
    cls = backend_class(v.name)
    if getattr(cls, "takes_profile", False):
        from ..segment.scale import GridScaling

        options.setdefault("tile_shape", GridScaling.bound(model.spec, tile or 512))
        options.setdefault("batch_size", batch_size or (GPU_BATCH if v.on_gpu else CPU_BATCH))
        if model.spec.max_batch:
            options["batch_size"] = min(options["batch_size"], model.spec.max_batch)
    if not installed(cls.package):
        raise BackendUnavailableError(f"{cls.package} is not installed (the {v.name} backend needs it)",
                                      hint=cls.install_hint)
    fmt = cls.model_file(v.device, v.precision)
    if fmt not in model.files:
        raise BackendUnavailableError(
            f"model {model.name!r} has no {fmt} file for {v.text}",
            hint="create it with segstudio optimize (quantize / fp16 steps)" if fmt != "onnx" else None,
        )

    def factory():
        return cls(model, v, **options)

    if v.on_gpu:
        from .device import DeviceBound, DeviceThread

        backend = DeviceBound(DeviceThread.get("cuda:0"), factory)
    else:
        backend = factory()
    if model.spec.max_batch:  # a network of fixed batch size: bigger batches go through in parts
        from .base import BatchLimited

        return BatchLimited(backend, model.spec.max_batch)
    return backend
