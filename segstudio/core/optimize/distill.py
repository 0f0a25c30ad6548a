"""Knowledge distillation: a student learns the teacher's outputs on the user's images.

Used twice: to *recover* a pruned network (the unpruned model teaches it)
and to train a smaller *student* (narrower or depthwise-separable U-Net)
from scratch.  The built-in models' outputs are per-pixel logits of binary
quantities (foreground, distance to the border), so the logit KD of Hinton
et al. becomes, per output channel, a binary cross-entropy between the
student's and the teacher's sigmoids at temperature ``T``, scaled by
``T**2``::

    loss = alpha * KD_T + (1 - alpha) * hard

``hard`` is the segmentation loss on labels when the user gives them, else
the cross-entropy against the teacher at ``T = 1``.

The teacher's logits are computed once per whole image (tiled, exact) and
cropped with the same geometric augmentation as the student's input; the
intensity augmentation touches only the student's input, so the student
also learns to ignore it.  This makes a step about twice as fast as running
the teacher on every batch (the teacher is the larger network).  Optional feature KD
adds the mean squared error between the last decoder features of student
and teacher (through a 1x1 adapter when their widths differ).  Unlabeled
images are enough: the teacher's outputs are the targets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..jobs import CancelToken, Job, Progress
from ..threads import keeps_torch_threads


@dataclass
class KDConfig:
    steps: int = 400
    batch_size: int = 8
    crop: int = 192
    lr: float = 1e-3
    temperature: float = 3.0
    alpha: float = 0.5
    feature_kd: float = 0.0  # weight of the feature term (0: off)
    zoom: tuple[float, float] = (0.7, 1.4)
    seed: int = 0
    threads: int = 0
    precompute_teacher: bool = True
    # the share of crops the student sees with "hard" intensity augmentation (segstudio.core.train's
    # hard_photometric; needs labels) while its targets stay the teacher's outputs on the clean image
    hard_share: float = 0.0


def _last_features(net):
    """Register a hook keeping the input of the head (the last decoder features)."""
    store = {}

    def hook(module, inputs):
        store["f"] = inputs[0]

    handle = net.head.register_forward_pre_hook(hook)
    return store, handle


@keeps_torch_threads
def distill_job(student, teacher, images: list[np.ndarray], cfg: KDConfig, *,
                labels: list[tuple[np.ndarray, np.ndarray]] | None = None,
                cancel: CancelToken | None = None) -> Job[dict]:
    """Train ``student`` (in place) to match ``teacher`` on crops of ``images``.

    ``images`` are normalized ``(C, H, W)`` planes; ``labels``, when given,
    are ``(foreground, distance)`` targets for the same images.  Yields a
    :class:`Progress` every few steps; returns the loss history.
    """
    import torch
    import torch.nn.functional as F

    from ..train import augment_crops, one_cycle, segmentation_loss

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    teacher = teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    adapter = None
    s_store = t_store = None
    handles = []
    if cfg.feature_kd > 0:
        s_store, h1 = _last_features(student)
        t_store, h2 = _last_features(teacher)
        handles = [h1, h2]
        cs, ct = student.head.in_channels, teacher.head.in_channels
        adapter = torch.nn.Conv2d(cs, ct, 1) if cs != ct else torch.nn.Identity()
    params = list(student.parameters()) + (list(adapter.parameters()) if adapter is not None else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    sched = one_cycle(opt, cfg.lr, cfg.steps)
    n_img = images[0].shape[0]
    stacks = list(images)
    if labels is not None:
        stacks = [np.concatenate([st, fg[None], d[None]]) for st, (fg, d) in zip(stacks, labels)]
    n_teacher = 0
    if cfg.precompute_teacher:
        yield Progress("distill", 0, cfg.steps, "running the teacher on every image")
        logits = _outputs(teacher, images, cancel)
        n_teacher = logits[0].shape[0]
        stacks = [np.concatenate([st, lg]) for st, lg in zip(stacks, logits)]
    T, a = cfg.temperature, cfg.alpha
    history = []
    t_start = time.perf_counter()
    student.train()
    yield Progress("distill", 0, cfg.steps, f"{len(images)} images, {cfg.steps} steps")
    try:
        for step in range(cfg.steps):
            if cancel is not None:
                cancel.raise_if_cancelled()
            idx = rng.integers(0, len(stacks), cfg.batch_size)
            hard = [bool(labels is not None and cfg.hard_share > 0 and rng.random() < cfg.hard_share) for _ in idx]
            batch = augment_crops([stacks[i] for i in idx], n_img, cfg.crop, cfg.zoom, rng, hard=hard)
            x = batch[:, :n_img]
            if n_teacher:
                t_out = batch[:, batch.shape[1] - n_teacher :]
                if adapter is not None:
                    with torch.no_grad():
                        teacher(x)  # the feature term needs the teacher's features on this very input
            else:
                with torch.no_grad():
                    t_out = teacher(x)
            s_out = student(x)
            kd = F.binary_cross_entropy_with_logits(s_out / T, torch.sigmoid(t_out / T)) * T * T
            if labels is not None:
                hard = segmentation_loss(s_out, (batch[:, n_img : n_img + 1] > 0.5).float(),
                                         batch[:, n_img + 1 : n_img + 2])
            else:
                hard = F.binary_cross_entropy_with_logits(s_out, torch.sigmoid(t_out))
            loss = a * kd + (1 - a) * hard
            if adapter is not None:
                loss = loss + cfg.feature_kd * F.mse_loss(adapter(s_store["f"]), t_store["f"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            history.append(float(loss.detach()))
            if (step + 1) % 10 == 0 or step + 1 == cfg.steps:
                recent = float(np.mean(history[-10:]))
                yield Progress("distill", step + 1, cfg.steps, f"loss {recent:.4f}", info={"loss": recent})
    finally:
        for h in handles:
            h.remove()
        student.eval()
    return {"steps": cfg.steps, "final_loss": float(np.mean(history[-20:])), "seconds": time.perf_counter() - t_start,
            "loss_every_10": [float(np.mean(history[i : i + 10])) for i in range(0, len(history), 10)],
            "labels": labels is not None, "temperature": T, "alpha": a, "feature_kd": cfg.feature_kd,
            "lr": cfg.lr, "crop": cfg.crop, "batch_size": cfg.batch_size}


def _outputs(net, images: list[np.ndarray], cancel: CancelToken | None = None) -> list[np.ndarray]:
    import torch

    from ..jobs import run_sync
    from ..tiling import predict_tiled

    def run(batch):
        with torch.no_grad():
            return net(torch.from_numpy(batch)).numpy()

    out = []
    for im in images:
        if cancel is not None:
            cancel.raise_if_cancelled()
        out.append(run_sync(predict_tiled(im, run, tile=512, halo=net.config.halo, multiple=net.config.multiple)))
    return out


def retune_postprocess(student, images: list[np.ndarray], params, *, instances: list[np.ndarray] | None = None,
                       teacher=None, teacher_params=None, max_images: int = 40,
                       cancel: CancelToken | None = None) -> tuple[object, dict]:
    """Post-processing thresholds that suit the retrained network.

    A pruned or distilled network's outputs are calibrated a little
    differently from its teacher's, so the foreground and seed thresholds
    tuned for the teacher merge or split some nuclei.  They are re-chosen
    (steps of 0.05 within 0.15 of the current ones) on up to ``max_images``
    calibration images: against the user's ``instances`` when given, else
    for the best agreement with the teacher's instances.  The current
    thresholds are kept unless others score better.
    """
    from ..evaluate import score
    from ..postprocess import fg_dist_to_labels
    from ..train import tune_postprocess

    pick = sorted(set(np.linspace(0, len(images) - 1, min(max_images, len(images))).round().astype(int).tolist()))
    imgs = [images[i] for i in pick]
    if instances is not None:
        refs, against = [instances[i] for i in pick], "labels"
    else:
        refs = [fg_dist_to_labels(o[0], o[1], teacher_params) for o in _outputs(teacher, imgs, cancel)]
        against = "the teacher's instances"
    outs = _outputs(student, imgs, cancel)
    before = float(np.mean([score(r, fg_dist_to_labels(o[0], o[1], params), thresholds=(0.5,)).ap[0.5]
                            for o, r in zip(outs, refs)]))
    steps = [round(0.05 * k, 2) for k in range(-3, 4)]  # +-0.15 around the current thresholds
    fg_grid = sorted({min(0.95, max(0.05, round(params.fg_threshold + d, 2))) for d in steps})
    seed_grid = sorted({min(0.95, max(0.05, round(params.seed_threshold + d, 2))) for d in steps})
    best, after = tune_postprocess(outs, refs, params, fg_grid=fg_grid, seed_grid=seed_grid, cancel=cancel)
    if after <= before:
        best, after = params, before
    return best, {"images": len(imgs), "against": against, "ap50_before": before, "ap50_after": after,
                  "fg_threshold": best.fg_threshold, "seed_threshold": best.seed_threshold}
