"""The docs cannot drift: the config reference is regenerated and compared, every CLI command is
documented, and every relative link in README.md and docs/ points at a file that exists."""

from __future__ import annotations

import dataclasses
import importlib.util
import re

from conftest import REPO

DOCS = REPO / "docs"


def _generator(name: str = "gen_config_reference"):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_config_reference_is_current() -> None:
    from sae.base import registry

    text = _generator().render()
    committed = (DOCS / "config_reference.md").read_text()
    assert committed == text, (
        "docs/config_reference.md is stale: run `python scripts/gen_config_reference.py`"
    )
    for arch, mod in registry().items():  # generic over the registry: every arch and every field
        assert f"`--arch {arch}`" in text
        for name in (f.name for f in dataclasses.fields(mod.Config)):
            assert f"`--{name.replace('_', '-')}`" in text, (arch, name)


def test_api_reference_is_current() -> None:
    import saewb

    text = _generator("gen_api_reference").render()
    assert (DOCS / "api.md").read_text() == text, (
        "docs/api.md is stale: run `python scripts/gen_api_reference.py`"
    )
    for name in saewb.API:  # every function and result class of `import saewb`, with its docstring
        assert f"### `saewb.{name}" in text and getattr(saewb, name).__doc__, name


def test_every_cli_command_is_documented() -> None:
    from saewb.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    cli_md = (DOCS / "cli.md").read_text()
    missing = [c for c in sub.choices if f"## saewb {c}\n" not in cli_md]
    assert not missing, f"docs/cli.md has no section for {missing}"


def test_links_resolve() -> None:
    pages = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
    readme = pages[0].read_text()
    for page in ("concepts.md", "cli.md", "config_reference.md", "models.md", "metrics.md", "storage.md"):
        assert f"docs/{page}" in readme, f"README.md does not link docs/{page}"
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken


def test_every_table_is_listed_with_its_owner() -> None:
    """docs/concepts.md lists every workspace table the code creates, with the module that creates it
    (its one owner) in the owner column."""
    text = (DOCS / "concepts.md").read_text()
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()]
    listed = [(r[0], r[1]) for r in rows if len(r) == 4 and r[0].startswith("`")]
    created: dict[str, str] = {}
    for package in ("activations", "analysis", "app", "sae", "saewb"):
        for path in sorted((REPO / package).rglob("*.py")):
            for name in re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", path.read_text()):
                created[name] = path.relative_to(REPO).as_posix()
    assert {"tokens", "runs", "latent_labels", "nonfinite_tokens"} <= set(created)
    wrong = [
        f"{name} ({owner})"
        for name, owner in created.items()
        if not any(f"`{name}`" in tables and f"`{owner}`" in owners for tables, owners in listed)
    ]
    assert not wrong, f"docs/concepts.md does not list these tables with their owner module: {wrong}"
    assert "`reason`" in text  # the runs column issue 23 added
