"""Training the built-in U-Nets on image / instance-label pairs.

Targets per pixel: foreground (0/1) and the distance to the object's border,
normalized per object to 0..1 (so touching nuclei meet at a valley).  Losses:
binary cross-entropy + soft Dice on the foreground, binary cross-entropy on
the distance.  Augmentation: random crops with zoom, flips, 90° rotations,
gain / offset / gamma and Gaussian noise on the normalized intensities.

The loop is a job (yields :class:`Progress` per epoch, stops on a
:class:`CancelToken`), fully seeded, and checkpoints every epoch so a run
killed halfway resumes where it was.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ..errors import InputError
from ..jobs import CancelToken, Job, Progress
from ..models.spec import Normalization, PostprocessParams, UNetConfig
from ..segment.postprocess import fg_dist_to_labels
from ..segment.preprocess import normalize, select_channels
from ..segment.scale import median_diameter, rescale_sample, scale_factor
from ..tasks.evaluate import DEFAULT_THRESHOLDS, score
from ..threads import keeps_torch_threads
from .datasets import Pair, read_pair
from .loop import TrainLoop, save_checkpoint
from .synthetic import _log_uniform


@dataclass
class TrainConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    normalization: Normalization = field(default_factory=Normalization)
    epochs: int = 100
    crop: int = 192
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 1e-4
    zoom: tuple[float, float] = (0.7, 1.4)
    # nuclei diameter (pixels) every training image is resampled to before cropping; None: native pixels
    diameter: float | None = None
    # start from these weights (a state dict, or a checkpoint's "model") instead of random ones
    init_from: str | None = None
    # stop after this many epochs (the schedule still spans ``epochs``; run again without it to go on)
    stop_after: int | None = None
    seed: int = 0
    threads: int = 0  # 0: torch default
    # where the network trains: "cpu", "cuda", "cuda:1", or "auto" (the first CUDA GPU when there is one)
    device: str = "cpu"
    # stop (checkpoint saved, the run can be continued) after the first epoch that ends this many seconds in
    time_limit_s: float | None = None
    # threads preparing augmented batches ahead of the network (0: inline); a GPU step is faster than
    # one thread's augmentation of its batch, so on a GPU machine give it most of the CPU cores
    loader_threads: int = 0
    # "basic": gain / offset / gamma / Gaussian noise; "hard": also the conditions of real images unlike
    # DSB2018 (:func:`hard_photometric`): nuclei 1-15x dimmer than their neighbours, nucleoli and chromatin
    # texture, background ramps, defocus, Poisson-Gaussian noise, few grey levels
    augment: str = "basic"
    # with augment="hard": the share of crops that get it (the others get "basic"), so the clean images
    # the model is also judged on stay in training
    hard_share: float = 1.0


# ------------------------------------------------------------------ data


def distance_target(labels: np.ndarray) -> np.ndarray:
    """Per-object Euclidean distance to the border, scaled to 1 at each object's centre."""
    out = np.zeros(labels.shape, np.float32)
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
        mask = labels[sl] == i
        d = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        d = d * mask
        if d.max() > 0:
            out[sl] = np.where(mask, d / d.max(), out[sl])
    return out


@dataclass
class Sample:
    name: str
    image: np.ndarray  # (C, H, W) float32, normalized
    labels: np.ndarray  # (H, W)
    fg: np.ndarray  # (H, W) float32
    dist: np.ndarray  # (H, W) float32
    # (H, W) float32, 1 on pixels of cells of the second class (viability: dead), for models with a class output
    cls: np.ndarray | None = None
    # (H, W) uint16: every pixel's nearest object's index in ``1..N`` (made when "hard" augmentation needs it)
    nearest: np.ndarray | None = None


def nearest_object(labels: np.ndarray) -> np.ndarray:
    """Every pixel's nearest labelled object, as an index ``1..N`` into the sorted object ids (uint16).

    Past 65,535 objects the indices wrap around (the map only carries
    per-object brightness factors, where a repeat is harmless).
    """
    if labels.max() == 0:
        return np.zeros(labels.shape, np.uint16)
    ids, inv = np.unique(labels, return_inverse=True)
    inv = inv.reshape(labels.shape) + int(ids[0] != 0)
    _, (iy, ix) = ndi.distance_transform_edt(labels == 0, return_indices=True)
    return (inv[iy, ix] % 65536).astype(np.uint16)


def load_samples(
    pairs: list[Pair], norm: Normalization, in_channels: int, diameter: float | None = None
) -> list[Sample]:
    """Read, normalize and (with ``diameter``) resample image / label pairs to the model's scale."""
    samples = []
    for p in pairs:
        img, lab = read_pair(p)
        samples.append(make_sample(p.name, next(img.planes())[1], lab, norm, in_channels, diameter))
    return samples


def make_sample(name: str, plane: np.ndarray, labels: np.ndarray, norm: Normalization, in_channels: int,
                diameter: float | None = None) -> Sample:
    """A training sample from one image plane and its labels: normalized, resampled with ``diameter``."""
    x = normalize(select_channels(plane, in_channels, None), norm)
    lab = labels.astype(np.int32)
    if diameter:
        x, lab = rescale_sample(x, lab, scale_factor(diameter, median_diameter(lab)))
    return Sample(name, x, lab, (lab > 0).astype(np.float32), distance_target(lab))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-variance smooth random field over the last two axes."""
    f = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (0,) * (len(shape) - 2) + (sigma, sigma))
    return (f - f.mean()) / (f.std() + 1e-8)


def dim_some_objects(image: np.ndarray, nearest: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image`` (C, H, W) with each object (and the pixels nearest to it) dimmed by its own factor.

    The factors are 1 / log-uniform(1, S) with S log-uniform in 2-15 per
    image, and one object stays at full brightness, so the image's
    percentile normalization still follows its brightest nuclei: the
    "dim nucleus beside a bright one" of real fields. Only the signal above
    the background (each channel's 10th percentile) is scaled, so the
    background shows no seams between objects; the factor map is smoothed
    over about a pixel, as the optics would.
    """
    n = int(nearest.max()) + 1
    spread = _log_uniform(rng, 2.0, 15.0)
    factors = (1.0 / np.exp(rng.uniform(0, math.log(spread), n))).astype(np.float32)
    factors[int(rng.integers(1, n)) if n > 1 else 0] = 1.0
    fmap = ndi.gaussian_filter(factors[nearest], 1.0)
    bg = np.percentile(image, 10, axis=(1, 2)).astype(np.float32)[:, None, None]
    return bg + (image - bg) * fmap[None]


def hard_photometric(x: np.ndarray, fg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The intensity side of "hard" augmentation on normalized image channels ``x`` (C, H, W).

    Each with its own probability: chromatin speckle and dark nucleoli
    inside the foreground ``fg`` (H, W); gamma 0.6-1.7 and gain; a background
    ramp and offset; defocus blur (sigma 0.5-2.5 px); Poisson shot noise
    (30-1000 photons at intensity 1) and Gaussian read noise; quantization
    to 12-140 grey levels (an 8-bit image with a small range).
    """
    x = np.array(x, np.float32)
    inside = fg > 0.5
    h, w = x.shape[-2:]
    if rng.random() < 0.4 and inside.any():
        speckle = _smooth_noise(rng, (h, w), rng.uniform(0.6, 1.5))
        x = x * np.where(inside, np.clip(1 + rng.uniform(0.1, 0.5) * speckle, 0.2, None), 1.0)[None]
        ys, xs = np.nonzero(inside)
        k = int(rng.poisson(max(1.0, len(ys) / 300.0)))
        if k:
            pick = rng.integers(0, len(ys), k)
            spots = np.zeros((h, w), np.float32)
            spots[ys[pick], xs[pick]] = 1.0
            r = rng.uniform(0.8, 2.0)
            blobs = np.clip(ndi.gaussian_filter(spots, r) * (2 * math.pi * r * r), 0, 1)
            x = x * (1 - rng.uniform(0.3, 0.75) * blobs)[None]
    x = np.clip(x, 0, None) ** _log_uniform(rng, 0.6, 1.7) * rng.uniform(0.5, 1.5)
    if rng.random() < 0.3:
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[:h, :w].astype(np.float32) / max(h, w)
        x = x + rng.uniform(0, 0.3) * (yy * math.sin(angle) + xx * math.cos(angle))[None]
    x = x + rng.uniform(-0.05, 0.12)
    if rng.random() < 0.3:
        s = rng.uniform(0.5, 2.5)
        x = ndi.gaussian_filter(x, (0, s, s))
    if rng.random() < 0.5:
        photons = _log_uniform(rng, 30.0, 1000.0)
        x = rng.poisson(np.clip(x, 0, None) * photons).astype(np.float32) / photons
    x = x + rng.uniform(0, 0.03) * rng.standard_normal(x.shape).astype(np.float32)
    if rng.random() < 0.25:
        levels = _log_uniform(rng, 12.0, 140.0)
        x = np.round(np.clip(x, 0, None) * levels) / levels
    return x.astype(np.float32)


def augment_crops(stacks: list[np.ndarray], n_image: int, crop: int, zoom: tuple[float, float],
                  rng: np.random.Generator, blur: float = 0.0, hard: bool | list[bool] = False,
                  photometric: bool = True):
    """Random augmented crops of ``(C, H, W)`` stacks whose first ``n_image`` channels are the image.

    Zoom (crop size scaled, resized back to ``crop``), flip, 90-degree
    rotations on every channel; gain, offset, gamma and Gaussian noise on the
    image channels only, and with probability ``blur`` a Gaussian blur
    (sigma 0.5-1.5 px) before the noise.  With ``hard`` (channel
    ``n_image`` must be the foreground) the intensities get
    :func:`hard_photometric` instead (``hard`` may also say it per stack).
    ``photometric=False`` leaves the intensities as they are (geometry only).
    Returns a ``(B, C, crop, crop)`` float32 tensor.
    """
    import torch
    import torch.nn.functional as F

    out = []
    flags = hard if isinstance(hard, list) else [hard] * len(stacks)
    for stack, is_hard in zip(stacks, flags):
        z = math.exp(rng.uniform(math.log(zoom[0]), math.log(zoom[1])))
        size = max(8, int(round(crop / z)))
        h, w = stack.shape[1:]
        if h < size or w < size:
            py, px = max(0, size - h), max(0, size - w)
            stack = np.pad(stack, ((0, 0), (py // 2, py - py // 2), (px // 2, px - px // 2)), mode="reflect")
            h, w = stack.shape[1:]
        y0, x0 = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
        c = stack[:, y0 : y0 + size, x0 : x0 + size]
        if rng.random() < 0.5:
            c = c[:, :, ::-1]
        c = np.rot90(c, k=int(rng.integers(4)), axes=(1, 2))
        t = torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32))[None]
        if size != crop:
            t = F.interpolate(t, size=(crop, crop), mode="bilinear", align_corners=False)
        t = t[0]
        x = t[:n_image]
        if is_hard:
            out.append(torch.cat([torch.from_numpy(hard_photometric(x.numpy(), t[n_image].numpy(), rng)),
                                  t[n_image:]]))
            continue
        if not photometric:
            out.append(t)
            continue
        gain, offset = rng.uniform(0.6, 1.4), rng.uniform(-0.1, 0.1)
        gamma = math.exp(rng.uniform(math.log(0.7), math.log(1.4)))
        x = x.clamp(min=0) ** gamma * gain + offset
        if blur and rng.random() < blur:
            x = torch.from_numpy(ndi.gaussian_filter(x.numpy(), (0, rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5))))
        x = x + float(rng.uniform(0, 0.05)) * torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))
        out.append(torch.cat([x, t[n_image:]]))
    return torch.stack(out)


def _augment_batch(samples: list[Sample], cfg: TrainConfig, rng: np.random.Generator, blur: float = 0.0):
    """A batch of augmented crops: (x, fg, dist, cls or None) float32 tensors."""
    c = samples[0].image.shape[0]
    with_cls = samples[0].cls is not None
    hard = []
    stacks = []
    for s in samples:
        image = s.image
        # a draw only when the share is partial, so runs at share 1 keep their random streams
        hard.append(cfg.augment == "hard" and (cfg.hard_share >= 1 or rng.random() < cfg.hard_share))
        if hard[-1] and rng.random() < 0.5:
            if s.nearest is None:
                s.nearest = nearest_object(s.labels)
            image = dim_some_objects(image, s.nearest, rng)
        stacks.append(np.concatenate([image, s.fg[None], s.dist[None]] + ([s.cls[None]] if with_cls else [])))
    t = augment_crops(stacks, c, cfg.crop, cfg.zoom, rng, blur, hard=hard)
    cls = (t[:, c + 2 : c + 3] > 0.5).float() if with_cls else None
    return t[:, :c], (t[:, c : c + 1] > 0.5).float(), t[:, c + 1 : c + 2], cls


def segmentation_loss(out, fg, dist, cls=None):
    """Foreground BCE + soft Dice, distance BCE; with ``cls``, a class-balanced BCE over cell pixels.

    The class term weights each class's pixels by half the inverse of its
    share in the batch, so a 1:20 batch of dead:live cells trains the rare
    class as hard as the common one.
    """
    import torch.nn.functional as F

    fg_logit, d_logit = out[:, :1], out[:, 1:2]
    bce = F.binary_cross_entropy_with_logits(fg_logit, fg)
    p = fg_logit.sigmoid()
    dice = 1 - (2 * (p * fg).sum() + 1) / (p.sum() + fg.sum() + 1)
    dl = F.binary_cross_entropy_with_logits(d_logit, dist)
    loss = bce + dice + dl
    if cls is not None:
        n_pos, n_all = (cls * fg).sum(), fg.sum()
        n_neg = n_all - n_pos
        w = fg * (cls * (0.5 * n_all / n_pos.clamp(min=1)) + (1 - cls) * (0.5 * n_all / n_neg.clamp(min=1)))
        loss = loss + (F.binary_cross_entropy_with_logits(out[:, 2:3], cls, reduction="none") * w).sum() / (
            n_all.clamp(min=1))
    return loss


# ------------------------------------------------------------------ loop


CHECKPOINT_EVERY_S = 30.0


def resolve_device(name: str):
    """The torch device ``name`` means ("auto": the first CUDA GPU if there is one, else the CPU)."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"training on {name} was asked for, but this torch ({torch.__version__}) sees no CUDA GPU",
                         hint="use --device cpu (or auto)")
    return device


def epoch_batches(train: list[Sample], cfg: TrainConfig, epoch: int):
    """The epoch's augmented batches, in order: ``(x, fg, dist, cls or None)`` CPU tensors.

    Each batch draws from its own generator seeded by (seed, epoch, batch),
    so the batches are the same whether they are made inline or by
    ``cfg.loader_threads`` threads working ahead (at most twice as many
    batches as threads are held in memory).
    """
    order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train))
    n = math.ceil(len(train) / cfg.batch_size)

    def make(b: int):
        idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        return _augment_batch([train[i] for i in idx], cfg, np.random.default_rng([cfg.seed, epoch, b]))

    if cfg.loader_threads <= 0:
        for b in range(n):
            yield make(b)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(cfg.loader_threads, thread_name_prefix="segstudio-augment") as pool:
        ahead = deque(pool.submit(make, b) for b in range(min(n, 2 * cfg.loader_threads)))
        submitted = len(ahead)
        try:
            while ahead:
                batch = ahead.popleft().result()
                if submitted < n:
                    ahead.append(pool.submit(make, submitted))
                    submitted += 1
                yield batch
        finally:
            for f in ahead:
                f.cancel()


@keeps_torch_threads
def train_job(
    train: list[Sample], cfg: TrainConfig, workdir: str | Path, cancel: CancelToken | None = None
) -> Job[dict]:
    """Train a U-Net; yields a :class:`Progress` per epoch.

    Returns ``{"state_dict": ..., "history": [...], "seconds": ...}``.
    ``workdir/checkpoint.pt`` is written after an epoch when 30 s have passed
    since the last one (every epoch on a CPU, where an epoch takes longer)
    and when the run stops; a run that finds one resumes from it (same
    seed, same batches).
    """
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = _TrainRun(train, cfg, Path(workdir), cancel)
    yield Progress("train", run.start_epoch, cfg.epochs,
                   f"{len(train)} images, {run.steps_per_epoch} steps/epoch on {run.device.type}")
    end_epoch = min(cfg.epochs, cfg.stop_after or cfg.epochs)
    run_start = last_save = time.perf_counter()
    for epoch in range(run.start_epoch, end_epoch):
        run.epoch(epoch)
        now = time.perf_counter()
        out_of_time = cfg.time_limit_s is not None and now - run_start >= cfg.time_limit_s
        if now - last_save >= CHECKPOINT_EVERY_S or out_of_time or epoch + 1 == end_epoch:
            run.save(epoch + 1)
            last_save = time.perf_counter()
        yield Progress("train", epoch + 1, cfg.epochs, f"loss {run.history[-1]['loss']:.4f}", info=run.history[-1])
        if out_of_time:
            break
    net = run.net.cpu().eval()  # export, tuning and inference take it from here on the CPU
    # where the epochs ran (a run finished elsewhere from a GPU machine's checkpoint says that GPU)
    trained_on = run.history[-1].get("device", "cpu") if run.history else run.device_name
    return {"state_dict": net.state_dict(), "history": run.history, "seconds": run.elapsed, "net": net,
            "device": trained_on}


class _TrainRun:
    """One :func:`train_job`: the network, the loop, and the checkpoint it resumes from."""

    def __init__(self, train: list[Sample], cfg: TrainConfig, workdir: Path, cancel: CancelToken | None):
        import torch

        from ..models.unet import build_unet

        self.train, self.cfg = train, cfg
        self.device = device = resolve_device(cfg.device)
        workdir.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = workdir / "checkpoint.pt"
        torch.manual_seed(cfg.seed)
        net = build_unet(cfg.unet)
        if cfg.init_from and not self.ckpt_path.is_file():
            state = torch.load(cfg.init_from, map_location="cpu", weights_only=True)
            net.load_state_dict(state["model"] if "model" in state else state)
        self.net = net.to(device)
        # on a GPU the forward and backward passes run in bfloat16 where it is safe (autocast), weights stay float32
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        self.steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
        self.loop = TrainLoop(net.parameters(), cfg.lr, weight_decay=cfg.weight_decay,
                              total_steps=cfg.epochs * self.steps_per_epoch, cancel=cancel)
        self.history: list[dict] = []
        self.start_epoch, self.elapsed = 0, 0.0
        if self.ckpt_path.is_file():
            self._resume()
        self.device_name = (f"{torch.cuda.get_device_name(device)}, {os.cpu_count()} CPU cores, torch "
                            f"{torch.__version__}" if device.type == "cuda" else "cpu")

    def _resume(self) -> None:
        import torch

        ckpt = torch.load(self.ckpt_path, map_location=self.device, weights_only=True)
        self.net.load_state_dict(ckpt["model"])
        self.start_epoch, self.elapsed = int(ckpt["epoch"]), float(ckpt["seconds"])
        if "opt" in ckpt:
            self.loop.load_state_dict(ckpt)
        elif self.start_epoch < self.cfg.epochs:  # a finished run's weights, brought from another machine
            raise InputError(f"{self.ckpt_path} holds the weights of epoch {self.start_epoch} without the optimizer "
                             f"state, so training cannot go on to epoch {self.cfg.epochs}", hint="give --epochs "
                             f"{self.start_epoch} to finish this run, or train on from it with --init-from")
        self.history = json.loads(ckpt["history"])

    def _loss(self, batch):
        x, fg, dist, cls = (t.to(self.device, non_blocking=True) if t is not None else None for t in batch)
        with self.autocast:
            out = self.net(x)
        return segmentation_loss(out.float(), fg, dist, cls)

    def epoch(self, epoch: int) -> None:
        """One pass over the augmented training set; its mean loss goes into the history."""
        import torch

        t0 = time.perf_counter()
        torch.manual_seed(self.cfg.seed * 1000 + epoch)
        self.net.train()
        losses = list(self.loop.run(epoch_batches(self.train, self.cfg, epoch), self._loss))
        losses = [float(v) for v in losses]  # one device sync per epoch, not per step
        self.elapsed += time.perf_counter() - t0
        self.history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": round(self.elapsed, 1),
                             "device": self.device_name})

    def save(self, epoch: int) -> None:
        save_checkpoint(self.ckpt_path, {"model": self.net.state_dict(), **self.loop.state_dict(), "epoch": epoch,
                                         "seconds": self.elapsed, "history": json.dumps(self.history)})


def predict_outputs(net, samples: list[Sample], diameter: float | None, tile: int = 512) -> list[np.ndarray]:
    """Network outputs ``(K, H, W)`` of each sample's image on its own pixel grid.

    With ``diameter`` each image is first resampled so its nuclei (median
    of its labels) are that size, as training and inference do, and the
    outputs resampled back; so the thresholds tuned on them hold at inference.
    """
    import torch

    from ..jobs import run_sync
    from ..segment.scale import resize, scaled_shape
    from ..segment.tiling import predict_tiled

    def run(batch):
        with torch.inference_mode():
            return net(torch.from_numpy(batch)).numpy()

    outs = []
    for s in samples:
        f = scale_factor(diameter, median_diameter(s.labels)) if diameter else 1.0
        x = resize(s.image, scaled_shape(s.image.shape[-2:], f)) if f != 1.0 else s.image
        o = run_sync(predict_tiled(x, run, tile=tile, halo=net.config.halo, multiple=net.config.multiple))
        outs.append(resize(o, s.image.shape[-2:]) if f != 1.0 else o)
    return outs


def tune_postprocess(
    outputs: list[np.ndarray], labels: list[np.ndarray], base: PostprocessParams,
    fg_grid=(0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65),
    seed_grid=(0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85), cancel=None,
) -> tuple[PostprocessParams, float]:
    """Pick the thresholds with the best mean AP50 on held-out training images.

    Then, at those thresholds, whether filling the holes one object encloses
    (``fill_holes``) scores better, by the AP averaged over IoU 0.5-0.9 (a
    hole seldom costs a match at IoU 0.5, but it does at 0.8 or 0.9), and
    keep the better of the two.
    """
    def mean_ap(params, thresholds=(0.5,)):
        return float(np.mean([np.mean(list(score(lab, fg_dist_to_labels(o[0], o[1], params),
                                                 thresholds=thresholds).ap.values()))
                              for o, lab in zip(outputs, labels)]))

    best, best_ap = base, -1.0
    for fg_t in fg_grid:
        for seed_t in seed_grid:
            if cancel is not None:
                cancel.raise_if_cancelled()
            params = dataclasses.replace(base, fg_threshold=fg_t, seed_threshold=seed_t)
            ap = mean_ap(params)
            if ap > best_ap:
                best, best_ap = params, ap
    other = dataclasses.replace(best, fill_holes=not best.fill_holes)
    if mean_ap(other, DEFAULT_THRESHOLDS) > mean_ap(best, DEFAULT_THRESHOLDS):
        return other, mean_ap(other)
    return best, best_ap


def config_dict(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d["zoom"] = list(cfg.zoom)
    return d


def save_model(net, spec, out_dir: str | Path, example: np.ndarray | None = None, *, onnx: bool = True) -> Path:
    """Write a trained U-Net as a model folder: state dict, ONNX (checked against PyTorch) and card.

    ``example`` (``(B, C, H, W)`` float32, H and W multiples of the
    network's stride) is the input of the ONNX check; the result
    (max / mean abs error, cosine) goes into ``spec.training["onnx_vs_torch"]``.
    Returns the card's path.
    """
    import torch

    from ..models.catalog import write_card
    from ..models.onnx_export import compare_outputs, export_onnx

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    net = net.eval()
    pt = out_dir / f"{spec.name}.pt"
    torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, pt)
    files = {"torch": pt}
    if onnx:
        files["onnx"] = export_onnx(net, out_dir / f"{spec.name}.onnx", in_channels=spec.input_channels,
                                    multiple=spec.multiple)
        import onnxruntime as ort

        if example is None:
            example = np.random.default_rng(0).random((1, spec.input_channels, 128, 128), dtype=np.float32)
        with torch.inference_mode():
            ref = net(torch.from_numpy(example)).numpy()
        sess = ort.InferenceSession(str(files["onnx"]), providers=["CPUExecutionProvider"])
        spec.training["onnx_vs_torch"] = compare_outputs(ref, sess.run(None, {sess.get_inputs()[0].name: example})[0])
    return write_card(spec, files, out_dir / f"{spec.name}.json")
