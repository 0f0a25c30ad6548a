"""Where two segmentations of one image disagree, cell by cell.

:func:`disagreement` matches the objects of a *reference* label image (the
original model's) one-to-one with those of an *other* one (the optimized
model's), with the matching of :mod:`segstudio.core.tasks.evaluate` (the pairs of
IoU at least ``match``, 0.5 as in AP50, maximum cardinality), and sorts every
object into one of four kinds:

* **only in the reference**: a reference object no other object matches;
* **only in the other**: an other object no reference object matches;
* **low IoU**: a matched pair whose IoU is below ``iou`` (0.8): both found
  the cell, but drew it differently;
* **matched**: a matched pair of IoU at least ``iou``.

So ``only_reference + low_iou + matched`` is the number of reference
objects and ``only_other + low_iou + matched`` that of the other's.  The
``overlay`` marks the pixels of the disagreeing objects (0 background or
agreement, 1 only in the reference, 2 only in the other, 3 a low-IoU pair:
the union of both objects); where they overlap, 1 is drawn over 2, and both
over 3.

:func:`compare_job` segments one image with two models (for the GUI's
"Compare on this image") and returns both labels, their latencies and the
disagreement.  NumPy only; no Qt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..jobs import CancelToken, Job, Progress
from ..segment.options import SegmentOptions
from .evaluate import match_pairs, overlaps

ONLY_REFERENCE, ONLY_OTHER, LOW_IOU = 1, 2, 3


@dataclass(frozen=True)
class Disagreement:
    """How two label images differ (see the module docstring).

    Attributes
    ----------
    overlay : ndarray of uint8, the labels' shape
        0 background or agreement, 1 only in the reference, 2 only in the
        other, 3 a matched pair with IoU below ``iou``.
    only_reference, only_other, low_iou, matched : int
        Objects only in the reference, only in the other, matched pairs of
        IoU below ``iou``, matched pairs of IoU at least ``iou``.
    iou, match : float
        The thresholds used.
    """

    overlay: np.ndarray
    only_reference: int
    only_other: int
    low_iou: int
    matched: int
    iou: float = 0.8
    match: float = 0.5

    @property
    def disagreeing(self) -> int:
        """Objects or pairs that disagree (the three kinds the overlay shows)."""
        return self.only_reference + self.only_other + self.low_iou


def disagreement(reference: np.ndarray, other: np.ndarray, iou: float = 0.8, *, match: float = 0.5) -> Disagreement:
    """Sort the objects of two label images of one shape (0 = background) into the four kinds.

    Parameters
    ----------
    reference, other : ndarray of int, same shape (any dimensions)
        Instance labels; ids need not be consecutive.
    iou : float
        A matched pair of IoU below this is *low IoU*.
    match : float
        Objects pair up when their IoU is at least this (one-to-one).
    """
    reference, other = np.asarray(reference), np.asarray(other)
    if reference.shape != other.shape:
        raise ValueError(f"label shapes differ: {reference.shape} vs {other.shape}")
    if not 0 < match <= iou <= 1:
        raise ValueError(f"need 0 < match <= iou <= 1, not match={match}, iou={iou}")
    ov = overlaps(reference, other)
    ref_ids, oth_ids, ious = match_pairs(ov, match)
    low = ious < iou
    ref_all = _ids(reference)
    oth_all = _ids(other)
    only_ref = np.setdiff1d(ref_all, ref_ids, assume_unique=True)
    only_oth = np.setdiff1d(oth_all, oth_ids, assume_unique=True)
    overlay = np.zeros(reference.shape, np.uint8)
    if low.any():
        overlay[np.isin(reference, ref_ids[low]) | np.isin(other, oth_ids[low])] = LOW_IOU
    if len(only_oth):
        overlay[np.isin(other, only_oth)] = ONLY_OTHER
    if len(only_ref):
        overlay[np.isin(reference, only_ref)] = ONLY_REFERENCE
    return Disagreement(overlay=overlay, only_reference=len(only_ref), only_other=len(only_oth),
                        low_iou=int(low.sum()), matched=int((~low).sum()), iou=iou, match=match)


def _ids(labels: np.ndarray) -> np.ndarray:
    ids = np.unique(labels)
    return ids[ids != 0]


@dataclass(frozen=True)
class Comparison:
    """Two models on one image.

    Attributes
    ----------
    labels_a, labels_b : ndarray
        The labels of model A (the reference) and model B.
    seconds_a, seconds_b : float
        Wall time of each segmentation (the backends are ready: no loading or warm-up in it).
    backend_a, backend_b : str
        What each ran on.
    disagreement : Disagreement
        Of B against A.
    """

    labels_a: np.ndarray
    labels_b: np.ndarray
    seconds_a: float
    seconds_b: float
    backend_a: str
    backend_b: str
    disagreement: Disagreement


def compare_job(image, model_a, backend_a, model_b, backend_b, cancel: CancelToken | None = None, *,
                iou: float = 0.8, options: SegmentOptions | None = None) -> Job[Comparison]:
    """Segment ``image`` with model A on ``backend_a`` then model B on ``backend_b`` and compare (a job).

    Each model segments as the Segment panel would (its own diameter
    estimate unless ``options`` give the diameter; the options go to
    :func:`~segstudio.core.segment.segment_job`, without measurements).  Yields the
    segmentations' progress and ``Progress("compare", k, 2)`` after each;
    returns a :class:`Comparison`.
    """
    from ..segment.job import segment_job

    options = (options or SegmentOptions()).but(measure_cells=False)

    results, seconds = [], []
    yield Progress("compare", 0, 2, f"segmenting with {model_a.name}")
    for k, (model, backend) in enumerate(((model_a, backend_a), (model_b, backend_b))):
        if cancel is not None:
            cancel.raise_if_cancelled()
        t0 = time.perf_counter()
        result = yield from segment_job(image, model, backend, options, cancel=cancel)
        seconds.append(time.perf_counter() - t0)
        results.append(result)
        following = f"segmenting with {model_b.name}" if k == 0 else "comparing"
        yield Progress("compare", k + 1, 2, following)
    a, b = results
    return Comparison(labels_a=a.labels, labels_b=b.labels, seconds_a=seconds[0], seconds_b=seconds[1],
                      backend_a=a.backend, backend_b=b.backend,
                      disagreement=disagreement(a.labels, b.labels, iou))
