"""Checks of an untrusted ONNX file before ONNX Runtime or OpenVINO sees it, and its confined trial run.

:func:`check_onnx_file` reads the file as data (protobuf, no external data
loaded) and refuses, with the file named:

* a file that is not an ONNX model, or that ``onnx.checker`` rejects (the
  path form of the checker, which handles models past protobuf's 2 GiB);
* external data (weights in side files) whose ``location`` is absolute,
  climbs out with ``..``, goes through a symbolic link or does not resolve
  to a file inside the model's folder, or whose offset / length fall
  outside that file;
* operators of custom domains: only the standard ones (``''`` /
  ``ai.onnx``, ``ai.onnx.ml``) and the ``com.microsoft`` operators that the
  installed ONNX Runtime implements are allowed (a custom operator is native
  code segstudio would have to load);
* subgraphs except those of ``If``, ``Loop`` and ``Scan``;
* a ``Loop`` without a trip count, with one that is not a constant, or with
  a constant above :data:`MAX_LOOP_TRIPS` (subgraphs and local functions
  are walked recursively);
* weights (initializers, constants, sparse tensors, external data) that
  declare more than :data:`MAX_WEIGHT_BYTES` in total.

:func:`trial_run` is what :func:`segstudio.core.models.user.import_model`
runs in a confined child (:mod:`.confine`) under :data:`TRIAL_LIMITS`, so
that a graph which allocates without end or runs for hours stops the
child, not the app.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath

from ..errors import BackendUnavailableError, IncompatibleArtifactError
from .confine import Limits

MAX_WEIGHT_BYTES = 2 << 30
MAX_LOOP_TRIPS = 100_000
MAX_NODES = 1_000_000
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
SUBGRAPH_OPS = ("If", "Loop", "Scan")
# The trial run of an import: ONNX Runtime with one thread, in a confined child.  Measured: the BioImage.IO U-Net
# on its 512 x 512 test input peaks at 0.44 GB of address space (0.26 GB resident) in 1.3-1.6 s; a graph that
# allocates more than the limit (plus twice its weights, see user._fill_from_onnx) is stopped.
TRIAL_LIMITS = Limits(memory_bytes=3 << 30, cpu_seconds=300, wall_seconds=120.0, file_bytes=1 << 30,
                      open_files=256)


class OnnxRefusedError(IncompatibleArtifactError):
    """An ONNX file that segstudio will not hand to an inference library."""


@dataclass
class OnnxSummary:
    """What the graph declares: its inputs and outputs (name, dims, element type), weights and side files."""

    inputs: list[tuple[str, tuple, int]]
    outputs: list[tuple[str, tuple, int]]
    weight_bytes: int
    opset: int
    external_files: list[Path] = field(default_factory=list)

    def input_dims(self) -> tuple:
        """The one input's dims: ints where fixed, ``None`` where symbolic."""
        return self.inputs[0][1] if self.inputs else ()


def _onnx():
    try:
        import onnx
    except ImportError:
        raise BackendUnavailableError("checking an ONNX file needs the onnx package",
                                      hint="pip install onnx (or segstudio[onnx])") from None
    return onnx


@lru_cache(maxsize=1)
def ort_contrib_ops() -> frozenset[str]:
    """The ``com.microsoft`` operators the installed ONNX Runtime implements (empty without it).

    Returns
    -------
    frozenset of str
        Operator names, read once per process.
    """
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as C
    except ImportError:
        return frozenset()
    return frozenset(k.op_name for k in C.get_all_opkernel_def() if k.domain == "com.microsoft")


def _dims(value_info) -> tuple:
    shape = value_info.type.tensor_type.shape
    if not value_info.type.tensor_type.HasField("shape"):
        return ()
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in shape.dim)


class _Walker:
    def __init__(self, onnx, name: str, folder: Path):
        self.onnx, self.name, self.folder = onnx, name, folder.resolve()
        self.weight_bytes = 0
        self.nodes = 0
        self.external: dict[Path, int] = {}
        self.functions: dict[tuple[str, str], object] = {}

    def refuse(self, what: str, hint: str | None = None):
        raise OnnxRefusedError(f"refused {self.name}: {what}", hint=hint)

    # -- tensors
    def tensor(self, t, where: str) -> None:
        itemsize = 1
        try:
            np_type = self.onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
            itemsize = np_type.itemsize or 1
        except (KeyError, TypeError, ValueError):
            pass
        declared = math.prod(int(d) for d in t.dims) * itemsize if t.dims else itemsize
        if any(int(d) < 0 for d in t.dims):
            self.refuse(f"{where} has a negative dimension")
        size = max(declared, len(t.raw_data), sum(len(s) for s in t.string_data))
        if t.data_location == self.onnx.TensorProto.EXTERNAL:
            size = max(size, self.external_data(t, where))
        self.weight_bytes += size
        if self.weight_bytes > MAX_WEIGHT_BYTES:
            self.refuse(f"its weights declare more than {MAX_WEIGHT_BYTES / (1 << 30):.0f} GiB "
                        f"({self.weight_bytes / (1 << 30):.2f} GiB counted at {where})",
                        hint="segstudio loads models of at most 2 GiB of weights")

    def external_data(self, t, where: str) -> int:
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        bad = (not loc or "\x00" in loc or loc != loc.strip() or loc.startswith(("/", "\\"))
               or re.match(r"^[A-Za-z]:", loc) or ".." in PurePosixPath(loc.replace("\\", "/")).parts)
        if bad:
            self.refuse(f"{where} keeps its data at {loc!r}, outside the model's folder",
                        hint="external data must sit next to the model file (a relative path inside its folder)")
        rel = PurePosixPath(loc.replace("\\", "/"))
        path = self.folder
        for part in rel.parts:  # no symbolic link on the way, not even one that stays inside
            path = path / part
            if path.is_symlink():
                self.refuse(f"{where} keeps its data at {loc!r}, through a symbolic link")
        real = path.resolve()
        if real != self.folder and self.folder not in real.parents:
            self.refuse(f"{where} keeps its data at {loc!r}, outside the model's folder")
        if not real.is_file():
            raise IncompatibleArtifactError(f"{self.name}: its external data file {loc!r} is missing",
                                            hint="copy the data files that came with the model next to it")
        try:
            offset, length = int(info.get("offset", 0) or 0), info.get("length")
            length = None if length in (None, "") else int(length)
        except ValueError:
            self.refuse(f"{where} has a non-numeric external data offset or length")
        file_size = real.stat().st_size
        if offset < 0 or (length is not None and (length < 0 or offset + length > file_size)) or offset > file_size:
            self.refuse(f"{where} reads bytes {offset}..{offset + (length or 0)} of {loc!r}, "
                        f"which holds {file_size} bytes")
        self.external[real] = file_size
        return length if length is not None else file_size - offset

    # -- graphs
    def graph(self, g, consts: dict, where: str) -> None:
        inputs = {i.name for i in g.input}
        consts = dict(consts)
        for t in g.initializer:
            self.tensor(t, f"initializer {t.name!r}")
            if t.name not in inputs:  # an initializer that is also an input can be overridden
                consts[t.name] = self.scalar(t)
        for s in g.sparse_initializer:
            self.tensor(s.values, f"sparse initializer {s.values.name!r}")
            self.tensor(s.indices, f"sparse initializer {s.values.name!r}")
        for node in g.node:
            self.node(node, consts, where)

    def scalar(self, t):
        if math.prod(t.dims) != 1 or t.data_location == self.onnx.TensorProto.EXTERNAL:
            return None
        try:
            return self.onnx.numpy_helper.to_array(t).reshape(-1)[0].item()
        except Exception:  # noqa: BLE001 - not a number we can read: not a constant
            return None

    def node(self, node, consts: dict, where: str) -> None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            self.refuse(f"more than {MAX_NODES} operators")
        op, domain = node.op_type, node.domain
        label = f"operator {node.name or op!r} ({domain + '.' if domain else ''}{op}) in {where}"
        local = (domain, op) in self.functions
        if not local:
            if domain == "com.microsoft":
                if op not in ort_contrib_ops():
                    self.refuse(f"{label} is not one of ONNX Runtime's built-in com.microsoft operators")
            elif domain not in STANDARD_DOMAINS:
                self.refuse(f"{label} belongs to the custom domain {domain!r}",
                            hint="custom operators are native code that segstudio does not load; "
                            "export the network with standard ONNX operators")
        graphs = []
        A = self.onnx.AttributeProto
        for a in node.attribute:
            if a.type == A.TENSOR:
                self.tensor(a.t, f"{label} attribute {a.name!r}")
            elif a.type == A.TENSORS:
                for t in a.tensors:
                    self.tensor(t, f"{label} attribute {a.name!r}")
            elif a.type in (A.SPARSE_TENSOR, A.SPARSE_TENSORS):
                for s in ([a.sparse_tensor] if a.type == A.SPARSE_TENSOR else a.sparse_tensors):
                    self.tensor(s.values, f"{label} attribute {a.name!r}")
                    self.tensor(s.indices, f"{label} attribute {a.name!r}")
            elif a.type in (A.GRAPH, A.GRAPHS):
                graphs += [a.g] if a.type == A.GRAPH else list(a.graphs)
        if graphs and (local or domain not in ("", "ai.onnx") or op not in SUBGRAPH_OPS):
            self.refuse(f"{label} carries a subgraph (only If, Loop and Scan may)")
        if op == "Loop" and domain in ("", "ai.onnx"):
            trips = node.input[0] if len(node.input) else ""
            if not trips:
                self.refuse(f"{label} has no trip count: it could run forever",
                            hint="segstudio runs loops only with a constant, bounded trip count")
            count = consts.get(trips)
            if not isinstance(count, (int, float)):
                self.refuse(f"{label} has a trip count that is not a constant ({trips!r})",
                            hint="segstudio runs loops only with a constant, bounded trip count")
            if count > MAX_LOOP_TRIPS:
                self.refuse(f"{label} runs {int(count)} times (segstudio's limit is {MAX_LOOP_TRIPS})")
        if op == "Constant" and domain in ("", "ai.onnx") and node.output:
            consts[node.output[0]] = self.constant_value(node)
        for g in graphs:
            self.graph(g, consts, f"a subgraph of {label}")

    def constant_value(self, node):
        for a in node.attribute:
            if a.name == "value" and a.type == self.onnx.AttributeProto.TENSOR:
                return self.scalar(a.t)
            if a.name == "value_int":
                return int(a.i)
            if a.name == "value_float":
                return float(a.f)
        return None


def check_onnx_file(path: str | Path, *, name: str | None = None) -> OnnxSummary:
    """Refuse an ONNX file segstudio should not run (see the module docstring); its summary otherwise.

    Parameters
    ----------
    path : str or pathlib.Path
        The ONNX file; external data files must sit in its folder.
    name : str, optional
        The name the messages use (default: the file's name).

    Returns
    -------
    OnnxSummary
        The graph's inputs (initializers left out) and outputs as ``(name,
        dims, ONNX element type)``, dims ints where fixed and None where
        symbolic; the weight bytes declared; the default domain's opset (0
        if none); the external data files (resolved paths).

    Raises
    ------
    OnnxRefusedError
        A file of 2 GiB or more; external data outside the folder, through
        a symbolic link, or outside its file's bytes; an operator of a custom
        domain, or a ``com.microsoft`` one the installed ONNX Runtime lacks;
        a subgraph outside ``If`` / ``Loop`` / ``Scan``; a ``Loop`` whose trip
        count is missing, not a constant or above :data:`MAX_LOOP_TRIPS`
        (100,000); more than :data:`MAX_NODES` (1,000,000) operators; a
        negative dimension; more than :data:`MAX_WEIGHT_BYTES` (2 GiB) of
        weights.
    IncompatibleArtifactError
        An unreadable file, not an ONNX model, one ``onnx.checker`` rejects,
        or a missing external data file.
    BackendUnavailableError
        The ``onnx`` package is not installed.
    """
    onnx = _onnx()
    path = Path(path)
    name = name or path.name
    try:
        size = path.stat().st_size
    except OSError as e:
        raise IncompatibleArtifactError(f"{name}: cannot be read ({e.strerror})") from None
    if size >= 2 << 30:
        raise OnnxRefusedError(f"refused {name}: {size / (1 << 30):.2f} GiB in one file (ONNX files hold at "
                               "most 2 GiB; larger weights belong in external data files)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError, and more
        raise IncompatibleArtifactError(f"{name}: not an ONNX model ({type(e).__name__}: "
                                        f"{_first_line(e)})") from None
    if not model.HasField("graph"):
        raise IncompatibleArtifactError(f"{name}: not an ONNX model (no graph in it)")
    walker = _Walker(onnx, name, path.parent)
    for f in model.functions:
        walker.functions[(f.domain, f.name)] = f
    walker.graph(model.graph, {}, "the main graph")
    for f in model.functions:
        for node in f.node:
            walker.node(node, {}, f"local function {f.domain}.{f.name}")
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:  # noqa: BLE001 - ValidationError and the checker's C++ errors
        raise IncompatibleArtifactError(f"{name}: not a valid ONNX model ({_first_line(e)})") from None
    initializers = {t.name for t in model.graph.initializer}
    inputs = [(i.name, _dims(i), i.type.tensor_type.elem_type) for i in model.graph.input if i.name not in initializers]
    outputs = [(o.name, _dims(o), o.type.tensor_type.elem_type) for o in model.graph.output]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxSummary(inputs=inputs, outputs=outputs, weight_bytes=walker.weight_bytes, opset=opset,
                       external_files=sorted(walker.external))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return " ".join(text[0].split())[:300] if text else type(e).__name__


def trial_run(inputs: dict[str, Path], out: Path, *, model: str, feeds: list[str], threads: int = 1) -> dict:
    """Run ``model`` on each ``.npy`` of ``feeds`` with ONNX Runtime (CPU); runs in a confined child.

    Writes ``out_<feed>`` per feed; returns the session's input and output
    declarations.  An ONNX Runtime error is this model's.

    Parameters
    ----------
    inputs : dict of str to pathlib.Path
        The child's input copies: the ONNX file, its external data files and
        the feeds.
    out : pathlib.Path
        The child's output folder.
    model : str
        The key of the ONNX file in ``inputs``.
    feeds : list of str
        Keys of ``.npy`` arrays in ``inputs`` (loaded without pickles), each
        a whole input of the network, e.g. float32 ``(1, C, H, W)``.
    threads : int
        ONNX Runtime's intra-op threads (inter-op: 1).

    Returns
    -------
    dict
        ``{"inputs": [[name, dims, type], ...], "outputs": [...]}``, dims None
        where symbolic.  A session with other than one input is returned
        as it is, no feed run.  Each feed's first output is saved as float32
        to ``out / "out_<feed>"``.

    Raises
    ------
    IncompatibleArtifactError
        ONNX Runtime cannot load the model, or fails on a feed.
    """
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(inputs[model]), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise IncompatibleArtifactError(f"ONNX Runtime cannot load it ({_first_line(e)})") from None
    declared = {"inputs": [[i.name, [d if isinstance(d, int) else None for d in i.shape], i.type]
                           for i in sess.get_inputs()],
                "outputs": [[o.name, [d if isinstance(d, int) else None for d in o.shape], o.type]
                            for o in sess.get_outputs()]}
    if len(declared["inputs"]) != 1:
        return declared
    name = sess.get_inputs()[0].name
    for feed in feeds:
        x = np.load(inputs[feed], allow_pickle=False)
        try:
            y = sess.run(None, {name: x})[0]
        except Exception as e:  # noqa: BLE001
            raise IncompatibleArtifactError(f"the network fails on a {tuple(x.shape)} input ({_first_line(e)})") from None
        np.save(out / f"out_{feed}", np.ascontiguousarray(y, dtype=np.float32))
    return declared

