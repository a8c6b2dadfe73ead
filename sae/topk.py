"""TopK SAE (Makhzani & Frey 2013; Gao et al. 2024) with AuxK and optional Multi-TopK.

pre = ReLU((x − b_dec) W_enc + b_enc); keep the top k per token; x̂ = f W_dec + b_dec.
loss = ‖x − x̂‖²/Var(x) + aux_coef · AuxK  (+ ‖x − x̂_{4k}‖²/Var(x) / 8 with ``multi_topk``).

Only the choice of indices uses the dense encoder product (the kept values come out of the search,
which runs chunk by chunk on CPU: ``common.encode_top_k``); the decoder forward and every gradient go
through the O(B·k·d) kernels of ``sae.sparse_ops``.

Decoder modes (``decoder``):

* ``"unit"``: rows kept at unit norm: the gradient's parallel component is removed before the
  step and rows are renormalised after it (OpenAI / sparsify recipe).
* ``"free"``: SAELens's variant: no norm constraint, rows initialised at norm ``init_dec_norm``
  (0.1); with ``rescale_by_decoder_norm`` the top-k is chosen on pre · ‖W_dec,i‖. At save the norms
  are folded into the encoder so the saved SAE is an ordinary unit-norm TopK SAE.

Default choice, by measurement: held-out FVU on MiniLM blocks.3.hook_out activations of the stdlib-docs
corpus (35k train / 3.7k eval tokens, special tokens excluded), n = 1024, k = 32, 150 steps of 1024
tokens, default lr (8e-4), seed 0: "unit" 0.281 (0 dead), "free" with rescale_by_decoder_norm
0.257 (8% dead). The reference sheet's own measurement (n = 4096) also favours the SAELens variant
over a unit-norm TopK (0.101 vs 0.117 at k = 32; theirs had no gradient projection, ours has). So
``decoder="free"`` is the default. One seed, one short run: a coarse measurement on a loaded 2-core
machine, worth repeating at n = 4096 with longer training.

Against it at scale (docs/models.md): SmolLM2-135M blocks.15.hook_out, n = 16384, k = 32, 400 steps of
4096 tokens, default lr, dead window 1M tokens: "unit" held-out FVU 0.065 with 2.6% dead in training,
"free" 0.076 with 7.7% (its training FVU jumped from 0.16 to 0.61 when AuxK switched on). The default
stays until the small-model cells of docs/learning_rate.md are re-run with "unit".
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sae import common
from sae.base import StepCtx
from sae.configs import TopKConfig
from sae.sparse_ops import gather_encode, sparse_decode

Config = TopKConfig
SKIPS_AUX_WITHOUT_DEAD = True  # ctx.dead feeds AuxK only (see sae.base)


Params = common.LinearParams
State = common.StepState


def partition_specs(cfg: TopKConfig) -> Params:
    return common.LINEAR_PARTITION_SPECS


def input_scale_target(cfg: TopKConfig) -> str:
    return "sq_norm_d"


def init(cfg: TopKConfig, key: jax.Array, d: int, sample: np.ndarray) -> tuple[Params, State]:
    cfg.validate()
    norm = cfg.init_dec_norm if cfg.init_dec_norm is not None else (1.0 if cfg.decoder == "unit" else 0.1)
    rows = getattr(cfg, "init_w", "random")  # HierarchicalTopK shares this init without the option
    weights = common.tied_weights(key, cfg.n_latents, d, sample, norm, rows)
    ratio = getattr(cfg, "init_fire_ratio", None)
    if ratio is not None:  # every latent starts firing (pre > 0) on ratio·k/n of the sample
        freq = np.full(cfg.n_latents, ratio * cfg.k / cfg.n_latents, np.float32)  # <= 1: validate()
        centred = np.asarray(sample) - np.asarray(weights["b_dec"])
        weights["b_enc"] = jnp.asarray(-common.firing_thresholds(centred, weights["W_enc"].T, freq))
    params = Params(**weights)
    return params, State(step=jnp.zeros((), jnp.int32))


def _score_scale(cfg: TopKConfig, params: Params) -> jax.Array | None:
    if cfg.decoder == "free" and cfg.rescale_by_decoder_norm:
        return jax.lax.stop_gradient(jnp.linalg.norm(params.W_dec, axis=1))[None, :]
    return None


def select_top_k(
    cfg: TopKConfig, params: Params, x_c: jax.Array, k: int, dead: jax.Array | None = None, k_aux: int = 0
):
    """(picks [B, k], their pre-activations [B, k], score scale, the dead picks for AuxK or None).

    The dense scores are never returned: ``common.encode_top_k`` searches them chunk by chunk."""
    scale = _score_scale(cfg, params)
    top, idx, dead_picks = common.encode_top_k(x_c, params.W_enc, params.b_enc, k, scale, dead, k_aux)
    return idx, common.unscaled(top, idx, scale), scale, dead_picks


def encode_sparse(cfg: TopKConfig, params: Params, x: jax.Array, k: int | None = None):
    """(values [B, k], indices [B, k]) of the kept latents."""
    x_c = x - params.b_dec
    idx, chosen, _, _ = select_top_k(cfg, params, x_c, k or cfg.k)
    vals = jax.nn.relu(gather_encode(x_c, params.W_enc, params.b_enc, idx, chosen=chosen))
    return vals, idx


def encode(cfg: TopKConfig, params: Params, state: State, x: jax.Array, k: int | None = None) -> jax.Array:
    vals, idx = encode_sparse(cfg, params, x, k)
    return common.dense_codes(vals, idx, params.W_enc.shape[1])


def decode(cfg: TopKConfig, params: Params, f: jax.Array) -> jax.Array:
    return f @ params.W_dec + params.b_dec


def loss(
    cfg: TopKConfig, params: Params, state: State, x: jax.Array, ctx: StepCtx
) -> tuple[jax.Array, dict[str, jax.Array]]:
    x_c = x - params.b_dec
    kk = 4 * cfg.k if cfg.multi_topk else cfg.k
    k_aux = common.aux_width(cfg.k_aux, x.shape[1], cfg.n_latents, getattr(cfg, "k_aux_min_frac", None))
    idx_all, chosen, scale, dead_picks = select_top_k(cfg, params, x_c, kk, ctx.dead, k_aux)
    # forward values are top-k's own (O(B·k)); the backward is the sparse kernel's
    vals_all = jax.nn.relu(
        gather_encode(x_c, params.W_enc, params.b_enc, idx_all, chosen=chosen, b_dec=params.b_dec)
    )
    # top_k returns sorted picks, so the first k of the 4k are the top k.
    vals, idx = vals_all[:, : cfg.k], idx_all[:, : cfg.k]
    if ctx.k_active is not None:  # a sweep member with a smaller k: its top k are the first k picks
        vals = jnp.where(jnp.arange(cfg.k)[None, :] < ctx.k_active, vals, 0.0)
    x_hat = sparse_decode(vals, idx, params.W_dec) + params.b_dec
    err, var = common.fvu_terms(x, x_hat)
    fvu = err / jnp.maximum(var, 1e-12)
    aux = common.auxk_loss(
        x_c,
        None,
        ctx.dead,
        x - x_hat,
        params.W_enc,
        params.b_enc,
        params.W_dec,
        k_aux,
        scale,
        b_dec=params.b_dec,
        picks=dead_picks,
    )
    total = fvu + cfg.aux_coef * aux
    if cfg.multi_topk:
        x_hat4 = sparse_decode(vals_all, idx_all, params.W_dec) + params.b_dec
        err4, _ = common.fvu_terms(x, x_hat4)
        total = total + err4 / jnp.maximum(var, 1e-12) / 8.0
    active = vals > 0
    fires = jnp.zeros((cfg.n_latents,), jnp.float32).at[idx.reshape(-1)].add(active.reshape(-1))
    return total, {
        "err": err,
        "var": var,
        "l0": jnp.mean(jnp.sum(active, axis=1).astype(jnp.float32)),
        "fires": fires,
        "aux": aux,
    }


def vmaps_k(cfg: TopKConfig) -> bool:
    """Whether sweep members that differ from this config only in k can share one vmapped step
    (``StepCtx.k_active``): the picks of a smaller k are the first picks of a larger one."""
    return not cfg.multi_topk


def update_state(cfg: TopKConfig, state: State, aux: dict[str, jax.Array], step: jax.Array) -> State:
    return state.replace(step=state.step + 1)


def project_grads(cfg: TopKConfig, params: Params, grads: Params) -> Params:
    if cfg.decoder != "unit":
        return grads
    return grads.replace(W_dec=common.remove_parallel_component(params.W_dec, grads.W_dec))


def constrain(cfg: TopKConfig, params: Params) -> Params:
    if cfg.decoder != "unit":
        return params
    return params.replace(W_dec=common.normalize_rows(params.W_dec))


RESAMPLE_ENC_GAIN = 0.2
"""A resampled latent reconstructs this share of its input's projection at first (Anthropic's 0.2)."""
RESAMPLE_ERR_POWER = 1.0
"""Inputs drawn ∝ their squared error to this power (Anthropic: 2, which on SmolLM2 activations, with
outlier tokens at 4x the median norm, sends most dead latents to the same few tokens) [adapt]."""
RESAMPLE_DISTINCT = True
"""Each dead latent gets a different input of the batch [adapt]."""
RESAMPLE_ENC_PER_DECODER = True
"""Encoder columns at norm RESAMPLE_ENC_GAIN / the decoder-row norm, so the first point holds whatever
the scale of the free decoder's rows (False: Anthropic's RESAMPLE_ENC_GAIN × the mean alive encoder
norm, for unit rows) [adapt]. These three were not separated by measurement: see
docs/learning_rate.md (resampling did not lower the dead fraction of 250k-token runs)."""


def resample_due(cfg: TopKConfig, step: int, total_steps: int) -> bool:
    """True when step (1-based, after the update) is at a resampling point."""
    return common.resample_due_every(cfg.resample_every_frac, step, total_steps)


def resample(
    cfg: TopKConfig, params: Params, state: State, x: np.ndarray, dead: np.ndarray, seed: int
) -> tuple[Params, Params | None]:
    """Dead latents re-initialised towards the batch's worst-reconstructed inputs (decoder rows at the
    alive rows' mean norm for a free decoder), or only re-biased (``resample_mode="rebias"``); returns
    (params, mask of reset entries)."""
    if cfg.resample_mode == "rebias":
        ratio = cfg.init_fire_ratio or 1.0
        return common.rebias_dead(
            params, np.asarray(x) - np.asarray(params.b_dec), dead, ratio * cfg.k / cfg.n_latents
        )
    x_hat = decode(cfg, params, encode(cfg, params, state, jnp.asarray(x)))
    sq_err = np.asarray(jnp.sum(jnp.square(x - x_hat), axis=1))
    x_in = np.asarray(x) - np.asarray(params.b_dec)
    alive = ~np.asarray(dead, bool)
    dec_norm = 1.0
    if cfg.decoder != "unit" and alive.any():
        dec_norm = float(np.linalg.norm(np.asarray(params.W_dec)[alive], axis=1).mean())
    gain, power, distinct = RESAMPLE_ENC_GAIN, RESAMPLE_ERR_POWER, RESAMPLE_DISTINCT
    enc_norm = gain / dec_norm if RESAMPLE_ENC_PER_DECODER else None
    return common.resample_dead_rows(
        params, x_in, sq_err, dead, seed, gain, dec_norm, power, distinct, enc_norm=enc_norm
    )


def fold_scale(cfg: TopKConfig, params: Params, state: State, s: float) -> tuple[Params, State]:
    """Inference form on raw activations: fold the input scale s and the decoder norms.

    Trained on s·x: pre = (s·x − b)W + c = (x − b/s)(sW) + c and x̂_raw = x̂/s. Decoder-row norms
    move into the encoder (values × ‖W_dec,i‖, rows ÷ ‖W_dec,i‖), which leaves x̂ and, with
    rescale_by_decoder_norm, the top-k choice unchanged.
    """
    norms = jnp.maximum(jnp.linalg.norm(params.W_dec, axis=1), 1e-12)
    if cfg.decoder == "free" and not cfg.rescale_by_decoder_norm:
        norms = jnp.ones_like(norms)  # choice is on raw pre; folding norms would change it
    return (
        Params(
            W_enc=params.W_enc * s * norms[None, :],
            b_enc=params.b_enc * norms,
            W_dec=params.W_dec / norms[:, None] / s,
            b_dec=params.b_dec / s,
        ),
        state,
    )


def saelens_export(model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """SAELens ``topk``: its decoder norms are folded in (or it chose on raw pre-activations)."""
    fields = {
        "architecture": "topk",
        "apply_b_dec_to_input": True,
        "k": int(model.config.k),
        "rescale_acts_by_decoder_norm": False,
    }
    return fields, common.linear_weights(model.params)


SAELENS_IMPORTS = ("topk",)
"""SAELens architectures ``saelens_import`` reads."""


def saelens_import(cfg: dict[str, Any], weights: dict[str, np.ndarray], where: Any) -> tuple[Any, Any, Any]:
    """SAELens ``topk`` as a free-decoder TopK: ``rescale_acts_by_decoder_norm`` folded into the encoder,
    and without ``apply_b_dec_to_input`` ``b_enc + b_dec·W_enc``."""
    from sae.base import make_config
    from sae.interop import InteropError

    if "k" not in cfg:
        raise InteropError(f"{where}: a topk cfg.json needs `k`")
    w_enc, b_enc, w_dec, b_dec = (weights[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if cfg.get("rescale_acts_by_decoder_norm"):
        # choosing on pre·‖W_dec,i‖ and decoding f/‖W_dec,i‖ equals folding the norms into the encoder
        norms = np.maximum(np.linalg.norm(w_dec, axis=1), 1e-8).astype(np.float32)
        w_enc, b_enc, w_dec = w_enc * norms[None, :], b_enc * norms, w_dec / norms[:, None]
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ w_enc  # x W + c = (x − b_dec) W + (c + b_dec W)
    ours = make_config(
        TopKConfig,
        {
            "n_latents": w_enc.shape[1],
            "k": int(cfg["k"]),
            "decoder": "free",
            "rescale_by_decoder_norm": False,
        },
    )
    params = common.linear_params({"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec})
    return ours, params, common.StepState(step=jnp.zeros((), jnp.int32))
