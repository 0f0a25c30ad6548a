"""Batch processing: every image of a folder to labels and measurements, resumably.

``batch_job(in_dir, out_dir, model, ...)`` segments every image under
``in_dir`` and writes, mirroring the input tree under ``out_dir``::

    <relative path without suffix>_labels.tif   instance labels
    <relative path without suffix>_cells.csv    one row per cell
    batch_summary.csv                           one row per file
    batch_manifest.jsonl                        what is finished (the source of truth)

Guarantees (``tests/test_batch.py`` kills the CLI with ``kill -9`` to check them):

* **Atomic outputs.**  Every file is written under a temporary name in its
  own folder and renamed into place (:func:`segstudio.core.image.io.atomic_path`),
  so a reader never sees half a file.  Temporary files a killed run left
  behind are removed when the next run starts: only files named as
  segstudio names them (``.<name>.<8 random>.segstudio-tmp``), and only in
  the folders this batch writes to; a file segstudio did not write is never
  replaced (:func:`segstudio.core.image.io.check_replaceable`).
* **Manifest.**  After an image's outputs are in place one JSON line is
  appended (flushed and fsynced) to ``batch_manifest.jsonl``.  A re-run skips
  every image whose last record is ``done`` (when its input file is
  unchanged, its outputs exist and the model is the same) and redoes the
  rest; a line cut short by a kill is ignored and cut off, and a damaged
  line is skipped with a warning (its file is redone).  The input's
  signature (size, time stamp and a fast hash of its bytes) is the one of
  the bytes that were segmented, taken from the open file: a file replaced
  or changed while the batch ran is recorded ``failed`` ("changed while it
  was segmented") and redone by the next run.  Images whose
  outputs were renamed into place but not yet recorded are simply redone, so
  each image is recorded ``done`` exactly once.  A lock file keeps two runs
  from writing into one folder.
* **Bad files** (unreadable, corrupt, zero bytes, wrong dimensions) are
  recorded ``failed`` with the reason and the batch goes on (a full disk or a
  read-only output folder stops it: every later file would fail too); files that are
  not images at all (by their suffix) are listed ``skipped`` with the reason.
  Failed files are tried again by the next run (a fixed file then succeeds).

Execution:

Where it runs is a :class:`Compute`; how each image is segmented, a
:class:`~segstudio.core.segment.options.SegmentOptions`; which files, a
:class:`FileSelection`.

* ``Compute(workers=1)`` (default): in this process.  A reader thread opens and
  decodes the next images while the network runs on the current one
  (:class:`_Prefetch`), and the labels TIFF is written by the segmentation
  pipeline's own writer thread, so small images are not I/O-bound.
* ``Compute(workers=N > 1)``: a Dask ``LocalCluster`` of N single-threaded process
  workers; ``scheduler="tcp://host:port"``: an existing Dask cluster (its
  workers must see ``in_dir`` and ``out_dir`` at the same paths).  Each
  worker process loads the model once (:func:`_worker_backend`) and writes
  the outputs of the images it is given; results stream back as they finish
  and only this process writes the manifest.

Progress: ``Progress("batch", done, total, message, info)`` per event, where
``info`` holds ``file`` (relative path), ``status`` (``running`` / ``done`` /
``failed`` / ``skipped``), the summary ``row`` when finished and ``eta_s``;
the first event has ``info["files"]``: every file with its status so far.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import Cancelled, InputError, OutputError, SegStudioError
from ..image.io import IMAGE_SUFFIXES, TEMP_NAME, atomic_path, check_output_file, ensure_folder, file_signature
from ..jobs import CancelToken, Job, Progress
from ..segment.options import SegmentOptions

MANIFEST = "batch_manifest.jsonl"
SUMMARY = "batch_summary.csv"
LOCK = ".segstudio-batch.lock"
SUMMARY_COLUMNS = ("file", "status", "reason", "cells", "mean_area", "live", "dead", "seconds", "model", "backend",
                   "labels", "cells_csv", "notes")
STATUSES = ("done", "failed", "skipped")


@dataclass(frozen=True)
class BatchItem:
    """One input file and where its outputs go."""

    path: Path
    rel: str  # the path relative to the input folder, with "/" separators
    out_stem: str  # the outputs' path relative to the output folder, without "_labels.tif" / "_cells.csv"

    @property
    def is_image(self) -> bool:
        return self.path.suffix.lower() in IMAGE_SUFFIXES

    def outputs(self, out_dir: Path) -> tuple[Path, Path]:
        return out_dir / f"{self.out_stem}_labels.tif", out_dir / f"{self.out_stem}_cells.csv"

    def signature(self) -> list:
        """:func:`~segstudio.core.image.io.file_signature` of the input as it is now."""
        return file_signature(self.path)


@dataclass
class BatchReport:
    """What a batch run ended with (also written as ``batch_summary.csv``)."""

    rows: list[dict]
    out_dir: Path
    seconds: float
    processed: int  # images segmented (or failed) by this run, not skipped as already done
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "failed"]


# ----------------------------------------------------------------------------- files


def scan(in_dir: str | Path, *, pattern: str | None = None, recursive: bool = False,
         exclude: str | Path | None = None) -> list[BatchItem]:
    """The files of ``in_dir`` (matching ``pattern``; in sub-folders with ``recursive``), sorted.

    Hidden files and anything under ``exclude`` (the output folder when it
    lies inside the input folder) are left out.  Output names mirror the
    input tree; two files that differ only by suffix (``a.tif``, ``a.png``)
    keep their suffix in the output name (``a.tif_labels.tif``).
    """
    in_dir = Path(in_dir)
    if not in_dir.is_dir():
        raise InputError(f"{in_dir}: no such folder")
    exclude = Path(exclude).resolve() if exclude is not None else None
    glob = pattern or "*"
    found = in_dir.rglob(glob) if recursive else in_dir.glob(glob)
    files = []
    for p in found:
        rel = p.relative_to(in_dir)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if exclude is not None and (p.resolve() == exclude or exclude in p.resolve().parents):
            continue
        if p.is_file() or (p.is_dir() and p.suffix.lower() == ".zarr"):
            if p.is_file() and any(q.suffix.lower() == ".zarr" for q in rel.parents if q != Path(".")):
                continue  # a file inside a zarr store
            files.append(rel)
    files.sort(key=lambda r: r.as_posix())
    stems: dict[str, int] = {}
    for rel in files:
        key = rel.with_suffix("").as_posix()
        stems[key] = stems.get(key, 0) + 1
    items = []
    for rel in files:
        stem = rel.with_suffix("").as_posix()
        items.append(BatchItem(in_dir / rel, rel.as_posix(), rel.as_posix() if stems[stem] > 1 else stem))
    return items


def remove_stale_temporaries(folders) -> int:
    """Delete the temporary files a killed run left in ``folders`` (not below them); their count.

    Only names made by :func:`segstudio.core.image.io.temporary_sibling` are
    touched: a user's own ``.x.tmp`` is never removed.
    """
    n = 0
    for folder in {Path(f) for f in ([folders] if isinstance(folders, (str, Path)) else folders)}:
        try:
            names = os.listdir(folder)
        except OSError:
            continue  # a folder not made yet holds nothing stale
        for name in names:
            if TEMP_NAME.match(name):
                try:
                    os.unlink(os.path.join(folder, name))
                    n += 1
                except (FileNotFoundError, IsADirectoryError, PermissionError):
                    pass
    return n


def output_folders(items: list["BatchItem"], out_dir: Path) -> set[Path]:
    """The folders a batch writes to: ``out_dir`` and those of every item's outputs."""
    return {out_dir} | {p.parent for item in items for p in item.outputs(out_dir)}


class FolderLock:
    """An exclusive lock on the output folder (released by the OS if the process dies)."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / LOCK
        self.fd: int | None = None

    def __enter__(self):
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError.from_oserror(self.path.parent, e, "write to") from None
        try:
            _lock_fd(self.fd)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise InputError(f"{self.path.parent}: another segstudio batch is writing to this folder",
                             hint="wait for it to finish, or choose another output folder") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
            self.fd = None


def _lock_fd(fd: int) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


class Manifest:
    """Append-only JSON lines: the last record of a file is its state.

    Lines that are not a record (cut short, damaged, edited by hand) are
    skipped and listed in ``damaged`` (line numbers): their files are redone.
    """

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict] = {}
        self.damaged: list[int] = []
        try:
            if path.exists():
                self._load()
            self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        except OSError as e:
            raise OutputError.from_oserror(path, e, "use the manifest") from None

    def _load(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a line cut short by a kill: cut it off so appends start on a fresh line
            with open(self.path, "r+b") as f:
                f.truncate(end)
        for number, line in enumerate(data[:end].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if valid_record(rec):
                self.records[rec["file"]] = rec
            else:
                self.damaged.append(number)

    def append(self, record: dict) -> None:
        try:
            self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:
            raise OutputError.from_oserror(self.path, e) from None
        self.records[record["file"]] = record

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass  # a full disk: the lines that made it are fsynced already


def valid_record(rec) -> bool:
    """A manifest line segstudio could have written (types checked, so a damaged one is never trusted)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("file"), str) or rec.get("status") not in STATUSES:
        return False
    sig = rec.get("input")
    if sig is not None and not (isinstance(sig, list) and 2 <= len(sig) <= 3
                                and all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in sig)):
        return False
    return all(isinstance(rec.get(k), str) for k in ("model_id", "reason") if k in rec)


def same_input(recorded, current) -> bool:
    """Whether a recorded signature is the file's current one (records of before the hash compare size and time)."""
    if not isinstance(recorded, list) or current is None:
        return False
    return recorded == current if len(recorded) == 3 else recorded == current[: len(recorded)]


def is_finished(item: BatchItem, record: dict | None, out_dir: Path, model_id: str) -> bool:
    """True when ``record`` says ``item`` is done, for this input and model, and its outputs exist."""
    if not record or record.get("status") != "done" or record.get("model_id") != model_id:
        return False
    if not same_input(record.get("input"), _signature_or_none(item)):
        return False
    return all(p.is_file() for p in item.outputs(out_dir))


# ----------------------------------------------------------------------------- one image


def _row(item: BatchItem, status: str, reason: str = "", **values) -> dict:
    return {"file": item.rel, "status": status, "reason": reason, **values}


def check_input(item: BatchItem) -> str | None:
    """Why ``item`` cannot be an image before even opening it (``None`` when it may be)."""
    if not item.is_image:
        return f"not an image file ({item.path.suffix or 'no suffix'})"
    try:
        if item.path.is_file() and item.path.stat().st_size == 0:
            return "empty file (0 bytes)"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    return None


def process_image(item: BatchItem, out_dir: Path, model, backend, source=None, *, options: SegmentOptions,
                  cancel: CancelToken | None = None) -> dict:
    """Segment one image and write its outputs atomically; the summary row (``done`` or ``failed``).

    ``source``: the already opened :class:`ImageSource`, or the exception opening it raised.
    """
    from ..image.sources import open_source
    from ..jobs import run_sync
    from ..segment.job import segment_to_files

    t0 = time.perf_counter()
    labels_path, csv_path = item.outputs(out_dir)
    signature = None  # of the bytes segmented, once the file is open

    def failed(reason: str) -> dict:
        return _row(item, "failed", reason, seconds=round(time.perf_counter() - t0, 4), model=model.name,
                    _input=signature or _signature_or_none(item))

    try:
        if isinstance(source, BaseException):
            raise source
        if source is None:
            source = open_source(item.path)
        signature = source.signature
        with source:
            result = run_sync(segment_to_files(source, model, backend, labels_path, csv_path, options,
                                               cancel=cancel))
    except Cancelled:
        raise
    except OutputError as e:
        if e.fatal:  # a full disk or a read-only folder: every later file would fail the same way
            raise
        return failed(_reason(e, item))
    except SegStudioError as e:
        return failed(_reason(e, item))
    except MemoryError:
        return failed("out of memory")
    except OSError as e:  # permissions, a file that vanished: the file's problem, not a bug
        if e.errno in OutputError.FATAL:  # but a full disk is every later file's problem too
            raise OutputError.from_oserror(out_dir, e) from None
        return failed(f"{type(e).__name__}: {e.strerror or e}")
    except Exception as e:  # noqa: BLE001 - one bad file must not stop the batch; a bug is logged
        import traceback

        from ..errors import write_crash_log

        try:
            where = f"; details in {write_crash_log(''.join(traceback.format_exception(e)))}"
        except OSError:
            where = ""
        return failed(f"unexpected error: {type(e).__name__}: {e} (this is a bug{where})")
    if signature is not None and not same_input(signature, _signature_or_none(item)):
        return failed("the file changed while it was being segmented (its outputs are of the version read); "
                      "the next run segments it again")
    table = result.table
    area = table.get("area_px")
    values = dict(cells=int(result.n_objects),
                  mean_area=round(float(area.mean()), 3) if area is not None and len(area) else 0.0,
                  seconds=round(time.perf_counter() - t0, 4), model=model.name, backend=result.backend,
                  labels=labels_path.relative_to(out_dir).as_posix(), cells_csv=csv_path.relative_to(out_dir).as_posix(),
                  notes="; ".join(result.warnings), _input=signature)
    classes = table.get("class")
    if classes is not None:
        values["live"] = int(sum(1 for c in classes if c == "live"))
        values["dead"] = int(sum(1 for c in classes if c == "dead"))
    return _row(item, "done", **values)


def _reason(e: BaseException, item: BatchItem) -> str:
    """The error message without the file's path in front (the summary's first column names the file)."""
    text = str(e)
    for prefix in (str(item.path), item.path.name):
        if text.startswith(prefix + ": "):
            return text[len(prefix) + 2:]
    return text or type(e).__name__


class _Prefetch:
    """Opens (and, for small files, decodes) the next images on a reader thread."""

    def __init__(self, items: list[BatchItem], depth: int = 2):
        self._n = len(items)
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), name="segstudio-batch-read", daemon=True)
        self._thread.start()

    def _run(self, items) -> None:
        from ..image.sources import open_source

        for item in items:
            if self._stop.is_set():
                break
            try:
                src = open_source(item.path)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which records it
                src = e
            while not self._stop.is_set():
                try:
                    self._q.put((item, src), timeout=0.1)
                    break
                except queue.Full:
                    continue
            else:
                if not isinstance(src, BaseException):
                    src.close()

    def __iter__(self):
        """``(item, opened source or the exception opening raised)``, once per item, in order."""
        for _ in range(self._n):
            yield self._q.get()

    def close(self) -> None:
        self._stop.set()
        while True:  # close what was opened but not consumed
            try:
                _item, src = self._q.get_nowait()
            except queue.Empty:
                break
            if not isinstance(src, BaseException):
                src.close()
        self._thread.join(timeout=5)


# ----------------------------------------------------------------------------- Dask workers

_WORKER_CACHE: dict[tuple, tuple] = {}
_WORKER_LOCK = threading.Lock()
_WORKER_LOADS: dict[tuple, int] = {}  # how often each (model, backend) was loaded in this process


def _worker_backend(model_ref: str, backend_name: str, threads: int):
    """The (model, backend) of this worker process, loaded on first use and kept."""
    key = (model_ref, backend_name, threads)
    with _WORKER_LOCK:
        if key not in _WORKER_CACHE:
            from ..backends import create_backend
            from ..models.catalog import get_model

            model = get_model(model_ref)
            backend = create_backend(backend_name, model, **({"threads": threads} if threads else {}))
            _WORKER_CACHE[key] = (model, backend)
            _WORKER_LOADS[key] = _WORKER_LOADS.get(key, 0) + 1
        return _WORKER_CACHE[key]


def _worker_process(path: str, rel: str, out_stem: str, out_dir: str, model_ref: str, compute: Compute,
                    options: SegmentOptions) -> dict:
    """A Dask task: one image (runs in a worker process, which creates ``compute``'s backend once)."""
    backend_name, threads = compute.backend_name, compute.threads or 1
    model, backend = _worker_backend(model_ref, backend_name, threads)
    row = process_image(BatchItem(Path(path), rel, out_stem), Path(out_dir), model, backend, options=options)
    row["worker"] = os.getpid()
    row["loads"] = _WORKER_LOADS[(model_ref, backend_name, threads)]
    return row


def _client(workers: int, scheduler: str | None):
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise InputError("running on several workers or a cluster needs Dask distributed",
                         hint="pip install 'segstudio[cluster]'") from None
    if scheduler:
        try:
            return Client(scheduler, timeout="20s"), None
        except (OSError, ValueError, TypeError) as e:  # unreachable, or not an address (no port, bad scheme)
            raise InputError(f"cannot reach the Dask scheduler at {scheduler!r} ({e})",
                             hint="give its address as tcp://HOST:PORT") from None
    # silence_logs=CRITICAL: a worker's heartbeat that races the cluster's shutdown logs an ERROR with a
    # traceback, which is noise to the user
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           memory_limit=0, silence_logs=logging.CRITICAL)
    return Client(cluster), cluster


# ----------------------------------------------------------------------------- the job


def check_folders(in_dir: str | Path, out_dir: str | Path) -> None:
    """Refuse an input that is not a folder and an output folder that is the input folder or not a folder."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise InputError(f"{in_dir}: no such folder")
    if in_dir.resolve() == out_dir.resolve():
        raise InputError(f"{out_dir}: the output folder cannot be the input folder (inputs are never touched)",
                         hint="choose another --out, e.g. a sub-folder or a folder beside it")
    check_output_file(out_dir / MANIFEST)


def model_identity(model) -> str:
    from ..models.catalog import model_digest

    return f"{model.name}@{model.spec.version}:{model_digest(model)[:12]}"


@dataclass(frozen=True)
class Compute:
    """Where a batch runs: in this process (``backend``, or ``backend_name`` created here) or on Dask workers.

    ``backend``: an already created backend to use in this process (the GUI
    passes its cached one); ``backend_name``: the variant to create here
    and in each Dask worker; ``workers > 1``: a local Dask cluster of that
    many single-threaded processes; ``scheduler``: an existing cluster's
    address; ``threads``: the backend's CPU threads (0: its default).
    """

    backend_name: str = "auto"
    backend: object = None
    workers: int = 1
    scheduler: str | None = None
    threads: int = 0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise InputError("--workers must be at least 1")

    @property
    def distributed(self) -> bool:
        return self.workers > 1 or bool(self.scheduler)


@dataclass(frozen=True)
class FileSelection:
    """Which files of the input folder a batch takes, and whether it tries failed ones again."""

    pattern: str | None = None
    recursive: bool = False
    retry_failed: bool = True


def batch_job(
    in_dir: str | Path,
    out_dir: str | Path,
    model,
    compute: Compute | str = "auto",
    options: SegmentOptions | None = None,
    *,
    files: FileSelection | None = None,
    cancel: CancelToken | None = None,
) -> Job[BatchReport]:
    """Segment every image of ``in_dir`` into ``out_dir`` (see the module docstring).

    Parameters
    ----------
    in_dir, out_dir : str or pathlib.Path
        The input folder (never written to) and the output folder.
    model : Model
    compute : Compute or str
        Where to run (a backend variant name runs it in this process).
    options : SegmentOptions, optional
        How each image is segmented; files done with other flips (``tta``)
        are done again.
    files : FileSelection, optional
        Pattern, sub-folders, retrying failed files.
    cancel : CancelToken, optional

    Returns
    -------
    BatchReport
        ``batch_summary.csv`` is written also when the run is cancelled
        (files not reached are ``skipped``, "not processed yet").
    """
    cancel = cancel or CancelToken()
    compute = Compute(compute) if isinstance(compute, str) else compute
    options, files = options or SegmentOptions(), files or FileSelection()
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    check_folders(in_dir, out_dir)
    items = scan(in_dir, pattern=files.pattern, recursive=files.recursive, exclude=out_dir)
    if not items:
        raise InputError(f"{in_dir}: no files" + (f" matching {files.pattern!r}" if files.pattern else ""),
                         hint="use --recursive for sub-folders" if not files.recursive else None)
    ensure_folder(out_dir)
    model_id = model_identity(model) + ("+tta" if options.tta else "")
    t_start = time.perf_counter()
    with FolderLock(out_dir):
        remove_stale_temporaries(output_folders(items, out_dir))
        manifest = Manifest(out_dir / MANIFEST)
        try:
            if manifest.damaged:
                yield _damaged_notice(manifest)
            rows, todo = _plan(items, manifest, out_dir, model_id, files.retry_failed)
            yield Progress("batch", len(items) - len(todo), len(items), f"{len(todo)} of {len(items)} file(s) to process",
                           info={"files": {it.rel: rows.get(it.rel, {}).get("status", "pending") for it in items},
                                 "out_dir": str(out_dir)})
            record = _Recorder(manifest, rows, model_id, len(items), len(todo))
            cancelled = False
            try:
                if todo and compute.distributed:
                    yield from _run_dask(todo, out_dir, model, compute, options, cancel, record)
                elif todo:
                    yield from _run_local(todo, out_dir, model, compute, options, cancel, record)
            except Cancelled:
                cancelled = True
            for item in items:
                if item.rel not in rows:
                    rows[item.rel] = _row(item, "skipped", "not processed yet (the run was cancelled)")
            ordered = [rows[it.rel] for it in items]
            write_summary(out_dir / SUMMARY, ordered)
        finally:
            manifest.close()
    counts: dict[str, int] = {}
    for r in ordered:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    processed = sum(1 for it in todo if rows[it.rel]["status"] != "skipped")
    report = BatchReport(ordered, out_dir, time.perf_counter() - t_start, processed, counts)
    if cancelled:
        raise Cancelled(f"batch cancelled: {counts.get('done', 0)} of {len(items)} done; run it again to resume")
    return report


def _damaged_notice(manifest: Manifest) -> Progress:
    lines = ", ".join(str(n) for n in manifest.damaged[:10]) + (", ..." if len(manifest.damaged) > 10 else "")
    return Progress("notice", 0, 0, f"{manifest.path}: skipped {len(manifest.damaged)} damaged line(s) "
                    f"({lines}); the files they named are segmented again", info={"warning": True})


def _plan(items: list[BatchItem], manifest: Manifest, out_dir: Path, model_id: str,
          retry_failed: bool) -> tuple[dict[str, dict], list[BatchItem]]:
    """The summary rows of the files that need no work (done, not images, failed and not retried), and the rest."""
    rows: dict[str, dict] = {}
    todo: list[BatchItem] = []
    for item in items:
        rec = manifest.records.get(item.rel)
        why = check_input(item)
        if why is not None:
            rows[item.rel] = _row(item, "skipped" if not item.is_image else "failed", why)
            if item.is_image and (rec or {}).get("reason") != why:
                manifest.append({**rows[item.rel], "input": _signature_or_none(item)})
        elif is_finished(item, rec, out_dir, model_id):
            rows[item.rel] = {k: v for k, v in rec.items() if k in SUMMARY_COLUMNS}
        elif rec and rec.get("status") == "failed" and not retry_failed \
                and same_input(rec.get("input"), _signature_or_none(item)):
            rows[item.rel] = {k: v for k, v in rec.items() if k in SUMMARY_COLUMNS}
        else:
            todo.append(item)
    return rows, todo


class _Recorder:
    """Records a finished file (manifest line, summary row) and says so as a progress event."""

    def __init__(self, manifest: Manifest, rows: dict, model_id: str, total: int, n_todo: int):
        self.manifest, self.rows, self.model_id = manifest, rows, model_id
        self.total, self.done = total, total - n_todo
        self.eta = _Eta(n_todo)

    def __call__(self, item: BatchItem, row: dict) -> Progress:
        signature = row.pop("_input", None) or _signature_or_none(item)
        self.manifest.append({**row, "input": signature, "model_id": self.model_id, "at": time.time()})
        self.rows[item.rel] = row
        self.done += 1
        self.eta.tick()
        msg = f"{item.rel}: " + (f"{row.get('cells', 0)} cells" if row["status"] == "done" else row["reason"])
        return Progress("batch", self.done, self.total, msg,
                        info={"file": item.rel, "status": row["status"], "row": row, "eta_s": self.eta.eta()})


def _signature_or_none(item: BatchItem):
    try:
        return item.signature()
    except OSError:
        return None


class _Eta:
    """Seconds left, from the pace of the images finished so far."""

    def __init__(self, n: int):
        self.n, self.k, self.t0 = n, 0, time.perf_counter()

    def tick(self) -> None:
        self.k += 1

    def eta(self) -> float | None:
        if not self.k:
            return None
        return (time.perf_counter() - self.t0) / self.k * max(0, self.n - self.k)


def _run_local(todo, out_dir, model, compute: Compute, options: SegmentOptions, cancel, record: _Recorder):
    backend, total = compute.backend, record.total
    own = backend is None
    if own:
        from ..backends import create_backend

        backend = create_backend(compute.backend_name, model, tile=options.tile,
                                 **({"threads": compute.threads} if compute.threads else {}))
    reader = _Prefetch(todo)
    try:
        for k, (item, source) in enumerate(reader):
            if cancel.cancelled and not isinstance(source, BaseException):
                source.close()
            cancel.raise_if_cancelled()
            yield Progress("batch", total - len(todo) + k, total, f"{item.rel}: segmenting",
                           info={"file": item.rel, "status": "running"})
            row = process_image(item, out_dir, model, backend, source, options=options, cancel=cancel)
            yield record(item, row)
    finally:
        reader.close()
        if own:
            backend.close()


def _run_dask(todo, out_dir, model, compute: Compute, options: SegmentOptions, cancel, record: _Recorder):
    from distributed import as_completed

    total = record.total
    client, cluster = _client(compute.workers, compute.scheduler)
    model_ref = str(Path(model.card_path).resolve())
    by_key, futures = {}, []
    try:
        yield Progress("batch", total - len(todo), total,
                       f"{len(client.scheduler_info().get('workers', {}))} Dask worker(s) at "
                       f"{client.scheduler.address}")
        for item in todo:
            fut = client.submit(_worker_process, str(item.path.resolve()), item.rel, item.out_stem,
                                str(out_dir.resolve()), model_ref, replace(compute, backend=None), options,
                                pure=False)
            by_key[fut.key] = item
            futures.append(fut)
        for fut in _poll(as_completed(futures), cancel):
            item = by_key[fut.key]
            try:
                row = fut.result()
            except Exception as e:  # noqa: BLE001 - a worker that died, a task that could not run
                row = _row(item, "failed", f"worker error: {type(e).__name__}: {e}", model=model.name)
            yield record(item, row)
    except Cancelled:
        client.cancel(futures)
        raise
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _poll(pending, cancel: CancelToken):
    """Futures of ``pending`` as they finish, checking ``cancel`` while waiting."""
    while True:
        cancel.raise_if_cancelled()
        if pending.is_empty():
            return
        batch = pending.next_batch(block=False)
        if not batch:
            time.sleep(0.05)
            continue
        for fut in batch:
            yield fut


# ----------------------------------------------------------------------------- summary


def write_summary(path: Path, rows: list[dict]) -> Path:
    """``batch_summary.csv``: one row per file (atomically)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(SUMMARY_COLUMNS), extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in SUMMARY_COLUMNS})
    return path


def read_summary(path: str | Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
