"""Model trust: TorchScript (code) is refused unless the user opts in, and then runs only in a confined child.

The malicious archives here are real TorchScript: their ``__setstate__``
(run by ``torch.jit.load``) or ``forward`` (run when the model is used)
map a file of the test's choosing with ``torch.from_file(path,
shared=True)`` and write into it.  Each test checks that the file was not
created and that an existing one kept its bytes and modification time.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from segstudio.core.errors import IncompatibleArtifactError, InputError  # noqa: E402
from segstudio.core.models import confine  # noqa: E402
from segstudio.core.models.catalog import get_model  # noqa: E402
from segstudio.core.models.confine import Limits, run_confined  # noqa: E402
from segstudio.core.models.user import (  # noqa: E402
    ModelRefusedError,
    detect_kind,
    import_model,
    is_torchscript_archive,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_IMAGE = min((ROOT / "sample_data").glob("*_img.tif"))
METHODS = ["bwrap", "unshare", "plain"]


def _method_or_skip(method: str) -> None:
    if method not in confine.available_methods():
        pytest.skip(f"the {method} sandbox cannot run on this machine ({confine.available_methods()})")


def _files_confined(method: str) -> bool:
    """Whether the child's file system is confined: bubblewrap's own, or Landlock's (kernel 5.13+)."""
    return method == "bwrap" or confine.landlock_abi() > 0


SECCOMP = platform.machine() in confine._SECCOMP  # no new processes: x86_64 and aarch64


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGSTUDIO_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


class Victims:
    """A file that must never be created and one that must never change."""

    def __init__(self, root: Path):
        self.folder = root / "victims"
        self.folder.mkdir()
        self.new = self.folder / "created-by-the-model"
        self.existing = root / "existing.bin"
        self.existing.write_bytes(b"precious bytes, do not touch")
        os.utime(self.existing, (1_000_000_000, 1_000_000_000))
        self.before = self.existing.stat()

    def untouched(self) -> None:
        assert sorted(p.name for p in self.folder.iterdir()) == [], "the model created a file"
        assert self.existing.read_bytes() == b"precious bytes, do not touch"
        after = self.existing.stat()
        assert (after.st_mtime_ns, after.st_size) == (self.before.st_mtime_ns, self.before.st_size)


def _evil_modules():
    from typing import Tuple

    class EvilState(torch.nn.Module):
        """Its __setstate__ runs inside torch.jit.load."""

        def __init__(self, path: str):
            super().__init__()
            self.path = path
            self.weight = torch.nn.Parameter(torch.ones(1, 1, 3, 3))

        def forward(self, x):
            return torch.nn.functional.conv2d(x, self.weight, padding=1)

        @torch.jit.export
        def __getstate__(self) -> Tuple[str, torch.Tensor, bool]:
            return (self.path, self.weight, self.training)

        @torch.jit.export
        def __setstate__(self, state: Tuple[str, torch.Tensor, bool]) -> None:
            self.path = state[0]
            self.training = state[2]
            t = torch.from_file(self.path, shared=True, size=16, dtype=torch.uint8)
            t.fill_(65)
            self.weight = state[1] + t.sum().to(torch.float32) * 0.0  # used, so not optimised away

    class EvilForward(torch.nn.Module):
        """Its forward runs when the model is called or traced."""

        def __init__(self, path: str):
            super().__init__()
            self.path = path
            self.weight = torch.nn.Parameter(torch.ones(1, 1, 3, 3))

        def forward(self, x):
            t = torch.from_file(self.path, shared=True, size=16, dtype=torch.uint8)
            t.fill_(66)
            return torch.nn.functional.conv2d(x + t.sum().to(torch.float32) * 0.0, self.weight, padding=1)

    return EvilState, EvilForward


def _evil_archives(tmp_path: Path, victims: Victims) -> dict[str, Path]:
    """Both kinds, each aimed at the new path and at the existing file."""
    out = {}
    for cls in _evil_modules():
        for target, label in ((victims.new, "new"), (victims.existing, "existing")):
            f = tmp_path / f"{cls.__name__}-{label}.pt"
            torch.jit.script(cls(str(target))).save(str(f))
            out[f"{cls.__name__}-{label}"] = f
    return out


@pytest.fixture()
def victims(tmp_path) -> Victims:
    return Victims(tmp_path)


@pytest.fixture()
def evil(tmp_path, victims) -> dict[str, Path]:
    return _evil_archives(tmp_path, victims)


def test_the_malicious_archives_really_are(tmp_path):
    """Loaded by torch in a throwaway process, the archives do write the files they aim at."""
    (tmp_path / "proof").mkdir()
    v = Victims(tmp_path / "proof")
    state, forward = _evil_modules()
    a, b = tmp_path / "s.pt", tmp_path / "f.pt"
    torch.jit.script(state(str(v.new))).save(str(a))
    torch.jit.script(forward(str(v.existing))).save(str(b))
    code = (f"import torch; torch.jit.load({str(a)!r}); m = torch.jit.load({str(b)!r}); "
            "m(torch.zeros(1, 1, 8, 8))")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
    assert v.new.read_bytes() == b"A" * 16
    assert v.existing.read_bytes().startswith(b"B" * 16)


def test_torchscript_is_refused_by_import_and_get_model(evil, victims, home):
    for f in evil.values():
        with pytest.raises(ModelRefusedError) as info:
            import_model(f)
        text = str(info.value)
        assert f"refused {f.name}: it is a TorchScript archive, which holds code that runs when it is loaded" in text
        assert "ONNX" in text and "--trust-code" in text and "\n" not in text
        with pytest.raises(ModelRefusedError, match="TorchScript"):
            get_model(str(f))
    victims.untouched()
    assert not list(home.rglob("*.json")) if home.exists() else True


def test_torchscript_is_refused_by_models_import(evil, victims, home, capsys):
    from segstudio.cli import main

    assert main(["models", "import", str(evil["EvilState-existing"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused EvilState-existing.pt: it is a TorchScript archive" in err[0]
    victims.untouched()


@pytest.mark.parametrize("how", ["renamed .pth", "renamed .onnx", "no constants.pkl", "no code/ folder"])
def test_disguised_torchscript_is_recognised_from_its_records(tmp_path, evil, victims, home, how):
    src = evil["EvilState-existing"]
    f = tmp_path / {"renamed .pth": "weights.pth", "renamed .onnx": "model.onnx"}.get(how, "weights.pt")
    if how.startswith("renamed"):
        f.write_bytes(src.read_bytes())
    else:
        drop = "constants.pkl" if how == "no constants.pkl" else "/code/"
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(f, "w") as zout:
            for info in zin.infolist():
                if drop not in info.filename:
                    zout.writestr(info, zin.read(info))
    assert is_torchscript_archive(f) and detect_kind(f) == "torchscript"
    with pytest.raises(ModelRefusedError, match="TorchScript archive"):
        import_model(f)
    # torch itself, asked for weights only, refuses it rather than handing it to torch.jit.load (torch 2.13)
    with pytest.raises(Exception):  # noqa: B017 - RuntimeError or UnpicklingError, both refusals
        torch.load(f, weights_only=True)
    victims.untouched()


def test_torchscript_is_refused_by_segment_cli_in_one_line(tmp_path, evil, victims):
    env = dict(os.environ, SEGSTUDIO_HOME=str(tmp_path / "home"))
    for key in ("EvilState-new", "EvilForward-existing"):
        done = subprocess.run(
            [sys.executable, "-m", "segstudio.cli", "segment", str(SAMPLE_IMAGE), "--model", str(evil[key]),
             "--out", str(tmp_path / "out"), "-q"], capture_output=True, text=True, timeout=600, env=env, check=False)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"segstudio: error: refused {evil[key].name}: it is a "
                                                        "TorchScript archive"), done.stderr
        assert "Traceback" not in done.stderr
    victims.untouched()


def _bioimageio_zip(tmp_path: Path, weights: Path, name: str = "ts-only.zip") -> Path:
    import yaml

    rdf = {
        "format_version": "0.5.4", "type": "model", "name": "only torchscript",
        "inputs": [{"id": "raw", "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["raw"]},
                                          {"type": "space", "id": "y", "size": {"min": 64, "step": 16}},
                                          {"type": "space", "id": "x", "size": {"min": 64, "step": 16}}]}],
        "outputs": [{"id": "out", "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["fg"]},
                                           {"type": "space", "id": "y", "size": {"tensor_id": "raw", "axis_id": "y"}},
                                           {"type": "space", "id": "x", "size": {"tensor_id": "raw", "axis_id": "x"}}]}],
        "weights": {"torchscript": {"source": "weights.pt"}},
    }
    out = tmp_path / name
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("rdf.yaml", yaml.safe_dump(rdf))
        z.write(weights, "weights.pt")
    return out


def test_bioimageio_package_with_only_torchscript_weights_is_refused(tmp_path, evil, victims, home):
    for key in ("EvilState-new", "EvilForward-existing"):
        package = _bioimageio_zip(tmp_path, evil[key], f"{key}.zip")
        with pytest.raises(ModelRefusedError, match=r"refused weights\.pt: it is the package's only weights, a "
                                                    r"TorchScript archive"):
            import_model(package)
        with pytest.raises(ModelRefusedError, match="--trust-code"):
            get_model(str(package))
    victims.untouched()


# ----------------------------------------------------------------------------- with the opt-in


@pytest.mark.parametrize("method", METHODS)
def test_confined_child_is_confined(tmp_path, monkeypatch, method):
    _method_or_skip(method)
    monkeypatch.chdir(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("the user's data")
    model = tmp_path / "model.bin"
    model.write_bytes(b"untrusted")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    try:
        result = run_confined(
            "segstudio.core.models.confine:probe", inputs={"model.bin": model}, outputs=("marker.txt",),
            dest=tmp_path / "back", method=method, limits=Limits(memory_bytes=2 << 30, wall_seconds=120),
            args={"read": [str(secret), "/etc/passwd", str(Path.home() / ".bashrc")],
                  "write": [str(tmp_path / "written.txt"), str(ROOT / "written.txt")],
                  "connect": ["127.0.0.1", server.getsockname()[1]], "spawn": True,
                  "allocate_bytes": 3 << 30})
    finally:
        server.close()
    r = result.value
    assert result.method == method and result.pid != os.getpid() and r["pid"] == result.child_pid
    # its own temporary home and working folder; what it wrote there came back only when asked for
    assert r["home"] != str(Path.home()) and r["cwd"] != str(tmp_path) and Path(r["home"]).name == "home"
    assert result.files["marker.txt"].read_text().startswith("written by the confined child")
    assert not (tmp_path / "marker.txt").exists() and not Path(r["home"]).exists()
    assert r["inputs"]["model.bin"] == "ok" and r["thread"] == "ok"
    assert r["allocate"].startswith("MemoryError")
    applied = result.applied
    assert applied["rlimits"]["RLIMIT_AS"] == 2 << 30 and applied["no_new_privs"]
    assert applied["landlock"] == confine.landlock_abi() and applied["seccomp"] is SECCOMP
    assert applied["own_network"] is (method != "plain")
    if _files_confined(method):
        assert r["input_writable"]["model.bin"] != "ok"
        assert all(v != "ok" for v in r["read"].values()), r["read"]
        assert all(v != "ok" for v in r["write"].values()), r["write"]
        assert not (tmp_path / "written.txt").exists() and not (ROOT / "written.txt").exists()
    if method != "plain" or confine.landlock_abi() >= 4:  # a network namespace, or Landlock's TCP rules
        assert r["connect"] != "ok"
    if SECCOMP:
        assert r["spawn"] != "ok" and r["fork"] != "ok"


def test_sandbox_choice_is_checked(monkeypatch):
    monkeypatch.setenv("SEGSTUDIO_SANDBOX", "chroot")
    with pytest.raises(InputError, match="unknown sandbox 'chroot'"):
        confine.choose_method()
    monkeypatch.setenv("SEGSTUDIO_SANDBOX", "plain")
    assert confine.choose_method() == "plain"
    assert "Linux" in confine.describe_confinement("plain")


def _marker_module():
    from typing import Tuple

    class Marked(torch.nn.Module):
        """A benign network whose __setstate__ also writes marker.bin in the current folder."""

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.full((2, 1, 3, 3), 0.1))

        def forward(self, x):
            return torch.nn.functional.conv2d(x, self.weight, padding=1)

        @torch.jit.export
        def __getstate__(self) -> Tuple[torch.Tensor, bool]:
            return (self.weight, self.training)

        @torch.jit.export
        def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
            self.training = state[1]
            t = torch.from_file("marker.bin", shared=True, size=8, dtype=torch.uint8)
            t.fill_(77)
            self.weight = state[0] + t.sum().to(torch.float32) * 0.0

    return Marked


@pytest.mark.parametrize("method", METHODS)
def test_trusted_torchscript_converts_in_the_confined_child(tmp_path, home, monkeypatch, method):
    _method_or_skip(method)
    monkeypatch.setenv("SEGSTUDIO_SANDBOX", method)
    f = tmp_path / "marked.pt"
    torch.jit.script(_marker_module()()).save(str(f))
    proof = tmp_path / "proof"
    proof.mkdir()
    subprocess.run([sys.executable, "-c", f"import torch; torch.jit.load({str(f)!r})"], cwd=proof, check=True,
                   capture_output=True, timeout=300)
    assert (proof / "marker.bin").read_bytes() == b"M" * 8  # loading it runs its code, which writes the marker
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    model = import_model(f, name="marked", trust_code=True)
    assert list(here.iterdir()) == []  # it ran, but in the child's own folder, which is gone
    converted = model.provenance["converted"]
    assert converted["sandbox"] == method and converted["in"] == "a confined child process"
    assert converted["applied"]["seccomp"] is SECCOMP and converted["applied"]["landlock"] == confine.landlock_abi()
    assert set(model.files) == {"onnx"} and model.spec.input_channels == 1 and model.spec.representation == "fg_dist"


@pytest.mark.parametrize("method", METHODS)
def test_trusted_malicious_torchscript_fails_and_touches_nothing(evil, victims, home, monkeypatch, method):
    _method_or_skip(method)
    if not _files_confined(method):
        pytest.skip(f"without Landlock the {method} child shares the file system (see the README's threat model)")
    monkeypatch.setenv("SEGSTUDIO_SANDBOX", method)
    for name, f in evil.items():
        with pytest.raises(IncompatibleArtifactError) as info:
            import_model(f, name=name.lower(), trust_code=True)
        text = str(info.value)
        assert text.startswith(f"{f.name}: ") and "\n" not in text, text
        assert "TorchScript" in text or "stopped" in text, text
    victims.untouched()
    assert not list((home / "models").glob("*/*.json")) if (home / "models").exists() else True


def test_trust_code_reaches_the_commands_that_take_a_model():
    from segstudio.cli import build_parser

    parser = build_parser()
    for argv in (["segment", "x", "--out", "o"], ["batch", "x", "--out", "o"], ["eval", "--images", "x"],
                 ["bench", "--image", "x"], ["optimize", "--out", "o"], ["train", "--images", "x", "--out", "o"],
                 ["models", "import", "x"]):
        assert parser.parse_args(argv).trust_code is False
        assert parser.parse_args([*argv, "--trust-code"]).trust_code is True


def test_a_card_whose_weights_are_torchscript_is_refused(tmp_path, evil, victims):
    from segstudio.core.models.catalog import write_card
    from segstudio.core.models.spec import ModelSpec

    folder = tmp_path / "card"
    folder.mkdir()
    weights = folder / "m.pt"
    weights.write_bytes(evil["EvilState-existing"].read_bytes())
    card = write_card(ModelSpec(name="m", version="1", title="", description=""), {"torch": weights}, folder / "m.json")
    with pytest.raises(ModelRefusedError, match=r"refused m\.pt: it is a TorchScript archive"):
        get_model(str(card))
    victims.untouched()
