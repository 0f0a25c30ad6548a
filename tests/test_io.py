"""Image reading: formats, axes, metadata and the errors users see."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from segstudio.core.errors import InputError
from segstudio.core.image.io import as_image, write_labels
from segstudio.core.image.sources import read_image


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_plain_tiff_uint8_and_uint16(tmp_path, rng):
    for dtype, hi in ((np.uint8, 255), (np.uint16, 65535)):
        a = rng.integers(0, hi, (40, 50), dtype=dtype)
        tifffile.imwrite(tmp_path / "a.tif", a)
        img = read_image(tmp_path / "a.tif")
        assert img.axes == "YX" and img.data.dtype == dtype
        np.testing.assert_array_equal(img.data, a)
        assert img.pixel_size is None and img.n_channels == 1


@pytest.mark.parametrize("compression", ["zlib", "lzw", "zstd"])
def test_compressed_tiff(tmp_path, rng, compression):
    a = rng.integers(0, 4000, (64, 64), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "c.tif", a, compression=compression)
    np.testing.assert_array_equal(read_image(tmp_path / "c.tif").data, a)


def test_float_tiff(tmp_path, rng):
    a = rng.random((30, 31)).astype(np.float32)
    tifffile.imwrite(tmp_path / "f.tiff", a)
    np.testing.assert_array_equal(read_image(tmp_path / "f.tiff").data, a)


def test_ome_tiff_axes_and_pixel_size(tmp_path, rng):
    a = rng.integers(0, 1000, (2, 3, 20, 24), dtype=np.uint16)  # T C Y X
    tifffile.imwrite(
        tmp_path / "x.ome.tif", a, ome=True,
        metadata={"axes": "TCYX", "PhysicalSizeX": 0.325, "PhysicalSizeY": 0.33, "Channel": {"Name": ["DAPI", "GFP", "RFP"]}},
    )
    img = read_image(tmp_path / "x.ome.tif")
    assert img.axes == "TCYX"
    assert img.name == "x"
    assert img.pixel_size == pytest.approx((0.33, 0.325))
    assert img.channel_names == ["DAPI", "GFP", "RFP"]
    planes = list(img.planes())
    assert len(planes) == 2 and planes[1][0] == (1,) and planes[1][1].shape == (3, 20, 24)
    np.testing.assert_array_equal(planes[1][1], a[1])


def test_ome_tiff_nanometre_units(tmp_path, rng):
    a = rng.integers(0, 100, (16, 16), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "n.ome.tif", a, ome=True,
                     metadata={"axes": "YX", "PhysicalSizeX": 650, "PhysicalSizeXUnit": "nm",
                               "PhysicalSizeY": 650, "PhysicalSizeYUnit": "nm"})
    assert read_image(tmp_path / "n.ome.tif").pixel_size == pytest.approx((0.65, 0.65))


def test_imagej_tiff_zstack_with_channels(tmp_path, rng):
    a = rng.integers(0, 1000, (4, 2, 20, 22), dtype=np.uint16)  # Z C Y X
    tifffile.imwrite(tmp_path / "ij.tif", a, imagej=True, resolution=(1 / 0.5, 1 / 0.25),
                     metadata={"axes": "ZCYX", "unit": "um"})
    img = read_image(tmp_path / "ij.tif")
    assert img.axes == "ZCYX" and img.stack_axes == "Z" and img.n_channels == 2
    assert img.pixel_size == pytest.approx((0.25, 0.5))
    np.testing.assert_array_equal(img.data, a)


def test_plain_tiff_inch_resolution_is_not_a_pixel_size(tmp_path, rng):
    a = rng.integers(0, 100, (16, 16), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "dpi.tif", a, resolution=(72, 72), resolutionunit="INCH")
    assert read_image(tmp_path / "dpi.tif").pixel_size is None


def test_rgb_tiff_is_yxc_to_cyx(tmp_path, rng):
    a = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", a, photometric="rgb")
    img = read_image(tmp_path / "rgb.tif")
    assert img.axes == "CYX" and img.data.shape == (3, 20, 30)
    np.testing.assert_array_equal(img.data[1], a[..., 1])


def test_png_gray_rgb_rgba_and_jpeg(tmp_path, rng):
    gray = rng.integers(0, 255, (20, 21), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert img.axes == "YX"
    np.testing.assert_array_equal(img.data, gray)

    rgb = rng.integers(0, 255, (20, 21, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    assert read_image(tmp_path / "c.png").data.shape == (3, 20, 21)

    rgba = np.concatenate([rgb, np.full((20, 21, 1), 255, np.uint8)], axis=-1)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    assert read_image(tmp_path / "a.png").n_channels == 3  # opaque alpha dropped

    g16 = rng.integers(0, 60000, (20, 21), dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    np.testing.assert_array_equal(read_image(tmp_path / "g16.png").data, g16)

    Image.fromarray(rgb).save(tmp_path / "j.jpg", quality=95)
    img = read_image(tmp_path / "j.jpeg" if False else tmp_path / "j.jpg")
    assert img.data.shape == (3, 20, 21) and img.data.dtype == np.uint8


def test_guessed_axes_for_arrays_without_metadata():
    assert as_image(np.zeros((10, 12))).axes == "YX"
    assert as_image(np.zeros((10, 12, 3))).axes == "CYX"  # YXC moved to CYX
    assert as_image(np.zeros((2, 10, 12))).axes == "CYX"
    assert as_image(np.zeros((7, 10, 12))).axes == "ZYX"
    assert as_image(np.zeros((5, 2, 10, 12))).axes == "ZCYX"


def test_unknown_single_axis_in_tiff_is_a_stack(tmp_path):
    tifffile.imwrite(tmp_path / "s.tif", np.zeros((6, 16, 16), np.uint8))
    img = read_image(tmp_path / "s.tif")
    assert img.axes in ("ZYX", "CYX") and img.data.shape[0] == 6


def test_bool_becomes_uint8():
    assert as_image(np.ones((9, 9), bool)).data.dtype == np.uint8


# ------------------------------------------------------------------ bad input


def _raises_one_line(path, match):
    with pytest.raises(InputError, match=match) as info:
        read_image(path)
    assert "\n" not in str(info.value)
    return info.value


def test_text_file_named_tif(tmp_path):
    (tmp_path / "notes.tif").write_text("this is not an image\n")
    _raises_one_line(tmp_path / "notes.tif", "not a readable TIFF")


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_truncated_tiff(tmp_path, rng, compression):
    a = rng.integers(0, 60000, (300, 300), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "full.tif", a, compression=compression)
    data = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    _raises_one_line(tmp_path / "cut.tif", "truncated or corrupt|not a readable")


def test_empty_file_missing_file_folder_and_unknown_suffix(tmp_path):
    (tmp_path / "empty.tif").write_bytes(b"")
    _raises_one_line(tmp_path / "empty.tif", "empty")
    _raises_one_line(tmp_path / "missing.tif", "no such file")
    _raises_one_line(tmp_path, "folder")
    (tmp_path / "x.czi").write_bytes(b"abc")
    _raises_one_line(tmp_path / "x.czi", "unsupported file type")


def test_one_pixel_image(tmp_path):
    tifffile.imwrite(tmp_path / "one.tif", np.zeros((1, 1), np.uint8))
    _raises_one_line(tmp_path / "one.tif", "too small")


def test_five_d_array_without_axes(tmp_path):
    np.save(tmp_path / "five.npy", np.zeros((2, 3, 4, 16, 16), np.uint8))
    _raises_one_line(tmp_path / "five.npy", "5-D")
    tifffile.imwrite(tmp_path / "five.tif", np.zeros((2, 3, 5, 16, 16), np.uint8))
    _raises_one_line(tmp_path / "five.tif", "cannot interpret")


def test_five_d_with_axes_is_fine():
    img = as_image(np.zeros((2, 3, 2, 16, 16), np.uint8), "TZCYX")
    assert img.stack_shape == (2, 3) and len(list(img.planes())) == 6


def test_complex_and_pickled_npy_refused(tmp_path):
    with pytest.raises(InputError, match="not supported"):
        as_image(np.zeros((10, 10), np.complex64))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _raises_one_line(tmp_path / "obj.npy", "holds Python objects, not pixels")


# ------------------------------------------------------------------ writing


def test_write_labels_roundtrip_with_pixel_size(tmp_path, rng):
    lab = rng.integers(0, 500, (40, 40)).astype(np.uint16)
    write_labels(tmp_path / "l.tif", lab, pixel_size=(0.2, 0.4))
    img = read_image(tmp_path / "l.tif")
    np.testing.assert_array_equal(img.data, lab)
    assert img.pixel_size == pytest.approx((0.2, 0.4))
    assert not list(tmp_path.glob("*.tmp"))


def test_write_labels_uint32(tmp_path):
    lab = np.arange(300 * 300, dtype=np.uint32).reshape(300, 300)
    write_labels(tmp_path / "big.tif", lab)
    back = read_image(tmp_path / "big.tif").data
    assert back.dtype == np.uint32 and back.max() == lab.max()


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(Exception):
        write_labels(tmp_path / "bad.tif", np.zeros((4, 4), dtype=object))
    assert list(tmp_path.iterdir()) == []


def test_sample_data_reads(samples):
    for img_path, lab_path in samples:
        img, lab = read_image(img_path), read_image(lab_path)
        assert img.plane_shape == lab.plane_shape
        assert lab.data.max() > 5
