"""JumpReLU SAE (Rajamanoharan et al. 2024; GemmaScope) trained with straight-through estimators.

pre = (x − b_dec) W_enc + b_enc;  f = pre · H(pre − θ) with a per-latent threshold θ (a parameter,
fp32, init ``init_threshold`` = 0.001, not in log space);  x̂ = f W_dec + b_dec;

    loss = ‖x − x̂‖²/Var(x) + λ(t) · P,   P = L0 = mean_tokens Σ_i H(pre_i − θ_i)
                                          (or (L0/target_l0 − 1)² with ``target_l0``)

H has zero derivative almost everywhere, so θ learns through pseudo-derivatives with a rectangle
kernel K(u) = 1[|u| < 1/2] of bandwidth ε (``bandwidth`` = 0.001):

    ∂f/∂θ := −(θ/ε) K((pre − θ)/ε),   ∂H(pre − θ)/∂θ := −(1/ε) K((pre − θ)/ε),

and ∂f/∂pre = H(pre − θ), ∂H/∂pre = 0 (the L0 term trains θ only). λ(t) ramps linearly from 0 over
the first ``l0_warmup_frac`` of the steps. Latents dead in the trainer's window add
``dead_preact_coef`` · mean_tokens Σ ReLU(θ_i − pre_i), through their b_enc and θ only
(``dead_preact_loss``): nothing else reaches a latent below its threshold on every token. Decoder
rows are unit norm (gradient projection + renormalisation, the trainer's machinery); θ is clamped at
≥ 0 after each step. Inference is batch-independent: f = pre · 1[pre > θ].

Deviations [adapt]: the reconstruction term is normalised by the batch variance (the FVU, as for
the other trainers), so λ reads as "FVU per active latent" and does not depend on d or the input
scale; inputs are scaled to E‖x‖² = 1 (``input_scale_target`` "unit") so θ's init and ε are in the
units GemmaScope's numbers assume; the sheet's Adam(β1 = 0, 0.999), lr 7e-5 is not forced (the
optimiser is the shared trainer's: pass ``--adam-b1 0 --lr 7e-5`` for the GemmaScope recipe);
``target_l0`` (the quadratic L0-target penalty of saprmarks/dictionary_learning) is an option for
hitting a chosen sparsity, off by default; θ's Adam step is capped at ε (``threshold_lr_scale``
None: the lr × min(1, ε / peak lr)): GemmaScope's lr 7e-5 never steps θ past its 0.001 bandwidth, but
the short-run default lr 1e-2 did, and 69% of the latents died (MiniLM n 2048, 250k tokens; 4.3%
with the cap: docs/learning_rate.md).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sae import common
from sae.base import StepCtx
from sae.configs import JumpReLUConfig

Config = JumpReLUConfig


@struct.dataclass
class Params:
    W_enc: Any  # [d, n]
    b_enc: Any  # [n]
    W_dec: Any  # [n, d] unit rows
    b_dec: Any  # [d]
    threshold: Any  # [n] θ, fp32, >= 0


State = common.StepState


def partition_specs(cfg: JumpReLUConfig) -> Params:
    return Params(
        W_enc=common.SHARD_LATENT_COL,
        b_enc=common.SHARD_LATENT_VEC,
        W_dec=common.SHARD_LATENT_ROW,
        b_dec=common.REPLICATED,
        threshold=common.SHARD_LATENT_VEC,
    )


def input_scale_target(cfg: JumpReLUConfig) -> str:
    return "unit"


def init(cfg: JumpReLUConfig, key: jax.Array, d: int, sample: np.ndarray) -> tuple[Params, State]:
    cfg.validate()
    params = Params(
        **common.tied_weights(key, cfg.n_latents, d, sample),
        threshold=jnp.full((cfg.n_latents,), cfg.init_threshold, jnp.float32),
    )
    return params, State(step=jnp.zeros((), jnp.int32))


def lr_scales(cfg: JumpReLUConfig, peak_lr: float) -> Params | None:
    """θ's step factor (``threshold_lr_scale``, by default min(1, ε / peak lr)); None at 1 (no optimiser
    stage, so the checkpoints of runs from before the factor still load)."""
    scale = cfg.threshold_lr_scale
    if scale is None:
        scale = min(1.0, cfg.bandwidth / peak_lr)
    if scale == 1.0:
        return None
    return Params(W_enc=1.0, b_enc=1.0, W_dec=1.0, b_dec=1.0, threshold=scale)


def _rectangle(u: jax.Array) -> jax.Array:
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(z: jax.Array, theta: jax.Array, eps: float) -> jax.Array:
    """z · H(z − θ) for z [B, n], θ [n], with the straight-through gradient for θ."""
    return z * (z > theta)


def _jumprelu_fwd(z: jax.Array, theta: jax.Array, eps: float):
    return jumprelu(z, theta, eps), (z, theta)


def _jumprelu_bwd(eps: float, res, g: jax.Array):
    z, theta = res
    d_z = (z > theta) * g
    d_theta = jnp.sum(-(theta / eps) * _rectangle((z - theta) / eps) * g, axis=0)
    return d_z, d_theta


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def heaviside(z: jax.Array, theta: jax.Array, eps: float) -> jax.Array:
    """H(z − θ) with the straight-through gradient for θ (none for z)."""
    return (z > theta).astype(z.dtype)


def _step_fwd(z: jax.Array, theta: jax.Array, eps: float):
    return heaviside(z, theta, eps), (z, theta)


def _step_bwd(eps: float, res, g: jax.Array):
    z, theta = res
    d_theta = jnp.sum(-(1.0 / eps) * _rectangle((z - theta) / eps) * g, axis=0)
    return jnp.zeros_like(z), d_theta


heaviside.defvjp(_step_fwd, _step_bwd)


def pre_activations(params: Params, x: jax.Array) -> jax.Array:
    return (x - params.b_dec) @ params.W_enc + params.b_enc


def encode(cfg: JumpReLUConfig, params: Params, state: State, x: jax.Array) -> jax.Array:
    pre = pre_activations(params, x)
    return jnp.where(pre > params.threshold, pre, 0.0)


def decode(cfg: JumpReLUConfig, params: Params, f: jax.Array) -> jax.Array:
    return f @ params.W_dec + params.b_dec


def loss(
    cfg: JumpReLUConfig, params: Params, state: State, x: jax.Array, ctx: StepCtx
) -> tuple[jax.Array, dict[str, jax.Array]]:
    pre = pre_activations(params, x)
    f = jumprelu(pre, params.threshold, cfg.bandwidth)
    x_hat = decode(cfg, params, f)
    err, var = common.fvu_terms(x, x_hat)
    l0 = jnp.sum(heaviside(pre, params.threshold, cfg.bandwidth)) / x.shape[0]
    penalty = l0 if cfg.target_l0 is None else jnp.square(l0 / cfg.target_l0 - 1.0)
    warm = jnp.minimum(1.0, ctx.progress / cfg.l0_warmup_frac) if cfg.l0_warmup_frac > 0 else 1.0
    on = pre > params.threshold
    revive = dead_preact_loss(params, pre, ctx.dead) if cfg.dead_preact_coef > 0 else jnp.zeros(())
    total = err / jnp.maximum(var, 1e-12) + cfg.l0_coef * warm * penalty + cfg.dead_preact_coef * revive
    return total, {
        "err": err,
        "var": var,
        "l0": jax.lax.stop_gradient(l0),
        "fires": jnp.sum(on, axis=0).astype(jnp.float32),
        "penalty": jax.lax.stop_gradient(penalty),
        "revive": jax.lax.stop_gradient(revive),
    }


def dead_preact_loss(params: Params, pre: jax.Array, dead: jax.Array | None) -> jax.Array:
    """mean_tokens Σ_{i dead} ReLU(θ_i − pre_i), with a gradient for the dead latents' b_enc and θ only: a
    dead latent's bias climbs and its threshold falls until it fires again on the tokens its direction
    already scores highest. Letting it move W_enc too (towards the mean input) cost 0.006 FVU on MiniLM
    n 8192; letting it reach b_dec, which every latent shares, killed 99.9% of them."""
    if dead is None:
        return jnp.zeros(())
    pre = jax.lax.stop_gradient(pre - params.b_enc) + params.b_enc
    gap = jax.nn.relu(params.threshold - pre) * dead[None, :]
    return jnp.sum(gap) / pre.shape[0]


def update_state(cfg: JumpReLUConfig, state: State, aux: dict[str, jax.Array], step: jax.Array) -> State:
    return state.replace(step=state.step + 1)


def project_grads(cfg: JumpReLUConfig, params: Params, grads: Params) -> Params:
    return grads.replace(W_dec=common.remove_parallel_component(params.W_dec, grads.W_dec))


def constrain(cfg: JumpReLUConfig, params: Params) -> Params:
    return params.replace(
        W_dec=common.normalize_rows(params.W_dec), threshold=jnp.maximum(params.threshold, 0.0)
    )


def fold_scale(cfg: JumpReLUConfig, params: Params, state: State, s: float) -> tuple[Params, State]:
    """Trained on s·x: (s·x − b)W + c = (x − b/s)(sW) + c, so pre and θ keep their values; x̂_raw = x̂/s."""
    return (
        params.replace(W_enc=params.W_enc * s, W_dec=params.W_dec / s, b_dec=params.b_dec / s),
        state,
    )


def saelens_export(model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """SAELens ``jumprelu`` (ours is pre·1[pre > θ] with θ ≥ 0: the same values)."""
    theta = np.asarray(model.params.threshold, np.float32)
    fields = {"architecture": "jumprelu", "apply_b_dec_to_input": True}
    return fields, common.linear_weights(model.params, threshold=theta)


SAELENS_IMPORTS = ("jumprelu",)
"""SAELens architectures ``saelens_import`` reads."""


def saelens_import(cfg: dict[str, Any], weights: dict[str, np.ndarray], where: Any) -> tuple[Any, Any, Any]:
    """SAELens ``jumprelu``: ReLU(pre)·1[pre > θ]; ours: pre·1[pre > θ]. Equal for θ ≥ 0, and clamping
    a negative θ at 0 leaves SAELens's values unchanged (ReLU zeroes what lies between). Our arch
    always subtracts b_dec: without ``apply_b_dec_to_input`` it is folded into b_enc."""
    from sae.base import make_config
    from sae.interop import InteropError

    if "threshold" not in weights:
        raise InteropError(f"{where}/sae_weights.safetensors lacks ['threshold'] (has {sorted(weights)})")
    b_enc = weights["b_enc"]
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + weights["b_dec"] @ weights["W_enc"]
    ours = make_config(JumpReLUConfig, {"n_latents": weights["W_enc"].shape[1]})
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    params = Params(
        W_enc=f32(weights["W_enc"]),
        b_enc=f32(b_enc),
        W_dec=f32(weights["W_dec"]),
        b_dec=f32(weights["b_dec"]),
        threshold=f32(np.maximum(weights["threshold"], 0.0)),
    )
    return ours, params, common.StepState(step=jnp.zeros((), jnp.int32))
