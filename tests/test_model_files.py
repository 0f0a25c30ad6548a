"""Hostile model files that hold no code: ONNX graphs, zips and BioImage.IO descriptions.

Each is refused (or stopped) with one line naming the file: before ONNX
Runtime sees it when that is possible (external data, custom operators,
unbounded loops, oversized weights), and by the confined trial run's limits
when only running it tells (memory, time).
"""

from __future__ import annotations

import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from segstudio.core.errors import IncompatibleArtifactError  # noqa: E402
from segstudio.core.models import archives, onnx_check, user  # noqa: E402
from segstudio.core.models.catalog import get_model, write_card  # noqa: E402
from segstudio.core.models.confine import ConfinedRunError, Limits  # noqa: E402
from segstudio.core.models.onnx_check import OnnxRefusedError  # noqa: E402
from segstudio.core.models.spec import ModelSpec  # noqa: E402
from segstudio.core.models.user import ModelRefusedError, import_model, safe_extract  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_IMAGE = min((ROOT / "sample_data").glob("*_img.tif"))
BIOIMAGEIO = ROOT.parent / "shared" / "data" / "bioimageio"


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGSTUDIO_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture()
def no_onnxruntime(monkeypatch):
    """Fail the test if anything would hand the file to ONNX Runtime (the trial run's child)."""
    def refuse(*args, **kwargs):
        raise AssertionError("ONNX Runtime was reached")

    monkeypatch.setattr(user, "run_confined", refuse)


X = helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 1, None, None])
Y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 1, None, None])


def _save(model, path: Path) -> Path:
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _graph_model(nodes, initializers=(), functions=(), extra_domains=(), name="g"):
    graph = helper.make_graph(nodes, name, [X], [Y], initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]
                             + [helper.make_opsetid(d, 1) for d in extra_domains], functions=list(functions))


def _scaled_by(path: Path, location: str | None = None, length: int = 4) -> Path:
    """``output = input * w`` with ``w`` kept in an external data file at ``location``."""
    w = numpy_helper.from_array(np.array([2.0], np.float32), "w")
    if location is not None:
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
            entry = w.external_data.add()
            entry.key, entry.value = key, value
    return _save(_graph_model([helper.make_node("Mul", ["input", "w"], ["output"])], [w]), path)


def _loop(trips: str, *, extra_nodes=(), initializers=()) -> list:
    """``output = Loop(trips, true, input)`` whose body passes the image through."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["x_in"], ["x_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_out", TensorProto.FLOAT, None)])
    true = helper.make_node("Constant", [], ["true"], value=numpy_helper.from_array(np.array(True)))
    return [true, *extra_nodes, helper.make_node("Loop", [trips, "true", "input"], ["output"], body=body)]


# ----------------------------------------------------------------------------- ONNX


def test_external_data_inside_the_folder_imports_with_its_data(tmp_path, home):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "w.bin").write_bytes(np.array([2.0], np.float32).tobytes())
    model = import_model(_scaled_by(folder / "scaled.onnx", "w.bin"), name="scaled")
    assert (model.card_path.parent / "w.bin").read_bytes() == (folder / "w.bin").read_bytes()
    assert model.spec.representation == "fg" and model.spec.output_kind == "logit"


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "sub/../../outside.bin", "link.bin"])
def test_external_data_outside_the_folder_is_refused_before_onnxruntime(tmp_path, home, no_onnxruntime, location):
    folder = tmp_path / "m"
    folder.mkdir()
    (tmp_path / "outside.bin").write_bytes(b"\0" * 4)
    (folder / "link.bin").symlink_to(tmp_path / "outside.bin")
    f = _scaled_by(folder / "m.onnx", location)
    with pytest.raises(OnnxRefusedError, match=rf"refused m\.onnx: initializer 'w' keeps its data at {location!r}"):
        import_model(f)
    # a card naming such a file is refused when it is loaded, before any backend opens it
    card = write_card(ModelSpec(name="m", version="1", title="", description="", architecture="onnx"),
                      {"onnx": f}, folder / "m.json")
    with pytest.raises(OnnxRefusedError, match="outside the model's folder|symbolic link"):
        get_model(str(card))


def test_external_data_beyond_its_file_and_oversized_weights_are_refused(tmp_path, home, no_onnxruntime):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "w.bin").write_bytes(b"\0" * 4)
    with pytest.raises(OnnxRefusedError, match=r"reads bytes 0\.\.400 of 'w\.bin', which holds 4 bytes"):
        import_model(_scaled_by(folder / "short.onnx", "w.bin", length=400))
    with open(folder / "big.bin", "wb") as f:  # sparse: 2.5 GB declared, nothing written
        f.truncate(2_500_000_000)
    with pytest.raises(OnnxRefusedError, match=r"its weights declare more than 2 GiB \(2\.33 GiB"):
        import_model(_scaled_by(folder / "big.onnx", "big.bin", length=2_500_000_000))


def test_custom_operators_are_refused(tmp_path, home, no_onnxruntime):
    evil = _save(_graph_model([helper.make_node("Pwn", ["input"], ["output"], domain="com.evil")],
                              extra_domains=["com.evil"]), tmp_path / "custom.onnx")
    with pytest.raises(OnnxRefusedError, match=r"refused custom\.onnx: operator 'Pwn' \(com\.evil\.Pwn\) in the "
                                               r"main graph belongs to the custom domain 'com\.evil'"):
        import_model(evil)
    fake = _save(_graph_model([helper.make_node("NoSuchKernel", ["input"], ["output"], domain="com.microsoft")],
                              extra_domains=["com.microsoft"]), tmp_path / "ms.onnx")
    with pytest.raises(OnnxRefusedError, match="not one of ONNX Runtime's built-in com.microsoft operators"):
        import_model(fake)


def test_unbounded_loops_are_refused_wherever_they_hide(tmp_path, home, no_onnxruntime):
    cases = {
        "no trip count": (_loop(""), [], "has no trip count: it could run forever"),
        "computed trip count": (_loop("n", extra_nodes=[
            helper.make_node("Shape", ["input"], ["shape"]),
            helper.make_node("ReduceMax", ["shape"], ["n"], keepdims=0)]), [], "trip count that is not a constant"),
        "huge trip count": (_loop("n"), [numpy_helper.from_array(np.array(10**9, np.int64), "n")],
                            "runs 1000000000 times"),
    }
    for nodes, inits, message in cases.values():
        f = _save(_graph_model(nodes, inits), tmp_path / "loop.onnx")
        with pytest.raises(OnnxRefusedError, match=message):
            import_model(f)
    # inside an If's branch
    branch = helper.make_graph(_loop("")[:1] + [_loop("")[1]], "then", [], [Y])
    branch.node[1].input[2] = "input"
    other = helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "else", [], [Y])
    flag = helper.make_node("Constant", [], ["flag"], value=numpy_helper.from_array(np.array(True)))
    f = _save(_graph_model([flag, helper.make_node("If", ["flag"], ["output"], then_branch=branch, else_branch=other)]),
              tmp_path / "if.onnx")
    with pytest.raises(OnnxRefusedError, match=r"in a subgraph of operator .*If.*has no trip count"):
        import_model(f)
    # inside a local function
    fn = helper.make_function("local", "spin", ["input"], ["output"], _loop(""), [helper.make_opsetid("", 17)])
    f = _save(_graph_model([helper.make_node("spin", ["input"], ["output"], domain="local")], functions=[fn],
                           extra_domains=["local"]), tmp_path / "fn.onnx")
    with pytest.raises(OnnxRefusedError, match=r"in local function local\.spin has no trip count"):
        import_model(f)


def test_the_trial_run_is_stopped_by_its_memory_limit(tmp_path, home):
    shape = numpy_helper.from_array(np.array([1100, 1024, 1024], np.int64), "shape")  # 4.3 GB of float32
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"], value=numpy_helper.from_array(
                 np.array([1.0], np.float32))),
             helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
             helper.make_node("Mul", ["total", "zero"], ["nothing"]),
             helper.make_node("Add", ["input", "nothing"], ["output"])]
    f = _save(_graph_model(nodes, [shape, numpy_helper.from_array(np.array(0.0, np.float32), "zero")]),
              tmp_path / "hog.onnx")
    with pytest.raises(IncompatibleArtifactError, match=r"^hog\.onnx: .*(memory|alloc)") as info:
        import_model(f)
    assert "\n" not in str(info.value)


def test_a_slow_trial_run_is_stopped_by_its_time_limit(tmp_path, home, monkeypatch):
    monkeypatch.setattr(onnx_check, "TRIAL_LIMITS", Limits(memory_bytes=3 << 30, wall_seconds=3.0))
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["m_in", "m_in"], ["m_sq"]),
         helper.make_node("Tanh", ["m_sq"], ["m_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("m_in", TensorProto.FLOAT, [512, 512])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("m_out", TensorProto.FLOAT, [512, 512])])
    inits = [numpy_helper.from_array(np.array(onnx_check.MAX_LOOP_TRIPS, np.int64), "n"),
             numpy_helper.from_array(np.full((512, 512), 0.01, np.float32), "m0"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    nodes = [helper.make_node("Constant", [], ["true"], value=numpy_helper.from_array(np.array(True))),
             helper.make_node("Loop", ["n", "true", "m0"], ["m"], body=body),
             helper.make_node("ReduceSum", ["m"], ["s"], keepdims=0),
             helper.make_node("Mul", ["s", "zero"], ["nothing"]),
             helper.make_node("Add", ["input", "nothing"], ["output"])]
    f = _save(_graph_model(nodes, inits), tmp_path / "slow.onnx")
    with pytest.raises(ConfinedRunError, match=r"^slow\.onnx: stopped after 3 s"):
        import_model(f)


def test_damaged_files_get_one_clear_line(tmp_path, home, capsys):
    from segstudio.cli import main

    rng = np.random.default_rng(0)
    good = _scaled_by(tmp_path / "good.onnx")
    cases = {
        "garbage.onnx": (rng.bytes(5000), "not an ONNX model"),
        "truncated.onnx": (good.read_bytes()[: good.stat().st_size // 2], "not .*ONNX model"),
        "random.pt": (rng.bytes(5000), "not a readable PyTorch file"),
        "empty.pt": (b"", "not a readable PyTorch file"),
        "truncated.zip": (b"PK\x03\x04" + rng.bytes(100), "not a readable zip archive"),
    }
    for name, (data, message) in cases.items():
        f = tmp_path / name
        f.write_bytes(data)
        with pytest.raises(IncompatibleArtifactError, match=message):
            import_model(f)
        capsys.readouterr()
        assert main(["segment", str(SAMPLE_IMAGE), "--model", str(f), "--out", str(tmp_path / "out"), "-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and name in err[0] and "Traceback" not in err[0], err


def test_onnxruntime_load_errors_are_the_models(tmp_path, home):
    # valid for the checker (no full check), but ONNX Runtime refuses the weight's rank
    w = numpy_helper.from_array(np.ones((1, 1, 3), np.float32), "w")
    f = _save(_graph_model([helper.make_node("Conv", ["input", "w"], ["output"])], [w]), tmp_path / "badconv.onnx")
    with pytest.raises(ConfinedRunError, match=r"^badconv\.onnx: (ONNX Runtime cannot load it|the network fails)"):
        import_model(f)


# ----------------------------------------------------------------------------- zips


def _patch_declared_size(path: Path, member: str, size: int) -> None:
    """Make ``member`` declare ``size`` extracted bytes in its local header and the central directory."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    struct.pack_into("<I", data, info.header_offset + 22, size)  # local header: uncompressed size
    at = data.find(b"PK\x01\x02")
    while at >= 0:  # central directory entries: name length at +28, name at +46, uncompressed size at +24
        n = struct.unpack_from("<H", data, at + 28)[0]
        if bytes(data[at + 46 : at + 46 + n]) == member.encode():
            struct.pack_into("<I", data, at + 24, size)
        at = data.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(data))


def test_zip_bomb_is_refused_from_its_central_directory(tmp_path, home, monkeypatch):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("rdf.yaml", "type: model\n")
        z.writestr("weights.onnx", b"\0" * 1000)
    _patch_declared_size(bomb, "weights.onnx", 2 << 30)

    def no_extraction(*args, **kwargs):
        raise AssertionError("something was decompressed")

    monkeypatch.setattr(archives, "_read_member", no_extraction)
    with pytest.raises(ModelRefusedError, match=r"refused bomb\.zip: it would extract to 2\.00 GiB \(2147483660 "
                                                r"bytes from \d+ compressed; segstudio extracts at most 1 GiB\)"):
        import_model(bomb)
    monkeypatch.undo()
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as z:
        z.writestr("rdf.yaml", "type: model\n")
        for i in range(user.MAX_ZIP_ENTRIES):
            z.writestr(f"f{i}", b"")
    with pytest.raises(ModelRefusedError, match=r"refused many\.zip: 10001 entries"):
        import_model(many)
    dense = tmp_path / "dense.zip"
    with zipfile.ZipFile(dense, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("rdf.yaml", "type: model\n")
        z.writestr("zeros.npy", b"\0" * (40 << 20))
    with pytest.raises(ModelRefusedError, match=r"its entry 'zeros\.npy' is compressed \d+:1"):
        import_model(dense)


def test_extraction_stops_at_the_declared_size(tmp_path):
    liar = tmp_path / "liar.zip"
    with zipfile.ZipFile(liar, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("rdf.yaml", "type: model\n")
        z.writestr("weights.onnx", b"\1" * (1 << 20))
    _patch_declared_size(liar, "weights.onnx", 100)
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(IncompatibleArtifactError, match=r"liar\.zip"):
        safe_extract(liar, target)
    written = target / "weights.onnx"
    assert not written.exists() or written.stat().st_size <= 100


# ----------------------------------------------------------------------------- BioImage.IO fields


def _package_with(tmp_path: Path, version: str, change) -> Path:
    import yaml

    src = BIOIMAGEIO / f"unet2d_nuclei_broad-{version}"
    if not src.is_dir():
        pytest.skip(f"{src} not found")
    pkg = tmp_path / f"pkg-{version}"
    shutil.copytree(src, pkg)
    for f in pkg.iterdir():
        f.chmod(0o644)
    rdf_path = next(p for p in (pkg / "bioimageio.yaml", pkg / "rdf.yaml") if p.is_file())
    rdf = yaml.safe_load(rdf_path.read_text())
    change(rdf, pkg)
    rdf_path.write_text(yaml.safe_dump(rdf))
    return pkg


def _set(path: str, value):
    def change(rdf, pkg):
        keys = [int(k) if k.isdigit() else k for k in path.split(".")]
        node = rdf
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value

    return change


@pytest.mark.parametrize("version, change, message", [
    ("0.5", _set("inputs", "raw"), r"inputs must be a list, not 'raw'"),
    ("0.5", _set("inputs.0", [1, 2]), r"inputs\[0\] must be a mapping"),
    ("0.5", _set("inputs.0.axes.2", "y"), r"inputs\[0\]\.axes\[2\] must be a mapping \(key: value\), not 'y'"),
    ("0.5", _set("inputs.0.axes.2.size", {"min": "big", "step": 16}), r"inputs\[0\]\.axes\[2\]\.size\.min must be a whole"),
    ("0.5", _set("outputs.0.axes.2.halo", "big"), r"outputs\[0\]\.axes\[2\]\.halo must be a whole number >= 0, not 'big'"),
    ("0.5", _set("inputs.0.preprocessing.1.kwargs", ["x", "y"]), r"inputs\[0\]\.preprocessing\[1\]\.kwargs must be a mapping"),
    ("0.5", _set("inputs.0.preprocessing.1.kwargs.eps", "tiny"), r"inputs\[0\]\.preprocessing\[1\]\.kwargs\.eps must be a number"),
    ("0.5", _set("weights", "weights.onnx"), r"weights must be a mapping"),
    ("0.5", _set("weights.onnx", "weights.onnx"), r"weights\.onnx must be a mapping"),
    ("0.5", _set("weights.onnx.source", ["weights.onnx"]), r"weights\.onnx\.source must be text"),
    ("0.4", _set("outputs.0.halo", "32"), r"outputs\[0\]\.halo must be a list, not '32'"),
    ("0.4", _set("outputs.0.halo", [0, 0, "a", 32]), r"outputs\[0\]\.halo\[2\] must be a whole number"),
    ("0.4", _set("inputs.0.shape", [1, 1, "512", 512]), r"inputs\[0\]\.shape\[2\] must be a whole number"),
    ("0.4", _set("inputs.0.preprocessing.0.kwargs.mode", "fixed"), r"inputs\[0\]\.preprocessing\[0\]\.kwargs\.mode is 'fixed'"),
    ("0.4", _set("test_inputs", "test_input.npy"), r"test_inputs must be a list"),
])
def test_bioimageio_fields_of_the_wrong_type_are_named(tmp_path, home, version, change, message):
    pkg = _package_with(tmp_path, version, change)
    with pytest.raises(IncompatibleArtifactError, match=r"^\S*: (bioimageio|rdf)\.yaml: " + message):  # package: file: field
        import_model(pkg)


def test_a_pickled_test_tensor_is_never_loaded(tmp_path, home):
    def pickled(rdf, pkg):
        np.save(pkg / "test_input.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)

    pkg = _package_with(tmp_path, "0.5", pickled)
    with pytest.raises(IncompatibleArtifactError, match=r"the test input \(test_input\.npy\) holds object values, "
                                                        r"not numbers \(a pickle, which segstudio never loads\)"):
        import_model(pkg)
