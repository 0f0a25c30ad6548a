"""Models the user brings: ONNX, TorchScript, state dicts, BioImage.IO packages, and files that must be refused."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from segstudio.core.datasets import find_pairs  # noqa: E402
from segstudio.core.errors import IncompatibleArtifactError  # noqa: E402
from segstudio.core.evaluate import score  # noqa: E402
from segstudio.core.io import read_image  # noqa: E402
from segstudio.core.models.catalog import get_model  # noqa: E402
from segstudio.core.models.onnx_export import export_onnx  # noqa: E402
from segstudio.core.models.unet import build_unet  # noqa: E402
from segstudio.core.models.user import ModelRefusedError, import_model, safe_extract  # noqa: E402
from segstudio.core.preprocess import normalize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGSTUDIO_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def nuclei_net():
    model = get_model("nuclei")
    net = build_unet(model.spec.config)
    net.load_state_dict(torch.load(model.file("torch"), weights_only=True))
    return model, net.eval()


@pytest.fixture(scope="module")
def sample_pair():
    pairs = find_pairs(SAMPLE, SAMPLE)
    assert pairs, "sample_data holds image / label pairs"
    return pairs[0]


def _segment_cli(model_arg: str, image: Path, out: Path, *extra: str) -> np.ndarray:
    from segstudio.cli import main

    assert main(["segment", str(image), "--model", model_arg, "--out", str(out), "--backend", "onnxruntime", "-q",
                 *extra]) == 0
    files = sorted(out.glob("*_labels.tif"))
    assert len(files) == 1
    return read_image(files[0]).data


def _reference_labels(image: Path, out: Path) -> np.ndarray:
    return _segment_cli("nuclei", image, out)


def test_onnx_torchscript_and_state_dict_segment_like_the_builtin(tmp_path, home, nuclei_net, sample_pair):
    model, net = nuclei_net
    onnx_file = export_onnx(net, tmp_path / "mine.onnx", in_channels=1, multiple=model.spec.multiple)
    ts_file = tmp_path / "mine_ts.pt"
    torch.jit.script(net).save(str(ts_file))
    sd_file = tmp_path / "mine_sd.pt"
    torch.save(net.state_dict(), sd_file)

    ref = _reference_labels(sample_pair.image, tmp_path / "ref")
    truth = read_image(sample_pair.labels).data
    ref_ap = score(truth, ref.reshape(truth.shape)).ap[0.5]
    for name, f in [("onnx", onnx_file), ("torchscript", ts_file), ("state_dict", sd_file)]:
        # TorchScript is code: it is converted (in a confined process) only when the user allows it
        labels = _segment_cli(str(f), sample_pair.image, tmp_path / name, *(["--trust-code"] * (name == "torchscript")))
        ap = score(truth, labels.reshape(truth.shape)).ap[0.5]
        # same network, same thresholds? the ONNX / TorchScript imports get generic thresholds
        assert ap > ref_ap - 0.1, (name, ap, ref_ap)
        assert labels.max() > 5
    # the state dict import recovers the architecture and keeps the PyTorch weights
    m = get_model(str(sd_file))
    assert m.spec.config == model.spec.config and set(m.files) == {"torch", "onnx"}
    # a second use of the same file reuses the import
    assert get_model(str(sd_file)).card_path == m.card_path


def test_named_import_is_listed_and_found_by_name(tmp_path, home, nuclei_net):
    from segstudio.core.models.user import user_models

    model, net = nuclei_net
    f = export_onnx(net, tmp_path / "x.onnx", in_channels=1, multiple=model.spec.multiple)
    m = import_model(f, name="my-nuclei", diameter=20)
    assert m.card_path.parent == home / "models" / "my-nuclei"
    assert [u.name for u in user_models()] == ["my-nuclei"]
    found = get_model("my-nuclei")
    assert found.spec.diameter == 20 and found.spec.representation == "fg_dist"
    with pytest.raises(Exception, match="already exists"):
        import_model(f, name="my-nuclei")


def test_malicious_pickle_is_refused_and_not_run(tmp_path, home):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "weights.pt"
    torch.save({"encoders.0.0.0.weight": torch.zeros(1), "x": Evil()}, bad)
    with pytest.raises(ModelRefusedError, match="refused weights.pt: it holds Python objects"):
        import_model(bad)
    assert not marker.exists()
    legacy = tmp_path / "legacy.pkl.pt"
    legacy.write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(ModelRefusedError, match="refused"):
        get_model(str(legacy))
    assert not marker.exists()
    assert not list((home / "models").rglob("*.json")) if (home / "models").exists() else True


def test_zip_with_parent_paths_is_refused(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("rdf.yaml", "type: model\n")
        z.writestr("../../escaped.txt", "gotcha")
    target = tmp_path / "deep" / "target"
    target.mkdir(parents=True)
    with pytest.raises(ModelRefusedError, match="would be written outside the model folder"):
        safe_extract(evil, target)
    assert not (tmp_path / "escaped.txt").exists() and not list(target.iterdir())
    with pytest.raises(ModelRefusedError, match=r"'\.\./\.\./escaped\.txt'"):
        import_model(evil)


def _bioimageio_zip(tmp_path: Path, net, multiple: int, *, tamper: bool = False) -> Path:
    import yaml

    pkg = tmp_path / "pkg"
    pkg.mkdir()
    export_onnx(net, pkg / "weights.onnx", in_channels=1, multiple=multiple)
    rng = np.random.default_rng(1)
    x = (rng.random((1, 1, 64, 64)) * 1000).astype(np.float32)
    with torch.inference_mode():
        y = net(torch.from_numpy(normalize(x[0], get_model("nuclei").spec.normalization)[None])).numpy()
    if tamper:
        y = y + 1.0
    np.save(pkg / "test_input.npy", x)
    np.save(pkg / "test_output.npy", y)
    rdf = {
        "format_version": "0.5.3", "type": "model", "name": "Test nuclei", "version": "0.1", "license": "MIT",
        "description": "a U-Net packaged by the tests", "authors": [{"name": "tests"}],
        "inputs": [{"id": "raw", "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["dapi"]},
                                          {"type": "space", "id": "y", "size": {"min": 64, "step": multiple}},
                                          {"type": "space", "id": "x", "size": {"min": 64, "step": multiple}}],
                    "test_tensor": {"source": "test_input.npy"},
                    "preprocessing": [{"id": "scale_range",
                                       "kwargs": {"axes": ["y", "x"], "min_percentile": 1.0, "max_percentile": 99.8}}]}],
        "outputs": [{"id": "fg_dist", "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["fg", "dist"]},
                                               {"type": "space", "id": "y", "halo": 40,
                                                "size": {"tensor_id": "raw", "axis_id": "y"}},
                                               {"type": "space", "id": "x", "halo": 40,
                                                "size": {"tensor_id": "raw", "axis_id": "x"}}],
                     "test_tensor": {"source": "test_output.npy"}}],
        "weights": {"onnx": {"source": "weights.onnx", "opset_version": 18}},
    }
    (pkg / "rdf.yaml").write_text(yaml.safe_dump(rdf))
    out = tmp_path / ("tampered.zip" if tamper else "model.bioimageio.zip")
    with zipfile.ZipFile(out, "w") as z:
        for f in pkg.iterdir():
            z.write(f, f.name)
    return out


def test_bioimageio_zip_loads_checks_test_tensors_and_segments(tmp_path, home, nuclei_net, sample_pair):
    model, net = nuclei_net
    zipped = _bioimageio_zip(tmp_path, net, model.spec.multiple)
    m = import_model(zipped, name="bio")
    assert m.spec.normalization.low == 1.0 and m.spec.normalization.high == 99.8
    assert m.spec.halo >= 40 and m.spec.multiple == model.spec.multiple
    assert m.provenance["test_tensors"]["max_abs_error"] < 1e-3
    labels = _segment_cli(str(zipped), sample_pair.image, tmp_path / "bio_out")
    truth = read_image(sample_pair.labels).data
    assert score(truth, labels.reshape(truth.shape)).ap[0.5] > 0.5

    (tmp_path / "pkg").rename(tmp_path / "pkg_ok")
    bad = _bioimageio_zip(tmp_path, net, model.spec.multiple, tamper=True)
    with pytest.raises(IncompatibleArtifactError, match="test tensors do not reproduce"):
        import_model(bad, name="bad")
    assert not (home / "models" / "bad").exists()


def test_bioimageio_state_dict_weights_are_refused(tmp_path, home):
    import yaml

    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "rdf.yaml").write_text(yaml.safe_dump({
        "type": "model", "name": "code", "inputs": [{"axes": "bcyx"}], "outputs": [{"axes": "bcyx"}],
        "weights": {"pytorch_state_dict": {"source": "w.pt", "architecture": {"source": "net.py", "callable": "Net"}}},
    }))
    with pytest.raises(ModelRefusedError, match="never runs"):
        import_model(pkg)
