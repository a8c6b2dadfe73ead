"""`saewb train` / `saewb runs` end to end on a real MiniLM harvest, and the checks before any work."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import sae
from sae import runs
from saewb.cli import main
from saewb.workspace import Workspace

HOOK = "blocks.1.hook_out"
BASE = [
    "--hook",
    HOOK,
    "--arch",
    "topk",
    "--n-latents",
    "64",
    "--k",
    "8",
    "--train-tokens",
    "4096",
    "--batch-size",
    "256",
    "--log-every",
    "4",
    "--ckpt-every",
    "8",
    "--init-sample-tokens",
    "1024",
    "--eval-tokens",
    "512",
    "--no-progress",
]


@pytest.fixture()
def ws(minilm_ws: Path, tmp_path: Path) -> Path:
    path = tmp_path / "ws.duckdb"
    shutil.copy(minilm_ws, path)  # the shared harvest stays read-only
    return path


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err


def test_bad_configs_refused_before_work(
    ws: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    w = ["train", "--workspace", str(ws), "--name", "r1"]
    _fails(capsys, [*w, *BASE[:4], "--arch", "nope"], "unknown architecture 'nope'", "topk")
    _fails(capsys, [*w, *BASE, "--k", "100"], "k=100 must be between 1 and n_latents=64")
    _fails(capsys, [*w, *BASE, "--hook", "blocks.9.hook_out"], "not in harvest", HOOK)
    _fails(capsys, [*w, *BASE, "--d-in", "768"], "d_in=768", "width 384")
    _fails(capsys, [*w, *BASE, "--l1-coef", "3"], "do not apply to arch 'topk'", "l1_coef")
    yaml_path = tmp_path / "bad.yaml"
    yaml_path.write_text(f"workspace: {ws}\nhook: {HOOK}\narch: topk\nname: r1\nn_latnets: 64\n")
    _fails(capsys, ["train", "--config", str(yaml_path)], "unknown option(s) ['n_latnets']", "n_latents")
    # nothing was started by any of these
    assert runs.list_runs(Workspace(ws)) == []
    assert not (Workspace(ws).runs_dir / "r1").exists()


def test_train_runs_resume_and_load(ws: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(
        f"workspace: {ws}\nname: my-run\n"
        + "".join(f"{BASE[i].lstrip('-')}: {BASE[i + 1]}\n" for i in range(0, len(BASE) - 1, 2))
        + "progress: false\n"
    )
    assert main(["train", "--config", str(yaml_path)]) == 0
    out = capsys.readouterr().out
    assert "run 'my-run' done" in out
    wsh = Workspace(ws)
    row = runs.get_run(wsh, "my-run")
    assert row is not None and row["status"] == "done" and row["arch"] == "topk" and row["hook"] == HOOK
    fm = row["final_metrics"]
    assert 0 < fm["fvu"] < 1 and fm["l0"] <= 8 and fm["eval_tokens"] >= 256
    hist = runs.run_metrics(wsh, "my-run")
    assert [h["step"] for h in hist] == [4, 8, 12, 16]
    assert all(h["tokens_per_s"] > 0 for h in hist)

    model = sae.load("my-run", workspace=ws)
    assert model.d == 384 and model.config.k == 8 and model.metrics["fvu"] == fm["fvu"]
    assert model.encode(np.zeros((2, 384), np.float32)).shape == (2, 64)

    # the same flags again: resumes from the last checkpoint (already complete) and changes nothing
    before = (Workspace(ws).runs_dir / "my-run" / "sae" / "params.safetensors").read_bytes()
    argv = ["train", "--workspace", str(ws), "--name", "my-run", *BASE]
    assert main(argv) == 0
    assert (Workspace(ws).runs_dir / "my-run" / "sae" / "params.safetensors").read_bytes() == before
    assert len(runs.run_metrics(wsh, "my-run")) == 4
    capsys.readouterr()

    # a different config under the same name is refused
    _fails(capsys, [*argv, "--k", "4"], "already exists with a different config", "--name")

    assert main(["runs", "--workspace", str(ws)]) == 0
    listing = capsys.readouterr().out
    assert "my-run" in listing and "done" in listing and f"{fm['fvu']:.4f}" in listing


def test_every_config_field_is_a_flag() -> None:
    from sae.cli import FLAG_TYPES
    from sae.orchestrate import all_config_fields

    assert set(FLAG_TYPES) == set(all_config_fields())


def test_configs_and_train_help_import_no_jax() -> None:
    """`sae.configs` and the `saewb train` parser (every config flag) load without JAX."""
    import subprocess
    import sys

    code = (
        "import sys, sae.configs, sae.archs; from saewb.cli import build_parser; build_parser(); "
        "loaded = sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'flax', 'optax'))); "
        "print(loaded or 'clean')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clean", out.stdout


def test_train_help_lists_every_config_option_with_its_help() -> None:
    import dataclasses
    import typing

    from conftest import run_saewb

    from sae.cli import config_flags
    from sae.configs import ARCH_CONFIGS, TrainConfig, field_docs

    out = run_saewb("train", "--help").stdout
    text = " ".join(out.split())
    squeezed = "".join(out.split())  # argparse wraps lines at spaces and after hyphens
    flags = config_flags()
    for cls in (TrainConfig, *ARCH_CONFIGS.values()):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert f"--{f.name.replace('_', '-')} {f.name.upper()}" in text, f.name
            if f.name in docs and flags[f.name].help.endswith(docs[f.name].replace("%", "%%")):
                assert "".join(docs[f.name].split()) in squeezed, f.name  # the first owner's docstring
            hint = typing.get_type_hints(cls)[f.name]
            if typing.get_origin(hint) is typing.Literal:
                assert flags[f.name].choices == typing.get_args(hint), f.name
    assert flags["decoder"].choices == ("free", "unit")
    assert flags["compute_dtype"].choices == ("float32", "bfloat16")


def test_literal_choices_are_enforced_by_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--decoder", "tied"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--decoder" in err and "invalid choice: 'tied'" in err and "'free', 'unit'" in err


def test_arch_configs_registry_matches_the_architecture_modules() -> None:
    from sae.base import registry
    from sae.configs import ARCH_CONFIGS

    reg = registry()
    assert list(reg) == list(ARCH_CONFIGS)
    assert all(reg[name].Config is cls for name, cls in ARCH_CONFIGS.items())
