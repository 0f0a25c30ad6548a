"""PyTorch backend: CPU, or CUDA when present."""

from __future__ import annotations

import numpy as np

from ..errors import BackendUnavailableError, DeviceOutOfMemoryError
from ..models.catalog import Model
from .base import BackendBase


def _torch():
    try:
        import torch
    except ImportError:
        raise BackendUnavailableError(
            "PyTorch is not installed", hint="install segstudio[torch], or use --backend onnxruntime"
        ) from None
    return torch


class TorchBackend(BackendBase):
    name = "torch"

    def __init__(self, model: Model, *, device: str = "auto", threads: int | None = None):
        torch = _torch()
        from ..models.unet import build_unet

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailableError("PyTorch was asked for CUDA but sees no CUDA device")
        if threads:
            torch.set_num_threads(threads)
        state = torch.load(model.file("torch"), map_location="cpu", weights_only=True)
        net = build_unet(model.spec.config)
        net.load_state_dict(state)
        self._torch = torch
        self._dev = torch.device(device)
        self.net = net.eval().to(self._dev)
        self.device = str(self._dev) if self._dev.type == "cpu" else f"cuda:{self._dev.index or 0}"
        self.channels = model.spec.config.in_channels

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = self.check_batch(batch, self.channels)
        torch = self._torch
        try:
            with torch.inference_mode():
                out = self.net(torch.from_numpy(batch).to(self._dev))
                return out.float().cpu().numpy()
        except torch.cuda.OutOfMemoryError:
            raise DeviceOutOfMemoryError(
                f"the GPU ran out of memory on a batch of {batch.shape[0]} tiles of {batch.shape[2]}x{batch.shape[3]}",
                hint="use a smaller --tile or --batch-size",
            ) from None

    def describe(self) -> str:
        torch = self._torch
        where = (
            f"CPU, {torch.get_num_threads()} threads" if self._dev.type == "cpu"
            else f"CUDA {torch.cuda.get_device_name(self._dev)}"
        )
        return f"PyTorch {torch.__version__}, {where}, float32"
