"""Foreground + distance -> instances."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from segstudio.core.models.spec import PostprocessParams
from segstudio.core.segment.postprocess import fg_dist_to_labels, logit, relabel_sequential, remove_small
from segstudio.core.training.train import distance_target


def _discs(centres, radius, shape=(64, 96)):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    lab = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, start=1):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = i
    return lab


def _as_logits(lab):
    fg = np.where(lab > 0, 5.0, -5.0)
    d = distance_target(lab)
    return fg, np.log(np.clip(d, 1e-4, 1 - 1e-4) / (1 - np.clip(d, 1e-4, 1 - 1e-4)))


def test_touching_discs_are_separated():
    lab = _discs([(32, 30), (32, 50)], 11)  # overlap: second overwrites the neck
    assert ndi.label(lab > 0)[1] == 1  # one connected blob
    fg, d = _as_logits(lab)
    out = fg_dist_to_labels(fg, d, PostprocessParams(seed_threshold=0.5))
    assert out.max() == 2
    # each predicted object is mostly one true object
    for i in (1, 2):
        ids, counts = np.unique(lab[out == i], return_counts=True)
        assert counts.max() / counts.sum() > 0.95


def test_foreground_without_seed_is_kept_and_small_objects_removed():
    fg = np.full((40, 40), -5.0)
    fg[5:15, 5:15] = 5.0  # no seed here
    fg[30:32, 30:32] = 5.0  # 4 px: below min_size
    d = np.full((40, 40), -5.0)
    out = fg_dist_to_labels(fg, d, PostprocessParams(min_size=8))
    assert out.max() == 1 and (out > 0).sum() == 100


def test_thresholds_are_applied_on_logits():
    assert abs(logit(0.5)) < 1e-12
    assert logit(0.8) > 0 > logit(0.2)


def test_relabel_sequential_and_dtype():
    lab = np.array([[0, 7, 7], [3, 0, 9]])
    out = relabel_sequential(lab)
    np.testing.assert_array_equal(out, [[0, 1, 1], [2, 0, 3]])
    assert out.dtype == np.uint16
    many = np.arange(1, 70_001).reshape(350, 200)
    big = relabel_sequential(many)
    assert big.dtype == np.uint32 and big.max() == 70_000


def test_remove_small():
    lab = np.zeros((10, 10), int)
    lab[0, :3] = 1
    lab[5:, 5:] = 2
    np.testing.assert_array_equal(np.unique(remove_small(lab, 4)), [0, 2])


def test_compiled_watershed_gives_scikit_image_labels(samples, nuclei):
    """The hierarchical-queue flood equals skimage's heap watershed on the real model's output."""
    from segstudio.core.backends import create_backend
    from segstudio.core.image.sources import read_image
    from segstudio.core.jobs import run_sync
    from segstudio.core.segment.preprocess import normalize
    from segstudio.core.segment.tiling import predict_tiled
    from segstudio.core.tasks.benchmark import skimage_labels

    with create_backend("onnxruntime", nuclei) as backend:
        for image_path, _ in samples:
            plane = next(read_image(image_path).planes())[1]
            out = run_sync(predict_tiled(normalize(plane, nuclei.spec.normalization), backend.predict,
                                         halo=nuclei.spec.halo, multiple=nuclei.spec.config.multiple))
            ours = fg_dist_to_labels(out[0], out[1], nuclei.spec.postprocess)
            ref = skimage_labels(out[0], out[1], nuclei.spec.postprocess)
            assert (ours != ref).mean() < 1e-4
            assert abs(int(ours.max()) - int(ref.max())) <= 1


def test_levels_flood_on_plateaus_is_complete_and_connected():
    from segstudio.core.segment._kernels import flood_levels

    rng = np.random.default_rng(0)
    levels = rng.integers(0, 3, (50, 60)).astype(np.uint16)
    markers = np.zeros((50, 60), np.int32)
    markers[10, 10], markers[40, 50] = 1, 2
    mask = np.ones((50, 60), bool)
    out = flood_levels(levels, 3, markers, mask)
    assert set(np.unique(out)) == {1, 2}  # every masked pixel reached
    for lab in (1, 2):
        assert ndi.label(out == lab)[1] == 1  # each basin is one connected region


def test_fill_enclosed_holes_fills_a_nucleolus_not_a_gap_between_nuclei():
    from segstudio.core.segment.postprocess import fill_enclosed_holes

    lab = np.zeros((40, 40), np.int32)
    lab[2:14, 2:14] = 1
    lab[6:9, 6:9] = 0  # a hole inside object 1
    # four objects around a gap: background bordered by several objects
    lab[20:30, 20:25], lab[20:30, 27:32] = 2, 3
    lab[20:22, 25:27], lab[28:30, 25:27] = 4, 5
    lab[0:5, 34:40] = 6
    lab[0:2, 36:38] = 0  # a notch open to the array's edge
    out = fill_enclosed_holes(lab)
    assert (out[6:9, 6:9] == 1).all()
    assert (out[22:28, 25:27] == 0).all() and (out[0:2, 36:38] == 0).all()
    assert np.array_equal(out[lab > 0], lab[lab > 0])
