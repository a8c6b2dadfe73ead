"""Sparse autoencoders in JAX, one file per architecture (registry: ``sae.archs``), one generic trainer.

    import sae
    model = sae.load("ws.runs/my-run")            # or sae.load("my-run", workspace="ws.duckdb")
    f = model.encode(x); x_hat = model.decode(f)  # numpy in → numpy out, jax in → jax out

Names are imported lazily so that `saewb --help` (which imports ``sae.cli``) does not load JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "SAE": "sae.api",
    "load": "sae.api",
    "GBAConfig": "sae.gba",
    "ReluL1Config": "sae.relu_l1",
    "TopKConfig": "sae.topk",
    "TrainConfig": "sae.trainer",
    "train": "sae.trainer",
    "evaluate": "sae.metrics",
}
_MODULES = (
    "gba",
    "relu_l1",
    "topk",
    "trainer",
    "checkpoint",
    "common",
    "runs",
    "api",
    "metrics",
    "sparse_ops",
)

__all__ = sorted([*_LAZY, *_MODULES])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _MODULES:
        return importlib.import_module(f"sae.{name}")
    raise AttributeError(f"module 'sae' has no attribute {name!r}")
