"""OpenVINO backend (CPU).

On the 2-core AVX2 development machine OpenVINO runs the built-in U-Net in
FP32 about 1.3x faster than ONNX Runtime (see ``segstudio bench``).  The
ONNX file is compiled once per input shape (tiles of a plan share one
shape); FP32 precision is requested explicitly so that OpenVINO never
lowers it behind the user's back on CPUs with BF16 units.  OpenVINO's usage
telemetry is kept from loading (see :func:`_ov`).
"""

from __future__ import annotations

import sys

import numpy as np

from ..errors import BackendUnavailableError, IncompatibleArtifactError
from ..models.catalog import Model
from .base import BackendBase
from .ort_backend import default_threads


def _ov():
    # `import openvino` imports its converter, which sends usage telemetry over the network
    # unless the user opted out; with the telemetry package unimportable it uses its no-op stub.
    # segstudio never sends anything anywhere.
    for name in ("openvino_telemetry", "openvino_telemetry.backend"):
        sys.modules.setdefault(name, None)
    try:
        import openvino
    except ImportError:
        raise BackendUnavailableError(
            "OpenVINO is not installed", hint="install segstudio[openvino], or use another backend"
        ) from None
    return openvino


class OpenVinoBackend(BackendBase):
    name = "openvino"
    package = "openvino"
    devices = ("cpu",)
    precisions = {"cpu": ("fp32", "int8")}
    install_hint = 'pip install "segstudio[openvino]"'

    @classmethod
    def model_file(cls, device: str, precision: str) -> str:
        return "onnx_int8" if precision == "int8" else "onnx"

    def __init__(self, model: Model, *, device: str = "cpu", precision: str = "fp32",
                 options: frozenset[str] = frozenset(), threads: int | None = None):
        ov = _ov()
        self._ov = ov
        self.core = ov.Core()
        path = model.file(self.model_file(device, precision))
        try:
            self.model = self.core.read_model(str(path))
        except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses on bad files
            raise IncompatibleArtifactError(f"OpenVINO cannot read {path.name}: {e}") from None
        self.threads = threads or default_threads()
        self.config = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": self.threads,
            "INFERENCE_PRECISION_HINT": "f32",
        }
        self._compiled: dict[tuple, object] = {}
        self.device = "cpu"
        self.precision = precision
        self.variant = f"openvino@cpu:{precision}"
        self.channels = model.spec.input_channels

    def _request(self, shape: tuple):
        if shape not in self._compiled:
            m = self.model.clone()
            m.reshape({m.inputs[0]: list(shape)})
            self._compiled[shape] = self.core.compile_model(m, "CPU", self.config).create_infer_request()
        return self._compiled[shape]

    def predict(self, batch: np.ndarray, crop: tuple[slice, slice] | None = None) -> np.ndarray:
        batch = self.check_batch(batch, self.channels)
        req = self._request(batch.shape)
        req.infer({0: batch})
        # copy out of the request's buffer, which the next call overwrites
        return np.array(self.cropped(req.get_output_tensor(0).data, crop), dtype=np.float32, copy=True)

    def describe(self) -> str:
        return f"OpenVINO {self._ov.__version__.split('-')[0]}, CPU, {self.threads} threads, {self.precision}"

    def close(self) -> None:
        self._compiled.clear()
