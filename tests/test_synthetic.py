"""The synthetic live/dead generator: determinism, ratios, shapes, camera."""

from __future__ import annotations

import numpy as np
import pytest

from segstudio.core.segment.scale import object_diameters
from segstudio.core.training.synthetic import ASSAYS, DEAD, LIVE, ViabilityParams, viability_image


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


# ------------------------------------------------------------------ hard nuclei

from pathlib import Path  # noqa: E402

from segstudio.core.training.synthetic import HardNucleiParams, hard_nuclei_image  # noqa: E402

HARD_SET = Path(__file__).parent / "data" / "hard_nuclei"


def test_hard_nuclei_same_seed_same_image_and_the_held_out_set_is_reproduced():
    a, la, _ = hard_nuclei_image(np.random.default_rng(3))
    b, lb, _ = hard_nuclei_image(np.random.default_rng(3))
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    # the committed held-out set is what its seeds give (scripts/make_hard_nuclei.py)
    import tifffile

    img, lab, _ = hard_nuclei_image(np.random.default_rng(900000))
    assert np.array_equal(tifffile.imread(HARD_SET / "hard900000_img.tif"), img)
    assert np.array_equal(tifffile.imread(HARD_SET / "hard900000_labels.tif"), lab)
    assert len(list(HARD_SET.glob("*_img.tif"))) == 30


@pytest.mark.parametrize("d", [9.0, 30.0, 90.0])
def test_hard_nuclei_sizes_labels_and_image_side(d):
    img, lab, info = hard_nuclei_image(np.random.default_rng(1), diameter=d)
    assert img.shape == lab.shape and 192 <= img.shape[0] <= 640
    assert set(np.unique(lab)) == set(range(lab.max() + 1))  # ids 1..N, each with pixels
    diam = object_diameters(lab)
    big = diam[diam > 0.5 * d]  # nuclei, not micronuclei
    assert 0.6 * d < np.median(big) < 1.4 * d
    assert info["nuclei"] >= 3


def test_hard_nuclei_dim_beside_bright_and_eight_bit():
    params = HardNucleiParams(brightness_spread=(15.0, 15.0), eight_bit=1.0, background=(0.0, 0.0),
                              gradient=(0.0, 0.0), illumination=(0.0, 0.0), photons=(5000.0, 5000.0),
                              chromatin=(0.0, 0.0), micronuclei=0.0)
    img, lab, info = hard_nuclei_image(np.random.default_rng(2), params, diameter=30.0)
    assert img.dtype == np.uint8 and info["eight_bit"]
    means = np.array([img[lab == i].mean() for i in range(1, lab.max() + 1)])
    assert means.max() / max(means.min(), 1e-3) > 5  # dim nuclei beside bright ones in one image


def test_hard_nuclei_nucleoli_darken_the_inside_of_large_nuclei():
    base = dict(brightness_spread=(1.0, 1.0), background=(0.0, 0.0), gradient=(0.0, 0.0),
                illumination=(0.0, 0.0), photons=(1e5, 1e5), read_noise=(0.0, 0.0), chromatin=(0.0, 0.0),
                eight_bit=0.0, psf_sigma=(0.5, 0.5), defocus=0.0, micronuclei=0.0)
    smooth, lab, _ = hard_nuclei_image(np.random.default_rng(4), HardNucleiParams(**base, nucleoli=0.0), diameter=70)
    holes, lab2, _ = hard_nuclei_image(np.random.default_rng(4), HardNucleiParams(**base, nucleoli=1.0), diameter=70)
    def darkest_share(img, lab):  # per nucleus: its 5th-percentile pixel over its median
        return np.median([np.percentile(img[lab == i], 5) / np.median(img[lab == i]) for i in range(1, lab.max() + 1)])

    # dark spots inside the nuclei: their darkest pixels far below their median
    assert darkest_share(holes, lab2) < darkest_share(smooth, lab) - 0.05
