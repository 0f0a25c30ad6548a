"""Batch processing: a folder of 220 files, killed three times, resumed; the same folder on Dask workers."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from segstudio.core.errors import Cancelled, InputError
from segstudio.core.image.sources import read_image
from segstudio.core.jobs import CancelToken, run_sync
from segstudio.core.segment.options import SegmentOptions
from segstudio.core.tasks.batch import (
    MANIFEST,
    SUMMARY,
    Compute,
    FileSelection,
    FolderLock,
    Manifest,
    batch_job,
    read_summary,
    remove_stale_temporaries,
    scan,
)

pytest.importorskip("onnxruntime")

N_GOOD = 210
MODEL = "nuclei-light"
TMP_NAME = ("tmp", "partial")


def _crops(samples, n: int, size: int, seed: int):
    rng = np.random.default_rng(seed)
    images = [read_image(img).data for img, _ in samples]
    for i in range(n):
        im = images[i % len(images)]
        plane = im.reshape(-1, *im.shape[-2:])[0]
        y = rng.integers(0, plane.shape[0] - size + 1)
        x = rng.integers(0, plane.shape[1] - size + 1)
        yield plane[y:y + size, x:x + size]


@pytest.fixture(scope="module")
def plate(tmp_path_factory, samples):
    """210 good 128x128 crops of the real sample images in two sub-folders, plus 11 bad files (5 %)."""
    root = tmp_path_factory.mktemp("plate")
    good = []
    for i, crop in enumerate(_crops(samples, N_GOOD, 128, seed=0)):
        rel = f"row{i % 2}/well_{i:03d}.tif"
        (root / rel).parent.mkdir(exist_ok=True)
        tifffile.imwrite(root / rel, crop)
        good.append(rel)
    bad = {
        "row0/empty.tif": b"",
        "row0/text.tif": b"hello\n" * 50,
        "row1/truncated.tif": (root / good[1]).read_bytes()[:400],
        "row1/garbage.png": os.urandom(2000),
        "row1/junk.jpg": b"\xff\xd8\xff" + b"\x00" * 100,
    }
    for rel, data in bad.items():
        (root / rel).write_bytes(data)
    np.save(root / "row0/line.npy", np.zeros(50, np.uint16))  # wrong dims: 1-D
    np.save(root / "row0/five.npy", np.zeros((2, 2, 3, 16, 16), np.uint8))  # wrong dims: 5-D
    tifffile.imwrite(root / "row1/dot.tif", np.zeros((1, 1), np.uint8))  # too small to segment
    tifffile.imwrite(root / "row1/stack5d.tif", np.zeros((2, 2, 5, 16, 16), np.uint8))
    (root / "row0/notes.txt").write_text("plate map\n")
    (root / "row1/export.csv").write_text("a,b\n")
    failing = sorted([*bad, "row0/line.npy", "row0/five.npy", "row1/dot.tif", "row1/stack5d.tif"])
    return root, good, failing, ["row0/notes.txt", "row1/export.csv"]


def _cli(*args):
    return [sys.executable, "-m", "segstudio.cli", *map(str, args)]


def _manifest_lines(out: Path) -> list[dict]:
    path = out / MANIFEST
    if not path.exists():
        return []
    recs = []
    for line in path.read_bytes().splitlines():
        try:
            recs.append(json.loads(line))
        except ValueError:
            pass
    return recs


def _temporaries(out: Path) -> list[Path]:
    from segstudio.core.image.io import TEMP_NAME

    return [p for p in out.rglob("*") if TEMP_NAME.match(p.name) or p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def killed_and_resumed(plate, tmp_path_factory):
    """`segstudio batch` killed with SIGKILL three times at random moments, then run to the end."""
    root, good, _failing, _skipped = plate
    out = tmp_path_factory.mktemp("out")
    cmd = _cli("batch", root, "--recursive", "--out", out, "--model", MODEL, "--diameter", "native", "-q")
    rng = np.random.default_rng(int(os.environ.get("SEGSTUDIO_KILL_SEED", "6")))
    kills = []
    for _ in range(3):
        before = sum(r["status"] == "done" for r in _manifest_lines(out))
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for = int(rng.integers(8, 45))  # images this run finishes before the kill ...
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if sum(r["status"] == "done" for r in _manifest_lines(out)) - before >= wait_for:
                break
            time.sleep(0.01)
        time.sleep(float(rng.uniform(0, 0.08)))  # ... plus a random part of the next one
        assert proc.poll() is None, f"the batch ended before it could be killed: {proc.stderr.read()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        kills.append(sum(r["status"] == "done" for r in _manifest_lines(out)) - before)
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return out, kills, final


def test_killed_three_times_then_resumed_every_good_image_done_exactly_once(plate, killed_and_resumed):
    root, good, failing, skipped = plate
    out, kills, final = killed_and_resumed
    assert all(k > 0 for k in kills), kills  # every run got some work done before its kill
    assert sum(kills) < len(good)
    assert final.returncode == 1, final.stderr  # 1: some files failed
    assert f"{len(good)} done, {len(failing)} failed, {len(skipped)} skipped" in final.stdout
    done = [r["file"] for r in _manifest_lines(out) if r["status"] == "done"]
    assert sorted(done) == sorted(good)  # each good image recorded done exactly once, over four runs
    assert not _temporaries(out)
    for rel in good:
        stem = rel.removesuffix(".tif")
        labels = tifffile.imread(out / f"{stem}_labels.tif")
        assert labels.shape == (128, 128) and labels.dtype == np.uint16
        with open(out / f"{stem}_cells.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == len(np.unique(labels)) - 1
    rows = {r["file"]: r for r in read_summary(out / SUMMARY)}
    assert len(rows) == len(good) + len(failing) + len(skipped)
    for rel in failing:
        assert rows[rel]["status"] == "failed" and rows[rel]["reason"], rel
        assert rel in final.stderr
    for rel in skipped:
        assert rows[rel]["status"] == "skipped" and "not an image" in rows[rel]["reason"]
    assert rows["row0/empty.tif"]["reason"] == "empty file (0 bytes)"
    assert "TIFF" in rows["row1/truncated.tif"]["reason"]
    cells = [int(rows[g]["cells"]) for g in good]
    assert sum(cells) > 5 * len(good) and all(rows[g]["model"] == MODEL for g in good)
    assert all(float(rows[g]["mean_area"]) > 0 for g in good if int(rows[g]["cells"]))
    # inputs untouched, nothing written beside them
    assert not any(p.name.endswith(("_labels.tif", "_cells.csv")) for p in root.rglob("*"))


def test_rerun_of_a_finished_folder_does_nothing_again(plate, killed_and_resumed):
    root, good, failing, _ = plate
    out, _, _ = killed_and_resumed
    lines = len(_manifest_lines(out))
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*_labels.tif")}
    proc = subprocess.run(_cli("batch", root, "--recursive", "--out", out, "--model", MODEL, "--diameter",
                               "native", "-q", "--no-retry"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "0 processed in this run" in proc.stdout, proc.stdout + proc.stderr
    assert len(_manifest_lines(out)) == lines
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*_labels.tif")} == mtimes


def test_local_cluster_with_two_process_workers_gives_identical_labels(plate, killed_and_resumed, tmp_path):
    pytest.importorskip("distributed")
    from segstudio.core.models.catalog import get_model

    root, good, failing, _ = plate
    single, _, _ = killed_and_resumed
    out = tmp_path / "dask"
    report = run_sync(batch_job(root, out, get_model(MODEL), Compute("auto", workers=2), SegmentOptions(diameter="native"), files=FileSelection(recursive=True)))
    assert report.counts == {"done": len(good), "failed": len(failing), "skipped": 2}
    recs = [r for r in _manifest_lines(out) if r["status"] == "done"]
    workers = {r["worker"] for r in recs}
    assert len(workers) == 2 and os.getpid() not in workers  # both process workers did some
    assert all(r["loads"] == 1 for r in recs)  # each worker loaded the model once
    for rel in good:
        stem = rel.removesuffix(".tif")
        a = tifffile.imread(single / f"{stem}_labels.tif")
        b = tifffile.imread(out / f"{stem}_labels.tif")
        assert np.array_equal(a, b), rel
    assert {r["file"]: r["reason"] for r in read_summary(out / SUMMARY) if r["status"] == "failed"} == \
        {r["file"]: r["reason"] for r in read_summary(single / SUMMARY) if r["status"] == "failed"}


# ----------------------------------------------------------------------------- the parts


def test_scan_mirrors_the_tree_and_keeps_colliding_suffixes(tmp_path):
    for rel in ("a.tif", "a.png", "b.tif", "sub/c.tif", ".hidden.tif", "out/old_labels.tif"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    items = scan(tmp_path, recursive=True, exclude=tmp_path / "out")
    assert {i.rel: i.out_stem for i in items} == {"a.png": "a.png", "a.tif": "a.tif", "b.tif": "b", "sub/c.tif": "sub/c"}
    assert [i.rel for i in scan(tmp_path, pattern="*.tif")] == ["a.tif", "b.tif"]
    with pytest.raises(InputError, match="no such folder"):
        scan(tmp_path / "nope")
    with pytest.raises(InputError, match="cannot be the input folder"):
        run_sync(batch_job(tmp_path, tmp_path, None))


def test_manifest_ignores_and_cuts_a_line_cut_short(tmp_path):
    path = tmp_path / MANIFEST
    path.write_text('{"file":"a.tif","status":"done"}\n{"file":"b.tif","sta')
    m = Manifest(path)
    assert set(m.records) == {"a.tif"}
    m.append({"file": "b.tif", "status": "failed"})
    m.close()
    assert [json.loads(x)["file"] for x in path.read_text().splitlines()] == ["a.tif", "b.tif"]


def test_stale_temporaries_are_removed_and_a_second_run_is_locked_out(tmp_path):
    from segstudio.core.image.io import temporary_sibling

    (tmp_path / "sub").mkdir()
    (tmp_path / "notes").mkdir()
    ours = [temporary_sibling(tmp_path / "x_labels.tif"), temporary_sibling(tmp_path / "sub" / "y_cells.csv")]
    elsewhere = temporary_sibling(tmp_path / "notes" / "z_labels.tif")  # a folder this batch does not write to
    users = [".x_labels.tif.abc123.tmp", "sub/.y_cells.csv.q.tmp", ".z_labels.tif.k.tmp.u16", "keep.tmp.tif",
             "sub/.draft.segstudio-tmp", ".report.txt.12345678.tmp"]
    for name in users:
        (tmp_path / name).write_bytes(b"user file")
    assert all(p.is_file() for p in ours)
    assert remove_stale_temporaries([tmp_path, tmp_path / "sub", tmp_path / "gone"]) == 2
    assert not any(p.exists() for p in ours) and elsewhere.is_file()
    assert all((tmp_path / name).read_bytes() == b"user file" for name in users)
    with FolderLock(tmp_path):
        with pytest.raises(InputError, match="another segstudio batch"):
            FolderLock(tmp_path).__enter__()
    with FolderLock(tmp_path):  # released
        pass


def test_cancel_writes_the_summary_and_a_fixed_file_or_a_new_model_is_redone(tmp_path, samples):
    from segstudio.core.models.catalog import get_model

    src = tmp_path / "in"
    src.mkdir()
    for i, crop in enumerate(_crops(samples, 6, 96, seed=1)):
        tifffile.imwrite(src / f"im{i}.tif", crop)
    (src / "bad.tif").write_bytes(b"")
    model = get_model(MODEL)
    out = tmp_path / "out"
    token = CancelToken()
    events = []

    def on_event(e):
        events.append(e)
        if e.info.get("status") == "done" and sum(x.info.get("status") == "done" for x in events) == 2:
            token.cancel()

    with pytest.raises(Cancelled, match="run it again to resume"):
        run_sync(batch_job(src, out, model, "onnxruntime", SegmentOptions(diameter="native"), cancel=token), on_event)
    rows = {r["file"]: r for r in read_summary(out / SUMMARY)}
    assert [r["status"] for r in rows.values()].count("done") == 2
    assert {r["status"] for f, r in rows.items() if f != "bad.tif"} == {"done", "skipped"}
    assert events[0].info["files"]["im0.tif"] == "pending" and events[-1].info["eta_s"] is not None
    # resume: the rest is done, the bad file still fails; then fix it and run again
    report = run_sync(batch_job(src, out, model, "onnxruntime", SegmentOptions(diameter="native")))
    assert report.processed == 4 and report.counts == {"done": 6, "failed": 1}
    tifffile.imwrite(src / "bad.tif", next(_crops(samples, 1, 96, seed=2)))
    report = run_sync(batch_job(src, out, model, "onnxruntime", SegmentOptions(diameter="native")))
    assert report.processed == 1 and report.counts == {"done": 7}
    # another model: everything is redone (the records name the model they were made with)
    report = run_sync(batch_job(src, out, get_model("nuclei"), "onnxruntime", SegmentOptions(diameter="native")))
    assert report.processed == 7 and {r["model"] for r in report.rows} == {"nuclei"}
    # averaged over flips: redone once, with the backend saying so
    report = run_sync(batch_job(src, out, get_model("nuclei"), "onnxruntime", SegmentOptions(tta=True, diameter="native")))
    assert report.processed == 7 and all("averaged over 4 flips" in r["backend"] for r in report.rows)
    assert run_sync(batch_job(src, out, get_model("nuclei"), "onnxruntime", SegmentOptions(tta=True, diameter="native"))).processed == 0


def test_viability_batch_counts_live_and_dead(tmp_path):
    from segstudio.core.models.catalog import get_model
    from segstudio.core.training.synthetic import ViabilityParams, viability_image

    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        img, _lab, cls, _ = viability_image(np.random.default_rng(100 + i), ViabilityParams(shape=(192, 192)),
                                            assay="live-dead", live_fraction=0.5)
        tifffile.imwrite(src / f"v{i}.tif", img, metadata={"axes": "CYX"})
    report = run_sync(batch_job(src, tmp_path / "out", get_model("viability"), "onnxruntime"))
    assert report.counts == {"done": 3}
    for row in report.rows:
        assert row["live"] + row["dead"] == row["cells"] > 0
    assert sum(r["live"] for r in report.rows) > 0 and sum(r["dead"] for r in report.rows) > 0
    summary = read_summary(tmp_path / "out" / SUMMARY)
    assert all(int(r["live"]) + int(r["dead"]) == int(r["cells"]) for r in summary)


# ----------------------------------------------------------------------------- nothing the user owns is lost


def test_a_file_replaced_while_it_is_segmented_is_redone(tmp_path, samples, monkeypatch):
    """The record holds the signature of the bytes segmented: a file replaced mid-run fails and is redone."""
    import segstudio.core.segment.job as segment
    from segstudio.core.image.io import file_signature

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    crops = list(_crops(samples, 3, 128, seed=5))
    for i, crop in enumerate(crops[:2]):
        tifffile.imwrite(src / f"w{i}.tif", crop)
    replacement = tmp_path / "new.tif"
    tifffile.imwrite(replacement, np.ascontiguousarray(crops[2][::-1]))
    old_signature = file_signature(src / "w0.tif")
    original = segment.segment_to_files

    def replaced_meanwhile(source, *args, **kwargs):
        if source.name == "w0" and replacement.exists():
            os.replace(replacement, src / "w0.tif")  # the microscope PC overwrites the file
        return (yield from original(source, *args, **kwargs))

    monkeypatch.setattr(segment, "segment_to_files", replaced_meanwhile)
    from segstudio.core.models.catalog import get_model

    model = get_model(MODEL)
    opts = ("onnxruntime", SegmentOptions(diameter="native"))
    report = run_sync(batch_job(src, out, model, *opts))
    rows = {r["file"]: r for r in report.rows}
    assert rows["w0.tif"]["status"] == "failed" and "changed while it was being segmented" in rows["w0.tif"]["reason"]
    assert rows["w1.tif"]["status"] == "done"
    record = [r for r in _manifest_lines(out) if r["file"] == "w0.tif"][-1]
    assert record["input"] == old_signature != file_signature(src / "w0.tif")
    report = run_sync(batch_job(src, out, model, *opts))  # the next run segments the new file
    rows = {r["file"]: r for r in report.rows}
    assert rows["w0.tif"]["status"] == "done" and report.processed == 1
    assert [r for r in _manifest_lines(out) if r["file"] == "w0.tif"][-1]["input"] == file_signature(src / "w0.tif")
    labels = read_image(out / "w0_labels.tif").data
    fresh = run_sync(segment.segment_job(read_image(src / "w0.tif"), model, _ort(model), SegmentOptions(diameter="native")))
    assert np.array_equal(labels, fresh.labels)


def _ort(model):
    from segstudio.core.backends import create_backend

    return create_backend("onnxruntime", model)


def test_signature_tells_apart_a_copy_with_the_same_size_and_time(tmp_path):
    from segstudio.core.image.io import file_signature
    from segstudio.core.tasks.batch import BatchItem, is_finished, same_input

    def rewritten(path, pixels, where):
        """``pixels`` changed at ``where`` and written back with the old size and time stamp (cp -p, rsync -t)."""
        st = path.stat()
        pixels = pixels.copy()
        pixels[where] += 1
        tifffile.imwrite(path, pixels)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    small = np.random.default_rng(1).integers(0, 4000, (300, 300), dtype=np.uint16)  # under 1 MiB: all hashed
    g = tmp_path / "b.tif"
    tifffile.imwrite(g, small)
    first = file_signature(g)
    rewritten(g, small, (150, 150))
    assert first[:2] == file_signature(g)[:2] and first != file_signature(g)
    f = tmp_path / "a.tif"
    big = np.random.default_rng(0).integers(0, 4000, (1200, 1200), dtype=np.uint16)  # 2.9 MB: 16 blocks sampled
    tifffile.imwrite(f, big)
    before = file_signature(f)
    rewritten(f, big, (1199, slice(1100, 1200)))  # the last block is one of those sampled
    after = file_signature(f)
    assert before[:2] == after[:2] and before != after
    assert not same_input(before, after) and same_input(before[:2], after)  # manifests of before the hash
    item = BatchItem(f, "a.tif", "a")
    (tmp_path / "a_labels.tif").write_bytes(b"x")
    (tmp_path / "a_cells.csv").write_bytes(b"x")
    record = {"file": "a.tif", "status": "done", "model_id": "m", "input": before}
    assert not is_finished(item, record, tmp_path, "m")
    assert is_finished(item, {**record, "input": after}, tmp_path, "m")


def test_batch_keeps_the_users_files_in_the_output_folder(tmp_path, samples):
    """Stale-file clean-up touches only segstudio's temporaries; outputs never replace a file it did not write."""
    from segstudio.core.image.io import temporary_sibling
    from segstudio.core.models.catalog import get_model

    src, out = tmp_path / "in", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    crops = list(_crops(samples, 2, 96, seed=2))
    tifffile.imwrite(src / "a.tif", crops[0])
    tifffile.imwrite(src / "sub" / "b.tif", crops[1])
    (out / "sub").mkdir(parents=True)
    (out / "notes").mkdir()
    mine = {"a_labels.tif": b"my ground truth", ".a.tif.backup.tmp": b"x", ".x.tmp.u16": b"x",
            "notes/.y_cells.csv.abcdefgh.segstudio-tmp": b"look-alike, in a folder the batch does not write",
            "sub/keep.tmp": b"x"}
    for rel, data in mine.items():
        (out / rel).write_bytes(data)
    stale = temporary_sibling(out / "sub" / "b_labels.tif")  # what a killed run leaves
    report = run_sync(batch_job(src, out, get_model(MODEL), "onnxruntime", SegmentOptions(diameter="native"), files=FileSelection(recursive=True)))
    rows = {r["file"]: r for r in report.rows}
    assert rows["sub/b.tif"]["status"] == "done" and not stale.exists()
    assert rows["a.tif"]["status"] == "failed" and "was not written by segstudio" in rows["a.tif"]["reason"]
    assert all((out / rel).read_bytes() == data for rel, data in mine.items())
    # the outputs segstudio wrote are its own: a run after the file is moved away replaces nothing of the user's
    (out / "a_labels.tif").rename(tmp_path / "a_labels_truth.tif")
    report = run_sync(batch_job(src, out, get_model(MODEL), "onnxruntime", SegmentOptions(diameter="native"), files=FileSelection(recursive=True)))
    assert report.counts == {"done": 2}


def test_damaged_manifest_lines_are_skipped_with_a_warning_and_their_files_redone(tmp_path, samples):
    from segstudio.core.models.catalog import get_model

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i, crop in enumerate(_crops(samples, 2, 96, seed=3)):
        tifffile.imwrite(src / f"w{i}.tif", crop)
    model = get_model(MODEL)
    run_sync(batch_job(src, out, model, "onnxruntime", SegmentOptions(diameter="native")))
    lines = (out / MANIFEST).read_bytes().splitlines()
    good = json.loads(lines[0])
    damaged = [b"\x00\x00\xff not json", json.dumps({**good, "file": 7}).encode(),
               json.dumps({**good, "input": {"size": 1}}).encode(), json.dumps({**good, "status": "maybe"}).encode(),
               b"[]", json.dumps({**json.loads(lines[1]), "input": [True, 1]}).encode()]
    (out / MANIFEST).write_bytes(b"\n".join([lines[0], *damaged]) + b"\n")
    events = []
    report = run_sync(batch_job(src, out, model, "onnxruntime", SegmentOptions(diameter="native")), events.append)
    warning = [e for e in events if e.stage == "notice" and e.info.get("warning")]
    assert len(warning) == 1 and "skipped 6 damaged line(s) (2, 3, 4, 5, 6, 7)" in warning[0].message
    assert report.counts == {"done": 2} and report.processed == 1  # w0's good line stands; w1's was damaged


def test_a_full_output_disk_stops_the_batch(tmp_path, samples, monkeypatch):
    """ENOSPC while writing one file is every later file's fate: the batch stops with one error."""
    import errno

    import segstudio.core.segment.measure as measure
    from segstudio.core.errors import OutputError
    from segstudio.core.models.catalog import get_model

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i, crop in enumerate(_crops(samples, 3, 96, seed=4)):
        tifffile.imwrite(src / f"w{i}.tif", crop)

    def full(path, table):
        from segstudio.core.image.io import atomic_path

        with atomic_path(path):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(measure, "write_csv", full)
    seen = []
    with pytest.raises(OutputError, match="the disk is full") as info:
        run_sync(batch_job(src, out, get_model(MODEL), "onnxruntime", SegmentOptions(diameter="native")), seen.append)
    assert info.value.fatal
    assert sum(1 for e in seen if e.info.get("status") == "running") == 1  # stopped at the first file
