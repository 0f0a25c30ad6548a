"""The reference network: the PyTorch module as trained, eager, FP32 (what every speed-up is measured against).

The benchmark's baseline, the optimizer's speed reference and the
estimate's calibration all run this one class.
"""

from __future__ import annotations

import numpy as np

from ..models.catalog import Model

BASELINE = "baseline"


class EagerTorch:
    """The baseline network: the PyTorch module as trained, eager, FP32, CPU or CUDA."""

    name = BASELINE
    precision = "fp32"
    variant = BASELINE

    def __init__(self, model: Model, device: str = "cpu"):
        import torch

        from ..models.unet import build_unet

        net = build_unet(model.spec.config)
        net.load_state_dict(torch.load(model.file("torch"), map_location="cpu", weights_only=True))
        self._torch = torch
        self.device = device
        self.net = net.eval().to(device)

    def predict(self, batch: np.ndarray, crop: tuple[slice, slice] | None = None) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            out = self.net(torch.from_numpy(batch).to(self.device)).cpu().numpy()
        return out if crop is None else out[(Ellipsis, *crop)]  # the plain way: crop after the copy

    def describe(self) -> str:
        where = "CPU" if self.device == "cpu" else f"CUDA {self._torch.cuda.get_device_name()}"
        return f"PyTorch {self._torch.__version__} eager, {where}, float32 (baseline)"

    def close(self) -> None:
        pass
