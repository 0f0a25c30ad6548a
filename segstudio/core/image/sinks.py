"""Where label rows go as the pipeline finishes them.

The pipeline hands each plane's label rows over in order (``write(index,
y0, rows)``, uint32, ids unique across the image).  A sink either keeps
them in memory (:class:`ArraySink`, for the GUI and small images) or streams
them into a tiled, compressed TIFF (:class:`TiffSink`) so that labels of any
size never sit in memory whole.  Both end as uint16 when the ids fit,
uint32 otherwise.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import numpy as np

from ..errors import OutputError
from .io import SOFTWARE, atomic_path, labels_dtype, temporary_sibling

_END = object()


class ArraySink:
    """Collect labels in an array shaped ``stack_shape + (H, W)``."""

    def __init__(self, stack_shape: tuple[int, ...], plane_shape: tuple[int, int]):
        self.labels = np.zeros((*stack_shape, *plane_shape), np.uint32)

    def write(self, index: tuple[int, ...], y0: int, rows: np.ndarray) -> None:
        self.labels[(*index, slice(y0, y0 + rows.shape[0]))] = rows

    def finish(self, n_objects: int) -> np.ndarray:
        dtype = labels_dtype(n_objects)
        return self.labels if dtype == self.labels.dtype else self.labels.astype(dtype)

    def abort(self) -> None:
        self.labels = None


class TiffSink:
    """Stream labels into a zlib-compressed, tiled TIFF, written atomically.

    A writer thread runs ``tifffile.imwrite`` over an iterator of tiles fed
    by :meth:`write`; rows are buffered only until a full row of tiles is
    there.  At the end, labels with at most 65,535 objects are rewritten as
    uint16, again tile by tile.
    """

    def __init__(self, path: str | Path, stack_shape: tuple[int, ...], plane_shape: tuple[int, int], *,
                 pixel_size: tuple[float, float] | None = None, tile: int = 256):
        self.path = Path(path)
        self.shape = (*stack_shape, *plane_shape)
        self.tile = tile
        self.kwargs = {}
        if pixel_size is not None:
            self.kwargs = dict(resolution=(1e4 / pixel_size[1], 1e4 / pixel_size[0]), resolutionunit="CENTIMETER")
        self._atomic = atomic_path(self.path)
        self.tmp = self._atomic.__enter__()
        self._q: queue.Queue = queue.Queue(maxsize=2)
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._error: BaseException | None = None
        self._ended = False
        self._thread = threading.Thread(target=self._run, name="segstudio-write", daemon=True)
        self._thread.start()

    def _tiles(self):
        while True:
            band = self._q.get()
            if band is _END:
                self._ended = True
                return
            t = self.tile
            for x0 in range(0, band.shape[1], t):
                yield band[:, x0 : x0 + t]

    def _run(self) -> None:
        import tifffile

        try:
            tifffile.imwrite(self.tmp, data=self._tiles(), shape=self.shape, dtype=np.uint32,
                             tile=(self.tile, self.tile), compression="zlib", metadata=None, software=SOFTWARE,
                             **self.kwargs)
        except BaseException as e:  # noqa: BLE001 - reported by finish()
            self._error = e
            while not self._ended:  # drain so write() never blocks
                self._ended = self._q.get() is _END

    def _emit(self, band: np.ndarray) -> None:
        t = self.tile
        h, w = band.shape
        padded = np.zeros((t, -(-w // t) * t), np.uint32)
        padded[:h, :w] = band
        self._q.put(padded)

    def write(self, index: tuple[int, ...], y0: int, rows: np.ndarray) -> None:
        self._buffer.append(rows)
        self._buffered += rows.shape[0]
        plane_h = self.shape[-2]
        end = y0 + rows.shape[0]
        if self._buffered >= self.tile or end == plane_h:
            data = np.concatenate(self._buffer)
            n_full = (data.shape[0] // self.tile) * self.tile
            for y in range(0, n_full, self.tile):
                self._emit(data[y : y + self.tile])
            rest = data[n_full:]
            if end == plane_h and len(rest):
                self._emit(rest)
                rest = rest[:0]
            self._buffer = [rest] if len(rest) else []
            self._buffered = len(rest)

    def finish(self, n_objects: int) -> Path:
        self._q.put(_END)
        self._thread.join()
        try:
            if self._error is not None:
                raise self._error
            if labels_dtype(n_objects) == np.uint16:
                self._narrow()
        except OSError as e:
            self.abort()
            raise OutputError.from_oserror(self.path, e) from None
        except BaseException:
            self.abort()
            raise
        self._atomic.__exit__(None, None, None)
        return self.path

    def _narrow(self) -> None:
        """Rewrite the uint32 file as uint16, tile by tile."""
        import tifffile

        with tifffile.TiffFile(self.tmp) as tif:
            src = tif.series[0]
            pages = list(src.pages)

            def tiles():
                for page in pages:
                    for segment, _ in zip(page.segments(), range(10**12)):
                        yield segment[0].reshape(self.tile, self.tile).astype(np.uint16)

            narrow = temporary_sibling(self.path)
            try:
                tifffile.imwrite(narrow, data=tiles(), shape=self.shape, dtype=np.uint16,
                                 tile=(self.tile, self.tile), compression="zlib", metadata=None, software=SOFTWARE,
                             **self.kwargs)
            except BaseException:
                narrow.unlink(missing_ok=True)
                raise
        narrow.replace(self.tmp)

    def abort(self) -> None:
        if self._thread.is_alive():
            self._q.put(_END)
            self._thread.join()
        try:
            self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)
        except RuntimeError:
            pass
