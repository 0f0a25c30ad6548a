"""Training loop: same batches inline or from loader threads, resume after a kill, device choice."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from segstudio.core.errors import InputError  # noqa: E402
from segstudio.core.jobs import run_sync  # noqa: E402
from segstudio.core.models.spec import UNetConfig  # noqa: E402
from segstudio.core.training.datasets import find_pairs  # noqa: E402
from segstudio.core.training.train import TrainConfig, epoch_batches, load_samples, resolve_device, train_job  # noqa: E402


@pytest.fixture(scope="module")
def train_samples(sample_dir):
    cfg = TrainConfig()
    return load_samples(find_pairs(sample_dir, sample_dir), cfg.normalization, 1, 20.0)


def small_config(**kw) -> TrainConfig:
    return TrainConfig(unet=UNetConfig(in_channels=1, out_channels=2, depth=2, width=4), epochs=3, crop=64,
                       batch_size=2, lr=3e-3, threads=1, **kw)


def weights(result) -> dict:
    return {k: v.clone() for k, v in result["state_dict"].items()}


def test_loader_threads_make_the_same_batches(train_samples):
    inline = list(epoch_batches(train_samples, small_config(), epoch=1))
    threaded = list(epoch_batches(train_samples, small_config(loader_threads=3), epoch=1))
    assert len(inline) == len(threaded) == 2  # 4 images, batch 2
    for a, b in zip(inline, threaded):
        for ta, tb in zip(a, b):
            assert (ta is None and tb is None) or torch.equal(ta, tb)
    other_epoch = next(epoch_batches(train_samples, small_config(), epoch=2))
    assert not torch.equal(inline[0][0], other_epoch[0])  # each epoch draws new crops


def test_training_resumes_where_it_stopped(tmp_path, train_samples):
    """Stopped by a time limit, then after epoch 2, then run to the end: where one uninterrupted run ends."""
    whole = run_sync(train_job(train_samples, small_config(loader_threads=2), tmp_path / "whole"))
    assert [h["epoch"] for h in whole["history"]] == [1, 2, 3]
    assert all(np.isfinite(h["loss"]) for h in whole["history"])
    assert whole["device"] == "cpu" and next(whole["net"].parameters()).device.type == "cpu"

    part = run_sync(train_job(train_samples, small_config(time_limit_s=0.0), tmp_path / "parts"))
    assert len(part["history"]) == 1  # out of time after the first epoch, its checkpoint kept
    part = run_sync(train_job(train_samples, small_config(stop_after=2), tmp_path / "parts"))
    assert [h["epoch"] for h in part["history"]] == [1, 2]
    rest = run_sync(train_job(train_samples, small_config(), tmp_path / "parts"))
    assert [h["epoch"] for h in rest["history"]] == [1, 2, 3]
    for name, value in weights(whole).items():
        assert torch.allclose(value.float(), rest["state_dict"][name].float(), atol=1e-6), name


def test_device_choice():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            resolve_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_training_on_cuda_lowers_the_loss(tmp_path, train_samples):
    cfg = small_config(device="cuda", loader_threads=2)
    cfg.epochs = 8
    result = run_sync(train_job(train_samples, cfg, tmp_path / "gpu"))
    losses = [h["loss"] for h in result["history"]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert result["device"] != "cpu" and next(result["net"].parameters()).device.type == "cpu"


def test_finished_weights_finish_elsewhere_but_do_not_go_on(tmp_path, train_samples):
    """The weights a GPU machine sends back (no optimizer state) finish the run; they cannot extend it."""
    done = run_sync(train_job(train_samples, small_config(), tmp_path / "gpu"))
    ckpt = torch.load(tmp_path / "gpu" / "checkpoint.pt", weights_only=True)
    (tmp_path / "here").mkdir()
    torch.save({k: ckpt[k] for k in ("model", "epoch", "seconds", "history")}, tmp_path / "here" / "checkpoint.pt")
    finished = run_sync(train_job(train_samples, small_config(), tmp_path / "here"))
    assert finished["history"] == done["history"]
    for name, value in finished["state_dict"].items():
        assert torch.equal(value, done["state_dict"][name]), name
    longer = small_config()
    longer.epochs = 5
    with pytest.raises(InputError, match="without the optimizer state"):
        run_sync(train_job(train_samples, longer, tmp_path / "here"))


@pytest.mark.parametrize("steps", [1, 3, 10, 11, 400])
def test_learning_rate_schedule_of_any_length(steps):
    """Warm up to the peak, anneal to ~0; 10 steps once divided by zero in torch's one-cycle schedule."""
    from segstudio.core.training.loop import one_cycle

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = one_cycle(opt, 1e-3, steps)
    lrs = []
    for i in range(steps):
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
        if i < steps - 1:
            sched.step()
    assert max(lrs) == pytest.approx(1e-3)
    assert lrs[-1] < 1e-5 or steps < 4


def test_nearest_object_and_dimming_keep_the_background_and_one_nucleus():
    from segstudio.core.training.train import dim_some_objects, nearest_object

    lab = np.zeros((30, 30), np.int32)
    lab[2:8, 2:8], lab[20:28, 20:28], lab[2:8, 22:28] = 7, 3, 9
    near = nearest_object(lab)
    ids = np.unique(lab)[1:]  # [3, 7, 9] -> indices 1, 2, 3
    assert near[0, 0] == 2 and near[29, 29] == 1 and near[0, 29] == 3
    assert all(near[lab == i].tolist() == [k] * (lab == i).sum() for k, i in enumerate(ids, start=1))
    image = np.where(lab > 0, 1.0, 0.05).astype(np.float32)[None]
    for seed in range(5):
        out = dim_some_objects(image, near, np.random.default_rng(seed))
        levels = [float(np.median(out[0][lab == i])) for i in ids]
        assert max(levels) == pytest.approx(1.0) and min(levels) < 1.0  # one stays the brightest
        assert np.allclose(out[0][12:18, 12:18], 0.05)  # background far from the nuclei untouched


def test_hard_photometric_is_seeded_finite_and_sometimes_few_grey_levels(train_samples):
    from segstudio.core.training.train import _augment_batch, hard_photometric

    s = train_samples[0]
    x, fg = s.image[:, :96, :96], s.fg[:96, :96]
    a = hard_photometric(x, fg, np.random.default_rng(1))
    assert np.array_equal(a, hard_photometric(x, fg, np.random.default_rng(1)))
    levels = [len(np.unique(hard_photometric(x, fg, np.random.default_rng(k)))) for k in range(40)]
    assert min(levels) <= 200 < max(levels)  # quantized to few grey levels in some draws only
    cfg = small_config(augment="hard")
    xb, fgb, distb, cls = _augment_batch(train_samples, cfg, np.random.default_rng(0))
    assert xb.shape == (4, 1, 64, 64) and torch.isfinite(xb).all() and cls is None
    assert set(torch.unique(fgb).tolist()) <= {0.0, 1.0}
    again = _augment_batch(train_samples, cfg, np.random.default_rng(0))
    assert all(torch.equal(p, q) for p, q in zip((xb, fgb, distb), again[:3]))  # seeded: resumable runs


def test_hard_share_leaves_the_other_crops_to_basic_augmentation(train_samples, monkeypatch):
    import segstudio.core.training.train as train

    calls = []
    real = train.hard_photometric
    monkeypatch.setattr(train, "hard_photometric", lambda x, fg, rng: calls.append(1) or real(x, fg, rng))
    samples = train_samples * 25  # 100 crops
    for share, low, high in ((1.0, 100, 100), (0.3, 15, 45), (0.0, 0, 0)):
        calls.clear()
        train._augment_batch(samples, small_config(augment="hard", hard_share=share), np.random.default_rng(3))
        assert low <= len(calls) <= high, (share, len(calls))
    calls.clear()
    train._augment_batch(samples, small_config(augment="basic", hard_share=1.0), np.random.default_rng(3))
    assert not calls


def test_tuning_turns_hole_filling_on_when_the_network_leaves_holes():
    from segstudio.core.models.spec import PostprocessParams
    from segstudio.core.training.train import distance_target, tune_postprocess

    yy, xx = np.mgrid[:96, :96]
    lab = np.zeros((96, 96), np.int32)
    centres = [(24, 24), (24, 70), (70, 46)]
    for i, (cy, cx) in enumerate(centres, start=1):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= 144] = i
    d_logit = np.where(lab > 0, 12 * distance_target(lab) - 6, -6.0)
    fg = np.where(lab > 0, 6.0, -6.0)
    for cy, cx in centres:
        fg[cy + 4 : cy + 11, cx - 3 : cx + 4] = -6.0  # a dark nucleolus off the centre: IoU 0.89 unfilled
    out = np.stack([fg, d_logit]).astype(np.float32)
    params, ap = tune_postprocess([out], [lab], PostprocessParams(), fg_grid=(0.5,), seed_grid=(0.7,))
    assert params.fill_holes and ap == 1.0
    clean = np.stack([np.where(lab > 0, 6.0, -6.0), d_logit]).astype(np.float32)
    params, _ = tune_postprocess([clean], [lab], PostprocessParams(), fg_grid=(0.5,), seed_grid=(0.7,))
    assert not params.fill_holes  # nothing to fill: the default stays
