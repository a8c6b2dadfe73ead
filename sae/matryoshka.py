"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024): nested dictionaries.

The latents are split into consecutive groups (``group_sizes``); prefix m is G_1 ∪ … ∪ G_m. The
code is BatchTopK's (top k·B of the batch, threshold θ at inference; ``sae.batchtopk``), and each
prefix must reconstruct on its own:

    x̂_m = b_dec + Σ_{kept i in prefix m} f_i W_dec,i;   loss = mean_m ‖x − x̂_m‖²/Var(x) + aux_coef · AuxK

(AuxK on the residual of the full dictionary, as BatchTopK's). The kept entries are a flat list of
k·B (token, latent, value); one segment-sum by (token, group) and a cumulative sum over groups give
every prefix reconstruction at O(k·B·d + B·M·d), not M decodes.

Selection, decoder modes, inference threshold, init, constraint and folding are BatchTopK's.
Default groups [adapt] (the sheet gives no sizes): 4 equal groups (``group_layout="equal"``). The
doubling layout (prefixes ending at n/16, n/8, n/4, n/2, n), the default before, starves its large
late groups: the small early prefixes carry most of the loss, their latents win the batch top-k, and
at 250k tokens (MiniLM, n = 2048) 23% of the latents died at held-out FVU 0.210, against 14.5% and
0.188 with equal groups (docs/learning_rate.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sae import batchtopk, common
from sae.base import StepCtx
from sae.configs import MatryoshkaConfig

Config = MatryoshkaConfig
SKIPS_AUX_WITHOUT_DEAD = True  # ctx.dead feeds AuxK only (see sae.base)
Params = common.LinearParams
State = common.ThresholdState


def partition_specs(cfg: MatryoshkaConfig) -> Params:
    return common.LINEAR_PARTITION_SPECS


def input_scale_target(cfg: MatryoshkaConfig) -> str:
    return "sq_norm_d"


def init(cfg: MatryoshkaConfig, key: jax.Array, d: int, sample: np.ndarray) -> tuple[Params, State]:
    return batchtopk.init(cfg, key, d, sample)


def encode(cfg: MatryoshkaConfig, params: Params, state: State, x: jax.Array) -> jax.Array:
    return batchtopk.encode_threshold(cfg, params, state, x)


def decode(cfg: MatryoshkaConfig, params: Params, f: jax.Array) -> jax.Array:
    return f @ params.W_dec + params.b_dec


def prefix_errors(cfg: MatryoshkaConfig, codes: batchtopk.BatchCodes, params: Params, x: jax.Array):
    """(Σ_tokens ‖x − x̂_m‖² per prefix [M], x̂ of the full dictionary [B, d])."""
    b, d = x.shape
    ends = jnp.asarray(cfg.group_ends(), jnp.int32)
    m = len(cfg.group_ends())
    gid = jnp.searchsorted(ends, codes.lat, side="right").astype(jnp.int32)  # group of each entry
    parts = jax.ops.segment_sum(
        batchtopk.contributions(codes, params.W_dec), codes.rows * m + gid, num_segments=b * m
    ).reshape(b, m, d)
    recon = jnp.cumsum(parts, axis=1) + params.b_dec  # [B, M, d]: x̂ of each prefix
    errs = jnp.sum(jnp.square(x[:, None, :] - recon), axis=(0, 2))
    return errs, recon[:, -1]


def loss(
    cfg: MatryoshkaConfig, params: Params, state: State, x: jax.Array, ctx: StepCtx
) -> tuple[jax.Array, dict[str, jax.Array]]:
    b = x.shape[0]
    x_c = x - params.b_dec
    pre = jax.nn.relu(x_c @ params.W_enc + params.b_enc)
    scale = batchtopk.score_scale(cfg, params)
    codes = batchtopk.select_batch(cfg, params, x_c, pre, scale, cfg.k)
    errs, x_hat = prefix_errors(cfg, codes, params, x)
    _, var = common.fvu_terms(x, x_hat)
    err = errs[-1]
    k_aux = common.aux_width(cfg.k_aux, x.shape[1], cfg.n_latents, cfg.k_aux_min_frac)
    aux = common.auxk_loss(
        x_c, pre, ctx.dead, x - x_hat, params.W_enc, params.b_enc, params.W_dec, k_aux, scale
    )
    thr, seen = batchtopk.kept_threshold(codes)
    total = jnp.mean(errs) / jnp.maximum(var, 1e-12) + cfg.aux_coef * aux
    return total, {
        "err": err,
        "var": var,
        **batchtopk.code_stats(codes, b, cfg.n_latents),
        "aux": aux,
        "prefix_fvu": errs / jnp.maximum(var, 1e-12),
        "threshold": jax.lax.stop_gradient(thr),
        "threshold_seen": seen,
        "overflow": codes.overflow,
        "progress": ctx.progress,
    }


def update_state(cfg: MatryoshkaConfig, state: State, aux: dict[str, jax.Array], step: jax.Array) -> State:
    return batchtopk.update_state(cfg, state, aux, step)


def project_grads(cfg: MatryoshkaConfig, params: Params, grads: Params) -> Params:
    return batchtopk.project_grads(cfg, params, grads)


def constrain(cfg: MatryoshkaConfig, params: Params) -> Params:
    return batchtopk.constrain(cfg, params)


def fold_scale(cfg: MatryoshkaConfig, params: Params, state: State, s: float) -> tuple[Params, State]:
    return batchtopk.fold_scale(cfg, params, state, s)


resample_due = batchtopk.resample_due
resample = batchtopk.resample
saelens_export = batchtopk.saelens_export
"""SAELens ``jumprelu`` with the threshold-inference θ (as BatchTopK)."""
