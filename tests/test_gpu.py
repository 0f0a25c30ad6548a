"""CUDA checks; skipped on machines without an NVIDIA GPU (CI has none)."""

from __future__ import annotations

import numpy as np
import pytest

from segstudio.core.backends import create_backend
from segstudio.core.image.sources import read_image
from segstudio.core.jobs import run_sync
from segstudio.core.models.onnx_export import compare_outputs
from segstudio.core.segment.job import segment_job
from segstudio.core.segment.preprocess import normalize
from segstudio.core.tasks.evaluate import score

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
]


def test_torch_cuda_matches_cpu(nuclei, samples):
    img = read_image(samples[-1][0])
    x = normalize(next(img.planes())[1], nuclei.spec.normalization)[None, :, :512, :512]
    with create_backend("torch@cpu", nuclei) as cpu, create_backend("torch@cuda", nuclei) as gpu:
        assert gpu.device.startswith("cuda") and "CUDA" in gpu.describe()
        diff = compare_outputs(cpu.predict(x), gpu.predict(x))
        assert diff["max_abs_error"] < 1e-2 and diff["cosine"] > 0.9999
        lab_cpu = run_sync(segment_job(img, nuclei, cpu)).labels
        lab_gpu = run_sync(segment_job(img, nuclei, gpu)).labels
    assert score(lab_cpu, lab_gpu).ap[0.5] > 0.98


def test_auto_picks_cuda(nuclei):
    with create_backend("auto", nuclei) as backend:
        assert backend.name == "torch" and backend.device.startswith("cuda")
        out = backend.predict(np.zeros((2, 1, 64, 64), np.float32))
    assert out.shape == (2, 2, 64, 64)
