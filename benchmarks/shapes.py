"""Input shapes: OpenVINO's dynamic model vs compiled-per-shape (LRU) vs padded tiles; ONNX Runtime's CPU arena.

    python benchmarks/shapes.py [--n 60] [--model nuclei] [--lru 4] [--parts openvino,steady,ort]

Images of every size, resampled by every scale factor, give the network
many input shapes.  ``openvino``: three ways to keep memory bounded, run on
the same images in one process, interleaved image by image (the order of
the strategies rotates), on OpenVINO FP32, one tile per inference:

``dynamic``
    what ``segstudio`` ships (:class:`OpenVinoBackend`): compiled once with
    dynamic batch / height / width;
``lru``
    compiled once per input shape, the ``--lru`` most recently used kept;
``padded``
    every tile padded (bottom and right, mirrored pixels) up to the next
    multiple of 64 px beyond 256 (256, 320, ... a few canonical shapes),
    compiled once per canonical shape (same LRU), the output cropped back.

Reported per strategy: end-to-end seconds over the folder (``segment_job``
from the image in memory to labels and the per-cell table), network
milliseconds per tile (compiles included), compiles, distinct shapes, and
whether the labels equal the dynamic model's.  The folder is
``benchmarks/memory.py``'s (DSB2018 train + val, rotated / cropped /
rescaled).  Memory is not compared in this process: a compiled shape holds
its activation buffers (about 210 MB for a 640 px tile of the default
model), so an LRU of k shapes holds k times that, the dynamic model once.

``steady``: milliseconds per tile once compiled, a model compiled for that
one shape against the dynamic model (interleaved, another shape in between).

``ort``: ONNX Runtime's CPU memory over ``--n`` mixed input shapes, a fresh
process per setting (its defaults; what segstudio ships: without memory
patterns; without the arena; the arena shrunk after each run of a new
shape), and the speed of each (interleaved).

Writes ``benchmarks/results/shapes-<machine>-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from memory import make_folder

from segstudio.core.backends.openvino_backend import OpenVinoBackend
from segstudio.core.image.sources import read_image
from segstudio.core.jobs import run_sync
from segstudio.core.models.catalog import get_model
from segstudio.core.segment.job import segment_job
from segstudio.core.tasks.benchmark import machine_info

CANONICAL_STEP = 64
CANONICAL_MIN = 256


class Counting(OpenVinoBackend):
    """The shipped backend, counting tiles and network seconds."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.tiles, self.net_s, self.compiles = 0, 0.0, 1

    def predict(self, batch, crop=None):
        t0 = time.perf_counter()
        out = super().predict(batch, crop)
        self.net_s += time.perf_counter() - t0
        self.tiles += batch.shape[0]
        return out


class PerShapeLru(Counting):
    """Compiled once per input shape, at most ``lru`` kept (least recently used dropped)."""

    def __init__(self, *a, lru: int = 4, **kw):
        super().__init__(*a, **kw)
        self.lru, self.compiles = lru, 0
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self.seen: set[tuple] = set()
        self._request = None  # the dynamic model is not used

    def _infer(self, x: np.ndarray) -> np.ndarray:
        key = x.shape
        self.seen.add(key)
        req = self._cache.pop(key, None)
        if req is None:
            m = self.model.clone()
            m.reshape({m.inputs[0]: list(key)})
            req = self.core.compile_model(m, "CPU", self.config).create_infer_request()
            self.compiles += 1
        self._cache[key] = req
        while len(self._cache) > self.lru:
            self._cache.popitem(last=False)
        req.infer({0: x})
        return np.array(req.get_output_tensor(0).data, copy=True)

    def predict(self, batch, crop=None):
        t0 = time.perf_counter()
        batch = self.check_batch(batch, self.channels)
        out = np.concatenate([self._infer(batch[i : i + 1]) for i in range(len(batch))])
        self.net_s += time.perf_counter() - t0
        self.tiles += batch.shape[0]
        return self.cropped(out, crop)


class Padded(PerShapeLru):
    """Tiles padded up to canonical shapes (mirrored pixels, bottom / right), output cropped back."""

    def _infer(self, x: np.ndarray) -> np.ndarray:
        h, w = x.shape[-2:]
        ch, cw = (max(CANONICAL_MIN, -(-n // CANONICAL_STEP) * CANONICAL_STEP) for n in (h, w))
        if (ch, cw) != (h, w):
            x = np.pad(x, ((0, 0), (0, 0), (0, ch - h), (0, cw - w)), mode="symmetric")
        return super()._infer(np.ascontiguousarray(x))[..., :h, :w]


def steady(model, reps: int) -> dict:
    """Milliseconds per tile once compiled: a model compiled for the one shape vs the dynamic model, interleaved."""
    dyn = OpenVinoBackend(model)
    rng = np.random.default_rng(0)
    out = {}
    for shape in [(1, 1, 640, 640), (1, 1, 648, 648), (1, 1, 384, 456)]:
        static = PerShapeLru(model, lru=1)
        x = rng.random(shape, dtype=np.float32)
        other = rng.random((1, 1, 392, 512), dtype=np.float32)
        for f in (static.predict, dyn.predict):
            f(x)
        times = {"static": [], "dynamic": []}
        for _ in range(reps):
            dyn.predict(other)  # another shape in between, as between images of a batch
            for name, f in (("static", static.predict), ("dynamic", dyn.predict)):
                t0 = time.perf_counter()
                f(x)
                times[name].append(time.perf_counter() - t0)
        out["x".join(map(str, shape))] = {k: round(1e3 * float(np.median(v)), 1) for k, v in times.items()}
        print("steady", shape, out["x".join(map(str, shape))], flush=True)
    return out


# ONNX Runtime's defaults; what segstudio ships: without memory patterns (one block planned per input
# shape); without the arena (plain malloc); the arena shrunk after each run of a new input shape
ORT_SETTINGS = ("default", "shipped", "no_arena", "shrink_on_new_shape")


def _ort_backend(model, setting: str):
    """ONNX Runtime on the CPU as segstudio creates it, with the CPU memory ``setting`` instead of its own."""
    from segstudio.core.backends.ort_backend import OrtBackend

    if setting == "shipped":
        return OrtBackend(model)

    class Variant(OrtBackend):
        last_shape = None

        @staticmethod
        def _bound_memory(ort, opts, device):
            opts.enable_cpu_mem_arena = setting != "no_arena"

        def predict(self, batch, crop=None):
            if setting != "shrink_on_new_shape":
                return super().predict(batch, crop)
            run = None
            if batch.shape != self.last_shape:
                run = self._ort.RunOptions()
                run.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
            self.last_shape = batch.shape
            out = self.session.run(None, {self.input_name: self.check_batch(batch, self.channels)}, run)[0]
            return self.cropped(out, crop)

    return Variant(model)


def _ort_shapes(n: int) -> list[tuple[int, int, int, int]]:
    rng = np.random.default_rng(2)
    return [(int(rng.integers(1, 5)), 1, 8 * int(rng.integers(30, 82)), 8 * int(rng.integers(30, 82))) for _ in range(n)]


def ort_child(model_name: str, setting: str, n: int) -> None:
    """One setting in a fresh process: RSS (MB) after every 10 of ``n`` mixed shapes, printed as JSON."""
    import psutil

    b = _ort_backend(get_model(model_name), setting)
    proc = psutil.Process()
    rss = []
    rng = np.random.default_rng(3)
    for i, shape in enumerate(_ort_shapes(n)):
        b.predict(rng.random(shape, dtype=np.float32))
        if i % 10 == 9:
            rss.append(round(proc.memory_info().rss / 2**20))
    print(json.dumps(rss))


def ort_arena(model, n: int, reps: int) -> dict:
    """ONNX Runtime's CPU memory over ``n`` mixed shapes (a process per setting) and its speed (interleaved)."""
    import subprocess

    out: dict = {"shapes": n, "memory_mb_every_10_shapes": {}, "seconds": {}}
    for setting in ORT_SETTINGS:
        proc = subprocess.run([sys.executable, __file__, "--ort-child", setting, "--model", model.name, "--n", str(n)],
                              capture_output=True, text=True, check=True)
        out["memory_mb_every_10_shapes"][setting] = json.loads(proc.stdout.strip().splitlines()[-1])
        print("ort memory", setting, out["memory_mb_every_10_shapes"][setting], flush=True)
    backends = {k: _ort_backend(model, k) for k in ORT_SETTINGS}
    rng = np.random.default_rng(4)
    # what a run sends: batches of one tile shape, and now and then an image of its own size
    work = [rng.random((4, 1, 640, 640), dtype=np.float32)] * 6 + [rng.random(s, dtype=np.float32) for s in _ort_shapes(2)]
    for b in backends.values():
        for x in work:
            b.predict(x)
    times = {k: [] for k in backends}
    for r in range(reps):
        k = r % len(backends)
        order = list(backends)[k:] + list(backends)[:k]
        for k in order:
            t0 = time.perf_counter()
            for x in work:
                backends[k].predict(x)
            times[k].append(time.perf_counter() - t0)
    out["seconds"] = {k: {"median": round(float(np.median(v)), 3), "min": round(float(min(v)), 3)}
                      for k, v in times.items()}
    out["work"] = "6 batches of 4 x 640^2 and 2 mixed shapes per repeat"
    print("ort speed", out["seconds"], flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--model", default="nuclei")
    ap.add_argument("--lru", type=int, default=4)
    ap.add_argument("--parts", default="openvino,steady,ort", help="which comparisons to run")
    ap.add_argument("--reps", type=int, default=10, help="repeats of the steady-state and ONNX Runtime timings")
    ap.add_argument("--ort-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.ort_child:
        ort_child(args.model, args.ort_child, args.n)
        return 0
    model = get_model(args.model)
    parts = args.parts.split(",")
    report = {"what": "input-shape strategies (OpenVINO) and CPU memory settings (ONNX Runtime), interleaved",
              "command": "python benchmarks/shapes.py " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine_info(),
              "model": f"{model.name} v{model.spec.version}"}
    if "openvino" in parts:
        report["openvino"] = openvino_strategies(model, args.n, args.lru)
    if "steady" in parts:
        report["openvino_steady_ms_per_tile"] = steady(model, args.reps)
    if "ort" in parts:
        report["onnxruntime_cpu_memory"] = ort_arena(model, args.n, args.reps)
    out = args.json or ROOT / "benchmarks" / "results" / f"shapes-{platform.machine().lower()}-{time.strftime('%Y-%m-%d')}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def openvino_strategies(model, n: int, lru: int) -> dict:
    """The three strategies over ``n`` mixed images, interleaved image by image."""
    makers = {"dynamic": lambda: Counting(model),
              "lru": lambda: PerShapeLru(model, lru=lru),
              "padded": lambda: Padded(model, lru=lru)}
    backends = {k: f() for k, f in makers.items()}
    names = list(backends)
    seconds = dict.fromkeys(names, 0.0)
    same_as_dynamic = {"padded": 0, "lru": 0}
    with tempfile.TemporaryDirectory(prefix="segstudio-shapes-") as tmp:
        records = make_folder(Path(tmp), n, seed=1)
        images = [read_image(Path(tmp) / r["file"]) for r in records]
    pixels = sum(int(np.prod(im.data.shape[-2:])) for im in images)
    for b in backends.values():  # warm: kernels, numba caches
        run_sync(segment_job(images[0], model, b))
    for b in backends.values():
        b.tiles, b.net_s = 0, 0.0
        b.compiles = 1 if isinstance(b, Counting) and not isinstance(b, PerShapeLru) else 0
    for i, image in enumerate(images):
        order = names[i % len(names):] + names[: i % len(names)]
        labels = {}
        for name in order:
            t0 = time.perf_counter()
            result = run_sync(segment_job(image, model, backends[name]))
            seconds[name] += time.perf_counter() - t0
            labels[name] = result.labels
        for name in same_as_dynamic:
            same_as_dynamic[name] += int(np.array_equal(labels[name], labels["dynamic"]))
        print(f"{i + 1}/{len(images)} {image.data.shape}: "
              + ", ".join(f"{name} {seconds[name]:.1f} s" for name in names), flush=True)
    rows = {}
    for name, b in backends.items():
        rows[name] = {"end_to_end_s": round(seconds[name], 2), "tiles": b.tiles,
                      "network_ms_per_tile": round(1e3 * b.net_s / max(1, b.tiles), 1),
                      "network_s": round(b.net_s, 2), "compiles": b.compiles,
                      "distinct_shapes": len(getattr(b, "seen", ())) or None,
                      "e2e_vs_dynamic": round(seconds[name] / seconds["dynamic"], 3)}
    for name, k in same_as_dynamic.items():
        rows[name]["labels_equal_to_dynamic"] = f"{k}/{len(images)}"
    print(json.dumps(rows, indent=1))
    return {"images": len(images), "megapixels": round(pixels / 1e6, 2), "lru": lru,
            "canonical": f"multiples of {CANONICAL_STEP} px, at least {CANONICAL_MIN}", "strategies": rows}


if __name__ == "__main__":
    sys.exit(main())
