"""The public surface: `import plugin` names, `plugin.export` a plain function, backends independent of plugin."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import plugin

ROOT = Path(__file__).resolve().parents[1]


def test_every_public_name_resolves():
    for name in plugin.__all__:
        assert getattr(plugin, name) is not None, name


def test_export_is_a_function_even_after_the_converter_is_imported():
    import plugin.convert.fused

    assert inspect.isfunction(plugin.export)
    assert inspect.signature(plugin.export).parameters["target"].default == "npu"


def test_backends_never_import_plugin():
    offenders = []
    for path in (ROOT / "backends").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n == "plugin" or n.startswith("plugin.")]
    assert offenders == []
