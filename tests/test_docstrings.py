"""Public functions of the core's image, segmentation and model packages document their arguments numpydoc-style."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("segstudio/core/image", "segstudio/core/segment", "segstudio/core/models")


def _public_functions():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path.name.startswith("_") and path.name != "__init__.py":
                continue
            for node in ast.parse(path.read_text(encoding="utf-8")).body:
                if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                    yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name}", node


def _problems(node: ast.FunctionDef) -> list[str]:
    doc = ast.get_docstring(node) or ""
    args = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
    out = []
    if not doc:
        return ["no docstring"]
    if args and "Parameters\n----------" not in doc:
        out.append("no Parameters section")
    missing = [a for a in args if a not in doc]
    if missing:
        out.append(f"parameters not described: {', '.join(missing)}")
    returns = node.returns is not None and ast.unparse(node.returns) not in ("None", "NoReturn")
    if returns and not ("Returns\n-------" in doc or "Yields\n------" in doc):
        out.append("no Returns section")
    return out


def test_public_functions_have_numpydoc_parameters_and_returns():
    found = list(_public_functions())
    assert len(found) > 80  # the walk saw the packages
    bad = [f"{where}: {'; '.join(p)}" for where, node in found if (p := _problems(node))]
    assert not bad, "\n".join(bad)
