"""Network output -> instance labels.

The built-in models predict two maps per pixel: a foreground logit and a
logit of the distance to the nucleus border (normalized per nucleus to 0..1).
Seeds are the connected regions where the distance is high; a watershed on
the negative distance grows them out to the foreground mask, so touching
nuclei separate along their thin neck.

Sigmoid is monotonic, so thresholds are applied to logits directly
(``p > t``  <=>  ``logit > log(t / (1 - t))``) and the watershed runs on the
logit; no sigmoid is ever computed.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from .io import labels_dtype
from .models.spec import PostprocessParams


def logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


def fg_dist_to_labels(fg_logit: np.ndarray, dist_logit: np.ndarray, params: PostprocessParams) -> np.ndarray:
    """Instance labels from foreground and distance logits of shape ``(H, W)``.

    Returns labels ``1..N`` in uint16 (uint32 past 65,535 objects), 0 for
    background.  Foreground regions that hold no seed become one object each,
    so no foreground is silently dropped; objects smaller than
    ``params.min_size`` pixels are removed.
    """
    from skimage.segmentation import watershed

    mask = fg_logit > logit(params.fg_threshold)
    seeds = mask & (dist_logit > logit(params.seed_threshold))
    markers, n = ndi.label(seeds)
    labels = watershed(-dist_logit, markers, mask=mask) if n else np.zeros(mask.shape, np.int32)
    orphans, n_orphans = ndi.label(mask & (labels == 0))
    if n_orphans:
        labels = np.where(orphans > 0, orphans + labels.max(), labels)
    return relabel_sequential(remove_small(labels, params.min_size))


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
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
