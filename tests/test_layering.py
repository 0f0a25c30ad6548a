"""The core imports without Qt, napari or torch; the layers only import downwards."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCK = """
import importlib.abc, sys
BLOCKED = {"torch", "onnxruntime", "onnx", "openvino", "tensorrt", "qtpy", "PySide6", "PyQt5", "PyQt6", "napari", "magicgui", "superqt", "vispy"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
"""

CORE_USE = """
import pkgutil, importlib, numpy as np
import segstudio.core as core
skip = {"segstudio.core.models.unet", "segstudio.core.optimize.qat"}  # import torch by definition
for m in pkgutil.walk_packages(core.__path__, "segstudio.core."):
    if m.name not in skip:
        importlib.import_module(m.name)
import segstudio.cli
from segstudio.core.image.io import as_image
from segstudio.core.segment.postprocess import fg_dist_to_labels
from segstudio.core.models.spec import PostprocessParams
from segstudio.core.backends import available_backends, create_backend
from segstudio.core.models.catalog import get_model
assert available_backends() == [], available_backends()
lab = fg_dist_to_labels(np.ones((16, 16)), np.ones((16, 16)), PostprocessParams())
assert lab.max() == 1
try:
    create_backend("auto", get_model("nuclei"))
except Exception as e:
    assert type(e).__name__ == "BackendUnavailableError", e
    print("ok:", e)
"""


def test_core_works_without_torch_qt_napari_onnxruntime():
    proc = subprocess.run([sys.executable, "-c", BLOCK + CORE_USE], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "ok: no inference backend" in proc.stdout


def test_import_contracts():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("import-linter is not installed")
    proc = subprocess.run([exe], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def _cycles(graph, package: str) -> list[list[str]]:
    """Strongly connected groups of more than one module (import cycles), function-level imports included."""
    mods = sorted(m for m in graph.modules if m.startswith(package))
    edges = {m: sorted(i for i in graph.find_modules_directly_imported_by(m) if i.startswith(package)) for m in mods}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []

    def visit(root: str) -> None:  # Tarjan's algorithm, iterative (no recursion limit)
        work = [(root, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = len(index)
                stack.append(v)
                on.add(v)
            for j in range(i, len(edges[v])):
                w = edges[v][j]
                if w not in index:
                    work.append((v, j + 1))
                    work.append((w, 0))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                if low[v] == index[v]:
                    group = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        group.append(w)
                        if w == v:
                            break
                    if len(group) > 1:
                        found.append(sorted(group))
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[v])

    for m in mods:
        if m not in index:
            visit(m)
    return found


def test_no_import_cycles():
    """No two modules of segstudio import each other, directly or round a loop (lazy imports count too)."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("segstudio", exclude_type_checking_imports=True)
    assert _cycles(graph, "segstudio") == []


MAX_LINES, MAX_PARAMS = 80, 8


def _functions():
    """``(path:line name, lines, parameters)`` of every function and method in ``segstudio/``.

    Lines run from the ``def`` to the last line, less the docstring (documenting a function must never push it
    over the limit: the same issue asks for numpydoc sections); ``self`` / ``cls`` are not counted as parameters.
    """
    import ast

    for path in sorted((ROOT / "segstudio").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args]
                n = len(names) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)
                if names and names[0] in ("self", "cls"):
                    n -= 1
                where = f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
                lines = node.end_lineno - node.lineno + 1
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                        first.value.value, str):
                    lines -= first.end_lineno - first.lineno + 1
                yield where, lines, n


def test_functions_are_short_and_take_few_parameters():
    """No function over 80 lines (its docstring aside) or with over 8 parameters: options travel as typed objects."""
    functions = list(_functions())
    assert len(functions) > 500  # the walk saw the package
    long = [f"{w} ({n} lines)" for w, n, _ in functions if n > MAX_LINES]
    wide = [f"{w} ({p} parameters)" for w, _, p in functions if p > MAX_PARAMS]
    assert not long and not wide, "\n".join(long + wide)
