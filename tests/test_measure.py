"""Per-cell measurements on shapes with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from segstudio.core.segment.measure import measure, write_csv


def test_square_and_disc_measurements(tmp_path):
    lab = np.zeros((60, 60), np.uint16)
    lab[10:20, 10:20] = 1  # 10x10 square
    yy, xx = np.mgrid[:60, :60]
    lab[(yy - 40) ** 2 + (xx - 40) ** 2 <= 64] = 2
    img = np.zeros((2, 60, 60), np.uint16)
    img[0][lab == 1] = 100
    img[0][lab == 2] = 50
    img[0, 10, 10] = 300
    img[1][lab > 0] = 7
    t = measure(lab, img, pixel_size=(0.5, 0.25), channel_names=["dapi", "gfp"])
    assert list(t["label"]) == [1, 2]
    assert t["area_px"][0] == 100
    assert t["area_um2"][0] == pytest.approx(100 * 0.125)
    assert t["centroid_y"][0] == pytest.approx(14.5) and t["centroid_x"][0] == pytest.approx(14.5)
    assert t["centroid_y_um"][0] == pytest.approx(14.5 * 0.5)
    assert t["solidity"][0] == pytest.approx(1.0)
    assert t["eccentricity"][0] == pytest.approx(0, abs=1e-6)
    assert t["mean_dapi"][0] == pytest.approx((99 * 100 + 300) / 100)
    assert t["max_dapi"][0] == 300 and t["mean_gfp"][1] == 7
    assert t["eccentricity"][1] < 0.2  # a disc
    path = write_csv(tmp_path / "cells.csv", t)
    lines = path.read_text().splitlines()
    assert lines[0].startswith("label,area_px,area_um2,centroid_y") and len(lines) == 3


def test_no_pixel_size_no_physical_columns_and_empty_labels():
    lab = np.zeros((20, 20), np.uint16)
    lab[2:5, 2:5] = 1
    t = measure(lab, np.ones((1, 20, 20)))
    assert "area_um2" not in t and "mean_ch0" in t
    empty = measure(np.zeros((20, 20), np.uint16), np.ones((1, 20, 20)), pixel_size=(1, 1))
    assert len(empty["label"]) == 0 and "area_um2" in empty


def test_matches_scikit_image_on_real_labels(samples):
    """Same numbers as regionprops for everything but solidity, whose hull is of pixel squares."""
    from skimage.measure import regionprops_table

    from segstudio.core.image.sources import read_image

    img, lab = (read_image(p).data for p in samples[-1])
    ours = measure(lab, np.stack([img, img[::-1]]), channel_names=["a", "b"])
    ref = regionprops_table(lab, intensity_image=np.stack([img, img[::-1]], -1),
                            properties=("label", "area", "centroid", "eccentricity", "solidity",
                                        "intensity_mean", "intensity_max"))
    np.testing.assert_array_equal(ours["label"], ref["label"])
    np.testing.assert_array_equal(ours["area_px"], ref["area"])
    for a, b in [("centroid_y", "centroid-0"), ("centroid_x", "centroid-1"), ("eccentricity", "eccentricity"),
                 ("mean_a", "intensity_mean-0"), ("max_a", "intensity_max-0"), ("mean_b", "intensity_mean-1"),
                 ("max_b", "intensity_max-1")]:
        np.testing.assert_allclose(ours[a], ref[b], atol=1e-9)
    assert (ours["solidity"] <= 1).all()
    assert np.abs(ours["solidity"] - ref["solidity"]).max() < 0.06
    assert np.corrcoef(ours["solidity"], ref["solidity"])[0, 1] > 0.98


def test_solidity_of_an_l_shape():
    lab = np.zeros((12, 12), np.uint16)
    lab[1:11, 1:4] = 1  # 10 x 3 bar
    lab[8:11, 4:11] = 1  # 3 x 7 foot: L of area 51
    t = measure(lab, np.ones((1, 12, 12)))
    # hull of the squares: corners (1,1) (11,1) (11,11) (8,11) (1,4): area 100 - 7*7/2 - ... computed by shoelace
    hull = 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in
                         zip([(1, 1), (11, 1), (11, 11), (8, 11), (1, 4)], [(11, 1), (11, 11), (8, 11), (1, 4), (1, 1)])))
    assert t["area_px"][0] == 51
    assert t["solidity"][0] == pytest.approx(51 / hull)
