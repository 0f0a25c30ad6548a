"""The optimization engine on small models and few images (the real runs are in benchmarks/)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from segstudio.core.errors import InputError  # noqa: E402
from segstudio.core.jobs import run_sync  # noqa: E402
from segstudio.core.models.catalog import get_model, load_card  # noqa: E402
from segstudio.core.models.spec import UNetConfig  # noqa: E402
from segstudio.core.models.unet import build_unet  # noqa: E402
from segstudio.core.optimize.calibration import CalibrationSource  # noqa: E402
from segstudio.core.optimize.distill import KDConfig, distill_job  # noqa: E402
from segstudio.core.optimize.prune import (  # noqa: E402
    channel_groups,
    compressed_size,
    importance,
    plan_pruning,
    prune_structured,
    prune_unstructured,
)
from segstudio.core.optimize.steps import parse_steps  # noqa: E402


def _random_net(cfg: UNetConfig, seed=0):
    torch.manual_seed(seed)
    net = build_unet(cfg).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.05, 1.0)
                m.bias.uniform_(-0.1, 0.1)
    return net


# ------------------------------------------------------------------ structured pruning


@pytest.mark.parametrize("separable", [False, True])
def test_pruning_nothing_changes_nothing_and_half_keeps_the_graph_valid(separable):
    net = _random_net(UNetConfig(depth=3, width=8, separable=separable))
    x = torch.randn(2, 1, 64, 96)
    same = prune_structured(net, plan_pruning(net, 0.0, round_to=1))
    with torch.no_grad():
        assert torch.equal(same(x), net(x))
    half = prune_structured(net, plan_pruning(net, 0.5, round_to=1))
    lw = half.config.layer_widths()
    assert lw.enc_out == (4, 8, 16, 32) and lw.up == (4, 8, 16)
    with torch.no_grad():
        assert half(x).shape == (2, 2, 64, 96)
    assert half.config.flops(64, 96) < 0.35 * net.config.flops(64, 96)
    # the pruned description round-trips through the model card JSON
    from segstudio.core.models.spec import ModelSpec

    spec = ModelSpec(name="x", version="1", title="", description="", config=half.config)
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))).config == half.config


def test_pruned_channels_are_the_weakest_and_skip_slices_follow():
    net = _random_net(UNetConfig(depth=2, width=8))
    groups = channel_groups(net.config)
    enc0 = groups["enc0.out"]
    # make channel 3 of the first encoder block's output the least important by BN scale
    bn = net.encoders[0][1][1]
    with torch.no_grad():
        bn.weight[3] = 1e-4
    keeps = plan_pruning(net, 0.125, method="bn", round_to=1)
    assert 3 not in keeps["enc0.out"] and len(keeps["enc0.out"]) == 7
    assert ("decoders.1.0", 0) in enc0.consumers  # the skip into the top decoder
    pruned = prune_structured(net, keeps)
    # the top decoder's first conv lost exactly that input channel of its skip half
    old_w = net.decoders[1][0][0].weight
    new_w = pruned.decoders[1][0][0].weight
    kept = torch.as_tensor(keeps["enc0.out"])
    assert torch.equal(new_w[:, :7], old_w[keeps["dec0.mid"]][:, kept])


def test_importance_methods_and_modes():
    net = _random_net(UNetConfig(depth=2, width=8))
    g = channel_groups(net.config)["enc1.mid"]
    scores = {m: importance(net, g, m) for m in ("l1", "l2", "bn")}
    assert all(len(s) == 16 for s in scores.values())
    assert not np.array_equal(np.argsort(scores["l1"]), np.argsort(scores["bn"]))
    glob = plan_pruning(net, 0.5, mode="global", round_to=1)
    assert sum(len(k) for k in glob.values()) < sum(grp.size for grp in channel_groups(net.config).values())
    per_layer = plan_pruning(net, {"enc1.mid": 0.5}, round_to=1)
    assert len(per_layer["enc1.mid"]) == 8 and len(per_layer["enc0.out"]) == 8
    with pytest.raises(InputError, match="no layer group"):
        plan_pruning(net, {"nope": 0.5})
    with pytest.raises(InputError, match="importance"):
        plan_pruning(net, 0.5, method="random")


def test_kept_groups_stay_whole_and_flops_targets_are_met_or_refused():
    from segstudio.core.optimize.prune import full_resolution_groups, ratio_for_flops, widths_after

    net = _random_net(UNetConfig(depth=3, width=16))
    keep = full_resolution_groups(net.config)
    for mode in ("uniform", "global"):
        plan = plan_pruning(net, 0.5, keep=keep, mode=mode)
        lw = widths_after(net, plan).layer_widths()
        assert lw.enc_out[0] == lw.dec_out[0] == lw.up[0] == 16 and lw.enc_out[1] < 32
    r = ratio_for_flops(net, 0.5, keep=keep)
    left = widths_after(net, plan_pruning(net, r, keep=keep)).flops(512, 512) / net.config.flops(512, 512)
    assert 0.4 < left <= 0.5
    with pytest.raises(InputError, match="at most"):
        ratio_for_flops(net, 0.9, keep=keep)
    step = parse_steps("prune:0.5:keep=enc0.out+nope")[0]
    from segstudio.core.optimize.steps import Context

    problems = step.check(get_model("nuclei"), Context(original=get_model("nuclei"), calib=None, out_dir=Path(".")))
    assert any("nope" in p for p in problems)


def test_unstructured_pruning_reports_sparsity_and_size_only(tmp_path):
    net = _random_net(UNetConfig(depth=2, width=8))
    before = tmp_path / "a.pt"
    torch.save(net.state_dict(), before)
    info = prune_unstructured(net, 0.7)
    assert 0.69 < info["sparsity"] < 0.71
    after = tmp_path / "b.pt"
    torch.save(net.state_dict(), after)
    assert compressed_size(after) < 0.6 * compressed_size(before)
    assert "not faster" in parse_steps("sparsify:0.7")[0].doc.lower()


# ------------------------------------------------------------------ calibration, distillation, quantization


def test_calibration_tiles_span_the_intensity_range(nuclei, sample_dir):
    calib = CalibrationSource.from_folder(sample_dir, nuclei.spec, n_tiles=12, tile=128)
    assert len(calib.entries) == 4  # the _labels files are skipped
    tiles = calib.tiles()
    assert len(tiles) == 12 and tiles[0].shape == (1, 1, 128, 128)
    means = sorted(float(t.mean()) for t in tiles)
    # every candidate tile's mean lies within the sampled range's extremes (strata cover both ends)
    all_means = [float(e.plane[:, y:y + 128, x:x + 128].mean()) for e in calib.entries
                 for y in range(0, e.plane.shape[1] - 127, 64) for x in range(0, e.plane.shape[2] - 127, 64)]
    assert means[0] <= np.percentile(all_means, 10) and means[-1] >= np.percentile(all_means, 90)
    d = calib.digest
    assert d == CalibrationSource.from_folder(sample_dir, nuclei.spec, n_tiles=12, tile=128).digest
    assert d != CalibrationSource.from_folder(sample_dir, nuclei.spec, n_tiles=8, tile=128).digest
    with pytest.raises(InputError):
        CalibrationSource.from_folder(sample_dir / "nope", nuclei.spec)
    # napari layers: arrays with their axes; the same pixels give the same set
    from segstudio.core.image.sources import read_image

    imgs = [read_image(p) for p in sorted(sample_dir.glob("*_img.tif"))]
    layers = CalibrationSource.from_arrays([(im.data.reshape(im.data.shape[-2:]), "YX", im.name) for im in imgs],
                                           nuclei.spec, n_tiles=12, tile=128)
    assert layers.digest == d and len(layers.tiles()) == 12


def test_distillation_moves_the_student_towards_the_teacher(nuclei, sample_dir):
    calib = CalibrationSource.from_folder(sample_dir, nuclei.spec)
    teacher = _random_net(UNetConfig(depth=2, width=8), seed=1)
    student = _random_net(UNetConfig(depth=2, width=4), seed=2)
    x = torch.from_numpy(calib.tiles()[0][:, :, :64, :64].copy()) if calib.tiles() else None
    with torch.no_grad():
        before = torch.nn.functional.mse_loss(torch.sigmoid(student(x)), torch.sigmoid(teacher(x))).item()
    info = run_sync(distill_job(student, teacher, calib.images(), KDConfig(steps=40, crop=64, batch_size=4, lr=3e-3)))
    with torch.no_grad():
        after = torch.nn.functional.mse_loss(torch.sigmoid(student(x)), torch.sigmoid(teacher(x))).item()
    assert after < before and info["steps"] == 40 and not info["labels"]
    assert info["loss_every_10"][-1] < info["loss_every_10"][0]


def test_int8_quantization_fallback_and_fp16(nuclei, sample_dir, tmp_path):
    import onnx

    from segstudio.core.optimize.quantize import conv_nodes, convert_fp16, layer_sensitivity, quantize_int8

    calib = CalibrationSource.from_folder(sample_dir, nuclei.spec, n_tiles=6, tile=128)
    src = nuclei.files["onnx"]
    q = quantize_int8(src, tmp_path / "q.onnx", calib.tiles(), method="percentile")
    ops = [n.op_type for n in onnx.load(str(q)).graph.node]
    assert ops.count("QuantizeLinear") > 10 and ops.count("DequantizeLinear") > 10
    nodes = conv_nodes(src)
    keep = nodes[:2]
    q2 = quantize_int8(src, tmp_path / "q2.onnx", calib.tiles(), exclude=keep)
    g2 = onnx.load(str(q2)).graph
    producers = {o: n for n in g2.node for o in n.output}
    for name in keep:  # an excluded conv reads a float weight, not a dequantized one
        conv = next(n for n in g2.node if n.name == name)
        assert producers.get(conv.input[1]) is None or producers[conv.input[1]].op_type != "DequantizeLinear"
    import onnxruntime as ort

    x = calib.tiles()[0]
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = ort.InferenceSession(str(q), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    cos = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cos > 0.99
    # entropy searches its thresholds (with ONNX Runtime's defaults it would return MinMax's ranges)
    from onnx import numpy_helper

    def act_scales(path):
        return {i.name: float(numpy_helper.to_array(i)) for i in onnx.load(str(path)).graph.initializer
                if i.name.endswith("_scale") and numpy_helper.to_array(i).size == 1}

    qe = quantize_int8(src, tmp_path / "qe.onnx", calib.tiles()[:3], method="entropy")
    qm = quantize_int8(src, tmp_path / "qm.onnx", calib.tiles()[:3], method="minmax")
    se, sm = act_scales(qe), act_scales(qm)
    assert sum(se[k] < 0.99 * sm[k] for k in sm) > len(sm) // 2  # clipped below the observed maximum
    ranking = run_sync(layer_sensitivity(src, calib.tiles()[:3]))
    assert sorted(n for n, _ in ranking) == sorted(nodes)
    f16 = convert_fp16(src, tmp_path / "h.onnx")
    m16 = onnx.load(str(f16))
    assert m16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in m16.graph.initializer)


# ------------------------------------------------------------------ steps and the runner


def test_step_syntax_is_checked():
    steps = parse_steps("prune:0.4:importance=l1,recover:steps=20,quantize:int8:method=entropy,export")
    assert [s.label for s in steps] == ["prune:0.4:importance=l1", "recover:steps=20",
                                        "quantize:int8:method=entropy", "export"]
    from segstudio.core.optimize.steps import format_steps

    assert format_steps(parse_steps(format_steps(steps))) == format_steps(steps)
    for bad, msg in [("prune:1.5", "above 0 and below 1"), ("prune:0.5:speed=max", "no option speed"),
                     ("squash", "unknown step"), ("quantize:int4", "one of int8, fp16"), ("", "no optimization"),
                     ("distill:wide", "whole number from 2"), ("prune:0.5:of=weird", "one of channels, flops"),
                     ("recover:steps=0", "from 1 to 1,000,000"), ("recover:lr=nan", "a number from"),
                     ("quantize:int8:method=kl", "one of percentile"), ("distill:separable=maybe", "true or false"),
                     ("export:3", "takes no argument"), ("quantize:int8:percentile=101", "from 90 to 100")]:
        with pytest.raises(InputError, match=msg):
            parse_steps(bad)


def test_step_specifications_describe_every_option():
    """The typed specs the CLI parses with and the GUI draws from: every option typed, defaulted, explained."""
    from segstudio.core.optimize.options import OptionSpec
    from segstudio.core.optimize.steps import STEP_SPECS

    assert set(STEP_SPECS) == {"prune", "recover", "distill", "sparsify", "export", "quantize", "qat", "engine"}
    for spec in STEP_SPECS.values():
        assert spec.title and spec.doc
        for o in ((spec.argument,) if spec.argument else ()) + spec.options:
            assert isinstance(o, OptionSpec) and o.kind in (bool, int, float, str) and o.help
            assert o.parse(o.text(o.default)) == o.default  # the default round-trips through its text
            if o.choices:
                assert o.default in o.choices
    engine = {o.name for o in STEP_SPECS["engine"].options}
    assert {"workspace_gb", "level", "min_tile", "tile", "batch", "timing_cache"} <= engine
    assert {"method", "percentile", "tiles", "max_fallback"} <= {o.name for o in STEP_SPECS["quantize"].options}
    step = STEP_SPECS["recover"].make(steps="40", alpha=0.25)
    assert step.opts["steps"] == 40 and step.opts["alpha"] == 0.25 and step.label == "recover:steps=40:alpha=0.25"
    with pytest.raises(InputError, match=r"recover:alpha must be a number from 0 to 1, not '2'"):
        STEP_SPECS["recover"].make(alpha="2")


def test_presets_parse_and_say_why_they_cannot_run():
    from segstudio.core.optimize.presets import PRESETS, preset

    assert [p.key for p in PRESETS] == ["int8", "prune-recover-int8", "prune-qat", "light", "gpu-fp16-engine"]
    for p in PRESETS:
        assert parse_steps(p.steps) and p.sentence
    gpu = preset("gpu-fp16-engine").unavailable()
    import torch

    if not torch.cuda.is_available():
        assert gpu == "no NVIDIA GPU is visible on this machine"
    assert preset("int8").unavailable() is None
    with pytest.raises(InputError, match="no preset"):
        preset("turbo")


def _small_run(tmp_path, sample_dir, steps, max_drop=0.01, target="cpu", min_speedup=0.0, **kw):
    """A run on two sample images; the speed guardrail is off unless asked (a 128 px tile is noisy to time)."""
    from segstudio.core.optimize.runner import OptimizeOptions, optimize_job
    from segstudio.core.optimize.steps import Context
    from segstudio.core.optimize.validate import ValidationSet

    nuclei = get_model("nuclei")
    calib = CalibrationSource.from_folder(sample_dir, nuclei.spec, n_tiles=8, tile=128)
    vset = ValidationSet.from_folders(sample_dir, sample_dir, limit=2)
    from segstudio.core.jobs import CancelToken

    ctx = Context(original=nuclei, calib=calib, out_dir=tmp_path / "opt", target=target,
                  cancel=kw.pop("cancel", None) or CancelToken())
    events = kw.pop("events", None)
    on_progress = kw.pop("on_progress", None) or (events.append if events is not None else None)
    if "estimate" not in kw:  # the estimate's own timing is tested once (test_run_time_estimate...); here it is given
        from segstudio.core.optimize.estimate import RunEstimate

        n = len(parse_steps(steps))
        kw["estimate"] = RunEstimate(total_s=60.0, per_step_s=(20.0,) * n, measure_s=20.0, basis="given by the test")
    options = OptimizeOptions(max_drop=max_drop, min_speedup=min_speedup, speed_tile=128,
                              resume=kw.pop("resume", False), budget=kw.pop("budget", {}))
    return run_sync(optimize_job(nuclei, parse_steps(steps), ctx, vset, options, **kw), on_progress)


def test_optimize_reports_every_step_and_artifacts_load_back(tmp_path, sample_dir):
    from segstudio.core.optimize.report import EventKind, OptimizeEvent, OptimizeReport, StepStatus

    events = []
    report = _small_run(tmp_path, sample_dir, "prune:0.5,recover:steps=5,quantize:int8:fallback=off,"
                        "quantize:fp16,engine", max_drop=1.0, events=events)
    assert isinstance(report, OptimizeReport)
    names = [r.name for r in report.steps]
    assert names == ["prune:0.5", "recover:steps=5", "quantize:int8:fallback=off", "quantize:fp16", "engine"]
    status = {r.name: r.status for r in report.steps}
    assert status["prune:0.5"] is status["recover:steps=5"] is status["quantize:int8:fallback=off"] is StepStatus.KEPT
    assert status["quantize:fp16"] is StepStatus.SKIPPED and "not faster on a CPU" in report.steps[3].reason
    assert status["engine"] is StepStatus.SKIPPED  # no TensorRT or GPU here
    for r in report.steps[:3]:
        assert r.measured and r.ap50_delta is not None and r.size_mb > 0 and r.artifact is not None
        model = load_card(r.artifact)
        prov = model.provenance
        assert prov["step"] in ("prune", "recover", "quantize") and prov["parent"] and prov["versions"]
        assert prov["hardware"]
    int8 = load_card(report.steps[2].artifact)
    assert "onnx_int8" in int8.files and int8.provenance["calibration"]
    assert report.steps[1].details["steps"] == 5
    assert [s for s, _ in report.steps[1].loss_curve] == [5]  # the loss as it trained (every 10 steps and the last)
    retune = report.steps[1].details["postprocess"]  # thresholds re-chosen for the recovered network
    assert retune["against"] == "the teacher's instances" and retune["ap50_after"] >= retune["ap50_before"]
    recovered = load_card(report.steps[1].artifact).spec.postprocess
    assert (recovered.fg_threshold, recovered.seed_threshold) == (retune["fg_threshold"], retune["seed_threshold"])
    final = report.final
    assert final.artifact.suffix == ".json" and load_card(final.artifact).files and report.final_from == 2
    assert report.baseline.ap50 is not None and report.eager_fp32_ms > 0
    for r in report.steps[:3]:  # timed again at the end, round-robin with the original
        assert r.latency_ms_at_step > 0 and r.speedup_vs_parent > 0
        assert r.speedup_vs_baseline == pytest.approx(report.eager_fp32_ms / r.latency_ms)
    assert report.steps[4].ap50 is None and report.steps[4].reason
    assert [r.name for r in report.kept_path()] == ["original", "prune:0.5", "recover:steps=5",
                                                    "quantize:int8:fallback=off"]
    front = report.pareto()
    assert front and all(not any(o.ap50 >= r.ap50 and o.speedup_vs_baseline > r.speedup_vs_baseline
                                 for o in [report.baseline, *report.steps[:3]]) for r in front)
    out = tmp_path / "opt"
    loaded = OptimizeReport.load(out)
    assert loaded.to_dict()["final"] == report.to_dict()["final"] and loaded.steps[2].backend == final.backend
    page = (out / "report.html").read_text()
    assert "<svg" in page and "prune:0.5" in page and "guardrail" in page
    # the events: typed, one finish per step (the pruning told again when its recovery settled it), in order
    typed = [p.event for p in events if isinstance(p.event, OptimizeEvent)]
    assert len(typed) == len(events)  # every event carries its typed payload
    kinds = [e.kind for e in typed]
    milestones = [k for k in kinds if k is not EventKind.STEP_PROGRESS]
    assert milestones[:2] == [EventKind.ESTIMATE, EventKind.BASELINE] and milestones[-2:] == [EventKind.REMEASURED,
                                                                                              EventKind.FINISHED]
    finished = [(e.step, e.row.status) for e in typed if e.kind is EventKind.STEP_FINISHED]
    assert {s for s, _ in finished} == {0, 1, 2, 3, 4}
    assert finished[-1] == (4, StepStatus.SKIPPED)
    points = [e for e in typed if e.kind is EventKind.STEP_POINT]
    assert {e.step for e in points} == {0, 1, 2} and all(e.row.ap50 is not None for e in points)
    losses = [e for e in typed if e.kind is EventKind.STEP_PROGRESS and e.loss is not None]
    assert losses and all(e.step == 1 and e.train_step for e in losses)
    after = typed[kinds.index(EventKind.ESTIMATE):]  # from the estimate on, every event has an ETA
    assert all(e.run_eta_s is not None and e.run_eta_s >= 0 for e in after)
    assert typed[-1].run_fraction > 0.9
    assert (out / "state.json").is_file()


def test_int8_artifact_keeps_accuracy_and_segments_through_the_cli(tmp_path, sample_dir):
    """Quantize the real model on the sample images; the result is a model the CLI runs as INT8."""
    from segstudio.cli import main

    report = _small_run(tmp_path, sample_dir, "quantize:int8:method=percentile", max_drop=0.05)
    (step,) = report.steps
    assert step.status.value == "kept" and step.backend.endswith(":int8")
    assert abs(step.ap50_delta) <= 0.05 and step.validation["agreement_ap50"] > 0.8
    assert step.details["calibration"]["tiles"] == 8
    final_dir = tmp_path / "opt" / "final"
    out = tmp_path / "seg"
    image = sorted(sample_dir.glob("*_img.tif"))[0]
    assert main(["segment", str(image), "--model", str(final_dir), "--out", str(out), "--quiet"]) == 0
    from segstudio.core.image.sources import read_image

    labels = read_image(out / f"{image.stem}_labels.tif").data
    assert len(np.unique(labels)) > 20


def test_int8_fallback_keeps_sensitive_layers_in_float_then_gives_up(tmp_path, sample_dir):
    # an impossible budget (AP50 must rise by 0.5): two fallbacks are tried, then the step is rolled back
    report = _small_run(tmp_path, sample_dir, "quantize:int8:max_fallback=2", max_drop=-0.5)
    (step,) = report.steps
    assert step.status.value == "rolled_back" and len(step.attempts) == 3
    floats = step.details["float_layers"]
    assert len(floats) == 2 and len(set(floats)) == 2
    assert [s.layer for s in step.sensitivity[:2]] == floats == list(step.float_layers)  # the most sensitive, in order
    assert all(s.in_float is (s.layer in floats) for s in step.sensitivity)
    assert [s.gain for s in step.sensitivity] == sorted((s.gain for s in step.sensitivity), reverse=True)
    assert report.final_from is None


@pytest.mark.slow
def test_guardrail_rolls_back_and_says_why(tmp_path, sample_dir):
    report = _small_run(tmp_path, sample_dir, "prune:0.9,recover:steps=2:retune=off,"
                        "distill:4:steps=3:separable=true:retune=off", max_drop=0.0001)
    prune, recover, distill = report.steps
    assert recover.status.value == "rolled_back" and "more than the allowed" in recover.reason
    assert prune.status.value == "rolled_back"
    # a three-step student is far from its teacher: rolled back too, and it was the student asked for
    assert distill.status.value == "rolled_back" and distill.details["steps"] == 3
    student = load_card(distill.artifact).spec.config
    assert student.width == 4 and student.separable and distill.params < report.baseline.params / 10
    assert report.final.ap50_delta == 0.0 and report.final_from is None


def test_speed_guardrail_rolls_back_a_step_that_is_not_faster(tmp_path, sample_dir):
    """Accuracy within budget but not min_speedup times faster than its parent here: rolled back, and why."""
    report = _small_run(tmp_path, sample_dir, "quantize:int8:fallback=off", max_drop=1.0, min_speedup=50.0)
    (step,) = report.steps
    assert step.status.value == "rolled_back" and "not faster on this machine" in step.reason
    assert "less than the 50.00x asked for" in step.reason
    assert 0 < step.details["speedup_vs_parent_at_verdict"] < 50
    assert report.final_from is None


@pytest.mark.slow  # about 2.5 min on 2 cores; resume is also covered in the everyday run by the CLI's --resume checks
def test_cancelled_run_resumes_without_redoing_finished_steps(tmp_path, sample_dir):
    """Cancel during the second step: the first stays done; resume runs only the second, and says so."""
    from segstudio.core.errors import Cancelled
    from segstudio.core.jobs import CancelToken
    from segstudio.core.optimize.report import EventKind
    from segstudio.core.optimize.runner import can_resume

    token = CancelToken()
    seen = []

    def on(p):
        seen.append(p.event)
        if p.event.kind is EventKind.STEP_PROGRESS and p.event.step == 1 and p.event.loss is not None:
            token.cancel()

    steps = "quantize:int8:fallback=off,distill:4:steps=60:retune=off"
    with pytest.raises(Cancelled):
        _small_run(tmp_path, sample_dir, steps, max_drop=1.0, cancel=token, on_progress=on)
    first = tmp_path / "opt" / "01-quantize"
    assert first.is_dir() and "1 of 2 step(s) finished" in can_resume(tmp_path / "opt")
    stamp = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}
    events = []
    report = _small_run(tmp_path, sample_dir, steps, max_drop=1.0, resume=True, events=events)
    assert report.steps[0].status.value == "kept" and report.steps[1].details["steps"] == 60
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == stamp  # not redone
    started = [p.event.step for p in events if p.event.kind is EventKind.STEP_STARTED]
    assert started == [1]
    assert can_resume(tmp_path / "opt") is None  # finished
    with pytest.raises(InputError, match="holds a run of other steps"):
        _small_run(tmp_path, sample_dir, "quantize:int8", resume=True)


def test_find_images_leaves_out_labels_and_filters_by_kind(tmp_path):
    import tifffile

    from segstudio.core.training.datasets import find_images

    for name in ("a_img", "a_labels", "b_img", "c"):
        tifffile.imwrite(tmp_path / f"{name}.tif", np.zeros((8, 8), np.uint8))
    (tmp_path / "index.json").write_text(json.dumps([{"file": "a", "kind": "fluorescence"},
                                                     {"file": "b", "kind": "brightfield"}]))
    assert [p.name for p in find_images(tmp_path)] == ["a_img.tif", "b_img.tif", "c.tif"]
    assert [p.name for p in find_images(tmp_path, kind="fluorescence")] == ["a_img.tif"]
    with pytest.raises(InputError, match="of kind 'histology'"):
        find_images(tmp_path, kind="histology")


def test_cancel_does_not_wait_for_a_call_without_cancellation_points():
    """An ONNX export cannot stop half-way: Cancel returns while it still runs, and its result is dropped."""
    import threading

    from segstudio.core.errors import Cancelled
    from segstudio.core.jobs import CancelToken, run_interruptible

    gate, finished = threading.Event(), []

    def export():
        gate.wait(30)
        finished.append(True)
        return "file"

    token = CancelToken()
    threading.Timer(0.2, token.cancel).start()
    with pytest.raises(Cancelled):
        run_interruptible(export, token)
    assert not finished  # Cancel came back while the call was still running
    gate.set()
    assert run_interruptible(lambda: 41 + 1, CancelToken()) == 42
    with pytest.raises(ZeroDivisionError):
        run_interruptible(lambda: 1 / 0, CancelToken())


def test_run_time_estimate_is_measured_here_and_scales_with_the_work(sample_dir):
    """More training steps cost more; the basis names what was timed on this machine."""
    from segstudio.core.optimize.estimate import estimate_run
    from segstudio.core.optimize.validate import ValidationSet

    nuclei = get_model("nuclei-light")
    calib = CalibrationSource.from_folder(sample_dir, nuclei.spec, n_tiles=8, tile=128)
    vset = ValidationSet.from_folders(sample_dir, sample_dir, limit=1)
    est = estimate_run(nuclei, parse_steps("quantize:int8,distill:4:steps=10,distill:4:steps=1000"), calib, vset,
                       speed_tile=128)
    assert len(est.per_step_s) == 3 and all(s > 0 for s in est.per_step_s)
    assert est.per_step_s[2] > est.per_step_s[1]  # 100 times the training steps of the same student
    assert est.total_s == pytest.approx(sum(est.per_step_s) + est.measure_s)
    assert "per batch of 4 tiles" in est.basis and "per training step of distill:4:steps=10" in est.basis
    assert "about" in est.describe()


def test_distillation_with_labels_gives_a_share_of_crops_hard_augmentation(nuclei, sample_dir, monkeypatch):
    import segstudio.core.training.train as train
    from segstudio.core.training.datasets import find_pairs
    from segstudio.core.training.train import load_samples

    calls = []
    real = train.hard_photometric
    monkeypatch.setattr(train, "hard_photometric", lambda x, fg, rng: calls.append(float(fg.max())) or real(x, fg, rng))
    samples = load_samples(find_pairs(sample_dir, sample_dir)[:2], nuclei.spec.normalization, 1)
    labels = [(s.fg, s.dist) for s in samples]
    teacher = _random_net(UNetConfig(depth=2, width=8), seed=1)
    student = _random_net(UNetConfig(depth=2, width=4), seed=2)
    cfg = KDConfig(steps=10, crop=64, batch_size=4, lr=3e-3, hard_share=0.5)
    info = run_sync(distill_job(student, teacher, [s.image for s in samples], cfg, labels=labels))
    assert info["labels"] and 8 <= len(calls) <= 32  # about half of the 40 crops
    assert max(calls) == 1.0  # the crops' foreground reached the texture and dimming
    calls.clear()
    run_sync(distill_job(student, teacher, [s.image for s in samples], KDConfig(steps=10, crop=64, batch_size=4)))
    assert not calls
