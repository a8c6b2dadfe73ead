"""The layout rules a parser can check: modules use each other's public names only."""

from __future__ import annotations

import ast

from conftest import REPO

PACKAGES = ("activations", "analysis", "app", "sae", "saewb")
CHECKED = (*PACKAGES, "benchmarks", "scripts", "tests")


def _ours(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def _private(name: str) -> bool:
    """``_x`` is private; ``__x__`` and IPython's display protocol ``_repr_html_`` are public."""
    return name.startswith("_") and not name.startswith("__") and not name.endswith("_")


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


def _private_names_of_packages() -> set[str]:
    """Every private function, class, module constant and attribute our packages define."""
    names: set[str] = set()
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    names.add(node.name)
                elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                    names.add(node.attr)
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    names.add(node.id)
    return {n for n in names if _private(n)}


def test_tests_use_public_names_only() -> None:
    """Tests check public behaviour: no `obj._member` (nor `setattr(obj, "_member", ...)`) naming a private
    member our packages define, on an object, an instance or a class alike."""
    ours = _private_names_of_packages()
    found = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        where = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ours:
                if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                    found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.Call) and ast.unparse(node.func).endswith(("setattr", "getattr")):
                named = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)]
                if named and named[0] in ours:
                    found.append(f"{where}:{node.lineno}: {ast.unparse(node.func)}(..., {named[0]!r})")
    assert not found, found
