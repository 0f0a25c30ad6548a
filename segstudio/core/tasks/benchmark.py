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

Each variant first makes its warm-up calls (one tile, one timed batch; the
first variant also one end-to-end run); the run's duration is estimated
from them before the timed rounds, and the ETA refined as rounds finish
(:class:`~segstudio.core.optimize.estimate.EtaTracker`).  ``quick``
(:data:`QUICK`) is a rough ranking in a couple of minutes on a 2-core CPU.

The **baseline** is what a plain script does: PyTorch eager FP32 (no
folding, no fusion) over the same tiles, then scikit-image on the whole
image (watershed, ``regionprops_table``) and ``tifffile.imwrite``, one stage
after the other.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..backends.eager import BASELINE, EagerTorch
from ..errors import SegStudioError
from ..jobs import CancelToken, Job, Progress
from ..models.catalog import Model
from ..segment.tiling import plan_tiles, read_region

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


def skimage_labels(fg_logit: np.ndarray, dist_logit: np.ndarray, params) -> np.ndarray:
    """The post-processing of :mod:`segstudio.core.segment.postprocess` with scikit-image's watershed.

    The plain way (a heap watershed); the reference the compiled
    hierarchical-queue watershed is checked against (same labels) and timed
    against.
    """
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    from ..segment.postprocess import logit, relabel_sequential, remove_small

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

    from ..jobs import run_sync
    from ..segment.measure import write_csv
    from ..segment.preprocess import normalize
    from ..segment.tiling import predict_tiled

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


# ----------------------------------------------------------------------------- the bundled test image

MOSAIC_SAMPLE = "6fe2df6de1d9"  # the crowded sample: nuclei over the whole field
MOSAIC_SIZE = 2048


def _mosaic_unit() -> np.ndarray:
    """The crowded sample and its three mirror images, 2 x 2 (float32): the mosaic's repeating unit."""
    from ...sample_data import SAMPLE_DIR
    from ..image.sources import read_image

    tile = read_image(SAMPLE_DIR / f"{MOSAIC_SAMPLE}_img.tif").data.astype(np.float32)
    return np.block([[tile, tile[:, ::-1]], [tile[::-1], tile[::-1, ::-1]]])


def mosaic_rows(height: int, width: int, y0: int, y1: int, unit: np.ndarray | None = None) -> np.ndarray:
    """Rows y0..y1 of an endless mirrored mosaic of the crowded sample, as 12-bit uint16 (``height``: unused)."""
    unit = _mosaic_unit() if unit is None else unit
    uh, uw = unit.shape
    ys = np.arange(y0, y1) % uh
    xs = np.arange(width) % uw
    return (unit[ys][:, xs] * 16 + 100).astype(np.uint16)


def make_mosaic(path: str | Path, size: int = MOSAIC_SIZE, layout: str = "contiguous") -> Path:
    """Write a ``size`` x ``size`` uint16 TIFF of the mirrored mosaic of the crowded sample at ``path``.

    ``layout``: ``"contiguous"`` (one strip, memory-mapped) or ``"tiled"``
    (512 x 512 zlib tiles).  The test image of ``benchmarks/scaling.py``
    and of the Benchmark page.
    """
    import tifffile

    path = Path(path)
    unit = _mosaic_unit()
    if layout == "contiguous":
        out = tifffile.memmap(path, shape=(size, size), dtype=np.uint16)
        for y in range(0, size, 1024):
            out[y : y + 1024] = mosaic_rows(size, size, y, min(y + 1024, size), unit)
        out.flush()
        del out
    elif layout == "tiled":
        def tiles():
            for y in range(0, size, 512):
                band = mosaic_rows(size, size, y, min(y + 512, size), unit)
                for x in range(0, size, 512):
                    yield band[:, x : x + 512]

        tifffile.imwrite(path, data=tiles(), shape=(size, size), dtype=np.uint16, tile=(512, 512),
                         compression="zlib")
    else:
        raise ValueError(f"unknown layout {layout!r} (contiguous or tiled)")
    return path


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
    from ..backends.autoselect import _machine, package_versions

    info = {"machine": _machine(), "python": platform.python_version(), "versions": package_versions()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return info


@contextlib.contextmanager
def _frozen_heap():
    """The objects that exist now are left out of the garbage collections until the end (``gc.freeze``).

    Each timed round starts with a full collection, so that the garbage of the
    round before is not collected during it.  In a large process (the napari
    app: millions of objects) a full collection holds the GIL for about half a
    second, and every other thread, the GUI's included, waits; with the heap
    of before the run frozen it scans only what the run made.
    """
    import gc as collector  # not the module's ``gc`` (tests replace that one with a stand-in)

    collector.freeze()
    try:
        yield
    finally:
        collector.unfreeze()


# Settings of a full run and of ``--quick`` (a rough ranking in a couple of minutes on a 2-core CPU).
FULL = {"repeats": 10, "warmup": 2, "max_net_tiles": 64, "e2e_side": None, "gemm_n": 2048, "gemm_repeats": 5}
QUICK = {"repeats": 1, "warmup": 0, "max_net_tiles": 4, "e2e_side": 1024, "gemm_n": 1024, "gemm_repeats": 3}
QUICK_NOTE = "quick run: numbers are noisier than a full run's (drop --quick for figures to compare or publish)"


def bench_settings(*, quick: bool = False, **given) -> dict:
    """The run's settings: a full run's (or ``--quick``'s), with the ones given (not None) instead."""
    settings = dict(QUICK if quick else FULL)
    settings.update({k: v for k, v in given.items() if v is not None})
    settings["quick"] = quick
    return settings


def describe_settings(s: dict, n_variants: int, shape: tuple[int, int], n_tiles: int,
                      e2e_shape: tuple[int, int] | None) -> str:
    """One line: what the run will do (variants, rounds, tiles, the end-to-end region)."""
    warm = f"{s['warmup']} warm-up + " if s["warmup"] else ""
    e2e = ("no end-to-end runs" if e2e_shape is None else
           f"end to end on the whole {shape[0]}x{shape[1]}" if tuple(e2e_shape) == tuple(shape) else
           f"end to end on the central {e2e_shape[0]}x{e2e_shape[1]} of {shape[0]}x{shape[1]}")
    return (f"{n_variants} variant(s) x ({warm}{s['repeats']} run{'s' if s['repeats'] != 1 else ''}), "
            f"network over {n_tiles} tile(s), {e2e}")


def _central(shape: tuple[int, int], side: int | None) -> tuple[tuple[int, int], tuple[int, int]]:
    """Rows and columns of the central ``side`` x ``side`` region of ``shape`` (the whole plane if None or larger)."""
    out = []
    for n in shape:
        m = n if side is None else min(n, side)
        y0 = (n - m) // 2
        out.append((y0, y0 + m))
    return out[0], out[1]


def _post_seconds_per_pixel(logits: np.ndarray, plane: np.ndarray, spec, baseline: bool) -> float:
    """Seconds per pixel of post-processing and measurement on one tile's output (a warm call, then a timed one)."""
    h, w = logits.shape[-2:]

    def run():
        if baseline:
            from skimage.measure import regionprops_table

            labels = skimage_labels(logits[0], logits[1], spec.postprocess)
            regionprops_table(labels, intensity_image=plane[0], properties=("label", "area", "intensity_mean"))
        else:
            from ..segment.measure import measure
            from ..segment.postprocess import network_instances, relabel_sequential

            labels = relabel_sequential(network_instances(logits, spec)[0])
            measure(labels, plane)

    try:
        run()  # compiled kernels load from their cache on the first call
        t0 = time.perf_counter()
        run()
        return (time.perf_counter() - t0) / (h * w)
    except Exception:  # noqa: BLE001 - an estimate only: a model whose outputs this does not read costs 0 here
        return 0.0


@dataclass(frozen=True)
class BenchOptions:
    """What a benchmark run measures (:func:`bench_job`).

    ``repeats`` measured rounds after ``warmup`` rounds (each round runs
    every variant once: one tile, the network over ``max_net_tiles`` tiles,
    and, with ``e2e``, end to end over the image or its central
    ``e2e_side`` x ``e2e_side``); ``tile`` and ``batch_size`` as for
    segmentation; ``quick``: the :data:`QUICK` settings instead of
    :data:`FULL` for what is not given (one round, one batch of tiles, end
    to end on the central 1024 x 1024).
    """

    repeats: int | None = None
    warmup: int | None = None
    tile: int = 512
    batch_size: int = 4
    e2e: bool = True
    max_net_tiles: int | None = None
    e2e_side: int | None = None
    quick: bool = False

    def settings(self) -> dict:
        """The run's settings: :func:`bench_settings` of what was given."""
        return bench_settings(quick=self.quick, repeats=self.repeats, warmup=self.warmup,
                              max_net_tiles=self.max_net_tiles, e2e_side=self.e2e_side)


def bench_job(model: Model, image: str | Path, variants: list[str], options: BenchOptions | None = None, *,
              cancel: CancelToken | None = None) -> Job[dict]:
    """Benchmark ``variants`` (plus the baseline) on ``image``; returns the report dict.

    Before the rounds each variant makes its warm-up calls (one tile, one
    batch: the batch is timed) and the run's duration is estimated from
    them; a quick run's report says so.

    Yields, in this order: ``bench`` events without a total (setup), one
    ``estimate`` event (``event`` is a
    :class:`~segstudio.core.optimize.estimate.RunEstimate`, ``info`` has
    ``estimate_s``, ``basis``, ``steps`` and ``per_variant_s``), then one
    ``bench`` event per variant per round (``done`` / ``total`` steps;
    ``info``: ``variant``, ``round``, ``rounds``, ``warmup``, ``seconds``,
    ``elapsed_s``, ``eta_s``).
    """
    bench = _Bench(model, Path(image), options or BenchOptions(), cancel or CancelToken())
    bench.read_tiles()
    if bench.cfg["quick"]:
        yield Progress("bench", 0, 0, QUICK_NOTE, info={"quick": True})
    yield Progress("bench", 0, 0, "measuring GEMM FLOP/s")
    bench.peaks[("cpu", "fp32")] = gemm_flops("cpu", "fp32", n=bench.cfg["gemm_n"], repeats=bench.cfg["gemm_repeats"])
    try:
        yield from bench.load(variants)
        with _frozen_heap(), tempfile.TemporaryDirectory(prefix="segstudio-bench-") as tmp:
            bench.tmp = Path(tmp)
            bench.write_region()
            yield from bench.warm_up()
            yield from bench.estimate()
            yield from bench.rounds()
    finally:
        for run in bench.runners:
            run.backend.close()
    return bench.report()


def _on_gpu(variant: str) -> bool:
    """Whether ``variant`` runs on a GPU (False for one that cannot be parsed: it is reported when created)."""
    from ..backends import parse_variant

    try:
        return parse_variant(variant).on_gpu
    except SegStudioError:
        return False


class _Bench:
    """The state and phases of one :func:`bench_job`: tiles, runners, the estimate, the rounds, the report."""

    def __init__(self, model: Model, image: Path, options: BenchOptions, cancel: CancelToken):
        self.model, self.spec, self.image, self.options, self.cancel = model, model.spec, image, options, cancel
        self.cfg = options.settings()
        self.repeats, self.warmup = int(self.cfg["repeats"]), int(self.cfg["warmup"])
        self.runners: list[_Runner] = []
        self.skipped: dict[str, str] = {}
        self.peaks: dict[tuple[str, str], dict] = {}
        self.tmp: Path | None = None

    def read_tiles(self) -> None:
        """The network's tiles (normalized as segmentation does) and the end-to-end region of the first plane."""
        from ..image.sources import open_source
        from ..segment.pipeline import PlaneView
        from ..segment.preprocess import normalize, sample_percentiles, select_channels

        spec, tile, options = self.spec, self.options.tile, self.options

        def select(block):
            return select_channels(block, spec.input_channels, None)

        with open_source(self.image) as src:
            h, w = self.shape = src.plane_shape
            index = src.stack_indices()[0]
            pct = sample_percentiles(lambda y0, y1: src.read(index, (y0, y1), (0, w)), (h, w), spec.normalization,
                                     select)
            self.plan = plan_tiles((h, w), tile=tile, halo=spec.halo, multiple=spec.multiple,
                                   tile_shape=spec.tile_shape(tile, (h, w)))
            view_tiles = self.plan.tiles[: int(self.cfg["max_net_tiles"])]
            view = PlaneView(src, index)
            self.tiles = [normalize(select(read_region(view, t.read)), spec.normalization, pct) for t in view_tiles]
            e2e_rows, e2e_cols = _central((h, w), self.cfg["e2e_side"])
            self.e2e_shape = (e2e_rows[1] - e2e_rows[0], e2e_cols[1] - e2e_cols[0])
            self.region = (None if self.e2e_shape == (h, w) or not options.e2e
                           else src.read(index, e2e_rows, e2e_cols))
        self.net_pixels = sum((t.out[0].stop - t.out[0].start) * (t.out[1].stop - t.out[1].start) for t in view_tiles)
        bs = options.batch_size
        self.batches = [np.stack(self.tiles[i : i + bs]) for i in range(0, len(self.tiles), bs)]
        halo, (th, tw) = spec.halo, self.plan.tile_shape
        self.core_crop = (slice(halo, th - halo), slice(halo, tw - halo))
        self.one = self.tiles[0][np.newaxis]
        self.tile_flops = spec.config.flops(th, tw)
        self.e2e_tiles = len(plan_tiles(self.e2e_shape, tile=tile, halo=spec.halo, multiple=spec.multiple,
                                        tile_shape=spec.tile_shape(tile, self.e2e_shape)).tiles)

    def load(self, variants: list[str]) -> Job[None]:
        """The baseline and each variant's backend (a variant that cannot run here is skipped, with the reason)."""
        from ..backends import create_backend

        use_gpu_baseline = any(_on_gpu(v) for v in variants)
        yield Progress("bench", 0, 0, f"loading {BASELINE}")
        try:
            eager = EagerTorch(self.model, "cuda" if use_gpu_baseline else "cpu")
            self.runners.append(_Runner(BASELINE, eager, eager.describe(), gpu=use_gpu_baseline))
        except (ImportError, RuntimeError) as e:
            self.skipped[BASELINE] = f"PyTorch unavailable: {e}"
        for v in variants:
            self.cancel.raise_if_cancelled()
            yield Progress("bench", 0, 0, f"loading {v}")
            try:  # a fixed-shape engine (TensorRT) is built for this tile and batch
                b = create_backend(v, self.model, tile=self.options.tile, batch_size=self.options.batch_size)
            except SegStudioError as e:
                self.skipped[v] = str(e)
                continue
            on_gpu = str(b.device).startswith("cuda")
            self.runners.append(_Runner(getattr(b, "variant", v), b, b.describe(), gpu=on_gpu, precision=b.precision))
            if on_gpu:
                for p in ("fp32", "tf32", b.precision):
                    if ("cuda", p) not in self.peaks:
                        self.peaks[("cuda", p)] = gemm_flops("cuda", p, n=self.cfg["gemm_n"],
                                                             repeats=self.cfg["gemm_repeats"])

    def write_region(self) -> None:
        """The end-to-end image: the file itself, or its central region written to a temporary TIFF."""
        self.e2e_image = self.image
        if self.region is not None:
            import tifffile

            self.e2e_image = self.tmp / "region.tif"
            if self.region.shape[0] == 1:
                tifffile.imwrite(self.e2e_image, self.region[0])
            else:
                tifffile.imwrite(self.e2e_image, self.region, photometric="minisblack", metadata={"axes": "CYX"})

    def end_to_end(self, run: _Runner) -> dict:
        """Stage seconds of one end-to-end run of ``run`` on the e2e image (and its object count)."""
        from ..image.sources import open_source
        from ..jobs import run_sync
        from ..segment.job import segment_job
        from ..segment.options import SegmentOptions

        tile, batch_size = self.options.tile, self.options.batch_size
        if run.name == BASELINE:
            stages = baseline_segment(self.e2e_image, self.model, run.backend, self.tmp, tile=tile,
                                      batch_size=batch_size)
            run.n_objects = stages.pop("n_objects")
            return stages
        with open_source(self.e2e_image) as src:
            res = run_sync(segment_job(src, self.model, run.backend, SegmentOptions(tile=tile, batch_size=batch_size),
                                       labels_path=self.tmp / "labels.tif", cancel=self.cancel))
        run.n_objects = res.n_objects
        return {k: v for k, v in res.timings.items() if k != "wall"}

    def warm_up(self) -> Job[None]:
        """Warm-up calls per variant (one tile, then one batch: timed) and post-processing of one tile's output."""
        yield Progress("bench", 0, 0, f"warm-up calls: one tile and one batch of {len(self.batches[0])} per variant")
        self.batch_s: dict[str, float] = {}
        self.post_px_s: dict[bool, float] = {}
        for run in self.runners:
            self.cancel.raise_if_cancelled()
            run.backend.predict(self.one)
            t0 = time.perf_counter()
            out = run.backend.predict(self.batches[0], self.core_crop)
            self.batch_s[run.name] = time.perf_counter() - t0
            kind = run.name == BASELINE
            if self.options.e2e and kind not in self.post_px_s:
                plane = self.batches[0][0][(Ellipsis, *self.core_crop)]
                self.post_px_s[kind] = _post_seconds_per_pixel(np.asarray(out[0], np.float32), plane, self.spec, kind)
        self.per_tile = {name: t / len(self.batches[0]) for name, t in self.batch_s.items()}

    def _e2e_model_s(self, run: _Runner) -> float:
        e2e_px = self.e2e_shape[0] * self.e2e_shape[1]
        return self.per_tile[run.name] * self.e2e_tiles + self.post_px_s.get(run.name == BASELINE, 0.0) * e2e_px

    def estimate(self) -> Job[None]:
        """The run's duration from the warm-up calls and one end-to-end run of the first variant."""
        from ..optimize.estimate import EtaTracker, RunEstimate, format_seconds

        e2e, runners, n_batch = self.options.e2e, self.runners, len(self.batches[0])
        # segment_job does more per image than the tiles (a first look at the image, threads): one run says how much
        e2e_factor, e2e_probe = 1.0, None
        first = next((run for run in runners if run.name != BASELINE), None)
        if e2e and first is not None:
            self.cancel.raise_if_cancelled()
            yield Progress("bench", 0, 0, f"warm-up: one end-to-end run of {first.name}")
            t0 = time.perf_counter()
            self.end_to_end(first)
            e2e_probe = (first.name, time.perf_counter() - t0)
            e2e_factor = min(20.0, max(0.5, e2e_probe[1] / max(self._e2e_model_s(first), 1e-6)))
        round_s = {}
        for run in runners:
            t = self.per_tile[run.name] * (1 + len(self.tiles))
            if e2e:
                t += self._e2e_model_s(run) * (1.0 if run.name == BASELINE else e2e_factor)
            round_s[run.name] = t
        per_step = [round_s[run.name] for _ in range(self.warmup + self.repeats) for run in runners]
        basis = (f"measured here: one batch of {n_batch} tile(s) per variant ("
                 + ", ".join(f"{name} {t:.2f} s" for name, t in self.batch_s.items()) + ")"
                 + (f", one end-to-end run of {e2e_probe[0]} ({e2e_probe[1]:.1f} s)" if e2e_probe else "")
                 + (", post-processing of one tile" if e2e else "")
                 + f"; {self.warmup + self.repeats} round(s) of {len(self.tiles) + 1} tile(s)"
                 + (" and one end-to-end run" if e2e else "") + " per variant")
        self.run_estimate = estimate = RunEstimate(total_s=float(sum(per_step)),
                                                   per_step_s=tuple(float(x) for x in per_step), measure_s=0.0,
                                                   basis=basis)
        settings = describe_settings(self.cfg, len(runners), self.shape, len(self.tiles),
                                     self.e2e_shape if e2e else None)
        yield Progress("estimate", 0, 0, f"{settings}; {estimate.describe()}", event=estimate,
                       info={"estimate_s": estimate.total_s, "basis": basis, "steps": len(per_step),
                             "per_variant_s": round_s, "settings": settings,
                             "text": format_seconds(estimate.total_s)})
        self.eta = EtaTracker(estimate, len(per_step))

    def _round(self, run: _Runner, measured: bool) -> None:
        """One round of one variant: a tile, the network over the tiles, one end-to-end run."""
        gc.collect()
        _gpu_reset()
        with PeakSampler() as rss:
            t0 = time.perf_counter()
            run.backend.predict(self.one)
            t1 = time.perf_counter()
            for b in self.batches:
                run.backend.predict(b, self.core_crop)
            t2 = time.perf_counter()
            stages = None
            if self.options.e2e:
                t3 = time.perf_counter()
                stages = self.end_to_end(run)
                t4 = time.perf_counter()
        if measured:
            run.lat.append(t1 - t0)
            run.net.append(t2 - t1)
            if stages is not None:
                run.e2e.append(t4 - t3)
                run.stages.append(stages)
            run.peak_rss = max(run.peak_rss, rss.peak)
            run.peak_gpu = max(run.peak_gpu, _gpu_peak() if run.gpu else 0)

    def rounds(self) -> Job[None]:
        """The warm-up and measured rounds, every variant once per round, with progress and time left."""
        eta, rounds, warmup = self.eta, self.warmup + self.repeats, self.warmup
        total = eta.steps
        step = 0
        for r in range(rounds):
            measured = r >= warmup
            for run in self.runners:
                self.cancel.raise_if_cancelled()
                eta.start(step)
                self._round(run, measured)
                eta.finish(step)
                step += 1
                _, _, fraction, left = eta.etas()
                label = f"run {r + 1 - warmup}/{self.repeats}" if measured else f"warm-up {r + 1}/{warmup}"
                yield Progress("bench", step, total, f"{run.name} {label}",
                               info={"variant": run.name, "round": r + 1, "rounds": rounds, "warmup": not measured,
                                     "seconds": eta.actual[step - 1], "elapsed_s": time.perf_counter() - eta.t0,
                                     "eta_s": left if step < total else 0.0, "fraction": fraction})

    def _row(self, run: _Runner) -> dict:
        """The report's row of one variant: throughput, latency, memory, stages, roofline."""
        net_s = float(np.median(run.net))
        flops = self.tile_flops * len(self.tiles) / net_s
        if run.gpu and run.precision == "fp32":
            peak_key = ("cuda", "tf32")  # cuDNN runs FP32 convolutions on TF32 tensor cores by default
        else:
            peak_key = ("cuda" if run.gpu else "cpu", run.precision if run.gpu else "fp32")
        peak = self.peaks.get(peak_key, self.peaks[("cpu", "fp32")])
        e2e_megapixels = self.e2e_shape[0] * self.e2e_shape[1] / 1e6
        row = {
            "name": run.name,
            "describe": run.describe,
            "net_mpix_s": self.net_pixels / 1e6 / net_s,
            "e2e_mpix_s": e2e_megapixels / float(np.median(run.e2e)) if run.e2e else None,
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
        return row

    def report(self) -> dict:
        """The report: a row per variant (with ratios to the baseline), the image, the model, the settings."""
        rows = [self._row(run) for run in self.runners]
        base = next((r for r in rows if r["name"] == BASELINE), None)
        if base is not None:
            for row in rows:
                row["net_vs_baseline"] = row["net_mpix_s"] / base["net_mpix_s"]
                if row["e2e_mpix_s"] and base["e2e_mpix_s"]:
                    row["e2e_vs_baseline"] = row["e2e_mpix_s"] / base["e2e_mpix_s"]
        (h, w), e2e, options = self.shape, self.options.e2e, self.options
        return {
            "variants": rows,
            "baseline": BASELINE if base is not None else None,
            "baseline_is": BASELINE_TITLE,
            "skipped": self.skipped,
            "image": {"path": str(self.image), "shape": [h, w], "megapixels": h * w / 1e6,
                      "network_tiles": len(self.tiles), "tile_shape": list(self.plan.tile_shape), "tile": options.tile,
                      "batch_size": options.batch_size, "e2e_shape": list(self.e2e_shape) if e2e else None,
                      "e2e_megapixels": self.e2e_shape[0] * self.e2e_shape[1] / 1e6 if e2e else None},
            "model": {"name": self.model.name, "version": self.spec.version, "gflop_per_tile": self.tile_flops / 1e9},
            "gemm": {f"{d}:{p}": v["flops"] / 1e9 for (d, p), v in self.peaks.items()},
            "repeats": self.repeats,
            "warmup": self.warmup,
            "quick": bool(self.cfg["quick"]),
            "note": QUICK_NOTE if self.cfg["quick"] else None,
            "estimate": {"seconds": self.run_estimate.total_s, "basis": self.run_estimate.basis,
                         "actual_s": float(sum(self.eta.actual.values()))},
            "date": time.strftime("%Y-%m-%d"),
            "host": machine_info(),
            "cpu_count": os.cpu_count(),
        }


def write_chart(report: dict, path: str | Path) -> Path:
    """Bar charts of network and end-to-end throughput and the stage split, as a PNG.

    Drawn on a bare :class:`matplotlib.figure.Figure` (its own Agg canvas):
    no pyplot, so no backend is chosen for the process (napari's included).
    """
    from matplotlib.figure import Figure

    rows = report["variants"]
    names = [r["name"] for r in rows]
    fig = Figure(figsize=(15, 0.6 * len(rows) + 2.2))
    axes = fig.subplots(1, 3)
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
    return path


def write_plane(image, path: Path) -> tuple[int, int]:
    """Write the first plane of ``image`` (an :class:`~segstudio.core.image.io.ImageData`, all its channels) as a TIFF; its (Y, X)."""
    import tifffile

    _, plane = next(image.planes())
    if plane.shape[0] == 1:
        tifffile.imwrite(path, plane[0])
    else:
        tifffile.imwrite(path, plane, photometric="minisblack", metadata={"axes": "CYX"})
    return plane.shape[-2], plane.shape[-1]


def bench_image_job(model: Model, variants: list[str], image=None, options: BenchOptions | None = None, *,
                    cancel: CancelToken | None = None) -> Job[dict]:
    """:func:`bench_job` on an image in memory (an :class:`~segstudio.core.image.io.ImageData`; its first plane), written
    to a temporary TIFF because the benchmark reads a file.

    ``image`` None: the bundled mosaic.  The report's ``image`` says where
    the pixels came from (``source``): the temporary file is gone afterwards.
    """
    with tempfile.TemporaryDirectory(prefix="segstudio-bench-image-") as tmp:
        if image is None:
            path = Path(tmp) / f"mosaic{MOSAIC_SIZE}.tif"
            yield Progress("bench", 0, 0, f"making the {MOSAIC_SIZE}x{MOSAIC_SIZE} mosaic of the crowded sample")
            make_mosaic(path, MOSAIC_SIZE)
            source = f"the bundled {MOSAIC_SIZE}x{MOSAIC_SIZE} mosaic of the crowded sample"
        else:
            path = Path(tmp) / "image.tif"
            yield Progress("bench", 0, 0, f"writing {image.name} to a temporary TIFF")
            write_plane(image, path)
            first = " (its first plane)" if image.stack_shape else ""
            source = f"the image layer {image.name!r}{first}"
        if cancel is not None:
            cancel.raise_if_cancelled()
        report = yield from bench_job(model, path, variants, options, cancel=cancel)
    report["image"].update(path=path.name, source=source)
    report["command"] = None
    return report
