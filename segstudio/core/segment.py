"""Image -> instance labels + per-cell table, as a job.

For every YX plane of the image (Z and T stacks are segmented plane by
plane): pick the model's channels, normalize them with percentiles of the
whole plane (sampled when the plane is large), then stream the plane through
the stage pipeline of :mod:`segstudio.core.pipeline` (read, normalize,
network, post-process, measure and write overlap, memory bounded by the
tile size).  Labels go to a sink: an array in memory (default) or a tiled
TIFF on disk (``labels_path``), so images of any size can be segmented.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import metrics
from .backends import CPU_BATCH, GPU_BATCH, Backend
from .errors import IncompatibleArtifactError, InputError
from .io import ImageData
from .jobs import CancelToken, Job, Progress
from .measure import Table, concat_tables
from .models.catalog import Model
from .pipeline import STAGES, StageClock, segment_plane_job
from .preprocess import background_nonfinite, normalize, sample_percentiles, select_channels
from .scale import GridScaling, diameter_from_microns, estimate_diameter, scale_factor
from .sinks import ArraySink, TiffSink
from .sources import ImageSource, planes_as_channels, source_from_image

DEFAULT_CONTEXT = 64


@dataclass
class SegmentationResult:
    """Labels (in memory, or the path of the labels TIFF), per-cell table and timings.

    ``labels`` is shaped like the image's stack + ``(Y, X)``; ``timings``
    holds seconds per stage (summed over threads) and ``wall`` seconds.
    """

    labels: np.ndarray | None
    table: Table
    timings: dict[str, float] = field(default_factory=dict)
    model: str = ""
    backend: str = ""
    name: str = ""
    pixel_size: tuple[float, float] | None = None
    labels_path: Path | None = None
    n_objects: int = 0
    notices: list[str] = field(default_factory=list)  # what the user should know about the run, in order
    warnings: list[str] = field(default_factory=list)  # the notices that say the input had a problem
    diameter: float | None = None  # nuclei diameter in image pixels (given or estimated)
    scale: float = 1.0  # the image was resampled by this factor for the network

    @property
    def n_cells(self) -> int:
        return self.n_objects


def on_gpu(backend: Backend) -> bool:
    return str(getattr(backend, "device", "cpu")).startswith("cuda")


CPU_WARM_TILE = 128  # px: the tile a CPU backend warms up on (one, not a batch)


def default_batch_size(backend: Backend) -> int:
    """Tiles per network call: a GPU needs big batches to amortise the copies; a CPU does not."""
    return GPU_BATCH if on_gpu(backend) else CPU_BATCH


def warm_up(model: Model, backend: Backend, *, tile: int = 512, batch_size: int | None = None) -> float:
    """Run the one-time work before the first image: returns the seconds it took.

    The first call of a backend on a new input shape compiles or autotunes
    (cuDNN benchmarks, CUDA graphs capture, TensorRT builds its profile) and
    the compiled post-processing kernels load from their cache.  Doing it
    here keeps it out of the first image's time and out of the GUI thread's
    way (call it from a worker).  On a GPU the network runs one full batch of
    the tile shape; on a CPU one small tile: ONNX Runtime and OpenVINO (its
    dynamic model) have nothing shape-specific worth a full batch, which took
    4-5 s on a 2-core CPU while the first image after either warm-up took the
    same time (``benchmarks/README.md``, *Warm-up*).
    """
    from ._kernels import first_pixels, region_stats
    from .postprocess import network_instances
    from .tiling import plan_tiles

    t0 = time.perf_counter()
    spec = model.spec
    if on_gpu(backend):
        batch_size = batch_size or default_batch_size(backend)
    else:
        tile, batch_size = min(tile, CPU_WARM_TILE), 1
    if spec.max_batch:
        batch_size = min(batch_size, spec.max_batch)
    plan = plan_tiles((tile, tile), tile=tile, halo=spec.halo, multiple=spec.multiple,
                      tile_shape=spec.tile_shape(tile, (tile, tile)))
    out = backend.predict(np.zeros((batch_size, spec.input_channels, *plan.tile_shape), np.float32))
    lab, n = network_instances(out[0, :, :64, :64], spec)
    first_pixels(lab, n)
    region_stats(lab, np.zeros((1, 64, 64), np.float32), max(n, 1))
    return time.perf_counter() - t0


def segment_job(
    image: ImageData | ImageSource,
    model: Model,
    backend: Backend,
    *,
    channel: int | str | None = None,
    tile: int = 512,
    batch_size: int | None = None,
    context: int = DEFAULT_CONTEXT,
    measure_cells: bool = True,
    labels_path: str | Path | None = None,
    post_workers: int | None = None,
    diameter: float | str | None = None,
    diameter_um: float | None = None,
    tta: bool = False,
    cancel: CancelToken | None = None,
) -> Job[SegmentationResult]:
    """Segment ``image`` with ``model`` on ``backend``.

    Yields :class:`Progress` (stage ``"network"`` per batch of tiles,
    ``"plane"`` per plane); returns a :class:`SegmentationResult`.  Labels
    are unique across the whole stack; the table has one row per object
    with its ``t`` / ``z`` index columns.  With ``labels_path`` the labels
    are streamed to that TIFF (written atomically) instead of memory.
    ``context`` is how far around each tile post-processing looks: objects
    up to about that size are never cut at tile seams.  ``batch_size``
    tiles go through the network at once (default 4 on a CPU, 16 on a GPU).
    ``post_workers``
    threads post-process blocks (default: 1 when the network runs on the
    CPU, whose cores it already uses; up to 8 beside a GPU).

    Scale: a model trained at a nucleus diameter (``spec.diameter``) sees
    every image resampled so its nuclei are that size; ``diameter`` is the
    nuclei's diameter in image pixels, estimated from the first plane when
    not given (see :mod:`segstudio.core.scale`); ``diameter_um`` gives it
    in micrometres (the image must record its pixel size); ``"native"``
    runs the image as it is.  Labels and measurements are always in image
    pixels.

    ``tta``: average the network's output over the tile as it is and
    flipped three ways (:class:`FlipAverage`): four times the network's
    work for a little more accuracy.
    """
    spec = model.spec
    source = image if isinstance(image, ImageSource) else source_from_image(image)
    notices: list[str] = list(source.notices)
    warnings: list[str] = list(source.notices)
    told = 0

    def tell():
        """Progress events for the notices not yet told (``info["warning"]`` for warnings)."""
        nonlocal told
        for text in notices[told:]:
            yield Progress("notice", 0, 0, text, info={"warning": text in warnings})
        told = len(notices)
    if (spec.input_channels > 1 and "C" not in source.axes and "Z" in source.axes
            and source.shape[source.axes.index("Z")] == spec.input_channels):
        # pages without axis names read as a Z stack; a model that needs that many channels could not
        # segment it as one, so the pages are its channels
        source = planes_as_channels(source)
        notices.append(f"the image's {spec.input_channels} planes are read as its {spec.input_channels} channels "
                       "(the model reads that many channels)")
    sink = (
        TiffSink(labels_path, source.stack_shape, source.plane_shape, pixel_size=source.pixel_size)
        if labels_path is not None else ArraySink(source.stack_shape, source.plane_shape)
    )
    clock = StageClock()
    predict = backend.predict
    gpu = on_gpu(backend)
    batch_size = batch_size or default_batch_size(backend)
    if spec.max_batch:  # a network of fixed batch size gets batches of at most that size
        batch_size = min(batch_size, spec.max_batch)
    if post_workers is None:
        post_workers = max(1, min(8, (os.cpu_count() or 2) - 1)) if gpu else 1
    if gpu:
        from .backends.fallback import OomFallback

        predict = OomFallback(backend, model, notices.append)
    predict = FiniteOutputs(predict, model, source.name, getattr(predict, "describe", backend.describe)())
    nonfinite = np.dtype(source.dtype).kind == "f"  # only float pixels can be NaN or infinite
    bad_pixels = 0
    tables, extras = [], []
    next_id = 1
    indices = source.stack_indices()
    t_start = time.perf_counter()
    factor, scaling = 1.0, None
    if diameter == "native":
        diameter = spec.diameter
    elif diameter_um is not None:
        if source.pixel_size is None:
            raise InputError(f"{source.name}: the file does not record its pixel size, so a diameter in micrometres "
                             "cannot be converted", hint="give the diameter in pixels")
        diameter = diameter_from_microns(diameter_um, float(np.mean(source.pixel_size)))

    def select(block):
        return select_channels(block, spec.input_channels, channel)

    try:
        for i, index in enumerate(indices):
            t0 = time.perf_counter()
            pct = sample_percentiles(
                lambda y0, y1, index=index: source.read(index, (y0, y1), (0, source.plane_shape[1])),
                source.plane_shape, spec.normalization, select,
            )
            clock.add("normalize", time.perf_counter() - t0)

            def prepare(block, pct=pct):
                return normalize(select(block), spec.normalization, pct)

            def prepare_whole(block, prepare=prepare):
                x = prepare(block)
                if nonfinite:
                    background_nonfinite(x)
                return x

            if i == 0 and spec.diameter:
                if diameter is None:
                    diameter = _estimate_diameter(source, index, prepare_whole, spec, predict, tile)
                    if diameter is None:
                        notices.append("no nuclei found to estimate their size: the image is used as is")
                    else:
                        notices.append(f"nuclei about {diameter:.1f} px across (estimated)")
                factor = scale_factor(spec.diameter, diameter)
            if i == 0 and tta:  # after the estimate, which needs no extra accuracy; inside the resampling
                predict = FlipAverage(predict, getattr(predict, "describe", backend.describe)())
            if i == 0 and factor != 1.0:
                notices.append(f"image resampled {factor:.2f}x for the network (trained on nuclei "
                               f"{spec.diameter:g} px across)")
                scaling = GridScaling(factor, spec, tile, source.plane_shape)
                context = int(np.ceil(context / min(factor, 1.0)))
            yield from tell()
            result = yield from segment_plane_job(
                source, index, spec, predict,
                lambda y0, rows, index=index: sink.write(index, y0, rows),
                prepare=prepare, tile=tile, batch_size=batch_size, context=context, first_id=next_id,
                measure_cells=measure_cells, clock=clock, notices=notices, post_workers=post_workers,
                nonfinite=nonfinite, scaling=scaling, cancel=cancel,
            )
            told = len(notices)  # the pipeline told those it added
            next_id += result.n_objects
            bad_pixels += result.nonfinite
            if measure_cells:
                tables.append(result.table)
                extras.append(dict(zip(source.stack_axes.lower(), index)))
            yield Progress("plane", i + 1, len(indices), f"plane {i + 1}/{len(indices)}: {result.n_objects} objects")
        n_objects = next_id - 1
        if bad_pixels:
            total = int(np.prod(source.plane_shape)) * len(indices)
            warnings.append(f"{bad_pixels:,} of {total:,} pixels ({100 * bad_pixels / total:.3g}%) are not finite "
                            "(NaN or infinite, or beyond 32-bit float range) and were treated as background")
            notices.append(warnings[-1])
            yield from tell()
        t0 = time.perf_counter()
        out = sink.finish(n_objects)
        clock.add("write", time.perf_counter() - t0)
    except BaseException:
        sink.abort()
        raise
    timings = {k: clock.seconds[k] for k in STAGES}
    timings["wall"] = time.perf_counter() - t_start
    if metrics.listening():
        metrics.publish(metrics.StagesTimed(source.name, {k: timings[k] for k in STAGES}, timings["wall"]))
    return SegmentationResult(
        labels=out if isinstance(out, np.ndarray) else None,
        labels_path=out if isinstance(out, Path) else None,
        table=concat_tables(tables, extras) if measure_cells else {},
        timings=timings,
        model=spec.name,
        backend=(predict.describe() if hasattr(predict, "describe") else backend.describe())
        + (f" at {factor:.2f}x scale" if scaling is not None else ""),
        name=source.name,
        pixel_size=source.pixel_size,
        n_objects=n_objects,
        notices=notices,
        warnings=warnings,
        diameter=diameter,
        scale=factor,
    )


def segment_to_files(source: ImageData | ImageSource, model: Model, backend: Backend, labels_path: str | Path,
                     csv_path: str | Path, **options) -> Job[SegmentationResult]:
    """:func:`segment_job` into a labels TIFF (streamed) and the measurements CSV, both written atomically.

    ``options`` are :func:`segment_job`'s.  What ``segstudio segment`` and
    ``segstudio batch`` do with each image.  Files of those names that
    segstudio did not write are never replaced (:func:`~segstudio.core.io.check_replaceable`).
    """
    from .io import check_replaceable
    from .measure import write_csv

    for path in (labels_path, csv_path):
        check_replaceable(path)
    result = yield from segment_job(source, model, backend, labels_path=labels_path, **options)
    write_csv(csv_path, result.table)
    return result


class FiniteOutputs:
    """The network call, refusing outputs that hold NaN or infinity (a broken model or backend).

    Its inputs are finite (non-finite pixels become background before the
    network), so a non-finite output is the model's: an error naming the
    model, rather than an image that silently has no cells.
    """

    def __init__(self, predict, model: Model, image_name: str, describe: str = ""):
        self.predict, self.model, self.image_name = predict, model, image_name
        self._describe = describe

    def __call__(self, batch: np.ndarray, crop: tuple[slice, slice] | None = None) -> np.ndarray:
        out = self.predict(batch, crop)
        if not np.isfinite(out).all():
            raise IncompatibleArtifactError(
                f"model {self.model.name!r} gave NaN or infinite outputs on {self.image_name} "
                f"({self._describe}), so its result cannot be trusted",
                hint="the model file is damaged or does not suit this backend: try another --backend, "
                "or export the model again",
            )
        return out

    def describe(self) -> str:
        return self._describe


class FlipAverage:
    """Test-time augmentation: the network's output averaged over four flips of each batch.

    The batch runs as it is, flipped left-right, up-down and both; each
    output is flipped back before the (logit) average, so an object's
    prediction no longer depends on which way up the image was taken:
    a trained network's filters are not symmetric, so its outputs for the
    four flips differ a little, and their mean is less noisy than any one.
    """

    FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))

    def __init__(self, predict, describe: str = ""):
        self.predict = predict
        self._describe = describe

    def __call__(self, batch: np.ndarray, crop: tuple[slice, slice] | None = None) -> np.ndarray:
        total = None
        for axes in self.FLIPS:
            out = self.predict(np.ascontiguousarray(np.flip(batch, axes)) if axes else batch, None)
            out = np.flip(out, axes) if axes else out
            total = out.astype(np.float32, copy=True) if total is None else np.add(total, out, out=total)
        total *= 1.0 / len(self.FLIPS)
        return total if crop is None else total[(Ellipsis, *crop)]

    def describe(self) -> str:
        return f"{self._describe}, averaged over {len(self.FLIPS)} flips"


ESTIMATE_SIDE = 1024


def _estimate_diameter(source: ImageSource, index, prepare, spec, predict, tile: int) -> float | None:
    """Nuclei diameter from the centre (at most 1024 x 1024 pixels) of one plane, in tiles of ``tile``."""
    h, w = source.plane_shape
    y0, x0 = max(0, (h - ESTIMATE_SIDE) // 2), max(0, (w - ESTIMATE_SIDE) // 2)
    block = source.read(index, (y0, min(h, y0 + ESTIMATE_SIDE)), (x0, min(w, x0 + ESTIMATE_SIDE)))
    return estimate_diameter(prepare(block), spec, predict, tile=tile)
