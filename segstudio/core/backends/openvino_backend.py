"""OpenVINO backend (CPU).

On the 2-core AVX2 development machine OpenVINO runs the built-in U-Net in
FP32 about 1.3x faster than ONNX Runtime (see ``segstudio bench``).  FP32
precision is requested explicitly so that OpenVINO never lowers it behind
the user's back on CPUs with BF16 units.  OpenVINO's usage telemetry is kept
from loading (see :func:`_ov`).

Memory stays bounded however many input shapes a long run brings (images of
every size, resampled by every scale factor): the network is compiled
*once*, with the sizes it declares (the built-in models: dynamic batch,
height and width), and OpenVINO's cache of per-shape kernels is capped
(:data:`SHAPE_CACHE`).  Compiling once per shape
instead, as this backend did, kept about 100 MB of buffers per shape forever
(a batch over 200 mixed images passed 8 GB); an LRU of per-shape compiles or
tiles padded to a few canonical shapes were measured against the dynamic
model and were not faster (``benchmarks/shapes.py``).  The tiles of a batch
go through one at a time: on a CPU that is as fast as a batch of four, and
the activations held are those of one tile (about 210 MB for a 640 px tile
of the default model) instead of four.
"""

from __future__ import annotations

import sys

import numpy as np

from ..errors import BackendUnavailableError, IncompatibleArtifactError
from ..models.catalog import Model
from .base import BackendBase, Variant
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


# per-shape kernels OpenVINO's CPU plugin keeps for a dynamic model (its default, 5000, grew by about
# 2 MB per new shape without end)
SHAPE_CACHE = 32


class OpenVinoBackend(BackendBase):
    name = "openvino"
    package = "openvino"
    devices = ("cpu",)
    precisions = {"cpu": ("fp32", "int8")}
    install_hint = 'pip install "segstudio[openvino]"'

    @classmethod
    def model_file(cls, device: str, precision: str) -> str:
        return "onnx_int8" if precision == "int8" else "onnx"

    def __init__(self, model: Model, variant: Variant | None = None, *, threads: int | None = None):
        variant = variant or self.default_variant()
        device, precision = variant.device, variant.precision
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
            "CPU_RUNTIME_CACHE_CAPACITY": SHAPE_CACHE,
        }
        self.device = "cpu"
        self.precision = precision
        self.variant = f"openvino@cpu:{precision}"
        self.channels = model.spec.input_channels
        self.file = path.name
        # the sizes the network declares: dynamic ones (None) take any value (the built-in models'
        # batch, height and width); a declared size is what the network takes, as in ONNX Runtime
        self.input_shape = tuple(None if d.is_dynamic else d.get_length()
                                 for d in self.model.inputs[0].get_partial_shape())
        # tiles per inference: one, unless the network's batch is fixed
        self.n_batch = self.input_shape[0] if isinstance(self.input_shape[0], int) else 1
        self._request = None
        self._compile()

    def _compile(self):
        if self._request is None:
            try:
                self._request = self.core.compile_model(self.model, "CPU", self.config).create_infer_request()
            except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses
                raise IncompatibleArtifactError(f"OpenVINO cannot compile {self.file}: {e}") from None
        return self._request

    def _infer(self, batch: np.ndarray, crop: tuple[slice, slice] | None) -> np.ndarray:
        if any(n is not None and n != m for n, m in zip(self.input_shape[1:], batch.shape[1:])):
            raise IncompatibleArtifactError(
                f"{self.file} takes inputs of {'x'.join(str(n or 'any') for n in self.input_shape[2:])} px only, "
                f"not {batch.shape[2]}x{batch.shape[3]}")
        request = self._compile()
        out = None
        step = self.n_batch
        for i in range(0, batch.shape[0], step):
            part = batch[i : i + step]
            if len(part) < step:  # a model with a fixed batch: fill it up
                part = np.concatenate([part, np.zeros((step - len(part), *part.shape[1:]), np.float32)])
            request.infer({0: part})
            o = self.cropped(request.get_output_tensor(0).data, crop)
            if out is None:
                out = np.empty((batch.shape[0], *o.shape[1:]), np.float32)
            n = min(step, batch.shape[0] - i)
            out[i : i + n] = o[:n]  # a copy out of the request's buffer, which the next call overwrites
        return out

    def describe(self) -> str:
        return f"OpenVINO {self._ov.__version__.split('-')[0]}, CPU, {self.threads} threads, {self.precision}"

    def close(self) -> None:
        self._request = None
