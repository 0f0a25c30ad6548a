"""INT8 (Q/DQ) quantization calibrated on the user's images, and FP16 conversion.

INT8: ONNX Runtime's ``quantize_static`` writes a Q/DQ model (per-channel
int8 weights, uint8 activations) with activation ranges calibrated by
MinMax, Entropy or Percentile (default: the 99.999th percentile) on the
tiles of a :class:`CalibrationSource`, measured once and cached.  The same file runs
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

import numpy as np

from ..errors import StepFailedError
from ..jobs import CancelToken, Job, Progress

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
CHUNK = 8  # calibration tiles per ONNX Runtime pass (bounds its memory)


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


def _preprocess(onnx_in: str | Path, out: Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(onnx_in), str(out), skip_symbolic_shape=True)
    return out


def _method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    if method not in CALIBRATION_METHODS:
        raise StepFailedError(f"calibration method {method!r} is not one of {', '.join(CALIBRATION_METHODS)}")
    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]


def calibrate(onnx_in: str | Path, tiles: list[np.ndarray], cache: str | Path, *, method: str = "percentile",
              percentile: float = 99.999, cancel: CancelToken | None = None) -> Path:
    """Activation ranges of ``onnx_in`` on ``tiles``, written to ``cache`` (JSON) for :func:`quantize_int8`.

    Computed once and reused by every quantization of the same model (the
    per-layer sensitivity quantizes it once per convolution).  Entropy uses
    2048 histogram bins searched down to 128 quantized bins (ONNX Runtime's
    ``quantize_static`` uses 128 and 128, which leaves the search one
    candidate, the full range, and so gives MinMax's ranges).  On the
    built-in nuclei model and DSB2018 fluorescence, percentile 99.999 lost
    0.0039 AP50, MinMax 0.0185, entropy 0.034 (``benchmarks/README.md``).
    """
    import onnx
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    calib_method = _method(method)
    input_name = onnx.load(str(onnx_in), load_external_data=False).graph.input[0].name
    extra = {"minmax": {}, "entropy": {"num_bins": 2048, "num_quantized_bins": 128},
             "percentile": {"num_bins": 2048, "percentile": percentile}}[method]
    with tempfile.TemporaryDirectory(prefix="segstudio-calib-") as tmp:
        pre = _preprocess(onnx_in, Path(tmp) / "pre.onnx")
        calibrator = create_calibrator(pre, [], augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=calib_method, providers=["CPUExecutionProvider"],
                                       extra_options=extra)
        # a few tiles at a time: ONNX Runtime keeps every intermediate tensor of what it is given
        # (64 tiles of 256 px: about 8 GB for the built-in model); ranges and histograms merge
        for i in range(0, len(tiles), CHUNK):
            if cancel is not None:
                cancel.raise_if_cancelled()
            calibrator.collect_data(_reader(tiles[i : i + CHUNK], input_name))
        ranges = calibrator.compute_data()
        del calibrator
    save_tensors_data(ranges, cache)
    return Path(cache)


def quantize_int8(onnx_in: str | Path, onnx_out: str | Path, tiles: list[np.ndarray] | None = None, *,
                  method: str = "percentile", exclude: list[str] | tuple[str, ...] = (),
                  cache: str | Path | None = None, percentile: float = 99.999,
                  cancel: CancelToken | None = None) -> Path:
    """Write a Q/DQ INT8 model of ``onnx_in``; ``exclude`` (node names) stays float.

    Weights are quantized per output channel (signed, symmetric), activations
    per tensor (unsigned, with the calibrated ranges).

    The activation ranges come from ``cache`` when it exists (see
    :func:`calibrate`), else they are measured on ``tiles`` (and kept in
    ``cache`` when one is named).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    onnx_out = Path(onnx_out)
    with tempfile.TemporaryDirectory(prefix="segstudio-quant-") as tmp:
        cache = Path(cache) if cache is not None else Path(tmp) / "ranges.json"
        if not cache.is_file():
            if not tiles:
                raise StepFailedError("INT8 quantization needs calibration tiles")
            calibrate(onnx_in, tiles, cache, method=method, percentile=percentile, cancel=cancel)
        if cancel is not None:
            cancel.raise_if_cancelled()
        pre = _preprocess(onnx_in, Path(tmp) / "pre.onnx")
        quantize_static(
            str(pre), str(onnx_out), None, quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=_method(method),
            nodes_to_exclude=list(exclude), calibration_cache_path=str(cache),
        )
    return onnx_out


def _outputs(onnx_path: Path, tiles: list[np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: t})[0] for t in tiles])


def layer_sensitivity(onnx_in: str | Path, tiles: list[np.ndarray], *, method: str = "percentile",
                      cache: str | Path | None = None, cancel: CancelToken | None = None, percentile: float = 99.999
                      ) -> Job[list[tuple[str, float]]]:
    """``(conv node, error saved by keeping it in float)`` for every convolution, most sensitive first.

    A job (one :class:`Progress` per convolution).  The error is the mean
    squared difference of the network's output from the float model's on
    ``tiles``; the activation ranges are measured once (``cache``) and
    shared by every trial.
    """
    nodes = conv_nodes(onnx_in)
    ref = _outputs(Path(onnx_in), tiles)
    with tempfile.TemporaryDirectory(prefix="segstudio-sens-") as tmp:
        if cache is None or not Path(cache).is_file():
            cache = calibrate(onnx_in, tiles, cache or Path(tmp) / "ranges.json", method=method,
                              percentile=percentile, cancel=cancel)
        full = quantize_int8(onnx_in, Path(tmp) / "all.onnx", method=method, cache=cache)
        base_err = float(np.mean((_outputs(full, tiles) - ref) ** 2))
        out = []
        for i, node in enumerate(nodes):
            if cancel is not None:
                cancel.raise_if_cancelled()
            q = quantize_int8(onnx_in, Path(tmp) / f"n{i}.onnx", method=method, exclude=[node], cache=cache)
            err = float(np.mean((_outputs(q, tiles) - ref) ** 2))
            out.append((node, base_err - err))
            yield Progress("quantize", i + 1, len(nodes), f"sensitivity of {node}: {base_err - err:.3g}")
    return sorted(out, key=lambda t: -t[1])


def convert_fp16(onnx_in: str | Path, onnx_out: str | Path) -> Path:
    """FP16 copy of the graph (float32 inputs and outputs kept)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(onnx_in)), keep_io_types=True)
    onnx.save(model, str(onnx_out))
    return Path(onnx_out)
