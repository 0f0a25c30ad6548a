"""What watching a run costs: end-to-end segmentation with and without a metrics subscriber, interleaved.

"With" is what the Performance dock does: a :class:`MetricsBuffer` on the
hub (so the resource sampler runs at 10 Hz and every network batch and
image publishes an event) drained 20 times a second by another thread, as
the dock's timer does.  "Without": nobody listens (the engine then builds
no event at all).  Runs alternate (without, with, without, ...) so a busy
machine's drift falls on both; the ratio of the medians is printed and
written to ``benchmarks/results/monitor-overhead-<date>.json``.  Target:
<= 1.02.

    .venv/bin/python benchmarks/monitor_overhead.py [--size 2048] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from segstudio.core.segment.options import SegmentOptions

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each kind (default 5)")
    parser.add_argument("--model", default="nuclei")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from scaling import make_image

    from segstudio.core import metrics
    from segstudio.core.backends import create_backend
    from segstudio.core.image.sources import read_image
    from segstudio.core.jobs import run_sync
    from segstudio.core.models.catalog import get_model
    from segstudio.core.segment.job import segment_job, warm_up

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mosaic.tif"
        make_image(path, args.size, "contiguous")
        image = read_image(path)
    model = get_model(args.model)
    backend = create_backend(args.backend, model)
    warm_up(model, backend)
    diameter = run_sync(segment_job(image, model, backend)).diameter  # estimated once, the same for every run

    def once(watch: bool) -> tuple[float, int]:
        buffer, stop, drained = metrics.MetricsBuffer(), threading.Event(), [0]
        unsubscribe = metrics.HUB.subscribe(buffer) if watch else None

        def drain():
            while not stop.wait(0.05):
                drained[0] += len(buffer.drain())

        drainer = threading.Thread(target=drain, daemon=True) if watch else None
        if drainer:
            drainer.start()
        t0 = time.perf_counter()
        try:
            run_sync(metrics.monitored(segment_job(image, model, backend, SegmentOptions(diameter=diameter)), "segment", "mosaic"))
        finally:
            seconds = time.perf_counter() - t0
            stop.set()
            if drainer:
                drainer.join()
                drained[0] += len(buffer.drain())
            if unsubscribe:
                unsubscribe()
        return seconds, drained[0]

    times = {"without": [], "with": []}
    events = []
    for i in range(args.repeats):
        for kind in (("without", "with") if i % 2 == 0 else ("with", "without")):
            seconds, n = once(kind == "with")
            times[kind].append(seconds)
            if kind == "with":
                events.append(n)
            print(f"run {i + 1} {kind:7s} {seconds:6.2f} s" + (f" ({n} events)" if kind == "with" else ""), flush=True)
    med = {k: float(np.median(v)) for k, v in times.items()}
    ratio = med["with"] / med["without"]
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.node(), "cpus": os.cpu_count(),
              "load_average": os.getloadavg(), "image": f"{args.size}x{args.size}", "model": model.name,
              "backend": backend.describe(), "repeats": args.repeats, "seconds": times, "median_s": med,
              "events_per_watched_run": events, "ratio_with_over_without": ratio, "target": 1.02}
    backend.close()
    print(f"median without {med['without']:.2f} s, with {med['with']:.2f} s: ratio {ratio:.3f} "
          f"(target <= 1.02: {'met' if ratio <= 1.02 else 'NOT met'})")
    out = args.out or ROOT / "benchmarks" / "results" / f"monitor-overhead-{time.strftime('%Y-%m-%d')}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
