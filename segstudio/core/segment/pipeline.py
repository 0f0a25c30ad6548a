"""Streaming segmentation of one plane: read, normalize, network, post-process, measure, write.

Stages run concurrently, linked by bounded queues, so the slowest one sets
the pace and memory stays bounded by the tile size, not the image size:

``reader`` thread
    reads one band of rows (a row of tiles plus its halo) from the source,
    normalizes it with the whole-plane percentiles and cuts it into tiles;
``network`` (the job's own thread, or the device thread for a GPU)
    runs batches of tiles through the backend;
``post`` thread
    keeps the network output of three rows of tiles, turns each block (a
    tile's core plus ``context`` pixels around it) into instances, keeps the
    objects the block *owns*, measures them and hands finished label rows to
    the sink.

Ownership: an object belongs to the block whose core holds its anchor, the
first pixel of the object in raster order (its top-most, then left-most
pixel).  Both blocks that see an object compute the same anchor, so every
object is kept exactly once, whole, however the seams cut it, provided it
and its neighbours fit in the context.  As the anchor is an object's top
row, label rows above the current row of tiles are final and are written
out at once.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .. import metrics
from ..errors import Cancelled
from ..image.sources import ImageSource
from ..jobs import CancelToken, Job, Progress
from ..models.spec import ModelSpec
from ._kernels import first_pixels
from .measure import Table, cell_classes, measure
from .postprocess import network_instances
from .preprocess import background_nonfinite
from .scale import GridScaling
from .tiling import TilePlan, plan_tiles, read_region, round_up

STAGES = ("read", "normalize", "network", "post", "measure", "write")
_DONE = object()


@dataclass
class StageClock:
    """Seconds spent per stage (summed over threads; stages overlap in wall time)."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, stage: str, dt: float) -> None:
        with self._lock:
            self.seconds[stage] += dt


class PlaneView:
    """One plane of a source (``index`` into its stack) with NumPy-style ``[..., rows, cols]`` slicing."""

    def __init__(self, source: ImageSource, index: tuple[int, ...]):
        self.source, self.index = source, index
        self.shape = (source.n_channels, *source.plane_shape)

    def __getitem__(self, key):
        rows, cols = key[-2], key[-1]
        return self.source.read(self.index, (rows.start, rows.stop), (cols.start, cols.stop))


class _Failure:
    def __init__(self) -> None:
        self.exc: BaseException | None = None

    def set(self, exc: BaseException) -> None:
        if self.exc is None:
            self.exc = exc


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put unless the pipeline is stopping; False when it is."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, stop: threading.Event):
    while True:
        try:
            return q.get(timeout=0.05)
        except queue.Empty:
            if stop.is_set():
                return _DONE


@dataclass
class PlaneResult:
    n_objects: int
    table: Table
    nonfinite: int = 0  # pixels whose value was NaN or infinite (made background)


@dataclass(frozen=True)
class PlaneSettings:
    """How one plane is tiled and post-processed (:func:`segment_plane_job`).

    ``tile``: the tiles' core side in image pixels (in network pixels with
    ``scaling``); ``batch_size`` tiles per network call; ``context``: the
    pixels around each tile's core that post-processing sees; ``post_workers``
    threads post-process; ``halo`` (default: the model's) is the tile overlap
    in image pixels; ``nonfinite``: the pixels may be NaN or infinite (a
    float image): they are made background after ``prepare`` and counted
    once each (``PlaneResult.nonfinite``); ``tile_shape``: every tile's shape
    in image pixels, halo included (default: the one the model takes,
    :meth:`ModelSpec.tile_shape`, for a network of fixed or stepped input
    sizes; else sized by the tiler); ``scaling``: the network runs on the
    plane resampled by this grid (:class:`~segstudio.core.segment.scale.GridScaling`),
    which then sets the tiles and the halo.
    """

    tile: int = 512
    batch_size: int = 4
    context: int = 64
    measure_cells: bool = True
    post_workers: int = 1
    halo: int | None = None
    nonfinite: bool = False
    tile_shape: tuple[int, int] | None = None
    scaling: GridScaling | None = None


@dataclass
class StackState:
    """What the planes of one image share as they are segmented one after another.

    ``next_id``: the id the next object gets (ids are unique over the
    stack); ``clock``: seconds per stage; ``notices``: what the user should
    be told, in order (a plane's job tells those it adds as progress events).
    """

    next_id: int = 1
    clock: StageClock = field(default_factory=StageClock)
    notices: list[str] = field(default_factory=list)


def segment_plane_job(
    plane: PlaneView,
    spec: ModelSpec,
    predict: Callable[[np.ndarray], np.ndarray],
    write_rows: Callable[[int, np.ndarray], None],
    *,
    prepare: Callable[[np.ndarray], np.ndarray],
    settings: PlaneSettings = PlaneSettings(),
    state: StackState | None = None,
    cancel: CancelToken | None = None,
) -> Job[PlaneResult]:
    """Segment one plane tile by tile; see the module docstring.

    Parameters
    ----------
    plane : PlaneView
        The plane (a source and a stack index).
    spec : ModelSpec
        The model's specification (halo, stride, outputs, classes).
    predict : callable
        ``predict(batch, crop)`` maps a ``(B, C, h, w)`` batch to the
        ``crop`` window (the tiles' core) of its ``(B, K, h, w)`` output;
        with ``settings.scaling`` it sees network-pixel batches and
        ``crop`` is ``None``.
    write_rows : callable
        ``write_rows(y0, rows)`` receives finished ``(n, W)`` uint32 label
        rows in order, with ids from ``state.next_id`` on.
    prepare : callable
        Turns a raw ``(C, h, w)`` block into the model's normalized input.
    settings : PlaneSettings
        Tiling and post-processing.
    state : StackState, optional
        Shared with the image's other planes; ``next_id`` is advanced past
        this plane's objects.
    cancel : CancelToken, optional

    Returns
    -------
    PlaneResult
        The plane's object count, table and count of non-finite pixels.
    """
    run = _PlaneRun(plane, spec, predict, write_rows, prepare, settings, state or StackState())
    cancel = cancel or CancelToken()
    threads = [threading.Thread(target=run.read, name="segstudio-read", daemon=True),
               threading.Thread(target=run.post_process, name="segstudio-post", daemon=True)]
    for th in threads:
        th.start()
    try:
        yield from run.network(cancel)
        for th in threads:
            while th.is_alive():
                th.join(timeout=0.1)
                if cancel.cancelled:
                    raise Cancelled("cancelled by the user")
        if run.failure.exc is not None:
            raise run.failure.exc
    finally:
        run.stop.set()
        for th in threads:
            th.join()
        run.post.close()
    n = run.post.next_id - run.state.next_id
    run.state.next_id = run.post.next_id
    return PlaneResult(n_objects=n, table=run.post.table(), nonfinite=run.bad_pixels)


class _PlaneRun:
    """The stages of :func:`segment_plane_job`: a reader thread, the network (the job's thread), a post thread."""

    def __init__(self, plane, spec, predict, write_rows, prepare, settings: PlaneSettings, state: StackState):
        self.plane, self.spec, self.predict, self.prepare = plane, spec, predict, prepare
        self.settings, self.state, self.scaling = settings, state, settings.scaling
        tile_shape, halo = settings.tile_shape, settings.halo
        if self.scaling is not None:
            tile_shape, halo = self.scaling.tile_shape, self.scaling.halo
        self.halo = halo = round_up(spec.halo if halo is None else halo, spec.multiple)  # as plan_tiles rounds it
        tile_shape = tile_shape or spec.tile_shape(settings.tile, plane.source.plane_shape, halo)
        self.plan = plan_tiles(plane.source.plane_shape, tile=settings.tile, halo=halo, multiple=spec.multiple,
                               tile_shape=tile_shape)
        self.stop = threading.Event()
        self.failure = _Failure()
        self.q_tiles: queue.Queue = queue.Queue(maxsize=2 * settings.batch_size)
        self.q_out: queue.Queue = queue.Queue(maxsize=2 * settings.batch_size)
        self.post = _PostStage(self.plan, spec, plane, write_rows, settings, state)
        self.bad_pixels = 0

    def read(self) -> None:
        """Reader thread: bands of rows, normalized, cut into tiles, onto ``q_tiles``."""
        plan, halo, clock = self.plan, self.halo, self.state.clock
        try:
            for row in _tile_rows(plan):
                t0 = time.perf_counter()
                (y0, y1), _ = row[0].read
                x_end = row[-1].read[1][1]
                band = read_region(self.plane, ((y0, y1), (-halo, x_end)))
                t1 = time.perf_counter()
                band = self.prepare(band)
                if self.settings.nonfinite:  # counted over the row's own pixels: halos and mirrored pixels repeat
                    out_rows = row[0].out[0]
                    core = (slice(out_rows.start - y0, out_rows.stop - y0), slice(halo, halo + plan.shape[1]))
                    self.bad_pixels += background_nonfinite(band, core)
                clock.add("read", t1 - t0)
                clock.add("normalize", time.perf_counter() - t1)
                for t in row:
                    x0 = t.read[1][0] + halo
                    # a copy, so the band is freed once cut (queued views would keep whole bands alive)
                    tile_in = np.ascontiguousarray(band[:, :, x0 : x0 + plan.tile_shape[1]])
                    if not _put(self.q_tiles, (t, tile_in), self.stop):
                        return
                del band
            _put(self.q_tiles, _DONE, self.stop)
        except BaseException as e:  # noqa: BLE001 - handed to the job's thread
            self.failure.set(e)
            self.stop.set()

    def post_process(self) -> None:
        """Post thread: network outputs from ``q_out`` into the post stage."""
        try:
            while True:
                item = _get(self.q_out, self.stop)
                if item is _DONE:
                    break
                self.post.add(*item)
            if not self.stop.is_set():
                self.post.finish()
        except BaseException as e:  # noqa: BLE001
            self.failure.set(e)
            self.stop.set()

    def _batch(self) -> tuple[list, bool]:
        """Up to ``batch_size`` tiles from the reader, and whether it has finished."""
        batch = []
        while len(batch) < self.settings.batch_size:
            item = _get(self.q_tiles, self.stop)
            if item is _DONE:
                return batch, True
            batch.append(item)
        return batch, False

    def _infer(self, batch: list) -> np.ndarray:
        x = np.stack([a for _, a in batch])
        if self.scaling is None:
            h, w = self.plan.tile_shape
            return self.predict(x, (slice(self.halo, h - self.halo), slice(self.halo, w - self.halo)))
        origins = [(t.read[0][0], t.read[1][0]) for t, _ in batch]
        return self.scaling.to_image(self.predict(self.scaling.to_network(x, origins), None), origins)

    def network(self, cancel: CancelToken) -> Job[None]:
        """The job's thread: batches of tiles through the network, outputs onto ``q_out``."""
        plan, notices = self.plan, self.state.notices
        n, done, told = len(plan), 0, len(notices)
        tile_pixels = plan.tile_shape[0] * plan.tile_shape[1]  # image pixels of one tile, halo included
        yield Progress("network", 0, n, f"{n} tile(s) of {plan.tile_shape[0]}x{plan.tile_shape[1]}")
        finished = False
        while not finished:
            batch, finished = self._batch()
            if self.failure.exc is not None:
                break
            if cancel.cancelled:
                raise Cancelled("cancelled by the user")
            if not batch:
                continue
            t0 = time.perf_counter()
            out = self._infer(batch)
            dt = time.perf_counter() - t0
            self.state.clock.add("network", dt)
            if metrics.listening():
                metrics.publish(metrics.BatchTimed(len(batch), len(batch) * tile_pixels, dt, self.plane.source.name))
            for (t, _), o in zip(batch, out):
                kept = o[:, : t.out[0].stop - t.out[0].start, : t.out[1].stop - t.out[1].start]
                if not _put(self.q_out, (t, kept), self.stop):
                    break
            done += len(batch)
            while told < len(notices):
                yield Progress("notice", done, n, notices[told])
                told += 1
            yield Progress("network", done, n)
        _put(self.q_out, _DONE, self.stop)


def _tile_rows(plan: TilePlan) -> list[list]:
    rows: dict[int, list] = {}
    for t in plan.tiles:
        rows.setdefault(t.out[0].start, []).append(t)
    return [rows[k] for k in sorted(rows)]


@dataclass
class _BlockResult:
    """What a block computed, waiting to be committed in block order."""

    box: tuple[int, int, int, int]  # by0, by1, bx0, bx1
    local: np.ndarray  # int32: owned objects numbered 1..k in anchor order, 0 elsewhere
    k: int
    table: Table | None
    anchors: np.ndarray  # int64: flat plane index (y * W + x) of each owned object's anchor, in local order


class _PostStage:
    """Network output -> owned instances per block -> finished label rows.

    Blocks are computed (instances, ownership, measurements) by ``workers``
    threads as soon as their neighbourhood's network output is there; the
    compiled kernels release the GIL, so on a GPU machine the CPU cores keep
    up with the network.  Results are *committed* in block order (global ids,
    label writes, table), so the output does not depend on the thread count.
    """

    def __init__(self, plan: TilePlan, spec: ModelSpec, view: PlaneView, write_rows, settings: PlaneSettings,
                 state: StackState):
        self.plan, self.spec, self.view, self.write_rows = plan, spec, view, write_rows
        self.context, self.measure_cells = settings.context, settings.measure_cells
        self.names, self.pixel_size = view.source.channel_names, view.source.pixel_size
        self.clock, first_id, workers = state.clock, state.next_id, settings.post_workers
        self.h, self.w = plan.shape
        self.rows = _tile_rows(plan)
        self.row_starts = [r[0].out[0].start for r in self.rows]
        self.ncols = len(self.rows[0])
        self.net: dict[int, np.ndarray] = {}  # tile row -> (K, rows of that tile row, W)
        self.arrived: dict[int, int] = {}  # tile row -> tiles received (they come in order)
        self.labels: dict[int, np.ndarray] = {}  # tile row -> (rows, W) uint32
        self.next_submit: tuple[int, int] | None = (0, 0)
        self.pending: list = []  # futures (or results) in block order
        self.next_id = first_id
        self.tables: list[Table] = []
        # the committed objects of the tile row not yet done: renumbered in raster order of anchors when it is
        self.row_first_id = first_id
        self.row_anchors: list[np.ndarray] = []
        self.row_tables: list[Table] = []
        self.pool = None
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="segstudio-post")
        self.workers = workers

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def _row_of(self, tile) -> int:
        return self.row_starts.index(tile.out[0].start)

    def add(self, tile, core_out: np.ndarray) -> None:
        r = self._row_of(tile)
        if r not in self.net:
            rh = tile.out[0].stop - tile.out[0].start
            self.net[r] = np.empty((core_out.shape[0], rh, self.w), np.float32)
            self.labels[r] = np.zeros((rh, self.w), np.uint32)
        self.net[r][(slice(None), slice(None), tile.out[1])] = core_out
        self.arrived[r] = self.arrived.get(r, 0) + 1
        self._submit_ready()
        self._commit(wait=len(self.pending) > 2 * self.workers)

    def finish(self) -> None:
        self._submit_ready(final=True)
        self._commit(wait=True, all_=True)
        self.close()

    def _box(self, r: int, c: int) -> tuple[int, int, int, int]:
        """Block ``(r, c)``: its tile's core and ``context`` pixels around it, within the plane."""
        tile = self.rows[r][c]
        cy0, cy1 = tile.out[0].start, tile.out[0].stop
        cx0, cx1 = tile.out[1].start, tile.out[1].stop
        return (max(0, cy0 - self.context), min(self.h, cy1 + self.context),
                max(0, cx0 - self.context), min(self.w, cx1 + self.context))

    def _ready(self, r: int, c: int, final: bool) -> bool:
        """Has every tile the block's box overlaps arrived?  (Tiles come in raster order; a tile row or
        column narrower than the context makes the box reach more than one tile further.)"""
        if final:
            return True
        by0, by1, bx0, bx1 = self._box(r, c)
        last_row = max(rr for rr, row in enumerate(self.rows) if row[0].out[0].start < by1)
        last_col = max(cc for cc, t in enumerate(self.rows[0]) if t.out[1].start < bx1)
        if any(self.arrived.get(rr, 0) < self.ncols for rr in range(r, last_row)):
            return False
        return self.arrived.get(last_row, 0) >= last_col + 1

    def _submit_ready(self, final: bool = False) -> None:
        while self.next_submit is not None:
            r, c = self.next_submit
            if not self._ready(r, c, final):
                return
            if self.pool is None:
                self.pending.append(((r, c), self._compute(r, c)))
            else:
                self.pending.append(((r, c), self.pool.submit(self._compute, r, c)))
            if c + 1 < self.ncols:
                self.next_submit = (r, c + 1)
            else:
                self.next_submit = (r + 1, 0) if r + 1 < len(self.rows) else None

    def _commit(self, wait: bool, all_: bool = False) -> None:
        """Commit finished blocks in order; with ``wait``, block on the oldest (all with ``all_``)."""
        while self.pending:
            (r, c), item = self.pending[0]
            if not isinstance(item, _BlockResult):
                if not item.done() and not (wait or all_):
                    return
                item = item.result()
            self.pending.pop(0)
            self._apply(r, item)
            if c + 1 == self.ncols:
                self._row_done(r)
            if not all_:
                wait = False

    def _gather(self, store: dict, y0: int, y1: int, x0: int, x1: int, lead: tuple = ()) -> np.ndarray:
        """Rows y0..y1 (global) of the per-tile-row arrays in ``store`` as one block."""
        parts = []
        for r, start in enumerate(self.row_starts):
            arr = store.get(r)
            if arr is None:
                continue
            stop = start + arr.shape[-2]
            a, b = max(y0, start), min(y1, stop)
            if a < b:
                parts.append(arr[(*lead, slice(a - start, b - start), slice(x0, x1))])
        return np.concatenate(parts, axis=-2)

    def _compute(self, r: int, c: int) -> _BlockResult:
        """Instances of one block, the objects it owns, and their measurements (thread-safe)."""
        t0 = time.perf_counter()
        tile = self.rows[r][c]
        cy0, cy1 = tile.out[0].start, tile.out[0].stop
        cx0, cx1 = tile.out[1].start, tile.out[1].stop
        by0, by1, bx0, bx1 = self._box(r, c)
        out = self._gather(self.net, by0, by1, bx0, bx1, lead=(slice(None),))
        lab, n = network_instances(out, self.spec)
        first = first_pixels(lab, n)
        ids = np.flatnonzero(first >= 0)
        first = first[ids]
        ay, ax = np.divmod(first, bx1 - bx0)
        ay, ax = ay + by0, ax + bx0
        owned = (ay >= cy0) & (ay < cy1) & (ax >= cx0) & (ax < cx1)
        order = np.argsort(first[owned], kind="stable")  # raster order of anchors
        ids = ids[owned][order]
        anchors = (ay[owned] * self.w + ax[owned])[order]
        local = np.zeros(n + 1, np.int32)
        local[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
        mine = local[lab]
        t1 = time.perf_counter()
        self.clock.add("post", t1 - t0)
        table = None
        if self.measure_cells and len(ids):
            raw = self.view.source.read(self.view.index, (by0, by1), (bx0, bx1))
            table = measure(mine, raw, pixel_size=self.pixel_size, channel_names=self.names)
            table["centroid_y"] = table["centroid_y"] + by0
            table["centroid_x"] = table["centroid_x"] + bx0
            if self.pixel_size is not None:
                table["centroid_y_um"] = table["centroid_y"] * self.pixel_size[0]
                table["centroid_x_um"] = table["centroid_x"] * self.pixel_size[1]
            if self.spec.classes:
                table.update(cell_classes(mine, out[2], len(ids), self.spec.classes))
        self.clock.add("measure", time.perf_counter() - t1)
        return _BlockResult((by0, by1, bx0, bx1), mine, len(ids), table, anchors)

    def _apply(self, r: int, res: _BlockResult) -> None:
        """Give the block's objects their global ids and write them (in block order)."""
        t0 = time.perf_counter()
        by0, by1, bx0, bx1 = res.box
        offset = self.next_id - 1
        self.next_id += res.k
        mine = np.where(res.local > 0, res.local.astype(np.uint32) + np.uint32(offset), np.uint32(0))
        # write owned pixels where nothing is yet (objects larger than the context may overlap)
        for rr, start in enumerate(self.row_starts):
            dst = self.labels.get(rr)
            if dst is None:
                continue
            a, b = max(by0, start), min(by1, start + dst.shape[0])
            if a >= b:
                continue
            src = mine[a - by0 : b - by0]
            view = dst[a - start : b - start, bx0:bx1]
            np.copyto(view, src, where=(view == 0) & (src != 0))
        self.row_anchors.append(res.anchors)
        if res.table is not None:
            res.table["label"] = res.table["label"] + offset
            self.row_tables.append(res.table)
        self.clock.add("post", time.perf_counter() - t0)

    def _renumber_row(self, r: int) -> None:
        """Give tile row ``r``'s objects ids in raster order of their anchors (its blocks gave them block order).

        Anchors of tile row ``r`` lie in its rows, below all earlier rows' and
        above all later rows', so ids follow the raster order of the objects'
        first pixels over the whole plane: the labels do not depend on the
        tiling, ids included.  The objects' pixels lie in row ``r`` and below.
        """
        start, n = self.row_first_id, self.next_id - self.row_first_id
        tables, self.row_tables = self.row_tables, []
        anchors = np.concatenate(self.row_anchors) if self.row_anchors else np.zeros(0, np.int64)
        self.row_anchors, self.row_first_id = [], self.next_id
        order = np.argsort(anchors, kind="stable")
        if n and np.any(order != np.arange(n)):
            new_id = np.empty(n, np.uint32)
            new_id[order] = np.arange(start, start + n, dtype=np.uint32)
            for rr in [k for k in self.labels if k >= r]:
                for y in range(0, self.labels[rr].shape[0], 64):  # a band at a time: small temporaries
                    lab = self.labels[rr][y : y + 64]
                    hit = lab >= start  # ids of later rows are not given yet: all >= start are r's
                    lab[hit] = new_id[lab[hit] - start]
            for t in tables:
                t["label"] = new_id[t["label"] - start].astype(t["label"].dtype)
        if tables:
            merged = {k: np.concatenate([t[k] for t in tables]) for k in tables[0]}
            by_id = np.argsort(merged["label"], kind="stable")
            self.tables.append({k: v[by_id] for k, v in merged.items()})

    def _row_done(self, r: int) -> None:
        """All blocks of tile row ``r`` are committed: its label rows are final."""
        t0 = time.perf_counter()
        self._renumber_row(r)
        for rr in sorted(k for k in self.labels if k <= r):
            self.write_rows(self.row_starts[rr], self.labels.pop(rr))
        # the network output no later block reaches (its box starts at most `context` rows above its tile row)
        keep_from = self.row_starts[r + 1] - self.context if r + 1 < len(self.rows) else self.h
        for rr in [k for k in self.net if self.row_starts[k] + self.net[k].shape[-2] <= keep_from]:
            del self.net[rr]
        self.clock.add("write", time.perf_counter() - t0)

    def table(self) -> Table:
        if not self.tables:
            from .measure import empty_table

            table = empty_table(self.names, self.pixel_size is not None)
            if self.spec.classes:
                table.update(cell_classes(np.zeros((1, 1), np.int32), np.zeros((1, 1), np.float32), 0,
                                          self.spec.classes))
            return table
        return {k: np.concatenate([t[k] for t in self.tables]) for k in self.tables[0]}
