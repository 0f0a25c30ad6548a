"""Packaging: every package is listed, model and sample files ship, nothing big is committed."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    mapped = {v: k for k, v in cfg["package-dir"].items()}
    found = set()
    for init in ROOT.glob("segstudio/**/__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT).parts))
    for folder, pkg in mapped.items():
        assert (ROOT / folder / "__init__.py").is_file(), folder
        found.add(pkg)
    assert found == listed, f"missing from pyproject: {found - listed}; stale: {listed - found}"


def test_sample_data_is_small_and_credited():
    files = list((ROOT / "sample_data").iterdir())
    assert sum(f.stat().st_size for f in files) < 5 * 2**20
    assert "CC0" in (ROOT / "sample_data" / "README.md").read_text()


def _launcher():
    import importlib.util

    spec = importlib.util.spec_from_file_location("segstudio_launcher", ROOT / "packaging" / "launcher.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bundle_launcher_runs_python_style_child_commands(capsys, monkeypatch):
    """In the bundle sys.executable is segstudio: ``-I -B -m MODULE`` and ``-c CODE`` must still work."""
    import sys

    monkeypatch.setattr(sys, "argv", list(sys.argv))
    launcher = _launcher()
    assert launcher._as_python(["-I", "-S", "-c", "import sys; sys.exit(3)"]) == 3
    assert launcher._as_python(["-c", "print('hello', __name__)"]) == 0
    assert capsys.readouterr().out == "hello __main__\n"
    assert launcher._as_python(["-I", "-B", "-m", "platform", "--terse"]) == 0
    assert "Linux" in capsys.readouterr().out or sys.platform != "linux"
    assert launcher._as_python(["-I", "script.py"]) == 2  # what the bundle cannot do is said, not guessed
    assert launcher._as_python(["segment", "-h"]) is None  # segstudio's own command line


def test_looking_for_a_gpu_does_not_import_pytorch_without_an_nvidia_driver():
    """`auto` asks whether a GPU exists before every first segmentation: importing PyTorch for it took 3.3 s."""
    import subprocess
    import sys

    from segstudio.core.backends import nvidia_driver_present

    code = ("import sys; from segstudio.core.backends import gpu_available; "
            "print(gpu_available(), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if nvidia_driver_present():
        assert out[1] == "True"
    else:
        assert out == ["False", "False"]


def test_without_pytorch_the_app_names_its_full_package_and_a_venv_the_pip_extra(monkeypatch):
    import sys

    from segstudio.core.backends import torch_hint
    from segstudio.core.optimize.presets import PRESETS
    from segstudio.core.optimize import presets

    assert "segstudio[torch]" in torch_hint()
    monkeypatch.setattr(sys, "frozen", True, raising=False)  # what PyInstaller sets in the bundle
    assert "segstudio-full" in torch_hint()
    monkeypatch.setattr(presets, "installed", lambda package: package != "torch")
    prune = next(p for p in PRESETS if "prune" in p.steps)
    assert "segstudio-full" in prune.unavailable()
