"""Metrics events of inference runs: per network batch, per stage, memory and CPU.

The engine *publishes* typed events on the process-wide :data:`HUB`; whoever
wants them *subscribes* (the Performance dock's buffer, the CLI's
``--metrics run.jsonl`` writer, a test).  Core never knows who listens, and
publishing with nobody subscribed costs one attribute test.

Events (dataclasses, each with ``t``: seconds on the monotonic clock):

:class:`RunStarted` / :class:`RunFinished`
    the boundaries of one run (a segmentation, a batch, an optimization, a
    benchmark), from :func:`monitored`;
:class:`BatchTimed`
    one network call of the streaming pipeline: tiles, pixels, seconds;
:class:`StagesTimed`
    one image's seconds per stage (read, normalize, network, post, measure,
    write) and its wall time, the same figures as ``SegmentationResult.timings``;
:class:`ResourceSample`
    process RSS and its peak, CPU % (100 = one core busy) and, on CUDA, the
    GPU memory torch has allocated and reserved; sampled by a thread while a
    run is open and somebody listens (:data:`SAMPLE_INTERVAL_S`).

Subscribers are called on the publishing thread (a pipeline thread, the
sampler thread) and must be quick: :class:`MetricsBuffer` only appends, and
a GUI drains it on its own thread on a timer.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

from .jobs import Job

SAMPLE_INTERVAL_S = 0.1  # resource samples while a run is open (10 Hz)
MIN_CPU_WINDOW_S = 0.05  # CPU % over at least this long


@dataclass(frozen=True)
class RunStarted:
    run: int  # the run's number in this process (1, 2, ...)
    kind: str  # "segment", "batch", "optimize", "bench", ...
    name: str  # what it is about (an image, a folder, a model)
    t: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class RunFinished:
    run: int
    outcome: str  # "finished", "cancelled" or "failed"
    seconds: float
    t: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BatchTimed:
    tiles: int
    pixels: int  # network input pixels of the batch (tiles x tile height x tile width)
    seconds: float
    image: str = ""
    t: float = field(default_factory=time.monotonic)

    @property
    def mpx_per_s(self) -> float:
        return self.pixels / self.seconds / 1e6 if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class StagesTimed:
    image: str
    seconds: dict  # stage -> seconds (summed over threads; stages overlap in wall time)
    wall: float
    t: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class ResourceSample:
    rss: int  # bytes
    peak_rss: int  # bytes, the process's peak so far
    cpu_percent: float  # since the previous sample; 100 = one core busy
    gpu_allocated: int | None = None  # bytes torch has allocated on the current CUDA device
    gpu_reserved: int | None = None
    t: float = field(default_factory=time.monotonic)


EVENT_TYPES = {cls.__name__: cls for cls in (RunStarted, RunFinished, BatchTimed, StagesTimed, ResourceSample)}
MetricsEvent = RunStarted | RunFinished | BatchTimed | StagesTimed | ResourceSample


def to_dict(event: MetricsEvent) -> dict:
    """The event as a JSON-ready dict with its ``type``."""
    return {"type": type(event).__name__, **asdict(event)}


def from_dict(data: dict) -> MetricsEvent:
    """The event :func:`to_dict` made (unknown keys are ignored, so newer files still read)."""
    cls = EVENT_TYPES[data["type"]]
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


# ----------------------------------------------------------------------------- the hub


class MetricsHub:
    """Fans published events out to the subscribers; runs the resource sampler while a run is open."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[Callable[[MetricsEvent], Any]] = []
        self.active = False  # somebody listens (read without the lock: a stale value costs one event)
        self._runs = 0
        self._open = 0
        self._sampler: _Sampler | None = None

    def subscribe(self, fn: Callable[[MetricsEvent], Any]) -> Callable[[], None]:
        """Call ``fn(event)`` for every event from now on; returns the function that unsubscribes."""
        with self._lock:
            self._subscribers.append(fn)
            self.active = True
            stale = self._update_sampler()

        def unsubscribe() -> None:
            with self._lock:
                if fn in self._subscribers:
                    self._subscribers.remove(fn)
                self.active = bool(self._subscribers)
                stale = self._update_sampler()
            if stale is not None:
                stale.stop()

        if stale is not None:
            stale.stop()
        return unsubscribe

    def publish(self, event: MetricsEvent) -> None:
        if not self.active:
            return
        with self._lock:
            subscribers = list(self._subscribers)
        for fn in subscribers:
            fn(event)

    def open_run(self, kind: str, name: str) -> int:
        with self._lock:
            self._runs += 1
            run = self._runs
            self._open += 1
            self._update_sampler()
            sampler = self._sampler
        self.publish(RunStarted(run, kind, name))
        if sampler is not None:
            sampler.sample_now()
        return run

    def close_run(self, run: int, outcome: str, seconds: float) -> None:
        sampler = self._sampler
        if sampler is not None:
            sampler.sample_now()  # the run's last memory figure
        with self._lock:
            self._open = max(0, self._open - 1)
            stale = self._update_sampler()
        if stale is not None:
            stale.stop()
        self.publish(RunFinished(run, outcome, seconds))

    def _update_sampler(self) -> "_Sampler | None":
        """Sample while a run is open and somebody listens (lock held); returns a sampler to stop."""
        want = bool(self._open and self._subscribers)
        if want and self._sampler is None:
            self._sampler = _Sampler(self.publish)
        elif not want and self._sampler is not None:
            stale, self._sampler = self._sampler, None
            return stale
        return None


HUB = MetricsHub()


def publish(event: MetricsEvent) -> None:
    """Publish ``event`` on :data:`HUB` (nothing happens when nobody listens)."""
    HUB.publish(event)


def listening() -> bool:
    """True when somebody subscribed: build an event only then."""
    return HUB.active


class run_scope:
    """``with run_scope("segment", name):`` makes what happens inside one run (:class:`RunStarted` ... :class:`RunFinished`)."""

    def __init__(self, kind: str, name: str, hub: MetricsHub | None = None):
        self.kind, self.name, self.hub = kind, name, hub or HUB
        self.run = 0

    def __enter__(self) -> "run_scope":
        self._t0 = time.perf_counter()
        self.run = self.hub.open_run(self.kind, self.name)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        from .errors import Cancelled

        outcome = ("finished" if exc_type is None else
                   "cancelled" if issubclass(exc_type, (Cancelled, KeyboardInterrupt)) else "failed")
        self.hub.close_run(self.run, outcome, time.perf_counter() - self._t0)


def monitored(job: Job, kind: str, name: str, *, hub: MetricsHub | None = None) -> Job:
    """``job`` as one run (:class:`run_scope`): its events pass through unchanged and its result is returned."""
    with run_scope(kind, name, hub):
        return (yield from job)


# ----------------------------------------------------------------------------- resources


def gpu_memory() -> tuple[int | None, int | None]:
    """(allocated, reserved) bytes of torch's CUDA allocator, or ``(None, None)`` when CUDA is not in use.

    torch is never imported here: a process that did not load it has no CUDA memory of torch's.
    """
    import sys

    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_initialized():
            return None, None
        return int(torch.cuda.memory_allocated()), int(torch.cuda.memory_reserved())
    except Exception:  # noqa: BLE001 - a broken CUDA state must not stop the sampling
        return None, None


def peak_rss() -> int:
    """The process's peak resident memory in bytes (``ru_maxrss``; 0 where the platform lacks it)."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) if sys.platform == "darwin" else int(peak) * 1024
    except (ImportError, OSError):
        return 0


class _Sampler:
    """A daemon thread publishing a :class:`ResourceSample` every :data:`SAMPLE_INTERVAL_S`."""

    def __init__(self, emit: Callable[[MetricsEvent], None], interval: float = SAMPLE_INTERVAL_S):
        import psutil

        self._proc = psutil.Process()
        self._emit = emit
        self._interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._cpu0 = (time.monotonic(), self._cpu_seconds())
        self._percent = 0.0
        self._thread = threading.Thread(target=self._run, name="segstudio-metrics", daemon=True)
        self._thread.start()

    def _cpu_seconds(self) -> float:
        t = self._proc.cpu_times()
        return t.user + t.system

    def sample_now(self) -> None:
        with self._lock:
            now, cpu = time.monotonic(), self._cpu_seconds()
            t0, c0 = self._cpu0
            if now - t0 >= MIN_CPU_WINDOW_S:  # CPU times tick in 10 ms: a shorter window reads as noise
                self._cpu0 = (now, cpu)
                self._percent = min(100.0 * (cpu - c0) / (now - t0), 100.0 * (os.cpu_count() or 1))
            percent = self._percent
        rss = int(self._proc.memory_info().rss)
        allocated, reserved = gpu_memory()
        self._emit(ResourceSample(rss, max(rss, peak_rss()), round(percent, 1), allocated, reserved, t=now))

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.sample_now()
            except Exception:  # noqa: BLE001 - the process may be exiting; a missed sample is no harm
                pass

    def stop(self) -> None:
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()


# ----------------------------------------------------------------------------- subscribers


class MetricsBuffer:
    """Keeps published events until :meth:`drain` takes them (a GUI's timer, a test).

    Subscribe it with ``unsubscribe = HUB.subscribe(buffer)``.  ``maxlen``
    bounds memory if nobody drains (the oldest events go).
    """

    def __init__(self, maxlen: int = 100_000):
        self._events: deque = deque(maxlen=maxlen)

    def __call__(self, event: MetricsEvent) -> None:
        self._events.append(event)  # deque.append is atomic: no lock needed

    def drain(self) -> list[MetricsEvent]:
        out = []
        while True:
            try:
                out.append(self._events.popleft())
            except IndexError:
                return out


class JsonlWriter:
    """Writes every event as one JSON line (``segstudio ... --metrics run.jsonl``); flushed per line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = open(self.path, "w", encoding="utf-8")
        self._lock = threading.Lock()

    def __call__(self, event: MetricsEvent) -> None:
        line = json.dumps(to_dict(event), separators=(",", ":"))
        with self._lock:
            if not self._f.closed:
                self._f.write(line + "\n")
                self._f.flush()

    def close(self) -> None:
        with self._lock:
            self._f.close()


def read_jsonl(path: str | Path) -> list[MetricsEvent]:
    """The events a :class:`JsonlWriter` wrote (a line cut short by a crash is skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(from_dict(json.loads(line)))
            except (ValueError, KeyError, TypeError):
                continue
    return out


class recording:
    """``with recording("run.jsonl"):`` writes the events published inside to that file."""

    def __init__(self, path: str | Path | None, hub: MetricsHub | None = None):
        self.path, self.hub = path, hub or HUB
        self._writer: JsonlWriter | None = None
        self._unsubscribe: Callable[[], None] | None = None

    def __enter__(self):
        if self.path is not None:
            from .errors import OutputError
            from .image.io import check_output_file

            try:
                self._writer = JsonlWriter(check_output_file(self.path))
            except OSError as e:
                raise OutputError.from_oserror(self.path, e) from None
            self._unsubscribe = self.hub.subscribe(self._writer)
        return self

    def __exit__(self, *exc) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._writer.close()


def iter_runs(events: list[MetricsEvent]) -> Iterator[tuple[RunStarted, list[MetricsEvent]]]:
    """The events grouped by run: (its :class:`RunStarted`, the events up to its :class:`RunFinished`)."""
    current: tuple[RunStarted, list] | None = None
    for e in events:
        if isinstance(e, RunStarted):
            if current is not None:
                yield current
            current = (e, [])
        elif current is not None:
            current[1].append(e)
            if isinstance(e, RunFinished) and e.run == current[0].run:
                yield current
                current = None
    if current is not None:
        yield current


# ----------------------------------------------------------------------------- one run, summed up


STAGE_ORDER = ("read", "normalize", "network", "post", "measure", "write")


class RunRecord:
    """What one run's events add up to: the series a chart draws, its percentiles, its stage totals.

    ``add(event)`` takes the run's events in order (those of other runs are
    the caller's to keep out: see :meth:`RunRecords.add`).  Times are
    seconds since the run started.
    """

    def __init__(self, started: RunStarted):
        self.started = started
        self.finished: RunFinished | None = None
        self.batches: list[BatchTimed] = []
        self.stages: list[StagesTimed] = []
        self.resources: list[ResourceSample] = []

    @property
    def run(self) -> int:
        return self.started.run

    @property
    def label(self) -> str:
        state = self.finished.outcome if self.finished else "running"
        return f"#{self.run} {self.started.kind}: {self.started.name} ({state})"

    def add(self, event: MetricsEvent) -> None:
        if isinstance(event, BatchTimed):
            self.batches.append(event)
        elif isinstance(event, ResourceSample):
            self.resources.append(event)
        elif isinstance(event, StagesTimed):
            self.stages.append(event)
        elif isinstance(event, RunFinished):
            self.finished = event

    def since_start(self, t: float) -> float:
        return t - self.started.t

    def latencies_ms(self):
        import numpy as np

        return np.array([b.seconds * 1000 for b in self.batches], np.float64)

    def percentile_ms(self, q: float) -> float | None:
        import numpy as np

        lat = self.latencies_ms()
        return float(np.percentile(lat, q)) if len(lat) else None

    def stage_totals(self) -> dict[str, float]:
        """Seconds per stage over all the run's images (what ``SegmentationResult.timings`` sums to)."""
        totals = dict.fromkeys(STAGE_ORDER, 0.0)
        for s in self.stages:
            for k, v in s.seconds.items():
                totals[k] = totals.get(k, 0.0) + v
        return totals

    def peak_rss(self) -> int:
        return max((r.peak_rss for r in self.resources), default=0)

    def mpx_per_s(self) -> float | None:
        """Network throughput over the run: pixels of every batch over the seconds of every batch."""
        seconds = sum(b.seconds for b in self.batches)
        return sum(b.pixels for b in self.batches) / seconds / 1e6 if seconds > 0 else None

    def summary(self) -> str:
        parts = [self.label, f"{len(self.batches)} network batch(es)"]
        p50, p95 = self.percentile_ms(50), self.percentile_ms(95)
        if p50 is not None:
            parts.append(f"p50 {p50:.0f} ms, p95 {p95:.0f} ms")
        if self.mpx_per_s():
            parts.append(f"{self.mpx_per_s():.2f} Mpx/s")
        if self.peak_rss():
            parts.append(f"peak memory {self.peak_rss() / 2**30:.2f} GB")
        return " · ".join(parts)

    def write_csv(self, path: str | Path) -> Path:
        """Every event of the run, one row each (``kind`` says which), times since the run started."""
        import csv

        from .image.io import atomic_path

        path = Path(path)
        columns = ["kind", "t_s", "image", "tiles", "pixels", "seconds", "rss_bytes", "peak_rss_bytes",
                   "cpu_percent", "gpu_allocated_bytes", "gpu_reserved_bytes", *[f"{s}_s" for s in STAGE_ORDER],
                   "wall_s"]
        rows = []
        for b in self.batches:
            rows.append({"kind": "batch", "t_s": self.since_start(b.t), "image": b.image, "tiles": b.tiles,
                         "pixels": b.pixels, "seconds": b.seconds})
        for r in self.resources:
            rows.append({"kind": "resources", "t_s": self.since_start(r.t), "rss_bytes": r.rss,
                         "peak_rss_bytes": r.peak_rss, "cpu_percent": r.cpu_percent,
                         "gpu_allocated_bytes": r.gpu_allocated, "gpu_reserved_bytes": r.gpu_reserved})
        for s in self.stages:
            rows.append({"kind": "stages", "t_s": self.since_start(s.t), "image": s.image, "wall_s": s.wall,
                         **{f"{k}_s": v for k, v in s.seconds.items()}})
        rows.sort(key=lambda r: r["t_s"])
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
                w.writeheader()
                for r in rows:
                    w.writerow({k: ("" if r.get(k) is None else r.get(k, "")) for k in columns})
        return path


class RunRecords:
    """The last ``keep`` runs, built from the event stream (a run's events after its start go to it)."""

    def __init__(self, keep: int = 5):
        self.keep = keep
        self.runs: list[RunRecord] = []
        self._open: dict[int, RunRecord] = {}

    def add(self, event: MetricsEvent) -> RunRecord | None:
        """File ``event`` under its run; returns the run it changed (``None``: no run is open)."""
        if isinstance(event, RunStarted):
            record = RunRecord(event)
            self.runs.append(record)
            self._open[event.run] = record
            del self.runs[: max(0, len(self.runs) - self.keep)]
            return record
        if isinstance(event, RunFinished):
            record = self._open.pop(event.run, None)
        else:  # runs do not overlap (one inference run at a time); the newest open one gets it
            record = self.runs[-1] if self.runs and self.runs[-1].run in self._open else None
        if record is not None:
            record.add(event)
        return record
