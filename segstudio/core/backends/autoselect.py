"""``--backend auto``: measure the variants that can run here, keep the fastest.

The first time a model is used on a machine, every candidate that is
installed (and, for GPU variants, has a GPU) runs the same tile a few times;
the fastest wins.  The choice and the timings are cached in
``~/.segstudio/autotune.json`` keyed by the model file, the machine, the
candidate list and the library versions, so later runs start at once.
Precision is never changed behind the user's back: auto picks among FP32
engines, except for a model that carries an INT8 file (an artifact of
``segstudio optimize``'s quantize step, whose accuracy was measured as
INT8), which runs among the INT8 engines.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from importlib import metadata

import numpy as np

from ..errors import BackendUnavailableError, SegStudioError, log_dir
from ..models.catalog import Model
from ..models.spec import file_sha256

CPU_CANDIDATES = ("openvino@cpu:fp32", "onnxruntime@cpu:fp32", "torch@cpu:fp32")
INT8_CANDIDATES = ("tensorrt@cuda:int8", "onnxruntime@tensorrt:int8", "openvino@cpu:int8", "onnxruntime@cpu:int8")
GPU_CANDIDATES = ("tensorrt@cuda:fp32", "onnxruntime@tensorrt:fp32", "onnxruntime@cuda:fp32",
                  "torch@cuda:fp32+cl+graph")


def cache_path():
    return log_dir().parent / "autotune.json"


def model_precision(model: Model) -> str:
    """The precision ``model`` is meant to run in: int8 when it carries an INT8 file, else fp32."""
    return "int8" if "onnx_int8" in model.files else "fp32"


def candidates(model: Model) -> list[str]:
    """Variants that could run ``model`` here (installed, file present, GPU when needed)."""
    if model_precision(model) == "int8":
        found = _runnable(model, INT8_CANDIDATES)
        if found:
            return found
    return _runnable(model, (*GPU_CANDIDATES, *CPU_CANDIDATES))


def cpu_candidates(model: Model) -> list[str]:
    """The CPU variants among :func:`candidates` (FP32 ones if the model's precision has none)."""
    from .registry import parse_variant

    return [c for c in candidates(model) if not parse_variant(c).on_gpu] or _runnable(model, CPU_CANDIDATES)


def _runnable(model: Model, names) -> list[str]:
    from .registry import backend_class, gpu_available, installed, parse_variant

    out = []
    gpu = None
    for text in names:
        v = parse_variant(text)
        cls = backend_class(v.name)
        if not installed(cls.package) or cls.model_file(v.device, v.precision) not in model.files:
            continue
        if v.on_gpu:
            gpu = gpu_available() if gpu is None else gpu
            if not gpu:
                continue
        out.append(text)
    return out


def _machine() -> str:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count()
    return f"{platform.system()} {platform.machine()} {cpu} x{n}"


def package_versions(packages=("torch", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt")) -> dict[str, str]:
    """Installed versions of ``packages`` (missing ones left out)."""
    out = {}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _key(model: Model, names: list[str], tile_shape: tuple[int, int]) -> str:
    blob = json.dumps({
        "model": {fmt: file_sha256(path) for fmt, path in sorted(model.files.items())},
        "candidates": names, "tile": tile_shape, "machine": _machine(), "versions": package_versions(),
    }, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def measure_variants(model: Model, names: list[str], tile_shape: tuple[int, int], repeats: int = 3) -> dict:
    """Median seconds per tile of each variant (failures recorded as errors)."""
    from .registry import create_variant

    x = np.random.default_rng(0).standard_normal((1, model.spec.input_channels, *tile_shape)).astype(np.float32)
    results = {}
    for name in names:
        try:
            with create_variant(name, model) as backend:
                backend.predict(x)  # warm-up: lazy initialisation, autotuning, graph capture
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    backend.predict(x)
                    times.append(time.perf_counter() - t0)
            results[name] = {"seconds": float(np.median(times))}
        except SegStudioError as e:
            results[name] = {"error": str(e)}
    return results


def auto_variant(model: Model, *, tile: int = 512, batch_size: int = 4) -> str:
    """The fastest variant of ``model``'s precision on this machine (measured once, then cached)."""
    from ..segment.tiling import plan_tiles

    names = candidates(model)
    if not names:
        raise BackendUnavailableError(
            f"no inference backend can run model {model.name!r}",
            hint="install onnxruntime or openvino (pip install segstudio[onnx]) or torch",
        )
    if len(names) == 1:
        return names[0]
    plan = plan_tiles((tile, tile), tile=tile, halo=model.spec.halo, multiple=model.spec.multiple,
                      tile_shape=model.spec.tile_shape(tile, (tile, tile)))
    key = _key(model, names, plan.tile_shape)
    path = cache_path()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(key)
    if entry is None:
        results = measure_variants(model, names, plan.tile_shape)
        timed = {n: r["seconds"] for n, r in results.items() if "seconds" in r}
        if not timed:
            raise BackendUnavailableError(
                "no backend could run the model: " + "; ".join(f"{n}: {r['error']}" for n, r in results.items())
            )
        entry = {"choice": min(timed, key=timed.get), "results": results, "machine": _machine(),
                 "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
        cache[key] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            tmp.replace(path)
        except OSError:
            pass  # a read-only home only costs re-measuring next time
    return entry["choice"]
