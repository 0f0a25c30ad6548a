"""Reading images and writing labels.

Images come back as :class:`ImageData`: the pixels in canonical axis order
(a subset of ``"TZCYX"`` in that order, always ending in ``"YX"``), the axes
string, and the pixel size in micrometres when the file says it.

Readers:

* TIFF, OME-TIFF and ImageJ TIFF via tifffile (axes from the metadata,
  compressed TIFFs through imagecodecs);
* PNG and JPEG via Pillow;
* ``.npy`` arrays (no pickles);
* zarr stores, including OME-Zarr (see :mod:`segstudio.core.image.sources`).

:func:`segstudio.core.image.sources.read_image` reads any of them whole; this
module holds the format readers and checks below it (it never imports
:mod:`.sources`, which reads region by region on top of them).

Any file that cannot be used raises :class:`~segstudio.core.errors.InputError`
with a one-line message naming the file and what is wrong with it.

Limits (checked from the file's header, before any pixel is decoded):

* a plane may hold at most :func:`max_pixels` pixels (``2**32`` by default,
  a 65,536 x 65,536 plane; ``SEGSTUDIO_MAX_PIXELS`` raises it), a whole
  stack four times that: a few bytes that declare 40 gigapixels are refused
  with their size instead of running for hours;
* what has to be decoded whole (PNG, JPEG, a TIFF strip or tile, a zarr
  chunk, the pixels of a file read into memory) at most
  :data:`MAX_DECODE_BYTES`;
* pixel sizes must be finite and between 1 nm and 1 mm; any other value
  in a file is ignored, with a notice (``ImageData.notices``).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import InputError, OutputError, naming

TIFF_SUFFIXES = {".tif", ".tiff"}
PIL_SUFFIXES = {".png", ".jpg", ".jpeg"}
IMAGE_SUFFIXES = TIFF_SUFFIXES | PIL_SUFFIXES | {".npy"}
CANONICAL = "TZCYX"
MIN_SIDE = 8
MAX_CHANNELS = 16
DEFAULT_MAX_PIXELS = 2**32  # per plane: a 65,536 x 65,536 image
MAX_DECODE_BYTES = 2 * 2**30  # decoded at once: a PNG, a TIFF tile or strip, a zarr chunk, an in-memory image
PIXEL_SIZE_RANGE_UM = (1e-3, 1e3)  # 1 nm (electron microscopy) to 1 mm per pixel

# micrometres per unit, for units that appear in OME / ImageJ / TIFF metadata
_UNIT_UM = {
    "m": 1e6, "mm": 1e3, "cm": 1e4, "um": 1.0, "\u00b5m": 1.0, "\u03bcm": 1.0, "micron": 1.0,
    "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0, "nm": 1e-3, "nanometer": 1e-3,
}


@dataclass
class ImageData:
    """Pixels in canonical axis order plus what the file said about them.

    Attributes
    ----------
    data : ndarray
        Shape matching ``axes``; a subset of ``"TZCYX"`` in that order.
    axes : str
        Axis letters of ``data``.
    pixel_size : tuple of float, optional
        ``(y, x)`` pixel size in micrometres, when known.
    name : str
        Short name (file stem, or layer name).
    channel_names : list of str
        One name per channel (``"ch0"``... when the file gives none).
    """

    data: np.ndarray
    axes: str
    pixel_size: tuple[float, float] | None = None
    name: str = "image"
    channel_names: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)  # what the reader ignored or changed, for the user

    def __post_init__(self) -> None:
        if not self.channel_names:
            self.channel_names = [f"ch{i}" for i in range(self.n_channels)]

    @property
    def n_channels(self) -> int:
        return self.data.shape[self.axes.index("C")] if "C" in self.axes else 1

    @property
    def plane_shape(self) -> tuple[int, int]:
        return self.data.shape[-2], self.data.shape[-1]

    @property
    def stack_axes(self) -> str:
        """The axes iterated plane by plane (``""``, ``"Z"``, ``"T"`` or ``"TZ"``)."""
        return "".join(a for a in self.axes if a in "TZ")

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[self.axes.index(a)] for a in self.stack_axes)

    def planes(self) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
        """Yield ``(stack index, plane)`` with each plane shaped ``(C, Y, X)``."""
        k = len(self.stack_axes)
        for index in np.ndindex(*self.stack_shape):
            plane = self.data[index] if k else self.data
            if "C" not in self.axes:
                plane = plane[np.newaxis]
            yield index, plane


# --------------------------------------------------------------------------- axes


@dataclass(frozen=True)
class AxesPlan:
    """How an array in its file's axis order maps to canonical axes.

    ``axes`` is the canonical order (a subset of ``TZCYX``); ``where`` gives
    the raw axis of each canonical letter; ``dropped`` lists raw axes of
    length 1 that are indexed away.
    """

    axes: str
    where: dict
    dropped: tuple[int, ...]


def axes_plan(raw_axes: str, shape: tuple[int, ...], source: str) -> AxesPlan:
    """Map raw axes (``S`` = samples is an alias of ``C``) to canonical ``TZCYX``.

    Length-1 axes other than Y and X are dropped; one axis of unknown meaning
    becomes Z (a stack) when there is no Z axis; more are refused as ambiguous.

    Parameters
    ----------
    raw_axes : str
        One letter per dimension, in the file's order (e.g. tifffile's ``"QYXS"``); case-insensitive.
    shape : tuple of int
        The array's shape in that order.
    source : str
        Name of the image or file, for error messages.

    Returns
    -------
    AxesPlan
        The canonical ``axes``, the raw axis of each canonical letter (``where``), and the raw
        length-1 axes indexed away (``dropped``).

    Raises
    ------
    InputError
        When ``raw_axes`` and ``shape`` differ in length, when the axes cannot be interpreted (two
        unknown axes, or one besides a Z axis), when an axis repeats (``S`` and ``C`` both kept), or
        when there is no Y or no X axis.
    """
    raw_axes = raw_axes.upper().replace("S", "C")
    if len(raw_axes) != len(shape):
        raise InputError(f"{source}: axes {raw_axes!r} do not match the array's {len(shape)} dimensions")
    dropped = tuple(i for i, a in enumerate(raw_axes) if shape[i] == 1 and a not in "YX")
    kept = {i: a for i, a in enumerate(raw_axes) if i not in dropped}
    unknown = [i for i, a in kept.items() if a not in CANONICAL]
    if len(unknown) == 1 and "Z" not in kept.values():
        kept[unknown[0]] = "Z"
    elif unknown:
        shown = "".join(kept.values())
        raise InputError(
            f"{source}: {len(kept)}-D data with axes {shown!r} that segstudio cannot interpret "
            f"(it reads YX images with optional channel, Z and T axes)",
            hint="save it as OME-TIFF or ImageJ TIFF with its axes",
        )
    letters = list(kept.values())
    if len(set(letters)) != len(letters):
        raise InputError(f"{source}: repeated axes in {''.join(letters)!r}")
    if "Y" not in letters or "X" not in letters:
        raise InputError(f"{source}: no Y and X axes in {''.join(letters)!r}; is this an image?")
    where = {a: i for i, a in kept.items()}
    axes = "".join(a for a in CANONICAL if a in where)
    return AxesPlan(axes=axes, where=where, dropped=dropped)


def _canonicalize(data: np.ndarray, axes: str, source: str) -> tuple[np.ndarray, str]:
    """Apply :func:`axes_plan` to an in-memory array."""
    plan = axes_plan(axes, data.shape, source)
    index = tuple(0 if i in plan.dropped else slice(None) for i in range(data.ndim))
    data = data[index]
    remaining = [i for i in range(len(axes)) if i not in plan.dropped]
    order = [remaining.index(plan.where[a]) for a in plan.axes]
    return np.transpose(data, order), plan.axes


def check_plane_size(plane_shape: tuple[int, int], name: str) -> None:
    """Refuse a plane too small to segment.

    Parameters
    ----------
    plane_shape : tuple of int
        ``(Y, X)`` size of one plane, in pixels.
    name : str
        Name of the image, for the error message.

    Raises
    ------
    InputError
        When either side is under :data:`MIN_SIDE` (8) pixels.
    """
    h, w = plane_shape
    if h < MIN_SIDE or w < MIN_SIDE:
        raise InputError(f"{name}: image is {h}x{w} pixels, too small to segment (at least {MIN_SIDE}x{MIN_SIDE})")


def max_pixels() -> int:
    """Pixels one plane may hold: :data:`DEFAULT_MAX_PIXELS`, or ``SEGSTUDIO_MAX_PIXELS``.

    Returns
    -------
    int
        The limit in pixels per plane (``2**32`` unless the environment variable sets it; a whole
        stack may hold four times as many).

    Raises
    ------
    InputError
        When ``SEGSTUDIO_MAX_PIXELS`` is set but is not a finite number of at least
        ``MIN_SIDE * MIN_SIDE`` (64) pixels.
    """
    raw = os.environ.get("SEGSTUDIO_MAX_PIXELS", "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        n = float(raw)
    except ValueError:
        n = float("nan")
    if not math.isfinite(n) or n < MIN_SIDE * MIN_SIDE:
        raise InputError(f"SEGSTUDIO_MAX_PIXELS must be a number of pixels (at least {MIN_SIDE * MIN_SIDE}), "
                         f"not {raw!r}")
    return int(n)


def check_pixel_budget(plane_shape: tuple[int, ...], planes: int, name: str) -> None:
    """Refuse a plane larger than :func:`max_pixels` or a stack larger than four times that.

    Parameters
    ----------
    plane_shape : tuple of int
        Shape ending in ``(Y, X)`` (any leading entries are ignored), in pixels.
    planes : int
        Number of planes in the stack (T x Z; channels not counted).
    name : str
        Name of the image or file, for the error message.

    Raises
    ------
    InputError
        When ``Y * X`` exceeds :func:`max_pixels`, or ``Y * X * planes`` exceeds four times it.
    """
    h, w = int(plane_shape[-2]), int(plane_shape[-1])
    limit = max_pixels()
    hint = "crop or downsample it, or raise the limit with SEGSTUDIO_MAX_PIXELS (pixels per plane)"
    if h * w > limit:
        raise InputError(f"{name}: a plane of {h:,} x {w:,} pixels ({_gpx(h * w)}) is larger than segstudio "
                         f"segments ({_gpx(limit)} per plane)", hint=hint)
    if h * w * planes > 4 * limit:
        raise InputError(f"{name}: {planes:,} planes of {h:,} x {w:,} pixels ({_gpx(h * w * planes)} in all) "
                         f"are more than segstudio segments in one file ({_gpx(4 * limit)})", hint=hint)


def check_decode_bytes(nbytes: int, name: str, what: str) -> None:
    """Refuse to decode more than :data:`MAX_DECODE_BYTES` in one piece (``what``: "its pixels", "one tile").

    Parameters
    ----------
    nbytes : int
        Size of the piece once decoded, in bytes.
    name : str
        Name of the image or file, for the error message.
    what : str
        What the piece is, as it reads in the message after ``name``.

    Raises
    ------
    InputError
        When ``nbytes`` exceeds :data:`MAX_DECODE_BYTES` (2 GiB).
    """
    if nbytes > MAX_DECODE_BYTES:
        raise InputError(
            f"{name}: {what} would take {nbytes / 2**30:.1f} GiB of memory decoded in one piece "
            f"(segstudio decodes at most {MAX_DECODE_BYTES / 2**30:.0f} GiB at once)",
            hint="save it as a tiled TIFF or OME-Zarr, which segstudio reads region by region",
        )


def _gpx(n: int) -> str:
    return f"{n / 1e9:.1f} gigapixels" if n >= 1e8 else f"{n / 1e6:.1f} megapixels"


def checked_pixel_size(size, notices: list[str]) -> tuple[float, float] | None:
    """``size`` ``(y, x)`` in µm when both are finite and in :data:`PIXEL_SIZE_RANGE_UM`; else ``None``, with a notice.

    Parameters
    ----------
    size : sequence of two float, optional
        ``(y, x)`` pixel size in micrometres, as a file states it; ``None`` when it states none.
    notices : list of str
        Appended to (one message) when ``size`` is given but not usable.

    Returns
    -------
    tuple of float or None
        ``(y, x)`` in micrometres, as floats; ``None`` when ``size`` is ``None`` or not usable.
    """
    if size is None:
        return None
    lo, hi = PIXEL_SIZE_RANGE_UM
    try:
        py, px = (float(v) for v in size)
    except (TypeError, ValueError):
        py = px = float("nan")
    if all(math.isfinite(v) and lo <= v <= hi for v in (py, px)):
        return py, px
    shown = " x ".join(str(v) for v in size) if isinstance(size, (tuple, list)) else repr(size)
    notices.append(f"the file's pixel size ({shown} µm) is not usable (it must be finite and between "
                   f"{lo * 1e3:g} nm and {hi / 1e3:g} mm): it is ignored, so the measurements are in pixels only")
    return None


def guess_axes(shape: tuple[int, ...]) -> str:
    """Axes of an array that came without metadata.

    2-D is ``YX``; 3-D is ``YXC`` when the last axis has at most 4 entries and
    the first more than 4, ``CYX`` when the first has at most 4 (colour /
    channels), else ``ZYX``; 4-D is ``ZCYX`` or ``ZYXC`` on the same rule
    (second axis first).  Anything else is ambiguous and refused.

    Parameters
    ----------
    shape : tuple of int
        The array's shape.

    Returns
    -------
    str
        One axis letter per dimension, in the array's order (not canonical: ``"YXC"`` is possible).

    Raises
    ------
    InputError
        For arrays of other than 2 to 4 dimensions, or 4-D ones with no axis of at most 4 entries in
        second or last place.
    """
    nd = len(shape)
    small = lambda n: 1 <= n <= 4  # noqa: E731
    if nd == 2:
        return "YX"
    if nd == 3:
        if small(shape[-1]) and shape[0] > 4:
            return "YXC"
        if small(shape[0]):
            return "CYX"
        return "ZYX"
    if nd == 4:
        if small(shape[1]):
            return "ZCYX"
        if small(shape[-1]):
            return "ZYXC"
    raise InputError(
        f"{nd}-D array of shape {tuple(shape)} without axis names: segstudio reads 2-D images, "
        "multi-channel images and Z or T stacks",
        hint="give the axes (for example save as OME-TIFF with axes TZCYX)",
    )


def as_image(
    data: np.ndarray,
    axes: str | None = None,
    *,
    pixel_size: tuple[float, float] | None = None,
    name: str = "image",
    channel_names: list[str] | None = None,
) -> ImageData:
    """Validate an array and bring it to canonical axes.

    ``axes`` may use ``S`` (samples, e.g. RGB) as an alias of ``C``; when it
    is ``None`` the axes are guessed with :func:`guess_axes`.

    Parameters
    ----------
    data : numpy.ndarray or array_like
        The pixels, integers, floats or bool (converted by :func:`native_pixels`).
    axes : str, optional
        One letter per dimension of ``data``, in its order (e.g. ``"YXC"``, ``"ZCYX"``).
    pixel_size : tuple of float, optional
        ``(y, x)`` in micrometres; a value outside :data:`PIXEL_SIZE_RANGE_UM` or not finite is
        dropped, with a notice.
    name : str
        Short name of the image (for messages and ``ImageData.name``).
    channel_names : list of str, optional
        One name per channel; ignored (``"ch0"``... used) when the count does not match.

    Returns
    -------
    ImageData
        ``data`` transposed to canonical axes (a subset of ``"TZCYX"`` ending in ``"YX"``, length-1
        axes other than Y and X dropped), a view of the input where no conversion was needed.

    Raises
    ------
    InputError
        When the array is empty, of an unsupported pixel type, has axes that cannot be interpreted,
        a plane under :data:`MIN_SIDE` pixels a side, more pixels than :func:`check_pixel_budget`
        allows, or more than :data:`MAX_CHANNELS` channels.
    """
    data = np.asarray(data) if not isinstance(data, np.ndarray) else data
    data = native_pixels(data, name)
    if data.size == 0:
        raise InputError(f"{name}: the image is empty (shape {data.shape})")
    if axes is None:
        axes = guess_axes(data.shape)
    data, axes = _canonicalize(data, axes, name)
    check_plane_size(data.shape[-2:], name)
    check_pixel_budget(data.shape[-2:], int(np.prod(data.shape[:-2])) // max(1, _channels(data.shape, axes)), name)
    notices: list[str] = []
    pixel_size = checked_pixel_size(pixel_size, notices)
    img = ImageData(data=data, axes=axes, pixel_size=pixel_size, name=name, notices=notices)
    if img.n_channels > MAX_CHANNELS:
        raise InputError(f"{name}: {img.n_channels} channels; at most {MAX_CHANNELS} are supported")
    if channel_names:
        if len(channel_names) != img.n_channels:
            channel_names = None
        else:
            img.channel_names = list(channel_names)
    return img


def _channels(shape: tuple[int, ...], axes: str) -> int:
    return shape[axes.index("C")] if "C" in axes else 1


def native_pixels(data: np.ndarray, name: str) -> np.ndarray:
    """Pixels in a type the pipeline computes with: bool as uint8, float16 as float32, native byte order.

    Anything but integers and floats (complex, strings, objects) is refused.

    Parameters
    ----------
    data : numpy.ndarray
        Pixels of any shape.
    name : str
        Name of the image, for the error message.

    Returns
    -------
    numpy.ndarray
        Same shape; ``data`` itself when its type already fits, else a converted copy.

    Raises
    ------
    InputError
        When the dtype is neither bool, integer nor float.
    """
    if data.dtype == bool:
        return data.astype(np.uint8)
    if data.dtype.kind not in "uif":
        raise InputError(f"{name}: pixel type {data.dtype} is not supported (integers or floats only)")
    if data.dtype.kind == "f" and data.dtype.itemsize < 4:
        return data.astype(np.float32)
    if not data.dtype.isnative:
        return data.astype(data.dtype.newbyteorder("="))
    return data


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """The type pixels of ``dtype`` are read as (see :func:`native_pixels`).

    Parameters
    ----------
    dtype : numpy.dtype or dtype-like
        Pixel type as stored (any byte order).

    Returns
    -------
    numpy.dtype
        uint8 for bool, float32 for floats under 4 bytes, else ``dtype`` in native byte order
        (unsupported kinds are not refused here).
    """
    dtype = np.dtype(dtype)
    if dtype == bool:
        return np.dtype(np.uint8)
    if dtype.kind == "f" and dtype.itemsize < 4:
        return np.dtype(np.float32)
    return dtype.newbyteorder("=")


# --------------------------------------------------------------------------- readers


def _named(read):
    """Readers' errors name the file (``as_image`` and the axis checks only know the image's stem)."""
    import functools

    @functools.wraps(read)
    def wrapper(path, *args, **kwargs):
        try:
            return read(path, *args, **kwargs)
        except InputError as e:
            raise naming(e, path) from None

    return wrapper


@contextlib.contextmanager
def open_image_file(path: str | Path) -> Iterator:
    """``path`` opened for binary reading, or an :class:`InputError` saying why it cannot be.

    Only regular, non-empty files are opened: a named pipe would block the
    reader forever and a device such as ``/dev/zero`` never ends.

    Parameters
    ----------
    path : str or pathlib.Path
        The image file.

    Yields
    ------
    file object
        ``path`` open in ``"rb"`` mode, closed when the ``with`` block ends.

    Raises
    ------
    InputError
        When ``path`` is missing, unreadable, a folder, not a regular file, or empty (0 bytes).
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror or e})") from None
    import stat as stat_

    if stat_.S_ISDIR(st.st_mode):
        raise InputError(f"{path} is a folder, not an image")
    if not stat_.S_ISREG(st.st_mode):
        raise InputError(f"{path}: not a regular file (a device, pipe or socket), so not an image")
    if st.st_size == 0:
        raise InputError(f"{path}: the file is empty (0 bytes)")
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        yield f
    finally:
        f.close()


@_named
def read_open_file(path: Path, f) -> ImageData:
    """Read the image file ``path`` from its open binary handle ``f``.

    The format is chosen by the suffix of ``path``: TIFF (``.tif``, ``.tiff``),
    PNG / JPEG, or ``.npy``.  Error messages name ``path``.

    Parameters
    ----------
    path : pathlib.Path
        The file's path (for its suffix, its name and messages).
    f : file object
        ``path`` open for binary reading (e.g. from :func:`open_image_file`), positioned at the start.

    Returns
    -------
    ImageData
        The whole image in canonical axes, named by :func:`image_stem`.

    Raises
    ------
    InputError
        For an unsupported suffix, or a file that cannot be read or used as an image.
    """
    suffix = path.suffix.lower()
    name = image_stem(path)
    if suffix in TIFF_SUFFIXES:
        return _read_tiff(path, name, f)
    if suffix in PIL_SUFFIXES:
        return _read_pil(path, name, f)
    if suffix == ".npy":
        npy_header(path, f)  # refuses what cannot be read before allocating for it
        f.seek(0)
        try:
            data = np.load(f, allow_pickle=False)
        except MemoryError:
            raise InputError(f"{path}: too large to load into memory") from None
        except Exception as e:  # noqa: BLE001 - any failure here means a bad file
            raise InputError(f"{path}: not a readable .npy array ({_short(e)})") from None
        return as_image(data, name=name)
    raise InputError(
        f"{path}: unsupported file type {suffix!r}",
        hint="use TIFF, OME-TIFF, PNG, JPEG or .npy",
    )


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int  # where the pixels start


def npy_header(path: Path, f) -> NpyHeader:
    """The header of the ``.npy`` file open as ``f``, checked against the file's size.

    Only the header is read (``f`` is left after it).  The pixel budget and
    :data:`MAX_DECODE_BYTES` are not checked here.

    Parameters
    ----------
    path : pathlib.Path
        The file's path, for error messages.
    f : file object
        The file open for binary reading; read from its start.

    Returns
    -------
    NpyHeader
        ``shape``, ``dtype``, ``fortran`` (column-major order) and ``offset`` (bytes from the start
        of the file to the pixels).

    Raises
    ------
    InputError
        When the header cannot be read, the array holds Python objects, has fewer than 2
        dimensions, or the file holds fewer bytes than the header declares.
    """
    fmt = np.lib.format
    try:
        f.seek(0)
        version = fmt.read_magic(f)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read(f)
    except Exception as e:  # noqa: BLE001 - a damaged header raises many types
        raise InputError(f"{path}: not a readable .npy array ({_short(e)})") from None
    if dtype.hasobject:
        raise InputError(f"{path}: the array holds Python objects, not pixels (segstudio never unpickles)")
    if len(shape) < 2:
        raise InputError(f"{path}: a {len(shape)}-D array is not an image")
    header = NpyHeader(tuple(int(n) for n in shape), np.dtype(dtype), bool(fortran), f.tell())
    nbytes = int(np.prod(header.shape, dtype=object)) * header.dtype.itemsize
    size = os.fstat(f.fileno()).st_size
    if nbytes > size - header.offset:
        raise InputError(f"{path}: the file is truncated (its header declares {header.shape} {header.dtype}, "
                         f"{nbytes:,} bytes, but {max(0, size - header.offset):,} follow it)")
    return header


def image_stem(path: Path) -> str:
    """Short name of an image file: its name without the suffix (``.ome.tif`` / ``.ome.tiff`` whole).

    Parameters
    ----------
    path : pathlib.Path
        The file's path.

    Returns
    -------
    str
        ``"a"`` for ``dir/a.ome.tif`` (suffix matched case-insensitively), ``"a.b"`` for ``a.b.png``.
    """
    name = path.name
    for suf in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return path.stem


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:160]


def _read_tiff(path: Path, name: str, f) -> ImageData:
    import tifffile

    notices: list[str] = []
    try:
        with tifffile.TiffFile(f, name=path.name) as tif:
            series = tif.series[0]
            axes = series.axes
            check_tiff_limits(tif, series, str(path))
            check_decode_bytes(int(np.prod(series.shape, dtype=object)) * np.dtype(series.dtype).itemsize,
                               str(path), "its pixels")
            data = series.asarray()
            pixel_size, channel_names = _tiff_metadata(tif, notices)
    except InputError:
        raise
    except tifffile.TiffFileError as e:
        raise InputError(f"{path}: not a readable TIFF file ({_short(e)})") from None
    except MemoryError:
        raise InputError(f"{path}: too large to load into memory") from None
    except Exception as e:  # noqa: BLE001 - decoders raise many types on corrupt data
        raise InputError(f"{path}: the TIFF file is truncated or corrupt ({_short(e)})") from None
    img = as_image(data, axes, pixel_size=pixel_size, name=name, channel_names=channel_names)
    img.notices[:0] = notices
    return img


def check_tiff_limits(tif, series, name: str) -> None:
    """The pixel budget of the series' planes, and the size of one decoded tile or strip.

    Checked from the header only; the tile or strip size is that of the first page.

    Parameters
    ----------
    tif : tifffile.TiffFile
        The open TIFF.
    series : tifffile.TiffPageSeries
        The series to be read (its ``shape`` and ``axes``).
    name : str
        Name of the file, for error messages.

    Raises
    ------
    InputError
        When a plane or the stack is over :func:`check_pixel_budget`'s limits, or one tile or strip
        would decode to more than :data:`MAX_DECODE_BYTES`.
    """
    shape, axes = tuple(series.shape), series.axes
    yx = [shape[i] for i, a in enumerate(axes) if a in "YX"]
    if len(yx) == 2:
        planes = int(np.prod([n for a, n in zip(axes, shape) if a not in "YXCS"], dtype=object))
        check_pixel_budget(tuple(yx), planes, name)
    page = tif.pages.first
    samples = int(getattr(page, "samplesperpixel", 1) or 1)
    itemsize = np.dtype(page.dtype).itemsize if page.dtype is not None else 1
    if page.is_tiled:
        segment = int(page.tilelength) * int(page.tilewidth) * max(1, int(getattr(page, "tiledepth", 1) or 1))
    else:
        segment = int(min(page.rowsperstrip or page.imagelength, page.imagelength)) * int(page.imagewidth)
    check_decode_bytes(segment * samples * itemsize, name, "one of its " + ("tiles" if page.is_tiled else "strips"))


def _tiff_metadata(tif, notices: list[str]) -> tuple[tuple[float, float] | None, list[str] | None]:
    """Pixel size (y, x) in µm and channel names from OME, ImageJ or TIFF tags (unusable sizes: a notice)."""
    size, names = _tiff_metadata_raw(tif)
    return checked_pixel_size(size, notices), names


def _tiff_metadata_raw(tif) -> tuple[tuple[float, float] | None, list[str] | None]:
    if tif.is_ome and tif.ome_metadata:
        try:
            return _ome_metadata(tif.ome_metadata)
        except ET.ParseError:
            pass
    page = tif.pages[0]
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None, None
    unit_um = None
    if tif.is_imagej and tif.imagej_metadata:
        unit = str(tif.imagej_metadata.get("unit", "")).strip().lower().replace("\\u00b5", "µ")
        unit_um = _UNIT_UM.get(unit)
    else:
        res_unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
        # 3 = centimetre; 2 = inch is almost always a meaningless 72 dpi default
        unit_um = 1e4 if res_unit == 3 else None
    if unit_um is None:
        return None, None

    def size(tag: str) -> float | None:
        try:
            num, den = tags[tag].value
            return unit_um * den / num if num else None
        except (TypeError, ValueError, ZeroDivisionError):
            return None

    py, px = size("YResolution"), size("XResolution")
    if not py or not px:
        return None, None
    return (py, px), None


def _ome_metadata(xml: str) -> tuple[tuple[float, float] | None, list[str] | None]:
    root = ET.fromstring(xml)
    pixels = next((el for el in root.iter() if el.tag.endswith("}Pixels") or el.tag == "Pixels"), None)
    if pixels is None:
        return None, None
    names = [
        ch.get("Name") for ch in pixels if ch.tag.endswith("Channel") and ch.get("Name")
    ] or None

    def size(axis: str) -> float | None:
        value = pixels.get(f"PhysicalSize{axis}")
        if value is None:
            return None
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm").strip().lower()
        factor = _UNIT_UM.get(unit)
        try:
            return float(value) * factor if factor else None
        except ValueError:
            return float("nan")  # not a number: reported by checked_pixel_size

    py, px = size("Y"), size("X")
    return ((py, px) if py is not None and px is not None else None), names


def _read_pil(path: Path, name: str, f) -> ImageData:
    import warnings

    from PIL import Image

    kind = path.suffix.lstrip(".").upper()
    try:
        with warnings.catch_warnings():
            # large images get an error below; Pillow's warning for "large" ones would only be noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(f) as im:
                w, h = im.size
                check_pixel_budget((h, w), 1, str(path))
                bands = len(im.getbands())
                depth = 4 if im.mode in ("I", "F") else 2 if im.mode.startswith("I;16") else 1
                check_decode_bytes(w * h * max(bands, 3 if im.mode == "P" else 1) * depth, str(path), "its pixels")
                im.load()
                if im.mode == "P":
                    im = im.convert("RGB")
                data = np.asarray(im)
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"{path}: refused as a possible decompression bomb ({_short(e)})",
                         hint="save large images as TIFF, which segstudio reads region by region") from None
    except MemoryError:
        raise InputError(f"{path}: too large to load into memory") from None
    except Exception as e:  # noqa: BLE001 - decoders raise many types on damaged files
        raise InputError(f"{path}: not a readable {kind} image ({_short(e)})") from None
    if data.ndim == 3 and data.shape[-1] in (2, 4):
        alpha = data[..., -1]
        if alpha.min() == alpha.max():  # opaque: alpha carries nothing
            data = data[..., :-1]
    axes = "YX" if data.ndim == 2 else "YXC"
    return as_image(data, axes, name=name)


# --------------------------------------------------------------------------- writers


TEMP_SUFFIX = ".segstudio-tmp"
# what temporary_sibling names its files, and so the only names stale-file clean-up ever removes
TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}" + re.escape(TEMP_SUFFIX) + "$")


def ensure_folder(path: str | Path) -> Path:
    """Create the output folder ``path`` (and its parents); an :class:`OutputError` when it cannot be one.

    Parameters
    ----------
    path : str or pathlib.Path
        The folder; it may exist already.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    OutputError
        When ``path`` (or a parent) is a file, or the folder cannot be created.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise OutputError(f"cannot write to {path}: it is a file, not a folder", path=path, errno_=e.errno,
                          hint="choose a folder for the outputs") from None
    except OSError as e:
        raise OutputError.from_oserror(path, e, "create the folder") from None
    if not path.is_dir():
        raise OutputError(f"cannot write to {path}: it is not a folder", path=path,
                          hint="choose a folder for the outputs")
    return path


def check_output_file(path: str | Path) -> Path:
    """Refuse an output file ``path`` that exists as something else than a regular file (a folder, a device).

    Parameters
    ----------
    path : str or pathlib.Path
        The file to be written; it need not exist.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    OutputError
        When ``path`` exists (or is a dangling link) and is not a regular file, or its nearest
        existing parent is not a folder.
    """
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not path.is_file():
        raise OutputError(f"cannot write {path}: it exists and is not a regular file (a folder or a device)",
                          path=path, hint="choose another output location")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"cannot write {path}: {parent} is a file, not a folder", path=path,
                                  hint="choose another output location")
            break
    return path


def temporary_sibling(path: str | Path) -> Path:
    """A new, empty file beside ``path`` named ``.<name>.<8 random>.segstudio-tmp`` (:data:`TEMP_NAME`).

    Parameters
    ----------
    path : str or pathlib.Path
        The file the temporary one will replace; its folder must exist.

    Returns
    -------
    pathlib.Path
        The temporary file (created, closed; the caller removes or renames it).

    Raises
    ------
    OutputError
        When the file cannot be created.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise OutputError.from_oserror(path, e) from None
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` on success.

    Readers of ``path`` never see a half-written file, and a failure (or a
    killed process) leaves at most a temporary file named by
    :func:`temporary_sibling`, which is never mistaken for output and is the
    only kind of file stale-file clean-up removes.  ``path`` must be a
    regular file or not exist (a device such as ``/dev/null`` or a folder is
    never replaced).  Errors of the file system are :class:`OutputError`.

    Parameters
    ----------
    path : str or pathlib.Path
        The output file; its folder is created when missing.

    Yields
    ------
    pathlib.Path
        An empty temporary file in the same folder, to write in the ``with`` block.

    Raises
    ------
    OutputError
        When ``path`` cannot be written or replaced (see :func:`check_output_file`), or an
        ``OSError`` about the temporary file or ``path`` (or naming no file) ends the block.
    """
    path = check_output_file(path)
    ensure_folder(path.parent)
    tmp = temporary_sibling(path)
    try:
        try:
            yield tmp
        except OSError as e:
            if e.filename is None or str(e.filename) in (str(tmp), str(path)):
                raise OutputError.from_oserror(path, e) from None
            raise
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise OutputError.from_oserror(path, e) from None
    finally:
        if tmp.exists():
            tmp.unlink()


_PREAD_LOCK = None


def pread(fd: int, n: int, offset: int) -> bytes:
    """``n`` bytes at ``offset`` of ``fd`` without moving its position (``os.pread``; a locked seek on Windows).

    Parameters
    ----------
    fd : int
        An open file descriptor.
    n : int
        Number of bytes to read.
    offset : int
        Position in the file, in bytes.

    Returns
    -------
    bytes
        At most ``n`` bytes (fewer at the end of the file).
    """
    if hasattr(os, "pread"):
        return os.pread(fd, n, offset)
    global _PREAD_LOCK
    import threading

    _PREAD_LOCK = _PREAD_LOCK or threading.Lock()
    with _PREAD_LOCK:
        here = os.lseek(fd, 0, os.SEEK_CUR)
        try:
            os.lseek(fd, offset, os.SEEK_SET)
            return os.read(fd, n)
        finally:
            os.lseek(fd, here, os.SEEK_SET)


SIGNATURE_BLOCK = 1 << 16
SIGNATURE_BLOCKS = 16


def file_signature(path: str | Path, fd: int | None = None) -> list:
    """``[size, mtime_ns, hash]`` of a file (of the open descriptor ``fd`` when given): what identifies its bytes.

    The hash (BLAKE2b, 64 bits) covers the size and :data:`SIGNATURE_BLOCKS`
    blocks of 64 KiB spread evenly over the file, first and last included:
    the whole file when it is under 1 MiB, a fast sample of larger ones, so
    a copy that kept the size and time stamp of the file it replaced is told
    apart too.  A zarr store (a folder) hashes the names, sizes and time
    stamps of its files.

    Parameters
    ----------
    path : str or pathlib.Path
        The file, or a zarr store's folder.
    fd : int, optional
        A descriptor of the file, open for reading; when given it is hashed (and not closed) and
        ``path`` is not used.

    Returns
    -------
    list
        ``[size, mtime_ns, hash]``: size in bytes (int), modification time in nanoseconds (int) and
        the hash as 16 hex digits (str); for a folder, its files' total size and latest time.
    """
    path = Path(path)
    h = hashlib.blake2b(digest_size=8)
    if fd is None and path.is_dir():
        latest, total = 0, 0
        for root, dirs, names in os.walk(path):
            dirs.sort()
            for n in sorted(names):
                st = os.stat(os.path.join(root, n))
                total += st.st_size
                latest = max(latest, st.st_mtime_ns)
                h.update(f"{os.path.relpath(os.path.join(root, n), path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return [total, latest, h.hexdigest()]
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        size = st.st_size
        h.update(str(size).encode())
        if size <= SIGNATURE_BLOCK * SIGNATURE_BLOCKS:
            h.update(pread(fd, size, 0))
        else:
            for k in range(SIGNATURE_BLOCKS):
                offset = (size - SIGNATURE_BLOCK) * k // (SIGNATURE_BLOCKS - 1)
                h.update(pread(fd, SIGNATURE_BLOCK, offset))
    finally:
        if own:
            os.close(fd)
    return [size, st.st_mtime_ns, h.hexdigest()]


SOFTWARE = "segstudio"  # the TIFF Software tag of every labels file segstudio writes


def check_replaceable(path: str | Path) -> None:
    """Refuse to replace ``path`` unless it is missing or an output segstudio wrote.

    Labels TIFFs carry ``Software: segstudio``; measurement tables start with
    the ``label`` column.  Anything else under that name (a ground truth
    ``X_labels.tif`` beside the images, a colleague's file) is the user's, and
    segstudio never writes over it.

    Parameters
    ----------
    path : str or pathlib.Path
        The output file about to be written.

    Raises
    ------
    OutputError
        When ``path`` exists and is not a regular file recognised as segstudio's (``.tif`` /
        ``.tiff`` with that Software tag, or ``.csv`` starting with the ``label`` column).
    """
    path = Path(path)
    if not path.exists():
        return
    if path.is_file() and _written_by_segstudio(path):
        return
    raise OutputError(f"{path} exists and was not written by segstudio: it is not replaced",
                      path=path, hint="move it away, or choose another output folder")


def _written_by_segstudio(path: Path) -> bool:
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                tag = tif.pages.first.tags.get("Software")
                return tag is not None and str(tag.value).startswith(SOFTWARE)
        if path.suffix.lower() == ".csv":
            with open(path, "rb") as f:
                return f.read(6) in (b"label,", b"label\r", b"label\n")
    except Exception:  # noqa: BLE001 - unreadable: not recognisably ours
        return False
    return False


def labels_dtype(n_objects: int) -> np.dtype:
    """uint16 while the labels fit, uint32 past 65,535 objects.

    Parameters
    ----------
    n_objects : int
        The largest label (the number of objects).

    Returns
    -------
    numpy.dtype
        ``uint16`` for at most 65,535 objects, else ``uint32``.
    """
    return np.dtype(np.uint16) if n_objects <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


def write_labels(path: str | Path, labels: np.ndarray, *, pixel_size: tuple[float, float] | None = None) -> Path:
    """Write an instance-label image as a zlib-compressed TIFF, atomically.

    The pixel size, when known, is stored as a centimetre resolution, which
    :func:`~segstudio.core.image.sources.read_image` reads back.

    Parameters
    ----------
    path : str or pathlib.Path
        The TIFF to write (replaced when it exists; see :func:`atomic_path`).
    labels : numpy.ndarray
        ``(Y, X)`` (or a stack) of integer labels, 0 background; written in its own dtype.
    pixel_size : tuple of float, optional
        ``(y, x)`` in micrometres; no resolution is written when ``None``.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    OutputError
        When the file cannot be written.
    """
    import tifffile

    path = Path(path)
    kwargs = {}
    if pixel_size is not None:
        py, px = pixel_size
        kwargs = dict(resolution=(1e4 / px, 1e4 / py), resolutionunit="CENTIMETER")
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, labels, compression="zlib", metadata=None, software=SOFTWARE, **kwargs)
    return path


def safe_stem(name: str) -> str:
    """A file-name-safe version of ``name``.

    Parameters
    ----------
    name : str
        Any name (an image's name, a layer's).

    Returns
    -------
    str
        ``name`` with each run of characters other than letters, digits, ``_``, ``.`` and ``-``
        replaced by ``_``, leading and trailing ``.`` / ``_`` stripped; ``"image"`` when nothing is left.
    """
    return re.sub(r"[^\w.\-]+", "_", name).strip("._") or "image"
