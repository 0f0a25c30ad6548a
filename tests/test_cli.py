"""The command line end to end, as a user runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from segstudio.core.image.sources import read_image

pytest.importorskip("onnxruntime")


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "segstudio.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_segment_writes_labels_and_csv(tmp_path, samples):
    img, truth = samples[1]
    out = tmp_path / "out"
    proc = run("segment", img, "--model", "nuclei", "--backend", "auto", "--out", out)
    assert proc.returncode == 0, proc.stderr
    labels = read_image(out / f"{img.stem}_labels.tif").data
    assert labels.dtype == np.uint16 and labels.shape == read_image(truth).data.shape
    csv = (out / f"{img.stem}_cells.csv").read_text().splitlines()
    assert csv[0].split(",")[:3] == ["label", "area_px", "centroid_y"]
    assert len(csv) - 1 == len(np.unique(labels)) - 1 > 10
    assert "cells in" in proc.stdout
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def test_segment_folder_with_one_bad_file_goes_on(tmp_path, samples):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(samples[1][0], src / "good.tif")
    (src / "bad.tif").write_text("not a tiff")
    proc = run("segment", src, "--out", tmp_path / "out")
    assert proc.returncode == 1
    assert (tmp_path / "out" / "good_labels.tif").is_file()
    assert not (tmp_path / "out" / "bad_labels.tif").exists()
    assert "bad.tif" in proc.stderr and "1 of 2 image(s) failed" in proc.stderr


def _bad_inputs(tmp_path: Path, sample: Path) -> dict[str, Path]:
    bad = {}
    bad["text file named .tif"] = tmp_path / "text.tif"
    bad["text file named .tif"].write_text("hello\n" * 100)
    data = sample.read_bytes()
    bad["truncated TIFF"] = tmp_path / "trunc.tif"
    tifffile.imwrite(bad["truncated TIFF"], np.random.default_rng(0).integers(0, 255, (400, 400), dtype=np.uint8))
    full = bad["truncated TIFF"].read_bytes()
    bad["truncated TIFF"].write_bytes(full[: len(full) // 3])
    bad["empty folder"] = tmp_path / "empty"
    bad["empty folder"].mkdir()
    bad["1x1 image"] = tmp_path / "one.tif"
    tifffile.imwrite(bad["1x1 image"], np.zeros((1, 1), np.uint8))
    bad["5-D array"] = tmp_path / "five.npy"
    np.save(bad["5-D array"], np.zeros((2, 2, 3, 32, 32), np.uint8))
    bad["5-D TIFF"] = tmp_path / "five.tif"
    tifffile.imwrite(bad["5-D TIFF"], np.zeros((2, 2, 5, 32, 32), np.uint8))
    assert data  # the sample is readable, the bad ones are not
    return bad


def test_bad_inputs_one_line_error_nonzero_exit_nothing_written(tmp_path, samples):
    for what, path in _bad_inputs(tmp_path, samples[0][0]).items():
        out = tmp_path / f"out_{path.stem}"
        proc = run("segment", path, "--out", out)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0, what
        assert len(lines) == 1 and lines[0].startswith("segstudio: error:"), (what, proc.stderr)
        assert "Traceback" not in proc.stderr + proc.stdout
        assert not out.exists() or not any(out.iterdir()), what


def test_missing_path_and_unknown_backend(tmp_path, samples):
    proc = run("segment", tmp_path / "nope.tif", "--out", tmp_path)
    assert proc.returncode == 2 and "no such file" in proc.stderr
    proc = run("segment", samples[0][0], "--backend", "tpu", "--out", tmp_path)
    assert proc.returncode == 2 and "unknown backend" in proc.stderr


def test_eval_json(tmp_path, sample_dir):
    out = tmp_path / "r.json"
    proc = run("eval", "--model", "nuclei", "--images", sample_dir, "--labels", sample_dir, "--json", out, "--by-size")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    # --by-size: every true object in one diameter bin, the table printed
    assert sum(r["n_true"] for r in report["by_size"]) == sum(r["n_true"] for r in report["images"])
    assert sum(r["tp"] + r["fp"] for r in report["by_size"]) == sum(r["n_pred"] for r in report["images"])
    assert "by nucleus diameter" in proc.stdout and report["by_size"][0]["diameter_px"] in proc.stdout
    assert set(report["mean"]) >= {"ap50", "ap75", "f1", "dice"}
    assert len(report["images"]) == 4
    assert {"name", "ap50", "ap75", "f1", "dice"} <= set(report["images"][0])
    assert report["mean"]["ap50"] == pytest.approx(np.mean([r["ap50"] for r in report["images"]]))
    assert "mean over 4 image(s)" in proc.stdout
    # the worst images, lowest AP50 first, drawn over the truth
    worst = sorted(report["images"], key=lambda r: r["ap50"])
    listed = proc.stdout.split("worst images: ")[1].splitlines()[0]
    assert listed.startswith(f"{worst[0]['name']} ({worst[0]['ap50']:.3f})") and listed.count("(") == 4
    from PIL import Image

    png = Image.open(tmp_path / "r_worst.png")
    assert png.size[0] >= 4 * 300 and np.asarray(png.convert("RGB")).reshape(-1, 3).tolist().count([255, 0, 255]) > 100


def test_optimize_cli_writes_reports_and_refuses_bad_steps(tmp_path, sample_dir):
    out = tmp_path / "opt"
    proc = run("optimize", "--model", "nuclei", "--calib", sample_dir, "--calib-tiles", 8, "--val-images", sample_dir,
               "--val-labels", sample_dir, "--val-limit", 2, "--steps", "quantize:int8,quantize:fp16",
               "--speed-tile", 128, "--out", out)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert [r["status"] for r in report["steps"]] in (["kept", "skipped"], ["rolled_back", "skipped"])
    assert "quantize:int8" in proc.stdout and "final: AP50" in proc.stdout and (out / "report.html").is_file()
    for bad, msg in ((["--steps", "prune:2"], "above 0 and below 1"), (["--steps", "quantize:int4"],
                     "one of int8, fp16"), (["--max-drop", "-1"], "from 0 to 1"), (["--min-speedup", "x"], "a number")):
        proc = run("optimize", "--calib", sample_dir, "--out", tmp_path / "bad", *bad)
        assert proc.returncode == 2 and msg in proc.stderr and not (tmp_path / "bad").exists()
    # --resume: a finished run has nothing to resume; an interrupted one goes on from its state, with its inputs
    proc = run("optimize", "--resume", out)
    assert proc.returncode == 2 and "is finished: nothing to resume" in proc.stderr
    state = json.loads((out / "state.json").read_text())
    state.update(finished=False, done=1, rows=state["rows"][:1])  # as if stopped after the first step
    (out / "state.json").write_text(json.dumps(state))
    first = next(out.glob("01-*"))
    before = first.stat().st_mtime_ns
    proc = run("optimize", "--resume", out)
    assert proc.returncode == 0, proc.stderr
    assert "resuming nuclei" in proc.stdout and "(finished before)" in proc.stdout
    assert "quantize:fp16: skipped" in proc.stdout and "step 1/2" not in proc.stdout
    assert first.stat().st_mtime_ns == before
    proc = run("optimize", "--resume", tmp_path / "nothing")
    assert proc.returncode == 2 and "holds no optimization run to resume" in proc.stderr


def test_eval_two_folders_same_stem(tmp_path, samples):
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    img, lab = samples[1]
    shutil.copy(img, tmp_path / "img" / "a.tif")
    shutil.copy(lab, tmp_path / "lab" / "a.tif")
    proc = run("eval", "--images", tmp_path / "img", "--labels", tmp_path / "lab", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "mean over 1 image(s)" in proc.stdout


def test_eval_kind_filter(tmp_path, sample_dir, dsb2018):
    proc = run("eval", "--images", dsb2018 / "val", "--kind", "nosuchkind", "-q")
    assert proc.returncode == 2 and "no image of kind" in proc.stderr


def test_models_lists_the_card():
    proc = run("models")
    assert proc.returncode == 0
    assert "nuclei" in proc.stdout and "AP50" in proc.stdout and "percentiles" in proc.stdout


def test_start_without_display_segments_the_sample(tmp_path):
    env_cmd = [sys.executable, "-m", "segstudio.cli", "start", "--no-gui", "--out", str(tmp_path / "o")]
    proc = subprocess.run(env_cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "o").glob("*_labels.tif"))) == 4
    assert "mean over 4 image(s): AP50" in proc.stdout


def test_unexpected_error_is_reported_with_log(tmp_path, monkeypatch, capsys):
    from segstudio import cli

    monkeypatch.setenv("SEGSTUDIO_HOME", str(tmp_path))

    def boom(args):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(cli, "cmd_models", boom)
    parser_main = cli.main
    assert parser_main(["models"]) == 3
    err = capsys.readouterr().err
    assert "unexpected error: ZeroDivisionError: boom" in err
    logs = list((tmp_path / "logs").glob("crash-*.log"))
    assert len(logs) == 1 and "Traceback" in logs[0].read_text()


def test_eval_with_flip_averaging(tmp_path, sample_dir):
    """--tta runs the network over four flips: other labels, about the same (or better) accuracy."""
    reports = {}
    for flag in ((), ("--tta",)):
        out = tmp_path / f"r{len(flag)}.json"
        proc = run("eval", "--model", "nuclei-light", "--images", sample_dir, "--json", out, "--worst", "0", *flag)
        assert proc.returncode == 0, proc.stderr
        reports[flag] = json.loads(out.read_text())
    plain, tta = reports[()], reports[("--tta",)]
    assert [r["ap50"] for r in plain["images"]] != [r["ap50"] for r in tta["images"]]
    assert tta["mean"]["ap50"] >= plain["mean"]["ap50"] - 0.02
