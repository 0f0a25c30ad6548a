"""Overlapping tiles with a halo, so that results do not depend on tile size.

The output plane is cut into a grid of *cores* (``tile`` pixels, a multiple
of the network's stride ``multiple``).  Each tile reads its core plus a halo
of ``halo`` pixels on every side (also a multiple of the stride) and only its
core is kept.  With the halo at least the network's receptive radius, every
kept pixel sees exactly the context it would see in one whole-image pass:
the result is independent of the tile size, up to floating-point rounding.

Pixels outside the image are mirrored (``reflect``) from the whole plane,
computed by index, so a tile at the border sees the same padding whatever the
tiling.  All tiles of a plan have one shape, which lets backends batch them
and engines use one static shape.

A network that takes only some input sizes (a fixed 512 x 512, or ``min +
n * step``: :meth:`ModelSpec.tile_shape <segstudio.core.models.spec.ModelSpec.tile_shape>`)
gets tiles of exactly that shape (``tile_shape``): cores of the shape less
twice the halo, and a plane smaller than that is mirrored out to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..jobs import CancelToken, Job, Progress


def round_up(n: int, m: int) -> int:
    """``n`` rounded up to a multiple of ``m``.

    Parameters
    ----------
    n : int
        The value to round.
    m : int
        The step, positive (e.g. the network's stride).

    Returns
    -------
    int
        The smallest multiple of ``m`` not below ``n``.
    """
    return -(-n // m) * m


@dataclass(frozen=True)
class Tile:
    """One tile: where to read, where its kept core goes, and where that is inside the tile."""

    read: tuple[tuple[int, int], tuple[int, int]]  # ((y0, y1), (x0, x1)) may leave the image
    out: tuple[slice, slice]  # in the output plane
    crop: tuple[slice, slice]  # in the tile


@dataclass(frozen=True)
class TilePlan:
    shape: tuple[int, int]
    tile_shape: tuple[int, int]  # (h, w) of every tile read, halo included
    tiles: tuple[Tile, ...]

    def __len__(self) -> int:
        return len(self.tiles)


def plan_tiles(shape: tuple[int, int], *, tile: int = 512, halo: int = 64, multiple: int = 1,
               tile_shape: tuple[int, int] | None = None) -> TilePlan:
    """Plan tiles over a plane of ``shape`` ``(H, W)``.

    ``tile`` and ``halo`` are rounded up to ``multiple``; each axis is cut
    into as few cores as ``tile`` allows, of equal size (rounded up to
    ``multiple``), so a plane smaller than ``tile`` gets one tile just large
    enough.
    ``tile_shape`` (halo included) gives every tile exactly that shape
    instead, whatever ``tile`` and the plane's size.

    Parameters
    ----------
    shape : tuple of int
        (H, W) of the plane, in pixels.
    tile : int
        Wanted core side in pixels; not used (only checked) when ``tile_shape`` is given.
    halo : int
        Pixels read around each core on every side.
    multiple : int
        The network's stride: the halo, and cores planned from ``tile``, are multiples of it.
    tile_shape : tuple of int, optional
        (h, w) of every tile, halo included, for a network that takes only some input sizes.

    Returns
    -------
    TilePlan
        Tiles in raster order, all of ``plan.tile_shape``; their cores (``Tile.out``) cover the plane once.

    Raises
    ------
    ValueError
        When ``tile < 1``, ``halo < 0`` or ``multiple < 1``, or ``tile_shape`` leaves no core inside the halo.
    """
    if tile < 1 or halo < 0 or multiple < 1:
        raise ValueError("tile >= 1, halo >= 0 and multiple >= 1 are required")
    halo = round_up(halo, multiple)
    if tile_shape is not None:
        cores = [int(n) - 2 * halo for n in tile_shape]
        if min(cores) < 1:
            raise ValueError(f"tiles of {tile_shape} leave no core inside a halo of {halo}")
    else:
        # as few cores as ``tile`` allows, of equal size: a 520 px side takes two of 264, not 512 + 8 (whose
        # second tile would be nearly all padding: 4.5x the image's pixels through the network at 520 x 696)
        cores = [round_up(-(-n // -(-n // round_up(tile, multiple))), multiple) for n in shape]
    tiles = []
    for y0 in range(0, shape[0], cores[0]):
        for x0 in range(0, shape[1], cores[1]):
            y1, x1 = min(y0 + cores[0], shape[0]), min(x0 + cores[1], shape[1])
            tiles.append(
                Tile(
                    read=((y0 - halo, y0 + cores[0] + halo), (x0 - halo, x0 + cores[1] + halo)),
                    out=(slice(y0, y1), slice(x0, x1)),
                    crop=(slice(halo, halo + y1 - y0), slice(halo, halo + x1 - x0)),
                )
            )
    return TilePlan(shape=tuple(shape), tile_shape=(cores[0] + 2 * halo, cores[1] + 2 * halo), tiles=tuple(tiles))


def reflect_indices(start: int, stop: int, n: int) -> np.ndarray:
    """Indices ``start..stop-1`` mirrored into ``0..n-1`` (numpy's ``reflect``).

    Parameters
    ----------
    start : int
        First index; may be negative.
    stop : int
        One past the last index; may exceed ``n``.
    n : int
        Length of the axis, at least 1.

    Returns
    -------
    numpy.ndarray
        ``stop - start`` integer indices, mirrored about the edge pixels without repeating them (all 0 when
        ``n`` is 1).
    """
    idx = np.arange(start, stop)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.abs(idx) % period
    return np.where(idx >= n, period - idx, idx)


def read_region(source: np.ndarray, region: tuple[tuple[int, int], tuple[int, int]]) -> np.ndarray:
    """Read ``source[..., y0:y1, x0:x1]`` with mirrored pixels outside the plane.

    ``source`` may be any array-like with NumPy slicing (a memory map, a zarr
    array); only the bounding box of the needed pixels is read.

    Parameters
    ----------
    source : array_like
        (..., H, W) array, e.g. a (C, H, W) plane.
    region : tuple of tuple of int
        ``((y0, y1), (x0, x1))`` in pixels of the plane; may reach outside it.

    Returns
    -------
    numpy.ndarray
        (..., y1 - y0, x1 - x0).  For a region inside the plane, ``np.asarray`` of the slice (a view, not
        a copy, of an in-memory ``source``).
    """
    (y0, y1), (x0, x1) = region
    h, w = source.shape[-2:]
    ys, xs = reflect_indices(y0, y1, h), reflect_indices(x0, x1, w)
    ya, yb, xa, xb = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    block = np.asarray(source[..., ya:yb, xa:xb])
    if y0 >= 0 and y1 <= h and x0 >= 0 and x1 <= w:
        return block
    return block[..., ys - ya, :][..., xs - xa]


def predict_tiled(
    image: np.ndarray,
    predict: Callable[[np.ndarray], np.ndarray],
    *,
    tile: int = 512,
    halo: int = 64,
    multiple: int = 1,
    batch_size: int = 1,
    tile_shape: tuple[int, int] | None = None,
    cancel: CancelToken | None = None,
) -> Job[np.ndarray]:
    """Run ``predict`` over ``image`` ``(C, H, W)`` tile by tile.

    ``predict`` maps a batch ``(B, C, h, w)`` to ``(B, K, h, w)``.  Yields a
    :class:`Progress` per batch of tiles; returns ``(K, H, W)`` float32.
    ``tile_shape``: see :func:`plan_tiles`.

    Parameters
    ----------
    image : numpy.ndarray
        (C, H, W) normalized image (or an array-like that :func:`read_region` reads).
    predict : callable
        (B, C, h, w) batch -> (B, K, h, w) outputs of the same ``h``, ``w``.
    tile : int
        Core side in pixels (see :func:`plan_tiles`).
    halo : int
        Pixels of context around each core; at least the network's receptive radius for results that do
        not depend on ``tile``.
    multiple : int
        The network's stride.
    batch_size : int
        Tiles per ``predict`` call (the last batch may hold fewer).
    tile_shape : tuple of int, optional
        Every tile's exact (h, w), halo included.
    cancel : CancelToken, optional
        Checked before each batch.

    Returns
    -------
    numpy.ndarray
        (K, H, W) float32 outputs, each pixel from the tile whose core holds it.

    Raises
    ------
    Cancelled
        When ``cancel`` is set.
    """
    plan = plan_tiles(image.shape[-2:], tile=tile, halo=halo, multiple=multiple, tile_shape=tile_shape)
    out = None
    n = len(plan)
    yield Progress("network", 0, n, f"{n} tile(s) of {plan.tile_shape[0]}x{plan.tile_shape[1]}")
    for start in range(0, n, batch_size):
        if cancel is not None:
            cancel.raise_if_cancelled()
        group = plan.tiles[start : start + batch_size]
        batch = np.stack([read_region(image, t.read) for t in group])
        result = predict(batch)
        if out is None:
            out = np.empty((result.shape[1], *plan.shape), np.float32)
        for t, r in zip(group, result):
            out[(slice(None), *t.out)] = r[(slice(None), *t.crop)]
        yield Progress("network", start + len(group), n)
    return out
