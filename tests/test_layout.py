"""The package's dependency rules (DESIGN.md, "the next shape"), read from the source with
`ast`, so a late import inside a function counts as much as one at the top:

- gft/ imports nothing from backends/ or cli.py: the backend port lives in gft/backend.py,
  backends/ implements it and registers itself as its provider, cli.py wires them together;
- the modules of gft/ import each other without a circle (one owns an idea, the others use it).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UPWARD = ("backends", "cli")  # what sits above gft/ in the layout
# `python -m gft` is the gft command itself (torchrun starts ranks with it): an entry point,
# part of the wiring at the top like cli.py, not a module of the core.
ENTRY_POINTS = {"gft.__main__"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, name: str) -> set[str]:
    """Every module `path` (module `name`) imports, at the top or inside a function,
    including `from pkg import submodule` (as pkg.submodule) and relative imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from ..y import z
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)
    return out


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (a submodule import also runs its parent
    packages' __init__, so those count too)."""
    root = package.parent
    files = {module_name(p, root): p for p in sorted(package.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for imported in imported_names(path, name):
            parts = imported.split(".")
            deps.update(m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1))
                        if m in files)
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def upward_imports(package: Path) -> list[str]:
    root = package.parent
    found = []
    for path in sorted(package.rglob("*.py")):
        name = module_name(path, root)
        if name in ENTRY_POINTS:
            continue
        for imported in sorted(imported_names(path, name)):
            if imported.split(".")[0] in UPWARD:
                found.append(f"{path.relative_to(root)} imports {imported}")
    return found


def test_gft_imports_nothing_from_backends_or_cli():
    assert upward_imports(ROOT / "gft") == []


def test_gft_modules_import_each_other_without_a_circle():
    graph = import_graph(ROOT / "gft")
    assert "gft.run" in graph and "gft.backend" in graph["gft.run"]  # the walk sees the code
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


# The checks themselves, on a made-up package: each must catch what it is for.

def write_package(tmp_path: Path, files: dict[str, str]) -> Path:
    package = tmp_path / "pkg"
    for rel, text in {"__init__.py": "", **files}.items():
        (package / rel).parent.mkdir(parents=True, exist_ok=True)
        (package / rel).write_text(text)
    return package


@pytest.mark.parametrize("source", [
    "import backends\n",
    "from backends import load_backend\n",
    "def f():\n    from backends.torch_backend import load\n",
    "def f():\n    import cli\n",
])
def test_an_upward_import_anywhere_is_found(tmp_path, source):
    package = write_package(tmp_path, {"a.py": source})
    assert upward_imports(package)


def test_a_circle_through_a_late_import_is_found(tmp_path):
    package = write_package(tmp_path, {
        "a.py": "from pkg.b import x\n",
        "b.py": "x = 1\ndef f():\n    from pkg import c\n",
        "c.py": "import pkg.a\n",
    })
    assert find_cycle(import_graph(package)) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    (package / "c.py").write_text("import numpy\n")
    assert find_cycle(import_graph(package)) is None


def test_gft_loads_without_backends_and_says_how_to_wire_them():
    """gft.run imports without the backends package; loading a backend before it is
    registered is a clear error, not an ImportError or a None deep in a run."""
    import subprocess
    import sys
    code = ("import sys, gft.run, gft.backend\n"
            "assert 'backends' not in sys.modules\n"
            "try:\n    gft.backend.provider()\n"
            "except RuntimeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert "import backends" in out
    import backends  # what cli.py does
    from gft.backend import provider
    assert provider() is backends
