"""ReLU SAE with an L1 penalty: Anthropic's April-2024 recipe, and the classic variant.

``variant="april"`` (default): f = ReLU(x W_enc + b_enc) (no pre-encoder bias); x̂ = f W_dec + b_dec;
loss = mean_batch ‖x − x̂‖² + λ · Σ_i f_i ‖W_dec,i‖; no norm constraint; decoder rows initialised
at norm 0.1 with W_enc = W_decᵀ; λ warmed up linearly over the first 5% of steps; inputs scaled so
E‖x‖ = √d; gradient clipping 1.0 (the trainer's).

``variant="classic"`` (Towards Monosemanticity, 2023): f = ReLU((x − b_dec) W_enc + b_enc), unit-norm
decoder (gradient projection + renormalisation), plain L1 λ·Σ|f|, and dead-latent resampling: at
each multiple of ``resample_every_frac`` of training, dead latents get decoder rows set to inputs
drawn with probability ∝ their squared reconstruction error (normalised), encoder columns set to
the same direction × 0.2 × the mean alive encoder norm, b_enc = 0, and their Adam moments reset.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sae import common
from sae.base import StepCtx
from sae.configs import ReluL1Config

Config = ReluL1Config


Params = common.LinearParams
State = common.StepState


def partition_specs(cfg: ReluL1Config) -> Params:
    return common.LINEAR_PARTITION_SPECS


def input_scale_target(cfg: ReluL1Config) -> str:
    return "norm_sqrt_d"


def init(cfg: ReluL1Config, key: jax.Array, d: int, sample: np.ndarray) -> tuple[Params, State]:
    cfg.validate()
    norm = cfg.init_dec_norm if cfg.variant == "april" else 1.0
    w_dec = common.random_unit_rows(key, cfg.n_latents, d, norm)
    b_dec = common.geometric_median(sample) if cfg.variant == "classic" else np.zeros(d, np.float32)
    params = Params(
        W_enc=w_dec.T,
        b_enc=jnp.zeros((cfg.n_latents,), jnp.float32),
        W_dec=w_dec,
        b_dec=jnp.asarray(b_dec),
    )
    return params, State(step=jnp.zeros((), jnp.int32))


def encode(cfg: ReluL1Config, params: Params, state: State, x: jax.Array) -> jax.Array:
    x_in = x - params.b_dec if cfg.variant == "classic" else x
    return jax.nn.relu(x_in @ params.W_enc + params.b_enc)


def decode(cfg: ReluL1Config, params: Params, f: jax.Array) -> jax.Array:
    return f @ params.W_dec + params.b_dec


def loss(
    cfg: ReluL1Config, params: Params, state: State, x: jax.Array, ctx: StepCtx
) -> tuple[jax.Array, dict[str, jax.Array]]:
    f = encode(cfg, params, state, x)
    x_hat = decode(cfg, params, f)
    err, var = common.fvu_terms(x, x_hat)
    mse = err / x.shape[0]
    if cfg.variant == "april":
        penalty = jnp.sum(f * jnp.linalg.norm(params.W_dec, axis=1)) / x.shape[0]
    else:
        penalty = jnp.sum(f) / x.shape[0]
    warm = jnp.minimum(1.0, ctx.progress / cfg.l1_warmup_frac) if cfg.l1_warmup_frac > 0 else 1.0
    on = f > 0
    return mse + cfg.l1_coef * warm * penalty, {
        "err": err,
        "var": var,
        "l0": jnp.mean(jnp.sum(on, axis=1).astype(jnp.float32)),
        "fires": jnp.sum(on, axis=0).astype(jnp.float32),
        "l1": penalty,
    }


def update_state(cfg: ReluL1Config, state: State, aux: dict[str, jax.Array], step: jax.Array) -> State:
    return state.replace(step=state.step + 1)


def project_grads(cfg: ReluL1Config, params: Params, grads: Params) -> Params:
    if cfg.variant != "classic":
        return grads
    return grads.replace(W_dec=common.remove_parallel_component(params.W_dec, grads.W_dec))


def constrain(cfg: ReluL1Config, params: Params) -> Params:
    if cfg.variant != "classic":
        return params
    return params.replace(W_dec=common.normalize_rows(params.W_dec))


def resample_due(cfg: ReluL1Config, step: int, total_steps: int) -> bool:
    """True when step (1-based, after the update) is at a resampling point."""
    return cfg.variant == "classic" and common.resample_due_every(cfg.resample_every_frac, step, total_steps)


def resample(
    cfg: ReluL1Config, params: Params, state: State, x: np.ndarray, dead: np.ndarray, seed: int
) -> tuple[Params, Params]:
    """Re-initialise dead latents from high-error inputs; returns (params, mask of reset entries)."""
    sq_err = jnp.sum(jnp.square(x - decode(cfg, params, encode(cfg, params, state, jnp.asarray(x)))), axis=1)
    x_in = np.asarray(x) - np.asarray(params.b_dec)
    return common.resample_dead_rows(params, x_in, np.asarray(sq_err), dead, seed, enc_gain=0.2, dec_norm=1.0)


def fold_scale(cfg: ReluL1Config, params: Params, state: State, s: float) -> tuple[Params, State]:
    """Trained on s·x: (s·x − b)W = (x − b/s)(sW); x̂_raw = x̂/s."""
    return (
        Params(W_enc=params.W_enc * s, b_enc=params.b_enc, W_dec=params.W_dec / s, b_dec=params.b_dec / s),
        state,
    )


def saelens_export(model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """SAELens ``standard``; only the ``classic`` variant subtracts b_dec from the input."""
    fields = {"architecture": "standard", "apply_b_dec_to_input": model.config.variant == "classic"}
    return fields, common.linear_weights(model.params)


SAELENS_IMPORTS = ("standard",)
"""SAELens architectures ``saelens_import`` reads."""


def saelens_import(cfg: dict[str, Any], weights: dict[str, np.ndarray], where: Any) -> tuple[Any, Any, Any]:
    """SAELens ``standard``: ``april`` without, ``classic`` with ``apply_b_dec_to_input``."""
    from sae.base import make_config

    ours = make_config(
        ReluL1Config,
        {
            "n_latents": weights["W_enc"].shape[1],
            "variant": "classic" if cfg.get("apply_b_dec_to_input", True) else "april",
        },
    )
    return ours, common.linear_params(weights), common.StepState(step=jnp.zeros((), jnp.int32))
