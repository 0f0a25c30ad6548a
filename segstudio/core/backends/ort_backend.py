"""ONNX Runtime backend (CPU execution provider)."""

from __future__ import annotations

import os

import numpy as np

from ..errors import BackendUnavailableError, IncompatibleArtifactError
from ..models.catalog import Model
from .base import BackendBase


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError(
            "ONNX Runtime is not installed", hint="install segstudio[onnx], or use --backend torch"
        ) from None
    return onnxruntime


def default_threads() -> int:
    """Threads for intra-op parallelism: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class OrtBackend(BackendBase):
    name = "onnxruntime"

    def __init__(self, model: Model, *, device: str = "cpu", threads: int | None = None):
        ort = _ort()
        if device not in ("cpu", "auto"):
            raise BackendUnavailableError(f"the onnxruntime backend runs on the CPU only here, not {device!r}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(model.file("onnx")), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # noqa: BLE001 - ORT raises its own untyped errors on bad files
            raise IncompatibleArtifactError(f"ONNX Runtime cannot load {model.file('onnx').name}: {e}") from None
        self._ort = ort
        self.threads = opts.intra_op_num_threads
        self.providers = self.session.get_providers()
        self.device = "cpu"
        self.input_name = self.session.get_inputs()[0].name
        self.channels = model.spec.config.in_channels

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = self.check_batch(batch, self.channels)
        return self.session.run(None, {self.input_name: batch})[0]

    def describe(self) -> str:
        return f"ONNX Runtime {self._ort.__version__}, {self.providers[0]}, {self.threads} threads, float32"
