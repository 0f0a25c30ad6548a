"""Quantization-aware training runs on the INT8 graph itself: the fake-quant network is the exported INT8 model."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from segstudio.core.image.sources import read_image  # noqa: E402
from segstudio.core.models.catalog import load_card  # noqa: E402
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
    plain = qdq_net(q, nuclei.file("onnx")).eval()
    plain.quantized = False  # the same graph in float is the float model (the ReLUs the quantizer folded included)
    with torch.no_grad():
        for t, ref in zip(tiles, float_out):
            np.testing.assert_allclose(plain(torch.from_numpy(t)).numpy(), ref, atol=1e-3 * np.abs(ref).max())
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


def test_qat_recipes_and_budgets_are_typed_and_checked():
    from segstudio.core.errors import InputError
    from segstudio.core.optimize.presets import preset
    from segstudio.core.optimize.steps import STEP_SPECS, format_steps, parse_budget, parse_steps

    steps = parse_steps("prune:0.5:keep=none,recover:steps=30:qat=true:qat_steps=7,quantize:int8,qat:steps=9")
    assert format_steps(steps) == "prune:0.5:keep=none,recover:steps=30:qat=true:qat_steps=7,quantize:int8,qat:steps=9"
    assert [s.budget_keys() for s in steps] == [("prune",), ("int8",), ("int8",), ("int8",)]
    assert parse_steps("recover")[0].budget_keys() == ()  # a plain recovery spends its pruning's allowance
    assert "qat" in STEP_SPECS and STEP_SPECS["qat"].option("lr").default == 4e-5
    with pytest.raises(InputError, match="qat must be true or false"):
        parse_steps("recover:qat=maybe")
    assert parse_budget("prune=0.006, int8=0.004") == {"prune": 0.006, "int8": 0.004}
    assert parse_budget(None) == {}
    for bad, words in (("speed=0.1", "not KIND=AP50"), ("int8", "not KIND=AP50"), ("int8=-0.1", "from 0 to 1"),
                       ("int8=lots", "must be a number")):
        with pytest.raises(InputError, match=words):
            parse_budget(bad)
    p = preset("prune-qat")
    assert p.title == "Maximum speed (prune + QAT)" and parse_steps(p.steps)[1].opts["qat"] is True


def test_short_qat_of_a_pruned_network_beats_its_ptq_and_the_report_shows_both(tmp_path, sample_dir):
    """prune, recover, then QAT on the sample images: the exported INT8 model is judged, its PTQ twin (the same
    recovered network, calibrated only) is measured beside it, and QAT scores higher on the same images."""
    from segstudio.core.optimize.report import OptimizeReport, StepStatus
    from test_optimize import _small_run

    report = _small_run(tmp_path, sample_dir, "prune:0.5,recover:steps=20:qat=true:qat_steps=20",
                        max_drop=0.5)
    prune, recover = report.steps
    assert recover.status is StepStatus.KEPT and prune.status is StepStatus.KEPT
    assert recover.backend.endswith(":int8")  # the guardrail judged the exported INT8 model
    child = load_card(recover.artifact)
    assert "onnx_int8" in child.files and child.files["onnx_int8"].name.endswith("_qat_int8.onnx")
    ptq, qat = recover.compare["ptq"], recover.compare["this step"]
    assert qat["ap50"] == recover.ap50 and ptq["backend"].endswith(":int8")
    assert qat["ap50"] > ptq["ap50"], f"QAT {qat['ap50']:.4f} is not above PTQ {ptq['ap50']:.4f} (same network)"
    assert load_card(ptq["artifact"]).files["onnx_int8"].name.endswith("_int8.onnx")
    assert ptq["speedup_vs_baseline"] == pytest.approx(report.eager_fp32_ms / ptq["latency_ms"])  # round-robin
    layers = recover.layer_error
    assert len(layers) >= 10 and all(set(v) == {"this step", "ptq"} for v in layers.values())
    assert all(0 <= e < 10 for v in layers.values() for by in v.values() for e in by.values())
    assert all(v["ptq"]["vs_own_float"] < 1 for v in layers.values())  # activation rounding: a fraction of the signal
    steps = [s for s, _ in recover.loss_curve]  # one curve over both phases: float recovery, then QAT
    assert steps == sorted(steps) and steps[-1] == 40 and len(steps) == 4
    assert recover.details["qat"]["steps"] == 20 and recover.details["steps"] == 20
    assert recover.budget_used == pytest.approx(report.baseline.ap50 - recover.ap50)  # with the pruning it recovers
    page = (tmp_path / "opt" / "report.html").read_text()
    assert "ptq of the same network" in page and "Per-layer error" in page
    loaded = OptimizeReport.load(tmp_path / "opt")
    assert loaded.steps[1].compare["ptq"]["ap50"] == ptq["ap50"] and loaded.steps[1].layer_error == layers


def test_budget_per_step_rolls_back_what_overspends_and_qat_repairs_ptq(tmp_path, sample_dir):
    """--budget prune=0: the pruning loses AP50 and is rolled back though --max-drop would allow it; INT8 and
    its QAT repair spend their own allowance, and the QAT row compares itself with the PTQ model before it."""
    from segstudio.core.optimize.report import StepStatus
    from test_optimize import _small_run

    report = _small_run(tmp_path, sample_dir, "prune:0.7,recover:steps=2:retune=off,quantize:int8:fallback=off,"
                        "qat:steps=10:crop=96", max_drop=1.0, budget={"prune": 0.0, "int8": 0.5})
    prune, recover, ptq, qat = report.steps
    assert recover.status is StepStatus.ROLLED_BACK and "allowance of 0 (--budget)" in recover.reason
    assert prune.status is StepStatus.ROLLED_BACK and recover.budget_used > 0 and recover.allowance == 0.0
    assert ptq.status is StepStatus.KEPT and ptq.allowance == 0.5 and qat.status is StepStatus.KEPT
    assert qat.allowance == 0.5 and qat.budget_used == pytest.approx(ptq.ap50 - qat.ap50)
    assert qat.compare["ptq"]["ap50"] == ptq.ap50 and qat.compare["ptq"]["artifact"] == str(ptq.artifact)
    assert report.budget == {"prune": 0.0, "int8": 0.5}
    assert "allowance 0.5" in (tmp_path / "opt" / "report.html").read_text()


@pytest.mark.slow  # about 3 min on 2 cores
def test_cancel_during_qat_then_resume_finishes_the_step(tmp_path, sample_dir):
    """Cancelled in its quantization-aware phase, the recovery starts again on --resume (as recover does) and the
    finished pruning is not redone."""
    from segstudio.core.errors import Cancelled
    from segstudio.core.jobs import CancelToken
    from segstudio.core.optimize.report import EventKind
    from segstudio.core.optimize.runner import can_resume
    from test_optimize import _small_run

    steps = "prune:0.5,recover:steps=10:crop=96:qat=true:qat_steps=20"
    token = CancelToken()

    def on(p):
        ev = p.event
        if ev.kind is EventKind.STEP_PROGRESS and ev.step == 1 and (ev.train_step or 0) > 10:  # the QAT phase
            token.cancel()

    with pytest.raises(Cancelled):
        _small_run(tmp_path, sample_dir, steps, max_drop=1.0, cancel=token, on_progress=on)
    assert "1 of 2 step(s) finished" in can_resume(tmp_path / "opt")
    pruned = tmp_path / "opt" / "01-prune"
    stamp = {p: p.stat().st_mtime_ns for p in pruned.rglob("*") if p.is_file()}
    events = []
    report = _small_run(tmp_path, sample_dir, steps, max_drop=1.0, resume=True, events=events)
    assert [p.event.step for p in events if p.event.kind is EventKind.STEP_STARTED] == [1]
    assert report.steps[1].status.value == "kept" and report.steps[1].backend.endswith(":int8")
    assert [s for s, _ in report.steps[1].loss_curve][-1] == 30
    assert {p: p.stat().st_mtime_ns for p in pruned.rglob("*") if p.is_file()} == stamp
