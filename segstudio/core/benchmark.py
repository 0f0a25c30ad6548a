"""``segstudio bench``: backends side by side on one image, measured honestly.

All variants run interleaved in one process (round-robin, after warm-up),
so slow drifts of a shared machine hit them alike; every figure is a median
of ``repeats`` runs.  Per variant:

* tile latency p50 / p95 (one tile, batch 1);
* network-only throughput: image megapixels per second of the network pass
  over all tiles (batched as in segmentation);
* end-to-end throughput: from the file on disk to labels (TIFF) and the
  per-cell table, and the seconds of each stage (stages overlap in time;
  their sum can exceed the wall time);
* peak resident memory while the variant ran, peak GPU memory (torch
  allocator) for GPU variants;
* roofline: network FLOP/s (from the model's exact FLOP count) against the
  GEMM FLOP/s of the same device and precision, measured in the same run.

The **baseline** is what a plain script does: PyTorch eager FP32 (no
folding, no fusion) over the same tiles, then scikit-image on the whole
image (watershed, ``regionprops_table``) and ``tifffile.imwrite``, one stage
after the other.
"""

from __future__ import annotations

import gc
import os
import platform
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import SegStudioError
from .jobs import CancelToken, Job, Progress
from .models.catalog import Model
from .tiling import plan_tiles, read_region

BASELINE = "baseline"
BASELINE_TITLE = "baseline: PyTorch eager FP32 + scikit-image, sequential"


# ----------------------------------------------------------------------------- machine peak


def gemm_flops(device: str = "cpu", precision: str = "fp32", n: int = 2048, repeats: int = 5) -> dict:
    """Measured GEMM FLOP/s (median of ``repeats`` n x n products) on ``device``.

    CPU: the best of NumPy's BLAS and PyTorch (when installed), FP32.  CUDA:
    PyTorch matmul in the given precision (``fp32`` strict, ``tf32``,
    ``fp16``, ``bf16``).
    """
    flop = 2.0 * n**3
    results = {}
    if device == "cpu":
        a = np.random.default_rng(0).random((n, n), np.float32)
        b = np.random.default_rng(1).random((n, n), np.float32)
        results["numpy"] = flop / _median_time(lambda: a @ b, repeats)
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None:
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            results["torch"] = flop / _median_time(lambda: ta @ tb, repeats)
    else:
        import torch

        dtype = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        try:
            a = torch.randn(n * 2, n * 2, device="cuda", dtype=dtype)
            b = torch.randn(n * 2, n * 2, device="cuda", dtype=dtype)

            def run():
                for _ in range(10):
                    a @ b
                torch.cuda.synchronize()

            results["torch"] = 10 * 2.0 * (2 * n) ** 3 / _median_time(run, repeats)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
    best = max(results, key=results.get)
    return {"flops": results[best], "library": best, "all": results, "device": device, "precision": precision}


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


# ----------------------------------------------------------------------------- memory sampling


class PeakSampler:
    """Samples this process's resident memory every few milliseconds in a thread."""

    def __init__(self, interval: float = 0.01):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = 0
        self._thread = threading.Thread(target=self._run, name="segstudio-rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self):
        self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


# ----------------------------------------------------------------------------- the baseline


class EagerTorch:
    """The baseline network: the PyTorch module as trained, eager, FP32, CPU or CUDA."""

    name = BASELINE
    precision = "fp32"
    variant = BASELINE

    def __init__(self, model: Model, device: str = "cpu"):
        import torch

        from .models.unet import build_unet

        net = build_unet(model.spec.config)
        net.load_state_dict(torch.load(model.file("torch"), map_location="cpu", weights_only=True))
        self._torch = torch
        self.device = device
        self.net = net.eval().to(device)

    def predict(self, batch: np.ndarray, crop: tuple[slice, slice] | None = None) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            out = self.net(torch.from_numpy(batch).to(self.device)).cpu().numpy()
        return out if crop is None else out[(Ellipsis, *crop)]  # the plain way: crop after the copy

    def describe(self) -> str:
        where = "CPU" if self.device == "cpu" else f"CUDA {self._torch.cuda.get_device_name()}"
        return f"PyTorch {self._torch.__version__} eager, {where}, float32 (baseline)"

    def close(self) -> None:
        pass


def skimage_labels(fg_logit: np.ndarray, dist_logit: np.ndarray, params) -> np.ndarray:
    """The post-processing of :mod:`segstudio.core.postprocess` with scikit-image's watershed.

    The plain way (a heap watershed); the reference the compiled
    hierarchical-queue watershed is checked against (same labels) and timed
    against.
    """
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    from .postprocess import logit, relabel_sequential, remove_small

    mask = fg_logit > logit(params.fg_threshold)
    markers, n = ndi.label(mask & (dist_logit > logit(params.seed_threshold)))
    labels = watershed(-dist_logit, markers, mask=mask)
    orphans, _ = ndi.label(mask & (labels == 0))
    labels = np.where(orphans > 0, orphans + n, labels)
    return relabel_sequential(remove_small(labels, params.min_size))


def baseline_segment(path: Path, model: Model, net: EagerTorch, out: Path, *, tile: int, batch_size: int) -> dict:
    """Segment ``path`` the plain way; returns stage seconds."""
    import tifffile
    from skimage.measure import regionprops_table

    from .jobs import run_sync
    from .measure import write_csv
    from .preprocess import normalize
    from .tiling import predict_tiled

    spec = model.spec
    t = {}
    t0 = time.perf_counter()
    image = tifffile.imread(path)
    t1 = time.perf_counter()
    x = normalize(image[np.newaxis].astype(np.float32), spec.normalization)
    t2 = time.perf_counter()
    logits = run_sync(predict_tiled(x, net.predict, tile=tile, halo=spec.halo, multiple=spec.multiple,
                                    batch_size=batch_size))
    t3 = time.perf_counter()
    labels = skimage_labels(logits[0], logits[1], spec.postprocess)
    t4 = time.perf_counter()
    table = regionprops_table(labels, intensity_image=image, properties=(
        "label", "area", "centroid", "eccentricity", "solidity", "intensity_mean", "intensity_max"))
    t5 = time.perf_counter()
    tifffile.imwrite(out / "baseline_labels.tif", labels, compression="zlib")
    write_csv(out / "baseline_cells.csv", {k: np.asarray(v) for k, v in table.items()})
    t6 = time.perf_counter()
    t.update(read=t1 - t0, normalize=t2 - t1, network=t3 - t2, post=t4 - t3, measure=t5 - t4, write=t6 - t5)
    t["n_objects"] = int(labels.max())
    return t


# ----------------------------------------------------------------------------- the benchmark


@dataclass
class _Runner:
    name: str
    backend: object
    describe: str
    lat: list = field(default_factory=list)
    net: list = field(default_factory=list)
    e2e: list = field(default_factory=list)
    stages: list = field(default_factory=list)
    peak_rss: int = 0
    peak_gpu: int = 0
    n_objects: int = 0
    gpu: bool = False
    precision: str = "fp32"


def _gpu_reset() -> None:
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else 0


def machine_info() -> dict:
    from .backends.autoselect import _machine, package_versions

    info = {"machine": _machine(), "python": platform.python_version(), "versions": package_versions()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return info


def bench_job(
    model: Model,
    image: str | Path,
    variants: list[str],
    *,
    repeats: int = 10,
    warmup: int = 2,
    tile: int = 512,
    batch_size: int = 4,
    e2e: bool = True,
    max_net_tiles: int = 64,
    cancel: CancelToken | None = None,
) -> Job[dict]:
    """Benchmark ``variants`` (plus the baseline) on ``image``; returns the report dict."""
    from .backends import create_backend
    from .jobs import run_sync
    from .preprocess import normalize, sample_percentiles, select_channels
    from .segment import segment_job
    from .sources import open_source

    cancel = cancel or CancelToken()
    image = Path(image)
    spec = model.spec
    with open_source(image) as src:
        h, w = src.plane_shape
        index = src.stack_indices()[0]

        def select(block):
            return select_channels(block, spec.input_channels, None)

        pct = sample_percentiles(lambda y0, y1: src.read(index, (y0, y1), (0, w)), (h, w), spec.normalization, select)
        plan = plan_tiles((h, w), tile=tile, halo=spec.halo, multiple=spec.multiple,
                          tile_shape=spec.tile_shape(tile, (h, w)))
        view_tiles = plan.tiles[:max_net_tiles]
        from .pipeline import _PlaneView

        view = _PlaneView(src, index)
        tiles = [normalize(select(read_region(view, t.read)), spec.normalization, pct) for t in view_tiles]
    net_pixels = sum((t.out[0].stop - t.out[0].start) * (t.out[1].stop - t.out[1].start) for t in view_tiles)
    batches = [np.stack(tiles[i : i + batch_size]) for i in range(0, len(tiles), batch_size)]
    halo = spec.halo
    core_crop = (slice(halo, plan.tile_shape[0] - halo), slice(halo, plan.tile_shape[1] - halo))
    one = tiles[0][np.newaxis]
    tile_flops = spec.config.flops(*plan.tile_shape)

    yield Progress("bench", 0, 0, "measuring GEMM FLOP/s")
    peaks = {("cpu", "fp32"): gemm_flops("cpu", "fp32")}

    runners: list[_Runner] = []
    skipped: dict[str, str] = {}
    use_gpu_baseline = any("cuda" in v or v.startswith(("trt", "tensorrt")) for v in variants)
    try:
        eager = EagerTorch(model, "cuda" if use_gpu_baseline else "cpu")
        runners.append(_Runner(BASELINE, eager, eager.describe(), gpu=use_gpu_baseline))
    except (ImportError, RuntimeError) as e:
        skipped[BASELINE] = f"PyTorch unavailable: {e}"
    for v in variants:
        extra = {"tile_shape": plan.tile_shape, "batch_size": batch_size} if v.startswith(("trt", "tensorrt")) else {}
        try:
            b = create_backend(v, model, **extra)
        except SegStudioError as e:
            skipped[v] = str(e)
            continue
        on_gpu = str(b.device).startswith("cuda")
        runners.append(_Runner(getattr(b, "variant", v), b, b.describe(), gpu=on_gpu, precision=b.precision))
        if on_gpu:
            for p in ("fp32", "tf32", b.precision):
                if ("cuda", p) not in peaks:
                    peaks[("cuda", p)] = gemm_flops("cuda", p)

    total = len(runners) * (warmup + repeats)
    step = 0
    with tempfile.TemporaryDirectory(prefix="segstudio-bench-") as tmp:
        tmp = Path(tmp)
        for r in range(warmup + repeats):
            measured = r >= warmup
            for run in runners:
                cancel.raise_if_cancelled()
                gc.collect()
                _gpu_reset()
                with PeakSampler() as rss:
                    t0 = time.perf_counter()
                    run.backend.predict(one)
                    t1 = time.perf_counter()
                    for b in batches:
                        run.backend.predict(b, core_crop)
                    t2 = time.perf_counter()
                    stages = None
                    if e2e:
                        t3 = time.perf_counter()
                        if run.name == BASELINE:
                            stages = baseline_segment(image, model, run.backend, tmp, tile=tile, batch_size=batch_size)
                            run.n_objects = stages.pop("n_objects")
                        else:
                            with open_source(image) as src:
                                res = run_sync(segment_job(src, model, run.backend, tile=tile, batch_size=batch_size,
                                                           labels_path=tmp / "labels.tif", cancel=cancel))
                            stages = {k: v for k, v in res.timings.items() if k != "wall"}
                            run.n_objects = res.n_objects
                        t4 = time.perf_counter()
                if measured:
                    run.lat.append(t1 - t0)
                    run.net.append(t2 - t1)
                    if stages is not None:
                        run.e2e.append(t4 - t3)
                        run.stages.append(stages)
                    run.peak_rss = max(run.peak_rss, rss.peak)
                    run.peak_gpu = max(run.peak_gpu, _gpu_peak() if run.gpu else 0)
                step += 1
                yield Progress("bench", step, total, f"{run.name} run {r + 1 - warmup if measured else 'warm-up'}")
    for run in runners:
        run.backend.close()

    megapixels = h * w / 1e6
    rows = []
    for run in runners:
        net_s = float(np.median(run.net))
        flops = tile_flops * len(tiles) / net_s
        precision = run.precision
        if run.gpu and precision == "fp32":
            peak_key = ("cuda", "tf32")  # cuDNN runs FP32 convolutions on TF32 tensor cores by default
        else:
            peak_key = ("cuda" if run.gpu else "cpu", precision if run.gpu else "fp32")
        peak = peaks.get(peak_key, peaks[("cpu", "fp32")])
        row = {
            "name": run.name,
            "describe": run.describe,
            "net_mpix_s": net_pixels / 1e6 / net_s,
            "e2e_mpix_s": megapixels / float(np.median(run.e2e)) if run.e2e else None,
            "p50_ms": 1e3 * float(np.percentile(run.lat, 50)),
            "p95_ms": 1e3 * float(np.percentile(run.lat, 95)),
            "peak_rss_mb": run.peak_rss / 2**20,
            "peak_gpu_mb": run.peak_gpu / 2**20 if run.gpu else None,
            "stages": {k: float(np.median([s[k] for s in run.stages])) for k in run.stages[0]} if run.stages else {},
            "roofline": {
                "network_gflop_s": flops / 1e9,
                "gemm_gflop_s": peak["flops"] / 1e9,
                "gemm": f"{peak['device']} {peak['precision']} ({peak['library']})",
                "fraction": flops / peak["flops"],
            },
            "objects": run.n_objects,
            "runs": len(run.net),
        }
        if row["e2e_mpix_s"]:
            row["post_share"] = (row["stages"].get("post", 0) + row["stages"].get("measure", 0)) / float(
                np.median(run.e2e))
        rows.append(row)
    base = next((r for r in rows if r["name"] == BASELINE), None)
    if base is not None:
        for row in rows:
            row["net_vs_baseline"] = row["net_mpix_s"] / base["net_mpix_s"]
            if row["e2e_mpix_s"] and base["e2e_mpix_s"]:
                row["e2e_vs_baseline"] = row["e2e_mpix_s"] / base["e2e_mpix_s"]
    return {
        "variants": rows,
        "baseline": BASELINE if base is not None else None,
        "baseline_is": BASELINE_TITLE,
        "skipped": skipped,
        "image": {"path": str(image), "shape": [h, w], "megapixels": megapixels, "network_tiles": len(tiles),
                  "tile_shape": list(plan.tile_shape), "tile": tile, "batch_size": batch_size},
        "model": {"name": model.name, "version": spec.version, "gflop_per_tile": tile_flops / 1e9},
        "gemm": {f"{d}:{p}": v["flops"] / 1e9 for (d, p), v in peaks.items()},
        "repeats": repeats,
        "warmup": warmup,
        "date": time.strftime("%Y-%m-%d"),
        "host": machine_info(),
        "cpu_count": os.cpu_count(),
    }


def write_chart(report: dict, path: str | Path) -> Path:
    """Bar charts of network and end-to-end throughput and the stage split, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["variants"]
    names = [r["name"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.6 * len(rows) + 2.2))
    y = np.arange(len(rows))
    for ax, key, title in ((axes[0], "net_mpix_s", "network only (Mpx/s)"), (axes[1], "e2e_mpix_s", "end to end (Mpx/s)")):
        vals = [r[key] or 0 for r in rows]
        ax.barh(y, vals, color=["#999999" if n == BASELINE else "#2f7cf6" for n in names])
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title)
    stages = ["read", "normalize", "network", "post", "measure", "write"]
    left = np.zeros(len(rows))
    for stage in stages:
        vals = np.array([r["stages"].get(stage, 0.0) for r in rows])
        axes[2].barh(y, vals, left=left, label=stage)
        left += vals
    axes[2].set_yticks(y, [""] * len(rows))
    axes[2].invert_yaxis()
    axes[2].set_title("stage seconds (overlapping)")
    axes[2].legend(fontsize=7, loc="lower right")
    img = report["image"]
    fig.suptitle(f"{report['model']['name']} on {Path(img['path']).name} ({img['shape'][0]}x{img['shape'][1]}), "
                 f"{report['host']['machine']}, {report['date']}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
