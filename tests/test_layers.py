"""Imports point one way: core <- passes <- exporters <- runtime <- API <- CLI, with the benchmark
scripts and the other engines' checks on top, and no module reaches back into one that imports it.
Checked on the source (every import statement, lazy ones inside functions and relative ones
included), not on what happens to be loaded."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Folder (as mapped in pyproject's package-dir) -> (its package, the layer its modules belong to).
FOLDERS = {
    "ffnfusion/core": ("ffnfusion.core", "core"),
    "passes": ("ffnfusion.passes", "passes"),
    "exporters": ("ffnfusion.exporters", "exporters"),
    "runtime": ("ffnfusion.runtime", "runtime"),
    "ffnfusion/cli": ("ffnfusion.cli", "cli"),
    "ffnfusion/checks": ("ffnfusion.checks", "checks"),
    "ffnfusion/benchmarks": ("ffnfusion.benchmarks", "benchmarks"),
}
API_MODULES = {"ffnfusion": "ffnfusion/__init__.py", "ffnfusion.api": "ffnfusion/api.py",
               "ffnfusion.olive": "ffnfusion/olive.py"}
API = ("ffnfusion.api", "ffnfusion.olive")  # the root package `ffnfusion` itself counts as the API
UPPER = ("ffnfusion.cli", "ffnfusion.benchmarks", "ffnfusion.checks")
FORBIDDEN = {  # layer -> what it must not import (ffnfusion packages, third-party roots)
    "core": ("ffnfusion.passes", "ffnfusion.exporters", "ffnfusion.runtime", *API, *UPPER, "onnxruntime", "torch"),
    "passes": ("ffnfusion.exporters", "ffnfusion.runtime", *API, *UPPER, "onnxruntime", "torch"),
    "exporters": ("ffnfusion.runtime", *API, *UPPER, "onnxruntime"),
    "runtime": (*API, *UPPER),
    "api": UPPER,
    # The CLI is a thin front over the library; the benchmark scripts and engine checks may use it.
    "cli": ("ffnfusion.benchmarks", "ffnfusion.checks"),
    "checks": ("ffnfusion.benchmarks",),
    "benchmarks": (),
}


def module_files() -> dict[str, tuple[pathlib.Path, str]]:
    """Module name -> (file, layer), for every module of the package (tests beside passes excluded)."""
    found = {name: (ROOT / path, "api") for name, path in API_MODULES.items()}
    for folder, (package, layer) in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name.endswith("_test.py"):
                continue
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts[:-1])) if parts[-1] == "__init__" else ".".join((package, *parts))
            found[name] = (path, layer)
    return found


MODULES = module_files()


def imports_of(path: pathlib.Path, module: str = "") -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import in ``path`` (``module``: its own name, to resolve
    relative imports). ``from package import name`` is ``package.name`` when that is a module of
    ours, else ``package`` itself."""
    is_package = path.name == "__init__.py"
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[:len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                names.append((node.lineno, full if full in MODULES or not base.startswith("ffnfusion") or
                              base == "ffnfusion" and full in API else base))
    return names


def covers(prefix: str, name: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_one_way(module):
    path, layer = MODULES[module]
    forbidden = FORBIDDEN[layer] + (("ffnfusion",) if layer not in ("api", "cli", "checks", "benchmarks") else ())
    bad = [f"line {line}: {name}" for line, name in imports_of(path, module)
           if any((covers(prefix, name) if prefix != "ffnfusion" else name == "ffnfusion") for prefix in forbidden)]
    assert not bad, f"{path.relative_to(ROOT)} ({layer}) imports an upper layer: {bad}"


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (a package import means its ``__init__``)."""
    graph = {}
    for module, (path, _) in MODULES.items():
        graph[module] = {name for _, name in imports_of(path, module) if name in MODULES and name != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    """A cycle of lazy imports works until someone moves an import to the top; none is allowed.
    A package's ``__init__`` re-exporting its own modules is not a cycle (it imports downward)."""
    graph = import_graph()
    for module in graph:  # a module importing its own package's re-exports is the same module set
        package = module.rsplit(".", 1)[0]
        graph[module] = {name for name in graph[module] if not (name == package and module.startswith(package + "."))}
    assert cycles(graph) == []


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from ffnfusion import cli\n    import onnxruntime as ort\n"
                      "from . import blocks\nfrom ..core.errors import FFNFusionError\nfrom ffnfusion import fuse_ffn\n")
    assert sorted(name for _, name in imports_of(sample, "ffnfusion.passes.sample")) == [
        "ffnfusion", "ffnfusion.cli", "ffnfusion.core.errors", "ffnfusion.passes.blocks", "onnxruntime"]


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_every_layer_has_modules():
    assert {layer for _, layer in MODULES.values()} == set(FORBIDDEN)
