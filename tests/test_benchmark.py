"""`segstudio bench`: the report has every field, figures are consistent, the chart is written.

Speed targets are checked by running the benchmark (benchmarks/), never here.  The run's structure
(progress events, the estimate, what ``--quick`` leaves out) is checked with stand-in backends that
answer at once, so those tests take a second and need no inference library.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from segstudio.core.backends import installed
from segstudio.core.jobs import Progress, run_sync
from segstudio.core.optimize.estimate import RunEstimate
from segstudio.core.tasks import benchmark
from segstudio.core.tasks.benchmark import BASELINE, QUICK, QUICK_NOTE, BenchOptions, bench_job, gemm_flops

needs_backends = pytest.mark.skipif(not (installed("torch") and installed("onnxruntime")),
                                    reason="needs torch and ORT")


@needs_backends
def test_gemm_flops_is_plausible():
    g = gemm_flops("cpu", "fp32", n=512, repeats=2)
    assert 1e9 < g["flops"] < 1e14 and g["library"] in g["all"]


@needs_backends
def test_bench_report(nuclei, samples):
    # warmup=0: each variant's warm-up calls (one tile, one batch, one end-to-end run of the first) come first anyway
    report = run_sync(bench_job(nuclei, samples[-1][0], ["ort", "tpu:fp32", "ort:int8"],
                                BenchOptions(repeats=2, warmup=0, tile=256, batch_size=2, max_net_tiles=4)))
    names = [v["name"] for v in report["variants"]]
    assert names == [BASELINE, "onnxruntime@cpu:fp32"] and report["baseline"] == BASELINE
    assert set(report["skipped"]) == {"tpu:fp32", "ort:int8"}  # refused with the reason, not silently dropped
    for v in report["variants"]:
        assert {"name", "net_mpix_s", "e2e_mpix_s", "p50_ms", "p95_ms", "peak_rss_mb", "peak_gpu_mb", "stages",
                "roofline"} <= set(v)
        assert v["p95_ms"] >= v["p50_ms"] > 0 and v["net_mpix_s"] > 0 and v["e2e_mpix_s"] > 0
        assert set(v["stages"]) == {"read", "normalize", "network", "post", "measure", "write"}
        # a ratio of two timings: only its presence and sign are checked (the machine is shared and noisy)
        assert 0 < v["roofline"]["fraction"] < float("inf") and v["runs"] == 2
        assert v["peak_rss_mb"] > 50 and v["peak_gpu_mb"] is None
        assert v["objects"] > 150  # the crowded sample has 206 nuclei
    ort = report["variants"][1]
    assert ort["net_vs_baseline"] == pytest.approx(ort["net_mpix_s"] / report["variants"][0]["net_mpix_s"])
    shape = report["image"]["shape"]
    assert report["image"]["megapixels"] == pytest.approx(shape[0] * shape[1] / 1e6)
    assert report["image"]["network_tiles"] == 4 and not report["quick"]
    assert report["image"]["e2e_shape"] == shape  # not --quick: end to end on the whole image
    assert report["estimate"]["seconds"] > 0 and "measured here" in report["estimate"]["basis"]
    # FLOPs per tile come from the architecture
    tile_h, tile_w = report["image"]["tile_shape"]
    assert report["model"]["gflop_per_tile"] == pytest.approx(nuclei.spec.config.flops(tile_h, tile_w) / 1e9)


@needs_backends
def test_bench_cli_writes_json_and_chart(tmp_path, samples):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "segstudio.cli", "bench", "--image", str(samples[1][0]),
                           "--backends", "ort", "--repeats", "1", "--warmup", "0", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert [v["name"] for v in report["variants"]] == [BASELINE, "onnxruntime@cpu:fp32"]
    png = out.with_suffix(".png")
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fastest network" in proc.stdout and np.isfinite(report["variants"][1]["net_vs_baseline"])
    # stdout is a pipe here: plain time-stamped lines, the estimate before the first run, one line per variant
    lines = proc.stdout.splitlines()
    estimate = next(i for i, line in enumerate(lines) if "on this machine (measured here" in line)
    steps = [i for i, line in enumerate(lines) if re.match(r"\[\d\d:\d\d:\d\d\] bench \d+/2: ", line)]
    assert len(steps) == 2 and estimate < steps[0]
    assert "baseline run 1/1 took" in lines[steps[0]] and "onnxruntime@cpu:fp32 run 1/1 took" in lines[steps[1]]
    assert "\r" not in proc.stdout and "quick run" not in proc.stdout


# ----------------------------------------------------------------------------- the run's structure, stand-ins


class FakeBackend:
    """Answers at once with zeros of the model's output shape; counts its calls."""

    precision = "fp32"
    device = "cpu"

    def __init__(self, name: str, calls: list, out_channels: int):
        self.variant = self.name = name
        self.calls, self.out_channels = calls, out_channels

    def predict(self, batch, crop=None):
        self.calls.append((self.name, batch.shape[0]))
        out = np.zeros((batch.shape[0], self.out_channels, *batch.shape[2:]), np.float32)
        return out if crop is None else out[(Ellipsis, *crop)]

    def describe(self) -> str:
        return f"stand-in {self.name}"

    def close(self) -> None:
        pass


@pytest.fixture
def fakes(monkeypatch, nuclei):
    """Stand-ins for the baseline, the variants and the GEMM measurement; yields the list of predict calls."""
    import segstudio.core.backends as backends

    calls: list = []
    k = nuclei.spec.config.out_channels

    class FakeEager(FakeBackend):
        def __init__(self, model, device="cpu"):
            super().__init__(BASELINE, calls, k)

    monkeypatch.setattr(benchmark, "EagerTorch", FakeEager)
    # a full collection before every timed round costs about 0.3 s in a process this size: not for stand-ins
    monkeypatch.setattr(benchmark, "gc", SimpleNamespace(collect=lambda: 0))
    monkeypatch.setattr(backends, "create_backend", lambda v, model, **kw: FakeBackend(v, calls, k))
    monkeypatch.setattr(benchmark, "gemm_flops", lambda device, precision, n=2048, repeats=5: {
        "flops": 1e11, "library": "numpy", "all": {"numpy": 1e11}, "device": device, "precision": precision})
    return calls


def _image(tmp_path, size: int):
    import tifffile

    path = tmp_path / f"noise{size}.tif"
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 4096, (size, size), dtype=np.uint16))
    return path


def _drain(job, calls: list):
    """Events, the report, and the predict calls made after the estimate (the timed rounds)."""
    events, mark = [], None
    while True:
        try:
            ev = next(job)
        except StopIteration as stop:
            return events, stop.value, calls[mark:]
        events.append(ev)
        if str(ev.stage) == "estimate":
            mark = len(calls)


def test_progress_per_variant_after_the_estimate(fakes, nuclei, tmp_path):
    events, report, _ = _drain(bench_job(nuclei, _image(tmp_path, 300), ["fake-a", "fake-b"],
                                         BenchOptions(repeats=2, warmup=1, tile=128, batch_size=2)), fakes)
    kinds = [str(e.stage) for e in events]
    assert kinds.count("estimate") == 1
    first_step = next(i for i, e in enumerate(events) if e.stage == "bench" and e.total)
    assert kinds.index("estimate") < first_step  # the estimate comes before the first timed round
    est = events[kinds.index("estimate")]
    assert isinstance(est.event, RunEstimate) and est.info["estimate_s"] > 0 and "measured here" in est.info["basis"]
    assert est.info["steps"] == 3 * 3 and set(est.info["per_variant_s"]) == {BASELINE, "fake-a", "fake-b"}
    steps = events[first_step:]
    assert all(e.stage == "bench" for e in steps)
    # one event per variant per round, round-robin: baseline, a, b; then again
    assert [e.info["variant"] for e in steps] == [BASELINE, "fake-a", "fake-b"] * 3
    assert [e.done for e in steps] == list(range(1, 10)) and {e.total for e in steps} == {9}
    assert [e.info["warmup"] for e in steps] == [True] * 3 + [False] * 6
    assert [e.message for e in steps[3:6]] == [f"{n} run 1/2" for n in (BASELINE, "fake-a", "fake-b")]
    assert all(e.info["eta_s"] is not None and e.info["eta_s"] >= 0 for e in steps) and steps[-1].info["eta_s"] == 0
    assert [v["runs"] for v in report["variants"]] == [2, 2, 2]


def test_quick_runs_fewer_rounds_and_tiles(fakes, nuclei, tmp_path):
    image = _image(tmp_path, 1100)
    # e2e=False: every timed call is the bench's own (one tile, then the network tiles in batches of 4)
    _, full, full_calls = _drain(bench_job(nuclei, image, ["fake"], BenchOptions(tile=256, e2e=False)), fakes)
    fakes.clear()
    events, quick, quick_calls = _drain(bench_job(nuclei, image, ["fake"], BenchOptions(tile=256, e2e=False, quick=True)), fakes)
    tiles = 5 * 5  # 1100 / 256 cores a side
    assert (full["repeats"], full["warmup"], full["image"]["network_tiles"]) == (10, 2, tiles)
    assert (quick["repeats"], quick["warmup"], quick["image"]["network_tiles"]) == (1, 0, QUICK["max_net_tiles"])
    per_round = {"full": 1 + -(-tiles // 4), "quick": 1 + 1}
    for name in (BASELINE, "fake"):
        assert sum(c[0] == name for c in full_calls) == 12 * per_round["full"]
        assert sum(c[0] == name for c in quick_calls) == 1 * per_round["quick"]
    assert [e.info["variant"] for e in events if e.stage == "bench" and e.total] == [BASELINE, "fake"]
    assert quick["quick"] and quick["note"] == QUICK_NOTE and not full["quick"] and full["note"] is None
    assert QUICK_NOTE in [e.message for e in events]  # said before the run, too


def test_quick_end_to_end_on_the_central_region(fakes, nuclei, tmp_path):
    report = run_sync(bench_job(nuclei, _image(tmp_path, 1100), ["fake"], BenchOptions(tile=512, quick=True)))
    assert report["image"]["shape"] == [1100, 1100]
    assert report["image"]["e2e_shape"] == [QUICK["e2e_side"]] * 2
    assert report["image"]["e2e_megapixels"] == pytest.approx(QUICK["e2e_side"] ** 2 / 1e6)
    assert all(v["runs"] == 1 and v["e2e_mpix_s"] > 0 for v in report["variants"])


def test_cli_quick_lines_when_stdout_is_not_a_terminal(fakes, tmp_path, capsys):
    from segstudio.cli import main

    out = tmp_path / "quick.json"
    assert main(["bench", "--image", str(_image(tmp_path, 300)), "--backends", "fake", "--tile", "128", "--quick",
                 "--json", str(out), "--png", str(tmp_path / "quick.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    stamped = [line for line in lines if re.match(r"\[\d\d:\d\d:\d\d\] bench", line)]
    assert stamped[0].endswith(QUICK_NOTE)
    estimate = next(i for i, line in enumerate(lines) if "about" in line and "measured here" in line)
    assert "2 variant(s) x (1 run)" in lines[estimate]
    first = next(i for i, line in enumerate(lines) if " bench 1/2: " in line)
    assert estimate < first and "baseline run 1/1 took" in lines[first]
    assert " bench 2/2: fake run 1/1 took" in lines[first + 1]
    assert lines[-1].startswith("wrote") and QUICK_NOTE in lines  # said again under the table
    report = json.loads(out.read_text())
    assert report["quick"] and report["repeats"] == 1 and report["warmup"] == 0


def test_plain_lines_are_throttled_after_the_first_round(capsys):
    from segstudio.cli import _BenchProgress

    progress = _BenchProgress(quiet=False, tty=False, throttle_s=3600)
    progress(Progress("bench", 0, 0, "measuring GEMM FLOP/s"))
    progress(Progress("estimate", 0, 0, "2 variant(s) x (3 runs); about 1 min on this machine", info={"steps": 6}))
    for step in range(1, 7):
        progress(Progress("bench", step, 6, f"v{(step - 1) % 2} run {(step + 1) // 2}/3",
                          info={"round": (step + 1) // 2, "seconds": 1.0, "eta_s": 10.0 * (6 - step)}))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == [
        "bench: measuring GEMM FLOP/s",
        "bench: 2 variant(s) x (3 runs); about 1 min on this machine",
        "bench 1/6: v0 run 1/3 took 1.0 s, about 50 s left",  # the first round: a line per variant
        "bench 2/6: v1 run 1/3 took 1.0 s, about 40 s left",
        "bench 6/6: v1 run 3/3 took 1.0 s",  # then one every throttle_s seconds, and the last
    ]


def test_quiet_prints_no_progress(capsys):
    from segstudio.cli import _BenchProgress

    progress = _BenchProgress(quiet=True, tty=False)
    progress(Progress("estimate", 0, 0, "about 1 min", info={"steps": 1}))
    progress(Progress("bench", 1, 1, "v run 1/1", info={"round": 1, "seconds": 1.0, "eta_s": 0.0}))
    assert capsys.readouterr().out == ""
