"""What every architecture module provides (``Architecture``), and the registry of architectures.

An architecture is a module exposing pure functions over explicit pytrees; ``Architecture`` below
is that contract, written once: its required members, then ``OPTIONAL`` (the members a module may
leave out, each with what leaving it out means). Code outside an architecture reads an optional
member with ``optional(arch, name)`` and never switches on an architecture's name: what differs
between architectures (inference form, export form, decoder rows) lives in its module.
``tests/test_arch_conformance.py`` checks every registered module against the contract.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Protocol

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


class Architecture(Protocol):
    """The members every architecture module has (checked by tests/test_arch_conformance.py).

    The gradient members (``loss`` ... ``constrain``) are required of the architectures the trainer
    trains; one with its own fit (``sae.archs.OWN_FIT``) has ``fit`` instead (the signature and
    result of ``sae.trainer.train``).
    """

    Config: type
    """Frozen dataclass; its ``arch`` class attribute names the architecture."""

    def init(self, cfg: Any, key: jax.Array, d: int, sample: Any) -> tuple[Any, Any]:
        """(params, state); ``sample`` is a scaled [N, d] float32 array."""

    def encode(self, cfg: Any, params: Any, state: Any, x: jax.Array) -> jax.Array:
        """Dense latents [B, n] of a batch [B, d]."""

    def decode(self, cfg: Any, params: Any, f: jax.Array) -> jax.Array:
        """The reconstruction [B, d] of latents [B, n]."""

    def loss(
        self, cfg: Any, params: Any, state: Any, batch: jax.Array, ctx: StepCtx
    ) -> tuple[jax.Array, dict]:
        """(loss, aux) with aux keys ``err``, ``var`` (FVU terms), ``l0``, ``fires`` ([n] count of
        tokens on which each latent fired), ``recon`` (x − x̂ sum sq)."""

    def update_state(self, cfg: Any, state: Any, aux: dict, step: jax.Array) -> Any:
        """The state updates that are not gradients."""

    def project_grads(self, cfg: Any, params: Any, grads: Any) -> Any:
        """Decoder gradients with the component along each unit row removed (unit-norm machinery)."""

    def constrain(self, cfg: Any, params: Any) -> Any:
        """Params after an optimiser step, renormalised."""

    def fold_scale(self, cfg: Any, params: Any, state: Any, s: float) -> tuple[Any, Any]:
        """The inference form, taking raw activations (the input scale ``s`` folded in)."""

    def input_scale_target(self, cfg: Any) -> str:
        """What the input scale aims at (see ``common.estimate_input_scale``)."""

    def partition_specs(self, cfg: Any) -> Any:
        """Params of PartitionSpecs (how a mesh splits them)."""


OPTIONAL: dict[str, str] = {
    "SKIPS_AUX_WITHOUT_DEAD": "True when ``loss`` reads ``ctx.dead`` only for AuxK (through ``common.auxk_loss``): "
    "the trainer then passes ``dead=None`` when no latent is dead, and the step is compiled without AuxK. "
    "Left out: False.",
    "resample_due": "``(cfg, step, total_steps) -> bool``: whether to resample dead latents after this step "
    "(host code, with ``resample``). Left out: never.",
    "resample": "``(cfg, params, state, batch, dead, seed) -> (params, reset mask or None)``: dead-latent "
    "resampling (the mask marks the entries whose Adam moments restart; None: none do).",
    "lr_scales": "``(cfg, peak_lr) -> params-shaped tree of floats, or None``: factors on each parameter's Adam step. "
    "Left out (or None): 1 everywhere, and no extra optimiser stage.",
    "vmaps_k": "``(cfg) -> bool``: sweep members differing only in k may share one vmapped step "
    "(``StepCtx.k_active``). Left out: False.",
    "latent_count": "``(cfg, params) -> int``: latents not fixed by the config (ITDA). Left out: ``cfg.n_latents``.",
    "load_saved": "``(cfg, path, manifest) -> (params, state, metrics)``: read a saved SAE or checkpoint whose "
    "sizes come from the manifest. Left out: read into ``init``'s templates.",
    "state_partition_specs": "``(cfg) -> state of PartitionSpecs``. Left out: per-latent arrays split by shape.",
    "decoder_rows": "``(cfg, params) -> [n, d]``: the dictionary atoms (not unit). Left out: ``params.W_dec``.",
    "saelens_export": "``(model) -> (cfg fields, weights)``: the SAELens form of a loaded SAE (``sae.interop``). "
    "Left out: not exportable.",
    "SAELENS_IMPORTS": "The SAELens architectures ``saelens_import`` reads. Left out: none.",
    "saelens_import": "``(cfg.json dict, weights, where) -> (config, params, state)``: our SAE equal to an SAELens one "
    "(the generic checks are ``sae.interop.from_saelens``'s).",
    "fit": "``fit(cfg, tc, batches, ...)``: its own fit, for the architectures in ``sae.archs.OWN_FIT``.",
}
"""The members an architecture module may leave out, and what leaving each out means."""


def _decoder_rows(cfg: Any, params: Any) -> Any:
    return params.W_dec


def _latent_count(cfg: Any, params: Any) -> int:
    return int(cfg.n_latents)


_DEFAULTS: dict[str, Any] = {
    "SKIPS_AUX_WITHOUT_DEAD": False,
    "SAELENS_IMPORTS": (),
    "vmaps_k": lambda cfg: False,
    "latent_count": _latent_count,
    "decoder_rows": _decoder_rows,
}


def optional(arch: types.ModuleType, name: str) -> Any:
    """An architecture's optional member ``name`` (see ``OPTIONAL``), its default, or None when
    leaving it out means "not supported"."""
    if name not in OPTIONAL:
        raise KeyError(f"{name!r} is not an optional architecture member; they are {sorted(OPTIONAL)}")
    return getattr(arch, name, _DEFAULTS.get(name))


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
    """Build a frozen config from a dict, refusing unknown keys with the list of valid ones (a saved
    config's ``cls.retired`` fields, from earlier versions, are dropped so old runs still load)."""
    names = config_fields(cls)
    values = {k: v for k, v in values.items() if k not in getattr(cls, "retired", ())}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid fields are {names}")
    cfg = cls(**values)
    if getattr(cfg, "validate", None) is not None:
        validate_config(cfg)
    return cfg


def saved_config(cls: type, values: dict[str, Any]) -> Any:
    """A config read back from a saved run's record: a field added after the run was saved
    (``cls.introduced``) takes the value the run trained with, not today's default."""
    return make_config(cls, {**getattr(cls, "introduced", {}), **values})


def recorded_fields(cfg: Any) -> dict[str, Any]:
    """A config's fields for a run's record, less those at the value runs saved before the field
    existed trained with (``cfg.introduced``): such runs keep their identity and still resume."""
    introduced = getattr(cfg, "introduced", {})
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in introduced or v != introduced[k]}


# --------------------------------------------------------------------------- hyper-parameter ranges

_RANGE_TEXT = {
    ">0": "> 0",
    ">=0": ">= 0",
    ">=1": ">= 1",
    "[0,1]": "in [0, 1]",
    "[0,1)": "in [0, 1)",
    "(0,1)": "in (0, 1)",
    "(0,1]": "in (0, 1]",
}
_RANGE_TEST = {
    ">0": lambda v: v > 0,
    ">=0": lambda v: v >= 0,
    ">=1": lambda v: v >= 1,
    "[0,1]": lambda v: 0 <= v <= 1,
    "[0,1)": lambda v: 0 <= v < 1,
    "(0,1)": lambda v: 0 < v < 1,
    "(0,1]": lambda v: 0 < v <= 1,
}
RANGES: dict[str, str] = {
    # TrainConfig
    "train_tokens": ">=1",
    "batch_size": ">=1",
    "seed": ">=0",
    "lr": ">0",
    "warmup_steps": ">=0",
    "decay_frac": "[0,1]",
    "grad_clip": ">0",
    "adam_b1": "[0,1)",
    "adam_b2": "[0,1)",
    "adam_eps": ">0",
    "dead_window_tokens": ">=1",
    "outlier_ratio": ">=1",
    "dense_threshold": "[0,1]",
    "init_sample_tokens": ">=1",
    "log_every": ">=1",
    "ckpt_every": ">=1",
    "keep_checkpoints": ">=1",
    "mesh_data": ">=1",
    "mesh_model": ">=1",
    # architectures (a field name means the same thing in every architecture that has it)
    "n_latents": ">=1",
    "k": ">=1",
    "k_aux": ">=1",
    "k_aux_min_frac": "(0,1]",
    "init_fire_ratio": ">0",
    "aux_coef": ">=0",
    "init_dec_norm": ">0",
    "l1_coef": ">=0",
    "l1_warmup_frac": "[0,1]",
    "resample_every_frac": "[0,1)",
    "n_groups": ">=1",
    "htf": "(0,1]",
    "ltf": "(0,1]",
    "gamma": ">=0",
    "update_tokens": ">=1",
    "freq_eps": ">0",
    "band": ">=1",
    "init_a": ">0",
    "candidates": ">=1",
    "threshold_decay": "[0,1)",
    "threshold_start_step": ">=0",
    "threshold_start_frac": "[0,1]",
    "l0_coef": ">=0",
    "l0_warmup_frac": "[0,1]",
    "target_l0": ">0",
    "bandwidth": ">0",
    "init_threshold": ">=0",
    "threshold_lr_scale": ">0",
    "dead_preact_coef": ">=0",
    "chunk_size": ">=1",
    "group_sizes": ">=1",
    "zipf_alpha": ">=0",
    "aux_zipf_coef": ">=0",
    "aux_zipf_c": ">=0",
    "density_decay": "[0,1)",
    "visible_frac": "(0,1)",
    "tau": "(0,1)",
    "max_atoms": ">=1",
}
"""The allowed range of every numeric field of `TrainConfig` and of every architecture's config, by
field name: `check_ranges` applies it to any config dataclass, so training and sweeps check alike
(tests/test_faults.py checks that every numeric field of every config has an entry). The
architectures' own `validate` adds the checks that tie fields together (k <= n_latents, ...)."""


def range_text(rule: str) -> str:
    """A RANGES rule as the docs and the errors write it (`> 0`, `in [0, 1)`)."""
    return _RANGE_TEXT[rule]


def _is_numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_ranges(cfg: Any) -> None:
    """Refuse a config whose numeric fields are out of range, naming the flag and its range."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        rule = RANGES.get(f.name)
        if value is None or rule is None:
            continue
        for v in value if isinstance(value, tuple) else (value,):
            ok = _is_numeric(v) and math.isfinite(v) and _RANGE_TEST[rule](v)
            if ok and rule in (">=1", ">=0") and isinstance(f.default, int) and not isinstance(v, int):
                ok = float(v).is_integer()
            if not ok:
                flag = "--" + f.name.replace("_", "-")
                raise ValueError(
                    f"{flag} must be {range_text(rule)}, got {v!r}; fix {flag} (or `{f.name}:` in the YAML)"
                )


def validate_config(cfg: Any, d: int | None = None) -> None:
    """Every check of an SAE (architecture) config: the ranges above, then its own `validate(d)`."""
    check_ranges(cfg)
    cfg.validate(d)
