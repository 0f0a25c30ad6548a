"""PyTorch's thread count, set for one job and given back afterwards.

``torch.set_num_threads`` is process-wide: set by a training job or a
backend and left behind, it would change every later PyTorch call in the
process (napari's, a notebook's, another backend's).  Core code sets it only
through these helpers, which restore what was there.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def _restoring() -> Iterator:
    """PyTorch's thread count as it was before the block, whatever the block set."""
    import torch

    before = torch.get_num_threads()
    try:
        yield torch
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with PyTorch on ``n`` threads (``None`` or 0: as it is), restoring the count after."""
    if not n:
        yield
        return
    with _restoring() as torch:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        yield


def keeps_torch_threads(job: Callable) -> Callable:
    """A generator job that may set PyTorch's thread count gets the caller's count back when it ends.

    Ended means returned, raised, cancelled or closed (a job dropped half-way
    is closed when it is collected).
    """

    @functools.wraps(job)
    def wrapper(*args, **kwargs):
        with _restoring():
            return (yield from job(*args, **kwargs))

    return wrapper
