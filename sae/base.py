"""What every architecture module provides, and the registry of architectures.

An architecture is a module exposing pure functions over explicit pytrees:

* ``Config``: frozen dataclass (``arch`` class attribute names it);
* ``init(cfg, key, d, sample) -> (params, state)``; ``sample`` is a scaled [N, d] float32 array;
* ``encode(cfg, params, state, x) -> f`` (dense [B, n]) and ``decode(cfg, params, f) -> x̂``;
* ``loss(cfg, params, state, batch, ctx) -> (loss, aux)`` with aux keys ``err``, ``var`` (FVU
  terms), ``l0``, ``fires`` ([n] count of tokens on which each latent fired), ``recon`` (x − x̂ sum sq);
* ``update_state(cfg, state, aux, step) -> state`` for the updates that are not gradients;
* ``project_grads(cfg, params, grads)`` and ``constrain(cfg, params)`` (unit-norm machinery);
* ``fold_scale(cfg, params, state, s) -> (params, state)``: inference form taking raw activations;
* ``input_scale_target(cfg) -> str`` (see ``common.estimate_input_scale``);
* ``partition_specs(cfg) -> Params`` of PartitionSpecs;
* optionally ``SKIPS_AUX_WITHOUT_DEAD = True`` when ``loss`` reads ``ctx.dead`` only for AuxK (through
  ``common.auxk_loss``): the trainer then checks before each step whether any latent is dead and,
  when none is, passes ``dead=None`` so the step is compiled without the AuxK branch at all.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import jax
from flax import struct


@struct.dataclass
class StepCtx:
    """Per-step context the trainer hands to ``loss``."""

    dead: jax.Array | None
    """bool [n]: latents that have not fired within the dead window (in tokens); None when the
    trainer checked that none has (see ``SKIPS_AUX_WITHOUT_DEAD``)."""
    progress: jax.Array
    """float scalar in [0, 1]: fraction of training steps done (for coefficient warmups)."""
    k_active: jax.Array | None = None
    """int scalar: this member's k when a sweep vmaps TopK members of several k in one step (the
    config then holds the largest, and picks past ``k_active`` are zeroed); None otherwise."""


def registry() -> dict[str, types.ModuleType]:
    """Architecture name (its config's ``arch``) → module, for every module in ``sae.archs``."""
    import importlib

    from sae.archs import ARCH_MODULES

    modules = (importlib.import_module(f"sae.{name}") for name in ARCH_MODULES)
    return {m.Config.arch: m for m in modules}


def arch_module(name: str) -> types.ModuleType:
    reg = registry()
    if name not in reg:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(reg)} (--arch)")
    return reg[name]


def config_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def make_config(cls: type, values: dict[str, Any]) -> Any:
    """Build a frozen config from a dict, refusing unknown keys with the list of valid ones."""
    names = config_fields(cls)
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} field(s) {unknown}; valid fields are {names}"
        )
    cfg = cls(**values)
    check = getattr(cfg, "validate", None)
    if check is not None:
        check()
    return cfg
