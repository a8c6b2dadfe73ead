"""Feature Choice SAE (Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice & Feature
Choice Sparse Autoencoders").

pre = ReLU((x − b_dec) W_enc + b_enc) [B, n]. Instead of each token keeping its top k latents
(TopK), each latent j keeps its top m_j tokens of the batch (where pre > 0), with Σ_j m_j ≈ k·B, so
the batch spends the same budget as TopK but a token may use more or fewer latents than k.
x̂ = f W_dec + b_dec; unit-norm decoder rows (gradient projection + renormalisation, as TopK "unit").

Capacities (``capacity``):

* ``"uniform"``: m_j = ⌊k·B / n⌋ for every latent (needs k·B ≥ n).
* ``"zipf"``: latents are ranked by their EMA firing density (rank 0 = densest) and latent of rank r
  gets m_r = clip(⌊k·B · (r+1)^−α / Σ_s (s+1)^−α⌋, 1, B). Every latent keeps at least one token a
  batch, so no latent can die; the clip at B and the floor of 1 make Σ m_j only approximately k·B
  [adapt: the paper states the Zipf shape, not the rounding].

Auxiliary loss (``aux_zipf_coef``), "aux_zipf_loss" [paper + adapt]: a power law log ρ = a + b·log(r+1)
is fitted (least squares) to the sorted EMA densities; latents whose density is below
``aux_zipf_c`` × the fitted density for their rank are "under-used", and AuxK (``common.auxk_loss``,
the same code TopK uses for dead latents) makes the top-k_aux of them per token reconstruct the
stopped residual. It is off until the density EMA has seen 1/(1 − density_decay) steps.

Inference (one token at a time, batch-independent) [paper + adapt]: per-latent thresholds θ_j,
the EMA (``threshold_decay``) of the smallest value latent j kept in each training batch;
f_j = pre_j · 1[pre_j > θ_j]. A latent that never kept a token has θ_j = +inf (never fires). The
training-time choice is ``choose``; ``encode`` is the thresholded inference form.

Deviation from the sparse kernels the TopK file uses: the choice is per latent (a [n, m] index
layout), so the code is a masked dense [B, n] matrix and the decoder is a dense product, O(B·n·d)
like the encoder (as in ReLU-L1).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sae import common
from sae.base import StepCtx
from sae.configs import FeatureChoiceConfig

Config = FeatureChoiceConfig
Params = common.LinearParams


@struct.dataclass
class State:
    step: Any  # [] int32
    density: Any  # [n] EMA of the fraction of batch tokens each latent fired on
    theta: Any  # [n] inference thresholds (+inf until a latent keeps a token)


def partition_specs(cfg: FeatureChoiceConfig) -> Params:
    return common.LINEAR_PARTITION_SPECS


def input_scale_target(cfg: FeatureChoiceConfig) -> str:
    return "sq_norm_d"


def capacities_by_rank(cfg: FeatureChoiceConfig, batch: int) -> np.ndarray:
    """m_r for density ranks r = 0..n−1 (static: depends on k, B, n only)."""
    n, budget = cfg.n_latents, cfg.k * batch
    if cfg.capacity == "uniform":
        m = budget // n
        if m < 1:
            raise ValueError(
                f"uniform Feature Choice needs k·batch_size >= n_latents (got {cfg.k}·{batch} < {n}); "
                "raise --batch-size or --k, or use --capacity zipf"
            )
        return np.full(n, m, np.int32)
    w = (np.arange(n, dtype=np.float64) + 1.0) ** -cfg.zipf_alpha
    return np.clip(np.floor(budget * w / w.sum()), 1, batch).astype(np.int32)


def density_ranks(density: jax.Array) -> jax.Array:
    """Rank of each latent by descending density (ties by index)."""
    order = jnp.argsort(-density, stable=True)
    return jnp.zeros_like(order).at[order].set(jnp.arange(density.shape[0], dtype=order.dtype))


def init(cfg: FeatureChoiceConfig, key: jax.Array, d: int, sample: np.ndarray) -> tuple[Params, State]:
    cfg.validate()
    params = Params(**common.tied_weights(key, cfg.n_latents, d, sample))
    n = cfg.n_latents
    state = State(
        step=jnp.zeros((), jnp.int32),
        density=jnp.full((n,), cfg.k / n, jnp.float32),
        theta=jnp.full((n,), jnp.inf, jnp.float32),
    )
    return params, state


def _pre(params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    x_c = x - params.b_dec
    return x_c, jax.nn.relu(x_c @ params.W_enc + params.b_enc)


def choose(cfg: FeatureChoiceConfig, state: State, pre: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-time choice on a batch: (mask [B, n], min kept value [n] (+inf if none), kept any [n])."""
    b, n = pre.shape
    m_rank = capacities_by_rank(cfg, b)
    m_max = int(m_rank.max())
    m = jnp.asarray(m_rank)[density_ranks(state.density)] if cfg.capacity == "zipf" else jnp.asarray(m_rank)
    top_v, top_i = jax.lax.top_k(jax.lax.stop_gradient(pre).T, m_max)  # [n, m_max] per latent
    keep = (jnp.arange(m_max)[None, :] < m[:, None]) & (top_v > 0)
    mask = jnp.zeros((b, n), bool).at[top_i, jnp.arange(n)[:, None]].set(keep)
    kept_min = jnp.min(jnp.where(keep, top_v, jnp.inf), axis=1)
    return mask, kept_min, jnp.any(keep, axis=1)


def encode(cfg: FeatureChoiceConfig, params: Params, state: State, x: jax.Array) -> jax.Array:
    """Inference form: f_j = pre_j · 1[pre_j > θ_j], independent of the other tokens."""
    _, pre = _pre(params, x)
    return jnp.where(pre > state.theta[None, :], pre, 0.0)


def decode(cfg: FeatureChoiceConfig, params: Params, f: jax.Array) -> jax.Array:
    return f @ params.W_dec + params.b_dec


def zipf_fit(density: jax.Array) -> jax.Array:
    """Fitted density for each latent's rank: least squares of log ρ on log(rank+1) over ρ > 0."""
    ranks = density_ranks(density)
    lr = jnp.log(ranks.astype(jnp.float32) + 1.0)
    pos = density > 0
    w = pos.astype(jnp.float32)
    ld = jnp.log(jnp.where(pos, density, 1.0))
    sw = jnp.maximum(jnp.sum(w), 1.0)
    mx, my = jnp.sum(w * lr) / sw, jnp.sum(w * ld) / sw
    var = jnp.sum(w * (lr - mx) ** 2)
    slope = jnp.where(var > 0, jnp.sum(w * (lr - mx) * (ld - my)) / jnp.maximum(var, 1e-12), 0.0)
    return jnp.exp(my + slope * (lr - mx))


def under_used(cfg: FeatureChoiceConfig, state: State) -> jax.Array:
    """bool [n]: EMA density below aux_zipf_c × the Zipf fit, once the EMA has warmed up."""
    warm = state.step >= int(np.ceil(1.0 / (1.0 - cfg.density_decay)))
    return warm & (state.density < cfg.aux_zipf_c * zipf_fit(state.density))


def loss(
    cfg: FeatureChoiceConfig, params: Params, state: State, x: jax.Array, ctx: StepCtx
) -> tuple[jax.Array, dict[str, jax.Array]]:
    x_c, pre = _pre(params, x)
    mask, kept_min, kept_any = choose(cfg, state, pre)
    f = jnp.where(mask, pre, 0.0)
    x_hat = decode(cfg, params, f)
    err, var = common.fvu_terms(x, x_hat)
    fvu = err / jnp.maximum(var, 1e-12)
    total = fvu
    aux = jnp.zeros((), jnp.float32)
    if cfg.aux_zipf_coef > 0:
        k_aux = common.aux_width(cfg.k_aux, x.shape[1], cfg.n_latents)
        aux = common.auxk_loss(
            x_c, pre, under_used(cfg, state), x - x_hat, params.W_enc, params.b_enc, params.W_dec, k_aux
        )
        total = total + cfg.aux_zipf_coef * aux
    fires = jnp.sum(mask, axis=0).astype(jnp.float32)
    return total, {
        "err": err,
        "var": var,
        "l0": jnp.mean(jnp.sum(mask, axis=1).astype(jnp.float32)),
        "fires": fires,
        "aux": aux,
        "kept_min": kept_min,
        "kept_any": kept_any,
        "tokens": jnp.asarray(x.shape[0], jnp.float32),
    }


def update_state(cfg: FeatureChoiceConfig, state: State, aux: dict[str, jax.Array], step: jax.Array) -> State:
    b = aux["tokens"]
    dd, td = cfg.density_decay, cfg.threshold_decay
    density = dd * state.density + (1.0 - dd) * aux["fires"] / b
    t = jax.lax.stop_gradient(aux["kept_min"])
    theta = jnp.where(
        aux["kept_any"], jnp.where(jnp.isinf(state.theta), t, td * state.theta + (1.0 - td) * t), state.theta
    )
    return State(step=state.step + 1, density=density, theta=theta)


def project_grads(cfg: FeatureChoiceConfig, params: Params, grads: Params) -> Params:
    return grads.replace(W_dec=common.remove_parallel_component(params.W_dec, grads.W_dec))


def constrain(cfg: FeatureChoiceConfig, params: Params) -> Params:
    return params.replace(W_dec=common.normalize_rows(params.W_dec))


def fold_scale(cfg: FeatureChoiceConfig, params: Params, state: State, s: float) -> tuple[Params, State]:
    """Trained on s·x: pre = (s·x − b)W + c = (x − b/s)(sW) + c takes the same values, so θ stays."""
    return (
        Params(W_enc=params.W_enc * s, b_enc=params.b_enc, W_dec=params.W_dec / s, b_dec=params.b_dec / s),
        state,
    )


def saelens_export(model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """SAELens ``jumprelu`` with its per-latent θ on the pre-activations."""
    theta = np.maximum(np.asarray(model.state.theta, np.float32), 0.0)
    fields = {"architecture": "jumprelu", "apply_b_dec_to_input": True}
    return fields, common.linear_weights(model.params, threshold=theta)
