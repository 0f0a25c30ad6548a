"""Models the user brings: ONNX, TorchScript, PyTorch state dicts, BioImage.IO packages.

:func:`import_model` turns any of them into an ordinary model folder (an
ONNX file, a state dict for built-in U-Nets, and a card) under the user's
model folder (``$SEGSTUDIO_HOME/models`` or ``~/.segstudio/models``), so the
rest of the app (backends, tiling, post-processing, optimization) uses it
unchanged; :func:`get_model` finds it by name afterwards.

Model files are untrusted.  No code from a model file runs in segstudio's
process:

* state dicts are read with ``torch.load(weights_only=True)``: a pickle that
  holds anything but tensors and plain containers is refused;
* TorchScript archives hold code (TorchScript is a programming language:
  an archive's ``__setstate__`` runs while it is loaded, its ``forward``
  when it is traced, and both can call operators that open, map and write
  files).  They are recognised from the archive's records before anything
  parses them and refused, unless the user opts in (``trust_code``,
  ``--trust-code``, the GUI's checkbox): then the archive is converted to
  ONNX in a confined child process (:mod:`.confine`) and only the ONNX file
  comes back;
* ONNX files are checked as data before ONNX Runtime sees them
  (:mod:`.onnx_check`: external data inside the model folder, no custom
  operators, bounded loops, at most 2 GiB of weights) and the import's trial
  run happens in a confined child under a memory and time limit;
* BioImage.IO packages: only ``onnx`` weights, or ``torchscript`` ones under
  the rule above, are used; ``pytorch_state_dict`` weights need Python code
  from the package, which is never run; YAML is read with ``safe_load`` and
  every field used is type-checked; test tensors are read with
  ``allow_pickle=False`` after their header is checked; a zip is checked
  from its central directory (entries, total size, compression ratio)
  before anything is extracted, extraction stops when an entry yields more
  than it declares, and a member whose path leaves the target folder
  (``../``, absolute paths, links) refuses the whole zip.

What a network's outputs mean is declared (``representation``): two
channels are foreground and distance (the built-in convention), one channel
is a foreground map (instances then come from its distance transform);
probabilities or logits (``output_kind``) are told apart from the test run.
A network that takes only some input sizes (fixed, or ``min + n * step``,
from its ONNX graph or its BioImage.IO description) gets exactly those
(:attr:`ModelSpec.input_min`), in the trial run and in the tiling.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import IncompatibleArtifactError, InputError, SegStudioError, naming
from .archives import (  # noqa: F401 - the zip limits and the refusal are also this module's API
    MAX_WEIGHTS_ZIP_BYTES,
    MAX_ZIP_BYTES,
    MAX_ZIP_ENTRIES,
    TRUST_HINT,
    ModelRefusedError,
    _zip_infolist,
    is_torchscript_archive,
    refuse_code,
    safe_extract,
    zip_members,
)
from .card import BUILTIN_DIR, Model, load_card, model_digest, write_card
from .confine import Limits, run_confined
from .spec import ModelSpec, Normalization, PostprocessParams, UNetConfig, file_sha256

RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
DEFAULT_MULTIPLE, DEFAULT_HALO = 16, 32

MAX_TEST_TENSOR_BYTES = 256 << 20
# Converting a TorchScript archive in its confined child, measured: the built-in U-Net traced at 64 x 64 peaks at
# 0.70 GB of address space (0.35 GB resident) in 4.4 s, the BioImage.IO U-Net at its 512 x 512 input at 0.94 GB
# (0.60 GB resident) in 3.0 s (torch alone reserves about 0.65 GB).
CONVERT_LIMITS = Limits(memory_bytes=4 << 30, cpu_seconds=600, wall_seconds=300.0, file_bytes=2 << 30,
                        open_files=512)

def user_models_dir() -> Path:
    """The folder of the user's imported and kept models.

    Returns
    -------
    pathlib.Path
        ``$SEGSTUDIO_HOME/models`` when that variable is set and not empty,
        else ``~/.segstudio/models``; not created here.
    """
    return Path(os.environ.get("SEGSTUDIO_HOME") or Path.home() / ".segstudio") / "models"


def user_models() -> list[Model]:
    """Every model imported into the user's model folder (unreadable ones are skipped).

    Returns
    -------
    list of Model
        The cards ``<user models>/*/*.json``, by path, loaded without
        verifying checksums; folders whose name starts with ``.`` (imports in
        progress, the cache of :func:`import_cached`) are left out.
    """
    out = []
    for card in sorted(user_models_dir().glob("*/*.json")):
        if card.parent.name.startswith("."):  # an import in progress (or one that was interrupted)
            continue
        try:
            out.append(load_card(card, verify=False))
        except IncompatibleArtifactError:
            continue
    return out


def import_cached(path: str | Path, *, trust_code: bool = False) -> Model:
    """A model file or package imported under ``<user models>/.imported/<content hash>`` (once per content).

    ``trust_code``: see :func:`import_model`.  A file imported once with it
    is reused as the ONNX it became.

    Parameters
    ----------
    path : str or pathlib.Path
        A model file, or a package folder (its key covers every file's
        relative path and SHA-256).
    trust_code : bool
        Passed to :func:`import_model`; not looked at when the content was
        imported before.

    Returns
    -------
    Model
        The earlier import (loaded with checksums verified), else a new one
        named after ``path``.

    Raises
    ------
    ModelRefusedError, OnnxRefusedError, ConfinedRunError, InputError, IncompatibleArtifactError
        As :func:`import_model`, for content not imported before.
    """
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
    return import_model(path, out_dir=folder, trust_code=trust_code)


def safe_name(name: str) -> str:
    """``name`` made fit for a folder and file name (letters, digits, '-', '_', '.').

    Parameters
    ----------
    name : str

    Returns
    -------
    str
        Each run of other characters replaced by ``-``, then leading and
        trailing ``-`` and ``.`` removed (no hidden or ``..`` names).

    Raises
    ------
    InputError
        Nothing is left.
    """
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")
    if not name:
        raise InputError("the model needs a name of letters, digits, '-', '_' or '.'")
    return name


# ------------------------------------------------------------------ zips


def detect_kind(path: Path) -> str:
    """``onnx``, ``torchscript``, ``state_dict`` or ``bioimageio`` from the file's contents.

    Nothing is parsed or loaded but a zip's central directory and, to spot
    TorchScript, its small pickles (:func:`is_torchscript_archive`).

    Parameters
    ----------
    path : pathlib.Path
        A model file, or a BioImage.IO package folder.

    Returns
    -------
    str
        ``"bioimageio"``: a folder with ``rdf.yaml`` / ``bioimageio.yaml``, or
        a zip holding one anywhere; ``"torchscript"``: another zip that is a
        TorchScript archive; ``"state_dict"``: another zip, a bare pickle
        stream (first byte ``0x80``) or a ``.pt`` / ``.pth`` file; ``"onnx"``: a
        ``.onnx`` file that is not a zip (not checked here).

    Raises
    ------
    InputError
        ``path`` is missing, unreadable, a folder without a description, or
        none of the above.
    ModelRefusedError
        A zip past :func:`zip_members`' limits (1 GiB extracted for a
        package, 2 GiB for weights; 10,000 entries; 200:1 compression).
    IncompatibleArtifactError
        A file starting with ``PK`` that is not a readable zip.
    """
    if path.is_dir():
        if any((path / n).is_file() for n in RDF_NAMES):
            return "bioimageio"
        raise InputError(f"{path} is a folder without rdf.yaml or bioimageio.yaml",
                         hint="give a model file (.onnx, .pt) or a BioImage.IO package")
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror})") from None
    if head[:2] == b"PK":  # a zip, whatever its name says (an ONNX file is never one)
        infos = _zip_infolist(path)
        if any(i.filename.split("/")[-1] in RDF_NAMES for i in infos):
            zip_members(path, infos=infos)  # a package's limits, checked again when it is extracted
            return "bioimageio"
        zip_members(path, max_bytes=MAX_WEIGHTS_ZIP_BYTES, infos=infos)
        if is_torchscript_archive(path, infos):
            return "torchscript"
        return "state_dict"
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if head[:1] == b"\x80":  # a bare (legacy) pickle stream
        return "state_dict"
    if path.suffix.lower() in (".pt", ".pth"):
        return "state_dict"
    raise InputError(f"{path.name}: not a model file segstudio knows",
                     hint="ONNX (.onnx), TorchScript or a PyTorch state dict (.pt), or a BioImage.IO package")


# ------------------------------------------------------------------ importing


@dataclass(frozen=True)
class ImportHints:
    """What the user says about an imported model that its file does not (each ``None``: found out or default).

    ``representation``: ``fg_dist`` or ``fg``, and ``output_kind``:
    ``logit`` or ``probability`` (default: what a trial run's outputs look
    like); ``diameter``: the nuclei size in pixels the model expects
    (enables rescaling); ``normalization``: its input normalization.
    """

    representation: str | None = None
    output_kind: str | None = None
    diameter: float | None = None
    normalization: Normalization | None = None


def import_model(
    path: str | Path, *, name: str | None = None, out_dir: str | Path | None = None,
    hints: ImportHints = ImportHints(), overwrite: bool = False, trust_code: bool = False,
) -> Model:
    """Import a user's model file or package; returns the new model (its card written under ``out_dir``).

    ``out_dir`` defaults to ``<user models>/<name>``; ``hints``: what the
    file does not say (:class:`ImportHints`).
    ``trust_code``: convert a TorchScript archive (or a BioImage.IO
    package's ``torchscript`` weights) to ONNX in a confined child process
    instead of refusing it.  With ``overwrite`` an existing model of that
    name is replaced only once the new one has imported.  The import is
    built in a temporary folder next to ``out_dir``, removed on failure.

    Parameters
    ----------
    path : str or pathlib.Path
        An ONNX file, a TorchScript archive, a state dict of segstudio's
        U-Net (``.pt``; or a training checkpoint's ``"model"`` entry), or a
        BioImage.IO package (zip or folder); the kind is read off the
        contents (:func:`detect_kind`).
    name : str, optional
        Made safe (:func:`safe_name`); default: the file's stem or the
        folder's name, without ``.bioimageio``.
    out_dir : str or pathlib.Path, optional
        Must be missing or empty, unless ``overwrite``.
    hints : ImportHints
    overwrite : bool
    trust_code : bool

    Returns
    -------
    Model
        Loaded from ``out_dir / "<name>.json"`` (verified), with the ONNX
        file, the ``.pt`` of a state dict, and the provenance (source,
        kind, SHA-256, conversion, test-tensor report).

    Raises
    ------
    ModelRefusedError
        TorchScript without ``trust_code``; a pickle holding more than
        tensors; a package with only ``pytorch_state_dict`` weights; a zip
        past its limits or with entries that leave its folder.
    OnnxRefusedError
        An ONNX file :func:`~segstudio.core.models.onnx_check.check_onnx_file`
        refuses.
    ConfinedRunError
        The confined trial run (under ``TRIAL_LIMITS`` plus twice the
        weights) or TorchScript conversion (``CONVERT_LIMITS``) failed.
    InputError
        ``name`` taken (without ``overwrite``), a path that is missing or of
        no known kind, an unknown representation or output kind.
    IncompatibleArtifactError
        A network segstudio cannot run (not one ``(B, C, H, W)`` input, a
        fixed batch above 1, outputs not ``(1, K, H, W)`` at the input's
        size), a description it cannot use, or test tensors that do not
        reproduce.  A package's errors name the package.
    """
    path = Path(path)
    kind = detect_kind(path)
    if kind == "torchscript" and not trust_code:
        raise refuse_code(path)
    name = safe_name(name or (path.name if path.is_dir() else path.stem).replace(".bioimageio", ""))
    out_dir = Path(out_dir) if out_dir is not None else user_models_dir() / name
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(f"a model named {name!r} already exists ({out_dir})", hint="pick another name")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.importing-", dir=out_dir.parent))
    try:
        spec, files, extra = _import_files(path, kind, name, work, trust_code)
        test_report = _fill_from_onnx(spec, files["onnx"],
                                      representation=hints.representation or extra.get("representation"),
                                      output_kind=hints.output_kind or extra.get("output_kind"), test=extra.get("test"))
        if hints.normalization is not None:
            spec.normalization = hints.normalization
        if hints.diameter:
            spec.diameter = float(hints.diameter)
        provenance = {"imported_from": str(path), "kind": kind,
                      "source_sha256": file_sha256(path) if path.is_file() else None, **extra.get("provenance", {})}
        if test_report is not None:
            provenance["test_tensors"] = test_report
        write_card(spec, files, work / f"{name}.json", provenance=provenance)
        _move_into_place(work, out_dir)
        return load_card(out_dir / f"{name}.json")
    except SegStudioError as e:
        # a package's errors name the file inside it (rdf.yaml, weights.pt): say which package too
        raise naming(e, path) if kind == "bioimageio" else e from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _import_files(path: Path, kind: str, name: str, work: Path, trust_code: bool) -> tuple[ModelSpec, dict, dict]:
    """The spec, the files written into ``work`` and what the import learnt (``extra``) for one kind of file."""
    if kind == "bioimageio":
        return _import_bioimageio(path, name, work, trust_code=trust_code)
    extra: dict = {}
    config = None
    if kind == "onnx":
        files = {"onnx": copy_onnx(path, work / f"{name}.onnx")}
    elif kind == "torchscript":
        onnx_path, extra["provenance"] = _torchscript_to_onnx(path, work / f"{name}.onnx")
        files = {"onnx": onnx_path}
    else:
        files, config = _import_state_dict(path, work, name)
    spec = ModelSpec(name=name, version="user", title=f"{name} (imported {kind})",
                     description=f"imported from {path.name}", architecture="unet" if config else "onnx")
    if config is not None:
        spec.config = config
    return spec, files, extra


def _move_into_place(work: Path, out_dir: Path) -> None:
    """Make ``work`` the model folder ``out_dir``, replacing an old one only now that the new one is complete."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.replaced-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
    work.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------ formats


def _import_state_dict(path: Path, out_dir: Path, name: str):
    """A state dict of a built-in U-Net: its configuration is read off the tensor shapes."""
    import pickle

    import torch

    from .onnx_export import export_onnx
    from .unet import build_unet

    with open(path, "rb") as f:
        zipped = f.read(2) == b"PK"
    if zipped:  # sizes checked before torch reads it; detect_kind already ruled out TorchScript
        zip_members(path, max_bytes=MAX_WEIGHTS_ZIP_BYTES)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelRefusedError(
            f"refused {path.name}: it holds Python objects, not only tensors, and unpickling them could run code "
            f"({str(e).splitlines()[0][:200]})",
            hint="save the weights with torch.save(model.state_dict(), path), or export ONNX",
        ) from None
    except Exception as e:  # noqa: BLE001 - torch's readers fail on garbage with any exception (IndexError too)
        raise IncompatibleArtifactError(f"{path.name}: not a readable PyTorch file ({_first_line(e)})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a training checkpoint
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
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
    """The :class:`UNetConfig` whose network has these tensors (depth, widths, channels, separable).

    Parameters
    ----------
    state : dict of str to torch.Tensor
        A state dict of segstudio's :class:`~segstudio.core.models.unet.UNet`
        (``encoders.<k>...``, ``head.weight``...).

    Returns
    -------
    UNetConfig
        Channels in and out, depth (encoder levels - 1), width (the head's
        input channels), separable, and ``max_width``: for a dense network
        whose widths are capped, the deepest encoder's, else 256.  Pruned
        (per-layer) widths are not recovered.

    Raises
    ------
    IncompatibleArtifactError
        No encoder or head tensors.
    """
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


def copy_onnx(src: Path, dst: Path) -> Path:
    """Copy an ONNX file (checked first, :func:`check_onnx_file`) and its external data files to ``dst``.

    Parameters
    ----------
    src : pathlib.Path
        The ONNX file.
    dst : pathlib.Path
        The copy, in an existing folder; external data files go next to it
        at their paths relative to ``src``'s folder.

    Returns
    -------
    pathlib.Path
        ``dst``.

    Raises
    ------
    OnnxRefusedError, IncompatibleArtifactError
        As :func:`~segstudio.core.models.onnx_check.check_onnx_file`.
    """
    from .onnx_check import check_onnx_file

    summary = check_onnx_file(src)
    shutil.copyfile(src, dst)
    base = src.parent.resolve()
    for ext in summary.external_files:
        target = dst.parent / ext.relative_to(base)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ext, target)
    return dst


def _torchscript_to_onnx(path: Path, onnx_path: Path, shape: tuple[int, ...] | None = None) -> tuple[Path, dict]:
    """Convert a TorchScript archive to ``onnx_path`` in a confined child (:mod:`.confine`).

    Its code runs there only; what comes back is one ONNX file, which the
    import then checks like any other.  ``shape``: the example input the
    conversion traces (default ``(1, channels, 64, 64)``).
    """
    with tempfile.TemporaryDirectory(prefix="segstudio-convert-") as tmp:
        result = run_confined("segstudio.core.models.user:convert_torchscript", inputs={"model.pt": path},
                              args={"shape": list(shape) if shape else None}, outputs=("model.onnx",), dest=tmp,
                              limits=CONVERT_LIMITS, label=path.name)
        shutil.move(result.files["model.onnx"], onnx_path)
    info = {"converted": {"from": "torchscript", "in": "a confined child process", "sandbox": result.method,
                          "applied": result.applied, "seconds": round(result.seconds, 2),
                          "peak_bytes": result.memory}}
    return onnx_path, info


def convert_torchscript(inputs: dict[str, Path], out: Path, *, shape: list[int] | None = None) -> dict:
    """TorchScript archive ``inputs["model.pt"]`` -> ``out / "model.onnx"``.  Runs in a confined child only.

    Loading the archive runs its code; the export traces it (opset 17,
    dynamic batch, height and width, lowest IR version).

    Parameters
    ----------
    inputs : dict of str to pathlib.Path
        ``"model.pt"``: the archive's read-only copy.
    out : pathlib.Path
        The child's output folder.
    shape : list of int, optional
        The example input traced; default ``(1, C, 64, 64)``, C the input
        channels of the module's first 4-D parameter (1 without one).

    Returns
    -------
    dict
        ``{"channels": C, "torch": torch.__version__}``.

    Raises
    ------
    IncompatibleArtifactError
        The archive does not load, or does not export to ONNX.
    """
    import torch

    from .onnx_export import finalize_onnx

    torch.set_num_threads(1)  # the confined child's own process: nothing else runs in it
    try:
        module = torch.jit.load(str(inputs["model.pt"]), map_location="cpu").eval()
    except Exception as e:  # noqa: BLE001 - whatever the archive does, it is the archive's failure
        raise IncompatibleArtifactError(f"not a loadable TorchScript archive ({_first_line(e)})") from None
    example = torch.zeros(*(shape or (1, _guess_channels(module), 64, 64)))
    tmp = out / "export.onnx"
    dyn = {0: "batch", 2: "height", 3: "width"}
    try:
        torch.onnx.export(module, (example,), str(tmp), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": dyn, "output": dyn})
        finalize_onnx(tmp, out / "model.onnx")
    except Exception as e:  # noqa: BLE001 - any exporter failure is the model's
        raise IncompatibleArtifactError(f"TorchScript could not be converted to ONNX ({_first_line(e)})") from None
    return {"channels": int(example.shape[1]), "torch": torch.__version__}


def _guess_channels(module) -> int:
    """Input channels of a TorchScript module: those of its first 4-D convolution weight."""
    for _, p in module.named_parameters():
        if p.ndim == 4:
            return int(p.shape[1])
    return 1


def _first_line(e: BaseException) -> str:
    """An exception's message on one line: its first line, and its cause when the last line states one
    (TorchScript's interpreter errors say where they failed first and why last)."""
    lines = [" ".join(line.split()) for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    text = lines[0]
    if len(lines) > 1 and re.match(r"^[A-Za-z_.]*(Error|Exception): ", lines[-1]):
        text = f"{text.rstrip('.')}: {lines[-1]}"
    return text[:300]


def _fill_from_onnx(spec: ModelSpec, onnx_path: Path, *, representation: str | None, output_kind: str | None,
                    test: tuple | None = None) -> dict | None:
    """Input channels and sizes, outputs and their meaning from the ONNX graph and a confined trial run.

    ``test``: a BioImage.IO package's ``(input, expected output, sigmoid,
    tolerance)``; the input is run in the same child and the reproduction
    is checked (:func:`check_reproduction`).  Returns its report.
    """
    from .onnx_check import TRIAL_LIMITS, check_onnx_file

    summary = check_onnx_file(onnx_path)
    dims = summary.input_dims()
    if len(summary.inputs) != 1 or len(dims) != 4:
        raise IncompatibleArtifactError(
            f"{onnx_path.name}: segstudio runs networks with one (batch, channel, height, width) input; "
            f"this one has {len(summary.inputs)} input(s) of shape {[list(i[1]) for i in summary.inputs]}")
    b, c, h, w = dims
    if b is not None and b > 1:
        raise IncompatibleArtifactError(f"{onnx_path.name}: its batch size is fixed at {b}; segstudio runs "
                                        "networks whose batch is free or 1")
    if b == 1:
        spec.max_batch = 1
    spec.input_channels = c if c is not None else spec.input_channels
    c = spec.input_channels
    if spec.architecture != "unet":
        spec.multiple_px = spec.multiple_px or DEFAULT_MULTIPLE
        spec.halo_px = spec.halo_px if spec.halo_px is not None else DEFAULT_HALO
    _input_sizes_from_graph(spec, (h, w), onnx_path.name)
    m = spec.multiple
    shape = spec.input_size((4 * m, 4 * m)) or (4 * m, 4 * m)
    halo = spec.halo
    if spec.fixed_input is not None and min(shape) - 2 * halo < 1:
        raise IncompatibleArtifactError(f"{onnx_path.name}: its input of {shape[0]}x{shape[1]} leaves nothing "
                                        f"inside a tile halo of {halo} px")
    trial = np.random.default_rng(0).random((1, c, *shape), dtype=np.float32)
    # room for the weights, which ONNX Runtime holds (up to 2 GiB, see onnx_check), on top of the trial's own
    limits = replace(TRIAL_LIMITS, memory_bytes=TRIAL_LIMITS.memory_bytes + 2 * summary.weight_bytes)
    out, test_out = _trial(onnx_path, summary, trial, None if test is None else test[0], limits)
    if out.ndim != 4 or out.shape[0] != 1 or out.shape[2:] != trial.shape[2:]:
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
    if test is None:
        return None
    _, expected, sigmoid, tolerance = test
    return check_reproduction(test_out, expected, sigmoid=sigmoid, **tolerance)


def _input_sizes_from_graph(spec: ModelSpec, hw: tuple, name: str) -> None:
    """Merge the ONNX graph's fixed height / width into the sizes the description declares (if any)."""
    if all(d is None for d in hw):
        return
    m = spec.multiple
    lo = list(spec.input_min or (m, m))
    step = list(spec.input_step or (m, m))
    for axis, d in enumerate(hw):
        if d is None:
            continue
        declared_ok = step[axis] == 0 and lo[axis] == d or step[axis] > 0 and d >= lo[axis] and (d - lo[axis]) % step[axis] == 0
        if spec.input_min is not None and not declared_ok:
            raise IncompatibleArtifactError(
                f"{name}: the graph's input is fixed at {d} px along {'yx'[axis]}, which its description does not allow "
                f"({lo[axis]}" + (f" + n * {step[axis]}" if step[axis] else "") + ")")
        lo[axis], step[axis] = d, 0
    spec.input_min, spec.input_step = (lo[0], lo[1]), (step[0], step[1])


def _trial(onnx_path: Path, summary, trial: np.ndarray, test_in: np.ndarray | None, limits: Limits):
    """Run ``trial`` (and ``test_in``) through the network in a confined child; their outputs."""
    base = onnx_path.parent.resolve()
    inputs = {"model.onnx": onnx_path, **{str(p.relative_to(base)): p for p in summary.external_files}}
    feeds = ["trial.npy"] + (["test.npy"] if test_in is not None else [])
    with tempfile.TemporaryDirectory(prefix="segstudio-trial-") as tmp:
        np.save(Path(tmp) / "trial.npy", trial)
        inputs["trial.npy"] = Path(tmp) / "trial.npy"
        if test_in is not None:
            np.save(Path(tmp) / "test.npy", test_in.astype(np.float32))
            inputs["test.npy"] = Path(tmp) / "test.npy"
        result = run_confined("segstudio.core.models.onnx_check:trial_run", inputs=inputs,
                              args={"model": "model.onnx", "feeds": feeds}, outputs=tuple(f"out_{f}" for f in feeds),
                              dest=Path(tmp) / "back", limits=limits, label=onnx_path.name)
        outs = [load_npy(result.files[f"out_{f}"], f"{onnx_path.name}: the trial run's output") for f in feeds]
    return outs[0], (outs[1] if test_in is not None else None)


def load_npy(path: Path, what: str, max_bytes: int = MAX_TEST_TENSOR_BYTES) -> np.ndarray:
    """A ``.npy`` file of numbers, its header checked before its data is read (no pickles, bounded size).

    Parameters
    ----------
    path : pathlib.Path
        The ``.npy`` file (format 1.0, 2.0 or 3.0).
    what : str
        What the array is, for the messages.
    max_bytes : int
        The most data the header may declare, in bytes (default
        :data:`MAX_TEST_TENSOR_BYTES`, 256 MiB).

    Returns
    -------
    numpy.ndarray
        Of a boolean, integer or floating dtype, loaded with
        ``allow_pickle=False``.

    Raises
    ------
    IncompatibleArtifactError
        An unreadable file, another format version or a bad header; any
        other dtype (an object dtype is a pickle); declared data above
        ``max_bytes`` or beyond the file's end.
    """
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unknown .npy version {version}")
            data_start = f.tell()
        size = path.stat().st_size
    except (OSError, ValueError, SyntaxError) as e:
        raise IncompatibleArtifactError(f"{what} ({path.name}) is not a readable .npy array ({_first_line(e)})") from None
    if dtype.hasobject or dtype.kind not in "biuf":
        raise IncompatibleArtifactError(f"{what} ({path.name}) holds {dtype} values, not numbers"
                                        + (" (a pickle, which segstudio never loads)" if dtype.hasobject else ""))
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_bytes or nbytes > size - data_start:
        raise IncompatibleArtifactError(f"{what} ({path.name}) declares {nbytes} bytes of data; the file holds "
                                        f"{size - data_start} (at most {max_bytes} are read)")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise IncompatibleArtifactError(f"{what} ({path.name}) is not a readable .npy array ({_first_line(e)})") from None


def check_reproduction(got: np.ndarray, expected: np.ndarray, *, sigmoid: bool, relative: float, absolute: float,
                       mismatched_ppm: float) -> dict:
    """Compare a test output with the package's, as ``bioimageio.core``'s model test does.

    An element mismatches when ``|got - expected| > absolute + relative *
    |expected|``; the test passes when at most ``mismatched_ppm`` elements per
    million do.  ``sigmoid``: the package's output is after a sigmoid, the
    network's before.

    Parameters
    ----------
    got : numpy.ndarray
        The network's output on the test input.
    expected : numpy.ndarray
        The package's test output, of the same shape.
    sigmoid : bool
        Apply a sigmoid to ``got`` first.
    relative, absolute : float
        The tolerances of the formula above.
    mismatched_ppm : float
        Mismatching elements allowed per million.

    Returns
    -------
    dict
        ``max_abs_error``, ``max_rel_error`` (against ``|expected| + 1e-6``),
        ``mismatched``, ``mismatched_ppm``, ``elements`` and the ``tolerance``.

    Raises
    ------
    IncompatibleArtifactError
        The shapes differ, or more than ``mismatched_ppm`` elements per
        million mismatch.
    """
    if sigmoid:
        got = 1.0 / (1.0 + np.exp(-got.astype(np.float64)))
    if got.shape != expected.shape:
        raise IncompatibleArtifactError(f"the test output has shape {expected.shape}, the model gives {got.shape}")
    got, expected = got.astype(np.float64), expected.astype(np.float64)
    diff = np.abs(got - expected)
    mismatched = int((diff > absolute + relative * np.abs(expected)).sum())
    ppm = mismatched / max(expected.size, 1) * 1e6
    report = {"max_abs_error": float(diff.max()) if diff.size else 0.0,
              "max_rel_error": float((diff / (np.abs(expected) + 1e-6)).max()) if diff.size else 0.0,
              "mismatched": mismatched, "mismatched_ppm": round(ppm, 3), "elements": int(expected.size),
              "tolerance": {"relative": relative, "absolute": absolute, "mismatched_ppm": mismatched_ppm}}
    if ppm > mismatched_ppm:
        raise IncompatibleArtifactError(
            f"the package's test tensors do not reproduce: {mismatched} of {expected.size} values differ by more "
            f"than {absolute:g} + {relative:g} x |expected| ({ppm:.1f} per million, {mismatched_ppm:g} allowed; "
            f"max difference {report['max_abs_error']:.3g})",
            hint="the weights or the pre-processing described in the package do not match",
        )
    return report


# ------------------------------------------------------------------ BioImage.IO


class _Doc:
    """Typed reads of a BioImage.IO description: a wrong type is an error naming the file and the field."""

    def __init__(self, name: str):
        self.name = name

    def fail(self, where: str, what: str):
        raise IncompatibleArtifactError(f"{self.name}: {where} {what}")

    def _bad(self, where: str, want: str, value):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        self.fail(where, f"must be {want}, not {shown}")

    def mapping(self, value, where: str, default=None) -> dict:
        if value is None and default is not None:
            return default
        if not isinstance(value, dict):
            self._bad(where, "a mapping (key: value)", value)
        return value

    def seq(self, value, where: str, default=None) -> list:
        if value is None and default is not None:
            return default
        if not isinstance(value, list):
            self._bad(where, "a list", value)
        return value

    def text(self, value, where: str, default: str | None = None) -> str:
        if value is None and default is not None:
            return default
        if not isinstance(value, str):
            self._bad(where, "text", value)
        return value

    def integer(self, value, where: str, minimum: int | None = None) -> int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
            self._bad(where, "a whole number" + (f" >= {minimum}" if minimum is not None else ""), value)
        return value

    def number(self, value, where: str, low: float | None = None, high: float | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self._bad(where, "a number", value)
        if (low is not None and value < low) or (high is not None and value > high):
            self._bad(where, f"a number from {low} to {high}", value)
        return float(value)

    def scalar_text(self, value) -> str:
        return str(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else ""


def _axes(doc: _Doc, t: dict, where: str) -> list[dict]:
    """Each axis of a tensor description as ``{"id", "size", "halo"}``; ``size`` is ``("fixed", n)``,
    ``("step", min, step)``, ``("ref", tensor, axis, offset)`` or None."""
    axes = t.get("axes")
    if isinstance(axes, str):  # 0.4: letters, sizes in "shape", halo in "halo"
        letters = axes.lower()
        shape = t.get("shape")
        sizes: list = [None] * len(letters)
        if isinstance(shape, list):
            sizes = [("fixed", doc.integer(v, f"{where}.shape[{i}]", 1)) for i, v in enumerate(shape)]
        elif isinstance(shape, dict) and "min" in shape:
            lo = doc.seq(shape.get("min"), f"{where}.shape.min")
            st = doc.seq(shape.get("step"), f"{where}.shape.step")
            if len(lo) != len(letters) or len(st) != len(letters):
                doc.fail(f"{where}.shape", f"must give min and step for each of the axes {letters!r}")
            sizes = []
            for i, (a, b) in enumerate(zip(lo, st)):
                a, b = doc.integer(a, f"{where}.shape.min[{i}]", 1), doc.integer(b, f"{where}.shape.step[{i}]", 0)
                sizes.append(("fixed", a) if b == 0 else ("step", a, b))
        elif isinstance(shape, dict) and "reference_tensor" in shape:
            ref = doc.text(shape.get("reference_tensor"), f"{where}.shape.reference_tensor")
            scale = doc.seq(shape.get("scale"), f"{where}.shape.scale", [1.0] * len(letters))
            offset = doc.seq(shape.get("offset"), f"{where}.shape.offset", [0.0] * len(letters))
            if len(scale) != len(letters) or len(offset) != len(letters):
                doc.fail(f"{where}.shape", f"must give a scale and an offset for each of the axes {letters!r}")
            sizes = []
            for i, (s, o) in enumerate(zip(scale, offset)):
                s, o = doc.number(s, f"{where}.shape.scale[{i}]"), doc.number(o, f"{where}.shape.offset[{i}]")
                sizes.append(("ref", ref, letters[i], o) if s == 1.0 else ("scaled", s, o))
        elif shape is not None:
            doc._bad(f"{where}.shape", "a list of sizes or a mapping", shape)
        if len(sizes) != len(letters):
            doc.fail(f"{where}.shape", f"has {len(sizes)} sizes for the axes {letters!r}")
        halo = t.get("halo")
        halos = [0] * len(letters)
        if halo is not None:
            halo = doc.seq(halo, f"{where}.halo")
            if len(halo) != len(letters):
                doc.fail(f"{where}.halo", f"has {len(halo)} values for the axes {letters!r}")
            halos = [doc.integer(v, f"{where}.halo[{i}]", 0) for i, v in enumerate(halo)]
        return [{"id": a, "size": s, "halo": h} for a, s, h in zip(letters, sizes, halos)]
    out = []
    for i, a in enumerate(doc.seq(axes, f"{where}.axes")):
        w = f"{where}.axes[{i}]"
        a = doc.mapping(a, w)
        typ = doc.text(a.get("type"), f"{w}.type")
        letter = {"batch": "b", "channel": "c", "index": "i", "time": "t"}.get(typ)
        if letter is None:
            if typ != "space":
                doc._bad(f"{w}.type", "batch, channel, index, time or space", typ)
            letter = doc.text(a.get("id"), f"{w}.id", "x").lower()  # the specification's default id is "x"
        size = a.get("size")
        if typ == "channel":
            names = doc.seq(a.get("channel_names"), f"{w}.channel_names", [])
            size = ("fixed", len(names)) if names else None
        elif size is None:
            size = None
        elif isinstance(size, dict) and "min" in size:
            lo = doc.integer(size.get("min"), f"{w}.size.min", 1)
            st = doc.integer(size.get("step"), f"{w}.size.step", 1)
            size = ("step", lo, st)
        elif isinstance(size, dict):
            size = ("ref", doc.text(size.get("tensor_id"), f"{w}.size.tensor_id"),
                    doc.text(size.get("axis_id"), f"{w}.size.axis_id").lower(),
                    doc.integer(size.get("offset", 0), f"{w}.size.offset"))
        else:
            size = ("fixed", doc.integer(size, f"{w}.size", 1))
        halo = doc.integer(a.get("halo", 0), f"{w}.halo", 0)
        out.append({"id": letter, "size": size, "halo": halo})
    return out


def _op_name(doc: _Doc, op, where: str) -> tuple[str, dict]:
    op = doc.mapping(op, where)
    name = doc.text(op.get("id", op.get("name")), f"{where}.id")
    return name, doc.mapping(op.get("kwargs"), f"{where}.kwargs", {})


def _import_bioimageio(path: Path, name: str, out_dir: Path, *, trust_code: bool):
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
        doc = _Doc(rdf_path.name)
        try:
            raw = yaml.safe_load(rdf_path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise IncompatibleArtifactError(f"{rdf_path.name}: not valid YAML ({_first_line(e)})") from None
        if not isinstance(raw, dict) or doc.scalar_text(raw.get("type", "model")) != "model":
            raise IncompatibleArtifactError(f"{rdf_path.name}: not a BioImage.IO model description")
        rdf = raw
        inputs = doc.seq(rdf.get("inputs"), "inputs", [])
        outputs = doc.seq(rdf.get("outputs"), "outputs", [])
        if len(inputs) != 1 or len(outputs) < 1:
            raise IncompatibleArtifactError(f"{rdf_path.name}: segstudio runs BioImage.IO models with one input "
                                            f"tensor (this one has {len(inputs)} input(s), {len(outputs)} output(s))")
        t_in, t_out = doc.mapping(inputs[0], "inputs[0]"), doc.mapping(outputs[0], "outputs[0]")
        ax_in, ax_out = _axes(doc, t_in, "inputs[0]"), _axes(doc, t_out, "outputs[0]")
        in_axes, out_axes = "".join(a["id"] for a in ax_in), "".join(a["id"] for a in ax_out)
        if in_axes.replace("b", "") not in ("cyx", "yx") or out_axes.replace("b", "") not in ("cyx", "yx"):
            raise IncompatibleArtifactError(
                f"{rdf_path.name}: axes {in_axes!r} -> {out_axes!r}: segstudio runs 2-D models (b, c, y, x)")
        weights = doc.mapping(rdf.get("weights"), "weights", {})
        fmt = "onnx" if "onnx" in weights else "torchscript" if "torchscript" in weights else None
        if fmt is None:
            raise ModelRefusedError(
                f"{rdf_path.name}: the package offers only {', '.join(map(str, weights)) or 'no'} weights; segstudio "
                "takes onnx or torchscript weights (pytorch_state_dict weights need Python code from the package, "
                "which segstudio never runs)")
        entry = doc.mapping(weights[fmt], f"weights.{fmt}")
        source = _resolve_in(pkg, doc.text(entry.get("source"), f"weights.{fmt}.source"), rdf_path.name)
        spec = ModelSpec(name=name, version=doc.scalar_text(rdf.get("version")) or "user",
                         title=doc.scalar_text(rdf.get("name")) or name,
                         description=doc.scalar_text(rdf.get("description")), architecture="onnx",
                         normalization=_bioimageio_normalization(doc, t_in, ax_in),
                         license=doc.scalar_text(rdf.get("license")))
        post = _bioimageio_postprocessing(doc, t_out)
        spec.multiple_px, spec.halo_px = _bioimageio_tiling(ax_in, ax_out)
        _bioimageio_sizes(doc, spec, ax_in, ax_out, t_in)
        onnx_path = out_dir / f"{name}.onnx"
        provenance: dict = {}
        if fmt == "onnx":
            copy_onnx(source, onnx_path)
        else:
            if not trust_code:
                raise refuse_code(source, f"the package's only weights, a TorchScript archive ({source.name})")
            shape = (1, spec.input_channels, *(spec.input_size((64, 64)) or (64, 64)))
            _, provenance = _torchscript_to_onnx(source, onnx_path, shape=shape)
        test = None
        tin = _test_source(doc, t_in, rdf, "inputs", "test_inputs")
        tout = _test_source(doc, t_out, rdf, "outputs", "test_outputs")
        if tin and tout:
            x = load_npy(_resolve_in(pkg, tin, rdf_path.name), f"{rdf_path.name}: the test input")
            y = load_npy(_resolve_in(pkg, tout, rdf_path.name), f"{rdf_path.name}: the test output")
            x, y = _as_bcyx(doc, x, in_axes, "test input"), _as_bcyx(doc, y, out_axes, "test output")
            xn = _normalize_test_input(x, spec.normalization)
            tol = _tolerance(doc, rdf, fmt, doc.scalar_text(t_out.get("id", t_out.get("name"))))
            test = (xn, y, "sigmoid" in post, tol)
        cite = {"rdf": rdf_path.name, "format_version": doc.scalar_text(rdf.get("format_version")), "weights": fmt,
                "authors": [a.get("name") for a in rdf.get("authors") or [] if isinstance(a, dict)]}
        # a sigmoid in the package's post-processing: the network gives logits, which segstudio turns into
        # probabilities itself
        extra = {"provenance": {"bioimageio": cite, **provenance}, "test": test,
                 "output_kind": "logit" if "sigmoid" in post else None}
        return spec, {"onnx": onnx_path}, extra


def _test_source(doc: _Doc, t: dict, rdf: dict, side: str, legacy: str) -> str | None:
    if t.get("test_tensor") is not None:  # 0.5
        return doc.text(doc.mapping(t["test_tensor"], f"{side}[0].test_tensor").get("source"),
                        f"{side}[0].test_tensor.source")
    files = doc.seq(rdf.get(legacy), legacy, [])
    return doc.text(files[0], f"{legacy}[0]") if files else None


def _resolve_in(pkg: Path, rel: str, rdf_name: str = "the description") -> Path:
    p = (pkg / str(rel)).resolve()
    if pkg.resolve() not in p.parents or not p.is_file():
        raise IncompatibleArtifactError(f"{rdf_name}: the package names a file it does not hold: {rel!r}")
    return p


def _as_bcyx(doc: _Doc, a: np.ndarray, axes: str, what: str) -> np.ndarray:
    if a.ndim != len(axes):
        doc.fail(f"the {what}", f"has {a.ndim} dimensions for the axes {axes!r}")
    if "b" not in axes:
        a, axes = a[None], "b" + axes
    if "c" not in axes:
        a = a[:, None]
    return a.astype(np.float32)


def _normalize_test_input(x: np.ndarray, norm: Normalization) -> np.ndarray:
    from ..segment.preprocess import normalize

    return np.stack([normalize(b, norm) for b in x]).astype(np.float32)


def _norm_axes(doc: _Doc, kw: dict, where: str, channels: int) -> None:
    """BioImage.IO normalizes jointly over ``axes``; segstudio normalizes each channel over y and x (per image)."""
    axes = kw.get("axes")
    if axes is None:
        names = {"c"}  # 0.5: all axes jointly, channels included
    elif isinstance(axes, str):
        names = set(axes.lower())
    else:
        names = {doc.text(v, f"{where}.kwargs.axes[{i}]").lower() for i, v in enumerate(doc.seq(axes, f"{where}.kwargs.axes"))}
    names = {"c" if n == "channel" else "b" if n == "batch" else n for n in names}
    if not names <= {"b", "c", "y", "x"}:
        doc.fail(f"{where}.kwargs.axes", f"names axes {sorted(names)} this 2-D model does not have")
    if "c" in names and channels > 1:
        doc.fail(f"{where}.kwargs.axes", "normalizes across channels; segstudio normalizes each channel on its own")


def _bioimageio_normalization(doc: _Doc, t_in: dict, ax_in: list[dict]) -> Normalization:
    ops = doc.seq(t_in.get("preprocessing"), "inputs[0].preprocessing", [])
    channels = next((a["size"][1] for a in ax_in if a["id"] == "c" and a["size"] and a["size"][0] == "fixed"), 1)
    norm = None
    for i, op in enumerate(ops):
        where = f"inputs[0].preprocessing[{i}]"
        name, kw = _op_name(doc, op, where)
        if name == "ensure_dtype":
            dtype = doc.text(kw.get("dtype"), f"{where}.kwargs.dtype")
            if dtype not in ("float32", "float64"):
                doc.fail(f"{where}", f"casts to {dtype}; segstudio feeds networks float32")
            continue  # segstudio's normalization gives float32
        if norm is not None:
            doc.fail(where, f"is a second normalization ({name}); segstudio applies one")
        mode = doc.text(kw.get("mode", "per_sample"), f"{where}.kwargs.mode")
        if mode not in ("per_sample", "per_dataset"):
            doc.fail(f"{where}.kwargs.mode", f"is {mode!r}; segstudio computes the statistics of each image "
                     "(per_sample)")
        eps = doc.number(kw.get("eps", 1e-6), f"{where}.kwargs.eps", 0.0, 0.1)
        _norm_axes(doc, kw, where, channels)
        if name == "scale_range":
            if kw.get("reference_tensor") not in (None, t_in.get("id", t_in.get("name"))):
                doc.fail(f"{where}.kwargs.reference_tensor", "names another tensor")
            low = doc.number(kw.get("min_percentile", 0.0), f"{where}.kwargs.min_percentile", 0.0, 100.0)
            high = doc.number(kw.get("max_percentile", 100.0), f"{where}.kwargs.max_percentile", 0.0, 100.0)
            if low >= high:
                doc.fail(f"{where}.kwargs", f"has min_percentile {low} >= max_percentile {high}")
            norm = Normalization(low=low, high=high, eps=eps)
        elif name == "zero_mean_unit_variance":
            norm = Normalization(mode="meanstd", eps=eps)
        else:
            raise IncompatibleArtifactError(
                f"{doc.name}: input pre-processing {name!r} is not supported",
                hint="scale_range or zero_mean_unit_variance (and ensure_dtype float32)")
    return norm or Normalization(mode="none")


def _bioimageio_postprocessing(doc: _Doc, t_out: dict) -> list[str]:
    names = []
    for i, op in enumerate(doc.seq(t_out.get("postprocessing"), "outputs[0].postprocessing", [])):
        where = f"outputs[0].postprocessing[{i}]"
        name, kw = _op_name(doc, op, where)
        if name == "ensure_dtype":
            doc.text(kw.get("dtype"), f"{where}.kwargs.dtype")
            continue
        if name != "sigmoid":
            raise IncompatibleArtifactError(f"{doc.name}: output post-processing {name!r} is not supported "
                                            "(only sigmoid and ensure_dtype)")
        names.append(name)
    return names


def _bioimageio_tiling(ax_in: list[dict], ax_out: list[dict]) -> tuple[int, int]:
    """The input size step (the tiles' multiple) and the output halo."""
    steps = [a["size"][2] for a in ax_in if a["id"] in "yx" and a["size"] and a["size"][0] == "step"]
    step = max(steps) if steps else DEFAULT_MULTIPLE
    halos = [a["halo"] for a in ax_out if a["id"] in "yx"]
    halo = max(halos) if halos and max(halos) else DEFAULT_HALO
    return step, halo


def _bioimageio_sizes(doc: _Doc, spec: ModelSpec, ax_in: list[dict], ax_out: list[dict], t_in: dict) -> None:
    """Channels, batch and the input sizes the network takes, from the input axes; outputs match the input."""
    in_id = doc.scalar_text(t_in.get("id", t_in.get("name")))
    by_id = {a["id"]: a for a in ax_in}
    c = by_id.get("c", {}).get("size")
    if c and c[0] == "fixed":
        spec.input_channels = c[1]
    b = by_id.get("b", {}).get("size")
    if b and b[0] == "fixed":
        if b[1] != 1:
            doc.fail("inputs[0]", f"has a fixed batch of {b[1]}; segstudio runs networks whose batch is free or 1")
        spec.max_batch = 1
    lo, step = [], []
    for axis in "yx":
        size = by_id[axis]["size"]
        if size is None or size[0] == "ref":
            lo.append(None)
            step.append(None)
        elif size[0] == "fixed":
            lo.append(size[1])
            step.append(0)
        else:
            lo.append(size[1])
            step.append(size[2])
    if all(v is not None for v in lo):
        spec.input_min, spec.input_step = (lo[0], lo[1]), (step[0], step[1])
    for a in ax_out:
        if a["id"] not in "yx":
            continue
        size = a["size"]
        same = (size is None or size[0] == "ref" and size[1] in (in_id, "") and size[2] == a["id"] and size[3] == 0
                or size[0] == "fixed" and by_id[a["id"]]["size"] == size)
        if not same:
            doc.fail(f"outputs[0] axis {a['id']!r}", "is not the size of the input's; segstudio runs networks whose "
                     "output has the input's height and width")


def _tolerance(doc: _Doc, rdf: dict, fmt: str, output_id: str) -> dict:
    """The reproduction tolerance: the description's (0.5 ``config.bioimageio.reproducibility_tolerance``,
    first entry that applies), else the specification's defaults (what ``bioimageio.core`` uses)."""
    tol = {"relative": 1e-3, "absolute": 1e-3, "mismatched_ppm": 100.0}
    if not str(rdf.get("format_version", "")).startswith("0.5"):
        tol["mismatched_ppm"] = 0.0  # bioimageio.core's check of 0.4 descriptions allows no mismatch
    config = rdf.get("config")
    entries = []
    if isinstance(config, dict) and isinstance(config.get("bioimageio"), dict):
        entries = doc.seq(config["bioimageio"].get("reproducibility_tolerance"),
                          "config.bioimageio.reproducibility_tolerance", [])
    for i, e in enumerate(entries):
        where = f"config.bioimageio.reproducibility_tolerance[{i}]"
        e = doc.mapping(e, where)
        formats = doc.seq(e.get("weights_formats"), f"{where}.weights_formats", [])
        ids = doc.seq(e.get("output_ids"), f"{where}.output_ids", [])
        if (formats and fmt not in formats) or (ids and output_id not in ids):
            continue
        return {"relative": doc.number(e.get("relative_tolerance", 1e-3), f"{where}.relative_tolerance", 0.0),
                "absolute": doc.number(e.get("absolute_tolerance", 1e-3), f"{where}.absolute_tolerance", 0.0),
                "mismatched_ppm": doc.number(e.get("mismatched_elements_per_million", 100),
                                             f"{where}.mismatched_elements_per_million", 0.0, 1e6)}
    return tol


def keep_model(card_path: str | Path, name: str | None = None) -> Model:
    """Keep the model of ``card_path`` (e.g. an optimize result) as a user model; returns the kept copy.

    The card's folder is copied into :func:`user_models_dir` under ``name``
    (default: the model's; ``name-2``, ``name-3``... when a built-in or
    another user model holds it, so the name finds this model):
    its weight files and a card whose provenance is the original's plus
    ``kept_from`` (where it came from) and, for an optimize result, the
    ``lineage`` (the steps of its run, from the run's ``report.json``).
    A model already kept (same files) is returned as it is, not copied again.

    Parameters
    ----------
    card_path : str or pathlib.Path
        The model's card (loaded with checksums verified).
    name : str, optional
        Made safe (:func:`safe_name`); default: the model's name.

    Returns
    -------
    Model
        The new copy, an earlier copy with the same files, or the model
        itself when it is built in or already at ``<user models>/<name>/``.

    Raises
    ------
    InputError
        ``name`` and ``name-2`` to ``name-999`` are all taken.
    IncompatibleArtifactError
        The card does not load.
    """
    from dataclasses import replace as _replace

    source = load_card(card_path)
    where = source.card_path.parent.resolve()
    if where == BUILTIN_DIR.resolve() or where.parent == user_models_dir().resolve():
        return source  # built in, or a user model already
    digest = model_digest(source)
    base = safe_name(name or source.name)
    root = user_models_dir()
    builtin = {p.stem for p in BUILTIN_DIR.glob("*.json")}
    for n in range(1, 1000):
        name = base if n == 1 else f"{base}-{n}"
        folder = root / name
        card = folder / f"{name}.json"
        if name in builtin:
            continue
        if not folder.exists():
            break
        if card.is_file():
            try:
                existing = load_card(card, verify=False)
            except IncompatibleArtifactError:
                continue
            if model_digest(existing) == digest:
                return existing
    else:
        raise InputError(f"too many user models named {base}-*", hint=f"remove some from {root}")
    provenance = {**source.provenance, "kept_from": str(source.card_path)}
    lineage = _lineage(source.card_path)
    if lineage:
        provenance["lineage"] = lineage
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.keeping-", dir=root))
    try:
        files = {}
        for fmt, path in source.files.items():
            shutil.copy2(path, work / path.name)
            files[fmt] = work / path.name
        write_card(_replace(source.spec, name=name), files, work / f"{name}.json", provenance=provenance)
        _move_into_place(work, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return load_card(folder / f"{name}.json")


def _lineage(card: Path) -> list[dict]:
    """The steps of the optimize run a card comes from (``report.json`` in its folder or the one above)."""
    import json

    for folder in (card.parent, card.parent.parent):
        report = folder / "report.json"
        if not report.is_file():
            continue
        try:
            payload = json.loads(report.read_text())
        except (OSError, ValueError):
            return []
        rows = payload.get("steps") if isinstance(payload, dict) else None
        if not isinstance(rows, list):
            return []
        return [{k: row.get(k) for k in ("index", "name", "status", "reason", "ap50", "speedup_vs_baseline")
                 if k in row} for row in rows if isinstance(row, dict)]
    return []
