"""Surviving GPU out-of-memory: smaller batches, then smaller tiles, then the CPU.

:class:`OomFallback` wraps a backend's ``predict``.  When the device runs
out of memory it splits the batch in halves (and remembers the batch size
that fits); a single tile that does not fit is cut into four tiles with the
same halo (exact: every kept pixel still sees its whole receptive field);
when even those fail, the work moves to the fastest CPU backend.  Each step
is reported once through ``notify`` so the user knows why it got slower.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import DeviceOutOfMemoryError
from ..jobs import run_sync
from ..models.catalog import Model
from ..segment.tiling import predict_tiled


class OomFallback:
    def __init__(self, backend, model: Model, notify: Callable[[str], None], *,
                 cpu_factory: Callable[[], object] | None = None):
        self.backend = backend
        self.model = model
        self.notify = notify
        self.max_batch: int | None = None
        self.min_tile = 4 * model.spec.multiple
        self._cpu_factory = cpu_factory
        self.on_cpu = False

    def describe(self) -> str:
        return self.backend.describe()

    def __call__(self, batch: np.ndarray, crop: tuple[slice, slice] | None = None) -> np.ndarray:
        if self.max_batch is not None and batch.shape[0] > self.max_batch:
            return np.concatenate([self(batch[i : i + self.max_batch], crop)
                                   for i in range(0, batch.shape[0], self.max_batch)])
        try:
            return self.backend.predict(batch, crop)
        except DeviceOutOfMemoryError:
            if self.on_cpu:
                raise
        if batch.shape[0] > 1:
            half = batch.shape[0] // 2
            self.max_batch = half
            self.notify(f"GPU out of memory: continuing with batches of {half} tile(s)")
            return np.concatenate([self(batch[:half], crop), self(batch[half:], crop)])
        halo = self.model.spec.halo
        core = min(batch.shape[2:]) - 2 * halo
        if core // 2 >= self.min_tile:
            self.notify(f"GPU out of memory on one tile: cutting it into tiles of {core // 2} px")
            out = run_sync(predict_tiled(batch[0], self, tile=core // 2, halo=halo,
                                         multiple=self.model.spec.multiple))[np.newaxis]
            return out if crop is None else out[(Ellipsis, *crop)]
        return self._to_cpu(batch, crop)

    def _to_cpu(self, batch: np.ndarray, crop: tuple[slice, slice] | None) -> np.ndarray:
        from .autoselect import cpu_candidates
        from .registry import create_variant

        if self._cpu_factory is not None:
            cpu = self._cpu_factory()
        else:
            names = cpu_candidates(self.model)
            cpu = create_variant(names[0], self.model)
        self.notify(f"GPU out of memory even for small tiles: continuing on the CPU ({cpu.describe()})")
        self.backend.close()
        self.backend, self.on_cpu, self.max_batch = cpu, True, None
        return self.backend.predict(batch, crop)
