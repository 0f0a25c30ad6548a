"""Compiled inner loops (numba) for post-processing and measurements.

Post-processing and per-cell measurements run once per tile on every image,
beside the network; in NumPy / scikit-image they cost as much as the
network on a 2-core CPU.  These kernels do the same work in one pass over
the pixels each:

* :func:`flood_levels` is a marker watershed (4-connected) over integer
  levels with one FIFO queue per level (Beucher & Meyer's hierarchical
  queue): O(1) per pixel where scikit-image's heap costs O(log n).  Over
  65,536 levels it gives the same labels as ``skimage.segmentation.watershed``
  on the built-in model's output, about 6x faster;
* :func:`first_pixels` finds each label's first pixel in raster order;
* :func:`region_stats` gathers, per label, pixel count, coordinate sums and
  second moments, per-channel intensity sums and maxima, and the area of
  the convex hull of the object's pixel squares (Andrew's monotone chain
  over each row's left-most and right-most pixel corners).

Compiled on first use and cached on disk (``cache=True``).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def flood_levels(levels, n_levels, markers, mask):
    """Marker watershed over integer ``levels`` (0 floods first) with a hierarchical queue.

    One FIFO per level (Beucher & Meyer): O(1) per pixel instead of a heap's
    O(log n).  A pixel reached from a higher level than its own is queued at
    the current level (flooding never goes back down); ties go first in,
    first out.  4-connected; returns int32 labels.
    """
    h, w = levels.shape
    size = h * w
    out = np.zeros(size, np.int32)
    flat_l = levels.ravel()
    flat_m = markers.ravel()
    flat_mask = mask.ravel()
    head = np.full(n_levels, -1, np.int64)
    tail = np.full(n_levels, -1, np.int64)
    nxt = np.full(size, -1, np.int64)
    for i in range(size):
        if flat_m[i] != 0 and flat_mask[i]:
            out[i] = flat_m[i]
            lv = flat_l[i]
            if tail[lv] < 0:
                head[lv] = i
            else:
                nxt[tail[lv]] = i
            tail[lv] = i
    cur = 0
    while cur < n_levels:
        i = head[cur]
        if i < 0:
            cur += 1
            continue
        head[cur] = nxt[i]
        if head[cur] < 0:
            tail[cur] = -1
        y = i // w
        x = i - y * w
        lab = out[i]
        for k in range(4):
            if k == 0:
                if y == 0:
                    continue
                j = i - w
            elif k == 1:
                if x == 0:
                    continue
                j = i - 1
            elif k == 2:
                if x == w - 1:
                    continue
                j = i + 1
            else:
                if y == h - 1:
                    continue
                j = i + w
            if out[j] != 0 or not flat_mask[j]:
                continue
            out[j] = lab
            lv = flat_l[j]
            if lv < cur:
                lv = cur
            if tail[lv] < 0:
                head[lv] = j
            else:
                nxt[tail[lv]] = j
            tail[lv] = j
    return out.reshape(h, w)


@njit(cache=True, nogil=True)
def first_pixels(labels, n_labels):
    """Flat index of each label's first pixel in raster order (-1 when absent)."""
    flat = labels.ravel()
    first = np.full(n_labels + 1, -1, np.int64)
    for i in range(flat.size):
        lab = flat[i]
        if lab != 0 and first[lab] < 0:
            first[lab] = i
    return first


@njit(cache=True, nogil=True)
def _cross(oy, ox, ay, ax, by, bx):
    return (ay - oy) * (bx - ox) - (ax - ox) * (by - oy)


@njit(cache=True, nogil=True)
def _hull_area(py, px):
    """Area of the convex hull of points already sorted by (y, x)."""
    m = py.shape[0]
    if m < 3:
        return 0.0
    hy = np.empty(2 * m, np.float64)
    hx = np.empty(2 * m, np.float64)
    k = 0
    for i in range(m):  # lower hull
        while k >= 2 and _cross(hy[k - 2], hx[k - 2], hy[k - 1], hx[k - 1], py[i], px[i]) <= 0:
            k -= 1
        hy[k], hx[k] = py[i], px[i]
        k += 1
    t = k + 1
    for i in range(m - 2, -1, -1):  # upper hull
        while k >= t and _cross(hy[k - 2], hx[k - 2], hy[k - 1], hx[k - 1], py[i], px[i]) <= 0:
            k -= 1
        hy[k], hx[k] = py[i], px[i]
        k += 1
    area = 0.0
    for i in range(k - 1):
        area += hy[i] * hx[i + 1] - hx[i] * hy[i + 1]
    return abs(area) / 2.0


@njit(cache=True, nogil=True)
def region_stats(labels, image, n_labels):
    """Per-label sums in one pass over ``labels`` (int, ``(H, W)``) and ``image`` (``(C, H, W)``).

    Returns ``(count, sy, sx, syy, sxx, sxy, isum, imax, hull)`` indexed by
    label (row 0 is the background and stays empty).
    """
    h, w = labels.shape
    c = image.shape[0]
    count = np.zeros(n_labels + 1, np.int64)
    sy = np.zeros(n_labels + 1, np.float64)
    sx = np.zeros(n_labels + 1, np.float64)
    syy = np.zeros(n_labels + 1, np.float64)
    sxx = np.zeros(n_labels + 1, np.float64)
    sxy = np.zeros(n_labels + 1, np.float64)
    isum = np.zeros((c, n_labels + 1), np.float64)
    imax = np.full((c, n_labels + 1), -np.inf)
    # row runs per label: first pass counts them, second pass stores them (CSR)
    runs = np.zeros(n_labels + 2, np.int64)
    last_row = np.full(n_labels + 1, -1, np.int64)
    for y in range(h):
        for x in range(w):
            lab = labels[y, x]
            if lab == 0:
                continue
            count[lab] += 1
            sy[lab] += y
            sx[lab] += x
            syy[lab] += y * y
            sxx[lab] += x * x
            sxy[lab] += y * x
            for ch in range(c):
                v = image[ch, y, x]
                isum[ch, lab] += v
                if v > imax[ch, lab]:
                    imax[ch, lab] = v
            if last_row[lab] != y:
                last_row[lab] = y
                runs[lab + 1] += 1
    for i in range(1, n_labels + 2):
        runs[i] += runs[i - 1]
    run_row = np.empty(runs[-1], np.int64)
    run_min = np.empty(runs[-1], np.int64)
    run_max = np.empty(runs[-1], np.int64)
    fill = runs[:-1].copy()
    last_row[:] = -1
    for y in range(h):
        for x in range(w):
            lab = labels[y, x]
            if lab == 0:
                continue
            if last_row[lab] != y:
                last_row[lab] = y
                k = fill[lab]
                fill[lab] += 1
                run_row[k], run_min[k], run_max[k] = y, x, x
            else:
                run_max[fill[lab] - 1] = x
    hull = np.zeros(n_labels + 1, np.float64)
    for lab in range(1, n_labels + 1):
        a, b = runs[lab], runs[lab + 1]
        m = b - a
        if m == 0:
            continue
        # corners of each run's end squares, in (y, x) order: rows ascend, and within
        # a y the points come as (run k, bottom edge) then (run k+1, top edge)
        py = np.empty(4 * m, np.float64)
        px = np.empty(4 * m, np.float64)
        for k in range(m):
            r, c0, c1 = run_row[a + k], run_min[a + k], run_max[a + k] + 1
            py[4 * k], px[4 * k] = r, c0
            py[4 * k + 1], px[4 * k + 1] = r, c1
            py[4 * k + 2], px[4 * k + 2] = r + 1, c0
            py[4 * k + 3], px[4 * k + 3] = r + 1, c1
        order = np.argsort(py * (w + 2) + px)
        hull[lab] = _hull_area(py[order], px[order])
    return count, sy, sx, syy, sxx, sxy, isum, imax, hull
