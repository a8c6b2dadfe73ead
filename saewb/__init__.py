"""SAE Workbench: the `saewb` command line, the shared workspace, and the Python API for notebooks.

    import saewb
    saewb.harvest("ws.duckdb", model="minilm", hooks="blocks.2.hook_out", max_tokens=4000)
    run = saewb.train("ws.duckdb", saewb.TopKConfig(n_latents=256, k=8), hook="blocks.2.hook_out",
                      name="quick", train_tokens=16_384)

The API lives in ``saewb.api`` (see docs/api.md) and the config classes in ``sae.configs``,
``activations.harvest``, ``analysis.features`` and ``analysis.autointerp``; both are imported on
first use, so `saewb --help` (which imports this package) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

API = (
    "harvest",
    "train",
    "fit",
    "sweep",
    "evaluate",
    "compare",
    "analyze",
    "explain",
    "intervene",
    "load",
    "sql",
    "Harvest",
    "Run",
    "Fitted",
    "Sweep",
    "Evaluation",
    "Analysis",
    "Latent",
    "Explanations",
    "InterventionResult",
)
"""What ``import saewb`` offers, from ``saewb.api``."""
CONFIGS = {
    "HarvestConfig": "activations.harvest",
    "AnalyzeConfig": "analysis.features",
    "ExplainConfig": "analysis.autointerp",
    "TrainConfig": "sae.configs",
    "TopKConfig": "sae.configs",
    "BatchTopKConfig": "sae.configs",
    "MatryoshkaConfig": "sae.configs",
    "HierarchicalTopKConfig": "sae.configs",
    "JumpReLUConfig": "sae.configs",
    "ReluL1Config": "sae.configs",
    "GBAConfig": "sae.configs",
    "FeatureChoiceConfig": "sae.configs",
    "MaskedConfig": "sae.configs",
    "ITDAConfig": "sae.configs",
    "UsageError": "saewb.errors",
}
"""The typed configs the CLI is built from (and the API's error), re-exported."""

__all__ = [*API, *CONFIGS]


def __getattr__(name: str) -> Any:
    if name in API:
        return getattr(importlib.import_module("saewb.api"), name)
    if name in CONFIGS:
        return getattr(importlib.import_module(CONFIGS[name]), name)
    raise AttributeError(f"module 'saewb' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
