"""Batch throughput on a folder of many images vs `segstudio bench`'s single-image end-to-end throughput.

    python benchmarks/batch_throughput.py [--n 200] [--model nuclei] [--backend auto] [--sample ID]

The folder: ``--n`` files, each one of the 8 rotations / mirror images of one
of the four bundled sample images (real DSB2018 nuclei, 256x256 to 520x696),
round-robin, so every file is a different file with the same work as its
source image.  In one run on the same machine:

1. ``bench_job`` (what ``segstudio bench`` runs) on each sample image: the
   median end-to-end seconds after warm-up (model load and compilation are
   excluded).  The single-image throughput of the folder is its pixels over
   the sum, over its files, of their source image's end-to-end seconds;
2. ``batch_job`` (what ``segstudio batch`` runs) over the folder with the same
   model and backend: pixels over wall seconds (the backend is created and
   warmed up before the clock starts, as bench does; everything else,
   listing, reading, the diameter estimate, labels, CSV, manifest, summary,
   is inside the clock).

The ratio batch / single-image is the figure of merit (1.0: no per-file
overhead; the issue asks for >= 0.85).  Writes the JSON to ``--json``
(default ``benchmarks/results/batch-throughput-<arch>-<model>-<date>.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segstudio.sample_data import sample_pairs  # noqa: E402

from segstudio.core.backends import create_backend  # noqa: E402
from segstudio.core.image.sources import read_image  # noqa: E402
from segstudio.core.jobs import run_sync  # noqa: E402
from segstudio.core.models.catalog import get_model  # noqa: E402
from segstudio.core.segment.job import warm_up  # noqa: E402
from segstudio.core.tasks.batch import Compute, batch_job  # noqa: E402
from segstudio.core.tasks.benchmark import BASELINE, BenchOptions, bench_job, machine_info  # noqa: E402


def make_folder(folder: Path, n: int, only: list[str] | None = None) -> tuple[list[Path], list[int]]:
    """``n`` dihedral variants of the sample images; the sample paths and each file's sample index."""
    import tifffile

    samples = [img for img, _ in sample_pairs() if not only or any(img.name.startswith(o) for o in only)]
    if not samples:
        raise SystemExit(f"no sample image starts with {only}")
    planes = [read_image(p).data for p in samples]
    planes = [p.reshape(-1, *p.shape[-2:])[0] for p in planes]
    source = []
    for i in range(n):
        k = i % len(planes)
        variant = i // len(planes) % 8
        plane = np.rot90(planes[k], variant % 4)
        plane = plane[:, ::-1] if variant >= 4 else plane
        tifffile.imwrite(folder / f"well_{i:04d}.tif", np.ascontiguousarray(plane))
        source.append(k)
    return samples, source


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--model", default="nuclei")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--sample", action="append", default=None,
                    help="use only this sample image (its id, e.g. 0287e7ee5b00, the 256x256 one); repeatable")
    ap.add_argument("--workers", type=int, default=0,
                    help="also time the folder on a Dask LocalCluster of this many process workers")
    ap.add_argument("--repeats", type=int, default=5, help="bench repeats per image")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    model = get_model(args.model)
    with tempfile.TemporaryDirectory(prefix="segstudio-batch-bench-") as tmp:
        tmp = Path(tmp)
        folder = tmp / "in"
        folder.mkdir()
        samples, source = make_folder(folder, args.n, args.sample)
        sizes = [int(np.prod(read_image(p).data.shape[-2:])) for p in samples]
        pixels = sum(sizes[k] for k in source)

        per_image = []
        backend_desc = None
        for path, size in zip(samples, sizes):
            report = run_sync(bench_job(model, path, [args.backend], BenchOptions(repeats=args.repeats, warmup=2)))
            row = next(r for r in report["variants"] if r["name"] != BASELINE)
            per_image.append(size / (row["e2e_mpix_s"] * 1e6))
            backend_desc = row.get("describe", backend_desc)
        single_s = sum(per_image[k] for k in source)  # the folder's seconds at single-image speed
        single_mpix = pixels / single_s / 1e6

        backend = create_backend(args.backend, model)
        warm_up(model, backend)
        t0 = time.perf_counter()
        report = run_sync(batch_job(folder, tmp / "out", model, Compute('auto', backend=backend)))
        wall = time.perf_counter() - t0
        backend.close()
        assert report.counts == {"done": args.n}, report.counts
        batch_mpix = pixels / wall / 1e6
        dask = None
        if args.workers:
            # a cluster's start and each worker's model load are inside this clock (they are part of the run)
            t0 = time.perf_counter()
            report = run_sync(batch_job(folder, tmp / "out_dask", model, Compute(args.backend, workers=args.workers)))
            dask_wall = time.perf_counter() - t0
            assert report.counts == {"done": args.n}, report.counts
            dask = {"workers": args.workers, "threads_per_worker": 1, "wall_s": dask_wall,
                    "mpix_s": pixels / dask_wall / 1e6, "ratio": pixels / dask_wall / 1e6 / single_mpix}
    result = {
        "what": "batch throughput vs segstudio bench single-image end to end",
        "command": "python benchmarks/batch_throughput.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_info(),
        "model": f"{model.name} v{model.spec.version}",
        "backend": backend_desc or args.backend,
        "images": args.n,
        "megapixels": pixels / 1e6,
        "samples": [p.name for p in samples],
        "single_image_s": per_image,
        "folder_s_at_single_image_speed": single_s,
        "single_image_mpix_s": single_mpix,
        "batch_wall_s": wall,
        "batch_mpix_s": batch_mpix,
        "batch_images_per_s": args.n / wall,
        "ratio": batch_mpix / single_mpix,
        "dask_local_cluster": dask,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    out = args.json or ROOT / "benchmarks" / "results" / (
        f"batch-throughput-{platform.machine().lower()}-{args.model}"
        f"{'-' + '-'.join(args.sample) if args.sample else ''}-{result['date']}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
