"""The built-in model: its card, its files, both backends, tiling with the real network."""

from __future__ import annotations

import numpy as np
import pytest

from segstudio.core.backends import available_backends, create_backend
from segstudio.core.errors import IncompatibleArtifactError, InputError
from segstudio.core.image.sources import read_image
from segstudio.core.jobs import run_sync
from segstudio.core.models.catalog import builtin_models, get_model, load_card
from segstudio.core.models.onnx_export import compare_outputs
from segstudio.core.segment.job import segment_job
from segstudio.core.segment.options import SegmentOptions
from segstudio.core.segment.preprocess import normalize
from segstudio.core.segment.tiling import predict_tiled
from segstudio.core.tasks.evaluate import evaluate_job
from segstudio.core.training.datasets import find_pairs

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")


def test_card_and_files(nuclei):
    assert nuclei.name == "nuclei"
    assert set(nuclei.files) == {"torch", "onnx"}
    total = sum(p.stat().st_size for p in nuclei.files.values())
    assert total < 10 * 2**20
    card = nuclei.spec.card()
    assert "percentiles" in card and "AP50" in card and "reproduce:" in card
    assert nuclei.spec.halo >= nuclei.spec.config.receptive_radius()
    assert nuclei.spec.halo % nuclei.spec.config.multiple == 0
    names = [m.name for m in builtin_models()]
    assert names[0] == "nuclei" and set(names) == {"nuclei", "nuclei-light", "nuclei-v1", "nuclei-v2", "viability"}


def test_unknown_model_and_tampered_file(tmp_path, nuclei):
    with pytest.raises(InputError, match="unknown model"):
        get_model("no-such-model")
    import shutil

    for p in [nuclei.card_path, *nuclei.files.values()]:
        shutil.copy(p, tmp_path / p.name)
    onnx = tmp_path / nuclei.files["onnx"].name
    onnx.write_bytes(onnx.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(IncompatibleArtifactError, match="checksum"):
        load_card(tmp_path / nuclei.card_path.name)


def test_state_dict_loads_with_weights_only(nuclei):
    state = torch.load(nuclei.files["torch"], weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_onnx_matches_torch(nuclei, samples):
    img = read_image(samples[0][0])
    x = normalize(next(img.planes())[1], nuclei.spec.normalization)[None, :, :256, :256]
    with create_backend("torch@cpu", nuclei) as tb, create_backend("onnxruntime", nuclei) as ob:
        assert tb.device == "cpu" and "CPUExecutionProvider" in ob.describe()
        diff = compare_outputs(tb.predict(x), ob.predict(x))
    assert diff["max_abs_error"] < 1e-3 and diff["cosine"] > 0.99999


def test_receptive_radius_bounds_what_an_output_sees():
    from segstudio.core.models.spec import UNetConfig
    from segstudio.core.models.unet import build_unet

    for cfg in (UNetConfig(depth=2, width=4), UNetConfig(depth=3, width=4, separable=True)):
        torch.manual_seed(0)
        net = build_unet(cfg).eval()
        r, m = cfg.receptive_radius(), cfg.multiple
        size = -(-(2 * r + 2 * m + 1) // m) * m
        c = size // 2
        x = torch.randn(1, 1, size, size)
        with torch.no_grad():
            base = net(x)[0, :, c, c]
            for dy, dx in ((r + 1, 0), (0, -(r + 1)), (r + 1, r + 1)):
                y = x.clone()
                y[0, 0, c + dy, c + dx] += 100.0
                assert torch.allclose(net(y)[0, :, c, c], base, atol=1e-4)
            y = x.clone()
            y[0, 0, c + 1, c] += 100.0
            assert not torch.allclose(net(y)[0, :, c, c], base, atol=1e-4)


def test_result_does_not_depend_on_tile_size(nuclei, samples):
    """Cut the crowded sample into 64-px tiles and into one tile: same network output, same labels."""
    img = read_image(samples[-1][0])  # the largest sample
    with create_backend("onnxruntime", nuclei) as backend:
        x = normalize(next(img.planes())[1], nuclei.spec.normalization)
        outs = [
            run_sync(predict_tiled(x, backend.predict, tile=t, halo=nuclei.spec.halo,
                                   multiple=nuclei.spec.config.multiple, batch_size=4))
            for t in (64, 1024)
        ]
        assert np.abs(outs[0] - outs[1]).max() < 1e-3


@pytest.mark.parametrize("diameter", [14.0, 30.0, "native"])
def test_labels_do_not_depend_on_tile_size_at_any_diameter(nuclei, samples, diameter):
    """The crowded sample at the default settings, resampled up (14 px nuclei), down (30 px) or not at all:
    the same labels, ids included, for tiles of 256, 512 and 1024 px."""
    img = read_image(samples[-1][0])
    with create_backend("onnxruntime", nuclei) as backend:
        results = [run_sync(segment_job(img, nuclei, backend, SegmentOptions(tile=t, diameter=diameter))) for t in (256, 512, 1024)]
    assert results[0].scale != 1.0 or diameter == "native"
    assert results[0].n_objects > 150
    for r in results[1:]:
        np.testing.assert_array_equal(r.labels, results[0].labels)
        np.testing.assert_array_equal(r.table["area_px"], results[0].table["area_px"])


def test_segment_stack_labels_unique_across_planes(nuclei, samples):
    from segstudio.core.image.io import as_image

    plane = read_image(samples[1][0]).data
    stack = as_image(np.stack([plane, plane[::-1]]), "ZYX", pixel_size=(0.5, 0.5), name="stack")
    with create_backend("onnxruntime", nuclei) as backend:
        res = run_sync(segment_job(stack, nuclei, backend))
    assert res.labels.shape == (2, *plane.shape)
    n0 = len(np.unique(res.labels[0])) - 1
    assert n0 > 5 and len(np.unique(res.labels)) - 1 == res.n_cells
    assert set(res.table["z"]) == {0, 1} and "area_um2" in res.table
    np.testing.assert_array_equal(np.sort(res.table["label"]), np.arange(1, res.n_cells + 1))
    assert set(res.timings) == {"read", "normalize", "network", "post", "measure", "write", "wall"}


def test_accuracy_on_sample_data(nuclei, sample_dir):
    """The shipped model finds the sample's nuclei (held-out DSB2018 val images, two of them very dim).

    Measured with nuclei v2.0 (scale estimated): AP50 0.668 (v1: 0.699), Dice 0.936 on torch.
    """
    pairs = find_pairs(sample_dir, sample_dir)
    for name in available_backends(nuclei):
        with create_backend(name, nuclei) as backend:
            report = run_sync(evaluate_job(pairs, nuclei, backend))
        assert report["mean"]["ap50"] >= 0.65, (name, report["mean"])
        assert report["mean"]["dice"] >= 0.92
        crowded = next(r for r in report["images"] if r["name"] == "6fe2df6de1d9")
        assert crowded["ap50"] >= 0.75 and abs(crowded["n_pred"] - crowded["n_true"]) <= 0.2 * crowded["n_true"]


@pytest.mark.slow
def test_accuracy_on_dsb2018_fluorescence_val(nuclei, dsb2018):
    """The model card's headline number, measured again (issue 2: mean AP50 >= 0.80)."""
    pairs = find_pairs(dsb2018 / "val", dsb2018 / "val", kind="fluorescence")
    assert len(pairs) == 113
    with create_backend("onnxruntime", nuclei) as backend:
        report = run_sync(evaluate_job(pairs, nuclei, backend))
    card = nuclei.spec.metrics["dsb2018_fluorescence_val"]
    assert report["mean"]["ap50"] >= 0.80
    assert report["mean"]["ap50"] == pytest.approx(card["ap50"], abs=1e-3)


@pytest.mark.parametrize("separable", [False, True])
def test_flop_count_matches_torch(separable):
    from torch.utils.flop_counter import FlopCounterMode

    from segstudio.core.models.spec import UNetConfig
    from segstudio.core.models.unet import build_unet

    cfg = UNetConfig(depth=3, width=8, separable=separable)
    net = build_unet(cfg).eval()
    x = torch.zeros(1, 1, 64, 96)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    assert cfg.flops(64, 96) == counter.get_total_flops()


def test_input_asinh_runs_inside_the_graph_on_every_backend_and_int8(tmp_path, sample_dir):
    """A model that compresses its input (UNetConfig.input_asinh) does it in the exported graph: every
    backend and the INT8 model read the same normalized input and agree with PyTorch on a real tile."""
    import math

    import onnx

    from segstudio.core.models.spec import ModelSpec, UNetConfig
    from segstudio.core.models.unet import build_unet
    from segstudio.core.optimize.quantize import quantize_int8
    from segstudio.core.training.train import save_model

    cfg = UNetConfig(in_channels=1, out_channels=2, depth=2, width=4, input_asinh=0.1)
    torch.manual_seed(0)
    net = build_unet(cfg).eval()
    seen = []
    net.encoders[0][0][0].register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.inference_mode():
        net(torch.tensor([1.0, 0.1, 0.0, -0.1]).repeat(4).reshape(1, 1, 4, 4))
    lifted = seen[0].flatten()[:4].tolist()  # 1 stays 1, a tenth of it is lifted about 3x
    assert lifted == pytest.approx([1.0, math.asinh(1) / math.asinh(10), 0.0, -math.asinh(1) / math.asinh(10)], abs=1e-6)

    plane = next(read_image(sorted(sample_dir.glob("*.tif"))[0]).planes())[1]
    x = normalize(plane[:1].astype(np.float32), ModelSpec(name="a", version="1", title="", description="").normalization)
    tile = np.ascontiguousarray(x[None, :, :128, :128])
    spec = ModelSpec(name="asinh-test", version="1", title="t", description="d", config=cfg)
    model = load_card(save_model(net, spec, tmp_path / "m", example=tile))
    assert "asinh(x / 0.1)" in model.spec.card()
    assert any(n.op_type == "Asinh" for n in onnx.load(model.file("onnx")).graph.node)
    with torch.inference_mode():
        ref = net(torch.from_numpy(tile)).numpy()
    for name in available_backends(model):
        with create_backend(name, model) as backend:
            out = backend.predict(tile)
        assert compare_outputs(ref, out)["max_abs_error"] < 1e-3, name
    q = quantize_int8(model.file("onnx"), tmp_path / "q.onnx", [np.ascontiguousarray(x[None, :, y:y + 64, :64])
                                                                 for y in (0, 64, 128)])
    import onnxruntime as ort

    sess = ort.InferenceSession(str(q), providers=["CPUExecutionProvider"])
    graph = onnx.load(q).graph
    assert any(n.op_type == "Asinh" for n in graph.node) and any(n.op_type == "QuantizeLinear" for n in graph.node)
    assert compare_outputs(ref, sess.run(None, {sess.get_inputs()[0].name: tile})[0])["cosine"] > 0.99
