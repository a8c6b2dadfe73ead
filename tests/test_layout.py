"""The layout rules a parser can check: modules use each other's public names only."""

from __future__ import annotations

import ast

from conftest import REPO

PACKAGES = ("activations", "analysis", "app", "sae", "saewb")
CHECKED = (*PACKAGES, "benchmarks", "scripts")


def _ours(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_name_is_used_across_modules() -> None:
    """`from pkg.mod import _helper` and `mod._helper` (mod one of our modules) are refused: what
    another module needs gets a public name."""
    found = []
    for pkg in CHECKED:
        for path in sorted((REPO / pkg).rglob("*.py")):
            where = path.relative_to(REPO).as_posix()
            tree = ast.parse(path.read_text())
            aliases: set[str] = set()  # names bound to one of our modules
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.ImportFrom)
                    and node.module
                    and _ours(node.module)
                    and node.level == 0
                ):
                    for a in node.names:
                        if _private(a.name):
                            found.append(f"{where}: from {node.module} import {a.name}")
                        elif (REPO / node.module.replace(".", "/") / f"{a.name}.py").exists():
                            aliases.add(a.asname or a.name)
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        if _ours(a.name):
                            aliases.add(a.asname or a.name.split(".")[0])
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.Attribute)
                    and _private(node.attr)
                    and isinstance(node.value, ast.Name)
                    and node.value.id in aliases
                ):
                    found.append(f"{where}: {node.value.id}.{node.attr}")
    assert not found, found
