"""The `saewb` command line, run as a user runs it."""

from __future__ import annotations

from pathlib import Path

from conftest import run_saewb


def test_help_lists_the_stages() -> None:
    out = run_saewb("--help").stdout
    for command in ("harvest", "hooks"):
        assert command in out


def test_harvest_help_documents_every_option() -> None:
    out = run_saewb("harvest", "--help").stdout
    for flag in ("--workspace", "--model", "--corpus", "--hook", "--ctx-len", "--max-tokens", "--name",
                 "--text-column", "--whole-file", "--chat", "--batch-size", "--commit-tokens", "--device"):
        assert flag in out


def test_harvest_cli_end_to_end_and_rerun_is_a_no_op(tmp_path: Path) -> None:
    ws = tmp_path / "ws.duckdb"
    args = ["harvest", "--model", "minilm", "--corpus", "stdlib-docs", "--hook", "blocks.2.hook_out",
            "--ctx-len", "128", "--max-tokens", "2000", "--workspace", str(ws), "--quiet"]
    first = run_saewb(*args)
    assert "harvest 'default'" in first.stdout and "blocks.2.hook_out (d=384)" in first.stdout
    again = run_saewb(*args)
    assert "already complete" in again.stdout


def test_bad_input_gets_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    ws = str(tmp_path / "ws.duckdb")
    bad_hook = run_saewb("harvest", "--workspace", ws, "--hook", "blocks.2.hook_ot", "--max-tokens", "100", check=False)
    assert bad_hook.returncode == 1
    assert "unknown hook 'blocks.2.hook_ot'" in bad_hook.stderr and "blocks.2.hook_out" in bad_hook.stderr
    assert "Traceback" not in bad_hook.stderr
    bad_corpus = run_saewb("harvest", "--workspace", ws, "--corpus", "nope.txt", "--max-tokens", "100", check=False)
    assert bad_corpus.returncode == 1 and "neither a built-in" in bad_corpus.stderr
