"""ONNX Runtime backend: CPU, or CUDA / TensorRT execution providers.

The GPU providers come with the ``onnxruntime-gpu`` package (which replaces
``onnxruntime``: the two must never be installed together).  When its CUDA
libraries are missing, ONNX Runtime silently runs on the CPU instead; this
backend checks ``session.get_providers()`` and refuses to pretend.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError, IncompatibleArtifactError
from ..models.catalog import Model
from .base import BackendBase, Variant

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError(
            "ONNX Runtime is not installed", hint="install segstudio[onnx], or use another backend"
        ) from None
    return onnxruntime


def default_threads() -> int:
    """Threads for intra-op parallelism: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def check_providers(requested: str, active: list[str], available: list[str]) -> None:
    """Refuse a session that does not really run on the requested provider."""
    if requested not in available:
        raise BackendUnavailableError(
            f"this ONNX Runtime has no {requested} (it offers: {', '.join(available)})",
            hint="install onnxruntime-gpu instead of onnxruntime for CUDA / TensorRT",
        )
    if not active or active[0] != requested:
        raise BackendUnavailableError(
            f"ONNX Runtime could not start {requested} and would run on {active[0] if active else 'nothing'}",
            hint="the CUDA / cuDNN / TensorRT libraries it needs are missing or do not match",
        )


class OrtBackend(BackendBase):
    name = "onnxruntime"
    package = "onnxruntime"
    devices = ("cpu", "cuda", "tensorrt")
    precisions = {"cpu": ("fp32", "int8"), "cuda": ("fp32", "fp16"), "tensorrt": ("fp32", "fp16", "int8")}
    gpu_devices = frozenset({"cuda", "tensorrt"})
    install_hint = 'pip install "segstudio[onnx]" (CPU) or "segstudio[gpu]" (NVIDIA), never both'

    @classmethod
    def model_file(cls, device: str, precision: str) -> str:
        if precision == "int8":
            return "onnx_int8"
        if precision == "fp16" and device == "cuda":
            return "onnx_fp16"
        return "onnx"

    def __init__(self, model: Model, variant: Variant | None = None, *, threads: int | None = None,
                 cache_dir: str | Path | None = None):
        variant = variant or self.default_variant()
        device, precision = variant.device, variant.precision
        ort = _ort()
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        self._bound_memory(ort, opts, device)
        provider = PROVIDERS[device]
        providers: list = [provider]
        if device == "tensorrt":
            from ..errors import log_dir

            cache = Path(cache_dir or log_dir().parent / "engines")
            cache.mkdir(parents=True, exist_ok=True)
            providers = [
                (provider, {"trt_fp16_enable": precision == "fp16", "trt_int8_enable": precision == "int8",
                            "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                            "trt_timing_cache_enable": True}),
                "CUDAExecutionProvider",
            ]
        path = model.file(self.model_file(device, precision))
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own untyped errors on bad files
            raise IncompatibleArtifactError(f"ONNX Runtime cannot load {path.name}: {e}") from None
        check_providers(provider, self.session.get_providers(), ort.get_available_providers())
        self._ort = ort
        self.threads = opts.intra_op_num_threads
        self.providers = self.session.get_providers()
        self.device = "cpu" if device == "cpu" else "cuda:0"
        self.precision = precision
        self.variant = f"onnxruntime@{device}:{precision}"
        self.input_name = self.session.get_inputs()[0].name
        self.channels = model.spec.input_channels

    @staticmethod
    def _bound_memory(ort, opts, device: str) -> None:
        """Keep ONNX Runtime's CPU memory bounded however many input shapes a run brings.

        Its memory patterns plan one block per input shape, and its CPU arena
        keeps every block it ever took: over 150 mixed shapes (batches of 1
        to 4 tiles, 240 to 648 px) the default model's session grew from 0.9
        to 2.3 GB and went on growing.  Without memory patterns it stopped at
        1.5 GB (about twice what the largest run needs; the light model: 0.84
        GB) at the same speed; without the arena, plain malloc crept up too
        and ran 10-30 % slower; shrinking the arena after each run of a new
        shape held 0.2-0.75 GB but cost 13 % on mixed shapes
        (``benchmarks/shapes.py``).
        """
        opts.enable_mem_pattern = False

    def _infer(self, batch: np.ndarray, crop: tuple[slice, slice] | None) -> np.ndarray:
        out = self.session.run(None, {self.input_name: batch})[0].astype(np.float32, copy=False)
        return self.cropped(out, crop)

    def describe(self) -> str:
        threads = f", {self.threads} threads" if self.device == "cpu" else ""
        return f"ONNX Runtime {self._ort.__version__}, {self.providers[0]}{threads}, {self.precision}"
