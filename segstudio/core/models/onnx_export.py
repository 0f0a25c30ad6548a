"""PyTorch -> ONNX export with dynamic height / width, and its verification."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DEFAULT_OPSET = 18


def ir_version_for_opset(opset: int) -> int:
    """The lowest ONNX IR version that carries ``opset``.

    onnx writes its newest IR version by default, which older ONNX Runtime
    releases refuse; the lowest one that fits the opset loads everywhere.

    Parameters
    ----------
    opset : int
        The default (``ai.onnx``) domain's opset version.

    Returns
    -------
    int
        The lowest IR version among the installed onnx's
        ``onnx.helper.VERSION_TABLE`` rows of that opset.

    Raises
    ------
    ValueError
        The installed onnx package does not know ``opset``.
    """
    import onnx.helper

    # rows: (onnx release, IR version, default opset, ml opset, training opset)
    candidates = [row[1] for row in onnx.helper.VERSION_TABLE if row[2] == opset]
    if not candidates:
        raise ValueError(f"opset {opset} is unknown to the installed onnx package")
    return min(candidates)


def export_onnx(net, path: str | Path, *, in_channels: int, multiple: int, opset: int = DEFAULT_OPSET) -> Path:
    """Export ``net`` (eval mode) to one ONNX file with dynamic batch, H and W.

    Parameters
    ----------
    net : torch.nn.Module
        Put in eval mode (in place); its ``forward`` takes one float tensor
        ``x`` of shape ``(B, in_channels, H, W)``.
    path : str or pathlib.Path
        The ONNX file to write; the exporter first writes
        ``path.with_suffix(".export.onnx")``, removed by :func:`finalize_onnx`.
    in_channels : int
        Input channels of the traced example (zeros of ``(1, in_channels,
        4 * multiple, 4 * multiple)``).
    multiple : int
        H and W are exported as multiples of this (the network's stride), up
        to ``4096 * multiple``; the batch from 1 to 1024.
    opset : int
        The ONNX opset (default :data:`DEFAULT_OPSET`, 18).

    Returns
    -------
    pathlib.Path
        ``path``, checked, at the lowest IR version of its opset
        (:func:`finalize_onnx`).
    """
    import torch

    path = Path(path)
    net = net.eval()
    example = torch.zeros(1, in_channels, 4 * multiple, 4 * multiple)
    batch = torch.export.Dim("batch", min=1, max=1024)
    h = torch.export.Dim("h", min=1, max=4096)
    w = torch.export.Dim("w", min=1, max=4096)
    # H and W are multiples of the network stride: express them as such
    dims = {0: batch, 2: multiple * h, 3: multiple * w}
    tmp = path.with_suffix(".export.onnx")
    torch.onnx.export(
        net, (example,), str(tmp), dynamo=True, opset_version=opset, external_data=False,
        dynamic_shapes={"x": dims}, input_names=["input"], output_names=["output"],
    )
    return finalize_onnx(tmp, path)


def finalize_onnx(tmp: Path, path: Path) -> Path:
    """Load a freshly exported ONNX file, give it the IR version ONNX Runtime accepts, check and save it as ``path``.

    Parameters
    ----------
    tmp : pathlib.Path
        The exporter's file; deleted once loaded (any external data it names
        is loaded with it).
    path : pathlib.Path
        Where the model is saved, as one file.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ValueError
        Its opset is unknown to the installed onnx (:func:`ir_version_for_opset`).
    onnx.checker.ValidationError
        The model fails ``onnx.checker``.
    """
    import onnx

    model = onnx.load(str(tmp))
    Path(tmp).unlink()
    actual = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    model.ir_version = ir_version_for_opset(actual)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def compare_outputs(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Max abs error, mean abs error and cosine similarity of two outputs.

    Parameters
    ----------
    reference : numpy.ndarray
        The reference output, any numeric dtype.
    other : numpy.ndarray
        The output compared with it, with as many elements; both are
        flattened and compared in float64.

    Returns
    -------
    dict of str to float
        ``max_abs_error``, ``mean_abs_error`` and ``cosine`` (1.0 when either
        array is all zeros).
    """
    a = reference.astype(np.float64).ravel()
    b = other.astype(np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return {
        "max_abs_error": float(np.max(np.abs(a - b))),
        "mean_abs_error": float(np.mean(np.abs(a - b))),
        "cosine": float(a @ b / denom) if denom else 1.0,
    }
