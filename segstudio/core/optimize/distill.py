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
from ..training.loop import TrainLoop


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
    # the share of crops the student sees with "hard" intensity augmentation (segstudio.core.training.train's
    # hard_photometric; needs labels) while its targets stay the teacher's outputs on the clean image
    hard_share: float = 0.0
    weight_decay: float = 1e-4
    # gain, offset, gamma and noise on the student's input (off for quantization-aware training, whose
    # activation ranges are learned on the intensities the model will see)
    photometric: bool = True


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
                cancel: CancelToken | None = None, teacher_logits: list[np.ndarray] | None = None) -> Job[dict]:
    """Train ``student`` (in place) to match ``teacher`` on crops of ``images``.

    ``images`` are normalized ``(C, H, W)`` planes; ``labels``, when given,
    are ``(foreground, distance)`` targets for the same images;
    ``teacher_logits``: the teacher's :func:`tiled_outputs` on ``images``
    when already computed (a second phase of the same run).  Yields a
    :class:`Progress` every few steps; returns the loss history.
    """
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    kd = _Distillation(student, teacher, images, cfg, labels, cancel)
    stacks = list(images)
    if labels is not None:
        stacks = [np.concatenate([st, fg[None], d[None]]) for st, (fg, d) in zip(stacks, labels)]
    if cfg.precompute_teacher or teacher_logits is not None:
        logits = teacher_logits
        if logits is None:
            yield Progress("distill", 0, cfg.steps, "running the teacher on every image")
            logits = tiled_outputs(teacher, images, cancel)
        kd.n_teacher = logits[0].shape[0]
        stacks = [np.concatenate([st, lg]) for st, lg in zip(stacks, logits)]
    history = []
    t_start = time.perf_counter()
    student.train()
    yield Progress("distill", 0, cfg.steps, f"{len(images)} images, {cfg.steps} steps")
    try:
        for step, loss in enumerate(kd.loop.run(kd.batches(stacks), kd.loss)):
            history.append(float(loss))
            if (step + 1) % 10 == 0 or step + 1 == cfg.steps:
                recent = float(np.mean(history[-10:]))
                yield Progress("distill", step + 1, cfg.steps, f"loss {recent:.4f}", info={"loss": recent})
    finally:
        for h in kd.handles:
            h.remove()
        student.eval()
    return {"steps": cfg.steps, "final_loss": float(np.mean(history[-20:])), "seconds": time.perf_counter() - t_start,
            "loss_every_10": [float(np.mean(history[i : i + 10])) for i in range(0, len(history), 10)],
            "labels": labels is not None, "temperature": cfg.temperature, "alpha": cfg.alpha,
            "feature_kd": cfg.feature_kd, "lr": cfg.lr, "crop": cfg.crop, "batch_size": cfg.batch_size}


class _Distillation:
    """The student, the frozen teacher, the optional feature adapter, the loop and the KD loss."""

    def __init__(self, student, teacher, images, cfg: KDConfig, labels, cancel):
        import torch

        self.student, self.teacher, self.cfg, self.labels = student, teacher.eval(), cfg, labels
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.rng = np.random.default_rng(cfg.seed)
        self.adapter = self.s_store = self.t_store = None
        self.handles = []
        if cfg.feature_kd > 0:
            self.s_store, h1 = _last_features(student)
            self.t_store, h2 = _last_features(self.teacher)
            self.handles = [h1, h2]
            cs, ct = student.head.in_channels, self.teacher.head.in_channels
            self.adapter = torch.nn.Conv2d(cs, ct, 1) if cs != ct else torch.nn.Identity()
        params = list(student.parameters()) + (list(self.adapter.parameters()) if self.adapter is not None else [])
        self.loop = TrainLoop(params, cfg.lr, weight_decay=cfg.weight_decay, total_steps=cfg.steps, cancel=cancel)
        self.n_img = images[0].shape[0]
        self.n_teacher = 0  # channels of precomputed teacher logits at the end of each stack

    def batches(self, stacks: list[np.ndarray]):
        """``cfg.steps`` batches of augmented crops of the image (+ labels, + teacher logits) stacks."""
        from ..training.train import augment_crops

        cfg, rng = self.cfg, self.rng
        for _ in range(cfg.steps):
            idx = rng.integers(0, len(stacks), cfg.batch_size)
            hard = [bool(self.labels is not None and cfg.hard_share > 0 and rng.random() < cfg.hard_share)
                    for _ in idx]
            yield augment_crops([stacks[i] for i in idx], self.n_img, cfg.crop, cfg.zoom, rng, hard=hard,
                                photometric=cfg.photometric)

    def loss(self, batch):
        """``alpha * KD_T + (1 - alpha) * hard`` (+ the feature term) on one batch."""
        import torch
        import torch.nn.functional as F

        from ..training.train import segmentation_loss

        T, a, n_img = self.cfg.temperature, self.cfg.alpha, self.n_img
        x = batch[:, :n_img]
        if self.n_teacher:
            t_out = batch[:, batch.shape[1] - self.n_teacher :]
            if self.adapter is not None:
                with torch.no_grad():
                    self.teacher(x)  # the feature term needs the teacher's features on this very input
        else:
            with torch.no_grad():
                t_out = self.teacher(x)
        s_out = self.student(x)
        kd = F.binary_cross_entropy_with_logits(s_out / T, torch.sigmoid(t_out / T)) * T * T
        if self.labels is not None:
            hard = segmentation_loss(s_out, (batch[:, n_img : n_img + 1] > 0.5).float(), batch[:, n_img + 1 : n_img + 2])
        else:
            hard = F.binary_cross_entropy_with_logits(s_out, torch.sigmoid(t_out))
        loss = a * kd + (1 - a) * hard
        if self.adapter is not None:
            loss = loss + self.cfg.feature_kd * F.mse_loss(self.adapter(self.s_store["f"]), self.t_store["f"])
        return loss


def tiled_outputs(net, images: list[np.ndarray], cancel: CancelToken | None = None) -> list[np.ndarray]:
    """The network's output on each whole image (tiled at 512 px with its halo; exact)."""
    import torch

    from ..jobs import run_sync
    from ..segment.tiling import predict_tiled

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
    from ..segment.postprocess import fg_dist_to_labels
    from ..tasks.evaluate import score
    from ..training.train import tune_postprocess

    pick = sorted(set(np.linspace(0, len(images) - 1, min(max_images, len(images))).round().astype(int).tolist()))
    imgs = [images[i] for i in pick]
    if instances is not None:
        refs, against = [instances[i] for i in pick], "labels"
    else:
        refs = [fg_dist_to_labels(o[0], o[1], teacher_params) for o in tiled_outputs(teacher, imgs, cancel)]
        against = "the teacher's instances"
    outs = tiled_outputs(student, imgs, cancel)
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
