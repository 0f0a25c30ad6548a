"""Fine-tuning a built-in (or state-dict) U-Net on the user's own labelled images.

:func:`finetune_job` starts from the base model's weights, trains on
augmented crops (zoom, flips, 90-degree rotations, gain / offset / gamma,
Gaussian noise and blur) of the user's images, and every ``eval_every``
steps measures AP50 on a held-out share of them (at least one image).  The
weights with the best validation AP50 are kept; the base model's own score
is the bar to beat, so a fine-tune that does not help returns the base
weights unchanged (and says so).  Training stops early after ``patience``
evaluations without improvement, can be cancelled, and resumes from its
checkpoint (``OUT/.finetune/checkpoint.pt``) when run again with the same
inputs.  BatchNorm statistics stay frozen: a handful of images is too few
to re-estimate them.

The result is an ordinary model folder (state dict, ONNX, card with the
base model, the images and the curves in its provenance), and a PNG of the
loss and validation AP50 curves (``OUT/training.png``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..jobs import CancelToken, Job, Progress
from ..models.catalog import Model, model_digest
from ..threads import keeps_torch_threads
from .datasets import Pair, read_pair
from .loop import TrainLoop, save_checkpoint


@dataclass
class FinetuneConfig:
    steps: int = 300
    batch_size: int = 8
    crop: int = 144
    lr: float = 3e-4
    eval_every: int = 25
    patience: int = 4
    val_fraction: float = 0.2
    blur: float = 0.3  # probability of a Gaussian blur per crop
    seed: int = 0
    threads: int = 0


def split_pairs(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of training and validation images: at least one of each (two images or more)."""
    if n < 2:
        raise InputError("fine-tuning needs at least two labelled images (one is held out to check progress)")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, int(round(n * val_fraction))))
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def split_image(plane: np.ndarray, labels: np.ndarray, parts: int = 5, min_side: int = 64):
    """One labelled image cut into up to ``parts`` strips along its longer side (so one can be held out)."""
    labels = np.asarray(labels).reshape(plane.shape[-2:])
    axis = 1 if plane.shape[-1] >= plane.shape[-2] else 0
    n = min(parts, plane.shape[-2 + axis] // min_side)
    if n < 2:
        raise InputError(f"the image ({plane.shape[-2]} x {plane.shape[-1]} px) is too small to hold part of it out",
                         hint="label a second image, or a larger one (at least 128 px on its longer side)")
    edges = np.linspace(0, plane.shape[-2 + axis], n + 1).astype(int)
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        sl = (slice(None), slice(a, b)) if axis == 0 else (slice(None), slice(None), slice(a, b))
        out.append((plane[sl], labels[sl[1:]]))
    return out


def _val_ap50(net, samples, params) -> float:
    from ..optimize.distill import tiled_outputs
    from ..segment.postprocess import fg_dist_to_labels
    from ..tasks.evaluate import score

    outs = tiled_outputs(net, [s.image for s in samples])
    return float(np.mean([score(s.labels, fg_dist_to_labels(o[0], o[1], params), thresholds=(0.5,)).ap[0.5]
                          for o, s in zip(outs, samples)]))


def _freeze_batchnorm(net) -> None:
    import torch

    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()


@keeps_torch_threads
def finetune_job(
    base: Model, pairs: list[Pair] | None, out_dir: str | Path, cfg: FinetuneConfig = FinetuneConfig(), *,
    name: str | None = None, arrays: list[tuple[np.ndarray, np.ndarray]] | None = None,
    cancel: CancelToken | None = None,
) -> Job[dict]:
    """Fine-tune ``base`` on image / label ``pairs`` (files) or ``arrays`` (``(C, H, W)`` raw image, labels).

    Yields ``Progress("finetune", step, steps, info={"loss", "val_ap50"?})``;
    returns ``{"card": path, "png": path, "base_val_ap50", "best_val_ap50",
    "improved", "history", "seconds"}``.
    """
    import torch

    spec = base.spec
    if spec.architecture != "unet" or "torch" not in base.files:
        raise InputError(f"model {base.name!r} has no PyTorch weights of a built-in U-Net to fine-tune",
                         hint="fine-tune a built-in model or one imported from a state dict")
    if spec.classes:
        raise InputError("fine-tuning models with a class output (viability) is not supported yet")
    out_dir = Path(out_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    samples = _samples(spec, arrays if arrays is not None else [
        (next(image.planes())[1], labels) for image, labels in map(read_pair, pairs or [])
    ])
    run = _FinetuneRun(base, samples, out_dir, cfg, name or out_dir.name, cancel)
    yield from run.start()
    t_start = time.perf_counter()
    while run.step < cfg.steps and run.stale < cfg.patience:
        run.train_step()
        if run.step % cfg.eval_every == 0 or run.step == cfg.steps:
            yield run.evaluate(run.elapsed + time.perf_counter() - t_start)
    run.elapsed += time.perf_counter() - t_start
    result = run.finish()
    yield Progress("finetune", cfg.steps, cfg.steps,
                   f"done: val AP50 {run.best_ap:.3f} (base {run.base_ap:.3f})"
                   + ("" if result["improved"] else "; no gain, the base weights are kept"))
    return result


def _samples(spec, raw: list[tuple[np.ndarray, np.ndarray]]) -> list:
    """The labelled images as training samples at the model's scale (one image is cut into strips)."""
    from ..segment.preprocess import normalize, select_channels
    from ..segment.scale import median_diameter, rescale_sample, scale_factor
    from .train import Sample, distance_target

    if len(raw) == 1:
        raw = split_image(*raw[0])
    if len(raw) < 2:
        raise InputError("fine-tuning needs at least two labelled images (one is held out to check progress)")
    samples = []
    for i, (plane, lab) in enumerate(raw):
        lab = np.asarray(lab).reshape(plane.shape[-2:]).astype(np.int32)
        if lab.max() == 0:
            raise InputError(f"image {i + 1} has no labelled objects")
        x = normalize(select_channels(plane, spec.input_channels, None), spec.normalization)
        if spec.diameter:
            x, lab = rescale_sample(x, lab, scale_factor(spec.diameter, median_diameter(lab)))
        samples.append(Sample(f"image{i}", x, lab, (lab > 0).astype(np.float32), distance_target(lab)))
    return samples


class _FinetuneRun:
    """One :func:`finetune_job`: the split, the network and its loop, the best weights, the checkpoint."""

    def __init__(self, base: Model, samples: list, out_dir: Path, cfg: FinetuneConfig, name: str,
                 cancel: CancelToken | None):
        import torch

        from ..models.unet import build_unet
        from .train import TrainConfig

        self.base, self.spec, self.samples, self.out_dir, self.cfg, self.name = (
            base, base.spec, samples, out_dir, cfg, name)
        train_idx, val_idx = split_pairs(len(samples), cfg.val_fraction, cfg.seed)
        self.train, self.val = [samples[i] for i in train_idx], [samples[i] for i in val_idx]
        self.net = build_unet(self.spec.config)
        self.net.load_state_dict(torch.load(base.file("torch"), map_location="cpu", weights_only=True))
        self.key = hashlib.sha256(json.dumps(
            {"base": model_digest(base), "cfg": asdict(cfg), "n": len(samples),
             "sizes": [s.labels.shape for s in samples],
             "sums": [int(s.labels.astype(np.int64).sum() % 1_000_003) for s in samples]},
            default=str).encode()).hexdigest()[:16]
        self.work = out_dir / ".finetune"
        self.work.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.work / "checkpoint.pt"
        self.loop = TrainLoop(self.net.parameters(), cfg.lr, weight_decay=1e-4, cancel=cancel)
        self.history: list[dict] = []
        self.step, self.elapsed, self.best_state, self.base_ap, self.best_ap, self.stale = 0, 0.0, None, None, None, 0
        self.tcfg = TrainConfig(unet=self.spec.config, crop=cfg.crop, batch_size=cfg.batch_size, seed=cfg.seed,
                                zoom=(0.75, 1.33) if self.spec.diameter else (0.7, 1.4))
        self.png = out_dir / "training.png"
        self.losses: list[float] = []

    def start(self) -> Job[None]:
        """Resume from the checkpoint of the same inputs, or measure the base model on the held-out images."""
        import torch

        cfg = self.cfg
        if self.ckpt_path.is_file():
            ckpt = torch.load(self.ckpt_path, weights_only=True)
            if ckpt.get("key") == self.key:
                self.net.load_state_dict(ckpt["model"])
                self.loop.load_state_dict(ckpt)
                self.step, self.elapsed = int(ckpt["step"]), float(ckpt["seconds"])
                self.history = json.loads(ckpt["history"])
                self.base_ap, self.best_ap, self.stale = float(ckpt["base_ap"]), float(ckpt["best_ap"]), int(ckpt["stale"])
                self.best_state = ckpt["best"] if ckpt["best"] else None
                yield Progress("finetune", self.step, cfg.steps, f"resumed at step {self.step}")
        if self.base_ap is None:
            yield Progress("finetune", 0, cfg.steps, f"measuring {self.base.name} on {len(self.val)} held-out image(s)")
            self.net.eval()
            self.base_ap = self.best_ap = _val_ap50(self.net, self.val, self.spec.postprocess)
            self.history.append({"step": 0, "val_ap50": self.base_ap})
        yield Progress("finetune", self.step, cfg.steps,
                       f"{len(self.train)} training / {len(self.val)} validation image(s); base AP50 {self.base_ap:.3f}",
                       info={"val_ap50": self.base_ap})

    def train_step(self) -> None:
        """One step on an augmented batch (its own seed: a resumed run makes the same batches)."""
        import torch

        from .train import _augment_batch, segmentation_loss

        cfg = self.cfg
        if self.loop.cancel is not None:
            self.loop.cancel.raise_if_cancelled()
        rng = np.random.default_rng([cfg.seed, self.step])
        torch.manual_seed(cfg.seed * 100_003 + self.step)
        self.net.train()
        _freeze_batchnorm(self.net)
        idx = rng.integers(0, len(self.train), cfg.batch_size)
        x, fg, dist, _ = _augment_batch([self.train[i] for i in idx], self.tcfg, rng, blur=cfg.blur)
        self.losses.append(float(self.loop.step(segmentation_loss(self.net(x), fg, dist))))
        self.step += 1

    def evaluate(self, elapsed: float) -> Progress:
        """Validation AP50 now; the best weights kept; the checkpoint and the curves written."""
        from .plots import training_curves_png

        self.net.eval()
        ap = _val_ap50(self.net, self.val, self.spec.postprocess)
        self.history.append({"step": self.step, "loss": float(np.mean(self.losses)), "val_ap50": ap})
        self.losses = []
        if ap > self.best_ap + 1e-9:
            self.best_ap, self.stale = ap, 0
            self.best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        else:
            self.stale += 1
        save_checkpoint(self.ckpt_path, {
            "key": self.key, "model": self.net.state_dict(), **self.loop.state_dict(), "step": self.step,
            "seconds": elapsed, "history": json.dumps(self.history), "base_ap": self.base_ap,
            "best_ap": self.best_ap, "stale": self.stale, "best": self.best_state or {}})
        training_curves_png(self.png, self.history, title=f"fine-tuning {self.base.name} -> {self.name}")
        return Progress("finetune", self.step, self.cfg.steps,
                        f"loss {self.history[-1]['loss']:.4f}, val AP50 {ap:.3f} "
                        f"(best {self.best_ap:.3f}, base {self.base_ap:.3f})",
                        info={"loss": self.history[-1]["loss"], "val_ap50": ap, "png": str(self.png)})

    def finish(self) -> dict:
        """The best weights (or the base's, when nothing helped) saved as a model folder; the result."""
        import torch

        from .plots import training_curves_png
        from .train import save_model

        spec, cfg, base, val = self.spec, self.cfg, self.base, self.val
        improved = self.best_state is not None
        self.net.load_state_dict(self.best_state if improved else
                                 torch.load(base.file("torch"), map_location="cpu", weights_only=True))
        self.net.eval()
        new = copy.deepcopy(spec)
        new.name, new.version = self.name, f"{spec.version}+ft"
        new.title = f"{spec.title}, fine-tuned on {len(self.samples)} user image(s)"
        new.metrics = {"finetune_validation": {"images": len(val), "ap50_base": round(self.base_ap, 4),
                                               "ap50": round(self.best_ap, 4)}}
        new.training = {"fine_tuned_from": f"{base.name} v{spec.version} ({model_digest(base)})",
                        "config": asdict(cfg), "steps_run": self.step, "seconds": round(self.elapsed, 1),
                        "stopped": "early (no gain)" if self.stale >= cfg.patience else "step budget",
                        "improved": improved, "history": self.history}
        if not self.history or self.history[-1].get("step") != self.step:
            training_curves_png(self.png, self.history, title=f"fine-tuning {base.name} -> {self.name}")
        example = val[0].image[None, :, :64, :64].copy() if min(val[0].image.shape[-2:]) >= 64 else None
        card = save_model(self.net, new, self.out_dir, example)
        shutil.rmtree(self.work, ignore_errors=True)
        return {"card": card, "png": self.png, "base_val_ap50": self.base_ap, "best_val_ap50": self.best_ap,
                "improved": improved, "history": self.history, "seconds": self.elapsed,
                "train_images": len(self.train), "val_images": len(val)}
