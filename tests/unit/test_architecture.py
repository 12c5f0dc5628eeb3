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
"""Which spade_batch layers, and which top-level modules by name, a layer's modules may import (top-level modules: any)."""
NEVER_IMPORT = {"method": {"ray"}, "formats": {"ray"}, "reports": {"ray"}}
"""Libraries a layer's modules never import, anywhere in them: the engine alone talks to Ray."""
NEVER_AT_MODULE_LEVEL = {"formats": {"torch"}}
"""Libraries a layer imports only inside functions: loading a model or reading a part file needs no torch."""
NOT_IN_METHOD = {"spade_batch.formats.locks": None, "spade_batch.formats.versions": {
    "holding_model_lock", "make_current", "resolve", "lineage", "next_number", "current_number", "version_numbers"}}
"""Locks and version planning are formats' (versions.adding_version holds the lock and plans the next version): method
imports nothing of formats.locks (None: no name) and none of these names of formats.versions."""


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


def layer(name: str) -> str | None:
    """The layer of a module in one (spade_batch.formats.card: "formats"); None for a top-level module."""
    parts = name.split(".")
    return parts[1] if len(parts) > 2 else None


def test_each_layer_imports_only_what_its_docstring_allows():
    def place(name: str) -> str:
        """A module's layer, or a top-level module's own name (spade_batch.config: "config")."""
        return layer(name) or name.split(".")[-1]

    wrong = [
        f"{name} imports {target}"
        for name, targets in import_graph().items()
        for target in targets
        if layer(name) and place(target) not in ALLOWED[layer(name)]
    ]
    assert not wrong, wrong


BOTTOM = {"spade_batch.config"}
"""Modules at the bottom of the import graph: they import nothing of spade_batch, so any layer may import them."""


def test_the_settings_sit_at_the_bottom_of_the_import_graph():
    graph = import_graph()
    assert {name: graph[name] for name in BOTTOM} == {name: set() for name in BOTTOM}
    assert all("config" in allowed for allowed in ALLOWED.values())


def external_imports(path: pathlib.Path) -> list[tuple[str, bool]]:
    """(top-level package, at module level) of every absolute import in `path`; at module level: outside any function."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name.split(".")[0], not in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module.split(".")[0], not in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text()), False)
    return found


def test_no_layer_imports_a_library_it_must_not():
    wrong = [
        f"{name} imports {package}" + ("" if package in NEVER_IMPORT.get(layer(name), ()) else " at module level")
        for name, path in modules().items()
        for package, module_level in external_imports(path)
        if package in NEVER_IMPORT.get(layer(name), ()) or (module_level and package in NEVER_AT_MODULE_LEVEL.get(layer(name), ()))
    ]
    assert not wrong, wrong


def test_the_method_takes_no_lock_and_plans_no_version():
    wrong = []
    for name, path in modules().items():
        if layer(name) != "method":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in NOT_IN_METHOD:
                forbidden = NOT_IN_METHOD[node.module]
                wrong += [f"{name} imports {node.module}.{alias.name}" for alias in node.names if forbidden is None or alias.name in forbidden]
            elif isinstance(node, ast.Import):
                wrong += [f"{name} imports {alias.name}" for alias in node.names if alias.name in NOT_IN_METHOD]
    assert not wrong, wrong


def test_the_checks_see_what_they_look_for(tmp_path):
    """The checks above find an import of each kind they forbid (so a passing check is not a blind one)."""
    sample = tmp_path / "sample.py"
    sample.write_text("import ray.data\nfrom torch import nn\n\ndef f():\n    import torch\n    from ray import get\n")
    assert external_imports(sample) == [("ray", True), ("torch", True), ("torch", False), ("ray", False)]
    assert layer("spade_batch.formats.card") == "formats" and layer("spade_batch.config") is None


def test_the_layers_state_what_they_may_import():
    for folder in ALLOWED:
        doc = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text()))
        assert doc and "May import" in doc, folder
