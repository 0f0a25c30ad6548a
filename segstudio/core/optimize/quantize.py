"""INT8 (Q/DQ) quantization calibrated on the user's images, and FP16 conversion.

INT8: ONNX Runtime's ``quantize_static`` writes a Q/DQ model (per-channel
int8 weights, uint8 activations) calibrated by MinMax, Entropy or
Percentile on the tiles of a :class:`CalibrationSource`.  The same file runs
on ONNX Runtime, on OpenVINO (where int8 kernels make it several times
faster on AVX2 CPUs) and as the input of a TensorRT INT8 engine.

Per-layer sensitivity (:func:`layer_sensitivity`) is measured, not guessed:
for every convolution, the model is quantized with that one convolution
kept in float, and the error of the network's output on the calibration
tiles against the float model says how much that layer's quantization
costs.  The accuracy-aware fallback keeps the most sensitive layers in
float, one more at a time, until the accuracy fits the budget.

FP16: a copy of the graph with float16 weights and arithmetic and float32
inputs / outputs, for GPUs; on a CPU it is not faster.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import StepFailedError
from .calibration import CalibrationSource

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


def _reader(tiles: list[np.ndarray], input_name: str):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(tiles)

        def get_next(self):
            t = next(self._it, None)
            return None if t is None else {input_name: t}

        def rewind(self):
            self._it = iter(tiles)

    return Reader()


def conv_nodes(onnx_path: str | Path) -> list[str]:
    import onnx

    model = onnx.load(str(onnx_path))
    return [n.name for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]


def quantize_int8(onnx_in: str | Path, onnx_out: str | Path, tiles: list[np.ndarray], *, method: str = "minmax",
                  per_channel: bool = True, exclude: list[str] | tuple[str, ...] = (),
                  percentile: float = 99.999) -> Path:
    """Write a Q/DQ INT8 model of ``onnx_in`` calibrated on ``tiles``; ``exclude`` stays float."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise StepFailedError(f"calibration method {method!r} is not one of {', '.join(CALIBRATION_METHODS)}")
    onnx_out = Path(onnx_out)
    input_name = onnx.load(str(onnx_in), load_external_data=False).graph.input[0].name
    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]
    extra = {"CalibPercentile": percentile} if method == "percentile" else {}
    with tempfile.TemporaryDirectory(prefix="segstudio-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(onnx_in), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre), str(onnx_out), _reader(tiles, input_name), quant_format=QuantFormat.QDQ,
            per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=calib, nodes_to_exclude=list(exclude), extra_options=extra,
        )
    return onnx_out


def _outputs(onnx_path: Path, tiles: list[np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: t})[0] for t in tiles])


def layer_sensitivity(onnx_in: str | Path, tiles: list[np.ndarray], *, method: str = "minmax",
                      on_progress: Callable[[int, int, str], None] | None = None) -> list[tuple[str, float]]:
    """``(conv node, error saved by keeping it in float)`` for every convolution, most sensitive first.

    The error is the mean squared difference of the network's output from
    the float model's on the calibration tiles.
    """
    nodes = conv_nodes(onnx_in)
    ref = _outputs(Path(onnx_in), tiles)
    with tempfile.TemporaryDirectory(prefix="segstudio-sens-") as tmp:
        full = quantize_int8(onnx_in, Path(tmp) / "all.onnx", tiles, method=method)
        base_err = float(np.mean((_outputs(full, tiles) - ref) ** 2))
        out = []
        for i, node in enumerate(nodes):
            q = quantize_int8(onnx_in, Path(tmp) / f"n{i}.onnx", tiles, method=method, exclude=[node])
            err = float(np.mean((_outputs(q, tiles) - ref) ** 2))
            out.append((node, base_err - err))
            if on_progress is not None:
                on_progress(i + 1, len(nodes), node)
    return sorted(out, key=lambda t: -t[1])


def convert_fp16(onnx_in: str | Path, onnx_out: str | Path) -> Path:
    """FP16 copy of the graph (float32 inputs and outputs kept)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(onnx_in)), keep_io_types=True)
    onnx.save(model, str(onnx_out))
    return Path(onnx_out)


def calibration_tiles(source: CalibrationSource) -> list[np.ndarray]:
    return source.tiles()
