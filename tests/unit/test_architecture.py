"""The package's shape: no import cycle (type-only imports included) and each layer imports only what its
folder's docstring allows."""

from __future__ import annotations

import ast
import pathlib

import spade_batch

PACKAGE = pathlib.Path(spade_batch.__file__).parent
ALLOWED = {
    "method": {"method", "formats", "config"},
    "formats": {"formats", "config"},
    "engine": {"engine", "method", "formats", "config"},
    "reports": {"reports", "formats", "config", "method", "engine"},
}
"""Which spade_batch layers a layer's modules may import (top-level modules: any)."""


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(path: pathlib.Path, known: set[str]) -> set[str]:
    """Every spade_batch module `path` imports anywhere (top level, functions, TYPE_CHECKING blocks)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module for alias in node.names}
    return {name for name in found if name in known and name != "spade_batch"}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(path, set(found)) for name, path in found.items()}


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            assert state.get(target) != "open", "import cycle: " + " -> ".join([*trail, name, target])
            if target not in state:
                visit(target, [*trail, name])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_each_layer_imports_only_what_its_docstring_allows():
    def layer(name: str) -> str | None:
        parts = name.split(".")
        return parts[1] if len(parts) > 2 else None

    wrong = [
        f"{name} imports {target}"
        for name, targets in import_graph().items()
        for target in targets
        if layer(name) and (layer(target) or "top") not in ALLOWED[layer(name)] and target not in ("spade_batch.config",)
    ]
    assert not wrong, wrong


def test_the_layers_state_what_they_may_import():
    for folder in ALLOWED:
        doc = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text()))
        assert doc and "May import" in doc, folder
