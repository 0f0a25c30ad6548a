"""Artifacts: what each optimization step takes and gives.

An artifact is a model card (:class:`~segstudio.core.models.catalog.Model`)
in its own folder: the weight files the step produced or kept (``torch``,
``onnx``, ``onnx_int8``, ``onnx_fp16``) and, in the card, its *provenance*:
the parent's digest, the step and its parameters, the calibration set's
hash, library versions and the hardware.  Any artifact loads back into the
app as a model (``segstudio segment --model DIR/card.json``).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..models.catalog import Model, load_card, model_digest, write_card
from ..models.spec import ModelSpec


def library_versions() -> dict[str, str]:
    from ..backends.autoselect import package_versions

    return package_versions(("segstudio", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "numpy",
                             "tensorrt"))


def hardware() -> str:
    from ..backends.autoselect import _machine

    return _machine()


def provenance(parent: Model | None, step: str, params: dict, **extra) -> dict:
    return {
        "parent": model_digest(parent) if parent is not None else None,
        "parent_name": parent.name if parent is not None else None,
        "step": step,
        "params": params,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "versions": library_versions(),
        "hardware": hardware(),
        **extra,
    }


def load_torch(model: Model):
    """The model's PyTorch module (eval mode), from its state dict (``weights_only``)."""
    import torch

    from ..models.unet import build_unet

    net = build_unet(model.spec.config)
    net.load_state_dict(torch.load(model.file("torch"), map_location="cpu", weights_only=True))
    return net.eval()


@dataclass(frozen=True)
class OnnxExport:
    """How an artifact's ONNX graph is exported: ``net`` (default: the network saved) at ``opset``."""

    net: object = None
    opset: int = 18


def new_artifact(
    out_dir: Path,
    spec: ModelSpec,
    *,
    net=None,
    export: OnnxExport = OnnxExport(),
    copy: dict[str, Path] | None = None,
    new_files: dict[str, Path] | None = None,
    prov: dict,
    cancel=None,
) -> Model:
    """Write an artifact folder and return it as a model.

    ``net``: a PyTorch module to save (state dict) and to export to ONNX
    as ``export`` says (another graph when it differs, e.g. with BatchNorm
    folded; the opset); ``copy``: files of the parent kept as they are;
    ``new_files``: files a step already wrote (moved in); ``cancel``: a
    :class:`~segstudio.core.jobs.CancelToken` that stops the wait for the
    export (which has no cancellation point of its own) at once.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    if net is not None:
        import torch

        pt = out_dir / f"{spec.name}.pt"
        torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, pt)
        files["torch"] = pt
        from ..jobs import run_interruptible
        from ..models.onnx_export import export_onnx

        target = export.net if export.net is not None else net
        files["onnx"] = run_interruptible(
            lambda: export_onnx(target, out_dir / f"{spec.name}.onnx", in_channels=spec.config.in_channels,
                                multiple=spec.multiple, opset=export.opset), cancel)
    for fmt, src in (copy or {}).items():
        dst = out_dir / Path(src).name
        if Path(src).resolve() != dst.resolve():
            shutil.copy2(src, dst)
        files[fmt] = dst
    for fmt, src in (new_files or {}).items():
        dst = out_dir / Path(src).name
        if Path(src).resolve() != dst.resolve():
            shutil.move(str(src), dst)
        files[fmt] = dst
    card = write_card(spec, files, out_dir / f"{spec.name}.json", provenance=prov)
    return load_card(card)


def renamed(spec: ModelSpec, suffix: str, **changes) -> ModelSpec:
    """A copy of ``spec`` for a derived model (name gets ``suffix``; metrics are not inherited)."""
    return replace(spec, name=f"{spec.name}{suffix}", metrics={}, **changes)
