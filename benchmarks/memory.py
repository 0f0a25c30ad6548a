"""Peak resident memory, and memory over time, of long `segstudio batch` and `segstudio eval` runs.

    python benchmarks/memory.py [--jobs batch,eval] [--n 500] [--trees .,/path/to/other/checkout]

Each job runs the real CLI (``python -m segstudio.cli``) in a fresh process;
its resident memory, the process and all its children, is sampled every
50 ms with psutil, together with how many files it has finished:

``batch``
    ``segstudio batch`` over a folder of ``--n`` files of mixed sizes made
    from the DSB2018 ``train`` and ``val`` images (every kind), each a
    rotated / mirrored / cropped / rescaled (0.45x to 2x) copy, so that image
    sizes and nucleus sizes vary a lot (seeded: the same folder every run).
    Progress: the lines of ``batch_manifest.jsonl``.
``eval``
    ``segstudio eval --model nuclei --images val --labels val --kind
    fluorescence`` on the 113 DSB2018 fluorescence validation images.
    Progress: its progress bar (stderr is a pseudo-terminal for that).

Reported per run: peak RSS, RSS and peak RSS so far when 20 %, 50 % and
100 % of the files are done, the peak after the first 20 % of the files
against the peak until then, and whether memory is flat after the first
files (the RSS when 50 % and 100 % are done at most 10 % above the RSS when
20 % are: the level does not climb, though an image larger than any before
may lift the peak).  ``--trees`` runs each job on each checkout in turn (A, B, A, B ...
per job), so that a before / after comparison shares one session of this
shared machine; ``--rss-limit`` stops a run that grows past it (the record
says so).  Writes ``benchmarks/results/memory-<machine>-<date>.json``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import pty
import re
import shutil
import struct
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
DSB = Path(os.environ.get("SEGSTUDIO_DSB2018", ROOT.parent / "shared" / "data" / "dsb2018"))
INTERVAL = 0.05
MARKS = (0.2, 0.5, 1.0)
FLAT_TOLERANCE = 0.10


def make_folder(folder: Path, n: int, *, seed: int = 0, max_pixels: int = 1_500_000) -> list[dict]:
    """``n`` transformed copies of DSB2018 images (train + val, all kinds) in ``folder``; one record per file."""
    import tifffile

    from segstudio.core.segment.scale import resize

    sources = sorted((DSB / "train").glob("*_img.tif")) + sorted((DSB / "val").glob("*_img.tif"))
    if not sources:
        raise SystemExit(f"no DSB2018 images under {DSB} (set SEGSTUDIO_DSB2018)")
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        src = sources[int(rng.integers(len(sources)))]
        img = tifffile.imread(src)
        yxc = img.ndim == 3  # colour images are stored (Y, X, C)
        a = img if yxc else img[..., None]
        a = np.rot90(a, int(rng.integers(4)), axes=(0, 1))
        if rng.random() < 0.5:
            a = a[:, ::-1]
        h, w = a.shape[:2]
        ch, cw = (max(64, int(s * rng.uniform(0.4, 1.0))) for s in (h, w))
        y0, x0 = int(rng.integers(h - min(ch, h) + 1)), int(rng.integers(w - min(cw, w) + 1))
        a = a[y0 : y0 + ch, x0 : x0 + cw]
        factor = float(2.0 ** rng.uniform(-1.15, 1.0))
        factor = min(factor, np.sqrt(max_pixels / (a.shape[0] * a.shape[1])))
        shape = (max(64, round(a.shape[0] * factor)), max(64, round(a.shape[1] * factor)))
        out = resize(np.moveaxis(a, -1, 0).astype(np.float32), shape)  # (C, H, W)
        info = np.iinfo(img.dtype)
        out = np.clip(np.rint(out), info.min, info.max).astype(img.dtype)
        out = np.moveaxis(out, 0, -1) if yxc else out[0]
        name = f"f{i:04d}_{src.stem.removesuffix('_img')}.tif"
        tifffile.imwrite(folder / name, np.ascontiguousarray(out))
        records.append({"file": name, "source": src.name, "shape": list(out.shape), "scale": round(factor, 3)})
    return records


class Sampler:
    """RSS of a process and its children every ``INTERVAL`` s, with the progress count at each sample."""

    def __init__(self, proc: psutil.Process, progress, rss_limit_mb: float | None):
        self.proc, self.progress, self.limit = proc, progress, rss_limit_mb
        self.series: list[tuple[float, float, int]] = []  # (seconds, MB, files done)
        self.killed = False
        self.t0 = time.perf_counter()

    def rss(self) -> float:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total / 2**20

    def run(self) -> None:
        while True:
            try:
                if self.proc.status() == psutil.STATUS_ZOMBIE:
                    break
                mb = self.rss()
            except psutil.NoSuchProcess:
                break
            if mb == 0:  # exited between the two calls
                break
            self.series.append((round(time.perf_counter() - self.t0, 3), round(mb, 1), self.progress()))
            if self.limit and mb > self.limit:
                self.killed = True
                for p in [*self.proc.children(recursive=True), self.proc]:
                    try:
                        p.kill()
                    except psutil.NoSuchProcess:
                        pass
                break
            time.sleep(INTERVAL)


def run_cli(tree: Path, args: list[str], progress, *, rss_limit_mb: float | None, stderr_pty: bool = False) -> dict:
    """Run ``python -m segstudio.cli ARGS`` with ``tree`` first on the path, sampling its memory."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-m", "segstudio.cli", *args]
    master = slave = None
    if stderr_pty:  # the CLI draws its progress bar only on a terminal
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # tqdm draws nothing 0 wide
    err_buf: list[bytes] = []
    # files, not pipes: a pipe could fill while nobody reads it and block the CLI
    out_file, err_file = tempfile.TemporaryFile(), tempfile.TemporaryFile()  # noqa: SIM115 - closed below
    proc = psutil.Popen(cmd, env=env, cwd=str(tree), stdout=out_file, stderr=slave if stderr_pty else err_file)
    if stderr_pty:
        os.close(slave)

        def drain() -> None:
            while True:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    return
                if not chunk:
                    return
                err_buf.append(chunk)
                progress.feed(chunk)

        threading.Thread(target=drain, daemon=True).start()
    sampler = Sampler(proc, progress, rss_limit_mb)
    t0 = time.perf_counter()
    sampler.run()
    proc.wait()
    wall = time.perf_counter() - t0
    out_file.seek(0)
    err_file.seek(0)
    out, err = out_file.read(), err_file.read()
    out_file.close()
    err_file.close()
    if master is not None:
        time.sleep(0.2)
        os.close(master)
        err = b"".join(err_buf)
    return {"command": " ".join(["segstudio", *args]), "tree": str(tree), "returncode": proc.returncode,
            "killed_at_rss_limit": sampler.killed, "wall_s": round(wall, 2), "series": sampler.series,
            "stdout_tail": out.decode(errors="replace")[-1500:], "stderr_tail": _clean(err)[-1500:]}


def _clean(raw: bytes) -> str:
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", raw.decode(errors="replace")).replace("\r", "\n")


class ManifestProgress:
    """Files finished by a batch: the lines of its manifest."""

    def __init__(self, path: Path):
        self.path, self.n, self.size = path, 0, -1

    def __call__(self) -> int:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return 0
        if size != self.size:
            self.size = size
            self.n = self.path.read_bytes().count(b"\n")
        return self.n


class BarProgress:
    """Images finished by `segstudio eval`: the count on its progress bar (``23/113``)."""

    def __init__(self):
        self.n, self.tail = 0, b""

    def feed(self, chunk: bytes) -> None:
        self.tail = (self.tail + chunk)[-400:]
        found = re.findall(rb"\| *(\d+)/(\d+) \[", self.tail)
        if found:
            self.n = max(self.n, int(found[-1][0]))

    def __call__(self) -> int:
        return self.n


def summarize(run: dict, total: int) -> dict:
    """Peak, marks at 20 / 50 / 100 % of the files, and the flatness verdict of one run."""
    series = run["series"]
    if not series:
        return {"peak_rss_mb": None}
    mb = np.array([s[1] for s in series])
    done = np.array([s[2] for s in series])
    out = {"peak_rss_mb": float(mb.max()), "files": total, "files_done": int(done.max())}
    marks = {}
    for frac in MARKS:
        need = int(np.ceil(frac * total))
        hit = np.flatnonzero(done >= need)
        if len(hit):
            k = int(hit[0])
            marks[f"{int(frac * 100)}%"] = {"t_s": series[k][0], "rss_mb": float(mb[k]),
                                            "peak_so_far_mb": float(mb[: k + 1].max())}
    out["marks"] = marks
    first = marks.get("20%")
    if first is not None and run["returncode"] == 0:
        k = int(np.flatnonzero(done >= np.ceil(MARKS[0] * total))[0])
        after = float(mb[k:].max())
        out["peak_after_first_20pct_mb"] = after
        out["peak_growth_after_first_20pct"] = after / first["peak_so_far_mb"] - 1
        # flat: the level does not climb (a larger image than any before may still lift the peak a little)
        out["level_growth_20_to_100pct"] = marks["100%"]["rss_mb"] / first["rss_mb"] - 1
        out["flat"] = bool(all(m["rss_mb"] <= first["rss_mb"] * (1 + FLAT_TOLERANCE) for m in marks.values()))
    return out


def per_second(series: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """The series at one sample per second: each second's highest RSS (the peak is kept exactly)."""
    out: dict[int, tuple[float, float, int]] = {}
    for t, mb, done in series:
        k = int(t)
        if k not in out or mb > out[k][1]:
            out[k] = (t, mb, done)
    return [out[k] for k in sorted(out)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", default="batch,eval")
    ap.add_argument("--n", type=int, default=500, help="files in the batch folder")
    ap.add_argument("--trees", default=str(ROOT),
                    help="comma-separated checkouts to run (each job on each, in turn); default: this one")
    ap.add_argument("--model", default="nuclei")
    ap.add_argument("--rss-limit", type=float, default=12_000, help="MB; a run past it is stopped and says so")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the folder and outputs here")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    trees = [Path(t).resolve() for t in args.trees.split(",") if t]
    jobs = [j for j in args.jobs.split(",") if j]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="segstudio-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"what": "peak RSS and RSS over time of segstudio batch / eval (process and children, "
                            f"sampled every {int(INTERVAL * 1000)} ms)",
                    "command": "python benchmarks/memory.py " + " ".join(sys.argv[1:]),
                    "date": time.strftime("%Y-%m-%d %H:%M"), "runs": []}
    sys.path.insert(0, str(ROOT))
    from segstudio.core.tasks.benchmark import machine_info

    report["machine"] = machine_info()
    try:
        if "batch" in jobs:
            folder = work / "in"
            if not (folder / "files.json").is_file():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                records = make_folder(folder, args.n)
                (folder / "files.json").write_text(json.dumps(records))
            records = json.loads((folder / "files.json").read_text())
            px = [int(np.prod(r["shape"][:2])) for r in records]
            report["batch_folder"] = {"files": len(records), "megapixels": sum(px) / 1e6,
                                      "min_px": min(px), "max_px": max(px), "median_px": float(np.median(px)),
                                      "scales": [min(r["scale"] for r in records), max(r["scale"] for r in records)]}
            print(f"batch folder: {len(records)} files, {sum(px) / 1e6:.0f} Mpx, {min(px)} to {max(px)} px",
                  flush=True)
        for job in jobs:
            for k, tree in enumerate(trees):
                if job == "batch":
                    out = work / f"out-{k}"
                    shutil.rmtree(out, ignore_errors=True)
                    cli = ["batch", str(work / "in"), "--out", str(out), "--model", args.model, "--pattern", "*.tif"]
                    run = run_cli(tree, cli, ManifestProgress(out / "batch_manifest.jsonl"),
                                  rss_limit_mb=args.rss_limit)
                    total = len(records)
                else:
                    cli = ["eval", "--model", args.model, "--images", str(DSB / "val"), "--labels", str(DSB / "val"),
                           "--kind", "fluorescence", "--json", str(work / f"eval-{k}.json")]
                    run = run_cli(tree, cli, BarProgress(), rss_limit_mb=args.rss_limit, stderr_pty=True)
                    total = 113
                run["job"] = job
                run["summary"] = summarize(run, total)
                s = run["summary"]
                marks = ", ".join(f"{m} {v['rss_mb']:.0f} MB (peak {v['peak_so_far_mb']:.0f})"
                                  for m, v in s.get("marks", {}).items())
                print(f"{job:5s} {tree}: rc {run['returncode']}{' (stopped at the RSS limit)' if run['killed_at_rss_limit'] else ''}"
                      f", {run['wall_s']:.0f} s, {s.get('files_done')}/{total} files, peak {s['peak_rss_mb']:.0f} MB; "
                      f"{marks}; flat: {s.get('flat')}", flush=True)
                report["runs"].append(run)
            # speed on the files every tree finished (a run stopped at the RSS limit did fewer)
            runs = [r for r in report["runs"] if r["job"] == job]
            common = min(max((s[2] for s in r["series"]), default=0) for r in runs)
            for r in runs:
                r["summary"]["files_all_trees_finished"] = common
                r["summary"]["seconds_to_those_files"] = next((s[0] for s in r["series"] if s[2] >= common), None)
            if len(runs) > 1 and common:
                print(f"{job}: seconds to the {common} files every tree finished: "
                      + ", ".join(f"{r['tree']} {r['summary']['seconds_to_those_files']:.0f}" for r in runs), flush=True)
            for r in runs:
                r["series"] = per_second(r["series"])
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    name = f"memory-{platform.machine().lower()}-{time.strftime('%Y-%m-%d')}.json"
    out = args.json or ROOT / "benchmarks" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
