"""The `saewb` command line, run as a user runs it."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import run_saewb


def test_help_lists_the_stages() -> None:
    out = run_saewb("--help").stdout
    for command in ("harvest", "hooks"):
        assert command in out


def test_harvest_help_documents_every_option() -> None:
    out = run_saewb("harvest", "--help").stdout
    for flag in (
        "--workspace",
        "--model",
        "--corpus",
        "--hook",
        "--ctx-len",
        "--max-tokens",
        "--name",
        "--text-column",
        "--whole-file",
        "--chat",
        "--batch-size",
        "--commit-tokens",
        "--device",
    ):
        assert flag in out
    flat = " ".join(out.split())
    assert "(default: blocks.2.hook_out)" in flat
    assert not re.search(r"\(default: [^)]*\) \(default:", flat), "an option states its default twice"


def test_harvest_cli_end_to_end_and_rerun_is_a_no_op(tmp_path: Path) -> None:
    ws = tmp_path / "ws.duckdb"
    args = [
        "harvest",
        "--model",
        "minilm",
        "--corpus",
        "stdlib-docs",
        "--hook",
        "blocks.2.hook_out",
        "--ctx-len",
        "128",
        "--max-tokens",
        "2000",
        "--workspace",
        str(ws),
        "--quiet",
    ]
    first = run_saewb(*args)
    assert "harvest 'default'" in first.stdout and "blocks.2.hook_out (d=384)" in first.stdout
    again = run_saewb(*args)
    assert "already complete" in again.stdout


def test_bad_input_gets_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    ws = str(tmp_path / "ws.duckdb")
    bad_hook = run_saewb(
        "harvest", "--workspace", ws, "--hook", "blocks.2.hook_ot", "--max-tokens", "100", check=False
    )
    assert bad_hook.returncode == 1
    assert "unknown hook 'blocks.2.hook_ot'" in bad_hook.stderr and "blocks.2.hook_out" in bad_hook.stderr
    assert "Traceback" not in bad_hook.stderr
    bad_corpus = run_saewb(
        "harvest", "--workspace", ws, "--corpus", "nope.txt", "--max-tokens", "100", check=False
    )
    assert bad_corpus.returncode == 1 and "neither a built-in" in bad_corpus.stderr


PRINT_TUNABLES = (
    "import os; from saewb.hugepages import reexec_with_huge_pages as r; r(); "
    "print(os.environ.get('GLIBC_TUNABLES', '-'), flush=True)"
)


def _run_reexec(env_extra: dict[str, str]) -> str:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "SAEWB_NO_HUGEPAGES")}
    out = subprocess.run(
        [sys.executable, "-c", PRINT_TUNABLES],
        env={**env, **env_extra},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_program_reexecutes_once_under_huge_page_malloc() -> None:
    import platform
    import sys

    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        assert _run_reexec({}) == "-"  # nothing to do elsewhere
        return
    assert (
        _run_reexec({}) == "glibc.malloc.hugetlb=1"
    )  # the same command again with the tunable (a loop would time out)
    # other tunables are kept; an explicit choice, or the opt-out, is left alone
    assert (
        _run_reexec({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
        == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    )
    assert _run_reexec({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == "glibc.malloc.hugetlb=0"
    assert _run_reexec({"SAEWB_NO_HUGEPAGES": "1"}) == "-"
