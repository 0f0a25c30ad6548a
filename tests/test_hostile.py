"""Hostile inputs through the real CLI: no bug exits, no hangs, one clear line, nothing written where it must not be.

The corpus (``tests/hostile_corpus.py``) is generated into a temporary folder
and run in one child process (one import of segstudio, one model load per
case); each test below checks one promise over every case and names every
case that breaks it.  Cases and classes: see the corpus module.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "hostile_corpus.py"
PER_CASE_S = 60  # the slowest case segments one 256 px image; a hang would take forever
TOTAL_S = 600
RSS_GROWTH_MB = 1500  # one model load and a small image; a bomb decoded would take gigabytes


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    results = root / "results.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(CORPUS), str(root / "corpus"), str(results)], env=env,
                          capture_output=True, text=True, timeout=TOTAL_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cases = {c["name"]: c for c in json.loads((root / "corpus" / "cases.json").read_text())}
    return cases, json.loads(results.read_text())


def _failures(corpus, check) -> list[str]:
    cases, results = corpus
    return [f"{r['name']}: {why}" for r in results if (why := check(cases[r["name"]], r))]


def test_the_corpus_covers_every_class(corpus):
    cases, results = corpus
    kinds = {c["kind"] for c in cases.values()}
    for kind in ("not an image", "decompression bomb", "non-finite pixels", "unusable metadata", "option value",
                 "output location", "data loss", "batch state", "evaluation input", "bad model file",
                 "code in a model", "bad model package"):
        assert kind in kinds, kind
    assert len(results) == len(cases) >= 80


def test_exit_codes_are_as_expected_and_never_a_bug(corpus):
    bad = _failures(corpus, lambda c, r: None if r["code"] in c["expect"] else
                    f"exit {r['code']}, expected {c['expect']}: {r['stderr'].strip()[-300:]}")
    assert not bad, "\n".join(bad)


def test_errors_are_one_line_naming_the_input_and_no_traceback(corpus):
    def check(c, r):
        lines = [x for x in r["stderr"].splitlines() if x.strip()]
        if "Traceback" in r["stderr"] + r["stdout"]:
            return "printed a traceback"
        if tuple(c["expect"]) != (2,):
            return None if not any(x.startswith("segstudio: error") for x in lines) else f"an error: {lines}"
        if len(lines) != 1 or not lines[0].startswith("segstudio: error: "):
            return f"stderr is not one error line: {lines}"
        if c["names"] and c["names"] not in lines[0]:
            return f"the error does not name {c['names']!r}: {lines[0]}"
        return None

    bad = _failures(corpus, check)
    assert not bad, "\n".join(bad)


def test_valid_but_unusual_inputs_tell_the_user(corpus):
    bad = _failures(corpus, lambda c, r: None if not c["stderr_has"] or c["stderr_has"] in r["stderr"] else
                    f"stderr lacks {c['stderr_has']!r}: {r['stderr'].strip()[:300]}")
    assert not bad, "\n".join(bad)


def test_nothing_written_outside_the_output_folder_and_no_model_runs_code(corpus):
    bad = _failures(corpus, lambda c, r: f"changed {r['outside_writes']}" if r["outside_writes"] else
                    f"a model created {r['markers']}" if r["markers"] else None)
    assert not bad, "\n".join(bad)


def test_bounded_time_and_memory(corpus):
    bad = _failures(corpus, lambda c, r: f"{r['seconds']} s" if r["seconds"] > min(PER_CASE_S, c["timeout"]) else
                    f"resident memory grew {r['rss_growth_mb']} MB" if r["rss_growth_mb"] > RSS_GROWTH_MB else None)
    assert not bad, "\n".join(bad)


# ----------------------------------------------------------------------------- cases a shared process cannot run


def _cli(*args, env=None, preexec_fn=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "segstudio.cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, preexec_fn=preexec_fn, timeout=timeout)


def test_a_full_disk_is_a_one_line_error_and_leaves_no_partial_file(tmp_path, samples):
    """Writes beyond a file-size limit fail as on a full disk (EFBIG; Python ignores SIGXFSZ)."""
    import tifffile

    images = tmp_path / "in"
    images.mkdir()
    big = np.tile(tifffile.imread(samples[0][0]), (4, 4))  # 1024 px: its labels TIFF passes the limit
    for i in range(3):
        tifffile.imwrite(images / f"im{i}.tif", big)
    limit = 16 * 1024
    opts = ("--model", "nuclei-light", "--backend", "onnxruntime", "--diameter", "native", "-q")
    assert _cli("segment", images / "im1.tif", "--out", tmp_path / "warm", *opts).returncode == 0  # caches written

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    for args in (("segment", images / "im0.tif", "--out", tmp_path / "seg"), ("batch", images, "--out", tmp_path / "b")):
        proc = _cli(*args, *opts, preexec_fn=small_disk)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr
        assert len(lines) == 1 and lines[0].startswith("segstudio: error: cannot write") and "too large" in lines[0]
        out = Path(args[3])
        assert not [p for p in out.rglob("*") if p.suffix == ".tif" or "segstudio-tmp" in p.name], list(out.rglob("*"))


def test_onnx_runtime_telemetry_is_off(tmp_path):
    """ONNX Runtime 1.32 writes a device id and a telemetry store on import unless ORT_DISABLE_TELEMETRY is set."""
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env.update(HOME=str(home), TMPDIR=str(tmp), XDG_CACHE_HOME=str(home / ".cache"))
    code = ("import segstudio.core.backends.ort_backend as b, segstudio.core.models.catalog as c;"
            "m = c.get_model('nuclei-light'); b.OrtBackend(m)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not list(home.rglob("*")) and not list(tmp.rglob("*")), list(home.rglob("*")) + list(tmp.rglob("*"))
