"""The disagreement of two segmentations: known answers, and an independent count on real images."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from segstudio.sample_data import sample_pairs

from segstudio.core.image.sources import read_image
from segstudio.core.jobs import run_sync
from segstudio.core.tasks.compare import Comparison, compare_job, disagreement


def _cells() -> np.ndarray:
    """Five disjoint square cells of 10 x 10 pixels on 64 x 96."""
    lab = np.zeros((64, 96), np.uint16)
    for k, (y, x) in enumerate([(5, 5), (5, 30), (5, 60), (35, 10), (35, 50)], start=1):
        lab[y:y + 10, x:x + 10] = k
    return lab


def test_identical_labels_disagree_nowhere():
    lab = _cells()
    d = disagreement(lab, lab)
    assert (d.only_reference, d.only_other, d.low_iou, d.matched) == (0, 0, 0, 5)
    assert d.overlay.dtype == np.uint8 and d.overlay.shape == lab.shape and not d.overlay.any()
    # other ids for the same cells change nothing
    relabelled = np.where(lab > 0, lab * 7 + 100, 0)
    assert disagreement(lab, relabelled).disagreeing == 0


def test_a_removed_cell_is_only_in_the_reference_and_an_added_one_only_in_the_other():
    lab = _cells()
    fewer = np.where(lab == 3, 0, lab)
    d = disagreement(lab, fewer)
    assert (d.only_reference, d.only_other, d.low_iou, d.matched) == (1, 0, 0, 4)
    np.testing.assert_array_equal(d.overlay == 1, lab == 3)
    assert set(np.unique(d.overlay)) == {0, 1}
    d = disagreement(fewer, lab)  # the other way round
    assert (d.only_reference, d.only_other, d.low_iou, d.matched) == (0, 1, 0, 4)
    np.testing.assert_array_equal(d.overlay == 2, lab == 3)


def test_a_shrunk_cell_is_matched_with_a_low_iou():
    lab = _cells()
    shrunk = lab.copy()
    shrunk[5:15, 30:40] = 0
    shrunk[6:14, 31:39] = 2  # 64 of 100 pixels: IoU 0.64, matched (>= 0.5) but below 0.8
    d = disagreement(lab, shrunk)
    assert (d.only_reference, d.only_other, d.low_iou, d.matched) == (0, 0, 1, 4)
    np.testing.assert_array_equal(d.overlay == 3, lab == 2)  # the union of both is the bigger cell
    assert disagreement(lab, shrunk, iou=0.6).low_iou == 0  # 0.64 is not below 0.6
    # shrunk below the match threshold (IoU 0.36): no longer the same cell
    tiny = lab.copy()
    tiny[5:15, 30:40] = 0
    tiny[7:13, 32:38] = 2
    d = disagreement(lab, tiny)
    assert (d.only_reference, d.only_other, d.low_iou, d.matched) == (1, 1, 0, 4)


def test_a_split_cell_and_overlapping_kinds():
    lab = _cells()
    split = lab.copy()
    split[35:45, 50:55] = 6  # cell 5 cut in two halves: IoU 0.5 each with the whole
    split[35:45, 55:60] = 7
    d = disagreement(lab, split)
    # one half matches the whole at exactly 0.5 (low IoU), the other half is only in the other
    assert (d.only_reference, d.only_other, d.low_iou, d.matched) == (0, 1, 1, 4)
    assert (d.overlay[35:45, 50:60] > 0).all()
    assert d.disagreeing == 2


def test_empty_and_mismatched_inputs():
    empty = np.zeros((8, 8), np.uint16)
    d = disagreement(empty, empty)
    assert (d.only_reference, d.only_other, d.low_iou, d.matched) == (0, 0, 0, 0)
    one = empty.copy()
    one[2:5, 2:5] = 1
    assert disagreement(empty, one).only_other == 1
    with pytest.raises(ValueError, match="shapes differ"):
        disagreement(empty, np.zeros((8, 9), np.uint16))
    with pytest.raises(ValueError, match="match"):
        disagreement(empty, empty, iou=0.3)


def independent_counts(ref: np.ndarray, oth: np.ndarray, iou: float = 0.8, match: float = 0.5):
    """The four counts and the overlay from full boolean masks and a Hungarian assignment (no shared code)."""
    from scipy.optimize import linear_sum_assignment

    r_ids = [int(i) for i in np.unique(ref) if i]
    o_ids = [int(i) for i in np.unique(oth) if i]
    m = np.zeros((len(r_ids), len(o_ids)))
    for a, i in enumerate(r_ids):
        mask_a = ref == i
        for b in np.unique(oth[mask_a]):
            if b == 0:
                continue
            mask_b = oth == b
            m[a, o_ids.index(int(b))] = (mask_a & mask_b).sum() / (mask_a | mask_b).sum()
    ok = m >= match
    rows, cols = linear_sum_assignment(np.where(ok, 1.0 + m / 10, 0.0), maximize=True)
    pairs = [(r, c) for r, c in zip(rows, cols) if ok[r, c]]
    low = [(r, c) for r, c in pairs if m[r, c] < iou]
    only_r = set(range(len(r_ids))) - {r for r, _ in pairs}
    only_o = set(range(len(o_ids))) - {c for _, c in pairs}
    overlay = np.zeros(ref.shape, np.uint8)
    for r, c in low:
        overlay[(ref == r_ids[r]) | (oth == o_ids[c])] = 3
    for c in only_o:
        overlay[oth == o_ids[c]] = 2
    for r in only_r:
        overlay[ref == r_ids[r]] = 1
    return (len(only_r), len(only_o), len(low), len(pairs) - len(low)), overlay


def _degrade(lab: np.ndarray, seed: int) -> np.ndarray:
    """Remove some cells, erode some, dilate some, shift some, add a blob: a plausible other segmentation."""
    rng = np.random.default_rng(seed)
    out = np.zeros_like(lab)
    for i in np.unique(lab):
        if i == 0:
            continue
        mask = lab == i
        kind = rng.integers(6)
        if kind == 0:
            continue  # lost
        if kind == 1:
            mask = ndimage.binary_erosion(mask, iterations=2)
        elif kind == 2:
            mask = ndimage.binary_dilation(mask, iterations=1) & (out == 0)
        elif kind == 3:
            mask = np.roll(mask, 3, axis=1)
        out[mask & (out == 0)] = i
    out[:6, :6] = lab.max() + 1  # a cell the reference does not have (unless it is there too)
    return out


@pytest.mark.parametrize("k", range(len(sample_pairs())))
def test_counts_on_real_labels_match_an_independent_computation(k):
    ref = read_image(sample_pairs()[k][1]).data.astype(np.int32)
    oth = _degrade(ref, seed=k)
    d = disagreement(ref, oth)
    counts, overlay = independent_counts(ref, oth)
    assert (d.only_reference, d.only_other, d.low_iou, d.matched) == counts
    assert sum(counts) > 0 and d.matched > 0
    np.testing.assert_array_equal(d.overlay, overlay)
    n_ref, n_oth = len(np.unique(ref)) - 1, len(np.unique(oth)) - 1
    assert d.only_reference + d.low_iou + d.matched == n_ref
    assert d.only_other + d.low_iou + d.matched == n_oth


def test_compare_job_runs_two_models_on_a_sample():
    pytest.importorskip("onnxruntime")
    from segstudio.core.backends import auto_variant, create_backend
    from segstudio.core.models.catalog import get_model

    image = read_image(sample_pairs()[0][0])
    light, full = get_model("nuclei-light"), get_model("nuclei")
    with create_backend(auto_variant(light), light) as ba, create_backend(auto_variant(full), full) as bb:
        same = run_sync(compare_job(image, light, ba, light, ba))
        assert isinstance(same, Comparison) and same.disagreement.disagreeing == 0
        assert same.disagreement.matched == len(np.unique(same.labels_a)) - 1 > 0
        events = []
        two = run_sync(compare_job(image, light, ba, full, bb), events.append)
    assert [e.done for e in events if e.stage == "compare"] == [0, 1, 2]
    assert two.seconds_a > 0 and two.seconds_b > 0 and two.backend_a and two.backend_b
    counts, overlay = independent_counts(two.labels_a, two.labels_b)
    d = two.disagreement
    assert (d.only_reference, d.only_other, d.low_iou, d.matched) == counts
    np.testing.assert_array_equal(d.overlay, overlay)
