"""PyTorch backend: CPU (FP32), or CUDA with FP32 / FP16 / BF16.

Options (CUDA only):

* ``cl``: channels-last memory format (faster convolutions on tensor cores);
* ``graph``: CUDA graphs, one captured per input shape (tiles of a plan all
  share one shape, so a whole image replays one graph: no per-layer launch
  overhead);
* ``compile``: ``torch.compile`` (Inductor; the first call of each shape
  compiles, which takes a while).

Host <-> device copies go through a pinned staging buffer.
"""

from __future__ import annotations

import numpy as np

from ..errors import BackendUnavailableError, DeviceOutOfMemoryError
from ..models.catalog import Model
from ..threads import torch_threads
from .base import BackendBase, Variant
from .registry import torch_hint

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _torch():
    try:
        import torch
    except ImportError:
        raise BackendUnavailableError("PyTorch is not installed",
                                      hint=f"{TorchBackend.install_hint}, or use another backend") from None
    return torch


class TorchBackend(BackendBase):
    name = "torch"
    package = "torch"
    devices = ("cpu", "cuda")
    precisions = {"cpu": ("fp32",), "cuda": ("fp32", "fp16", "bf16")}
    options = frozenset({"cl", "graph", "compile"})
    gpu_devices = frozenset({"cuda"})
    install_hint = torch_hint()  # the pip extra, or in the standalone app its full package

    @classmethod
    def model_file(cls, device: str, precision: str) -> str:
        return "torch"

    def __init__(self, model: Model, variant: Variant | None = None, *, threads: int | None = None):
        variant = variant or self.default_variant()
        device, precision, options = variant.device, variant.precision, variant.options
        torch = _torch()
        from ..models.unet import build_unet, fold_batchnorm

        if device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError("PyTorch sees no CUDA device", hint="use a CPU backend")
        if device == "cpu" and options:
            raise BackendUnavailableError(f"options {', '.join(sorted(options))} need CUDA")
        self._threads = threads if device == "cpu" else None  # set around each call, not for the process
        state = torch.load(model.file("torch"), map_location="cpu", weights_only=True)
        net = build_unet(model.spec.config)
        net.load_state_dict(state)
        net = fold_batchnorm(net.eval())
        self._torch = torch
        self._dev = torch.device("cuda" if device == "cuda" else "cpu")
        self._dtype = getattr(torch, _DTYPES[precision])
        self._format = torch.channels_last if "cl" in options else torch.contiguous_format
        net = net.to(self._dev, dtype=self._dtype, memory_format=self._format)
        if device == "cuda":
            torch.backends.cudnn.benchmark = True  # one tile shape per plan: autotune once
        self.net = torch.compile(net) if "compile" in options else net
        self.device = "cpu" if device == "cpu" else f"cuda:{torch.cuda.current_device()}"
        self.precision = precision
        self.options = options
        self.variant = f"torch@{device}:{precision}" + "".join(f"+{o}" for o in sorted(options))
        self.channels = model.spec.input_channels
        self._graphs: dict[tuple, tuple] = {}
        self._pinned: dict[tuple, object] = {}

    def _forward(self, x):
        out = self.net(x)
        return out.float()

    def _graph_for(self, shape: tuple):
        """Capture (once per shape) a CUDA graph of the forward pass."""
        torch = self._torch
        if shape not in self._graphs:
            static_in = torch.zeros(shape, device=self._dev, dtype=self._dtype).contiguous(memory_format=self._format)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(3):  # warm up cuDNN autotuning outside the capture
                    self._forward(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.inference_mode():
                static_out = self._forward(static_in)
            self._graphs[shape] = (graph, static_in, static_out)
        return self._graphs[shape]

    def _infer(self, batch: np.ndarray, crop: tuple[slice, slice] | None) -> np.ndarray:
        torch = self._torch
        try:
            with torch.inference_mode():
                if self._dev.type == "cpu":
                    with torch_threads(self._threads):
                        return self.cropped(self._forward(torch.from_numpy(batch)).numpy(), crop)
                # pinned staging buffer -> asynchronous upload; float32 on the wire, cast on the GPU
                host = self._pinned.get(batch.shape)
                if host is None:
                    host = self._pinned.setdefault(batch.shape, torch.empty(batch.shape).pin_memory())
                np.copyto(host.numpy(), batch)
                if "graph" in self.options:
                    graph, static_in, static_out = self._graph_for(tuple(batch.shape))
                    static_in.copy_(host, non_blocking=True)
                    graph.replay()
                    out = static_out
                else:
                    x = host.to(self._dev, non_blocking=True).to(self._dtype).contiguous(memory_format=self._format)
                    out = self._forward(x)
                if crop is not None:
                    out = out[(Ellipsis, *crop)]
                # download only the kept window, into pinned memory (the caching host allocator reuses it)
                result = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
                result.copy_(out.contiguous(), non_blocking=True)
                torch.cuda.current_stream().synchronize()
                return result.numpy()
        except torch.cuda.OutOfMemoryError:
            self._graphs.clear()
            torch.cuda.empty_cache()
            raise DeviceOutOfMemoryError(
                f"the GPU ran out of memory on a batch of {batch.shape[0]} tiles of {batch.shape[2]}x{batch.shape[3]}",
                hint="use a smaller --tile or --batch-size",
            ) from None

    def describe(self) -> str:
        torch = self._torch
        if self._dev.type == "cpu":
            where = f"CPU, {self._threads or torch.get_num_threads()} threads"
        else:
            where = f"CUDA {torch.cuda.get_device_name(self._dev)}"
        extra = "".join(f", {o}" for o in sorted(self.options))
        return f"PyTorch {torch.__version__}, {where}, {_DTYPES[self.precision]}{extra}"

    def close(self) -> None:
        self._graphs.clear()
        self._pinned.clear()
