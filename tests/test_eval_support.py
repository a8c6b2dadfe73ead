"""Shared, cached builders for the evaluation / intervention / probing tests (no tests here).

Models and tiny trained SAEs are built once per test session: loading a model or training costs
seconds on a busy 2-core machine, and every test reads them without changing them.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

TRAIN = {
    "arch": "topk",
    "n_latents": 128,
    "k": 8,
    "train_tokens": 8192,
    "batch_size": 1024,
    "seed": 0,
    "name": "t",
    "progress": False,
    "eval_tokens": 4096,
}


def _train(ws: Path, hook: str, **extra: Any) -> None:
    from sae.cli import plan_from_values, run_plan

    run_plan(plan_from_values({**TRAIN, "workspace": str(ws), "hook": hook, **extra}))


@functools.cache
def gpt2_workspace(base: str, model_dir: str) -> Path:
    """A tiny-GPT-2 harvest at blocks.0.hook_out with a trained TopK run named `t`."""
    from activations.harvest import HarvestConfig, run_harvest

    ws = Path(base) / "gpt2.duckdb"
    cfg = HarvestConfig(
        model=model_dir,
        corpus="stdlib-docs",
        hooks=("blocks.0.hook_out",),
        ctx_len=32,
        max_tokens=8000,
        commit_tokens=4000,
    )
    run_harvest(cfg, ws, progress=False)
    _train(ws, "blocks.0.hook_out")
    return ws


@functools.cache
def minilm_context(minilm_ws: str) -> Any:
    """A data-initialised (untrained) TopK SAE on MiniLM's blocks.2.hook_out, as a RunContext.

    The encoder paths only need a real SAE of the right width; training a second one would double
    the JAX compile time of this test set. The shared harvest is only read.
    """
    import jax

    from activations.store import harvest_info
    from activations.stream import ActivationStream
    from analysis.runs import RunContext
    from sae.api import SAE
    from sae.base import arch_module, make_config
    from saewb.workspace import Workspace

    ws = Workspace(minilm_ws)
    hook = "blocks.2.hook_out"
    info = harvest_info(ws)
    sample = next(ActivationStream(ws, hook, batch_size=1024, seed=0).batches())
    arch = arch_module("topk")
    cfg = make_config(arch.Config, {"n_latents": 128, "k": 8})
    params, state = arch.init(cfg, jax.random.PRNGKey(0), info.hooks[hook], sample)
    sae = SAE(cfg, params, state, info.hooks[hook])
    return RunContext(ws, "init", sae, hook, info.name, "minilm", int(info.config["identity"]["ctx_len"]))


@functools.cache
def model(name: str) -> Any:
    from activations.models import load_model

    return load_model(name)


@functools.cache
def run_context(ws: str) -> Any:
    from analysis.runs import load_run

    return load_run(ws, "t")
