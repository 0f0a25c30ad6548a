"""Native TensorRT backend (TensorRT 10 and 11), with an engine cache.

Written against the name-based tensor API of TensorRT 10+:
``build_serialized_network``, optimization profiles, a timing cache,
``IProgressMonitor`` for build progress and cancel, ``num_io_tensors`` /
``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``.
TensorRT 11 only builds strongly typed networks, so there the precision comes
from the ONNX graph (an FP16 or Q/DQ INT8 file); on 10 the FP16 / INT8 builder
flags are set instead.  Device buffers are torch CUDA tensors (pycuda needs a
compiler and a driver at install time; torch is there anyway).

TensorRT cannot be installed in segstudio's development workplace, so this
file is exercised only where TensorRT exists; the cache and refusal logic
(:mod:`.engine_cache`) is tested everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import BackendUnavailableError, Cancelled, DeviceOutOfMemoryError, StepFailedError
from ..jobs import CancelToken
from ..models.catalog import Model
from ..models.spec import file_sha256
from .base import BackendBase, Variant
from .engine_cache import EngineCache, EngineKey, Profile, default_profile


def _trt():
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailableError(
            "TensorRT is not installed",
            hint="install NVIDIA TensorRT 10 or 11 for Python (pip install tensorrt from NVIDIA's index)",
        ) from None
    return tensorrt


def _torch_cuda():
    try:
        import torch
    except ImportError:
        raise BackendUnavailableError("the TensorRT backend needs PyTorch for its GPU buffers") from None
    if not torch.cuda.is_available():
        raise BackendUnavailableError("TensorRT needs an NVIDIA GPU; none is visible")
    return torch


def machine_key(model_sha256: str, precision: str, profile: Profile) -> EngineKey:
    trt, torch = _trt(), _torch_cuda()
    major, minor = torch.cuda.get_device_capability()
    return EngineKey(
        model_sha256=model_sha256, precision=precision, profile=profile,
        gpu=torch.cuda.get_device_name(), compute_capability=f"{major}.{minor}", tensorrt=trt.__version__,
    )


def build_engine(
    onnx_path: str | Path,
    profile: Profile,
    precision: str = "fp32",
    *,
    workspace_bytes: int = 4 << 30,
    optimization_level: int = 3,
    timing_cache: str | Path | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    cancel: CancelToken | None = None,
) -> bytes:
    """Build a serialized engine from an ONNX file.

    ``on_progress(phase, step, steps)`` is called from TensorRT's builder
    threads; setting ``cancel`` stops the build at its next step.
    """
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0
    if major >= 11:  # strongly typed only: precision comes from the graph
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise StepFailedError(f"TensorRT could not parse {Path(onnx_path).name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    config.builder_optimization_level = optimization_level
    if major < 11:
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    trt_profile = builder.create_optimization_profile()
    trt_profile.set_shape(network.get_input(0).name, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(trt_profile)
    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    cancel = cancel or CancelToken()

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.steps: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.steps[phase_name] = num_steps

        def step_complete(self, phase_name, step):
            if on_progress is not None:
                on_progress(phase_name, step + 1, self.steps.get(phase_name, 0))
            return not cancel.cancelled  # False asks TensorRT to stop

        def phase_finish(self, phase_name):
            pass

    monitor = Monitor()
    config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if cancel.cancelled:
        raise Cancelled("engine build cancelled")
    if serialized is None:
        raise StepFailedError("TensorRT failed to build the engine (see the log for the layer it stopped at)")
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


class TensorRTBackend(BackendBase):
    name = "tensorrt"
    package = "tensorrt"
    devices = ("cuda",)
    precisions = {"cuda": ("fp32", "fp16", "int8")}
    gpu_devices = frozenset({"cuda"})
    install_hint = "install NVIDIA TensorRT 10 or 11 for Python from NVIDIA's package index"

    @classmethod
    def model_file(cls, device: str, precision: str) -> str:
        # INT8 always comes from a Q/DQ graph; FP16 from the FP32 graph with the FP16 flag on
        # TensorRT 10, from an FP16 graph on TensorRT 11 (strongly typed; chosen in __init__).
        return "onnx_int8" if precision == "int8" else "onnx"

    takes_profile = True  # create_variant sizes tile_shape and batch_size from the segmentation's tiling

    def __init__(self, model: Model, variant: Variant | None = None, *, threads: int | None = None,
                 tile_shape: tuple[int, int] = (640, 640), batch_size: int = 4,
                 cache_dir: str | Path | None = None, engine: str | Path | None = None):
        variant = variant or self.default_variant()
        device, precision = variant.device, variant.precision
        trt, torch = _trt(), _torch_cuda()
        from ..errors import log_dir
        from .engine_cache import check_engine_file

        strongly_typed = int(trt.__version__.split(".")[0]) >= 11
        onnx = model.file("onnx_fp16" if strongly_typed and precision == "fp16" else self.model_file(device, precision))
        profile = default_profile(model.spec.input_channels, model.spec.multiple, tile_shape, batch_size)
        key = machine_key(file_sha256(onnx), precision, profile)
        cache = EngineCache(cache_dir or log_dir().parent / "engines")
        if engine is not None:
            blob = check_engine_file(engine, key)
        else:
            blob = cache.load(key)
            if blob is None:
                blob = build_engine(onnx, profile, precision, timing_cache=cache.root / "timing.cache")
                cache.store(key, blob, {"onnx": onnx.name, "model": model.name})
        self._trt, self._torch = trt, torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise BackendUnavailableError("TensorRT could not load the cached engine; delete it to rebuild")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_name = next(n for n in names if is_input[n])
        self.output_name = next(n for n in names if not is_input[n])
        self._in_dtype = self._torch_dtype(self.engine.get_tensor_dtype(self.input_name))
        self._out_dtype = self._torch_dtype(self.engine.get_tensor_dtype(self.output_name))
        self.stream = torch.cuda.Stream()
        self.profile = profile
        self.key = key
        self.device = f"cuda:{torch.cuda.current_device()}"
        self.precision = precision
        self.variant = f"tensorrt@cuda:{precision}"
        self.channels = model.spec.input_channels

    def _torch_dtype(self, trt_dtype):
        trt, torch = self._trt, self._torch
        return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}[trt_dtype]

    def _infer(self, batch: np.ndarray, crop: tuple[slice, slice] | None) -> np.ndarray:
        if not self.profile.covers(batch.shape):
            raise BackendUnavailableError(
                f"a batch of shape {batch.shape} is outside the engine's profile {self.profile.max}",
                hint="use a tile size and batch size within the engine's profile, or rebuild it",
            )
        torch = self._torch
        try:
            with torch.cuda.stream(self.stream):
                x = torch.from_numpy(batch).pin_memory().to("cuda", non_blocking=True).to(self._in_dtype)
                self.context.set_input_shape(self.input_name, tuple(x.shape))
                out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)),
                                  dtype=self._out_dtype, device="cuda")
                self.context.set_tensor_address(self.input_name, x.data_ptr())
                self.context.set_tensor_address(self.output_name, out.data_ptr())
                if not self.context.execute_async_v3(self.stream.cuda_stream):
                    raise BackendUnavailableError("TensorRT failed to run the engine")
                if crop is not None:
                    out = out[(Ellipsis, *crop)]
                result = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
                result.copy_(out.float().contiguous(), non_blocking=True)
            self.stream.synchronize()
            return result.numpy()
        except torch.cuda.OutOfMemoryError:
            raise DeviceOutOfMemoryError(
                f"the GPU ran out of memory on a batch of {batch.shape[0]} tiles", hint="use a smaller --batch-size"
            ) from None

    def describe(self) -> str:
        return f"TensorRT {self._trt.__version__}, CUDA {self._torch.cuda.get_device_name()}, {self.precision}"

    def close(self) -> None:
        self.context = None
        self.engine = None
