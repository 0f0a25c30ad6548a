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
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with PyTorch on ``n`` threads (``None`` or 0: as it is), restoring the count after."""
    if not n:
        yield
        return
    import torch

    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def keeps_torch_threads(job: Callable) -> Callable:
    """A generator job that may set PyTorch's thread count gets the caller's count back when it ends.

    Ended means returned, raised, cancelled or closed (a job dropped half-way
    is closed when it is collected).
    """

    @functools.wraps(job)
    def wrapper(*args, **kwargs):
        import torch

        before = torch.get_num_threads()
        try:
            return (yield from job(*args, **kwargs))
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)

    return wrapper
