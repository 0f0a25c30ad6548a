"""Quantization-aware training runs on the INT8 graph itself: the fake-quant network is the exported INT8 model."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from segstudio.core.image.sources import read_image  # noqa: E402
from segstudio.core.optimize.calibration import CalibrationSource  # noqa: E402
from segstudio.core.optimize.qat import fake_quant, qdq_net  # noqa: E402
from segstudio.core.optimize.quantize import quantize_int8  # noqa: E402


def _session(path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run(session, tiles):
    name = session.get_inputs()[0].name
    return [session.run(None, {name: t})[0] for t in tiles]


def _openvino(path, tiles):
    """OpenVINO's outputs (its CPU plugin runs the Q/DQ graph in u8 / i8), or None when it is not installed."""
    try:
        import openvino as ov
    except ImportError:
        return None
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return [compiled(t)[0] for t in tiles]


def test_fake_quant_rounds_half_to_even_and_clips_like_quantize_linear():
    import torch

    x = torch.tensor([-1.0, 0.0, 0.25, 0.5, 0.75, 1.25, 63.9, 64.0])
    out = fake_quant(x, torch.tensor(0.5), 2.0, 0, 127)
    # x / 0.5 + 2 = -0, 2, 2.5, 3, 3.5, 4.5, 129.8, 130 -> round half to even, clip to [0, 127], back
    np.testing.assert_array_equal(out.numpy(), (np.array([0, 2, 2, 3, 4, 4, 127, 127]) - 2) * 0.5)
    s = torch.tensor(0.5, requires_grad=True)
    xs = torch.tensor([0.3, 0.9], requires_grad=True)
    fake_quant(xs, s, 0.0, 0, 255).sum().backward()
    assert xs.grad.tolist() == [1.0, 1.0] and s.grad is not None and s.grad.item() != 0  # straight through; LSQ


def test_fake_quant_network_is_the_int8_model_on_real_tiles(nuclei, samples, tmp_path):
    """On tiles of the bundled images the interpreted graph gives the INT8 model's outputs, before and after a
    change of its weights and scales, within the runtimes' integer arithmetic (a few output steps at most)."""
    import torch

    calib = CalibrationSource([read_image(img) for img, _ in samples], nuclei.spec, n_tiles=6, tile=128)
    tiles = calib.tiles()
    q = quantize_int8(nuclei.file("onnx"), tmp_path / "q.onnx", tiles)
    net = qdq_net(q, nuclei.file("onnx")).eval()
    float_out = _run(_session(nuclei.file("onnx")), tiles)
    step = float(net.scale("output_scale"))
    for label, path in (("as calibrated", q), ("after a change", None)):
        if path is None:  # nudge every weight and scale, export, and check the exported model is the network
            with torch.no_grad():
                for p in net.parameters():
                    p.mul_(1.02)
            path = net.export(tmp_path / "qat.onnx")
        with torch.no_grad():
            fake = [net(torch.from_numpy(t)).numpy() for t in tiles]
        for runtime, int8 in (("onnxruntime", _run(_session(path), tiles)), ("openvino", _openvino(path, tiles))):
            if int8 is None:
                continue
            diff = np.concatenate([np.abs(a - b).ravel() for a, b in zip(int8, fake)])
            quant_error = np.mean([np.abs(a - f).mean() for a, f in zip(int8, float_out)])
            assert diff.max() <= 3 * step + 1e-6, (label, runtime, diff.max(), step)
            assert diff.mean() < 0.05 * quant_error, (label, runtime, diff.mean(), quant_error)
