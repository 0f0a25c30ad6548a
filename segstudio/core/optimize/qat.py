"""Quantization-aware training on the very graph the INT8 runtimes execute.

ONNX Runtime's static quantizer (:func:`~segstudio.core.optimize.quantize.quantize_int8`)
writes a Q/DQ graph: ``QuantizeLinear`` / ``DequantizeLinear`` pairs on the
activations (per tensor, unsigned, with calibrated scales and zero points)
and ``DequantizeLinear`` on the weights (per output channel, signed,
symmetric: ``scale = max|w| / 127``, values in [-127, 127]) and on the
biases (int32, ``scale = input scale x weight scale``).  OpenVINO and ONNX
Runtime run that graph as INT8.

:class:`QDQNet` interprets that graph in PyTorch with *fake* quantization
in place of each pair: the same placement, the same rounding (half to even)
and the same clipping, so before any training its outputs are the INT8
model's up to the runtimes' integer arithmetic.  The weights are float
parameters (quantized on the fly, straight-through), the activation scales
are learned (LSQ: the gradient reaches the scale through the rounding).
:meth:`QDQNet.export` writes the graph back with the learned weights and
scales; every INT8 backend here then runs what was trained.  No second
description of where quantization happens exists, so the two cannot drift
(``tests/test_qat.py`` checks ONNX Runtime and OpenVINO against it on real
tiles).

:func:`qat_job` trains it against a teacher with the distillation of
:mod:`.distill` (the ``qat`` step and ``recover:qat=true`` of
:mod:`.steps`); :func:`layer_errors` says, layer by layer, how far an INT8
graph's activations are from the float network's (PTQ against QAT in the
report).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

W_QMAX = 127  # symmetric INT8 weights in [-127, 127], as ONNX Runtime writes them
INT32 = (-(2**31), 2**31 - 1)


def _round_ste(x):
    """Round half to even forward (as ``QuantizeLinear``), identity backward (straight-through)."""
    return x + (x.round() - x).detach()


def fake_quant(x, scale, zero_point, qmin: int, qmax: int):
    """``DequantizeLinear(QuantizeLinear(x))`` in float: ``(clip(round(x / s) + zp, qmin, qmax) - zp) * s``.

    Parameters
    ----------
    x : torch.Tensor
        Any shape; float.
    scale : torch.Tensor
        Broadcastable to ``x`` (a scalar per tensor, or one per channel); positive.
    zero_point : torch.Tensor or float
        Broadcastable to ``x``; an integer value.
    qmin, qmax : int
        The integer range (0, 255 for uint8 activations; -127, 127 for weights).

    Returns
    -------
    torch.Tensor
        Like ``x``: its nearest representable value.  The gradient passes
        straight through the rounding (zero outside the range) and reaches
        ``scale`` as in LSQ.
    """
    return (torch.clamp(_round_ste(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


def weight_scale(w, axis: int):
    """Per-channel symmetric scale ``max|w| / 127`` over every axis but ``axis`` (never 0)."""
    dims = [d for d in range(w.dim()) if d != axis]
    return torch.clamp(w.detach().abs().amax(dim=dims), min=1e-12) / W_QMAX


def _shaped(v, axis: int, ndim: int):
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _safe(name: str) -> str:
    return name.replace(".", "__")


def qdq_net(int8_onnx: str | Path, float_onnx: str | Path | None = None, config=None):
    """The Q/DQ graph of ``int8_onnx`` as a trainable ``torch.nn.Module`` (see the module docstring).

    Parameters
    ----------
    int8_onnx : str or pathlib.Path
        A Q/DQ INT8 model as :func:`~segstudio.core.optimize.quantize.quantize_int8`
        writes it (a U-Net's ops: Conv, ConvTranspose, MaxPool, Concat, Relu, Add, Mul).
    float_onnx : str or pathlib.Path, optional
        The float model it was quantized from: its float weights and biases
        start the training (default: the INT8 model's dequantized values).
    config : UNetConfig, optional
        The network's configuration, kept as ``.config`` (halo and size
        multiple for tiled prediction, as a U-Net has).

    Returns
    -------
    torch.nn.Module
        ``forward(x)``: ``(B, C, H, W)`` float32 in, the graph's output
        ``(B, K, H, W)`` out; ``export(path)`` writes the INT8 graph with the
        learned weights and scales.

    Raises
    ------
    ValueError
        An op this interpreter does not know.
    """
    return QDQNet(Path(int8_onnx), Path(float_onnx) if float_onnx else None, config)


class QDQNet(torch.nn.Module):
    """A Q/DQ INT8 ONNX graph interpreted with fake quantization (see :func:`qdq_net`)."""

    OPS = ("QuantizeLinear", "DequantizeLinear", "Conv", "ConvTranspose", "MaxPool", "Concat", "Relu", "Add",
           "Mul")

    def __init__(self, int8_onnx: Path, float_onnx: Path | None, config=None):
        import onnx
        from onnx import numpy_helper

        super().__init__()
        self.model = onnx.load(str(int8_onnx))
        graph = self.model.graph
        self.inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        floats = {}
        if float_onnx is not None:
            floats = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(float_onnx)).graph.initializer}
        self.nodes = [(n.op_type, list(n.input), list(n.output), _attrs(n)) for n in graph.node]
        unknown = sorted({op for op, *_ in self.nodes} - set(self.OPS))
        if unknown:
            raise ValueError(f"{int8_onnx.name}: no quantization-aware training for ops {', '.join(unknown)}")
        self.input_name, self.output_name = graph.input[0].name, graph.output[0].name
        self.weights = torch.nn.ParameterDict()  # DQ output -> float weight (its key: the weight's name)
        self.w_axis: dict[str, int] = {}
        self.biases = torch.nn.ParameterDict()
        self.bias_of: dict[str, tuple[str, str]] = {}  # bias DQ output -> (input scale name, weight key)
        self.log_scales = torch.nn.ParameterDict()  # activation scale initializer -> log(scale)
        self.float_inits = torch.nn.ParameterDict()  # float initializers a node reads (ConvTranspose bias)
        self.names: dict[str, tuple[str, ...]] = {}  # parameter key -> the initializers it is written to
        self.quantized = True  # False: the same graph and weights in float (no rounding, no saturation)
        self.config = config
        self._conv_outputs = {outs[0] for op, _, outs, _ in self.nodes if op in ("Conv", "ConvTranspose")}
        self._collect(floats)

    def _collect(self, floats: dict) -> None:
        produced_by = {o: (op, ins) for op, ins, outs, _ in self.nodes for o in outs}
        for op, ins, outs, attrs in self.nodes:
            if op == "DequantizeLinear" and ins[0] in self.inits and self.inits[ins[0]].dtype == np.int8:
                base = ins[0].removesuffix("_quantized")
                axis = int(attrs.get("axis", 1))
                q = self.inits[ins[0]].astype(np.float32)
                s = _shaped_np(self.inits[ins[1]], axis, q.ndim)
                w = floats.get(base, q * s)
                self.weights[_safe(outs[0])] = torch.nn.Parameter(torch.from_numpy(np.array(w, np.float32)))
                self.w_axis[_safe(outs[0])] = axis
                self.names["w:" + _safe(outs[0])] = (ins[0], ins[1])
            elif op == "QuantizeLinear" and ins[1] not in self.log_scales:
                s = float(self.inits[ins[1]])
                self.log_scales[_safe(ins[1])] = torch.nn.Parameter(torch.tensor(np.log(s), dtype=torch.float32))
                self.names["s:" + _safe(ins[1])] = (ins[1],)
            elif op in ("Conv", "ConvTranspose") and len(ins) > 2:
                x_src, b = produced_by.get(ins[0]), ins[2]
                if b in produced_by and produced_by[b][0] == "DequantizeLinear":
                    bq = produced_by[b][1][0]
                    x_scale = produced_by[x_src[1][0]][1][1] if x_src and x_src[0] == "DequantizeLinear" else None
                    self.bias_of[b] = (x_scale, _safe(ins[1]))
                    init = floats.get(bq.removesuffix("_quantized"),
                                      self.inits[bq].astype(np.float32) * self.inits[produced_by[b][1][1]])
                    self.biases[_safe(b)] = torch.nn.Parameter(torch.from_numpy(np.array(init, np.float32)))
                    self.names["b:" + _safe(b)] = (bq, produced_by[b][1][1])
                elif b in self.inits:
                    self.float_inits[_safe(b)] = torch.nn.Parameter(torch.from_numpy(
                        np.array(floats.get(b, self.inits[b]), np.float32)))
                    self.names["f:" + _safe(b)] = (b,)

    def scale(self, name: str):
        return self.log_scales[_safe(name)].exp()

    def _value(self, env: dict, name: str):
        if name in env:
            return env[name]
        key = _safe(name)
        if key in self.float_inits:
            return self.float_inits[key]
        return torch.from_numpy(np.array(self.inits[name]))

    def _weight(self, key: str):
        w, axis = self.weights[key], self.w_axis[key]
        return fake_quant(w, _shaped(weight_scale(w, axis), axis, w.dim()), 0.0, -W_QMAX, W_QMAX)

    def _bias(self, name: str):
        x_scale, wkey = self.bias_of[name]
        b = self.biases[_safe(name)]
        s = weight_scale(self.weights[wkey], self.w_axis[wkey]) * (self.scale(x_scale) if x_scale else 1.0)
        return fake_quant(b, s, 0.0, *INT32)

    def _relu_range(self, ins) -> bool:
        """Does this QuantizeLinear stand for a ReLU the quantizer folded (a Conv output in [0, max])?"""
        zp = self.inits[ins[2]]
        return zp.dtype == np.uint8 and int(zp) == 0 and ins[0] in self._conv_outputs

    def forward(self, x):
        return self._env(x)[self.output_name]

    def _env(self, x) -> dict:
        env = {self.input_name: x}
        for op, ins, outs, attrs in self.nodes:
            env[outs[0]] = self._run(op, ins, outs, attrs, env)
        return env

    def activations(self, x) -> dict:
        """The output of every Conv and ConvTranspose node on ``x``, by node output name."""
        env = self._env(x)
        return {outs[0]: env[outs[0]] for op, ins, outs, _ in self.nodes if op in ("Conv", "ConvTranspose")}

    def _run(self, op, ins, outs, attrs, env):
        if not self.quantized and op in ("QuantizeLinear", "DequantizeLinear"):
            if _safe(outs[0]) in self.weights:
                return self.weights[_safe(outs[0])]
            if outs[0] in self.bias_of:
                return self.biases[_safe(outs[0])]
            if op == "QuantizeLinear" and self._relu_range(ins):
                # the quantizer drops a ReLU before an unsigned range that starts at 0: its clipping is the ReLU
                return F.relu(env[ins[0]])
            return env[ins[0]]
        if op == "QuantizeLinear":
            zp = float(self.inits[ins[2]])
            qmin, qmax = (0, 255) if self.inits[ins[2]].dtype == np.uint8 else (-128, 127)
            return fake_quant(env[ins[0]], self.scale(ins[1]), zp, qmin, qmax)
        if op == "DequantizeLinear":
            if _safe(outs[0]) in self.weights:
                return self._weight(_safe(outs[0]))
            if outs[0] in self.bias_of:
                return self._bias(outs[0])
            return env[ins[0]]  # an activation: its QuantizeLinear already gave the dequantized value
        if op in ("Conv", "ConvTranspose"):
            return _conv(op, [self._value(env, n) for n in ins], attrs)
        if op == "MaxPool":
            return _max_pool(env[ins[0]], attrs)
        if op == "Concat":
            return torch.cat([env[n] for n in ins], dim=int(attrs.get("axis", 1)))
        if op == "Relu":
            return F.relu(env[ins[0]])
        a, b = self._value(env, ins[0]), self._value(env, ins[1])
        return a + b if op == "Add" else a * b

    def export(self, path: str | Path) -> Path:
        """Write the INT8 graph with the learned weights, biases and activation scales; returns ``path``."""
        return _export(self, Path(path))


def _shaped_np(v: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    v = np.asarray(v, np.float32)
    if v.ndim == 0:
        return v
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def _conv(op: str, args: list, attrs: dict):
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    strides = tuple(attrs.get("strides", [1, 1]))
    dilations = tuple(attrs.get("dilations", [1, 1]))
    group = int(attrs.get("group", 1))
    if op == "ConvTranspose":
        if any(pads):
            raise ValueError("no quantization-aware training for a padded ConvTranspose")
        return F.conv_transpose2d(x, w, b, strides, 0, tuple(attrs.get("output_padding", [0, 0])), group, dilations)
    if pads[0] == pads[2] and pads[1] == pads[3]:
        return F.conv2d(x, w, b, strides, (pads[0], pads[1]), dilations, group)
    x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
    return F.conv2d(x, w, b, strides, 0, dilations, group)


def _max_pool(x, attrs: dict):
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    if pads[0] != pads[2] or pads[1] != pads[3]:
        raise ValueError("no quantization-aware training for an asymmetrically padded MaxPool")
    return F.max_pool2d(x, tuple(attrs["kernel_shape"]), tuple(attrs.get("strides", attrs["kernel_shape"])),
                        (pads[0], pads[1]), tuple(attrs.get("dilations", [1, 1])), bool(attrs.get("ceil_mode", 0)))


def _export(net, path: Path) -> Path:
    """The INT8 model with ``net``'s weights, biases and activation scales in place of the calibrated ones."""
    import copy

    import onnx
    from onnx import numpy_helper

    from ..models.onnx_export import finalize_onnx

    new: dict[str, np.ndarray] = {}

    def put(name: str, value) -> None:
        new[name] = np.asarray(value).reshape(net.inits[name].shape).astype(net.inits[name].dtype)

    with torch.no_grad():
        for key, w in net.weights.items():
            q_name, s_name = net.names["w:" + key]
            axis = net.w_axis[key]
            s = weight_scale(w, axis)
            put(q_name, torch.clamp(torch.round(w / _shaped(s, axis, w.dim())), -W_QMAX, W_QMAX).numpy())
            put(s_name, s.numpy())
        for out, (x_scale, wkey) in net.bias_of.items():
            q_name, s_name = net.names["b:" + _safe(out)]
            w = net.weights[wkey]
            s = weight_scale(w, net.w_axis[wkey]) * (net.scale(x_scale) if x_scale else 1.0)
            put(q_name, torch.clamp(torch.round(net.biases[_safe(out)] / s), *INT32).numpy())
            put(s_name, s.numpy())
        for key, log_s in net.log_scales.items():
            put(net.names["s:" + key][0], log_s.exp().numpy())
        for key, p in net.float_inits.items():
            put(net.names["f:" + key][0], p.numpy())
    model = copy.deepcopy(net.model)
    for init in model.graph.initializer:
        if init.name in new:
            init.CopyFrom(numpy_helper.from_array(new[init.name], init.name))
    tmp = path.with_suffix(".tmp.onnx")
    onnx.save(model, str(tmp))
    return finalize_onnx(tmp, path)


def qat_job(int8_onnx: str | Path, float_onnx: str | Path, config, teacher, images: list[np.ndarray], kd,
            **distill):
    """Quantization-aware training of the INT8 graph ``int8_onnx`` (a job returning ``(net, info)``).

    ``float_onnx``'s weights start it (with ``int8_onnx``'s calibrated
    activation scales); it then learns, weights and scales together, to
    match ``teacher`` on crops of ``images`` with the distillation loss of
    :func:`~segstudio.core.optimize.distill.distill_job` (``kd``: its
    :class:`~segstudio.core.optimize.distill.KDConfig`; ``distill``: its
    ``labels``, ``cancel`` and ``teacher_logits``).  The returned
    :class:`QDQNet` exports with :meth:`QDQNet.export`.
    """
    from .distill import distill_job

    net = qdq_net(int8_onnx, float_onnx, config)
    info = yield from distill_job(net, teacher, images, kd, **distill)
    net.eval()
    return net, info


def layer_errors(int8_onnx: dict[str, str | Path], float_onnx: str | Path, tiles: list[np.ndarray]) -> dict:
    """How far each INT8 graph's layer outputs are from float, layer by layer, two ways.

    Parameters
    ----------
    int8_onnx : dict
        Name (``"ptq"``, ``"qat"``) -> a Q/DQ graph of the same network
        (the same nodes, other weights and scales).
    float_onnx : str or pathlib.Path
        The float network they all started from.
    tiles : list of numpy.ndarray
        ``(1, C, H, W)`` float32 tiles.

    Returns
    -------
    dict
        Conv node output -> name -> ``{"vs_start": e, "vs_own_float": e}``:
        the relative error ``mean |int8 - float| / mean |float|`` over the
        tiles against ``float_onnx`` (QAT also moves away from it on purpose:
        it goes on learning from the teacher), and against the same graph's
        own weights run in float (what quantizing its activations costs).
    """
    names = list(int8_onnx)
    start = qdq_net(next(iter(int8_onnx.values())), float_onnx)
    start.quantized = False
    nets = [qdq_net(int8_onnx[n]) for n in names]
    sums: dict[str, dict[str, list[float]]] = {}
    with torch.no_grad():
        for t in tiles:
            x = torch.from_numpy(np.ascontiguousarray(t, np.float32))
            ref = start.activations(x)
            for n, net in zip(names, nets):
                got, mine = _both_ways(net, x)
                for layer, v in ref.items():
                    acc = sums.setdefault(layer, {}).setdefault(n, [0.0, 0.0, 0.0, 0.0])
                    acc[0] += float((got[layer] - v).abs().mean())
                    acc[1] += float(v.abs().mean())
                    acc[2] += float((got[layer] - mine[layer]).abs().mean())
                    acc[3] += float(mine[layer].abs().mean())
    return {layer: {n: {"vs_start": a[0] / max(a[1], 1e-12), "vs_own_float": a[2] / max(a[3], 1e-12)}
                    for n, a in by.items()} for layer, by in sums.items()}


def _both_ways(net: QDQNet, x) -> tuple[dict, dict]:
    """``net``'s layer outputs on ``x`` quantized, then with the same weights in float."""
    got = net.activations(x)
    net.quantized = False
    try:
        return got, net.activations(x)
    finally:
        net.quantized = True
