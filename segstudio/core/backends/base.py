"""The one protocol every inference backend implements.

A backend turns a batch of normalized tiles ``(B, C, h, w)`` float32 into the
model's raw output ``(B, K, h, w)`` float32.  It says honestly what it runs
on (:meth:`Backend.describe`), so the user sees "ONNX Runtime 1.32,
CPUExecutionProvider, 2 threads, float32" rather than what was asked for.

Each backend class declares what it supports (devices, precisions per
device, options) as plain class attributes, so a request can be checked and
refused with a clear message *before* the backend's library is imported;
``model_file(device, precision)`` says which file of the model card it
needs.  Backends follow Polygraphy's runner shape: :meth:`BackendBase.predict`
checks the batch once and calls the backend's ``_infer``; they are context
managers whose resources are taken in ``__init__`` and released by
:meth:`close`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Variant:
    """A backend request, parsed and checked once (:func:`~segstudio.core.backends.registry.parse_variant`).

    ``name``: the registry name; ``device``: ``cpu``, ``cuda``, ...;
    ``precision``: ``fp32``, ``fp16``, ``bf16``, ``int8``; ``options``:
    the backend's switches (``graph``, ``cl``...); ``on_gpu``: it runs on
    a GPU device (through the device thread).
    """

    name: str
    device: str
    precision: str
    options: frozenset[str] = frozenset()
    on_gpu: bool = False

    @property
    def text(self) -> str:
        """``name@device:precision+option...``, as the command line takes it."""
        return f"{self.name}@{self.device}:{self.precision}" + "".join(f"+{o}" for o in sorted(self.options))


@runtime_checkable
class Backend(Protocol):
    name: str  # registry name: "torch", "onnxruntime", "openvino", "tensorrt"
    device: str  # what it really runs on: "cpu", "cuda:0"
    precision: str  # "fp32", "fp16", "bf16", "int8"

    def predict(self, batch: np.ndarray, crop: tuple[slice, slice] | None = None) -> np.ndarray:
        """Raw model output for a ``(B, C, h, w)`` float32 batch, float32.

        ``crop`` (rows, columns) keeps only that window of the output: the
        tiler drops each tile's halo anyway, and a GPU backend then copies
        a third less back to the host.
        """
        ...

    def describe(self) -> str:
        """One line: library, version, device, precision, threads."""
        ...

    def close(self) -> None:
        ...


class BackendBase(ABC):
    """Shared plumbing: capability table, context manager, input checks."""

    name: ClassVar[str] = "base"
    package: ClassVar[str] = ""  # the Python package it needs
    devices: ClassVar[tuple[str, ...]] = ("cpu",)  # the first is the default
    precisions: ClassVar[dict[str, tuple[str, ...]]] = {"cpu": ("fp32",)}
    options: ClassVar[frozenset[str]] = frozenset()
    gpu_devices: ClassVar[frozenset[str]] = frozenset()  # devices that need the device thread
    install_hint: ClassVar[str] = ""

    device = "cpu"
    precision = "fp32"
    channels = 1  # input channels of the model (set by the backend's __init__)

    def predict(self, batch: np.ndarray, crop: tuple[slice, slice] | None = None) -> np.ndarray:
        """Raw model output of a ``(B, C, h, w)`` batch: the batch checked once here, then the backend's ``_infer``.

        Parameters
        ----------
        batch : numpy.ndarray
            ``(B, C, h, w)`` normalized tiles; ``C`` must be the model's input channels.
        crop : tuple of slice, optional
            The (rows, columns) window of the output to keep (the tiles' cores).

        Returns
        -------
        numpy.ndarray
            ``(B, K, h', w')`` float32 outputs (the ``crop`` window when given).
        """
        return self._infer(self.check_batch(batch, self.channels), crop)

    @abstractmethod
    def _infer(self, batch: np.ndarray, crop: tuple[slice, slice] | None) -> np.ndarray:
        """The backend's network call on a checked, contiguous float32 batch (Polygraphy's ``infer``)."""

    @classmethod
    def model_file(cls, device: str, precision: str) -> str:
        """The model-card file format this device / precision runs from."""
        return "onnx"

    @classmethod
    def default_variant(cls) -> Variant:
        """The backend on its default device in FP32 (what a backend created without a variant runs)."""
        return Variant(cls.name, cls.devices[0], "fp32", on_gpu=cls.devices[0] in cls.gpu_devices)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:  # resources are released by dropping references
        return None

    @staticmethod
    def cropped(out: np.ndarray, crop: tuple[slice, slice] | None) -> np.ndarray:
        return out if crop is None else out[(Ellipsis, *crop)]

    @staticmethod
    def check_batch(batch: np.ndarray, channels: int) -> np.ndarray:
        if batch.ndim != 4 or batch.shape[1] != channels:
            raise ValueError(f"expected a (B, {channels}, h, w) batch, got {batch.shape}")
        return np.ascontiguousarray(batch, dtype=np.float32)


class BatchLimited:
    """A backend whose network takes at most ``max_batch`` tiles a call (a fixed batch dimension).

    Larger batches are split and their outputs joined, so every caller may
    ask for any batch; everything else is the wrapped backend's.
    """

    def __init__(self, inner, max_batch: int):
        self._inner, self.max_batch = inner, max(1, int(max_batch))
        for attr in ("name", "device", "precision", "variant"):
            setattr(self, attr, getattr(inner, attr, None))

    @property
    def inner(self):
        return self._inner

    def predict(self, batch: np.ndarray, crop: tuple[slice, slice] | None = None) -> np.ndarray:
        m = self.max_batch
        if len(batch) <= m:
            return self._inner.predict(batch, crop)
        return np.concatenate([self._inner.predict(batch[i : i + m], crop) for i in range(0, len(batch), m)])

    def describe(self) -> str:
        return self._inner.describe()

    def close(self) -> None:
        self._inner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, item):
        return getattr(self._inner, item)
