"""Warnings about a calibration set, on generated images whose answers are known, and the chosen tiles."""

from __future__ import annotations

import numpy as np
import pytest

from segstudio.core.models.catalog import get_model
from segstudio.core.optimize.calibration import (
    EMPTY_SPAN, MIN_IMAGES, MIN_TILES, CalibrationSource, calibration_warnings,
)


@pytest.fixture(scope="module")
def spec():
    return get_model("nuclei").spec


def nuclei(seed: int, shape=(256, 256), n=40, peak=200) -> np.ndarray:
    """Bright discs on a noisy background (uint8): a plain, well-exposed image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = rng.normal(20, 4, shape)
    for _ in range(n):
        cy, cx, r = rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(5, 10)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0.5, 1.0) * peak
    image += rng.normal(0, 4, shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def source(arrays, spec, **kw) -> CalibrationSource:
    return CalibrationSource.from_arrays([(a, None, f"im{i}") for i, a in enumerate(arrays)], spec, tile=64, **kw)


def test_a_varied_set_gets_no_warning(spec):
    calib = source([nuclei(i) for i in range(4)], spec, n_tiles=32)
    assert len(calib.tiles()) == 32
    assert calibration_warnings(calib) == []


def test_chosen_tiles_say_where_each_tile_comes_from(spec):
    images = [nuclei(i) for i in range(3)]
    calib = source(images, spec, n_tiles=20)
    chosen = calib.chosen_tiles()
    assert len(chosen) == len(calib.tiles()) == 20
    assert {name for name, *_ in chosen} == {"im0", "im1", "im2"}  # stratified across the files
    for name, y, x, tile in chosen:
        plane = calib.entries[int(name[2:])].plane
        np.testing.assert_array_equal(tile[0], plane[:, y: y + 64, x: x + 64])
    assert [c[:3] for c in calib.chosen_tiles()] == [c[:3] for c in chosen]  # cached: the same tiles again


def test_too_small_and_one_file(spec):
    calib = source([nuclei(0, shape=(128, 128))], spec, n_tiles=64)
    n = len(calib.tiles())  # a 128 px image has 9 candidate 64 px tiles at half-tile steps
    assert n == 9 < MIN_TILES and len(calib.entries) == 1 < MIN_IMAGES
    warnings = calibration_warnings(calib)
    assert len(warnings) == 2
    assert warnings[0].startswith("Small set: 9 tiles from 1 image.")
    assert "one file (im0)" in warnings[1]


def test_planes_of_one_stack_are_one_file(spec):
    stack = np.stack([nuclei(i) for i in range(4)])  # Z, Y, X
    calib = CalibrationSource.from_arrays([(stack, "ZYX", "stack")], spec, tile=64, n_tiles=32)
    assert len(calib.entries) == 4
    assert [w for w in calibration_warnings(calib) if "one file (stack)" in w]


def test_saturated_image_is_named(spec):
    images = [nuclei(i) for i in range(3)]
    bright = nuclei(9, peak=400)  # clipped at 255: every disc brighter than 255 is flat at the maximum
    at_max = float(np.mean(bright == bright.max()))
    assert at_max > 0.01
    calib = source(images + [bright], spec, n_tiles=32)
    warnings = calibration_warnings(calib)
    assert len(warnings) == 1 and warnings[0].startswith(f"im3 is saturated: {at_max:.1%} of its pixels")


def test_empty_tiles_and_constant_images(spec):
    flat = np.full((256, 256), 30, np.uint8)
    calib = source([nuclei(0), nuclei(1), nuclei(2), flat, flat + 5], spec, n_tiles=32)
    warnings = calibration_warnings(calib)
    assert warnings[:2] == [f"im{i} is constant (an empty image): it teaches the quantizer nothing." for i in (3, 4)]
    # 98 of the 245 candidate tiles are flat (mean 0 once normalized): the 12 dimmest strata of 32 are all flat
    empty = sum(1 for *_, t in calib.chosen_tiles() if np.ptp(t) < EMPTY_SPAN)
    assert empty >= 12
    assert f"{empty} of the 32 chosen tiles are nearly empty" in warnings[-1]
