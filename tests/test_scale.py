"""Object scale: resampling, diameter estimates, and segmenting at the model's scale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from segstudio.core.backends import create_backend
from segstudio.core.image.io import ImageData
from segstudio.core.image.sources import read_image
from segstudio.core.jobs import run_sync
from segstudio.core.models.catalog import get_model
from segstudio.core.segment.job import segment_job
from segstudio.core.segment.options import Diameter, SegmentOptions
from segstudio.core.segment.scale import (
    GridScaling,
    median_diameter,
    resize,
    resize_labels,
    scale_factor,
    scaled_shape,
)
from segstudio.core.tasks.evaluate import score

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def test_resize_keeps_mean_and_constant_images():
    rng = np.random.default_rng(0)
    x = rng.random((2, 37, 53)).astype(np.float32)
    for shape in [(74, 106), (19, 27), (10, 200)]:
        y = resize(x, shape)
        assert y.shape == (2, *shape) and y.dtype == np.float32
        assert abs(float(y.mean()) - float(x.mean())) < 5e-3
    c = np.full((1, 30, 30), 7.0, np.float32)
    assert np.allclose(resize(c, (13, 71)), 7.0)
    assert resize(x, (37, 53)) is not None and np.array_equal(resize(x, (37, 53)), x)


def test_resampling_matrices_are_cached_within_a_size_limit():
    """Every image size and scale brings new matrices: the cache keeps the recent ones, up to its byte limit."""
    from segstudio.core.segment.scale import _interpolation_matrix, _MatrixCache

    cache = _MatrixCache(max_bytes=4 * 2**20)
    rng = np.random.default_rng(1)
    for _ in range(60):
        n_in, n_out = (int(v) for v in rng.integers(200, 1500, 2))
        m = cache.get(n_in, n_out)
        assert m.shape == (n_out, n_in) and not m.flags.writeable
        np.testing.assert_array_equal(m, _interpolation_matrix(n_in, n_out))
        assert cache.nbytes <= cache.max_bytes or len(cache._items) == 1
        assert cache.nbytes == sum(v.nbytes for v in cache._items.values())
    assert cache.get(n_in, n_out) is m  # the most recent one is kept


def test_resize_labels_and_factors():
    lab = np.zeros((40, 40), np.int32)
    lab[10:20, 10:20] = 3
    big = resize_labels(lab, (80, 80))
    assert set(np.unique(big)) == {0, 3} and (big == 3).sum() == 400
    assert median_diameter(lab) == pytest.approx(2 * np.sqrt(100 / np.pi))
    assert median_diameter(np.zeros((5, 5), np.int32)) is None
    assert scale_factor(20, 10) == 2.0
    assert scale_factor(20, 13.0) == pytest.approx(20 / 13, rel=0.023) and scale_factor(20, 13.0) == scale_factor(20, 13.1)
    assert scale_factor(20, 19) == 1.0  # within tolerance: used as is
    assert scale_factor(20, 1000) == 0.125  # clamped
    assert scale_factor(None, 10) == 1.0 and scale_factor(20, None) == 1.0
    assert scaled_shape((100, 50), 1.5) == (150, 75)


def _through_grid(x: np.ndarray, spec, factor: float, tile: int, predict=lambda b: b) -> np.ndarray:
    """``x`` ``(C, H, W)`` tile by tile through a :class:`GridScaling` and ``predict``, as the pipeline does."""
    from segstudio.core.segment.tiling import plan_tiles, read_region

    g = GridScaling(factor, spec, tile, x.shape[-2:])
    plan = plan_tiles(x.shape[-2:], tile=tile, halo=g.halo, multiple=spec.multiple, tile_shape=g.tile_shape)
    out = None
    for t in plan.tiles:
        origin = [(t.read[0][0], t.read[1][0])]
        net_in = g.to_network(read_region(x, t.read)[None], origin)
        assert net_in.shape[-2:] == g.net_shape
        assert g._net_start(origin[0][0]) % spec.multiple == 0 and g._net_start(origin[0][1]) % spec.multiple == 0
        o = g.to_image(predict(net_in), origin)[0]
        out = np.zeros((o.shape[0], *x.shape[-2:]), np.float32) if out is None else out
        out[(slice(None), *t.out)] = o[:, : t.out[0].stop - t.out[0].start, : t.out[1].stop - t.out[1].start]
    return out


@pytest.mark.parametrize("factor", [2 ** 0.5, 0.74, 3.0, 0.3])
def test_grid_scaling_does_not_depend_on_the_tiling(factor):
    """Resampled to the network's grid and back, tile by tile: bit-identical for every tile size."""
    spec = get_model("nuclei").spec
    x = np.random.default_rng(0).random((1, 300, 410)).astype(np.float32)
    outs = [_through_grid(x, spec, factor, t) for t in (64, 160, 1024)]
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    # a linear ramp comes back as itself away from the borders (linear interpolation both ways)
    ramp = np.broadcast_to(np.arange(300, dtype=np.float32)[:, None] * 0.5 + np.arange(410) * 0.25, (1, 300, 410))
    back = _through_grid(np.ascontiguousarray(ramp), spec, factor, 160)
    inner = (slice(None), slice(20, -20), slice(20, -20))
    assert np.abs(back[inner] - ramp[inner]).max() < 0.05  # of values 15..240


def test_grid_scaling_gives_a_fixed_size_network_its_size():
    from dataclasses import replace

    spec = replace(get_model("nuclei").spec, input_min=(256, 256), input_step=(0, 0))
    for factor in (1.5, 0.6):
        g = GridScaling(factor, spec, 512, (700, 90))
        assert g.net_shape == (256, 256) and all(c >= 1 for c in g.cores)
        x = np.random.default_rng(1).random((1, 700, 90)).astype(np.float32)
        assert _through_grid(x, spec, factor, 512).shape == (1, 700, 90)


@pytest.fixture(scope="module")
def nuclei():
    model = get_model("nuclei")
    with create_backend("onnxruntime", model) as backend:
        yield model, backend


def _upscaled(factor: int):
    img = read_image(SAMPLE / "0287e7ee5b00_img.tif")
    truth = read_image(SAMPLE / "0287e7ee5b00_labels.tif").data
    data = np.kron(img.data, np.ones((factor, factor), img.data.dtype)) if factor > 1 else img.data
    big_truth = np.kron(truth, np.ones((factor, factor), truth.dtype)) if factor > 1 else truth
    return ImageData(data, img.axes, name=f"x{factor}"), truth, big_truth


def test_diameter_is_estimated_and_the_image_resampled(nuclei):
    """The same nuclei at 3x the size: the estimate follows, and the labels still match the truth."""
    model, backend = nuclei
    if not model.spec.diameter:
        pytest.skip("the built-in model has no trained diameter")
    image, truth, _ = _upscaled(1)
    small = run_sync(segment_job(image, model, backend, SegmentOptions(measure_cells=False)))
    big_image, _, big_truth = _upscaled(3)
    big = run_sync(segment_job(big_image, model, backend, SegmentOptions(measure_cells=False)))
    true_d = median_diameter(truth)
    assert small.diameter == pytest.approx(true_d, rel=0.25)
    assert big.diameter == pytest.approx(3 * true_d, rel=0.25)
    assert big.scale < 0.5 and any("resampled" in n for n in big.notices)
    assert big.labels.shape[-2:] == big_truth.shape  # labels in image pixels
    ap_small = score(truth, small.labels.reshape(truth.shape)).ap[0.5]
    ap_big = score(big_truth, big.labels.reshape(big_truth.shape)).ap[0.5]
    assert ap_big > ap_small - 0.1, (ap_small, ap_big)
    # a diameter given by the user is used as is; "native" runs the image unresampled
    given = run_sync(segment_job(big_image, model, backend, SegmentOptions(measure_cells=False, diameter=3 * true_d)))
    assert given.diameter == 3 * true_d and given.scale == pytest.approx(model.spec.diameter / (3 * true_d), rel=0.023)
    native = run_sync(segment_job(big_image, model, backend, SegmentOptions(measure_cells=False, diameter="native")))
    assert native.scale == 1.0


@pytest.mark.parametrize("sample,zoom", [
    ("20c37b1ad2f5", 2.0),  # very dim, nuclei 82 px across: the network alone splits them into ~20 px pieces
    ("4327d2759187", 2.0),  # dim, 67 px
    ("4327d2759187", 1.0),  # dim, 34 px
    ("0287e7ee5b00", 0.5),  # 9 px
])
def test_estimate_holds_from_small_to_big_dim_nuclei(nuclei, sample, zoom):
    """Real images resampled so their nuclei span 9 to 82 px: the estimate stays within 1.5x of the truth.

    (Before the coarse passes, the three big-nuclei cases came out at 0.19x, 0.40x and 0.58x.)
    """
    from segstudio.core.segment.preprocess import normalize, sample_percentiles, select_channels
    from segstudio.core.segment.scale import estimate_diameter

    model, backend = nuclei
    spec = model.spec
    img = read_image(SAMPLE / f"{sample}_img.tif").data.astype(np.float32)
    truth = read_image(SAMPLE / f"{sample}_labels.tif").data
    plane = select_channels(img.reshape(-1, *img.shape[-2:])[:1], spec.input_channels, None)
    shape = scaled_shape(plane.shape[-2:], zoom)
    x = resize(plane, shape)
    pct = sample_percentiles(lambda y0, y1: x[:, y0:y1], shape, spec.normalization, lambda b: b)
    d = estimate_diameter(normalize(x, spec.normalization, pct), spec, backend.predict)
    true_d = median_diameter(resize_labels(truth, shape))
    assert d is not None and abs(np.log(d / true_d)) < np.log(1.5), (d, true_d)


def test_diameter_in_micrometres_needs_a_pixel_size(nuclei, tmp_path):
    import threading

    from segstudio.core.errors import InputError

    model, backend = nuclei
    image, truth, _ = _upscaled(1)
    with pytest.raises(InputError, match="pixel size"):
        run_sync(segment_job(image, model, backend, SegmentOptions(measure_cells=False, diameter=Diameter("um", 8.0))))
    threads = threading.active_count()
    with pytest.raises(InputError, match="pixel size"):  # refused before the labels file is opened
        run_sync(segment_job(image, model, backend, SegmentOptions(diameter=Diameter("um", 8.0)),
                             labels_path=tmp_path / "labels.tif"))
    assert list(tmp_path.iterdir()) == [] and threading.active_count() == threads
    if not model.spec.diameter:
        return
    sized = ImageData(image.data, image.axes, pixel_size=(0.5, 0.5), name="sized")
    d_um = median_diameter(truth) * 0.5
    res = run_sync(segment_job(sized, model, backend, SegmentOptions(measure_cells=False, diameter=Diameter("um", d_um))))
    assert res.diameter == pytest.approx(median_diameter(truth))


HARD = Path(__file__).resolve().parent / "data" / "hard_nuclei"


@pytest.mark.parametrize("name", ["hard900015", "hard900020", "hard900004"])
def test_estimate_holds_on_large_textured_nuclei(nuclei, name):
    """Nuclei 53-57 px with nucleoli and chromatin, which the native pass cuts into pieces of about 20-30 px.

    The half-scale pass sees them whole at 1.6-1.95x the native answer; with ESTIMATE_SPLIT 2.0 that was
    refused and the image barely resampled (a v3 training checkpoint: 0.38x-0.53x the truth; v2 fails
    two of the three).
    """
    from segstudio.core.segment.preprocess import normalize, select_channels
    from segstudio.core.segment.scale import estimate_diameter

    model, backend = nuclei
    spec = model.spec
    img = read_image(HARD / f"{name}_img.tif")
    truth = read_image(HARD / f"{name}_labels.tif").data
    x = normalize(select_channels(next(img.planes())[1], 1, None), spec.normalization)
    d = estimate_diameter(x, spec, backend.predict)
    assert d is not None and abs(np.log(d / median_diameter(truth))) < np.log(1.5), (d, median_diameter(truth))


def test_engine_profiles_follow_the_requested_tile_and_batch(monkeypatch):
    """A fixed-shape engine (TensorRT) is built for the tile and batch the run asks for, and every batch the
    segmentation then sends, at any scale, the estimate's included, fits that profile."""
    from segstudio.core.backends import registry
    from segstudio.core.backends.engine_cache import default_profile

    model = get_model("nuclei-light")
    spec = model.spec
    built = {}

    class Engine:  # stands in for TensorRTBackend: records what create_variant gives it
        package, install_hint, devices, gpu_devices, takes_profile = "numpy", "", ("cpu",), ("cuda",), True

        @classmethod
        def model_file(cls, device, precision):
            return "onnx"

        def __init__(self, model, variant, *, tile_shape, batch_size):
            built.update(tile_shape=tile_shape, batch_size=batch_size)

    img = read_image(SAMPLE / "6fe2df6de1d9_img.tif")
    with create_backend("onnxruntime", model) as ort:
        monkeypatch.setattr(registry, "backend_class", lambda name: Engine)
        monkeypatch.setattr(registry, "parse_variant", lambda text: registry.Variant("fake", "cpu", "fp32"))
        for tile, batch in ((256, 2), (512, 4)):
            registry.create_variant("fake", model, tile=tile, batch_size=batch)
            profile = default_profile(spec.input_channels, spec.multiple, built["tile_shape"], built["batch_size"])
            assert built["batch_size"] == batch and built["tile_shape"] == GridScaling.bound(spec, tile)
            seen = []

            class Recording:
                device = "cpu"

                def predict(self, x, crop=None):
                    seen.append(x.shape)
                    return ort.predict(x, crop)

                def describe(self):
                    return "recording"

            for diameter in (None, 6.0, 14.0, 30.0, 60.0, "native"):
                run_sync(segment_job(img, model, Recording(), SegmentOptions(tile=tile, batch_size=batch, diameter=diameter)))
            assert seen and all(profile.covers(s) for s in seen), (tile, built, sorted(set(seen)))
            # the profile is not far bigger than what is sent (an engine built for it wastes nothing much)
            assert max(s[-1] for s in seen) > 0.9 * built["tile_shape"][1]
