"""Labels writer: a napari labels layer to an instance-label TIFF.

Uses :func:`~segstudio.core.image.io.write_labels` (zlib-compressed, written
atomically), so the file is what ``segstudio segment`` writes: uint16 while
the labels fit, uint32 beyond, and the pixel size (from the layer scale, when
it is not 1) as the TIFF resolution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import InputError
from ..core.image.io import labels_dtype, write_labels


def write_labels_tif(path: str, data: Any, meta: dict) -> list[str]:
    """npe2 single-layer writer: write labels ``data`` to ``path`` (.tif); returns ``[path]``."""
    target = Path(path)
    if target.suffix.lower() not in (".tif", ".tiff"):
        target = target.with_name(target.name + ".tif")
    labels = np.asarray(data[0] if isinstance(data, list) else data)
    if labels.dtype.kind not in "iub":
        raise InputError(f"{target.name}: labels must be integers, not {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise InputError(f"{target.name}: labels must not be negative")
    top = int(labels.max()) if labels.size else 0
    dtype = labels_dtype(top)
    if labels.dtype != dtype:
        labels = labels.astype(dtype)
    scale = [float(s) for s in meta.get("scale", ())][-2:]
    pixel_size = tuple(scale) if len(scale) == 2 and not np.allclose(scale, 1.0) else None
    write_labels(target, labels, pixel_size=pixel_size)
    return [str(target)]
