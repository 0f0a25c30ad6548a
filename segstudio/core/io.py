"""Reading images and writing labels.

Images come back as :class:`ImageData`: the pixels in canonical axis order
(a subset of ``"TZCYX"`` in that order, always ending in ``"YX"``), the axes
string, and the pixel size in micrometres when the file says it.

Readers:

* TIFF, OME-TIFF and ImageJ TIFF via tifffile (axes from the metadata,
  compressed TIFFs through imagecodecs);
* PNG and JPEG via Pillow;
* ``.npy`` arrays (no pickles);
* zarr stores, including OME-Zarr (see :mod:`segstudio.core.sources`).

Any file that cannot be used raises :class:`~segstudio.core.errors.InputError`
with a one-line message naming the file and what is wrong with it.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import InputError

TIFF_SUFFIXES = {".tif", ".tiff"}
PIL_SUFFIXES = {".png", ".jpg", ".jpeg"}
IMAGE_SUFFIXES = TIFF_SUFFIXES | PIL_SUFFIXES | {".npy"}
CANONICAL = "TZCYX"
MIN_SIDE = 8
MAX_CHANNELS = 16

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
    becomes Z (a stack); more are refused as ambiguous.
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
    h, w = plane_shape
    if h < MIN_SIDE or w < MIN_SIDE:
        raise InputError(f"{name}: image is {h}x{w} pixels, too small to segment (at least {MIN_SIDE}x{MIN_SIDE})")


def guess_axes(shape: tuple[int, ...]) -> str:
    """Axes of an array that came without metadata.

    2-D is ``YX``; 3-D is ``YXC`` or ``CYX`` when one end has 2..4 entries
    (colour / channels), else ``ZYX``; 4-D is ``ZCYX`` or ``ZYXC`` on the same
    rule.  Anything else is ambiguous and refused.
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
    """
    data = np.asarray(data) if not isinstance(data, np.ndarray) else data
    if data.dtype == bool:
        data = data.astype(np.uint8)
    if data.dtype.kind not in "uif":
        raise InputError(f"{name}: pixel type {data.dtype} is not supported (integers or floats only)")
    if data.size == 0:
        raise InputError(f"{name}: the image is empty (shape {data.shape})")
    if axes is None:
        axes = guess_axes(data.shape)
    data, axes = _canonicalize(data, axes, name)
    check_plane_size(data.shape[-2:], name)
    img = ImageData(data=data, axes=axes, pixel_size=pixel_size, name=name)
    if img.n_channels > MAX_CHANNELS:
        raise InputError(f"{name}: {img.n_channels} channels; at most {MAX_CHANNELS} are supported")
    if channel_names:
        if len(channel_names) != img.n_channels:
            channel_names = None
        else:
            img.channel_names = list(channel_names)
    return img


# --------------------------------------------------------------------------- readers


def read_image(path: str | Path) -> ImageData:
    """Read an image file. See the module docstring for the formats."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.suffix.lower() == ".zarr":
        from .sources import open_source

        with open_source(path) as src:
            data, axes = _canonicalize(np.asarray(src.raw[...]), src.raw_axes, src.name)
            return ImageData(data=data, axes=axes, pixel_size=src.pixel_size, name=src.name)
    if path.is_dir():
        raise InputError(f"{path} is a folder, not an image")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty (0 bytes)")
    suffix = path.suffix.lower()
    name = _stem(path)
    if suffix in TIFF_SUFFIXES:
        return _read_tiff(path, name)
    if suffix in PIL_SUFFIXES:
        return _read_pil(path, name)
    if suffix == ".npy":
        try:
            data = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - any failure here means a bad file
            raise InputError(f"{path}: not a readable .npy array ({_short(e)})") from None
        return as_image(data, name=name)
    raise InputError(
        f"{path}: unsupported file type {suffix!r}",
        hint="use TIFF, OME-TIFF, PNG, JPEG or .npy",
    )


def _stem(path: Path) -> str:
    name = path.name
    for suf in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return path.stem


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:160]


def _read_tiff(path: Path, name: str) -> ImageData:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes = series.axes
            data = series.asarray()
            pixel_size, channel_names = _tiff_metadata(tif)
    except InputError:
        raise
    except tifffile.TiffFileError as e:
        raise InputError(f"{path}: not a readable TIFF file ({_short(e)})") from None
    except MemoryError:
        raise InputError(f"{path}: too large to load into memory") from None
    except Exception as e:  # noqa: BLE001 - decoders raise many types on corrupt data
        raise InputError(f"{path}: the TIFF file is truncated or corrupt ({_short(e)})") from None
    return as_image(data, axes, pixel_size=pixel_size, name=name, channel_names=channel_names)


def _tiff_metadata(tif) -> tuple[tuple[float, float] | None, list[str] | None]:
    """Pixel size (y, x) in µm and channel names from OME, ImageJ or TIFF tags."""
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
        num, den = tags[tag].value
        return unit_um * den / num if num else None

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
        return float(value) * factor if factor else None

    py, px = size("Y"), size("X")
    return ((py, px) if py and px else None), names


def _read_pil(path: Path, name: str) -> ImageData:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "P":
                im = im.convert("RGB")
            data = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{path}: not a readable {path.suffix.lstrip('.').upper()} image ({_short(e)})") from None
    if data.ndim == 3 and data.shape[-1] in (2, 4):
        alpha = data[..., -1]
        if alpha.min() == alpha.max():  # opaque: alpha carries nothing
            data = data[..., :-1]
    axes = "YX" if data.ndim == 2 else "YXC"
    return as_image(data, axes, name=name)


# --------------------------------------------------------------------------- writers


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` on success.

    Readers of ``path`` never see a half-written file, and a failure (or a
    killed process) leaves at most a ``.tmp`` file that is never mistaken
    for output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def labels_dtype(n_objects: int) -> np.dtype:
    """uint16 while the labels fit, uint32 past 65,535 objects."""
    return np.dtype(np.uint16) if n_objects <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


def write_labels(path: str | Path, labels: np.ndarray, *, pixel_size: tuple[float, float] | None = None) -> Path:
    """Write an instance-label image as a zlib-compressed TIFF, atomically.

    The pixel size, when known, is stored as a centimetre resolution, which
    :func:`read_image` reads back.
    """
    import tifffile

    path = Path(path)
    kwargs = {}
    if pixel_size is not None:
        py, px = pixel_size
        kwargs = dict(resolution=(1e4 / px, 1e4 / py), resolutionunit="CENTIMETER")
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, labels, compression="zlib", metadata=None, **kwargs)
    return path


def safe_stem(name: str) -> str:
    """A file-name-safe version of ``name``."""
    return re.sub(r"[^\w.\-]+", "_", name).strip("._") or "image"
