"""The streaming pipeline: lazy sources, sinks, seams, cancel, bounded work."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tifffile

from segstudio.core.errors import Cancelled
from segstudio.core.image.io import as_image
from segstudio.core.image.sinks import ArraySink, TiffSink
from segstudio.core.image.sources import open_source, read_image, source_from_image
from segstudio.core.jobs import CancelToken, run_sync
from segstudio.core.models.spec import ModelSpec, Normalization, PostprocessParams, UNetConfig
from segstudio.core.segment.options import SegmentOptions
from segstudio.core.segment.pipeline import PlaneSettings, PlaneView, segment_plane_job
from segstudio.core.segment.postprocess import fg_dist_to_labels
from segstudio.core.segment.preprocess import channel_percentiles, sample_percentiles
from segstudio.core.tasks.evaluate import score
from segstudio.core.training.train import distance_target

# ------------------------------------------------------------------ sources

SOURCE_CASES = {
    "zcyx_ij.tif": ((2, 3, 100, 120), np.uint16, dict(imagej=True, metadata={"axes": "ZCYX"})),
    "rgb.tif": ((100, 120, 3), np.uint8, dict(photometric="rgb")),
    "tiled.tif": ((300, 200), np.uint16, dict(tile=(64, 64), compression="zlib")),
    "strips.tif": ((300, 200), np.uint16, dict(compression="zlib", rowsperstrip=16)),
    "big_endian.tif": ((300, 200), np.uint16, dict(byteorder=">")),
    "tcyx.ome.tif": ((2, 2, 90, 70), np.uint16, dict(ome=True, metadata={"axes": "TCYX", "PhysicalSizeX": 0.5,
                                                                         "PhysicalSizeY": 0.5})),
}


@pytest.mark.parametrize("name", SOURCE_CASES)
def test_lazy_source_reads_what_read_image_reads(tmp_path, name):
    shape, dtype, kwargs = SOURCE_CASES[name]
    a = np.random.default_rng(1).integers(0, 200, shape).astype(dtype)
    tifffile.imwrite(tmp_path / name, a, **kwargs)
    ref = read_image(tmp_path / name)
    with open_source(tmp_path / name, eager_bytes=0) as src:  # force lazy reading
        assert src.axes == ref.axes and src.shape == ref.data.shape and src.pixel_size == ref.pixel_size
        for idx, (_, plane) in zip(src.stack_indices(), ref.planes()):
            got = src.read(idx, (10, 50), (5, 60))
            assert got.dtype.isnative
            np.testing.assert_array_equal(got, plane[:, 10:50, 5:60])


def test_truncated_lazy_tiff_is_an_input_error(tmp_path):
    tifffile.imwrite(tmp_path / "t.tif", np.ones((400, 400), np.uint16))
    data = (tmp_path / "t.tif").read_bytes()
    (tmp_path / "t.tif").write_bytes(data[: len(data) // 2])
    from segstudio.core.errors import InputError

    with open_source(tmp_path / "t.tif", eager_bytes=0) as src, pytest.raises(InputError, match="truncated"):
        src.read((), (300, 400), (0, 400))


def test_sampled_percentiles_close_to_exact():
    rng = np.random.default_rng(0)
    plane = rng.gamma(2.0, 300.0, (1, 3000, 2000)).astype(np.float32)
    norm = Normalization()
    exact = channel_percentiles(plane, norm)
    sampled = sample_percentiles(lambda y0, y1: plane[:, y0:y1], (3000, 2000), norm, lambda b: b)
    assert np.allclose(sampled, exact, rtol=0.03)


# ------------------------------------------------------------------ sinks


@pytest.mark.parametrize("n_objects,dtype", [(500, np.uint16), (70_000, np.uint32)])
def test_tiff_sink_streams_rows_and_narrows(tmp_path, n_objects, dtype):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, n_objects + 1, (2, 700, 530)).astype(np.uint32)
    sink = TiffSink(tmp_path / "l.tif", (2,), (700, 530), pixel_size=(0.5, 0.5), tile=256)
    for z in range(2):
        for y0 in range(0, 700, 96):
            sink.write((z,), y0, labels[z, y0 : y0 + 96])
    path = sink.finish(n_objects)
    back = read_image(path)
    assert back.data.dtype == dtype and back.pixel_size == pytest.approx((0.5, 0.5))
    np.testing.assert_array_equal(back.data, labels)
    assert [p.name for p in tmp_path.iterdir()] == ["l.tif"]


def test_tiff_sink_abort_leaves_nothing(tmp_path):
    sink = TiffSink(tmp_path / "l.tif", (), (300, 300))
    sink.write((), 0, np.ones((100, 300), np.uint32))
    sink.abort()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ seams


def _stage_threads():
    """The pipeline's threads still alive (the process-wide GPU device thread is meant to stay)."""
    return [t for t in threading.enumerate()
            if t.name.startswith("segstudio-") and not t.name.startswith("segstudio-device")]


def _synthetic_nuclei(shape=(700, 900), seed=0):
    """Discs of radius 5..18 px scattered so that many straddle tile seams, some touching."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    lab = np.zeros(shape, np.int32)
    n = 0
    for _ in range(400):
        r = rng.uniform(5, 18)
        cy, cx = rng.uniform(r, shape[0] - r), rng.uniform(r, shape[1] - r)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        if (lab[disc] > 0).mean() > 0.1:
            continue
        n += 1
        lab[disc & (lab == 0)] = n
    return lab


def _pointwise_spec() -> ModelSpec:
    return ModelSpec(name="pointwise", version="0", title="", description="",
                     config=UNetConfig(depth=0), postprocess=PostprocessParams(seed_threshold=0.5, min_size=4))


def _pointwise_predict(batch, crop=None):
    """'Network' reading the answer from the input: channel 0 is the distance target."""
    d = np.clip(batch[:, :1], 1e-4, 1 - 1e-4)
    fg = np.where(batch[:, :1] > 0, 8.0, -8.0)
    out = np.concatenate([fg, np.log(d / (1 - d))], axis=1).astype(np.float32)
    return out if crop is None else out[(Ellipsis, *crop)]


@pytest.mark.parametrize("tile,workers", [(64, 1), (96, 1), (160, 1), (64, 3), (32, 1), (24, 3)])  # 32, 24: under the context
def test_objects_straddling_seams_come_out_whole(tile, workers):
    truth = _synthetic_nuclei()
    dist = distance_target(truth)
    spec = _pointwise_spec()
    whole = fg_dist_to_labels(*_pointwise_predict(dist[None, None])[0], spec.postprocess)
    src = source_from_image(as_image(dist, "YX"))
    sink = ArraySink((), dist.shape)
    res = run_sync(segment_plane_job(PlaneView(src, ()), spec, _pointwise_predict, lambda y0, r: sink.write((), y0, r),
                                     prepare=lambda b: b.astype(np.float32),
                                     settings=PlaneSettings(tile=tile, context=40, batch_size=3, post_workers=workers)))
    labels = sink.finish(res.n_objects)
    straddling = set()
    for x in range(tile, truth.shape[1], tile):
        straddling |= set(np.unique(truth[:, x - 1])) & set(np.unique(truth[:, x]))
    for y in range(tile, truth.shape[0], tile):
        straddling |= set(np.unique(truth[y - 1])) & set(np.unique(truth[y]))
    assert len(straddling - {0}) > 30  # the seams really do cut many nuclei
    assert res.n_objects == whole.max() == len(res.table["label"])
    s = score(whole, labels, thresholds=(0.99,))
    assert s.ap[0.99] == 1.0  # identical objects
    assert score(truth, labels).ap[0.5] > 0.95
    # ... with the ids of one whole-plane pass numbered in raster order of first pixels, rows in id order
    ids, first = np.unique(whole.ravel(), return_index=True)
    raster = np.zeros(whole.max() + 1, np.uint32)
    raster[ids[ids > 0][np.argsort(first[ids > 0])]] = np.arange(1, len(ids[ids > 0]) + 1)
    np.testing.assert_array_equal(labels, raster[whole])
    np.testing.assert_array_equal(res.table["label"], np.arange(1, res.n_objects + 1))
    # centroids are in whole-image coordinates
    for row in range(0, len(res.table["label"]), 37):
        i = res.table["label"][row]
        ys, xs = np.nonzero(labels == i)
        assert res.table["centroid_y"][row] == pytest.approx(ys.mean())
        assert res.table["centroid_x"][row] == pytest.approx(xs.mean())


def test_cancel_mid_plane_stops_all_threads():
    dist = distance_target(_synthetic_nuclei())
    token = CancelToken()
    calls = []

    def predict(b, crop=None):
        calls.append(1)
        if len(calls) == 2:
            token.cancel()
        return _pointwise_predict(b, crop)

    src = source_from_image(as_image(dist, "YX"))
    sink = ArraySink((), dist.shape)
    with pytest.raises(Cancelled):
        run_sync(segment_plane_job(PlaneView(src, ()), _pointwise_spec(), predict, lambda y0, r: sink.write((), y0, r),
                                   prepare=lambda b: b.astype(np.float32), settings=PlaneSettings(tile=64),
                                   cancel=token))
    assert len(calls) == 2
    assert not _stage_threads()


def test_thread_count_does_not_change_the_result():
    dist = distance_target(_synthetic_nuclei())
    src = source_from_image(as_image(dist, "YX"))
    results = []
    for workers in (1, 4):
        sink = ArraySink((), dist.shape)
        res = run_sync(segment_plane_job(PlaneView(src, ()), _pointwise_spec(), _pointwise_predict,
                                         lambda y0, r, sink=sink: sink.write((), y0, r),
                                         prepare=lambda b: b.astype(np.float32),
                                         settings=PlaneSettings(tile=64, post_workers=workers)))
        results.append((sink.finish(res.n_objects), res.table))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    for key in results[0][1]:
        np.testing.assert_array_equal(results[0][1][key], results[1][1][key])


def test_failure_in_a_stage_reaches_the_caller():
    dist = distance_target(_synthetic_nuclei((300, 300)))
    src = source_from_image(as_image(dist, "YX"))

    def bad_writer(y0, rows):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        run_sync(segment_plane_job(PlaneView(src, ()), _pointwise_spec(), _pointwise_predict, bad_writer,
                                   prepare=lambda b: b.astype(np.float32), settings=PlaneSettings(tile=64)))
    assert not _stage_threads()


def test_ome_zarr_input_is_read_lazily_with_axes_and_pixel_size(tmp_path):
    zarr = pytest.importorskip("zarr")
    data = np.random.default_rng(2).integers(0, 4000, (2, 300, 260)).astype(np.uint16)  # C Y X
    root = zarr.open_group(str(tmp_path / "img.zarr"), mode="w")
    root.create_array("0", shape=data.shape, chunks=(1, 128, 128), dtype=data.dtype)[:] = data
    root.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 0.5, 0.25]}]}],
    }]}
    with open_source(tmp_path / "img.zarr") as src:
        assert src.axes == "CYX" and src.shape == data.shape and src.pixel_size == (0.5, 0.25)
        np.testing.assert_array_equal(src.read((), (20, 90), (30, 200)), data[:, 20:90, 30:200])
    plain = zarr.open_array(str(tmp_path / "plain.zarr"), mode="w", shape=(64, 80), dtype=np.uint8)
    plain[:] = 7
    with open_source(tmp_path / "plain.zarr") as src:
        assert src.axes == "YX" and int(src.read((), (0, 8), (0, 8)).max()) == 7


def test_segment_cli_accepts_a_zarr_store(tmp_path, samples):
    zarr = pytest.importorskip("zarr")
    import subprocess
    import sys

    img = read_image(samples[1][0]).data
    z = zarr.open_array(str(tmp_path / "nuclei.zarr"), mode="w", shape=img.shape, chunks=(128, 128), dtype=img.dtype)
    z[:] = img
    proc = subprocess.run([sys.executable, "-m", "segstudio.cli", "segment", str(tmp_path / "nuclei.zarr"),
                           "--out", str(tmp_path / "out"), "--backend", "ort"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    labels = read_image(tmp_path / "out" / "nuclei_labels.tif").data
    assert labels.shape == img.shape and labels.max() > 20


def test_read_image_reads_zarr_whole(tmp_path):
    zarr = pytest.importorskip("zarr")
    z = zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=(3, 40, 50), dtype=np.uint16)
    z[:] = np.arange(3 * 40 * 50, dtype=np.uint16).reshape(3, 40, 50)
    img = read_image(tmp_path / "a.zarr")
    assert img.axes == "CYX" and img.name == "a"
    np.testing.assert_array_equal(img.data, z[:])


# ------------------------------------------------------------------ non-finite pixels


@pytest.mark.parametrize("tile", [64, 512])
def test_nonfinite_pixels_are_background_counted_once_and_change_nothing_else(light, samples, tile):
    from segstudio.core.segment.job import segment_job

    model, backend = light
    clean = read_image(samples[0][0]).data.astype(np.float64)
    ref = run_sync(segment_job(as_image(clean, "YX"), model, backend, SegmentOptions(diameter="native", tile=tile))).labels
    background = np.argwhere(np.lib.stride_tricks.sliding_window_view(ref, (12, 12)).max(axis=(-2, -1)) == 0)
    y, x = background[len(background) // 2]
    bad = clean.copy()
    bad[y + 1 : y + 11, x + 1 : x + 11] = np.nan  # 100 pixels in the background
    spots = np.argwhere(ref == 0)[::997][:20]
    bad[tuple(spots.T)] = np.inf
    bad[spots[0][0], spots[0][1]] = 1e300  # finite in float64, infinite in float32
    with np.errstate(over="ignore"):
        expected = int((~np.isfinite(bad.astype(np.float32))).sum())
    assert expected >= 110
    result = run_sync(segment_job(as_image(bad, "YX"), model, backend, SegmentOptions(diameter="native", tile=tile)))
    assert len(result.warnings) == 1 and result.warnings[0].startswith(f"{expected} of {clean.size:,} pixels")
    assert score(ref, result.labels, thresholds=(0.9,)).ap[0.9] > 0.95  # the same nuclei
    assert result.n_objects >= 0.95 * ref.max()


def test_a_model_that_outputs_nan_is_an_error_naming_it(light, samples):
    from segstudio.core.errors import IncompatibleArtifactError
    from segstudio.core.segment.job import segment_job

    model, backend = light

    class Broken:
        name, device, precision = "broken", "cpu", "fp32"

        def predict(self, batch, crop=None):
            out = backend.predict(batch, crop)
            out[0, 0, 5, 5] = np.nan
            return out

        def describe(self):
            return "a backend that returns NaN"

        def close(self):
            pass

    image = read_image(samples[0][0])
    with pytest.raises(IncompatibleArtifactError, match="model 'nuclei-light' gave NaN or infinite outputs"):
        run_sync(segment_job(image, model, Broken(), SegmentOptions(diameter="native")))


def test_nonfinite_pixels_of_a_streamed_tiled_tiff_are_counted_once(light, samples, tmp_path):
    """The same count when the image is read tile by tile from a compressed file (the streaming path)."""
    from segstudio.core.segment.job import segment_job

    model, backend = light
    image = read_image(samples[0][0]).data.astype(np.float32)
    image[100:130, 3:9] = np.nan
    image[::50, ::40] = -np.inf
    expected = int((~np.isfinite(image)).sum())
    tifffile.imwrite(tmp_path / "tiled.tif", image, tile=(64, 64), compression="zlib")
    with open_source(tmp_path / "tiled.tif", eager_bytes=0) as source:  # force region-by-region reading
        assert not isinstance(source.raw, np.ndarray)
        result = run_sync(segment_job(source, model, backend, SegmentOptions(diameter="native", tile=96)))
    assert result.warnings == [w for w in result.warnings if w.startswith(f"{expected} of ")] and result.warnings


class _Recording:
    """A backend stand-in that records the batches it is given and answers with background."""

    def __init__(self, device: str, out_channels: int):
        self.device, self.out_channels, self.shapes = device, out_channels, []

    def predict(self, batch, crop=None):
        self.shapes.append(batch.shape)
        return np.zeros((batch.shape[0], self.out_channels, *batch.shape[2:]), np.float32)


def test_warm_up_runs_one_small_tile_on_a_cpu_and_a_full_batch_on_a_gpu():
    """A full batch of 512 tiles took 4-5 s on a 2-core CPU before every first image and bought nothing there."""
    from segstudio.core.models.catalog import get_model
    from segstudio.core.segment.job import CPU_WARM_TILE, GPU_BATCH, warm_up

    model = get_model("nuclei")
    spec = model.spec
    cpu, gpu = _Recording("cpu", len(spec.outputs)), _Recording("cuda:0", len(spec.outputs))
    warm_up(model, cpu, tile=512)
    warm_up(model, gpu, tile=512)
    assert len(cpu.shapes) == 1 and cpu.shapes[0][0] == 1
    assert max(cpu.shapes[0][2:]) <= CPU_WARM_TILE + 2 * spec.halo + spec.multiple
    assert len(gpu.shapes) == 1 and gpu.shapes[0][:2] == (GPU_BATCH, spec.input_channels)
    assert min(gpu.shapes[0][2:]) >= 512
