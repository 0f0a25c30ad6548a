"""Network output -> instance labels.

The built-in models predict two maps per pixel: a foreground logit and a
logit of the distance to the nucleus border (normalized per nucleus to 0..1).
Seeds are the connected regions where the distance is high; a watershed on
the negative distance grows them out to the foreground mask, so touching
nuclei separate along their thin neck.

Sigmoid is monotonic, so thresholds are applied to logits directly
(``p > t``  <=>  ``logit > log(t / (1 - t))``) and the watershed runs on the
logit; no sigmoid is ever computed.  The watershed floods 65,536 levels of
the distance logit over [-8, 8] with a hierarchical queue
(:func:`segstudio.core.segment._kernels.flood_levels`): the same labels as
scikit-image's watershed on the built-in model's output, six times faster.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from ..image.io import labels_dtype
from ..models.spec import PostprocessParams


def logit(p: float) -> float:
    """The logit ``log(p / (1 - p))`` of a probability (a threshold compared with logits).

    Parameters
    ----------
    p : float
        A probability, clamped to ``[1e-6, 1 - 1e-6]`` so that 0 and 1 give finite logits (about +-13.8).

    Returns
    -------
    float
        The logit of the clamped ``p``.
    """
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


LEVELS = 65536
LOGIT_RANGE = 8.0


def instances(fg_logit: np.ndarray, dist_logit: np.ndarray, params: PostprocessParams) -> tuple[np.ndarray, int]:
    """Instance ids (int32, not renumbered, 0 for background) and the largest id.

    Foreground regions that hold no seed become one object each, so no
    foreground is silently dropped; objects smaller than ``params.min_size``
    pixels are removed.

    Parameters
    ----------
    fg_logit : numpy.ndarray
        (H, W) foreground logit.
    dist_logit : numpy.ndarray
        (H, W) logit of the distance to the nucleus border, normalized per nucleus (seeds where it is high;
        flooded over [-8, 8], values beyond clipped).
    params : PostprocessParams
        Foreground and seed thresholds (probabilities), ``min_size`` (pixels) and ``fill_holes``.

    Returns
    -------
    labels : numpy.ndarray
        (H, W) int32 ids, 0 background; not renumbered, so ids of removed objects are missing.
    n : int
        The number of ids given (seeds, then seedless regions), before small objects are removed: no id
        exceeds it.
    """
    from ._kernels import flood_levels

    mask = fg_logit > logit(params.fg_threshold)
    seeds = mask & (dist_logit > logit(params.seed_threshold))
    markers, n = ndi.label(seeds)
    if n:
        # high distance floods first: level 0 at +LOGIT_RANGE
        scaled = (LOGIT_RANGE - dist_logit) * ((LEVELS - 1) / (2 * LOGIT_RANGE))
        levels = np.clip(scaled, 0, LEVELS - 1).astype(np.uint16)
        labels = flood_levels(levels, LEVELS, markers.astype(np.int32, copy=False), mask)
    else:
        labels = np.zeros(mask.shape, np.int32)
    orphans, n_orphans = ndi.label(mask & (labels == 0))
    if n_orphans:
        labels = np.where(orphans > 0, orphans + n, labels).astype(np.int32, copy=False)
    if params.fill_holes:
        labels = fill_enclosed_holes(labels)
    return remove_small(labels, params.min_size), n + n_orphans


def fill_enclosed_holes(labels: np.ndarray) -> np.ndarray:
    """``labels`` with every background region that one object alone encloses given to that object.

    A dark nucleolus the network left out of its nucleus becomes part of
    it; a gap between several touching nuclei (background bordered by more
    than one object) and background reaching the array's edge stay
    background, so it is safe on crowded fields and at tile borders.

    Parameters
    ----------
    labels : numpy.ndarray
        (H, W) integer instance labels, 0 background.

    Returns
    -------
    numpy.ndarray
        Labels of the same shape and dtype: ``labels`` itself when no hole is filled, otherwise a copy.
    """
    bg, n_bg = ndi.label(labels == 0)
    if n_bg == 0:
        return labels
    # every 4-neighbour pair of a background pixel and an object pixel: (background region, object id)
    pairs = []
    for a, b in ((np.s_[:, :-1], np.s_[:, 1:]), (np.s_[:-1, :], np.s_[1:, :])):
        for p, q in ((a, b), (b, a)):
            hit = (bg[p] > 0) & (labels[q] > 0)
            pairs.append((bg[p][hit], labels[q][hit]))
    regions = np.concatenate([r for r, _ in pairs])
    owners = np.concatenate([o for _, o in pairs]).astype(np.int64)
    lo = np.full(n_bg + 1, np.iinfo(np.int64).max)
    hi = np.zeros(n_bg + 1, np.int64)
    np.minimum.at(lo, regions, owners)
    np.maximum.at(hi, regions, owners)
    edge = np.unique(np.concatenate([bg[0], bg[-1], bg[:, 0], bg[:, -1]]))
    fill = (lo == hi) & (hi > 0)
    fill[0] = False
    fill[edge] = False
    if not fill.any():
        return labels
    lut = np.where(fill, hi, 0).astype(labels.dtype)
    inside = fill[bg]
    out = labels.copy()
    out[inside] = lut[bg[inside]]
    return out


def network_instances(out: np.ndarray, spec) -> tuple[np.ndarray, int]:
    """:func:`instances` of a network output ``(K, H, W)`` as the model's card describes it.

    ``spec.representation``: ``"fg_dist"`` / ``"fg_dist_class"`` (channels 0
    and 1 are the foreground and distance) or ``"fg"`` (a foreground map
    only: the distance comes from the mask's distance transform, normalized
    per connected region).  ``spec.output_kind == "probability"``: the
    outputs are sigmoids already and are turned back into logits.

    Parameters
    ----------
    out : numpy.ndarray
        (K, H, W) network output of a tile or plane (logits, or probabilities as above); channels after
        those are not read (e.g. the class logit).
    spec : ModelSpec
        The model's card: ``representation``, ``output_kind`` and ``postprocess``.

    Returns
    -------
    labels : numpy.ndarray
        (H, W) int32 ids, 0 background, not renumbered.
    n : int
        No id exceeds it (see :func:`instances`).
    """
    x = out[:2] if spec.representation != "fg" else out[:1]
    if spec.output_kind == "probability":
        p = np.clip(x.astype(np.float32), 1e-6, 1 - 1e-6)
        x = np.log(p / (1 - p))
    if spec.representation == "fg":
        return instances(x[0], mask_distance_logit(x[0] > logit(spec.postprocess.fg_threshold)), spec.postprocess)
    return instances(x[0], x[1], spec.postprocess)


def mask_distance_logit(mask: np.ndarray) -> np.ndarray:
    """Distance to the mask's border normalized to 1 at each region's deepest point, as a logit.

    Parameters
    ----------
    mask : numpy.ndarray
        (H, W) bool foreground mask.

    Returns
    -------
    numpy.ndarray
        (H, W) float32 logit of the relative distance, clipped to ``[1e-4, 1 - 1e-4]`` first (so about
        +-9.2; background about -9.2); -8 everywhere for an empty mask.
    """
    regions, n = ndi.label(mask)
    if n == 0:
        return np.full(mask.shape, -LOGIT_RANGE, np.float32)
    d = ndi.distance_transform_edt(mask).astype(np.float32)
    peak = np.asarray(ndi.maximum(d, regions, np.arange(1, n + 1)), np.float32)
    rel = d / np.concatenate([[1.0], peak])[regions]
    rel = np.clip(rel, 1e-4, 1 - 1e-4)
    return np.log(rel / (1 - rel)).astype(np.float32)


def fg_dist_to_labels(fg_logit: np.ndarray, dist_logit: np.ndarray, params: PostprocessParams) -> np.ndarray:
    """Instance labels ``1..N`` from foreground and distance logits of shape ``(H, W)``.

    uint16 (uint32 past 65,535 objects), 0 for background, numbered in
    raster order of each object's first pixel; see :func:`instances`.

    Parameters
    ----------
    fg_logit : numpy.ndarray
        (H, W) foreground logit.
    dist_logit : numpy.ndarray
        (H, W) logit of the normalized distance to the nucleus border.
    params : PostprocessParams
        Thresholds, minimum size and hole filling.

    Returns
    -------
    numpy.ndarray
        (H, W) uint16 or uint32 labels ``1..N``, 0 background.
    """
    return relabel_sequential(instances(fg_logit, dist_logit, params)[0])


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """``labels`` with every object of fewer than ``min_size`` pixels made background.

    Parameters
    ----------
    labels : numpy.ndarray
        Non-negative integer labels (any shape, not empty), 0 background.
    min_size : int
        Smallest object kept, in pixels; 1 or less keeps every object.

    Returns
    -------
    numpy.ndarray
        Same shape and dtype, not renumbered; ``labels`` itself when nothing is removed.
    """
    if min_size <= 1 or labels.max() == 0:
        return labels
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    if small.any():
        labels = np.where(small[labels], 0, labels)
    return labels


def relabel_sequential(labels: np.ndarray) -> np.ndarray:
    """Renumber labels to ``1..N`` in order of first appearance (raster order).

    The result is uint16, or uint32 when there are more than 65,535 objects.

    Parameters
    ----------
    labels : numpy.ndarray
        Non-negative integer labels (any shape), 0 background.

    Returns
    -------
    numpy.ndarray
        Labels of the same shape, ``1..N`` (uint16 or uint32), 0 background.
    """
    ids, first = np.unique(labels.ravel(), return_index=True)
    keep = ids != 0
    ids, first = ids[keep], first[keep]
    dtype = labels_dtype(len(ids))
    if len(ids) == 0:
        return np.zeros(labels.shape, dtype)
    # numbering in order of first appearance (raster order) is stable under tiling changes
    lut = np.zeros(int(ids.max()) + 1, dtype)
    lut[ids[np.argsort(first, kind="stable")]] = np.arange(1, len(ids) + 1, dtype=dtype)
    return lut[labels]
