"""Time per pixel and peak memory of `segstudio segment` from 2048^2 to 16384^2 pixels.

Builds uint16 TIFFs of each size from the bundled crowded sample (mirrored
mosaic, 12-bit), segments each with the CLI in a fresh process, and samples
that process's resident memory every 50 ms.  Writes
benchmarks/results/scaling-<device>-<date>.json and prints a table.

    python benchmarks/scaling.py [--sizes 2048,4096,8192,16384] [--backend openvino] [--layout contiguous|tiled]
        [--trees .,../other-checkout --repeats 3]

``--trees`` runs every size with each checkout in turn (A, B, A, B ... for
``--repeats`` rounds; ``PYTHONPATH`` set to the checkout), so that two
versions are compared within one session of a shared machine; the report
then gives each tree's median and the ratios to the first tree.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]

# the test image: a mirrored mosaic of the crowded sample (also the Benchmark page's bundled image)
from segstudio.core.tasks.benchmark import make_mosaic as make_image, mosaic_rows  # noqa: E402,F401


def run_segment(path: Path, out: Path, backend: str, tree: Path = ROOT) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # outputs of an earlier run are not replaced
    cmd = [sys.executable, "-m", "segstudio.cli", "segment", str(path), "--out", str(out),
           "--backend", backend, "--quiet"]
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = psutil.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(tree))
    peak = 0
    while proc.poll() is None:
        try:
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            peak = max(peak, rss)
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"segment failed: {stderr}")
    line = next(l for l in stdout.splitlines() if " cells in " in l)
    seconds = float(line.split(" cells in ")[1].split(" s")[0])
    return {"wall_s": wall, "segment_s": seconds, "peak_rss_mb": peak / 2**20,
            "cells": int(line.split(": ")[1].split(" cells")[0]), "stdout": line}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2048,4096,8192,16384")
    ap.add_argument("--backend", default="openvino")
    ap.add_argument("--layout", default="contiguous", choices=["contiguous", "tiled"])
    ap.add_argument("--workdir", default=None, help="where the test images go (default: a temporary folder)")
    ap.add_argument("--trees", default=str(ROOT), help="comma-separated checkouts, run in turn (default: this one)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over the trees per size")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    trees = [Path(t).resolve() for t in args.trees.split(",") if t]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="segstudio-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        # one warm start so that compiled kernels and the autotune cache exist before timing
        make_image(work / "warm.tif", 1024, args.layout)
        for tree in trees:
            run_segment(work / "warm.tif", work / "out", args.backend, tree)
        for size in sizes:
            path = work / f"scaling_{size}.tif"
            make_image(path, size, args.layout)
            for rep in range(args.repeats):
                for tree in trees:
                    r = run_segment(path, work / "out", args.backend, tree)
                    r.update(size=size, megapixels=size * size / 1e6, file_mb=path.stat().st_size / 2**20,
                             tree=str(tree), round=rep)
                    # per pixel: the segmentation itself, without the process's fixed start-up (imports, model load)
                    r["ns_per_px"] = 1e9 * r["segment_s"] / (size * size)
                    rows.append(r)
                    print(f"{size:>6}^2  {r['megapixels']:8.1f} Mpx  {r['segment_s']:8.1f} s "
                          f"({r['wall_s']:.1f} s with start-up)  {r['ns_per_px']:7.0f} ns/px  "
                          f"peak RSS {r['peak_rss_mb']:7.0f} MB  {r['cells']} cells  [{tree}]", flush=True)
            path.unlink()
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    mine = [r for r in rows if r["tree"] == str(trees[0])]
    ref = mine[0]["ns_per_px"]
    for r in rows:
        r["time_per_px_vs_smallest"] = r["ns_per_px"] / ref
    from segstudio.core.tasks.benchmark import machine_info

    report = {
        "command": "python benchmarks/scaling.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"), "backend": args.backend, "layout": args.layout,
        "host": machine_info(), "rows": rows,
        "max_peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
        "time_per_px_spread": max(r["time_per_px_vs_smallest"] for r in mine) - 1,
    }
    if len(trees) > 1:
        by = {}
        for size in sizes:
            med = {str(t): {k: float(np.median([r[k] for r in rows if r["tree"] == str(t) and r["size"] == size]))
                            for k in ("ns_per_px", "peak_rss_mb")} for t in trees}
            first = med[str(trees[0])]
            by[size] = {t: {**m, "ns_per_px_vs_first": m["ns_per_px"] / first["ns_per_px"],
                            "peak_rss_vs_first": m["peak_rss_mb"] / first["peak_rss_mb"]} for t, m in med.items()}
            print(f"{size}^2 medians: " + "; ".join(f"{t}: {m['ns_per_px']:.0f} ns/px, {m['peak_rss_mb']:.0f} MB"
                                                    for t, m in by[size].items()))
        report["trees"] = by
    out = Path(args.json or ROOT / "benchmarks" / "results" / f"scaling-cpu-{args.layout}-{report['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
