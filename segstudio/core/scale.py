"""Object scale: measuring nucleus diameters and resampling images to a model's scale.

A built-in model is trained with every image resampled so that its nuclei
are ``ModelSpec.diameter`` pixels across (the median equivalent-circle
diameter).  At inference the image is resampled by ``diameter / d`` where
``d`` is the diameter of the user's nuclei in image pixels: given directly
(``--diameter``), from a pixel size and a diameter in micrometres, or
estimated from a first pass of the network (:func:`estimate_diameter`).
The network's outputs are resampled back to the image grid before
post-processing, so labels and measurements are always in the user's pixels.

Resampling is separable linear interpolation written as two small matrix
products (``Ry @ X @ Rx.T``); when shrinking, the triangle filter widens by
the shrink factor so it averages instead of skipping pixels (no aliasing).
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
    """Resample the last two axes of a float array to ``shape`` (float32)."""
    h, w = arr.shape[-2:]
    if (h, w) == tuple(shape):
        return arr.astype(np.float32, copy=False)
    ry, rx = _matrix(h, shape[0]), _matrix(w, shape[1])
    x = arr.astype(np.float32, copy=False)
    return np.ascontiguousarray(np.matmul(np.matmul(ry, x), rx.T))


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resampling of a label image (pixel centres aligned)."""
    h, w = labels.shape[-2:]
    if (h, w) == tuple(shape):
        return labels
    yi = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(int), h - 1)
    xi = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(int), w - 1)
    return labels[..., yi[:, None], xi[None, :]]


def scaled_shape(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    return max(1, int(round(shape[0] * factor))), max(1, int(round(shape[1] * factor)))


def object_diameters(labels: np.ndarray) -> np.ndarray:
    """Equivalent-circle diameter ``2 sqrt(area / pi)`` of every object, in pixels."""
    areas = np.bincount(np.asarray(labels).ravel().astype(np.int64))[1:]
    areas = areas[areas > 0]
    return 2.0 * np.sqrt(areas / np.pi)


def median_diameter(labels: np.ndarray) -> float | None:
    """Median equivalent-circle diameter of the objects, ``None`` when there are none."""
    d = object_diameters(labels)
    return float(np.median(d)) if len(d) else None


def scale_factor(model_diameter: float | None, image_diameter: float | None) -> float:
    """How much to enlarge the image so its nuclei match the model's: 1.0 when either is unknown.

    Clamped to ``[1/8, 8]``; corrections within :data:`TOLERANCE` are dropped; the
    rest are rounded to steps of 2^(1/16).
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
    """Diameter in pixels of an object ``diameter_um`` across at ``pixel_size_um`` per pixel."""
    if diameter_um <= 0 or pixel_size_um <= 0:
        raise ValueError("diameter and pixel size must be positive")
    return diameter_um / pixel_size_um


def rescale_sample(image: np.ndarray, labels: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """An image ``(C, H, W)`` and its labels resampled by ``factor`` (for training)."""
    if factor == 1.0:
        return image, labels
    shape = scaled_shape(labels.shape, factor)
    return resize(image, shape), resize_labels(labels, shape)


class ScaledPredict:
    """A network call that runs at ``factor`` times the image's scale.

    Each ``(B, C, h, w)`` batch is resampled to about ``factor`` times its
    size (rounded up to the network's input ``multiple``), run, and the
    outputs resampled back to ``(h, w)`` before the ``crop`` window is cut:
    the caller sees image-pixel outputs as if the network ran natively.
    ``shape``: the one input size a network takes (fixed-size networks):
    every batch is resampled to exactly that.
    """

    def __init__(self, predict, factor: float, multiple: int, describe: str = "",
                 shape: tuple[int, int] | None = None):
        self.predict, self.factor, self.multiple = predict, factor, multiple
        self._describe = describe
        self.shape = shape

    def __call__(self, batch: np.ndarray, crop: tuple[slice, slice] | None = None) -> np.ndarray:
        h, w = batch.shape[-2:]
        m = self.multiple
        shape = self.shape or tuple(max(m, -(-int(round(n * self.factor)) // m) * m) for n in (h, w))
        out = resize(self.predict(resize(batch, shape), None), (h, w))
        return out if crop is None else out[(Ellipsis, *crop)]

    def describe(self) -> str:
        return f"{self._describe} at {self.factor:.2f}x scale"


def image_tiling(tile: int, halo: int, factor: float) -> tuple[int, int]:
    """Tile and halo in image pixels that give the network about ``tile`` and ``halo`` of its own pixels."""
    return max(32, int(round(tile / factor))), int(np.ceil(halo / factor))


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
    """
    from .jobs import run_sync
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
