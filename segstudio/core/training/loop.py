"""The one training loop: AdamW, an optional one-cycle schedule, cancel, atomic checkpoints.

Training from scratch (:func:`~segstudio.core.training.train.train_job`),
fine-tuning (:func:`~segstudio.core.training.finetune.finetune_job`) and
distillation (:func:`~segstudio.core.optimize.distill.distill_job`) differ
in their batches, their loss and when they evaluate; the optimizer step,
its schedule, cancelling and checkpointing are this module's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..jobs import CancelToken


def one_cycle(opt, lr: float, total_steps: int):
    """One-cycle learning rate: warm up over the first 10 % of the steps (at least 2), then anneal.

    Very short runs (under 4 steps) keep ``lr`` (torch's schedule divides by
    zero when the warm-up rounds to nothing).
    """
    import torch

    if total_steps < 4:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps,
                                               pct_start=max(0.1, 2 / total_steps))


class TrainLoop:
    """AdamW over ``params`` with, given ``total_steps``, a one-cycle schedule; :meth:`run` steps it.

    Parameters
    ----------
    params : iterable of torch.nn.Parameter
        What is trained.
    lr : float
        The learning rate (the schedule's peak).
    weight_decay : float
    total_steps : int, optional
        Steps of the whole run, for the one-cycle schedule; ``None``: a
        constant learning rate.
    cancel : CancelToken, optional
        Checked before every step.
    """

    def __init__(self, params, lr: float, *, weight_decay: float = 1e-4, total_steps: int | None = None,
                 cancel: CancelToken | None = None):
        import torch

        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self.sched = one_cycle(self.opt, lr, total_steps) if total_steps is not None else None
        self.cancel = cancel

    def step(self, loss):
        """One optimizer (and schedule) step on ``loss``; returns it detached (no device sync)."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        return loss.detach()

    def run(self, batches: Iterable, loss_of: Callable) -> Iterator:
        """Yield the detached loss of each batch of ``batches`` after stepping on ``loss_of(batch)``."""
        for batch in batches:
            if self.cancel is not None:
                self.cancel.raise_if_cancelled()
            yield self.step(loss_of(batch))

    def state_dict(self) -> dict:
        """The optimizer's (and the schedule's) state, for a checkpoint."""
        state = {"opt": self.opt.state_dict()}
        if self.sched is not None:
            state["sched"] = self.sched.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        if self.sched is not None and "sched" in state:
            self.sched.load_state_dict(state["sched"])


def save_checkpoint(path: str | Path, state: dict) -> None:
    """``torch.save`` to a temporary file beside ``path``, then renamed over it: never half a checkpoint."""
    import torch

    path = Path(path)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
