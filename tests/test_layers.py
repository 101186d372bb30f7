"""Imports point one way: core <- passes <- exporters <- runtime <- API <- CLI. Checked on the source
(every import statement, lazy ones inside functions included), not on what happens to be loaded."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Folder (as mapped in pyproject's package-dir) -> the layer its modules belong to.
LAYERS = {"ffnfusion/core": "core", "passes": "passes", "exporters": "exporters", "runtime": "runtime"}
ALLOWED = {  # layer -> the ffnfusion packages (and third-party roots) it must not import
    "core": {"forbidden": ("ffnfusion.passes", "ffnfusion.exporters", "ffnfusion.runtime", "ffnfusion.cli",
                           "ffnfusion.api", "ffnfusion.benchmarks", "onnxruntime", "torch")},
    "passes": {"forbidden": ("ffnfusion.exporters", "ffnfusion.runtime", "ffnfusion.cli", "ffnfusion.api",
                             "ffnfusion.benchmarks", "onnxruntime", "torch")},
    "exporters": {"forbidden": ("ffnfusion.runtime", "ffnfusion.cli", "ffnfusion.api", "ffnfusion.benchmarks",
                                "onnxruntime")},
    "runtime": {"forbidden": ("ffnfusion.cli", "ffnfusion.api", "ffnfusion.benchmarks")},
    "api": {"forbidden": ("ffnfusion.cli", "ffnfusion.benchmarks")},
}


def imports_of(path: pathlib.Path) -> list[tuple[int, str]]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from ffnfusion import cli` imports ffnfusion.cli
            names += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return names


def modules():
    for folder, layer in LAYERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if not path.name.endswith("_test.py"):
                yield layer, path
    yield "api", ROOT / "ffnfusion" / "api.py"
    yield "api", ROOT / "ffnfusion" / "olive.py"


@pytest.mark.parametrize(("layer", "path"), list(modules()), ids=lambda p: str(p).replace(str(ROOT) + "/", ""))
def test_imports_point_one_way(layer, path):
    bad = [f"line {line}: {name}" for line, name in imports_of(path)
           for prefix in ALLOWED[layer]["forbidden"] if name == prefix or name.startswith(prefix + ".")]
    assert not bad, f"{path.relative_to(ROOT)} ({layer}) imports an upper layer: {bad}"


def test_the_checker_sees_lazy_imports(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from ffnfusion import cli\n    import onnxruntime as ort\n")
    assert [name for _, name in imports_of(sample)] == ["ffnfusion.cli", "onnxruntime"]


def test_every_layer_folder_has_modules():
    assert {layer for layer, _ in modules()} == set(ALLOWED)
