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

from segstudio.core.errors import IncompatibleArtifactError  # noqa: E402
from segstudio.core.image.sources import read_image  # noqa: E402
from segstudio.core.models.catalog import get_model  # noqa: E402
from segstudio.core.models.onnx_export import export_onnx  # noqa: E402
from segstudio.core.models.unet import build_unet  # noqa: E402
from segstudio.core.models.user import ImportHints, ModelRefusedError, import_model, safe_extract  # noqa: E402
from segstudio.core.segment.options import SegmentOptions
from segstudio.core.segment.preprocess import normalize  # noqa: E402
from segstudio.core.tasks.evaluate import score  # noqa: E402
from segstudio.core.training.datasets import find_pairs  # noqa: E402

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
    m = import_model(f, name="my-nuclei", hints=ImportHints(diameter=20))
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


# ----------------------------------------------------------------------------- real BioImage.IO packages

BIOIMAGEIO = ROOT.parent / "shared" / "data" / "bioimageio"


@pytest.fixture(scope="module")
def nuclei_broad() -> dict[str, Path]:
    """The BioImage.IO specification's example model in its 0.5.4 and 0.4.9 descriptions."""
    folders = {v: BIOIMAGEIO / f"unet2d_nuclei_broad-{v}" for v in ("0.5", "0.4")}
    if not all(f.is_dir() for f in folders.values()):
        pytest.skip(f"the unet2d_nuclei_broad packages are not in {BIOIMAGEIO}")
    return folders


def _zip_folder(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f.name)
    return out


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_real_bioimageio_package_imports_from_folder_and_zip_and_reproduces(tmp_path, home, nuclei_broad, version):
    from segstudio.core.models.spec import Normalization

    folder = nuclei_broad[version]
    for src in (folder, _zip_folder(folder, tmp_path / f"nuclei-broad-{version}.zip")):
        m = import_model(src, name=f"broad-{version}-{src.suffix or 'folder'}".replace(".", ""))
        s = m.spec
        # 0.5: the second space axis has no id, which the specification defaults to "x"
        assert s.fixed_input == (512, 512) and s.input_step == (0, 0) and s.max_batch == 1
        assert s.halo == 32 and s.input_channels == 1 and s.representation == "fg"
        assert s.output_kind == "logit"  # the package's sigmoid is segstudio's to apply
        # ensure_dtype float32 (0.5) is a no-op; zero_mean_unit_variance over x, y with its default eps
        assert s.normalization == Normalization(mode="meanstd", eps=1e-6)
        report = m.provenance["test_tensors"]
        assert report["mismatched"] == 0 and report["elements"] == 512 * 512 and report["max_abs_error"] < 1e-4
        assert report["tolerance"] == {"relative": 1e-3, "absolute": 1e-3,
                                       "mismatched_ppm": 100.0 if version == "0.5" else 0.0}
        assert m.provenance["bioimageio"]["weights"] == "onnx"


def test_fixed_size_network_gets_exactly_its_size(tmp_path, home, nuclei_broad):
    from segstudio.core.backends import create_backend
    from segstudio.core.image.io import ImageData
    from segstudio.core.jobs import run_sync
    from segstudio.core.segment.job import segment_job, warm_up

    model = import_model(nuclei_broad["0.4"], name="broad")
    shapes = []
    for name in ("onnxruntime", "openvino"):
        pytest.importorskip(name)
        backend = create_backend(name, model)
        real = backend.inner.predict
        backend.inner.predict = lambda batch, crop=None, real=real: (shapes.append(batch.shape), real(batch, crop))[1]
        warm_up(model, backend, batch_size=4)
        for hw in ((100, 90), (700, 300)):  # smaller than one tile; several tiles, one side smaller
            image = ImageData(data=np.random.default_rng(0).random(hw).astype(np.float32) * 1000, axes="YX",
                              name="x")
            result = run_sync(segment_job(image, model, backend, SegmentOptions(batch_size=4)))
            assert result.labels.shape == hw
        backend.close()
    assert set(shapes) == {(1, 1, 512, 512)}


def test_real_bioimageio_package_segments_dsb2018(tmp_path, home, nuclei_broad, dsb2018):
    import json

    index = json.loads((dsb2018 / "index.json").read_text())
    chosen = [e for e in index if e["file"].startswith("val/") and e["kind"] == "fluorescence"][:4]
    images = [dsb2018 / f"{e['file']}_img.tif" for e in chosen]
    from segstudio.cli import main

    out = tmp_path / "out"
    assert main(["segment", *map(str, images), "--model", str(nuclei_broad["0.5"]), "--out", str(out),
                 "--backend", "onnxruntime", "-q"]) == 0
    aps = []
    for img in images:
        truth = read_image(Path(str(img).replace("_img.tif", "_labels.tif"))).data
        labels = read_image(out / img.name.replace(".tif", "_labels.tif")).data
        aps.append(score(truth, labels.reshape(truth.shape)).ap[0.5])
    # measured: 0.50, 1.00, 0.70, 0.56 (mean 0.69); 0.554 over all 113 fluorescence val images
    assert np.mean(aps) >= 0.55 and min(aps) >= 0.3, aps


def test_real_bioimageio_torchscript_weights_follow_the_trust_rule(tmp_path, home, nuclei_broad):
    import shutil

    import yaml

    pkg = tmp_path / "ts-only"
    shutil.copytree(nuclei_broad["0.5"], pkg)
    for f in pkg.iterdir():
        f.chmod(0o644)
    rdf = yaml.safe_load((pkg / "bioimageio.yaml").read_text())
    del rdf["weights"]["onnx"]
    (pkg / "weights.onnx").unlink()
    (pkg / "bioimageio.yaml").write_text(yaml.safe_dump(rdf))
    with pytest.raises(ModelRefusedError, match=r"refused weights\.pt: it is the package's only weights, a "
                                                r"TorchScript archive \(weights\.pt\), which holds code"):
        import_model(pkg)
    m = import_model(pkg, name="broad-ts", trust_code=True)
    assert m.provenance["converted"]["in"] == "a confined child process"
    assert m.provenance["bioimageio"]["weights"] == "torchscript" and m.spec.fixed_input == (512, 512)
    assert m.provenance["test_tensors"]["mismatched"] == 0
