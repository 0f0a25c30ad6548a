"""Image -> instance labels + per-cell table, as a job.

For every YX plane of the image (Z and T stacks are segmented plane by
plane): pick the model's channels, normalize them with percentiles of the
whole plane (sampled when the plane is large), then stream the plane through
the stage pipeline of :mod:`segstudio.core.segment.pipeline` (read, normalize,
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

from .. import metrics
from ..backends import CPU_BATCH, GPU_BATCH, Backend
from ..errors import IncompatibleArtifactError
from ..image.io import ImageData
from ..image.sinks import ArraySink, TiffSink
from ..image.sources import ImageSource, planes_as_channels, source_from_image
from ..jobs import CancelToken, Job, Progress
from ..models.catalog import Model
from .measure import Table, concat_tables
from .options import SegmentOptions
from .pipeline import STAGES, PlaneSettings, PlaneView, StackState, segment_plane_job
from .preprocess import background_nonfinite, normalize, sample_percentiles, select_channels
from .scale import GridScaling, estimate_diameter, scale_factor


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
    """Whether ``backend`` runs its network on a CUDA device.

    Parameters
    ----------
    backend : Backend
        The network runner; one without a ``device`` attribute counts as a CPU.

    Returns
    -------
    bool
        True when ``str(backend.device)`` starts with ``"cuda"``.
    """
    return str(getattr(backend, "device", "cpu")).startswith("cuda")


CPU_WARM_TILE = 128  # px: the tile a CPU backend warms up on (one, not a batch)


def default_batch_size(backend: Backend) -> int:
    """Tiles per network call: a GPU needs big batches to amortise the copies; a CPU does not.

    Parameters
    ----------
    backend : Backend
        The network runner (see :func:`on_gpu`).

    Returns
    -------
    int
        ``GPU_BATCH`` (16) on a CUDA device, ``CPU_BATCH`` (4) otherwise.
    """
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

    Parameters
    ----------
    model : Model
        The model about to run (its card gives the halo, stride, input sizes and batch limit).
    backend : Backend
        The network runner the images will go through.
    tile : int
        Tile side in network pixels, as the segmentation will use it; a CPU warms up on at most 128.
    batch_size : int, optional
        Tiles in the warm-up call on a GPU (default: :func:`default_batch_size`); ignored on a CPU (one
        tile).  Capped at ``spec.max_batch`` for a network of fixed batch size.

    Returns
    -------
    float
        Seconds the warm-up took (wall clock).
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
    options: SegmentOptions | None = None,
    *,
    labels_path: str | Path | None = None,
    cancel: CancelToken | None = None,
) -> Job[SegmentationResult]:
    """Segment ``image`` with ``model`` on ``backend``.

    Parameters
    ----------
    image : ImageData or ImageSource
        The image, in memory or opened lazily (read region by region).
    model : Model
    backend : Backend
        The network runner (:func:`~segstudio.core.backends.create_backend`).
    options : SegmentOptions, optional
        Tiling, batching, scale, channel, flips, measuring (defaults: the
        recommended settings).
    labels_path : str or pathlib.Path, optional
        Stream the labels to this TIFF (written atomically) instead of memory.
    cancel : CancelToken, optional

    Returns
    -------
    SegmentationResult
        ``labels`` shaped like the image's stack + ``(Y, X)``, unique over
        the whole stack, numbered in raster order of their first pixel; the
        table has one row per object with its ``t`` / ``z`` index columns.

    Yields :class:`Progress`: ``"network"`` per batch of tiles, ``"plane"``
    per plane, ``"notice"`` for what the user should know.

    Scale: a model trained at a nucleus diameter (``spec.diameter``) sees
    every image resampled so its nuclei are that size (one grid per plane,
    :class:`~segstudio.core.segment.scale.GridScaling`); the diameter is estimated
    from the first plane unless ``options.diameter`` gives it (in pixels or
    micrometres) or says ``native`` (the image as it is).  Labels and
    measurements are always in image pixels.
    """
    run = _ImageRun(image, model, backend, options or SegmentOptions(), labels_path)
    yield from run.tell()
    try:
        indices = run.source.stack_indices()
        for i, index in enumerate(indices):
            n = yield from run.plane(i, index, cancel)
            yield Progress("plane", i + 1, len(indices), f"plane {i + 1}/{len(indices)}: {n} objects")
        yield from run.count_nonfinite(len(indices))
        t0 = time.perf_counter()
        out = run.sink.finish(run.state.next_id - 1)
        run.state.clock.add("write", time.perf_counter() - t0)
    except BaseException:
        run.sink.abort()
        raise
    return run.result(out)


class _ImageRun:
    """The state of one :func:`segment_job`: the source, sink, network call and what is told to the user."""

    def __init__(self, image, model: Model, backend: Backend, options: SegmentOptions, labels_path):
        spec = self.spec = model.spec
        self.options = options
        source = image if isinstance(image, ImageSource) else source_from_image(image)
        self.state = StackState()
        self.notices = self.state.notices
        self.notices += source.notices
        self.warnings: list[str] = list(source.notices)
        self.told = 0
        if (spec.input_channels > 1 and "C" not in source.axes and "Z" in source.axes
                and source.shape[source.axes.index("Z")] == spec.input_channels):
            # pages without axis names read as a Z stack; a model that needs that many channels could not
            # segment it as one, so the pages are its channels
            source = planes_as_channels(source)
            self.notices.append(f"the image's {spec.input_channels} planes are read as its {spec.input_channels} "
                                "channels (the model reads that many channels)")
        self.source = source
        # what can be refused is checked before the sink opens its file
        self.channel = _channel_index(options.channel, source)
        d = options.diameter
        self.diameter = spec.diameter if d.kind == "native" else d.pixels(source.pixel_size, name=source.name)
        self.sink = (
            TiffSink(labels_path, source.stack_shape, source.plane_shape, pixel_size=source.pixel_size)
            if labels_path is not None else ArraySink(source.stack_shape, source.plane_shape)
        )
        gpu = on_gpu(backend)
        self.batch_size = options.batch_size or default_batch_size(backend)
        if spec.max_batch:  # a network of fixed batch size gets batches of at most that size
            self.batch_size = min(self.batch_size, spec.max_batch)
        self.post_workers = options.post_workers
        if self.post_workers is None:
            self.post_workers = max(1, min(8, (os.cpu_count() or 2) - 1)) if gpu else 1
        predict = backend.predict
        if gpu:
            from ..backends.fallback import OomFallback

            predict = OomFallback(backend, model, self.notices.append)
        self.predict = FiniteOutputs(predict, model, source.name, getattr(predict, "describe", backend.describe)())
        self.nonfinite = np.dtype(source.dtype).kind == "f"  # only float pixels can be NaN or infinite
        self.bad_pixels = 0
        self.tables, self.extras = [], []
        self.t_start = time.perf_counter()
        self.factor, self.scaling = 1.0, None
        self.context = options.context

    def tell(self) -> Job[None]:
        """Progress events for the notices not yet told (``info["warning"]`` for warnings)."""
        for text in self.notices[self.told:]:
            yield Progress("notice", 0, 0, text, info={"warning": text in self.warnings})
        self.told = len(self.notices)

    def _select(self, block: np.ndarray) -> np.ndarray:
        return select_channels(block, self.spec.input_channels, self.channel)

    def _preparer(self, index):
        """The plane's ``prepare`` (channels, then the plane's percentiles), and one that also blanks NaNs."""
        t0 = time.perf_counter()
        source, spec = self.source, self.spec
        pct = sample_percentiles(
            lambda y0, y1: source.read(index, (y0, y1), (0, source.plane_shape[1])),
            source.plane_shape, spec.normalization, self._select,
        )
        self.state.clock.add("normalize", time.perf_counter() - t0)

        def prepare(block):
            return normalize(self._select(block), spec.normalization, pct)

        def prepare_whole(block):
            x = prepare(block)
            if self.nonfinite:
                background_nonfinite(x)
            return x

        return prepare, prepare_whole

    def _choose_scale(self, index, prepare_whole) -> None:
        """On the first plane: the diameter (estimated if not given), the factor, TTA and the grid."""
        spec, options = self.spec, self.options
        if spec.diameter:
            if self.diameter is None:
                self.diameter = _estimate_diameter(self.source, index, prepare_whole, spec, self.predict,
                                                   options.tile)
                self.notices.append("no nuclei found to estimate their size: the image is used as is"
                                    if self.diameter is None else
                                    f"nuclei about {self.diameter:.1f} px across (estimated)")
            self.factor = scale_factor(spec.diameter, self.diameter)
        if options.tta:  # after the estimate, which needs no extra accuracy; inside the resampling
            self.predict = FlipAverage(self.predict, self.predict.describe())
        if self.factor != 1.0:
            self.notices.append(f"image resampled {self.factor:.2f}x for the network (trained on nuclei "
                                f"{spec.diameter:g} px across)")
            self.scaling = GridScaling(self.factor, spec, options.tile, self.source.plane_shape)
            self.context = int(np.ceil(self.context / min(self.factor, 1.0)))

    def plane(self, i: int, index, cancel) -> Job[int]:
        """Segment plane ``index`` (the ``i``-th); returns its object count."""
        prepare, prepare_whole = self._preparer(index)
        if i == 0:
            self._choose_scale(index, prepare_whole)
        yield from self.tell()
        settings = PlaneSettings(tile=self.options.tile, batch_size=self.batch_size, context=self.context,
                                 measure_cells=self.options.measure_cells, post_workers=self.post_workers,
                                 nonfinite=self.nonfinite, scaling=self.scaling)
        result = yield from segment_plane_job(
            PlaneView(self.source, index), self.spec, self.predict,
            lambda y0, rows: self.sink.write(index, y0, rows),
            prepare=prepare, settings=settings, state=self.state, cancel=cancel,
        )
        self.told = len(self.notices)  # the pipeline told those it added
        self.bad_pixels += result.nonfinite
        if self.options.measure_cells:
            self.tables.append(result.table)
            self.extras.append(dict(zip(self.source.stack_axes.lower(), index)))
        return result.n_objects

    def count_nonfinite(self, n_planes: int) -> Job[None]:
        """A warning, once, for the pixels that were NaN or infinite."""
        if self.bad_pixels:
            total = int(np.prod(self.source.plane_shape)) * n_planes
            self.warnings.append(f"{self.bad_pixels:,} of {total:,} pixels ({100 * self.bad_pixels / total:.3g}%) "
                                 "are not finite (NaN or infinite, or beyond 32-bit float range) and were treated "
                                 "as background")
            self.notices.append(self.warnings[-1])
            yield from self.tell()

    def result(self, out) -> SegmentationResult:
        clock, source = self.state.clock, self.source
        timings = {k: clock.seconds[k] for k in STAGES}
        timings["wall"] = time.perf_counter() - self.t_start
        if metrics.listening():
            metrics.publish(metrics.StagesTimed(source.name, {k: timings[k] for k in STAGES}, timings["wall"]))
        return SegmentationResult(
            labels=out if isinstance(out, np.ndarray) else None,
            labels_path=out if isinstance(out, Path) else None,
            table=concat_tables(self.tables, self.extras) if self.options.measure_cells else {},
            timings=timings,
            model=self.spec.name,
            backend=self.predict.describe() + (f" at {self.factor:.2f}x scale" if self.scaling is not None else ""),
            name=source.name,
            pixel_size=source.pixel_size,
            n_objects=self.state.next_id - 1,
            notices=self.notices,
            warnings=self.warnings,
            diameter=self.diameter,
            scale=self.factor,
        )


def segment_to_files(source: ImageData | ImageSource, model: Model, backend: Backend, labels_path: str | Path,
                     csv_path: str | Path, options: SegmentOptions | None = None, *,
                     cancel: CancelToken | None = None) -> Job[SegmentationResult]:
    """:func:`segment_job` into a labels TIFF (streamed) and the measurements CSV, both written atomically.

    What ``segstudio segment`` and ``segstudio batch`` do with each image.
    Files of those names that segstudio did not write are never replaced
    (:func:`~segstudio.core.image.io.check_replaceable`).

    Parameters
    ----------
    source : ImageData or ImageSource
        The image, in memory or opened lazily (read region by region).
    model : Model
    backend : Backend
        The network runner (:func:`~segstudio.core.backends.create_backend`).
    labels_path : str or pathlib.Path
        The labels TIFF, streamed while segmenting.
    csv_path : str or pathlib.Path
        The per-cell table (:func:`~segstudio.core.segment.measure.write_csv`), written once segmentation ends;
        with ``options.measure_cells`` off the table is empty and the file has no columns.
    options : SegmentOptions, optional
        As for :func:`segment_job` (defaults: the recommended settings).
    cancel : CancelToken, optional

    Returns
    -------
    SegmentationResult
        As from :func:`segment_job`, with ``labels`` None and ``labels_path`` set.

    Yields the :class:`Progress` events of :func:`segment_job`.

    Raises
    ------
    OutputError
        Before any work, when either path holds a file segstudio did not write.
    """
    from ..image.io import check_replaceable
    from .measure import write_csv

    for path in (labels_path, csv_path):
        check_replaceable(path)
    result = yield from segment_job(source, model, backend, options, labels_path=labels_path, cancel=cancel)
    write_csv(csv_path, result.table)
    return result


def _channel_index(channel: int | str | None, source: ImageSource) -> int | str | None:
    """``channel`` as :func:`select_channels` takes it: a channel's name becomes its index in ``source``."""
    if not isinstance(channel, str) or channel == "mean":
        return channel
    names = [str(n) for n in (source.channel_names or ())]
    folded = [n.casefold() for n in names]
    if channel.casefold() in folded:
        return folded.index(channel.casefold())
    from ..errors import InputError

    raise InputError(f"{source.name}: no channel named {channel!r}"
                     + (f" (its channels: {', '.join(names)})" if names else " (the file names no channels)"),
                     hint="give the channel's index (0, 1, ...) or one of its names")


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
