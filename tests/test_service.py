"""One inference run at a time: a second job waits its turn (and says so), in the order asked; Cancel while waiting."""

from __future__ import annotations

import threading
import time

import pytest

from segstudio.core.errors import Cancelled
from segstudio.core.jobs import CancelToken, Progress, Stage, run_sync
from segstudio.core.service import InferenceQueue


def _job(name, log, hold: threading.Event | None = None, seconds=0.05):
    log.append(("start", name))
    yield Progress("network", 0, 1)
    if hold is not None:
        assert hold.wait(10)
    time.sleep(seconds)
    log.append(("end", name))
    return name


def test_jobs_run_one_at_a_time_in_the_order_asked():
    queue, log, hold = InferenceQueue(), [], threading.Event()
    notices: dict[str, list[str]] = {"b": [], "c": []}
    results = {}

    def run(name, job):
        def on(p):
            if p.stage is Stage.NOTICE:
                notices[name].append(p.message)
        results[name] = run_sync(queue.turn(job, f"job {name}"), on)

    first = threading.Thread(target=lambda: results.setdefault("a", run_sync(queue.turn(_job("a", log, hold), "job a"))))
    first.start()
    while queue.current != "job a":
        time.sleep(0.01)
    second = threading.Thread(target=run, args=("b", _job("b", log)))
    second.start()
    while queue.waiting() < 1:
        time.sleep(0.01)
    third = threading.Thread(target=run, args=("c", _job("c", log)))
    third.start()
    while queue.waiting() < 2:
        time.sleep(0.01)
    assert log == [("start", "a")]  # b and c wait while a runs
    hold.set()
    for t in (first, second, third):
        t.join(10)
    assert log == [("start", "a"), ("end", "a"), ("start", "b"), ("end", "b"), ("start", "c"), ("end", "c")]
    assert results == {"a": "a", "b": "b", "c": "c"}
    assert notices["b"] == ["waiting for job a to finish (one run at a time)"]
    assert len(notices["c"]) == 1 and notices["c"][0].startswith("waiting for job ")
    assert queue.current is None and queue.waiting() == 0


def test_cancel_while_waiting_leaves_the_queue_and_a_failure_frees_it():
    queue, log, hold = InferenceQueue(), [], threading.Event()
    first = threading.Thread(target=lambda: run_sync(queue.turn(_job("a", log, hold), "job a")))
    first.start()
    while queue.current != "job a":
        time.sleep(0.01)
    cancel = CancelToken()
    waiting = queue.turn(_job("b", log), "job b", cancel)
    assert next(waiting).stage is Stage.NOTICE
    cancel.cancel()
    t0 = time.monotonic()
    with pytest.raises(Cancelled):
        next(waiting)
    assert time.monotonic() - t0 < 1
    assert queue.waiting() == 0 and ("start", "b") not in log
    hold.set()
    first.join(10)

    def broken():
        yield Progress("network", 0, 1)
        raise ValueError("bug")

    with pytest.raises(ValueError):
        run_sync(queue.turn(broken(), "broken"))
    assert queue.current is None
    assert run_sync(queue.turn(_job("d", log), "job d")) == "d"  # the next one runs at once
