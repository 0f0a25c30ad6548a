"""`segstudio bench`: the report has every field, figures are consistent, the chart is written.

Speed targets are checked by running the benchmark (benchmarks/), never here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from segstudio.core.backends import installed
from segstudio.core.benchmark import BASELINE, bench_job, gemm_flops
from segstudio.core.jobs import run_sync

pytestmark = pytest.mark.skipif(not (installed("torch") and installed("onnxruntime")), reason="needs torch and ORT")


def test_gemm_flops_is_plausible():
    g = gemm_flops("cpu", "fp32", n=512, repeats=2)
    assert 1e9 < g["flops"] < 1e14 and g["library"] in g["all"]


def test_bench_report(nuclei, samples):
    report = run_sync(bench_job(nuclei, samples[-1][0], ["ort", "tpu:fp32", "ort:int8"], repeats=2, warmup=1,
                                tile=256, batch_size=2))
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
    # FLOPs per tile come from the architecture
    tile_h, tile_w = report["image"]["tile_shape"]
    assert report["model"]["gflop_per_tile"] == pytest.approx(nuclei.spec.config.flops(tile_h, tile_w) / 1e9)


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
