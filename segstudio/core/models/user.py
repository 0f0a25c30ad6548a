"""Models the user brings: ONNX, TorchScript, PyTorch state dicts, BioImage.IO packages.

:func:`import_model` turns any of them into an ordinary model folder (an
ONNX file, a state dict for built-in U-Nets, and a card) under the user's
model folder (``$SEGSTUDIO_HOME/models`` or ``~/.segstudio/models``), so the
rest of the app (backends, tiling, post-processing, optimization) uses it
unchanged; :func:`get_model` finds it by name afterwards.

Model files are untrusted:

* state dicts are read with ``torch.load(weights_only=True)``: a pickle that
  holds anything but tensors and plain containers is refused;
* TorchScript archives are loaded by the TorchScript runtime (their code is
  TorchScript, not Python) and converted to ONNX once, at import;
* BioImage.IO packages: only ``onnx`` and ``torchscript`` weights are used;
  ``pytorch_state_dict`` weights need Python code from the package, which is
  never run; YAML is read with ``safe_load``; a zip member whose path leaves
  the target folder (``../``, absolute paths, links) refuses the whole zip.

What a network's outputs mean is declared (``representation``): two
channels are foreground and distance (the built-in convention), one channel
is a foreground map (instances then come from its distance transform);
probabilities or logits (``output_kind``) are told apart from the test run.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from ..errors import IncompatibleArtifactError, InputError
from .catalog import Model, load_card, write_card
from .spec import ModelSpec, Normalization, PostprocessParams, UNetConfig, file_sha256

RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
DEFAULT_MULTIPLE, DEFAULT_HALO = 16, 32


class ModelRefusedError(IncompatibleArtifactError):
    """A model file that is unsafe to load (code in a pickle, a zip that writes outside its folder)."""


def user_models_dir() -> Path:
    return Path(os.environ.get("SEGSTUDIO_HOME") or Path.home() / ".segstudio") / "models"


def user_models() -> list[Model]:
    """Every model imported into the user's model folder (unreadable ones are skipped)."""
    out = []
    for card in sorted(user_models_dir().glob("*/*.json")):
        try:
            out.append(load_card(card, verify=False))
        except IncompatibleArtifactError:
            continue
    return out


def import_cached(path: str | Path) -> Model:
    """A model file or package imported under ``<user models>/.imported/<content hash>`` (once per content)."""
    path = Path(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f.relative_to(path).as_posix().encode() + file_sha256(f).encode())
        key = digest.hexdigest()[:16]
    else:
        key = file_sha256(path)[:16]
    folder = user_models_dir() / ".imported" / key
    cards = sorted(folder.glob("*.json"))
    if cards:
        return load_card(cards[0])
    return import_model(path, out_dir=folder)


def safe_name(name: str) -> str:
    """``name`` made fit for a folder and file name (letters, digits, '-', '_', '.')."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")
    if not name:
        raise InputError("the model needs a name of letters, digits, '-', '_' or '.'")
    return name


def detect_kind(path: Path) -> str:
    """``onnx``, ``torchscript``, ``state_dict`` or ``bioimageio`` from the file's contents."""
    if path.is_dir():
        if any((path / n).is_file() for n in RDF_NAMES):
            return "bioimageio"
        raise InputError(f"{path} is a folder without rdf.yaml or bioimageio.yaml",
                         hint="give a model file (.onnx, .pt) or a BioImage.IO package")
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if head[:2] == b"PK":
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any(n.split("/")[-1] in RDF_NAMES for n in names):
            return "bioimageio"
        if any("/code/" in n or n.startswith("code/") for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
        return "state_dict"
    if head[:1] == b"\x80":  # a bare (legacy) pickle stream
        return "state_dict"
    if path.suffix.lower() in (".pt", ".pth"):
        return "state_dict"
    raise InputError(f"{path.name}: not a model file segstudio knows",
                     hint="ONNX (.onnx), TorchScript or a PyTorch state dict (.pt), or a BioImage.IO package")


def import_model(
    path: str | Path, *, name: str | None = None, out_dir: str | Path | None = None,
    representation: str | None = None, output_kind: str | None = None, diameter: float | None = None,
    normalization: Normalization | None = None, overwrite: bool = False,
) -> Model:
    """Import a user's model file or package; returns the new model (its card written under ``out_dir``).

    ``out_dir`` defaults to ``<user models>/<name>``.  ``representation``
    (``fg_dist`` or ``fg``) and ``output_kind`` (``logit`` or
    ``probability``) default to what the outputs look like; ``diameter``
    (nuclei size in pixels the model expects) enables rescaling.
    """
    path = Path(path)
    kind = detect_kind(path)
    name = safe_name(name or path.stem.replace(".bioimageio", ""))
    out_dir = Path(out_dir) if out_dir is not None else user_models_dir() / name
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise InputError(f"a model named {name!r} already exists ({out_dir})", hint="pick another name")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        if kind == "bioimageio":
            spec, files, extra = _import_bioimageio(path, name, out_dir)
        else:
            if kind == "onnx":
                onnx_path = out_dir / f"{name}.onnx"
                shutil.copyfile(path, onnx_path)
                files = {"onnx": onnx_path}
                config = None
            elif kind == "torchscript":
                files, config = {"onnx": _torchscript_to_onnx(path, out_dir / f"{name}.onnx")}, None
            else:
                files, config = _import_state_dict(path, out_dir, name)
            spec = ModelSpec(name=name, version="user", title=f"{name} (imported {kind})",
                             description=f"imported from {path.name}", architecture="unet" if config else "onnx")
            if config is not None:
                spec.config = config
            extra = {}
        _fill_from_onnx(spec, files["onnx"], representation=representation or extra.get("representation"),
                        output_kind=output_kind or extra.get("output_kind"))
        if normalization is not None:
            spec.normalization = normalization
        if diameter:
            spec.diameter = float(diameter)
        provenance = {"imported_from": str(path), "kind": kind,
                      "source_sha256": file_sha256(path) if path.is_file() else None, **extra.get("provenance", {})}
        card = write_card(spec, files, out_dir / f"{name}.json", provenance=provenance)
        model = load_card(card)
        if extra.get("test"):
            _check_test_tensors(model, *extra["test"])
        return model
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise


# ------------------------------------------------------------------ formats


def _import_state_dict(path: Path, out_dir: Path, name: str):
    """A state dict of a built-in U-Net: its configuration is read off the tensor shapes."""
    import pickle

    import torch

    from .onnx_export import export_onnx
    from .unet import build_unet

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelRefusedError(
            f"refused {path.name}: it holds Python objects, not only tensors, and unpickling them could run code "
            f"({str(e).splitlines()[0][:200]})",
            hint="save the weights with torch.save(model.state_dict(), path), or export ONNX",
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise IncompatibleArtifactError(f"{path.name}: not a readable PyTorch file ({e})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a training checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise IncompatibleArtifactError(f"{path.name}: not a state dict (a mapping of names to tensors)")
    config = unet_config_from_state(state)
    net = build_unet(config)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise IncompatibleArtifactError(
            f"{path.name}: the weights do not fit segstudio's U-Net ({str(e).splitlines()[0]})",
            hint="state dicts are for the built-in architecture; export other networks to ONNX",
        ) from None
    pt = out_dir / f"{name}.pt"
    torch.save({k: v.clone() for k, v in state.items()}, pt)
    onnx_path = export_onnx(net.eval(), out_dir / f"{name}.onnx", in_channels=config.in_channels,
                            multiple=config.multiple)
    return {"torch": pt, "onnx": onnx_path}, config


def unet_config_from_state(state: dict) -> UNetConfig:
    """The :class:`UNetConfig` whose network has these tensors (depth, widths, channels, separable)."""
    keys = list(state)
    enc = sorted({int(m.group(1)) for k in keys if (m := re.match(r"encoders\.(\d+)\.", k))})
    if not enc or "head.weight" not in state or "encoders.0.0.0.weight" not in state:
        raise IncompatibleArtifactError("not a state dict of segstudio's U-Net (no encoder / head tensors)",
                                        hint="export other networks to ONNX and import that")
    first = state["encoders.0.0.0.weight"]
    second = state.get("encoders.0.1.1.weight")
    separable = second is not None and second.ndim == 4 and second.shape[-1] == 1
    after_first = state.get("encoders.0.0.1.weight")
    depthwise_first = after_first is not None and after_first.ndim == 4  # depthwise, then a pointwise conv
    in_channels = int(first.shape[0] if depthwise_first else first.shape[1])
    width = int(state["head.weight"].shape[1])
    depth = len(enc) - 1
    deepest = state[f"encoders.{depth}.1.0.weight"] if f"encoders.{depth}.1.0.weight" in state else None
    max_width = 256
    if deepest is not None and width * 2**depth > deepest.shape[0] * (2 if separable else 1) and not separable:
        max_width = int(deepest.shape[0])
    return UNetConfig(in_channels=in_channels, out_channels=int(state["head.weight"].shape[0]),
                      depth=depth, width=width, max_width=max_width, separable=separable)


def _torchscript_to_onnx(path: Path, onnx_path: Path) -> Path:
    import torch

    from .onnx_export import finalize_onnx

    try:
        module = torch.jit.load(str(path), map_location="cpu").eval()
    except RuntimeError as e:
        raise IncompatibleArtifactError(f"{path.name}: not a loadable TorchScript archive ({e})") from None
    channels = _guess_channels(module)
    tmp = onnx_path.with_suffix(".export.onnx")
    dyn = {0: "batch", 2: "height", 3: "width"}
    try:
        torch.onnx.export(module, (torch.zeros(1, channels, 64, 64),), str(tmp), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": dyn, "output": dyn})
    except Exception as e:  # noqa: BLE001 - any exporter failure is the model's
        raise IncompatibleArtifactError(f"{path.name}: TorchScript could not be converted to ONNX ({e})") from None
    return finalize_onnx(tmp, onnx_path)


def _guess_channels(module) -> int:
    """Input channels of a TorchScript module: those of its first 4-D convolution weight."""
    for _, p in module.named_parameters():
        if p.ndim == 4:
            return int(p.shape[1])
    return 1


def _fill_from_onnx(spec: ModelSpec, onnx_path: Path, *, representation: str | None, output_kind: str | None):
    """Input channels, outputs and their meaning from the ONNX graph and a trial run."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs = sess.get_inputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise IncompatibleArtifactError(
            f"{onnx_path.name}: segstudio runs networks with one (batch, channel, height, width) input; "
            f"this one has {len(inputs)} input(s) of shape {[i.shape for i in inputs]}")
    c = inputs[0].shape[1]
    if not isinstance(c, int):
        c = spec.input_channels
    spec.input_channels = c
    if spec.architecture != "unet":
        spec.multiple_px = spec.multiple_px or DEFAULT_MULTIPLE
        spec.halo_px = spec.halo_px if spec.halo_px is not None else DEFAULT_HALO
    m = spec.multiple
    trial = np.random.default_rng(0).random((1, c, 4 * m, 4 * m), dtype=np.float32)
    try:
        out = sess.run(None, {inputs[0].name: trial})[0]
    except Exception as e:  # noqa: BLE001
        raise IncompatibleArtifactError(f"{onnx_path.name}: the network fails on a {trial.shape} input ({e})") from None
    if out.ndim != 4 or out.shape[2:] != trial.shape[2:]:
        raise IncompatibleArtifactError(
            f"{onnx_path.name}: outputs must be (batch, channels, height, width) at the input's size; "
            f"got {out.shape} for input {trial.shape}")
    k = out.shape[1]
    if spec.architecture != "unet":  # not a U-Net: the config only carries its channel counts
        spec.config = UNetConfig(in_channels=c, out_channels=k)
    representation = representation or ("fg" if k == 1 else "fg_dist")
    if representation not in ("fg", "fg_dist"):
        raise InputError(f"unknown output representation {representation!r}", hint="fg_dist or fg")
    if representation == "fg_dist" and k < 2:
        raise IncompatibleArtifactError(f"{onnx_path.name}: fg_dist needs two output channels, the network has {k}")
    spec.representation = representation
    spec.outputs = ("foreground", "distance")[: 1 if representation == "fg" else 2]
    spec.output_kind = output_kind or ("probability" if out.min() >= 0 and out.max() <= 1 else "logit")
    if spec.output_kind not in ("logit", "probability"):
        raise InputError(f"unknown output kind {spec.output_kind!r}", hint="logit or probability")
    if spec.architecture != "unet":
        spec.postprocess = PostprocessParams(fg_threshold=0.5, seed_threshold=0.6, min_size=8)


# ------------------------------------------------------------------ BioImage.IO


def safe_extract(zip_path: Path, target: Path) -> None:
    """Extract ``zip_path`` into ``target``, refusing members that would land outside it (or are links)."""
    target = target.resolve()
    with zipfile.ZipFile(zip_path) as z:
        members = z.infolist()
        for info in members:
            name = info.filename
            dest = (target / name).resolve()
            mode = info.external_attr >> 16
            if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or (
                dest != target and target not in dest.parents
            ):
                raise ModelRefusedError(
                    f"refused {zip_path.name}: its entry {name!r} would be written outside the model folder",
                    hint="the archive is damaged or malicious; get the model from its author again",
                )
            if stat.S_ISLNK(mode):
                raise ModelRefusedError(f"refused {zip_path.name}: its entry {name!r} is a symbolic link")
        z.extractall(target)


def _bioimageio_axes(t: dict) -> str:
    axes = t.get("axes")
    if isinstance(axes, str):
        return axes.lower()
    letters = []
    for a in axes or []:
        typ = a.get("type")
        letters.append({"batch": "b", "channel": "c", "index": "i", "time": "t"}.get(typ) or str(a.get("id", "?")))
    return "".join(letters).lower()


def _op_name(op: dict) -> str:
    return str(op.get("id") or op.get("name") or "")


def _import_bioimageio(path: Path, name: str, out_dir: Path):
    import yaml

    with tempfile.TemporaryDirectory(prefix="segstudio-bioimageio-") as tmp:
        root = Path(tmp)
        if path.is_dir():
            pkg = path
        else:
            safe_extract(path, root)
            pkg = root
        rdf_path = next((p for n in RDF_NAMES for p in sorted(pkg.rglob(n))), None)
        if rdf_path is None:
            raise IncompatibleArtifactError(f"{path.name}: no rdf.yaml or bioimageio.yaml in the package")
        pkg = rdf_path.parent
        try:
            rdf = yaml.safe_load(rdf_path.read_text())
        except yaml.YAMLError as e:
            raise IncompatibleArtifactError(f"{rdf_path.name}: not valid YAML ({e})") from None
        if not isinstance(rdf, dict) or rdf.get("type", "model") != "model":
            raise IncompatibleArtifactError(f"{rdf_path.name}: not a BioImage.IO model description")
        inputs, outputs = rdf.get("inputs") or [], rdf.get("outputs") or []
        if len(inputs) != 1 or len(outputs) < 1:
            raise IncompatibleArtifactError("segstudio runs BioImage.IO models with one input tensor")
        t_in, t_out = inputs[0], outputs[0]
        in_axes, out_axes = _bioimageio_axes(t_in), _bioimageio_axes(t_out)
        if in_axes.replace("b", "") not in ("cyx", "yx") or out_axes.replace("b", "") not in ("cyx", "yx"):
            raise IncompatibleArtifactError(
                f"axes {in_axes!r} -> {out_axes!r}: segstudio runs 2-D models (b, c, y, x)")
        weights = rdf.get("weights") or {}
        fmt = "onnx" if "onnx" in weights else "torchscript" if "torchscript" in weights else None
        if fmt is None:
            raise ModelRefusedError(
                f"{rdf_path.name}: the package offers only {', '.join(weights) or 'no'} weights; segstudio takes "
                "onnx or torchscript weights (pytorch_state_dict weights need Python code from the package, "
                "which segstudio never runs)")
        source = _resolve_in(pkg, weights[fmt].get("source", ""))
        onnx_path = out_dir / f"{name}.onnx"
        if fmt == "onnx":
            shutil.copyfile(source, onnx_path)
        else:
            _torchscript_to_onnx(source, onnx_path)
        norm = _bioimageio_normalization(t_in.get("preprocessing") or [])
        post = [_op_name(op) for op in (t_out.get("postprocessing") or [])]
        unknown = [p for p in post if p not in ("sigmoid", "")]
        if unknown:
            raise IncompatibleArtifactError(f"output post-processing {unknown} is not supported (only sigmoid)")
        spec = ModelSpec(name=name, version=str(rdf.get("version") or "user"),
                         title=str(rdf.get("name") or name), description=str(rdf.get("description") or ""),
                         architecture="onnx", normalization=norm, license=str(rdf.get("license") or ""))
        spec.multiple_px, spec.halo_px = _bioimageio_tiling(t_in, t_out)
        test = None
        tin = (t_in.get("test_tensor") or {}).get("source") or (rdf.get("test_inputs") or [None])[0]
        tout = (t_out.get("test_tensor") or {}).get("source") or (rdf.get("test_outputs") or [None])[0]
        if tin and tout:
            x, y = np.load(_resolve_in(pkg, tin), allow_pickle=False), np.load(_resolve_in(pkg, tout), allow_pickle=False)
            test = (_as_bcyx(x, in_axes), _as_bcyx(y, out_axes), "sigmoid" in post)
        cite = {"rdf": rdf_path.name, "format_version": rdf.get("format_version"), "weights": fmt,
                "authors": [a.get("name") for a in rdf.get("authors") or [] if isinstance(a, dict)]}
        extra = {"provenance": {"bioimageio": cite}, "test": test,
                 "output_kind": "probability" if "sigmoid" in post else None}
        return spec, {"onnx": onnx_path}, extra


def _resolve_in(pkg: Path, rel: str) -> Path:
    p = (pkg / str(rel)).resolve()
    if pkg.resolve() not in p.parents or not p.is_file():
        raise IncompatibleArtifactError(f"the package names a file it does not hold: {rel!r}")
    return p


def _as_bcyx(a: np.ndarray, axes: str) -> np.ndarray:
    if "b" not in axes:
        a, axes = a[None], "b" + axes
    if "c" not in axes:
        a = a[:, None]
    return a.astype(np.float32)


def _bioimageio_normalization(ops: list[dict]) -> Normalization:
    if not ops:
        return Normalization(mode="none")
    if len(ops) > 1:
        raise IncompatibleArtifactError(f"input pre-processing {[_op_name(o) for o in ops]}: segstudio supports one step")
    op, kw = _op_name(ops[0]), ops[0].get("kwargs") or {}
    if op == "scale_range":
        return Normalization(low=float(kw.get("min_percentile", 0.0)), high=float(kw.get("max_percentile", 100.0)))
    if op == "zero_mean_unit_variance":
        return Normalization(mode="meanstd")
    raise IncompatibleArtifactError(
        f"input pre-processing {op!r} is not supported", hint="scale_range or zero_mean_unit_variance")


def _bioimageio_tiling(t_in: dict, t_out: dict) -> tuple[int, int]:
    step = DEFAULT_MULTIPLE
    axes = t_in.get("axes")
    if isinstance(axes, list):  # 0.5: per-axis size {min, step}
        steps = [a.get("size", {}).get("step") for a in axes if isinstance(a.get("size"), dict)]
        steps = [int(s) for s in steps if s]
        step = max(steps) if steps else step
    elif isinstance(t_in.get("shape"), dict):  # 0.4: shape {min: [...], step: [...]}
        steps = [int(s) for s in t_in["shape"].get("step", []) if s]
        step = max(steps) if steps else step
    halo = DEFAULT_HALO
    if isinstance(t_out.get("halo"), list):
        halo = max(int(h) for h in t_out["halo"])
    elif isinstance(t_out.get("axes"), list):
        halos = [int(a.get("halo", 0)) for a in t_out["axes"] if isinstance(a, dict)]
        halo = max(halos) if halos and max(halos) else halo
    return step, halo


def _check_test_tensors(model: Model, x: np.ndarray, expected: np.ndarray, sigmoid: bool) -> None:
    """Run the package's test input (with its pre-processing) and compare with its test output."""
    import onnxruntime as ort

    from ..preprocess import normalize

    sess = ort.InferenceSession(str(model.file("onnx")), providers=["CPUExecutionProvider"])
    xn = np.stack([normalize(b, model.spec.normalization) for b in x]).astype(np.float32)
    got = sess.run(None, {sess.get_inputs()[0].name: xn})[0]
    if got.shape != expected.shape:
        raise IncompatibleArtifactError(f"the test output has shape {expected.shape}, the model gives {got.shape}")
    tol = 1e-3 * max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(got - expected).max())
    if err > tol:
        raise IncompatibleArtifactError(
            f"the package's test tensors do not reproduce: max difference {err:.3g} (tolerance {tol:.3g})",
            hint="the weights or the pre-processing described in rdf.yaml do not match",
        )
    model.provenance["test_tensors"] = {"max_abs_error": err, "tolerance": tol}
    write_card(model.spec, model.files, model.card_path, provenance=model.provenance)

