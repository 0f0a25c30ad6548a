"""Tiling: every pixel exactly once, mirrored borders, results independent of tile size."""

from __future__ import annotations

import numpy as np
import pytest

from segstudio.core.errors import Cancelled
from segstudio.core.jobs import CancelToken, run_sync
from segstudio.core.segment.tiling import plan_tiles, predict_tiled, read_region, reflect_indices


def identity(batch):
    return batch.copy()


@pytest.mark.parametrize("seed", range(12))
def test_identity_model_gives_back_the_image(seed):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(9, 300, 2)
    c = int(rng.integers(1, 4))
    tile = int(rng.integers(8, 200))
    halo = int(rng.integers(0, 40))
    multiple = int(rng.choice([1, 2, 4, 8, 16]))
    x = rng.random((c, h, w)).astype(np.float32)
    out = run_sync(predict_tiled(x, identity, tile=tile, halo=halo, multiple=multiple, batch_size=3))
    np.testing.assert_array_equal(out, x)


def test_plan_covers_each_pixel_once_with_aligned_reads():
    plan = plan_tiles((301, 517), tile=100, halo=20, multiple=8)
    count = np.zeros((301, 517), int)
    for t in plan.tiles:
        count[t.out] += 1
        (y0, y1), (x0, x1) = t.read
        assert (y1 - y0, x1 - x0) == plan.tile_shape
        assert y0 % 8 == 0 and x0 % 8 == 0  # stride-aligned: pooling sees the same grid
    assert (count == 1).all()
    assert plan.tile_shape == (104 + 48, 104 + 48)


def test_small_image_gets_one_small_tile():
    plan = plan_tiles((20, 30), tile=512, halo=16, multiple=8)
    assert len(plan) == 1 and plan.tile_shape == (24 + 32, 32 + 32)


def test_reflect_matches_numpy_pad():
    a = np.arange(7)
    for pad in (0, 3, 6, 20):
        expected = np.pad(a, pad, mode="reflect")
        np.testing.assert_array_equal(a[reflect_indices(-pad, 7 + pad, 7)], expected)
    assert (reflect_indices(-5, 5, 1) == 0).all()


def test_read_region_mirrors_outside_and_slices_inside():
    a = np.arange(5 * 6).reshape(1, 5, 6)
    np.testing.assert_array_equal(read_region(a, ((-2, 7), (-3, 9))), np.pad(a, ((0, 0), (2, 2), (3, 3)), "reflect"))
    np.testing.assert_array_equal(read_region(a, ((1, 3), (2, 5))), a[:, 1:3, 2:5])


def test_cancel_stops_between_batches():
    x = np.zeros((1, 256, 256), np.float32)
    token = CancelToken()
    calls = []

    def predict(b):
        calls.append(1)
        token.cancel()
        return b

    with pytest.raises(Cancelled):
        run_sync(predict_tiled(x, predict, tile=64, halo=0, cancel=token))
    assert len(calls) == 1


def test_progress_events_count_tiles():
    x = np.zeros((1, 100, 100), np.float32)
    events = []
    run_sync(predict_tiled(x, identity, tile=50, halo=8, batch_size=2), events.append)
    assert [e.done for e in events] == [0, 2, 4] and all(e.total == 4 for e in events)


def test_flip_average_flips_back_and_averages():
    from segstudio.core.segment.job import FlipAverage

    ramp = np.arange(12, dtype=np.float32).reshape(3, 4) ** 1.5  # a network that is not flip-equivariant
    calls = []

    def predict(batch, crop=None):
        calls.append(batch.copy())
        return batch * ramp

    x = np.random.default_rng(0).random((2, 1, 3, 4), dtype=np.float32)
    tta = FlipAverage(predict, "net")
    out = tta(x, (slice(1, 3), slice(0, 2)))
    expected = x * (ramp + ramp[:, ::-1] + ramp[::-1] + ramp[::-1, ::-1]) / 4
    np.testing.assert_allclose(out, expected[..., 1:3, 0:2], rtol=1e-6)
    assert len(calls) == 4 and np.array_equal(calls[0], x) and np.array_equal(calls[3], x[..., ::-1, ::-1])
    assert tta.describe() == "net, averaged over 4 flips"


# ----------------------------------------------------------------------------- networks of fixed or stepped sizes


@pytest.mark.parametrize("shape", [(100, 90), (512, 512), (700, 300), (1500, 449)])
def test_exact_tile_shape_covers_each_pixel_once(shape):
    rng = np.random.default_rng(sum(shape))
    x = rng.random((1, *shape)).astype(np.float32)
    seen = []

    def record(batch):
        seen.append(batch.shape[-2:])
        return batch.copy()

    plan = plan_tiles(shape, tile=64, halo=32, multiple=16, tile_shape=(512, 512))
    count = np.zeros(shape, int)
    for t in plan.tiles:
        count[t.out] += 1
        (y0, y1), (x0, x1) = t.read
        assert (y1 - y0, x1 - x0) == (512, 512)
    assert (count == 1).all() and plan.tile_shape == (512, 512)
    out = run_sync(predict_tiled(x, record, tile=64, halo=32, multiple=16, batch_size=2, tile_shape=(512, 512)))
    np.testing.assert_array_equal(out, x)  # mirrored out to the tile, cropped back
    assert set(seen) == {(512, 512)}


def test_exact_tile_shape_must_leave_a_core():
    with pytest.raises(ValueError, match="leave no core"):
        plan_tiles((100, 100), tile=64, halo=32, tile_shape=(64, 64))


def test_model_tile_shapes_follow_its_declared_sizes():
    from segstudio.core.models.spec import ModelSpec

    def spec(**kw):
        return ModelSpec(name="m", version="1", title="", description="", architecture="onnx", halo_px=32,
                         multiple_px=16, **kw)

    free = spec()
    assert free.tile_shape(512, (1000, 1000)) is None and free.fixed_input is None  # the tiler decides
    fixed = spec(input_min=(512, 512), input_step=(0, 0))
    assert fixed.fixed_input == (512, 512)
    for tile, plane in ((512, (1000, 1000)), (128, (60, 60)), (2048, (4000, 300))):
        assert fixed.tile_shape(tile, plane) == (512, 512)
    stepped = spec(input_min=(100, 100), input_step=(16, 16))
    assert stepped.tile_shape(512, (1000, 1000)) == (100 + 30 * 16, 100 + 30 * 16)  # >= 512 + 64, on the grid
    assert stepped.tile_shape(16, (20, 20)) == (100, 100)  # never below the minimum
    assert stepped.input_size((101, 99)) == (116, 100)
    # cards keep the sizes; cards written before these fields load as before
    again = ModelSpec.from_dict(fixed.to_dict())
    assert again.input_min == (512, 512) and again.input_step == (0, 0) and again.max_batch is None
    old = fixed.to_dict()
    for key in ("input_min", "input_step", "max_batch"):
        del old[key]
    del old["normalization"]["eps"]
    assert ModelSpec.from_dict(old).tile_shape(512, (1000, 1000)) is None


def test_cores_are_balanced_so_the_network_sees_few_padding_pixels():
    """520 x 696 with 512 px tiles: 2 x 2 cores of 264 x 352 (not 512 + 8: 4.5x the image's pixels)."""
    plan = plan_tiles((520, 696), tile=512, halo=64, multiple=8)
    assert len(plan) == 4 and plan.tile_shape == (264 + 128, 352 + 128)
    assert len(plan) * plan.tile_shape[0] * plan.tile_shape[1] < 2.1 * 520 * 696
    covered = np.zeros((520, 696), int)
    for t in plan.tiles:
        covered[t.out] += 1
    assert (covered == 1).all()
    assert plan_tiles((2048, 2048), tile=512, halo=64, multiple=8).tile_shape == (640, 640)
