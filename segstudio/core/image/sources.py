"""Lazy image sources: read a region of one plane without loading the image.

:func:`open_source` gives an :class:`ImageSource` for a file or an in-memory
:class:`~segstudio.core.image.io.ImageData`.  Its :meth:`ImageSource.read` returns
``(C, h, w)`` for a stack index and a row / column range, touching only the
bytes it needs:

* uncompressed TIFFs whose pixels are contiguous in the file are read row
  block by row block with positioned reads (``preadv``; no memory map, so
  resident memory stays bounded by what is read, whatever the file size);
* tiled or compressed TIFFs go through tifffile's zarr store, which decodes
  only the chunks (tiles or strips) a region covers;
* zarr stores (a plain array, or OME-Zarr's full-resolution level with its
  axes and pixel size), large ``.npy`` files (memory-mapped) and NumPy
  arrays (``ImageData``) are sliced directly.

A file is opened once: its signature (:func:`~segstudio.core.image.io.file_signature`)
is taken from the same open descriptor the pixels are read from, so a file
replaced while it is being segmented is either read whole in its old version
(with the old version's signature) or detected afterwards (its signature
changed), never recorded with the new file's signature and the old cells.
The limits of :mod:`segstudio.core.image.io` (pixel budget, the size of one decoded
chunk) are checked from the header before any pixel is decoded.

Axes follow the same rules as :func:`read_image`
(canonical ``TZCYX``), computed once from the metadata by
:func:`~segstudio.core.image.io.axes_plan` and applied per read.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, naming
from .io import (
    TIFF_SUFFIXES,
    ImageData,
    _canonicalize,
    _short,
    _tiff_metadata,
    axes_plan,
    check_decode_bytes,
    check_pixel_budget,
    check_plane_size,
    check_tiff_limits,
    checked_pixel_size,
    compute_dtype,
    file_signature,
    image_stem,
    native_pixels,
    npy_header,
    open_image_file,
    pread,
    read_open_file,
)

# files whose decoded size is below this are simply read into memory
EAGER_BYTES = 256 * 2**20


@dataclass
class ImageSource:
    """An image whose pixels are read on demand.

    ``raw`` is any object with ``shape``, ``dtype`` and NumPy-style basic
    slicing in the file's own axis order ``raw_axes``; ``plan`` maps it to the
    canonical axes (see :func:`~segstudio.core.image.io.axes_plan`).
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
    notices: list[str] = field(default_factory=list)  # what the reader ignored or changed, for the user
    signature: list | None = None  # file_signature() of the file read (None for in-memory images)
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
        return native_pixels(block, self.name)

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
    if np.dtype(raw.dtype).kind not in "uifb":
        raise InputError(f"{kwargs.get('name', 'image')}: pixel type {raw.dtype} is not supported "
                         "(integers or floats only)")
    src = ImageSource(
        raw=raw, raw_axes=raw_axes, axes=plan.axes, shape=shape, dtype=compute_dtype(raw.dtype),
        _fixed={i: 0 for i in plan.dropped}, _where=dict(plan.where), **kwargs,
    )
    check_plane_size(src.plane_shape, src.name)
    check_pixel_budget(src.plane_shape, int(np.prod(src.stack_shape, dtype=object)), src.name)
    return src


def planes_as_channels(source: ImageSource) -> ImageSource:
    """The same pixels with the Z axis read as the channel axis (a file that holds channels as pages).

    Parameters
    ----------
    source : ImageSource
        A source with a Z axis and no C axis.

    Returns
    -------
    ImageSource
        A copy reading the same ``raw`` array (and sharing its ``closer``), with axes such as ``"CYX"``
        or ``"TCYX"`` and channel names ``"ch0"``, ``"ch1"``...

    Raises
    ------
    ValueError
        When ``source`` has a C axis or no Z axis.
    """
    if "C" in source.axes or "Z" not in source.axes:
        raise ValueError(f"axes {source.axes!r}: need a Z axis and no C axis")
    sizes = dict(zip(source.axes, source.shape))
    sizes["C"] = sizes.pop("Z")
    axes = "".join(a for a in "TZCYX" if a in sizes)
    where = {("C" if a == "Z" else a): i for a, i in source._where.items()}
    return replace(source, axes=axes, shape=tuple(sizes[a] for a in axes), _where=where,
                   channel_names=[f"ch{i}" for i in range(sizes["C"])])


def source_from_image(image: ImageData) -> ImageSource:
    """Wrap an in-memory image (already in canonical axes).

    Parameters
    ----------
    image : ImageData
        The image; its array is read in place, not copied.

    Returns
    -------
    ImageSource
        With the image's name, pixel size, channel names and notices, and no ``signature``.

    Raises
    ------
    InputError
        When a plane is under :data:`~segstudio.core.image.io.MIN_SIDE` pixels a side or the image is
        over the pixel budget (:func:`~segstudio.core.image.io.check_pixel_budget`).
    """
    return _from_plan(
        image.data, image.axes, name=image.name, pixel_size=image.pixel_size, channel_names=list(image.channel_names),
        notices=list(image.notices),
    )


class ContiguousTiffArray:
    """Basic slicing over uncompressed pixels stored contiguously in a file.

    Reads whole rows (every axis after Y) for each combination of the axes
    before Y, one positioned read per block, from the descriptor of the file
    object ``f`` (kept open by the caller); thread-safe.
    """

    def __init__(self, f, offset: int, shape: tuple[int, ...], dtype: np.dtype, y_axis: int, name: str = "image"):
        self.f, self.fd, self.offset, self.shape, self.dtype = f, f.fileno(), offset, tuple(shape), np.dtype(dtype)
        self.y_axis, self.name = y_axis, name
        self.ndim = len(shape)

    def _read_into(self, buf: np.ndarray, pos: int) -> int:
        if hasattr(os, "preadv"):
            return os.preadv(self.fd, [memoryview(buf).cast("B")], pos)
        data = pread(self.fd, buf.nbytes, pos)
        buf.reshape(-1).view(np.uint8)[: len(data)] = np.frombuffer(data, np.uint8)
        return len(data)

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
            got = self._read_into(flat[n], self.offset + int(start) * self.dtype.itemsize)
            if got != flat[n].nbytes:
                raise InputError(f"{self.name}: the file is truncated (wanted {flat[n].nbytes} bytes, got {got})")
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
        node, axes, pixel_size = _ome_zarr_level(node, path)
    if not hasattr(node, "shape") or not hasattr(node, "chunks"):
        raise InputError(f"{path}: the OME-Zarr image's first level is not an array")
    if axes is None:
        from .io import guess_axes

        axes = guess_axes(tuple(node.shape))
    notices: list[str] = []
    pixel_size = checked_pixel_size(pixel_size, notices)
    try:
        chunk = int(np.prod([int(c) for c in node.chunks], dtype=object)) * np.dtype(node.dtype).itemsize
    except (TypeError, ValueError):
        raise InputError(f"{path}: the zarr array's chunk shape {node.chunks!r} is not usable") from None
    src = _from_plan(node, axes, name=path.stem, pixel_size=pixel_size, notices=notices)
    check_decode_bytes(chunk, str(path), "one of its chunks")
    return src


def _ome_zarr_level(group, path: Path):
    """The full-resolution array of an OME-Zarr group, its axes and pixel size (µm) when the metadata says."""
    bad = InputError(f"{path}: a zarr group without usable OME-Zarr multiscales metadata; give the array inside it")
    try:
        attrs = dict(group.attrs)
        meta = attrs.get("ome", attrs)
        ms = meta["multiscales"][0]
        dataset = ms["datasets"][0]
        level = str(dataset["path"])
    except (KeyError, IndexError, TypeError, AttributeError, ValueError):
        raise bad from None
    if not level or level.startswith(("/", "\\")) or ".." in level.replace("\\", "/").split("/"):
        raise InputError(f"{path}: the OME-Zarr metadata names the level {level!r}, which is not inside the store")
    try:
        node = group[level]
    except Exception:  # noqa: BLE001 - zarr raises KeyError or its own errors for a missing node
        raise InputError(f"{path}: the OME-Zarr level {level!r} is missing from the store") from None
    axes, pixel_size = None, None
    try:
        entries = ms.get("axes", [])
        names = [str(a["name"] if isinstance(a, dict) else a).upper() for a in entries]
        if len(names) == len(node.shape) and all(len(n) == 1 for n in names):
            axes = "".join(names)
            units = [(str(a.get("unit", "")) if isinstance(a, dict) else "") for a in entries]
            scale = next((t["scale"] for t in dataset.get("coordinateTransformations", [])
                          if isinstance(t, dict) and t.get("type") == "scale"), None)
            if scale and "Y" in axes and "X" in axes:
                iy, ix = axes.index("Y"), axes.index("X")
                factor = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3}.get(units[ix])
                if factor:
                    pixel_size = (float(scale[iy]) * factor, float(scale[ix]) * factor)
    except (KeyError, IndexError, TypeError, AttributeError, ValueError):
        axes, pixel_size = None, None  # damaged axes metadata: the axes are guessed as for a plain array
    return node, axes, pixel_size


def open_source(path: str | Path, *, eager_bytes: int = EAGER_BYTES) -> ImageSource:
    """Open an image file (or zarr store) for region reads.

    Files that decode to at most ``eager_bytes`` are read whole (fastest);
    larger TIFFs and ``.npy`` files, and zarr stores always, are read lazily.
    Errors are :class:`InputError` as in :func:`read_image`.
    The source's ``signature`` identifies the bytes it reads.

    Parameters
    ----------
    path : str or pathlib.Path
        A TIFF / OME-TIFF / ImageJ TIFF, PNG, JPEG, ``.npy`` file or ``.zarr`` store (plain or OME-Zarr).
    eager_bytes : int
        Decoded size in bytes up to which a TIFF or ``.npy`` file is read into memory
        (:data:`EAGER_BYTES`, 256 MiB, by default); PNG and JPEG are always read whole.

    Returns
    -------
    ImageSource
        Close it (or use it as a context manager) to release the file a lazy source reads from.

    Raises
    ------
    InputError
        When the file cannot be read or used as an image; the message names ``path``.
    """
    try:
        return _open_source(Path(path), eager_bytes)
    except InputError as e:
        raise naming(e, path) from None


def _open_source(path: Path, eager_bytes: int) -> ImageSource:
    if path.suffix.lower() == ".zarr":
        src = _open_zarr(path)
        src.signature = file_signature(path)
        return src
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(open_image_file(path))
        signature = file_signature(path, f.fileno())
        suffix = path.suffix.lower()
        if suffix in TIFF_SUFFIXES:
            src = _open_tiff(path, f, eager_bytes)
        elif suffix == ".npy":
            src = _open_npy(path, f, eager_bytes)
        else:
            src = source_from_image(read_open_file(path, f))
        src.signature = signature
        if src.closer is not None or isinstance(src.raw, (ContiguousTiffArray, np.memmap)):
            keep = stack.pop_all()  # a lazy source reads from f until it is closed
            inner = src.closer

            def closer():
                try:
                    if inner is not None:
                        inner()
                finally:
                    keep.close()

            src.closer = closer
        return src


def _open_npy(path: Path, f, eager_bytes: int) -> ImageSource:
    """A ``.npy`` file: read whole when small, memory-mapped (read region by region) when large."""
    from .io import guess_axes

    header = npy_header(path, f)
    nbytes = int(np.prod(header.shape, dtype=object)) * header.dtype.itemsize
    if nbytes <= eager_bytes:
        f.seek(0)
        return source_from_image(read_open_file(path, f))
    raw = np.memmap(f, dtype=header.dtype, mode="r", offset=header.offset, shape=header.shape,
                    order="F" if header.fortran else "C")
    return _from_plan(raw, guess_axes(header.shape), name=image_stem(path))


def _open_tiff(path: Path, f, eager_bytes: int) -> ImageSource:
    import tifffile

    try:
        tif = tifffile.TiffFile(f, name=path.name)
    except tifffile.TiffFileError as e:
        raise InputError(f"{path}: not a readable TIFF file ({_short(e)})") from None
    except Exception as e:  # noqa: BLE001 - a damaged header raises many types
        raise InputError(f"{path}: the TIFF file is truncated or corrupt ({_short(e)})") from None
    try:
        series = tif.series[0]
        check_tiff_limits(tif, series, str(path))
        decoded = int(np.prod(series.shape, dtype=object)) * np.dtype(series.dtype).itemsize
        if decoded <= eager_bytes:
            tif.close()
            f.seek(0)
            return source_from_image(read_open_file(path, f))
        notices: list[str] = []
        pixel_size, channel_names = _tiff_metadata(tif, notices)
        raw_axes = series.axes
        if series.dataoffset is not None:
            dtype = np.dtype(series.dtype).newbyteorder(tif.byteorder)
            raw = ContiguousTiffArray(f, series.dataoffset, series.shape, dtype, raw_axes.index("Y"), str(path))
            tif.close()
            closer = None
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
        return _from_plan(raw, raw_axes, name=image_stem(path), pixel_size=pixel_size,
                          channel_names=channel_names or [], closer=closer, notices=notices)
    except InputError:
        tif.close()
        raise
    except Exception as e:  # noqa: BLE001 - decoders raise many types on corrupt data
        tif.close()
        raise InputError(f"{path}: the TIFF file is truncated or corrupt ({_short(e)})") from None


def read_image(path: str | Path) -> ImageData:
    """Read an image file whole.

    Parameters
    ----------
    path : str or pathlib.Path
        A TIFF / OME-TIFF / ImageJ TIFF, PNG, JPEG, ``.npy`` or zarr / OME-Zarr
        (see :mod:`segstudio.core.image.io` for the formats and limits).

    Returns
    -------
    ImageData
        The pixels in canonical axes (a subset of ``"TZCYX"`` ending in
        ``"YX"``), the axes, the pixel size in micrometres when recorded.
    """
    path = Path(path)
    if path.suffix.lower() == ".zarr":
        with open_source(path) as src:
            check_decode_bytes(src.nbytes, str(path), "its pixels")
            data, axes = _canonicalize(native_pixels(np.asarray(src.raw[...]), src.name), src.raw_axes, src.name)
            return ImageData(data=data, axes=axes, pixel_size=src.pixel_size, name=src.name,
                             notices=list(src.notices))
    with open_image_file(path) as f:
        return read_open_file(path, f)
