"""Long-running work as generators.

A *job* is a generator that yields :class:`Progress` events and returns its
result (``Job = Generator[Progress, None, R]``).  The core never knows who is
listening: the CLI draws a progress bar, the Qt shells turn events into
signals, tests simply drain the generator with :func:`run_sync`.

Cancellation goes through a :class:`CancelToken` that the job checks at its
cancellation points (``token.raise_if_cancelled()``).  A cancelled job raises
:class:`~segstudio.core.errors.Cancelled`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Generator, TypeVar

from .errors import Cancelled

R = TypeVar("R")


class Stage(str, Enum):
    """What a progress event is about: a typed kind for shells (they test ``event.stage is Stage.NETWORK``).

    A ``str`` enum, so it also compares equal to its name's text; a stage
    that is not listed here stays a plain string.
    """

    LOAD = "load"
    READ = "read"
    PLANE = "plane"
    NETWORK = "network"
    NOTICE = "notice"
    BATCH = "batch"
    EVAL = "eval"
    BENCH = "bench"
    TRAIN = "train"
    FINETUNE = "finetune"
    OPTIMIZE = "optimize"
    ESTIMATE = "estimate"
    PRUNE = "prune"
    RECOVER = "recover"
    DISTILL = "distill"
    SPARSIFY = "sparsify"
    EXPORT = "export"
    QUANTIZE = "quantize"
    ENGINE = "engine"
    VALIDATE = "validate"
    VALIDATION = "validation"
    CALIBRATION = "calibration"
    COMPARE = "compare"
    PROBE = "probe"
    CHECK = "check"
    KEEP = "keep"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


@dataclass(frozen=True)
class Progress:
    """One progress event.

    Attributes
    ----------
    stage : Stage or str
        What is happening (:class:`Stage`; a text given here becomes its
        :class:`Stage` member when there is one).
    done, total : int
        Units finished and units in all for this stage (``total`` 0 if unknown).
    message : str
        Human-readable detail.
    info : dict
        Extra machine-readable data (timings, sizes).
    event : object, optional
        A typed event for shells that need more than a progress bar (the
        optimization run yields :class:`~segstudio.core.optimize.report.OptimizeEvent`
        here); shells test its type, never ``stage``.
    """

    stage: str
    done: int = 0
    total: int = 0
    message: str = ""
    info: dict = field(default_factory=dict)
    event: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.stage, Stage):
            try:
                object.__setattr__(self, "stage", Stage(self.stage))
            except ValueError:
                pass

    @property
    def fraction(self) -> float | None:
        return self.done / self.total if self.total else None


Job = Generator[Progress, None, R]


class CancelToken:
    """Thread-safe cancellation flag shared by a job and whoever runs it."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user")


def run_sync(job: Job[R], on_progress: Callable[[Progress], Any] | None = None) -> R:
    """Drain ``job`` in this thread, passing each event to ``on_progress``.

    Returns the job's return value.
    """
    while True:
        try:
            event = next(job)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(event)


def run_interruptible(fn: Callable[[], R], cancel: CancelToken | None, *, poll_s: float = 0.1) -> R:
    """``fn()`` for a call that has no cancellation point of its own (an ONNX export): Cancel returns at once.

    ``fn`` runs on a daemon thread while this one polls ``cancel``; on
    Cancel, :class:`Cancelled` is raised here within ``poll_s`` and the
    call's result, when it comes, is dropped (it must only write files that
    nothing else reads before it returns).  Its exception is raised here.
    """
    if cancel is None:
        return fn()
    cancel.raise_if_cancelled()
    box: dict = {}
    done = threading.Event()

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            box["error"] = e
        finally:
            done.set()

    threading.Thread(target=target, name="segstudio-uninterruptible", daemon=True).start()
    while not done.wait(poll_s):
        cancel.raise_if_cancelled()
    if "error" in box:
        raise box["error"]
    return box["value"]
