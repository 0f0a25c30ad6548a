"""One inference run at a time for the whole process, in the order asked.

The shells (the Segment and Batch panels, the Optimize wizard) each run
their job on a worker thread; before its work starts, every inference job
takes its turn in :data:`INFERENCE`: a job asked for while another runs
waits (it says so once, as a notice, and Cancel still works while it
waits), then runs alone.  Why one at a time: on a CPU two runs would share
the same cores and each take about twice as long, a speed measurement
(the optimizer's guardrail, a benchmark) made beside another run would be
wrong, and the metrics of :mod:`segstudio.core.metrics` belong to one run.
GPU backends are, besides, created and called on their device's one
thread (:mod:`segstudio.core.backends.device`), which owns every CUDA
context.
"""

from __future__ import annotations

import threading
from collections import deque

from .jobs import CancelToken, Job, Progress, Stage

POLL_S = 0.1  # how often a waiting job looks at its cancel token


class InferenceQueue:
    """Runs inference jobs one at a time, first come first served (see the module docstring)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: deque = deque()  # tickets, in the order asked
        self.current: str | None = None  # the label of the job that runs

    def turn(self, job: Job, label: str, cancel: CancelToken | None = None) -> Job:
        """``job`` once it is its turn; its events and result pass through unchanged.

        While it waits: one ``Stage.NOTICE`` event naming what runs, and
        :class:`~segstudio.core.errors.Cancelled` within :data:`POLL_S` of ``cancel``.
        """
        ticket = object()
        with self._cond:
            self._waiting.append(ticket)
        told = False
        try:
            while True:
                with self._cond:
                    if self.current is None and self._waiting[0] is ticket:
                        self._waiting.popleft()
                        self.current = label
                        break
                    ahead = self.current or "another run"
                if not told:
                    told = True
                    yield Progress(Stage.NOTICE, 0, 0, f"waiting for {ahead} to finish (one run at a time)")
                if cancel is not None:
                    cancel.raise_if_cancelled()
                with self._cond:
                    self._cond.wait(POLL_S)
        except BaseException:
            with self._cond:
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
                self._cond.notify_all()
            raise
        try:
            return (yield from job)
        finally:
            with self._cond:
                self.current = None
                self._cond.notify_all()

    def waiting(self) -> int:
        """How many jobs wait for their turn."""
        with self._cond:
            return len(self._waiting)


INFERENCE = InferenceQueue()
