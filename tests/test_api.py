"""``segstudio.segment``: the one-call entry point for scripts and notebooks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

import segstudio
from segstudio.core.backends import create_backend
from segstudio.core.errors import InputError
from segstudio.core.image.io import ImageData
from segstudio.core.image.sources import read_image
from segstudio.core.jobs import run_sync
from segstudio.core.models.catalog import get_model
from segstudio.core.segment.job import segment_job
from segstudio.core.tasks.evaluate import score

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def test_segment_from_a_path_and_an_array_matches_the_job_and_the_truth():
    path = SAMPLE / "0287e7ee5b00_img.tif"
    truth = tifffile.imread(SAMPLE / "0287e7ee5b00_labels.tif")
    labels, table = segstudio.segment(path, "nuclei", backend="onnxruntime")
    assert labels.shape == truth.shape and np.issubdtype(labels.dtype, np.unsignedinteger)
    np.testing.assert_array_equal(table["label"], np.arange(1, labels.max() + 1))
    assert score(truth, labels).ap[0.5] > 0.6
    model = get_model("nuclei")
    with create_backend("onnxruntime", model) as backend:
        job = run_sync(segment_job(read_image(path), model, backend))
    np.testing.assert_array_equal(labels, job.labels)
    # an array in memory, with its axes named (here a 2-channel CYX stack whose channel 1 holds the nuclei)
    plane = tifffile.imread(path)
    two = np.stack([np.zeros_like(plane), plane])
    from_array, _ = segstudio.segment(two, model, backend="onnxruntime", axes="CYX", channel=1)
    np.testing.assert_array_equal(from_array, labels)
    # the channel by its name, as the docstring promises (any case); a name the image lacks is refused by name
    named = ImageData(two, "CYX", name="two", channel_names=["GFP", "DAPI"])
    by_name, _ = segstudio.segment(named, model, backend="onnxruntime", channel="dapi")
    np.testing.assert_array_equal(by_name, labels)
    with pytest.raises(InputError, match=r"no channel named 'Hoechst' \(its channels: GFP, DAPI\)"):
        segstudio.segment(named, model, backend="onnxruntime", channel="Hoechst")


def test_import_segstudio_stays_light():
    code = "import sys, segstudio; print(sorted(m for m in ('torch', 'onnxruntime', 'segstudio.core.segment') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
