"""Per-cell measurements.

One row per object: label, area in pixels (and in µm² when the pixel size is
known), centroid (pixels, and µm), eccentricity, solidity, and the mean and
max intensity of every channel of the *original* image (not the normalized
one).  Computed for all objects at once from the foreground pixels (about
4x faster than ``skimage.measure.regionprops_table`` on the samples).  Tables are plain ``dict[str, ndarray]`` columns: napari takes them as
``layer.features`` and :func:`write_csv` writes them.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .io import atomic_path

Table = dict[str, np.ndarray]

def measure(
    labels: np.ndarray,
    plane: np.ndarray,
    *,
    pixel_size: tuple[float, float] | None = None,
    channel_names: list[str] | None = None,
) -> Table:
    """Measure every object of ``labels`` ``(Y, X)`` over ``plane`` ``(C, Y, X)``.

    Vectorised over objects (``bincount`` sums and second moments); only the
    convex hull for the solidity is per object, on each object's row
    extremes.  Eccentricity follows scikit-image (from the eigenvalues of the
    pixel coordinates' covariance); solidity is the pixel area over the area
    of the convex hull of the object's pixel squares (1 for a rectangle).
    """
    n_ch = plane.shape[0]
    names = channel_names if channel_names and len(channel_names) == n_ch else [f"ch{i}" for i in range(n_ch)]
    flat = labels.ravel()
    nz = np.flatnonzero(flat)
    lab = flat[nz]
    counts = np.bincount(lab)
    ids = np.flatnonzero(counts)
    if len(ids) == 0:
        return empty_table(names, pixel_size is not None)
    area = counts[ids].astype(np.float64)
    rows, cols = np.divmod(nz, labels.shape[1])

    def total(weights):
        return np.bincount(lab, weights=weights, minlength=len(counts))[ids]

    yy, xx = rows.astype(np.float64), cols.astype(np.float64)
    cy, cx = total(yy) / area, total(xx) / area
    vyy = total(yy * yy) / area - cy * cy
    vxx = total(xx * xx) / area - cx * cx
    vxy = total(yy * xx) / area - cy * cx
    half_tr = (vyy + vxx) / 2
    root = np.sqrt(np.maximum(half_tr**2 - (vyy * vxx - vxy**2), 0))
    l1, l2 = half_tr + root, np.maximum(half_tr - root, 0)
    ecc = np.where(l1 > 0, np.sqrt(1 - l2 / np.where(l1 > 0, l1, 1)), 0.0)

    table: Table = {"label": ids.astype(np.int64), "area_px": counts[ids].astype(np.int64)}
    if pixel_size is not None:
        table["area_um2"] = area * pixel_size[0] * pixel_size[1]
    table["centroid_y"] = cy
    table["centroid_x"] = cx
    if pixel_size is not None:
        table["centroid_y_um"] = cy * pixel_size[0]
        table["centroid_x_um"] = cx * pixel_size[1]
    table["eccentricity"] = ecc
    table["solidity"] = area / convex_areas(lab, rows, cols, labels.shape[0], ids)
    for i, name in enumerate(names):
        channel = plane[i]
        table[f"mean_{name}"] = total(channel.ravel()[nz].astype(np.float64)) / area
        table[f"max_{name}"] = np.asarray(ndi.maximum(channel, labels, ids), np.float64).reshape(len(ids))
    return table


def convex_areas(lab: np.ndarray, rows: np.ndarray, cols: np.ndarray, height: int, ids: np.ndarray) -> np.ndarray:
    """Area of the convex hull of each object's pixel squares.

    ``lab``, ``rows``, ``cols`` describe the foreground pixels in raster
    order.  The hull of a set of unit squares is the hull of the corners of
    each row's left-most and right-most square: those runs are found for all
    objects at once, then one Qhull call per object.
    """
    from scipy.spatial import ConvexHull, QhullError

    order = np.argsort(lab, kind="stable")  # per object, still in raster order
    lab, rows, cols = lab[order], rows[order], cols[order]
    key = lab.astype(np.int64) * height + rows
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], len(key)] - 1
    r, c0, c1 = rows[starts], cols[starts], cols[ends] + 1
    corners = np.stack([np.stack([r, c0], 1), np.stack([r + 1, c0], 1), np.stack([r, c1], 1),
                        np.stack([r + 1, c1], 1)], 1).reshape(-1, 2).astype(np.float64)
    run_lab = lab[starts]
    first_run = np.flatnonzero(np.r_[True, run_lab[1:] != run_lab[:-1]])
    bounds = np.r_[first_run, len(run_lab)]
    out = np.empty(len(first_run), np.float64)
    for k in range(len(first_run)):
        pts = corners[4 * bounds[k] : 4 * bounds[k + 1]]
        try:
            out[k] = ConvexHull(pts).volume  # "volume" is the area in 2-D
        except QhullError:  # cannot happen for unit squares; fall back to the pixel count
            out[k] = (c1[bounds[k] : bounds[k + 1]] - c0[bounds[k] : bounds[k + 1]]).sum()
    return out


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
