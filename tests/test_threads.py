"""Core leaves PyTorch's process-wide thread count as it found it."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from segstudio.core.backends import create_backend  # noqa: E402
from segstudio.core.jobs import Progress, run_sync  # noqa: E402
from segstudio.core.models.catalog import get_model  # noqa: E402
from segstudio.core.threads import keeps_torch_threads, torch_threads  # noqa: E402


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_job_that_sets_threads_gives_them_back_when_it_ends_or_fails(two_threads):
    @keeps_torch_threads
    def job(fail: bool):
        torch.set_num_threads(1)
        yield Progress("step", 1, 1)
        assert torch.get_num_threads() == 1
        if fail:
            raise RuntimeError("boom")
        return "done"

    assert run_sync(job(False)) == "done" and torch.get_num_threads() == 2
    with pytest.raises(RuntimeError):
        run_sync(job(True))
    assert torch.get_num_threads() == 2
    half = job(False)
    next(half)
    half.close()  # dropped half-way (cancelled)
    assert torch.get_num_threads() == 2
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_the_torch_backend_runs_on_its_threads_and_leaves_the_process_alone(two_threads):
    model = get_model("nuclei-light")
    seen = []
    with create_backend("torch", model, threads=1) as backend:
        real = backend.net
        backend.net = lambda x: (seen.append(torch.get_num_threads()), real(x))[1]
        out = backend.predict(np.zeros((1, model.spec.input_channels, 64, 64), np.float32))
        assert seen == [1]  # the network ran on the backend's one thread ...
        assert torch.get_num_threads() == 2 and "1 threads" in backend.describe()  # ... and the process kept two
    assert out.shape[-2:] == (64, 64)
