"""The npe2 manifest: sample data contributions and the labels writer."""

from __future__ import annotations

import numpy as np
import pytest
from napari.layers import Image, Labels
from npe2 import PluginManager
from segstudio.sample_data import sample_pairs

from segstudio.core.image.sources import read_image
from segstudio.napari_plugin._sample_data import sample_id

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def manifest():
    pm = PluginManager.instance()
    pm.discover()
    return pm.get_manifest("segstudio")


def test_manifest_offers_every_sample_the_widget_and_the_writer(manifest):
    keys = {sample.key for sample in manifest.contributions.sample_data}
    assert keys == {sample_id(image) for image, _ in sample_pairs()}
    names = [w.display_name for w in manifest.contributions.widgets]
    assert names == ["Segment", "Batch", "Optimize", "Benchmark", "Performance"]
    writer = manifest.contributions.writers[0]
    assert writer.layer_types == ["labels"] and ".tif" in writer.filename_extensions


def test_sample_data_opens_image_and_ground_truth(make_napari_viewer):
    viewer = make_napari_viewer()
    for image_path, labels_path in sample_pairs():
        viewer.layers.clear()
        image, truth = viewer.open_sample("segstudio", sample_id(image_path))
        assert isinstance(image, Image) and isinstance(truth, Labels)
        assert truth.name == f"{image.name} ground truth" and not truth.visible
        np.testing.assert_array_equal(image.data, read_image(image_path).data)
        np.testing.assert_array_equal(truth.data, read_image(labels_path).data)


def test_writer_round_trips_labels(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    labels = np.zeros((40, 50), np.int32)
    labels[5:15, 5:20] = 1
    labels[20:35, 30:45] = 69_999  # past uint16: written as uint32
    layer = viewer.add_labels(labels, name="cells", scale=(0.5, 0.25))
    written = layer.save(str(tmp_path / "cells.tif"), plugin="segstudio")
    assert written == [str(tmp_path / "cells.tif")]
    back = read_image(tmp_path / "cells.tif")
    np.testing.assert_array_equal(back.data, labels)
    assert back.data.dtype == np.uint32
    assert back.pixel_size == pytest.approx((0.5, 0.25))

    small = viewer.add_labels(labels.clip(0, 2).astype(np.int64), name="small")
    small.save(str(tmp_path / "small.tif"), plugin="segstudio")
    back = read_image(tmp_path / "small.tif")
    assert back.data.dtype == np.uint16 and back.pixel_size is None
    np.testing.assert_array_equal(back.data, labels.clip(0, 2))
