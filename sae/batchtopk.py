"""BatchTopK / Mutual Choice SAE (Bussmann et al. 2024; Ayonrinde 2024) with threshold inference.

Training: pre = ReLU((x − b_dec) W_enc + b_enc); the batch keeps its top k·B entries of the whole
[B, n] score matrix (a token may use more or fewer than k latents); x̂ = f W_dec + b_dec;
loss = ‖x − x̂‖²/Var(x) + aux_coef · AuxK (as TopK). θ = EMA(``threshold_decay``) of the smallest
kept positive score is tracked during training. Inference (``encode``, the saved SAE):
f = pre · 1[score > θ], independent of the batch; before tracking has started (an early checkpoint)
it falls back to per-token top-k.

Efficient selection (sheet): each token's top c·k candidates (c = ``candidates``) first, then the
global top k·B among those B·c·k. This equals the exact batch top-k·B unless a token would keep more
than c·k latents: a token keeps at most c·k (the ``overflow`` metric counts tokens at the cap;
``candidates`` ≥ n/k makes it exact; the tests check both). The kept entries are handled as a flat
list of k·B (token, latent, value) triples, so every kernel after the dense encoder is O(k·B·d),
like TopK's, whatever c is.

Decoder modes and the score are TopK's (``sae.topk``: "free" decoder with the choice on
pre · ‖W_dec,i‖, the default, or "unit"); init, gradient projection, row constraint and the folding
of decoder norms at save time are TopK's functions. Deviations [adapt]: θ tracking starts at
``threshold_start_step`` (1000, the sheet's) or at ``threshold_start_frac`` of the run, whichever is
first (default 0.5: θ rises as training sharpens the code, and with the sheet's 0.999 an EMA
over most of a short run lags behind; measured on the synthetic test data, starting at 10% gave an
inference L0 of 5.8 for k = 4), and the EMA is bias-corrected (Adam-style) so short runs get a
usable θ.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sae import common, topk
from sae.base import StepCtx
from sae.configs import BatchTopKConfig
from sae.sparse_ops import gather_encode, sparse_decode

Config = BatchTopKConfig
SKIPS_AUX_WITHOUT_DEAD = True  # ctx.dead feeds AuxK only (see sae.base)
Params = common.LinearParams
State = common.ThresholdState


def partition_specs(cfg: BatchTopKConfig) -> Params:
    return common.LINEAR_PARTITION_SPECS


def input_scale_target(cfg: BatchTopKConfig) -> str:
    return "sq_norm_d"


def init(cfg: BatchTopKConfig, key: jax.Array, d: int, sample: np.ndarray) -> tuple[Params, State]:
    params, _ = topk.init(cfg, key, d, sample)  # same init as TopK (reads the shared decoder fields)
    return params, common.threshold_state()


def score_scale(cfg: BatchTopKConfig, params: Params) -> jax.Array | None:
    """[1, n] factor turning pre-activations into selection scores (None: the score is pre)."""
    if cfg.decoder == "free" and cfg.rescale_by_decoder_norm:
        return jax.lax.stop_gradient(jnp.linalg.norm(params.W_dec, axis=1))[None, :]
    return None


@struct.dataclass
class BatchCodes:
    """The k·B entries a batch keeps, as a flat list (differentiable ``vals``)."""

    rows: jax.Array  # [kB] int32 token of each entry
    lat: jax.Array  # [kB] int32 latent of each entry
    vals: jax.Array  # [kB] value (ReLU'd pre-activation)
    score: jax.Array  # [kB] selection score, descending
    overflow: jax.Array  # [] fraction of tokens whose c·k candidates were all kept


def select_batch(
    cfg: BatchTopKConfig, params: Params, x_c: jax.Array, pre: jax.Array, scale: jax.Array | None, k: int
) -> BatchCodes:
    """Top k·B of the batch's scores via per-token candidates; values with the sparse backward."""
    b, n = pre.shape
    ck = min(cfg.candidates * k, n)
    score = jax.lax.stop_gradient(pre if scale is None else pre * scale)
    cand_s, cand_i = common.top_k(score, ck)  # [B, ck]; sharded over latents under a model mesh
    top_s, pos = jax.lax.top_k(cand_s.reshape(-1), k * b)  # [kB], descending
    rows = (pos // ck).astype(jnp.int32)
    lat = cand_i.reshape(-1)[pos]
    # each entry as a one-latent "token" for the O(kB·d) kernels of sae.sparse_ops (forward recomputed
    # from the gathered columns: gather_encode reads ``pre`` only in the [B, k] layout)
    vals = jax.nn.relu(gather_encode(x_c[rows], params.W_enc, params.b_enc, lat[:, None]))[:, 0]
    per_row = jnp.zeros((b,), jnp.int32).at[rows].add(1)
    overflow = jnp.mean((per_row >= ck).astype(jnp.float32)) if ck < n else jnp.zeros((), jnp.float32)
    return BatchCodes(rows=rows, lat=lat, vals=vals, score=top_s, overflow=overflow)


def contributions(codes: BatchCodes, w_dec: jax.Array) -> jax.Array:
    """[kB, d]: each kept entry's value times its decoder row (sparse backward)."""
    return sparse_decode(codes.vals[:, None], codes.lat[:, None], w_dec)


def decode_codes(codes: BatchCodes, params: Params, batch: int) -> jax.Array:
    """x̂ [B, d] from the flat entries."""
    return (
        jax.ops.segment_sum(contributions(codes, params.W_dec), codes.rows, num_segments=batch) + params.b_dec
    )


def dense_codes(codes: BatchCodes, batch: int, n: int) -> jax.Array:
    return jnp.zeros((batch, n), codes.vals.dtype).at[codes.rows, codes.lat].set(codes.vals)


def kept_threshold(codes: BatchCodes) -> tuple[jax.Array, jax.Array]:
    """(smallest kept positive score, whether there was one) for the θ EMA."""
    pos = codes.vals > 0
    smallest = jnp.min(jnp.where(pos, codes.score, jnp.inf))
    return jnp.where(jnp.any(pos), smallest, 0.0), jnp.any(pos)


def encode_batch(cfg: BatchTopKConfig, params: Params, x: jax.Array, k: int | None = None) -> jax.Array:
    """The training-time (batch-dependent) code, dense [B, n]."""
    x_c = x - params.b_dec
    pre = jax.nn.relu(x_c @ params.W_enc + params.b_enc)
    codes = select_batch(cfg, params, x_c, pre, score_scale(cfg, params), k or cfg.k)
    return dense_codes(codes, x.shape[0], cfg.n_latents)


def encode_threshold(cfg: BatchTopKConfig, params: Params, state: State, x: jax.Array) -> jax.Array:
    """Inference code: f = pre · 1[score > θ] (per-token top-k while θ is not tracked yet)."""
    x_c = x - params.b_dec
    pre = jax.nn.relu(x_c @ params.W_enc + params.b_enc)
    scale = score_scale(cfg, params)
    score = pre if scale is None else pre * scale
    theta = common.threshold_value(state, cfg.threshold_decay)

    def by_threshold() -> jax.Array:
        return jnp.where(score > theta, pre, 0.0)

    def by_topk() -> jax.Array:
        _, idx = common.top_k(score, cfg.k)
        return common.dense_codes(jnp.take_along_axis(pre, idx, axis=1), idx, pre.shape[1])

    return jax.lax.cond(state.count > 0, by_threshold, by_topk)


def encode(cfg: BatchTopKConfig, params: Params, state: State, x: jax.Array) -> jax.Array:
    return encode_threshold(cfg, params, state, x)


def decode(cfg: BatchTopKConfig, params: Params, f: jax.Array) -> jax.Array:
    return f @ params.W_dec + params.b_dec


def loss(
    cfg: BatchTopKConfig, params: Params, state: State, x: jax.Array, ctx: StepCtx
) -> tuple[jax.Array, dict[str, jax.Array]]:
    b = x.shape[0]
    x_c = x - params.b_dec
    pre = jax.nn.relu(x_c @ params.W_enc + params.b_enc)
    scale = score_scale(cfg, params)
    codes = select_batch(cfg, params, x_c, pre, scale, cfg.k)
    x_hat = decode_codes(codes, params, b)
    err, var = common.fvu_terms(x, x_hat)
    k_aux = common.aux_width(cfg.k_aux, x.shape[1], cfg.n_latents, cfg.k_aux_min_frac)
    aux = common.auxk_loss(
        x_c, pre, ctx.dead, x - x_hat, params.W_enc, params.b_enc, params.W_dec, k_aux, scale
    )
    thr, seen = kept_threshold(codes)
    return err / jnp.maximum(var, 1e-12) + cfg.aux_coef * aux, {
        "err": err,
        "var": var,
        **code_stats(codes, b, cfg.n_latents),
        "aux": aux,
        "threshold": jax.lax.stop_gradient(thr),
        "threshold_seen": seen,
        "overflow": codes.overflow,
        "progress": ctx.progress,
    }


def code_stats(codes: BatchCodes, batch: int, n: int) -> dict[str, jax.Array]:
    active = (codes.vals > 0).astype(jnp.float32)
    return {
        "l0": jnp.sum(active) / batch,
        "fires": jnp.zeros((n,), jnp.float32).at[codes.lat].add(active),
    }


def update_state(cfg: BatchTopKConfig, state: State, aux: dict[str, jax.Array], step: jax.Array) -> State:
    return common.track_threshold(
        state,
        aux["threshold"],
        aux["progress"],
        cfg.threshold_decay,
        cfg.threshold_start_step,
        cfg.threshold_start_frac,
        aux["threshold_seen"],
    )


resample_due = topk.resample_due
resample = topk.resample
"""Dead latents are re-biased (or resampled) as TopK's (``resample_mode``), with the mean k per token in
the target frequency k/n. Re-biasing them past the batch's selection threshold instead, so they are
chosen at once, did worse (tiny-lm n 8192: held-out FVU 0.0859 and 3.6% dead against 0.0776 and 14.9%
at AuxK weight 1/32; docs/learning_rate.md)."""


def project_grads(cfg: BatchTopKConfig, params: Params, grads: Params) -> Params:
    return topk.project_grads(cfg, params, grads)


def constrain(cfg: BatchTopKConfig, params: Params) -> Params:
    return topk.constrain(cfg, params)


def fold_scale(cfg: BatchTopKConfig, params: Params, state: State, s: float) -> tuple[Params, State]:
    """TopK's folding (input scale s and decoder norms), and θ in the folded score's units.

    Folded, pre' = pre · ‖W_dec,i‖ and ‖W'_dec,i‖ = 1/s, so with the decoder-norm score
    score' = pre' · ‖W'_dec,i‖ = score / s and θ' = θ / s; otherwise the score is pre, unchanged.
    """
    folded, _ = topk.fold_scale(cfg, params, state, s)
    if score_scale(cfg, params) is not None:
        state = state.replace(ema=state.ema / s)
    return folded, state


def saelens_export(model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """SAELens ``jumprelu``: threshold inference f = ReLU(pre)·1[score > θ] with θ_i = θ / score scale_i
    (SAELens converts its own BatchTopK the same way). Matryoshka shares it."""
    from sae.interop import InteropError

    cfg, p, state = model.config, model.params, model.state
    if int(np.min(np.asarray(state.count))) == 0:
        raise InteropError(
            f"this {cfg.arch} SAE has no inference threshold yet (saved before tracking started); train longer"
        )
    theta = np.broadcast_to(
        np.asarray(common.threshold_value(state, cfg.threshold_decay), np.float32), (model.n_latents,)
    )
    scale = score_scale(cfg, p)  # score = pre · scale: score > θ ⇔ pre > θ / scale
    if scale is not None:
        theta = theta / np.maximum(np.asarray(scale, np.float32)[0], 1e-12)
    fields = {"architecture": "jumprelu", "apply_b_dec_to_input": True}
    return fields, common.linear_weights(p, threshold=np.maximum(theta, 0.0))
