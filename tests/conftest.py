from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
SAEWB = [sys.executable, "-m", "saewb.cli"]


def run_saewb(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess, as a user would."""
    proc = subprocess.run([*SAEWB, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"saewb {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import build_tiny_gpt2

    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def minilm_ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real MiniLM harvest of the built-in corpus, two hooks, shared by read-only tests."""
    from activations.harvest import HarvestConfig, run_harvest

    path = tmp_path_factory.mktemp("ws") / "minilm.duckdb"
    cfg = HarvestConfig(
        model="minilm",
        corpus="stdlib-docs",
        hooks=("blocks.1.hook_out", "blocks.2.hook_resid_post"),
        ctx_len=64,
        max_tokens=6000,
        commit_tokens=2000,
    )
    run_harvest(cfg, path, progress=False)
    return path


@pytest.fixture(scope="session")
def demo_ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small end-to-end workspace, made with the CLI as `make demo` does: harvest, train, analyze."""
    path = tmp_path_factory.mktemp("demo") / "demo.duckdb"
    run_saewb(
        "harvest",
        "--model",
        "minilm",
        "--corpus",
        "stdlib-docs",
        "--hook",
        "blocks.2.hook_out",
        "--ctx-len",
        "64",
        "--max-tokens",
        "8000",
        "--workspace",
        str(path),
        "--quiet",
    )
    run_saewb(
        "train",
        "--workspace",
        str(path),
        "--hook",
        "blocks.2.hook_out",
        "--arch",
        "topk",
        "--n-latents",
        "512",
        "--k",
        "16",
        "--train-tokens",
        "40000",
        "--batch-size",
        "1024",
        "--seed",
        "0",
        "--name",
        "demo",
    )
    run_saewb("analyze", "demo", "--workspace", str(path))
    return path


TINY_LM_HOOK = "blocks.0.hook_out"
"""The middle of tiny-lm: the residual stream between its two blocks."""


@pytest.fixture(scope="session")
def tiny_lm_api(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The built-in causal LM `tiny-lm` end to end through the Python API (`import saewb`), in-process and
    small: harvest, train run `lm`, analyze. The API's result of each stage by name, and the workspace."""
    import saewb

    path = tmp_path_factory.mktemp("tiny-lm") / "tiny_lm.duckdb"
    harvest = saewb.harvest(
        path,
        saewb.HarvestConfig(
            model="tiny-lm",
            corpus="stdlib-docs",
            hooks=(TINY_LM_HOOK,),
            ctx_len=64,
            max_tokens=12_000,
            commit_tokens=6000,
        ),
        progress=False,
    )
    run = saewb.train(
        path,
        saewb.TopKConfig(n_latents=256, k=16),
        saewb.TrainConfig(train_tokens=40_000, batch_size=1024, seed=0, log_every=10),
        hook=TINY_LM_HOOK,
        name="lm",
        eval_tokens=2048,
        progress=False,
    )
    analysis = saewb.analyze(path, "lm", batch_size=1024, progress=False)
    return {"workspace": path, "harvest": harvest, "run": run, "analysis": analysis}


@pytest.fixture(scope="session")
def tiny_lm_ws(tiny_lm_api: dict[str, Any]) -> Path:
    """The workspace of `tiny_lm_api`: a tiny-lm harvest, run `lm` trained and analysed."""
    return tiny_lm_api["workspace"]


@pytest.fixture(scope="session")
def smollm2_chat() -> object:
    """The built-in SmolLM2 explainer, loaded once (analysis/llm.py)."""
    from analysis.llm import LocalChat

    return LocalChat(batch_size=16)


EXPLAIN_TEST_CONFIG = {
    "n_top_shown": 3,
    "n_band_shown": 1,
    "n_score": 2,
    "n_embed": 4,
    "window": 4,
    "explain_tokens": 8,
    "pool": 60,
}
"""Small prompts and short answers: the real SmolLM2 in seconds, not minutes."""


@pytest.fixture(scope="session")
def explained_ws(demo_ws: Path, smollm2_chat: object, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the demo workspace with two live latents explained and scored by the real SmolLM2."""
    import shutil

    from analysis import tables
    from analysis.autointerp import ExplainConfig, explain_run, select_latents

    path = tmp_path_factory.mktemp("explained") / "demo.duckdb"
    shutil.copy(demo_ws, path)
    latents = select_latents(tables.latent_summary(path, "demo"), sample=2, seed=0)
    explain_run(path, "demo", smollm2_chat, ExplainConfig(**EXPLAIN_TEST_CONFIG), latents=latents)
    return path
