"""The synthetic live/dead generator: determinism, ratios, shapes, camera."""

from __future__ import annotations

import numpy as np
import pytest

from segstudio.core.scale import object_diameters
from segstudio.core.synthetic import ASSAYS, DEAD, LIVE, ViabilityParams, viability_image


def test_same_seed_same_image():
    a = viability_image(np.random.default_rng(5))
    b = viability_image(np.random.default_rng(5))
    assert all(np.array_equal(x, y) for x, y in zip(a[:3], b[:3]))
    c = viability_image(np.random.default_rng(6))
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("assay", ASSAYS)
def test_labels_classes_and_camera(assay):
    img, lab, cls, info = viability_image(np.random.default_rng(1), assay=assay)
    assert img.shape == (2, 256, 256) and img.dtype == np.uint16 and img.max() <= 4095
    assert lab.max() == len(cls) - 1 == info["cells"] and cls[0] == 0
    assert set(np.unique(cls[1:])) <= {LIVE, DEAD}
    assert set(np.unique(lab)) == set(range(lab.max() + 1))  # every id has pixels
    # the dead stain is bright in dead cells, dark in live ones
    dead_px, live_px = np.isin(lab, np.flatnonzero(cls == DEAD)), np.isin(lab, np.flatnonzero(cls == LIVE))
    if dead_px.any() and live_px.any():
        assert img[1][dead_px].mean() > 2 * img[1][live_px].mean()


def test_ratio_range_and_dead_cells_smaller_and_rounder():
    fracs = []
    live_d, dead_d = [], []
    for seed in range(40):
        _, lab, cls, info = viability_image(np.random.default_rng(seed))
        fracs.append(info["live_fraction"])
        d = object_diameters(lab)
        live_d += d[cls[1:] == LIVE].tolist()
        dead_d += d[cls[1:] == DEAD].tolist()
    ratios = np.array(fracs) / (1 - np.array(fracs))
    assert ratios.min() >= 1 / 20 - 1e-9 and ratios.max() <= 20 + 1e-9
    assert ratios.min() < 0.2 and ratios.max() > 5  # the range is covered
    assert np.median(dead_d) < 0.85 * np.median(live_d)
    # a fixed live fraction is honoured
    counts = [viability_image(np.random.default_rng(100 + s), live_fraction=1 / 21)[2][1:] for s in range(10)]
    share_dead = np.mean(np.concatenate(counts) == DEAD)
    assert 0.85 < share_dead < 1.0


def test_parameters_are_respected():
    p = ViabilityParams(shape=(128, 96), cells=(5, 5))
    img, lab, cls, _ = viability_image(np.random.default_rng(0), p)
    assert img.shape == (2, 128, 96) and 1 <= lab.max() <= 5
