"""Metrics against cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from segstudio.core.evaluate import mean_scores, overlaps, score


def _box(lab, i, y0, y1, x0, x1):
    lab[y0:y1, x0:x1] = i


def test_perfect_match():
    t = np.zeros((20, 20), int)
    _box(t, 1, 0, 5, 0, 5)
    _box(t, 2, 10, 15, 10, 15)
    p = np.where(t == 1, 9, np.where(t == 2, 4, 0))  # other ids
    s = score(t, p)
    assert s.ap[0.5] == 1 and s.ap[0.9] == 1 and s.f1[0.5] == 1 and s.dice == 1 and s.pq == pytest.approx(1)


def test_hand_computed_tp_fp_fn():
    t = np.zeros((30, 30), int)
    _box(t, 1, 0, 10, 0, 10)  # 100 px
    _box(t, 2, 20, 30, 20, 30)  # 100 px, missed
    p = np.zeros_like(t)
    _box(p, 1, 0, 10, 0, 8)  # 80 px inside true 1: IoU 0.8
    _box(p, 2, 12, 16, 0, 4)  # false positive
    s = score(t, p, thresholds=(0.5, 0.85))
    # at 0.5: TP 1, FP 1, FN 1
    assert s.ap[0.5] == pytest.approx(1 / 3)
    assert s.f1[0.5] == pytest.approx(2 / 4)
    assert s.precision[0.5] == pytest.approx(0.5) and s.recall[0.5] == pytest.approx(0.5)
    # at 0.85 the 0.8 match is gone: TP 0
    assert s.ap[0.85] == 0
    assert s.pq == pytest.approx(0.8 / (1 + 0.5 + 0.5))
    assert s.dice == pytest.approx(2 * 80 / (200 + 96))


def test_one_to_one_split_object():
    """A true object split into two halves: at most one half may match."""
    t = np.zeros((10, 20), int)
    _box(t, 1, 0, 10, 0, 20)  # 200 px
    p = np.zeros_like(t)
    _box(p, 1, 0, 10, 0, 12)  # IoU 0.6
    _box(p, 2, 0, 10, 12, 20)  # IoU 0.4
    s = score(t, p)
    assert s.ap[0.5] == pytest.approx(1 / 2)  # TP 1, FP 1


def test_matching_below_half_is_one_to_one():
    """At IoU 0.3 both halves overlap enough, but only one may match (maximum matching)."""
    t = np.zeros((10, 20), int)
    _box(t, 1, 0, 10, 0, 20)
    p = np.zeros_like(t)
    _box(p, 1, 0, 10, 0, 11)  # IoU 0.55
    _box(p, 2, 0, 10, 11, 20)  # IoU 0.45
    s = score(t, p, thresholds=(0.3,))
    assert s.ap[0.3] == pytest.approx(1 / 2)


def test_maximum_matching_prefers_more_matches():
    """Greedy by IoU would take (A, x) and strand B and y; the maximum matching takes (A, y) and (B, x)."""
    gt = np.array([[1] * 10 + [2] * 10])
    pred = np.zeros_like(gt)
    pred[0, 0:3] = 2  # y: inside A, IoU 3/10
    pred[0, 4:16] = 1  # x: IoU 6/16 with A and with B
    ov = overlaps(gt, pred)
    ious = {(int(g), int(p)): round(float(v), 4) for g, p, v in zip(ov.gt_ids, ov.pred_ids, ov.iou)}
    assert ious == {(1, 1): 0.375, (2, 1): 0.375, (1, 2): 0.3}
    assert score(gt, pred, thresholds=(0.3,)).ap[0.3] == 1  # TP 2, FP 0, FN 0
    assert score(gt, pred).ap[0.5] == 0


def test_empty_images():
    z = np.zeros((5, 5), int)
    s = score(z, z)
    assert s.ap[0.5] == 1 and s.dice == 1
    one = z.copy()
    one[1:3, 1:3] = 1
    assert score(z, one).ap[0.5] == 0 and score(one, z).ap[0.5] == 0


def test_mean_scores():
    t = np.zeros((10, 10), int)
    _box(t, 1, 0, 4, 0, 4)
    rows = [score(t, t).as_dict(), score(t, np.zeros_like(t)).as_dict()]
    m = mean_scores(rows)
    assert m["ap50"] == pytest.approx(0.5) and m["count_error"] == pytest.approx(0.5)
