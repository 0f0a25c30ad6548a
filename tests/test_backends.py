"""Backend variants, refusals, auto selection, OOM fallback, provider checks, engine cache."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from segstudio.core.backends import create_backend, installed, parse_variant, runnable_variants
from segstudio.core.backends.engine_cache import (
    EngineCache, EngineKey, Profile, check_engine_file, default_profile, sidecar,
)
from segstudio.core.backends.fallback import OomFallback
from segstudio.core.backends.ort_backend import check_providers
from segstudio.core.errors import (
    BackendUnavailableError, DeviceOutOfMemoryError, IncompatibleArtifactError, InputError,
)


# ------------------------------------------------------------------ variants


def test_variant_grammar_and_defaults():
    v = parse_variant("ort")
    assert (v.name, v.device, v.precision, v.options) == ("onnxruntime", "cpu", "fp32", frozenset())
    v = parse_variant("torch@cuda:fp16+cl+graph")
    assert v.text == "torch@cuda:fp16+cl+graph" and v.on_gpu
    assert parse_variant("trt:int8").text == "tensorrt@cuda:int8"
    assert not parse_variant("openvino").on_gpu


@pytest.mark.parametrize("text,message", [
    ("torch:fp16", "supports fp32, not 'fp16'"),
    ("openvino@cuda", "runs on cpu, not 'cuda'"),
    ("ort+graph", "no option graph"),
    ("tpu", "unknown backend"),
    ("torch@cuda:int4", "not 'int4'"),
])
def test_unsupported_requests_are_refused_not_changed(text, message):
    with pytest.raises(InputError, match=message):
        parse_variant(text)


def test_missing_model_file_for_precision(nuclei):
    with pytest.raises(BackendUnavailableError, match="no onnx_int8 file"):
        create_backend("ort:int8", nuclei)


@pytest.mark.parametrize("variant", ["onnxruntime", "openvino", "torch@cpu"])
def test_cpu_backends_agree(nuclei, variant):
    if not installed({"onnxruntime": "onnxruntime", "openvino": "openvino", "torch@cpu": "torch"}[variant]):
        pytest.skip(f"{variant} is not installed")
    x = np.random.default_rng(0).standard_normal((2, 1, 96, 128)).astype(np.float32)
    with create_backend("onnxruntime", nuclei) as ref, create_backend(variant, nuclei) as b:
        assert b.device == "cpu" and b.precision == "fp32"
        assert "fp32" in b.describe() or "float32" in b.describe()
        np.testing.assert_allclose(b.predict(x), ref.predict(x), atol=2e-3)


def test_openvino_sends_no_telemetry_and_leaves_no_thread():
    """`import openvino` starts a telemetry sender (a thread and a process) unless kept from it."""
    if not installed("openvino"):
        pytest.skip("openvino is not installed")
    code = (
        "import sys, threading, numpy as np\n"
        "from segstudio.core.models.catalog import get_model\n"
        "from segstudio.core.backends import create_backend\n"
        "with create_backend('openvino', get_model('nuclei')) as b:\n"
        "    b.predict(np.zeros((1, 1, 64, 64), np.float32))\n"
        "assert sys.modules['openvino_telemetry'] is None\n"
        "print([t.name for t in threading.enumerate()])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['MainThread']"


def test_auto_measures_once_and_caches(nuclei, tmp_path, monkeypatch):
    from segstudio.core.backends import autoselect

    monkeypatch.setenv("SEGSTUDIO_HOME", str(tmp_path))
    names = runnable_variants(nuclei)
    calls = []
    real = autoselect.measure_variants

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(autoselect, "measure_variants", counting)
    choice = autoselect.auto_variant(nuclei)
    assert choice in names and autoselect.auto_variant(nuclei) == choice
    assert len(calls) == (1 if len(names) > 1 else 0)
    if len(names) > 1:
        cache = json.loads((tmp_path / "autotune.json").read_text())
        (entry,) = cache.values()
        timed = {n: r["seconds"] for n, r in entry["results"].items() if "seconds" in r}
        assert entry["choice"] == min(timed, key=timed.get)
    with create_backend("auto", nuclei) as b:
        assert b.variant == choice


# ------------------------------------------------------------------ OOM fallback


class FakeGpu:
    """Runs the real CPU model but 'runs out of memory' above a pixel budget."""

    def __init__(self, inner, budget):
        self.inner, self.budget, self.calls = inner, budget, []

    def predict(self, batch, crop=None):
        self.calls.append(batch.shape)
        if batch.shape[0] * batch.shape[2] * batch.shape[3] > self.budget:
            raise DeviceOutOfMemoryError("fake OOM")
        return self.inner.predict(batch, crop)

    def describe(self):
        return "fake GPU"

    def close(self):
        pass


def test_oom_halves_batch_then_splits_tile_then_cpu(nuclei):
    with create_backend("onnxruntime", nuclei) as cpu:
        x = np.random.default_rng(1).standard_normal((4, 1, 256, 256)).astype(np.float32)
        ref = cpu.predict(x)
        notes = []
        fake = FakeGpu(cpu, budget=2 * 256 * 256)
        oom = OomFallback(fake, nuclei, notes.append, cpu_factory=lambda: cpu)
        np.testing.assert_allclose(oom(x), ref, atol=1e-4)
        assert oom.max_batch == 2 and "batches of 2" in notes[0]
        # a budget below one tile: split into 4 tiles with the same halo; the core is exact
        notes.clear()
        fake.budget = 200 * 200
        oom = OomFallback(fake, nuclei, notes.append, cpu_factory=lambda: cpu)
        out = oom(x[:1])
        h = nuclei.spec.halo
        np.testing.assert_allclose(out[:, :, h:-h, h:-h], ref[:1, :, h:-h, h:-h], atol=1e-4)
        assert any("cutting it into tiles" in n for n in notes)
        # nothing fits: the CPU takes over, and stays
        notes.clear()
        fake.budget = 0
        oom = OomFallback(fake, nuclei, notes.append, cpu_factory=lambda: cpu)
        out = oom(x)  # split down to the smallest tiles, then the CPU: the kept cores stay exact
        np.testing.assert_allclose(out[:, :, h:-h, h:-h], ref[:, :, h:-h, h:-h], atol=1e-4)
        assert oom.on_cpu and "continuing on the CPU" in notes[-1]
        np.testing.assert_allclose(oom(x), ref, atol=1e-4)  # from then on whole batches run on the CPU


# ------------------------------------------------------------------ ONNX Runtime providers


def test_silent_cpu_fallback_of_onnxruntime_gpu_is_refused():
    with pytest.raises(BackendUnavailableError, match="has no CUDAExecutionProvider"):
        check_providers("CUDAExecutionProvider", ["CPUExecutionProvider"], ["CPUExecutionProvider"])
    with pytest.raises(BackendUnavailableError, match="would run on CPUExecutionProvider"):
        check_providers("CUDAExecutionProvider", ["CPUExecutionProvider"],
                        ["CUDAExecutionProvider", "CPUExecutionProvider"])
    check_providers("CUDAExecutionProvider", ["CUDAExecutionProvider", "CPUExecutionProvider"],
                    ["CUDAExecutionProvider", "CPUExecutionProvider"])


# ------------------------------------------------------------------ TensorRT engine cache


def _key(**changes):
    base = dict(model_sha256="a" * 64, precision="fp16", profile=default_profile(1, 8, (640, 640), 4),
                gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0", tensorrt="10.13.0")
    base.update(changes)
    return EngineKey(**base)


def test_profile_and_key():
    p = default_profile(1, 8, (640, 640), 4)
    assert p.covers((4, 1, 640, 640)) and p.covers((1, 1, 64, 96)) and not p.covers((5, 1, 640, 640))
    assert _key().digest() == _key().digest() != _key(tensorrt="11.0.0").digest()
    assert EngineKey.from_json(json.loads(json.dumps(_key().to_json()))) == _key()


def test_engine_cache_roundtrip_and_foreign_engines_refused(tmp_path):
    cache = EngineCache(tmp_path)
    assert cache.load(_key()) is None
    path = cache.store(_key(), b"engine-bytes", {"built": "test"})
    assert cache.load(_key()) == b"engine-bytes"
    with pytest.raises(IncompatibleArtifactError, match=r"GPU NVIDIA H100 80GB HBM3 \(here: NVIDIA L4\).*rebuild"):
        check_engine_file(path, _key(gpu="NVIDIA L4", compute_capability="8.9"))
    with pytest.raises(IncompatibleArtifactError, match=r"TensorRT 10.13.0 \(here: 11.1.0\)"):
        check_engine_file(path, _key(tensorrt="11.1.0"))
    sidecar(path).unlink()
    with pytest.raises(IncompatibleArtifactError, match="no description"):
        check_engine_file(path, _key())


def test_tensorrt_missing_is_a_clear_error(nuclei):
    if installed("tensorrt"):
        pytest.skip("TensorRT is installed here")
    with pytest.raises(BackendUnavailableError, match="tensorrt is not installed"):
        create_backend("tensorrt:fp16", nuclei)


def test_profile_dataclass_is_hashable():
    assert len({Profile((1, 1, 8, 8), (1, 1, 8, 8), (1, 1, 8, 8))}) == 1


def test_openvino_compiles_once_for_any_number_of_shapes(nuclei, monkeypatch):
    """Images of every size and scale make many input shapes: one dynamic model serves them all.

    (Compiled once per shape, each kept about 100 MB of buffers forever.)
    """
    if not installed("openvino"):
        pytest.skip("openvino is not installed")
    from segstudio.core.backends.openvino_backend import SHAPE_CACHE, OpenVinoBackend

    compiles = []
    b = OpenVinoBackend(nuclei)
    real = b.core.compile_model
    b.core = type("Core", (), {"compile_model": lambda self, *a, **k: compiles.append(1) or real(*a, **k)})()
    assert b.config["CPU_RUNTIME_CACHE_CAPACITY"] == SHAPE_CACHE <= 64  # OpenVINO's own per-shape cache, capped
    rng = np.random.default_rng(0)
    with create_backend("onnxruntime", nuclei) as ref:
        for i in range(50):
            shape = (int(rng.integers(1, 4)), 1, 8 * int(rng.integers(4, 20)), 8 * int(rng.integers(4, 20)))
            x = rng.standard_normal(shape).astype(np.float32)
            crop = (slice(2, shape[2] - 3), slice(1, shape[3]))
            out = b.predict(x, crop)
            assert out.shape == (shape[0], 2, shape[2] - 5, shape[3] - 1) and out.flags.owndata
            if i % 10 == 0:
                np.testing.assert_allclose(out, ref.predict(x, crop), atol=2e-3)
    assert compiles == []  # compiled in __init__, never again
    b.close()
    assert b.predict(x).shape == (shape[0], 2, *shape[2:]) and compiles == [1]  # usable after close


def test_openvino_runs_a_fixed_shape_network_at_its_declared_shape(tmp_path):
    """A network that declares its batch and size (a reshape to constants inside) gets exactly those."""
    if not installed("openvino"):
        pytest.skip("openvino is not installed")
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from segstudio.core.backends.openvino_backend import OpenVinoBackend

    inits = [numpy_helper.from_array(np.full((2, 1, 1, 1), 2.0, np.float32), "w"),
             numpy_helper.from_array(np.array([2, 2 * 4096], np.int64), "flat"),
             numpy_helper.from_array(np.array([2, 2, 64, 64], np.int64), "back")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Reshape", ["c", "flat"], ["f"]),
             helper.make_node("Reshape", ["f", "back"], ["y"])]
    graph = helper.make_graph(nodes, "fixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1, 64, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2, 64, 64])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "fixed.onnx")

    class Fixed:  # the two things a backend reads off a model
        spec = type("Spec", (), {"input_channels": 1})()

        @staticmethod
        def file(fmt):
            return tmp_path / "fixed.onnx"

    b = OpenVinoBackend(Fixed())
    assert b.input_shape == (2, 1, 64, 64) and b.n_batch == 2
    x = np.random.default_rng(0).random((3, 1, 64, 64), dtype=np.float32)
    out = b.predict(x, (slice(0, 60), slice(4, 64)))  # 3 tiles: batches of 2, the last one filled up
    np.testing.assert_allclose(out, 2 * np.repeat(x, 2, axis=1)[:, :, :60, 4:], rtol=1e-6)
    with pytest.raises(IncompatibleArtifactError, match="takes inputs of 64x64 px only, not 72x64"):
        b.predict(np.zeros((1, 1, 72, 64), np.float32))
