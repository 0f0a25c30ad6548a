"""Metrics events: one per network batch, stage totals equal to the run's timings, memory, the JSON-lines file."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from segstudio.core import metrics
from segstudio.core.errors import Cancelled
from segstudio.core.image.sources import read_image
from segstudio.core.jobs import CancelToken, Progress, run_sync
from segstudio.core.segment.options import SegmentOptions


class Counting:
    """A backend that counts its network calls and the tiles they carried."""

    def __init__(self, inner):
        self.inner, self.calls, self.tiles = inner, 0, 0
        self.name, self.device, self.precision = inner.name, inner.device, inner.precision

    def predict(self, batch, crop=None):
        self.calls += 1
        self.tiles += len(batch)
        return self.inner.predict(batch, crop)

    def describe(self):
        return self.inner.describe()

    def close(self):
        pass


def _metrics_threads():
    return [t for t in threading.enumerate() if t.name == "segstudio-metrics"]


def test_one_event_per_network_batch_and_stage_totals_equal_the_timings(light, samples):
    from segstudio.core.segment.job import segment_job

    model, backend = light
    counting = Counting(backend)
    image = read_image(samples[0][0])
    buffer = metrics.MetricsBuffer()
    unsubscribe = metrics.HUB.subscribe(buffer)
    try:
        result = run_sync(metrics.monitored(
            segment_job(image, model, counting, SegmentOptions(diameter="native", tile=96, batch_size=2)), "segment", image.name))
    finally:
        unsubscribe()
    events = buffer.drain()
    assert isinstance(events[0], metrics.RunStarted) and events[0].kind == "segment"
    assert isinstance(events[-1], metrics.RunFinished) and events[-1].outcome == "finished"
    batches = [e for e in events if isinstance(e, metrics.BatchTimed)]
    assert counting.calls >= 3  # several batches: the image is cut into 96 px tiles
    assert len(batches) == counting.calls
    assert sum(b.tiles for b in batches) == counting.tiles
    assert all(1 <= b.tiles <= 2 and b.pixels > 0 and b.seconds > 0 for b in batches)
    (stages,) = [e for e in events if isinstance(e, metrics.StagesTimed)]
    assert stages.image == image.name
    assert stages.wall == result.timings["wall"]
    assert stages.seconds == {k: v for k, v in result.timings.items() if k != "wall"}
    # the network stage is exactly the sum of the batches' times: no batch went unreported
    assert sum(b.seconds for b in batches) == pytest.approx(stages.seconds["network"], rel=1e-9)
    samples_ = [e for e in events if isinstance(e, metrics.ResourceSample)]
    assert len(samples_) >= 2  # one as the run opens, one as it closes, more in between
    assert all(0 < s.rss <= s.peak_rss for s in samples_)
    peaks = [s.peak_rss for s in samples_]
    assert peaks == sorted(peaks)  # a peak never goes down
    assert all(s.cpu_percent >= 0 for s in samples_)
    assert all(s.gpu_allocated is None for s in samples_)  # no CUDA here
    assert not _metrics_threads()  # the sampler stops with the run


def test_nobody_listening_costs_no_events_and_no_thread(light, samples):
    from segstudio.core.segment.job import segment_job

    model, backend = light
    assert not metrics.listening()
    run_sync(metrics.monitored(segment_job(read_image(samples[0][0]), model, backend, SegmentOptions(diameter="native")),
                               "segment", "x"))
    assert not _metrics_threads()


def test_a_cancelled_or_failed_run_says_so():
    buffer = metrics.MetricsBuffer()
    unsubscribe = metrics.HUB.subscribe(buffer)

    def job(exc):
        yield Progress("network", 0, 1)
        raise exc

    try:
        with pytest.raises(Cancelled):
            run_sync(metrics.monitored(job(Cancelled("stop")), "segment", "a"))
        with pytest.raises(ValueError):
            run_sync(metrics.monitored(job(ValueError("bug")), "batch", "b"))
    finally:
        unsubscribe()
    runs = list(metrics.iter_runs(buffer.drain()))
    assert [(r.kind, ev[-1].outcome) for r, ev in runs] == [("segment", "cancelled"), ("batch", "failed")]
    assert not _metrics_threads()


def test_events_survive_the_json_lines_file(tmp_path):
    events = [metrics.RunStarted(1, "segment", "a.tif"), metrics.BatchTimed(4, 4 * 512 * 512, 0.25, "a.tif"),
              metrics.StagesTimed("a.tif", {"read": 0.1, "network": 0.25}, 0.4),
              metrics.ResourceSample(10, 20, 150.0, 5, 6), metrics.RunFinished(1, "finished", 0.5)]
    writer = metrics.JsonlWriter(tmp_path / "m.jsonl")
    for e in events:
        writer(e)
    writer.close()
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"type": "BatchTimed", "tiles": 4')  # a line cut short by a crash
    assert metrics.read_jsonl(tmp_path / "m.jsonl") == events
    assert events[1].mpx_per_s == pytest.approx(4 * 512 * 512 / 0.25 / 1e6)


def test_segment_cli_writes_the_metrics_file(tmp_path, samples):
    pytest.importorskip("onnxruntime")
    from segstudio.cli import main

    out = tmp_path / "out"
    rc = main(["segment", str(samples[0][0]), str(samples[1][0]), "--out", str(out), "--model", "nuclei-light",
               "--backend", "onnxruntime", "--tile", "128", "--batch-size", "1", "--diameter", "native", "-q",
               "--metrics", str(tmp_path / "m.jsonl")])
    assert rc == 0
    events = metrics.read_jsonl(tmp_path / "m.jsonl")
    (run, run_events), = metrics.iter_runs(events)
    assert run.kind == "segment" and run_events[-1].outcome == "finished"
    stages = [e for e in run_events if isinstance(e, metrics.StagesTimed)]
    assert [s.image for s in stages] == [samples[0][0].stem, samples[1][0].stem]
    for s in stages:  # each image's network time is the sum of its batches
        batches = [e for e in run_events if isinstance(e, metrics.BatchTimed) and e.image == s.image]
        assert len(batches) >= 2
        assert sum(b.seconds for b in batches) == pytest.approx(s.seconds["network"], rel=1e-9)
    assert any(isinstance(e, metrics.ResourceSample) and e.rss > 0 for e in run_events)
    assert not metrics.listening()  # the file's writer unsubscribed


def test_a_metrics_file_that_cannot_be_written_is_one_clear_error(tmp_path, samples):
    from segstudio.cli import main

    (tmp_path / "folder.jsonl").mkdir()
    rc = main(["segment", str(samples[0][0]), "--out", str(tmp_path / "o"), "--metrics", str(tmp_path / "folder.jsonl")])
    assert rc == 2
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_cancel_token_stops_a_monitored_batch_job_and_closes_the_run(light, samples, tmp_path):
    from segstudio.core.tasks.batch import Compute, batch_job

    model, backend = light
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.tif").write_bytes(samples[0][0].read_bytes())
    buffer = metrics.MetricsBuffer()
    unsubscribe = metrics.HUB.subscribe(buffer)
    cancel = CancelToken()
    try:
        job = metrics.monitored(batch_job(src, tmp_path / "out", model, Compute("onnxruntime", backend=backend), SegmentOptions(diameter="native"), cancel=cancel), "batch", str(src))
        seen = 0
        with pytest.raises(Cancelled):
            for event in job:
                if event.info.get("status") == "done":
                    seen += 1
                    cancel.cancel()
    finally:
        unsubscribe()
    events = buffer.drain()
    assert seen == 1
    assert events[-1].outcome == "cancelled"
    assert len([e for e in events if isinstance(e, metrics.StagesTimed)]) == 1  # one image ran
    assert np.isfinite([e.seconds for e in events if isinstance(e, metrics.BatchTimed)]).all()
