"""Shared fixtures: the bundled sample data and, when present, the DSB2018 copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from segstudio.sample_data import SAMPLE_DIR, sample_pairs

ROOT = Path(__file__).resolve().parents[1]
DSB2018 = Path(os.environ.get("SEGSTUDIO_DSB2018", ROOT.parent / "shared" / "data" / "dsb2018"))


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def samples() -> list[tuple[Path, Path]]:
    pairs = sample_pairs()
    assert len(pairs) >= 3, "sample_data/ must hold the bundled images"
    return pairs


@pytest.fixture(scope="session")
def dsb2018() -> Path:
    if not (DSB2018 / "index.json").is_file():
        pytest.skip(f"DSB2018 copy not found at {DSB2018} (set SEGSTUDIO_DSB2018)")
    return DSB2018


@pytest.fixture(scope="module")
def light():
    """The small built-in model on ONNX Runtime: (model, backend)."""
    pytest.importorskip("onnxruntime")
    from segstudio.core.backends import create_backend
    from segstudio.core.models.catalog import get_model

    model = get_model("nuclei-light")
    with create_backend("onnxruntime", model) as backend:
        yield model, backend


@pytest.fixture(scope="session")
def nuclei():
    from segstudio.core.models.catalog import get_model

    return get_model("nuclei")


# ----------------------------------------------------------------------------- ending the test process
#
# After the summary is printed, the process ends without Python's interpreter teardown.  That teardown
# destroys the C++ objects of Qt, napari/vispy, torch, OpenVINO and ONNX Runtime in an order Python does
# not control, and with the long GUI + training tests in one process (`-m slow`) it crashed with SIGSEGV
# and no Python frame *after* "3 passed" (CI exit 139; reproduced here with -X faulthandler).  The results
# are final by then; the exit status stays pytest's.


def pytest_sessionfinish(session, exitstatus):
    session.config._segstudio_exitstatus = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    status = getattr(config, "_segstudio_exitstatus", None)
    if status is None or os.environ.get("SEGSTUDIO_TEST_TEARDOWN") == "1":  # set it to see the teardown run
        return
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
