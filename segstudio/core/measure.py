"""Per-cell measurements.

One row per object: label, area in pixels (and in µm² when the pixel size is
known), centroid (pixels, and µm), eccentricity, solidity, and the mean and
max intensity of every channel of the *original* image (not the normalized
one).  Tables are plain ``dict[str, ndarray]`` columns: napari takes them as
``layer.features`` and :func:`write_csv` writes them.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .io import atomic_path

Table = dict[str, np.ndarray]

SHAPE_PROPS = ("label", "area", "centroid", "eccentricity", "solidity")


def measure(
    labels: np.ndarray,
    plane: np.ndarray,
    *,
    pixel_size: tuple[float, float] | None = None,
    channel_names: list[str] | None = None,
) -> Table:
    """Measure every object of ``labels`` ``(Y, X)`` over ``plane`` ``(C, Y, X)``."""
    from skimage.measure import regionprops_table

    n_ch = plane.shape[0]
    names = channel_names if channel_names and len(channel_names) == n_ch else [f"ch{i}" for i in range(n_ch)]
    if labels.max() == 0:
        return empty_table(names, pixel_size is not None)
    props = regionprops_table(
        labels,
        intensity_image=np.moveaxis(plane, 0, -1),
        properties=(*SHAPE_PROPS, "intensity_mean", "intensity_max"),
    )
    n = len(props["label"])
    table: Table = {
        "label": props["label"].astype(np.int64),
        "area_px": props["area"].astype(np.int64),
    }
    if pixel_size is not None:
        table["area_um2"] = props["area"] * pixel_size[0] * pixel_size[1]
    table["centroid_y"] = props["centroid-0"]
    table["centroid_x"] = props["centroid-1"]
    if pixel_size is not None:
        table["centroid_y_um"] = props["centroid-0"] * pixel_size[0]
        table["centroid_x_um"] = props["centroid-1"] * pixel_size[1]
    table["eccentricity"] = props["eccentricity"]
    table["solidity"] = props["solidity"]
    for i, name in enumerate(names):
        table[f"mean_{name}"] = np.asarray(props[f"intensity_mean-{i}"], np.float64).reshape(n)
        table[f"max_{name}"] = np.asarray(props[f"intensity_max-{i}"], np.float64).reshape(n)
    return table


def empty_table(channel_names: list[str], physical: bool) -> Table:
    cols = ["label", "area_px"] + (["area_um2"] if physical else []) + ["centroid_y", "centroid_x"]
    cols += (["centroid_y_um", "centroid_x_um"] if physical else []) + ["eccentricity", "solidity"]
    for name in channel_names:
        cols += [f"mean_{name}", f"max_{name}"]
    return {c: np.zeros(0, np.int64 if c in ("label", "area_px") else np.float64) for c in cols}


def concat_tables(tables: list[Table], extra: list[dict[str, int]]) -> Table:
    """Stack per-plane tables, adding constant columns (e.g. ``{"z": 3}``) to each."""
    if not tables:
        return {}
    out: Table = {}
    for key in extra[0] if extra else {}:
        out[key] = np.concatenate([np.full(len(t["label"]), e[key], np.int64) for t, e in zip(tables, extra)])
    for key in tables[0]:
        out[key] = np.concatenate([t[key] for t in tables])
    return out


def write_csv(path: str | Path, table: Table) -> Path:
    """Write a table as CSV (one row per cell), atomically."""
    path = Path(path)
    cols = list(table)
    n = len(table[cols[0]]) if cols else 0
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(cols)
            columns = [table[c] for c in cols]
            for i in range(n):
                writer.writerow([_fmt(col[i]) for col in columns])
    return path


def _fmt(v) -> str:
    if isinstance(v, (np.floating, float)):
        return f"{float(v):.6g}"
    return str(v)
