"""The shape of src/cifarlab: imports only point one way (no cycle, lazy imports included), each module one idea of a
size a maintainer reads in one sitting, each function short enough to hold in one's head."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO

PACKAGE = REPO / "src" / "cifarlab"
MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 60
MODULES = {".".join(p.relative_to(PACKAGE).with_suffix("").parts) for p in PACKAGE.rglob("*.py")}


def name_of(path) -> str:
    """src/cifarlab/data/batches.py -> data.batches; a package's __init__.py -> the package's name."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def modules() -> dict[str, ast.Module]:
    return {name_of(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def imports(tree: ast.Module) -> set[str]:
    """The cifarlab modules a module imports, at its top or inside a function (TYPE_CHECKING blocks left out)."""
    found = set()
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                 and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
                 for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cifarlab"):
            package = node.module.removeprefix("cifarlab").lstrip(".")
            for alias in node.names:  # `from cifarlab.data import batches`: a module; `... import CifarArrays`: not
                name = f"{package}.{alias.name}".lstrip(".")
                found.add(name if name in MODULES else package)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("cifarlab.") for a in node.names if a.name.startswith("cifarlab.")}
    return found


def test_no_import_cycle_in_the_package():
    graph = {name: imports(tree) - {name} for name, tree in modules().items() if name != "__init__"}
    assert set().union(*graph.values()) <= set(graph), set().union(*graph.values()) - set(graph)
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", f"import cycle: {' -> '.join(path + [name])}"
        state[name] = "open"
        for other in sorted(graph.get(name, ())):
            visit(other, path + [name])
        state[name] = "done"

    for name in graph:
        visit(name, [])
    assert "train" not in graph["cli"] or "cli" not in graph["train"]


def test_modules_and_functions_stay_small():
    too_long = {f"{p.name}: {n} lines" for p in PACKAGE.rglob("*.py")
                if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not too_long, too_long
    long_functions = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {length} lines")
    assert not long_functions, long_functions


def test_the_model_imports_without_hydra_or_lightning():
    """Style: the model is pure torch and receives layer factories: a user's notebook imports it with torch alone."""
    probe = ("import sys, cifarlab.model; "
             "print(' '.join(m for m in ('hydra', 'omegaconf', 'lightning', 'torchvision') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == [], f"import cifarlab.model loads {loaded}"
