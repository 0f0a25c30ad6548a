"""The one protocol every inference backend implements.

A backend turns a batch of normalized tiles ``(B, C, h, w)`` float32 into the
model's raw output ``(B, K, h, w)`` float32.  It says honestly what it runs
on (:meth:`Backend.describe`), so the user sees "onnxruntime 1.32,
CPUExecutionProvider, 2 threads" rather than what was asked for.

Backends are context managers (Polygraphy's runner pattern): resources are
taken in ``__init__`` and released by :meth:`close`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Backend(Protocol):
    name: str  # registry name: "torch", "onnxruntime"
    device: str  # what it really runs on: "cpu", "cuda:0"

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Raw model output for a ``(B, C, h, w)`` float32 batch."""
        ...

    def describe(self) -> str:
        """One line: library, version, device, precision, threads."""
        ...

    def close(self) -> None:
        ...


class BackendBase:
    """Shared plumbing: context manager, input checks."""

    name = "base"
    device = "cpu"

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:  # resources are released by dropping references
        return None

    @staticmethod
    def check_batch(batch: np.ndarray, channels: int) -> np.ndarray:
        if batch.ndim != 4 or batch.shape[1] != channels:
            raise ValueError(f"expected a (B, {channels}, h, w) batch, got {batch.shape}")
        return np.ascontiguousarray(batch, dtype=np.float32)
