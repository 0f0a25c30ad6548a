"""Lazy image sources: read a region of one plane without loading the image.

:func:`open_source` gives an :class:`ImageSource` for a file or an in-memory
:class:`~segstudio.core.io.ImageData`.  Its :meth:`ImageSource.read` returns
``(C, h, w)`` for a stack index and a row / column range, touching only the
bytes it needs:

* uncompressed TIFFs whose pixels are contiguous in the file are read row
  block by row block with ``seek`` + ``readinto`` (no memory map, so resident
  memory stays bounded by what is read, whatever the file size);
* tiled or compressed TIFFs go through tifffile's zarr store, which decodes
  only the chunks (tiles or strips) a region covers;
* zarr stores (a plain array, or OME-Zarr's full-resolution level with its
  axes and pixel size) and NumPy arrays (``ImageData``) are sliced directly.

Axes follow the same rules as :func:`~segstudio.core.io.read_image`
(canonical ``TZCYX``), computed once from the metadata by
:func:`~segstudio.core.io.axes_plan` and applied per read.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .io import (
    TIFF_SUFFIXES,
    ImageData,
    _short,
    _stem,
    _tiff_metadata,
    axes_plan,
    check_plane_size,
    read_image,
)

# files whose decoded size is below this are simply read into memory
EAGER_BYTES = 256 * 2**20


@dataclass
class ImageSource:
    """An image whose pixels are read on demand.

    ``raw`` is any object with ``shape``, ``dtype`` and NumPy-style basic
    slicing in the file's own axis order ``raw_axes``; ``plan`` maps it to the
    canonical axes (see :func:`~segstudio.core.io.axes_plan`).
    """

    raw: Any
    raw_axes: str
    axes: str
    shape: tuple[int, ...]
    dtype: np.dtype
    name: str = "image"
    pixel_size: tuple[float, float] | None = None
    channel_names: list[str] = field(default_factory=list)
    closer: Any = None
    _fixed: dict[int, int] = field(default_factory=dict)  # raw axis -> index (dropped length-1 axes)
    _where: dict[str, int] = field(default_factory=dict)  # canonical letter -> raw axis

    def __post_init__(self) -> None:
        if not self.channel_names:
            self.channel_names = [f"ch{i}" for i in range(self.n_channels)]

    # ------------------------------------------------------------ geometry
    @property
    def n_channels(self) -> int:
        return self.shape[self.axes.index("C")] if "C" in self.axes else 1

    @property
    def plane_shape(self) -> tuple[int, int]:
        return self.shape[-2], self.shape[-1]

    @property
    def stack_axes(self) -> str:
        return "".join(a for a in self.axes if a in "TZ")

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[self.axes.index(a)] for a in self.stack_axes)

    def stack_indices(self):
        return list(np.ndindex(*self.stack_shape))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    # ------------------------------------------------------------ reading
    def read(self, index: tuple[int, ...], rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        """Pixels of plane ``index`` in ``rows`` x ``cols`` as ``(C, h, w)`` (inside the plane)."""
        key: list[Any] = [slice(None)] * len(self.raw_axes)
        for axis, i in self._fixed.items():
            key[axis] = i
        for letter, i in zip(self.stack_axes, index):
            key[self._where[letter]] = i
        key[self._where["Y"]] = slice(*rows)
        key[self._where["X"]] = slice(*cols)
        block = np.asarray(self.raw[tuple(key)])
        # the raw axes left after indexing, as canonical letters (a subset of C, Y, X)
        letter_of = {axis: letter for letter, axis in self._where.items()}
        kept = [letter_of[i] for i in range(len(self.raw_axes)) if not isinstance(key[i], int)]
        order = [kept.index(a) for a in "CYX" if a in kept]
        block = np.transpose(block, order)
        if "C" not in kept:
            block = block[np.newaxis]
        if not block.dtype.isnative:
            block = block.astype(block.dtype.newbyteorder("="))
        return block

    def read_plane(self, index: tuple[int, ...]) -> np.ndarray:
        h, w = self.plane_shape
        return self.read(index, (0, h), (0, w))

    def close(self) -> None:
        if self.closer is not None:
            self.closer()
            self.closer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _from_plan(raw, raw_axes: str, **kwargs) -> ImageSource:
    plan = axes_plan(raw_axes, tuple(raw.shape), kwargs.get("name", "image"))
    shape = tuple(raw.shape[plan.where[a]] for a in plan.axes)
    src = ImageSource(
        raw=raw, raw_axes=raw_axes, axes=plan.axes, shape=shape, dtype=np.dtype(raw.dtype).newbyteorder("="),
        _fixed={i: 0 for i in plan.dropped}, _where=dict(plan.where), **kwargs,
    )
    check_plane_size(src.plane_shape, src.name)
    return src


def planes_as_channels(source: ImageSource) -> ImageSource:
    """The same pixels with the Z axis read as the channel axis (a file that holds channels as pages)."""
    if "C" in source.axes or "Z" not in source.axes:
        raise ValueError(f"axes {source.axes!r}: need a Z axis and no C axis")
    sizes = dict(zip(source.axes, source.shape))
    sizes["C"] = sizes.pop("Z")
    axes = "".join(a for a in "TZCYX" if a in sizes)
    where = {("C" if a == "Z" else a): i for a, i in source._where.items()}
    return replace(source, axes=axes, shape=tuple(sizes[a] for a in axes), _where=where,
                   channel_names=[f"ch{i}" for i in range(sizes["C"])])


def source_from_image(image: ImageData) -> ImageSource:
    """Wrap an in-memory image (already in canonical axes)."""
    return _from_plan(
        image.data, image.axes, name=image.name, pixel_size=image.pixel_size, channel_names=list(image.channel_names)
    )


class ContiguousTiffArray:
    """Basic slicing over uncompressed pixels stored contiguously in a file.

    Reads whole rows (every axis after Y) for each combination of the axes
    before Y, with one ``seek`` + ``readinto`` per block; thread-safe.
    """

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype, y_axis: int):
        self.path, self.offset, self.shape, self.dtype = Path(path), offset, tuple(shape), np.dtype(dtype)
        self.y_axis = y_axis
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        self._lock = threading.Lock()
        self.ndim = len(shape)

    def close(self) -> None:
        self._file.close()

    def __getitem__(self, key):
        key = tuple(key) + (slice(None),) * (self.ndim - len(key))
        lead = key[: self.y_axis]
        ys = key[self.y_axis].indices(self.shape[self.y_axis])
        y0, y1 = ys[0], ys[1]
        tail_shape = self.shape[self.y_axis + 1 :]
        row_items = int(np.prod(tail_shape))
        lead_ranges = [
            [k] if isinstance(k, int) else list(range(*k.indices(n))) for k, n in zip(lead, self.shape)
        ]
        strides = np.cumprod((1,) + self.shape[::-1])[::-1][1:]  # items per step of each axis
        out = np.empty([len(r) for r in lead_ranges] + [y1 - y0, *tail_shape], self.dtype)
        flat = out.reshape(-1, (y1 - y0) * row_items) if out.size else out
        for n, idx in enumerate(np.ndindex(*[len(r) for r in lead_ranges])):
            start = sum(lead_ranges[a][i] * strides[a] for a, i in enumerate(idx)) + y0 * row_items
            with self._lock:
                self._file.seek(self.offset + int(start) * self.dtype.itemsize)
                got = self._file.readinto(memoryview(flat[n]).cast("B"))
            if got != flat[n].nbytes:
                raise InputError(f"{self.path}: the file is truncated (wanted {flat[n].nbytes} bytes, got {got})")
        tail_key = key[self.y_axis + 1 :]
        squeeze = tuple(0 for k in lead if isinstance(k, int))
        out = out[squeeze] if squeeze else out
        return out[(Ellipsis, *tail_key)] if any(k != slice(None) for k in tail_key) else out


def _open_zarr(path: Path) -> ImageSource:
    """A zarr array, or the full-resolution level of an OME-Zarr image (v0.4 or v0.5)."""
    try:
        import zarr
    except ImportError:
        raise InputError(f"{path}: reading zarr needs the zarr package", hint="pip install zarr") from None
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as e:  # noqa: BLE001 - zarr raises many types for what is not a store
        raise InputError(f"{path}: not a readable zarr store ({_short(e)})") from None
    axes, pixel_size = None, None
    if not hasattr(node, "shape"):  # a group: OME-Zarr multiscales
        attrs = dict(node.attrs)
        meta = attrs.get("ome", attrs)
        try:
            ms = meta["multiscales"][0]
            dataset = ms["datasets"][0]
            node = node[dataset["path"]]
        except (KeyError, IndexError, TypeError):
            raise InputError(f"{path}: a zarr group without OME-Zarr multiscales; give the array inside it") from None
        names = [(a["name"] if isinstance(a, dict) else a).upper() for a in ms.get("axes", [])]
        if len(names) == len(node.shape):
            axes = "".join(names)
            units = [(a.get("unit", "") if isinstance(a, dict) else "") for a in ms.get("axes", [])]
            scale = next((t["scale"] for t in dataset.get("coordinateTransformations", [])
                          if t.get("type") == "scale"), None)
            if scale and "Y" in axes and "X" in axes:
                iy, ix = axes.index("Y"), axes.index("X")
                factor = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3}.get(units[ix])
                if factor:
                    pixel_size = (scale[iy] * factor, scale[ix] * factor)
    if axes is None:
        from .io import guess_axes

        axes = guess_axes(tuple(node.shape))
    return _from_plan(node, axes, name=path.stem, pixel_size=pixel_size)


def open_source(path: str | Path, *, eager_bytes: int = EAGER_BYTES) -> ImageSource:
    """Open an image file (or zarr store) for region reads.

    Files that decode to less than ``eager_bytes`` are read whole (fastest);
    larger TIFFs, and zarr stores always, are read lazily.  Errors are
    :class:`InputError` as in :func:`~segstudio.core.io.read_image`.
    """
    path = Path(path)
    if path.suffix.lower() == ".zarr":
        return _open_zarr(path)
    if path.suffix.lower() not in TIFF_SUFFIXES or not path.is_file() or path.stat().st_size == 0:
        return source_from_image(read_image(path))
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except tifffile.TiffFileError as e:
        raise InputError(f"{path}: not a readable TIFF file ({_short(e)})") from None
    try:
        series = tif.series[0]
        decoded = int(np.prod(series.shape)) * np.dtype(series.dtype).itemsize
        if decoded <= eager_bytes:
            tif.close()
            return source_from_image(read_image(path))
        pixel_size, channel_names = _tiff_metadata(tif)
        raw_axes = series.axes
        if series.dataoffset is not None:
            dtype = np.dtype(series.dtype).newbyteorder(tif.byteorder)
            raw = ContiguousTiffArray(path, series.dataoffset, series.shape, dtype, raw_axes.index("Y"))
            tif.close()
            closer = raw.close
        else:
            try:
                import zarr
            except ImportError:
                raise InputError(
                    f"{path}: reading a tiled or compressed TIFF this large needs the zarr package",
                    hint="pip install zarr",
                ) from None
            store = series.aszarr()
            raw = zarr.open(store, mode="r")

            def closer():
                store.close()
                tif.close()
        return _from_plan(raw, raw_axes, name=_stem(path), pixel_size=pixel_size,
                          channel_names=channel_names or [], closer=closer)
    except InputError:
        tif.close()
        raise
    except Exception as e:  # noqa: BLE001 - decoders raise many types on corrupt data
        tif.close()
        raise InputError(f"{path}: the TIFF file is truncated or corrupt ({_short(e)})") from None
