"""Object scale: measuring nucleus diameters and resampling images to a model's scale.

A built-in model is trained with every image resampled so that its nuclei
are ``ModelSpec.diameter`` pixels across (the median equivalent-circle
diameter).  At inference the image is resampled by ``diameter / d`` where
``d`` is the diameter of the user's nuclei in image pixels: given directly
(``--diameter``), from a pixel size and a diameter in micrometres, or
estimated from a first pass of the network (:func:`estimate_diameter`).
The network's outputs are resampled back to the image grid before
post-processing, so labels and measurements are always in the user's pixels.

Resampling is separable linear interpolation; when shrinking, the triangle
filter widens by the shrink factor so it averages instead of skipping pixels
(no aliasing).  Whole arrays (training samples, the estimate's looks) go
through :func:`resize` (two small matrix products, ``Ry @ X @ Rx.T``); the
segmentation itself through :class:`GridScaling`, one grid for the whole
plane cut into tiles, so the labels do not depend on the tiling.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

# Below this ratio between wanted and current scale an image is used as is:
# the models are trained with +-25 % zoom, so smaller corrections buy nothing.
TOLERANCE = 0.1
MIN_FACTOR, MAX_FACTOR = 0.125, 8.0
STEPS_PER_OCTAVE = 16


class _MatrixCache:
    """The most recently used resampling matrices, at most ``max_bytes`` of them (thread-safe).

    A run resamples every tile of an image with the same few matrices, but a
    long run meets many sizes (every image size, every scale factor), and a
    matrix can take tens of MB (``(n_out, n_in)`` float32): kept without a
    size limit they would add up.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes, self.nbytes = max_bytes, 0
        self._items: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, n_in: int, n_out: int) -> np.ndarray:
        key = (n_in, n_out)
        with self._lock:
            m = self._items.get(key)
            if m is not None:
                self._items.move_to_end(key)
                return m
        m = _interpolation_matrix(n_in, n_out)
        m.setflags(write=False)
        with self._lock:
            if key not in self._items:
                self._items[key] = m
                self.nbytes += m.nbytes
            while self.nbytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self.nbytes -= old.nbytes
        return m


_MATRICES = _MatrixCache(max_bytes=64 * 2**20)


def _matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` linear-interpolation weights, cached (read-only)."""
    return _MATRICES.get(n_in, n_out)


def _interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` linear-interpolation weights (pixel centres aligned, edges clamped)."""
    s = n_out / n_in
    support = max(1.0, 1.0 / s)
    centres = (np.arange(n_out) + 0.5) / s - 0.5
    j = np.arange(n_in)
    w = np.clip(1.0 - np.abs(j[None, :] - centres[:, None]) / support, 0.0, None)
    # clamp at the borders: weight that would fall outside goes to the edge pixel
    w_sum = w.sum(axis=1, keepdims=True)
    empty = w_sum[:, 0] == 0
    if empty.any():
        w[empty, np.clip(np.round(centres[empty]).astype(int), 0, n_in - 1)] = 1.0
        w_sum = w.sum(axis=1, keepdims=True)
    return (w / w_sum).astype(np.float32)


def resize(arr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample the last two axes of a float array to ``shape`` (float32).

    Parameters
    ----------
    arr : numpy.ndarray
        (..., H, W) array of any real dtype (cast to float32).
    shape : tuple of int
        (H', W') output size.

    Returns
    -------
    numpy.ndarray
        (..., H', W') float32, linearly interpolated with pixel centres aligned (averaging when shrinking);
        ``arr`` itself when it is float32 of that size already.
    """
    h, w = arr.shape[-2:]
    if (h, w) == tuple(shape):
        return arr.astype(np.float32, copy=False)
    ry, rx = _matrix(h, shape[0]), _matrix(w, shape[1])
    x = arr.astype(np.float32, copy=False)
    return np.ascontiguousarray(np.matmul(np.matmul(ry, x), rx.T))


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resampling of a label image (pixel centres aligned).

    Parameters
    ----------
    labels : numpy.ndarray
        (..., H, W) labels, any dtype.
    shape : tuple of int
        (H', W') output size.

    Returns
    -------
    numpy.ndarray
        (..., H', W') in the dtype of ``labels``; ``labels`` itself when of that size already.
    """
    h, w = labels.shape[-2:]
    if (h, w) == tuple(shape):
        return labels
    yi = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(int), h - 1)
    xi = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(int), w - 1)
    return labels[..., yi[:, None], xi[None, :]]


def scaled_shape(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    """The size of a plane of ``shape`` resampled by ``factor``.

    Parameters
    ----------
    shape : tuple of int
        (H, W) in pixels.
    factor : float
        Scale factor (above 1 enlarges).

    Returns
    -------
    tuple of int
        ``(round(H * factor), round(W * factor))``, each at least 1.
    """
    return max(1, int(round(shape[0] * factor))), max(1, int(round(shape[1] * factor)))


def object_diameters(labels: np.ndarray) -> np.ndarray:
    """Equivalent-circle diameter ``2 sqrt(area / pi)`` of every object, in pixels.

    Parameters
    ----------
    labels : array_like
        Non-negative integer labels (any shape), 0 background.

    Returns
    -------
    numpy.ndarray
        float64 diameters, one per id present, in id order.
    """
    areas = np.bincount(np.asarray(labels).ravel().astype(np.int64))[1:]
    areas = areas[areas > 0]
    return 2.0 * np.sqrt(areas / np.pi)


def median_diameter(labels: np.ndarray) -> float | None:
    """Median equivalent-circle diameter of the objects, ``None`` when there are none.

    Parameters
    ----------
    labels : array_like
        Non-negative integer labels (any shape), 0 background.

    Returns
    -------
    float or None
        The median of :func:`object_diameters`, in pixels of ``labels``.
    """
    d = object_diameters(labels)
    return float(np.median(d)) if len(d) else None


def scale_factor(model_diameter: float | None, image_diameter: float | None) -> float:
    """How much to enlarge the image so its nuclei match the model's: 1.0 when either is unknown.

    Clamped to ``[1/8, 8]``; corrections within :data:`TOLERANCE` are dropped; the
    rest are rounded to steps of 2^(1/16).

    Parameters
    ----------
    model_diameter : float or None
        Nucleus diameter the model was trained at (``spec.diameter``, network pixels); None or 0 for a
        model without one.
    image_diameter : float or None
        Nucleus diameter in image pixels (given or estimated); None or 0 when unknown.

    Returns
    -------
    float
        Factor to resample the image by (above 1 enlarges): 1.0, or a power of 2^(1/16) in ``[1/8, 8]``.
    """
    if not model_diameter or not image_diameter:
        return 1.0
    f = float(np.clip(model_diameter / image_diameter, MIN_FACTOR, MAX_FACTOR))
    if abs(np.log(f)) < np.log1p(TOLERANCE):
        return 1.0
    # steps of 2^(1/16) (4.4 %): images of one size and similar nuclei get the same tile shapes, so
    # backends that compile per shape (OpenVINO, TensorRT) compile once
    return float(2.0 ** (round(np.log2(f) * STEPS_PER_OCTAVE) / STEPS_PER_OCTAVE))


def diameter_from_microns(diameter_um: float, pixel_size_um: float) -> float:
    """Diameter in pixels of an object ``diameter_um`` across at ``pixel_size_um`` per pixel.

    Parameters
    ----------
    diameter_um : float
        Object diameter in micrometres.
    pixel_size_um : float
        Pixel size in micrometres.

    Returns
    -------
    float
        Diameter in image pixels.

    Raises
    ------
    ValueError
        When either is zero or negative.
    """
    if diameter_um <= 0 or pixel_size_um <= 0:
        raise ValueError("diameter and pixel size must be positive")
    return diameter_um / pixel_size_um


def rescale_sample(image: np.ndarray, labels: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """An image ``(C, H, W)`` and its labels resampled by ``factor`` (for training).

    Parameters
    ----------
    image : numpy.ndarray
        (C, H, W) normalized image.
    labels : numpy.ndarray
        (H, W) integer labels, 0 background.
    factor : float
        Scale factor (above 1 enlarges), e.g. from :func:`scale_factor`.

    Returns
    -------
    image : numpy.ndarray
        (C, H', W') float32, linearly interpolated (:func:`resize`); ``image`` itself when ``factor`` is 1.0.
    labels : numpy.ndarray
        (H', W') nearest-neighbour labels, in the dtype of ``labels``; ``labels`` itself when ``factor`` is 1.0.
    """
    if factor == 1.0:
        return image, labels
    shape = scaled_shape(labels.shape, factor)
    return resize(image, shape), resize_labels(labels, shape)


def _overhead(reach_out: float, net_halo: int, multiple: int) -> float:
    """Network pixels a grid tile needs beyond its core's span, at most: the interpolation's reach and the
    network's halo on both sides, a pixel of rounding each, and the window's start put on the stride grid."""
    return 2 * reach_out + 2 * net_halo + 2 + multiple - 1


class GridScaling:
    """The network runs on one resampled grid for the whole plane, whatever the tiling.

    Network pixel ``r`` of an axis is centred on image coordinate
    ``(r + 0.5) / factor - 0.5``, for the plane as a whole: a tile's
    network input is cut from that grid (at its own offset in it), and its
    output is resampled back onto the image pixels of its core from the
    same grid.  So a pixel's value depends on where it is in the plane,
    never on where the tile seams fall, and with the halos wide enough for
    the network's receptive field and the interpolation's reach, the
    labels are those of one whole-plane pass for any tile size (resampling
    each tile from its own origin moved the grid by a fraction of a pixel
    between tilings).  Interpolation is linear (a triangle filter widened
    by the shrink factor when shrinking, as :func:`resize`), applied as a
    few weighted taps per output pixel.

    ``tile`` is the wanted core in network pixels (as at native scale);
    cores in image pixels are as even over the plane as that allows, and a
    network of declared input sizes (``ModelSpec.input_min``) gets exactly
    one it takes.  :attr:`tile_shape` and :attr:`halo` (image pixels) are
    the tiling the pipeline reads with.
    """

    def __init__(self, factor: float, spec, tile: int, plane: tuple[int, int]):
        from ..errors import InputError
        from .tiling import round_up

        f = self.factor = float(factor)
        m = spec.multiple
        self.net_halo = round_up(spec.halo, m)  # network pixels around what the back-resampling needs
        self.reach_in = max(1.0, 1.0 / f)  # image pixels a network pixel interpolates from
        self.reach_out = max(1.0, f)  # network pixels an image pixel interpolates from

        self.multiple = m
        cores, nets = [], []
        for axis, n in enumerate(plane):
            core = min(n, max(1, int(round(tile / f))))
            core = -(-n // -(-n // core))  # as few cores as that allows, of equal size
            # the window each tile actually needs (its start on the stride grid): often a stride less than the
            # worst case, which keeps the network's tiles at the size the estimate's looks use
            need = max(self._window(c0, core)[1] for c0 in range(0, n, core))
            net = round_up(need, m) if spec.input_min is None else spec.input_size((need, need))[axis]
            if net < need:  # a fixed-size network: the core is what its input holds, at worst
                core = int(np.floor((net - _overhead(self.reach_out, self.net_halo, m)) / f)) + 1
                if core < 1:
                    raise InputError(f"the network's {net} px input leaves no room for its "
                                     f"{self.net_halo} px halo at {f:.2f}x scale")
            cores.append(core)
            nets.append(net)
        self.cores, self.net_shape = tuple(cores), tuple(nets)
        halo = max(max((m + self.reach_out + self.net_halo) / f + self.reach_in,
                       (net - 1 - self.reach_out - self.net_halo) / f + self.reach_in + 1 - core)
                   for core, net in zip(cores, nets))
        self.halo = round_up(int(np.ceil(halo)) + 1, m)  # as the pipeline rounds it
        self.tile_shape = tuple(c + 2 * self.halo for c in cores)
        self._taps: dict[tuple[str, int, int], tuple[np.ndarray, np.ndarray]] = {}

    @staticmethod
    def bound(spec, tile: int) -> tuple[int, int]:
        """The largest network input ``(h, w)`` a segmentation at ``tile`` sends, at any scale.

        At the image's own scale a tile is ``tile`` plus the halo on each
        side (rounded to the stride); resampled, the grid's tiles add the
        interpolation's reach (``factor`` network pixels at most
        :data:`MAX_FACTOR`) and the stride alignment.  What an engine's shape
        profile must hold (TensorRT) so that no batch is refused.
        """
        from .tiling import round_up

        m, net_halo = spec.multiple, round_up(spec.halo, spec.multiple)
        fixed = spec.input_size((1, 1)) if spec.input_min is not None and not any(spec.input_step or ()) else None
        if fixed is not None:
            return fixed
        # a core of round(tile / f) image pixels spans at most ``tile`` network pixels, the reach at most MAX_FACTOR
        worst = int(np.ceil(tile + _overhead(MAX_FACTOR, net_halo, m)))
        side = max(round_up(tile, m) + 2 * net_halo, round_up(worst, m))
        return (side, side) if spec.input_min is None else spec.input_size((side, side))

    def _window(self, core_start: int, core: int) -> tuple[int, int]:
        """First network pixel and network pixels needed by the tile whose core is ``core_start``.. + ``core``."""
        f = self.factor
        first = int(np.floor((core_start + 0.5) * f - 0.5 - self.reach_out)) - self.net_halo
        first = first // self.multiple * self.multiple
        last = int(np.floor((core_start + core - 0.5) * f - 0.5 + self.reach_out)) + self.net_halo
        return first, last + 1 - first

    def _net_start(self, origin: int) -> int:
        """First network pixel of the tile whose read starts at image pixel ``origin``.

        A multiple of the network's stride: a U-Net's output shifts with its
        input only by whole strides, so every tile sits on the stride grid.
        """
        return self._window(origin + self.halo, 0)[0]

    def _tap(self, kind: str, axis: int, origin: int) -> tuple[np.ndarray, np.ndarray]:
        """``(index, weight)``, each ``(n_out, taps)``: which input pixels make each output pixel, and how much."""
        key = (kind, axis, origin)
        got = self._taps.get(key)
        if got is not None:
            return got
        start = self._net_start(origin)
        if kind == "in":  # tile pixels (from ``origin``) -> network pixels (from ``start``)
            centres = (start + np.arange(self.net_shape[axis]) + 0.5) / self.factor - 0.5 - origin
            reach, n_in = self.reach_in, self.tile_shape[axis]
        else:  # network pixels (from ``start``) -> the core's image pixels
            core_start = origin + self.halo
            centres = (core_start + np.arange(self.cores[axis]) + 0.5) * self.factor - 0.5 - start
            reach, n_in = self.reach_out, self.net_shape[axis]
        k = int(np.ceil(reach))
        idx = np.floor(centres)[:, None].astype(np.int64) + np.arange(-k, k + 2)[None, :]
        w = np.clip(1.0 - np.abs(idx - centres[:, None]) / reach, 0.0, None)
        w /= w.sum(axis=1, keepdims=True)
        got = (np.clip(idx, 0, n_in - 1), w.astype(np.float32))
        self._taps[key] = got
        return got

    def _resample(self, x: np.ndarray, kind: str, origin: tuple[int, int]) -> np.ndarray:
        for axis, pos in ((0, origin[0]), (1, origin[1])):
            idx, w = self._tap(kind, axis, pos)
            along = -2 + axis
            shape = (-1, 1) if axis == 0 else (-1,)
            out = np.take(x, idx[:, 0], axis=along) * w[:, 0].reshape(shape)
            for t in range(1, idx.shape[1]):
                out += np.take(x, idx[:, t], axis=along) * w[:, t].reshape(shape)
            x = out
        return x

    def to_network(self, tiles: np.ndarray, origins: list[tuple[int, int]]) -> np.ndarray:
        """``(B, C, *tile_shape)`` image tiles read from ``origins`` -> ``(B, C, *net_shape)`` network input."""
        return np.stack([self._resample(t, "in", o) for t, o in zip(tiles, origins)])

    def to_image(self, outputs: np.ndarray, origins: list[tuple[int, int]]) -> np.ndarray:
        """``(B, K, *net_shape)`` network outputs -> ``(B, K, *cores)``: each tile's core in image pixels."""
        return np.stack([self._resample(o, "out", org) for o, org in zip(outputs, origins)])


# The estimate also measures the nuclei at these scales (coarsest first); a scale qualifies when
# the nuclei it shows are within ESTIMATE_RANGE of the model's training size ...
ESTIMATE_SCALES = (0.25, 0.5)
ESTIMATE_RANGE = 1.5
# ... and only when its nuclei are at least this much bigger than the native measurement says
# (the native pass split them); otherwise the coarse pass only saw small nuclei blur into blobs.
# 1.5, not 2: textured nuclei of 40-60 px (nucleoli, chromatin) come out of the native pass in pieces
# of 20-30 px, half to two thirds their size, and at 2.0 the right coarse answer was refused
# (held-out synthetic hard set: AP50 0.711 -> 0.736 with v2; DSB2018 val 0.8218 -> 0.8244).
ESTIMATE_SPLIT = 1.5
# A scaled image smaller than this says too little (at a quarter of a 256 px image, clusters of small
# cells merge into blobs of about the training size), and small images skip the coarse looks, which
# on the 2-core CPU nearly doubled the time of a 256 px image (the network's first call after other
# work is slow: 60 ms instead of 30 for a 384 px input with nuclei-light on OpenVINO).
ESTIMATE_MIN_SIDE = 160
# The refined look (small or big nuclei, measured again at the scale the first look asks for) needs
# only enough nuclei for a median: it sees at most this many network pixels per side, around the
# centre, whenever that holds at least REFINE_MIN_OBJECTS whole nuclei.  Run on the whole resampled
# image (small nuclei: up to 8x larger per side), it cost more than the segmentation itself on
# small images: the estimate took 60 % of segment_job's time over a folder of mixed DSB2018 images.
REFINE_SIDE = 512
REFINE_MIN_OBJECTS = 10


def estimate_diameter(
    image: np.ndarray, spec, predict, *, tile: int = 512
) -> float | None:
    """Median nucleus diameter, in image pixels, of a normalized ``(C, H, W)`` image.

    Pass a crop of a large image (``segment_job`` reads its centre 1024 px
    square).  The network runs on the image at its own scale and the median
    equivalent-circle diameter of its instances is the estimate, measured
    once more after resampling when it is far from ``spec.diameter`` (small
    nuclei; on the centre that resamples to at most 512 px a side, when it
    holds 10 whole nuclei).  The network's answer leans toward the size it was trained on:
    it cuts nuclei several times bigger into pieces of about that size.  So
    the image is also measured at 1/4 and 1/2 scale (when that leaves at
    least 160 px); the coarsest of them at which the nuclei come out within
    1.5x of the training size, and at least 1.5x as big as the native pass
    says, wins.  (Without the last condition, small cells that blur into
    blobs at a coarse scale would pass for big ones.)  ``None`` when no
    object is found.

    Parameters
    ----------
    image : numpy.ndarray
        (C, H, W) float32 normalized image, as the network reads it (non-finite pixels made background).
    spec : ModelSpec
        The model's card: ``diameter`` (the training size in network pixels; must be set), ``halo``,
        ``multiple``, input sizes and post-processing.
    predict : callable
        ``predict(batch, crop)`` -> (B, K, h, w) outputs of a (B, C, h, w) batch; called with ``crop=None``.
    tile : int
        Tile side of each look, in network pixels.

    Returns
    -------
    float or None
        The median nucleus diameter in image pixels, or None.
    """
    from ..jobs import run_sync
    from .postprocess import network_instances
    from .tiling import predict_tiled

    def measure(factor: float, min_objects: int = 1, x: np.ndarray = image) -> float | None:
        cropped = x.shape != image.shape
        x = resize(x, scaled_shape(x.shape[-2:], factor)) if factor != 1.0 else x
        out = run_sync(predict_tiled(x, lambda b: predict(b, None), tile=tile, halo=spec.halo,
                                     multiple=spec.multiple, batch_size=1,
                                     tile_shape=spec.tile_shape(tile, x.shape[-2:])))
        labels, _ = network_instances(out, spec)
        if cropped:  # nuclei cut by the crop's edges would pull the median down
            edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
            labels = np.where(np.isin(labels, edge[edge > 0]), 0, labels)
        d = object_diameters(labels)
        return float(np.median(d)) if len(d) >= min_objects else None  # in network pixels

    d = measure(1.0)
    if d is None:
        return None
    for factor in ESTIMATE_SCALES:
        if min(image.shape[-2:]) * factor < ESTIMATE_MIN_SIDE:
            continue
        coarse = measure(factor, min_objects=2)
        if (coarse is not None and abs(np.log(coarse / spec.diameter)) <= np.log(ESTIMATE_RANGE)
                and coarse / factor >= ESTIMATE_SPLIT * d):
            return coarse / factor
    step = scale_factor(spec.diameter, d)
    if abs(np.log(step)) >= np.log(1.5):
        h, w = image.shape[-2:]
        ch, cw = (min(n, max(1, int(REFINE_SIDE / step))) for n in (h, w))
        refined = None
        if (ch, cw) != (h, w):  # the centre, whose resampled size is at most REFINE_SIDE
            centre = image[..., (h - ch) // 2 : (h - ch) // 2 + ch, (w - cw) // 2 : (w - cw) // 2 + cw]
            refined = measure(step, min_objects=REFINE_MIN_OBJECTS, x=centre)
        if refined is None:  # the image is that small, or too few nuclei in its centre
            refined = measure(step)
        if refined is not None:
            return refined / step
    return d
