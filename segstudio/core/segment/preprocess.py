"""Intensity normalization.

Percentiles are computed per channel over the *whole* image (or plane), never
per tile: per-tile normalization stretches the noise of an empty tile into
"cells".  For large planes the percentiles come from a regular subsample,
which gives the same values to within a grey level at a fraction of the cost.

Non-finite pixels (NaN, infinity, and values beyond float32's range, which
become infinite) carry no intensity: percentiles and means are taken over the
finite pixels only, and :func:`background_nonfinite` turns them into
background after normalization (and counts them, so the user is told).
Integer images cannot hold them and skip both steps.
"""

from __future__ import annotations

import numpy as np

from ..models.spec import Normalization

SAMPLE_PIXELS = 4_000_000


# normalized values are clipped to +-this: beyond it a pixel says nothing more to the network, and finite
# but enormous values (1e300 in a float64 image) would overflow inside it
NORMALIZED_LIMIT = 1e4


def channel_percentiles(plane: np.ndarray, norm: Normalization) -> np.ndarray:
    """Per-channel ``(low, high)`` percentiles of a ``(C, Y, X)`` plane (mean, mean + std in ``meanstd`` mode).

    Non-finite pixels are left out; a plane of more than :data:`SAMPLE_PIXELS` pixels is subsampled on a
    regular grid.

    Parameters
    ----------
    plane : numpy.ndarray
        (C, Y, X) intensities, any real dtype.
    norm : Normalization
        ``mode`` (``"percentile"``, ``"meanstd"`` or ``"none"``) and the ``low`` / ``high`` percentiles.

    Returns
    -------
    numpy.ndarray
        (C, 2) float64: per channel the values :func:`normalize` maps to 0 and 1; ``(0, 1)`` in ``none``
        mode and for a channel without finite pixels.
    """
    c, h, w = plane.shape
    step = max(1, int(np.ceil(np.sqrt(h * w / SAMPLE_PIXELS))))
    return _stats(plane[:, ::step, ::step].reshape(c, -1), norm)


def _stats(flat: np.ndarray, norm: Normalization) -> np.ndarray:
    """``(C, 2)`` values that :func:`normalize` maps to 0 and 1, from ``(C, N)`` samples (finite ones only)."""
    if norm.mode == "none":
        return np.tile([0.0, 1.0], (flat.shape[0], 1))
    if flat.dtype.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            finite = np.isfinite(flat)
            if not finite.all():
                return np.stack([_stats(row[ok][None], norm)[0] if ok.any() else np.array([0.0, 1.0])
                                 for row, ok in zip(flat, finite)])
    if norm.mode == "meanstd":
        with np.errstate(over="ignore", invalid="ignore"):
            mean = flat.mean(axis=1, dtype=np.float64)
            return np.stack([mean, mean + flat.std(axis=1, dtype=np.float64)], axis=1)
    return np.percentile(flat, [norm.low, norm.high], axis=1).T.astype(np.float64)


def normalize(plane: np.ndarray, norm: Normalization, percentiles: np.ndarray | None = None) -> np.ndarray:
    """Map each channel's low/high percentile to 0/1 (float32, not clipped).

    A constant channel maps to zeros rather than dividing by zero.

    Parameters
    ----------
    plane : numpy.ndarray
        (C, Y, X) intensities (a plane or a tile of one), any real dtype.
    norm : Normalization
        The model's normalization; ``norm.eps`` is added to the span between the two values.
    percentiles : numpy.ndarray, optional
        (C, 2) values to map to 0 and 1, e.g. :func:`sample_percentiles` of the whole plane so that every
        tile shares them; None computes them from ``plane`` (:func:`channel_percentiles`).

    Returns
    -------
    numpy.ndarray
        (C, Y, X) float32 normalized planes; non-finite pixels stay non-finite (see
        :func:`background_nonfinite`).
    """
    if percentiles is None:
        percentiles = channel_percentiles(plane, norm)
    lo = percentiles[:, 0].reshape(-1, 1, 1)
    span = percentiles[:, 1].reshape(-1, 1, 1) - lo + norm.eps  # eps: BioImage.IO adds it to the divisor
    span = np.where(np.isfinite(span) & (span > 1e-12), span, np.inf)
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite pixels: see background_nonfinite
        return ((plane.astype(np.float32, copy=False) - lo.astype(np.float32)) / span.astype(np.float32)).astype(
            np.float32, copy=False
        )


def background_nonfinite(x: np.ndarray, core: tuple[slice, slice] | None = None) -> int:
    """Make the non-finite values of a normalized ``(C, h, w)`` block background (0) and clip the rest, in place.

    Returns how many pixels (of the ``core`` window, when given) had a
    non-finite value in any channel.

    Parameters
    ----------
    x : numpy.ndarray
        (C, h, w) float normalized block, changed in place: non-finite values become 0 wherever they are,
        then every value is clipped to +-:data:`NORMALIZED_LIMIT`.
    core : tuple of slice, optional
        (y, x) window of the block whose pixels are counted (a tile's kept core); None counts the whole block.

    Returns
    -------
    int
        Pixels of the window with a non-finite value in any channel.
    """
    bad = ~np.isfinite(x)
    n = 0
    if bad.any():
        per_pixel = bad.any(axis=0)
        n = int(per_pixel[core].sum() if core is not None else per_pixel.sum())
        x[bad] = 0.0
    np.clip(x, -NORMALIZED_LIMIT, NORMALIZED_LIMIT, out=x)
    return n


def select_channels(plane: np.ndarray, n_model: int, channel: int | str | None) -> np.ndarray:
    """Pick the ``n_model`` channels the model reads from a ``(C, Y, X)`` plane.

    A one-channel model gets the channel at index ``channel``, ``"mean"``
    (the average of all channels) or, for ``None``, the only channel or the
    mean of several.  A model of several channels gets the first
    ``n_model`` channels (``channel`` must be ``None``).

    Parameters
    ----------
    plane : numpy.ndarray
        (C, Y, X) image plane or block, in the image's dtype.
    n_model : int
        Channels the model reads (``spec.input_channels``).
    channel : int, str or None
        An index (an int, or a string of one; negative counts from the end), ``"mean"`` or None.  Channel
        names are not resolved here.

    Returns
    -------
    numpy.ndarray
        (n_model, Y, X): a view of ``plane`` in its dtype, or a float32 mean.

    Raises
    ------
    InputError
        When ``channel`` is given to a model of several channels, the image has fewer channels than such a
        model reads, or ``channel`` is neither ``"mean"`` nor the index of an existing channel.
    """
    from ..errors import InputError

    c = plane.shape[0]
    if n_model != 1:
        if channel is not None:
            raise InputError("this model reads several channels; --channel does not apply")
        if c < n_model:
            raise InputError(f"the model needs {n_model} channels, the image has {c}")
        return plane[:n_model]
    if channel is None:
        channel = 0 if c == 1 else "mean"
    if channel == "mean":
        with np.errstate(over="ignore", invalid="ignore"):
            return plane.astype(np.float32).mean(axis=0, keepdims=True)
    try:
        idx = int(channel)
    except (TypeError, ValueError):
        raise InputError(f"channel must be an index or 'mean', not {channel!r}") from None
    if not -c <= idx < c:
        raise InputError(f"channel {idx} does not exist; the image has {c} channel(s)")
    return plane[idx : idx + 1]


def sample_percentiles(
    read_rows, shape: tuple[int, int], norm: Normalization, select, *, blocks: int = 64, block_rows: int = 8
) -> np.ndarray:
    """Per-channel percentiles of a plane too large to hold, from a regular sample.

    ``read_rows(y0, y1) -> (C, y1 - y0, W)`` reads full-width row blocks;
    ``select`` picks the model's channels.  Small planes (at most
    :data:`SAMPLE_PIXELS` pixels, or at most ``blocks * block_rows`` rows,
    whatever their width) are read whole; large ones through ``blocks``
    evenly spaced blocks of ``block_rows`` rows, every ``step``-th column,
    about :data:`SAMPLE_PIXELS` pixels in all.

    Parameters
    ----------
    read_rows : callable
        ``read_rows(y0, y1)`` -> (C, y1 - y0, W) full-width rows of the plane.
    shape : tuple of int
        (H, W) of the plane, in image pixels.
    norm : Normalization
        As for :func:`channel_percentiles`.
    select : callable
        (C, rows, W) -> (C', rows, W): the model's channels (e.g. :func:`select_channels`).
    blocks : int
        Row blocks sampled from a large plane.
    block_rows : int
        Rows in each sampled block.

    Returns
    -------
    numpy.ndarray
        (C', 2) float64 values :func:`normalize` maps to 0 and 1, from the finite pixels.
    """
    h, w = shape
    with np.errstate(over="ignore"):  # values beyond float32 become infinite, and are left out
        if h * w <= SAMPLE_PIXELS or h <= blocks * block_rows:
            return channel_percentiles(select(read_rows(0, h)).astype(np.float32, copy=False), norm)
        step = max(1, int(np.ceil(blocks * block_rows * w / SAMPLE_PIXELS)))
        starts = np.linspace(0, h - block_rows, blocks).astype(int)
        sample = np.concatenate([select(read_rows(y, y + block_rows))[:, :, ::step] for y in starts], axis=1)
        c = sample.shape[0]
        return _stats(sample.reshape(c, -1).astype(np.float32, copy=False), norm)
