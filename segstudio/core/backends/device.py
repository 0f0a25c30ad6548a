"""One thread per accelerator that owns its CUDA context.

CUDA contexts, streams, cuDNN handles, CUDA graphs and TensorRT execution
contexts belong to the thread that created them.  Every GPU backend is
created, called and closed on its device's :class:`DeviceThread`, whatever
thread (GUI worker, CLI, batch worker) asks; callers block until the call
returns, and exceptions come back to them unchanged.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

_lock = threading.Lock()
_threads: dict[str, "DeviceThread"] = {}


class DeviceThread:
    """A single worker thread for one device, shared by the whole process."""

    def __init__(self, device: str):
        self.device = device
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"segstudio-device-{device}")
        self.ident: int | None = self.call(threading.get_ident)

    @staticmethod
    def get(device: str) -> "DeviceThread":
        with _lock:
            if device not in _threads:
                _threads[device] = DeviceThread(device)
            return _threads[device]

    def call(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        if threading.get_ident() == getattr(self, "ident", None):
            return fn(*args, **kwargs)  # already on the device thread
        return self._pool.submit(fn, *args, **kwargs).result()


class DeviceBound:
    """A backend living on a :class:`DeviceThread`; every method call is sent there."""

    def __init__(self, thread: DeviceThread, factory: Callable[[], Any]):
        self._thread = thread
        self._inner = thread.call(factory)
        for attr in ("name", "device", "precision", "variant"):
            setattr(self, attr, getattr(self._inner, attr, None))

    @property
    def inner(self):
        return self._inner

    def predict(self, batch: np.ndarray, crop: tuple[slice, slice] | None = None) -> np.ndarray:
        return self._thread.call(self._inner.predict, batch, crop)

    def describe(self) -> str:
        return self._thread.call(self._inner.describe)

    def close(self) -> None:
        self._thread.call(self._inner.close)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, item):
        return getattr(self._inner, item)
