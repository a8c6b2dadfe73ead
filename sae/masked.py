"""Masked dictionary learning (Chidambaram, Wu, Cheng & Ge 2023, "Hiding Data Helps: On the
Benefits of Masking for Sparse Coding") on the shared trainer.

The paper's objective: for each sample, a random subset of the d coordinates is visible; the sparse
code is fitted from the visible coordinates only, with the visible rows of the dictionary; the loss
is the reconstruction error on the hidden coordinates only, with the code held constant for the
gradient. Hiding the coordinates the code is fitted on stops extra atoms from fitting the noise,
which is what makes the plain objective fail in the over-realised, noisy regime (p' > p). Atoms are
renormalised to unit norm after each step (here: gradient projection + renormalisation, as TopK).

Encoders (``encoder``):

* ``"omp"`` (the paper): the code is k steps of orthogonal matching pursuit on the visible
  coordinates (atom chosen by |⟨r, w_j⟩| / ‖w_j,visible‖, coefficients by least squares on the
  support, signed), stop-gradient; the model is the dictionary (``W_dec``, ``b_dec``) and W_enc is
  unused. Inference (``encode``): the same OMP on all coordinates. Cost k·B·n·d per step.
* ``"topk"`` [adapt: our SAE setting]: a learned TopK encoder reads the visible coordinates only,
  (x − b_dec)·mask / visible_frac (rescaled so its expected norm matches the unmasked input), and the
  loss is on the hidden coordinates. The code is NOT held constant here, otherwise the encoder would
  never learn; the hidden-coordinate loss still keeps the code from copying noise it cannot see.
  Inference: TopK on the whole, unmasked (x − b_dec).

Adaptations [adapt]: masks are drawn per token (an exact ``visible_frac`` share of coordinates,
uniformly), from a key kept in the state (folded with the step, so resume is bit-for-bit); the loss
is the hidden-coordinate FVU (Σ hidden (x − x̂)² / Σ hidden (x − mean_batch x)²), so Adam's scale
matches the other trainers; ``objective="plain"`` makes every coordinate visible and scores all of
them, the paper's baseline through the same code; ``train_b_dec=False`` keeps b_dec at its init
(zero with ``init_b_dec="zero"``: the paper's model has no bias). The logged FVU is on all
coordinates, from the code fitted on the visible ones.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sae import common
from sae.base import StepCtx
from sae.configs import MaskedConfig, n_visible
from sae.sparse_ops import gather_encode, sparse_decode

Config = MaskedConfig
Params = common.LinearParams


@struct.dataclass
class State:
    step: Any  # [] int32
    key: Any  # [2] uint32, mask stream


def partition_specs(cfg: MaskedConfig) -> Params:
    return common.LINEAR_PARTITION_SPECS


def input_scale_target(cfg: MaskedConfig) -> str:
    return "sq_norm_d"


def init(cfg: MaskedConfig, key: jax.Array, d: int, sample: np.ndarray) -> tuple[Params, State]:
    cfg.validate()
    k_dec, k_mask = jax.random.split(key)
    w_dec = common.random_unit_rows(k_dec, cfg.n_latents, d)
    b_dec = (
        common.geometric_median(sample) if cfg.init_b_dec == "geometric_median" else np.zeros(d, np.float32)
    )
    params = Params(
        W_enc=w_dec.T, b_enc=jnp.zeros((cfg.n_latents,), jnp.float32), W_dec=w_dec, b_dec=jnp.asarray(b_dec)
    )
    return params, State(step=jnp.zeros((), jnp.int32), key=k_mask)


def visible_mask(cfg: MaskedConfig, state: State, shape: tuple[int, int]) -> jax.Array:
    """float [B, d]: 1 on the visible coordinates (exactly n_visible per token), all ones for "plain"."""
    if cfg.objective == "plain":
        return jnp.ones(shape, jnp.float32)
    noise = jax.random.uniform(jax.random.fold_in(state.key, state.step), shape)
    ranks = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
    return (ranks < n_visible(cfg, shape[1])).astype(jnp.float32)


def omp(w: jax.Array, x_c: jax.Array, vis: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Orthogonal matching pursuit of x_c [B, d] on rows of w [n, d], on the coordinates where vis = 1.

    Returns (coefficients [B, k], indices [B, k]); least squares on the support after every pick.
    """
    b, _ = x_c.shape
    n = w.shape[0]
    target = x_c * vis
    norms = jnp.sqrt(jnp.maximum(vis @ jnp.square(w).T, 1e-12))  # [B, n] visible norm of each atom
    rows = jnp.arange(b)

    def body(t, carry):
        idx, coef, resid, taken = carry
        score = jnp.abs(resid @ w.T) / norms
        j = jnp.argmax(jnp.where(taken, -1.0, score), axis=1)
        idx = idx.at[:, t].set(j)
        taken = taken.at[rows, j].set(True)
        live = (jnp.arange(k) <= t).astype(x_c.dtype)  # slots filled so far
        atoms = w[idx] * vis[:, None, :] * live[None, :, None]  # [B, k, d]
        gram = jnp.einsum("bkd,bld->bkl", atoms, atoms) + jnp.diag(1.0 - live)[None]
        rhs = jnp.einsum("bkd,bd->bk", atoms, target)
        coef = jnp.linalg.solve(gram, rhs[..., None])[..., 0] * live[None, :]
        resid = target - jnp.einsum("bk,bkd->bd", coef, atoms)
        return idx, coef, resid, taken

    init_carry = (
        jnp.zeros((b, k), jnp.int32),
        jnp.zeros((b, k), x_c.dtype),
        target,
        jnp.zeros((b, n), bool),
    )
    idx, coef, _, _ = jax.lax.fori_loop(0, k, body, init_carry)
    return jax.lax.stop_gradient(coef), idx


def _topk_code(cfg: MaskedConfig, params: Params, x_in: jax.Array) -> tuple[jax.Array, jax.Array]:
    pre = jax.nn.relu(x_in @ params.W_enc + params.b_enc)
    _, idx = common.top_k(jax.lax.stop_gradient(pre), cfg.k)  # sharded over latents under a model mesh
    vals = jax.nn.relu(gather_encode(x_in, params.W_enc, params.b_enc, idx, pre))
    return vals, idx


def encode_sparse(cfg: MaskedConfig, params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inference code (values [B, k], indices [B, k]) from all coordinates."""
    x_c = x - params.b_dec
    if cfg.encoder == "omp":
        return omp(params.W_dec, x_c, jnp.ones_like(x_c), cfg.k)
    return _topk_code(cfg, params, x_c)


def encode(cfg: MaskedConfig, params: Params, state: State, x: jax.Array) -> jax.Array:
    vals, idx = encode_sparse(cfg, params, x)
    return common.dense_codes(vals, idx, params.W_dec.shape[0])


def decode(cfg: MaskedConfig, params: Params, f: jax.Array) -> jax.Array:
    return f @ params.W_dec + params.b_dec


def loss(
    cfg: MaskedConfig, params: Params, state: State, x: jax.Array, ctx: StepCtx
) -> tuple[jax.Array, dict[str, jax.Array]]:
    x_c = x - params.b_dec
    vis = visible_mask(cfg, state, x.shape)
    if cfg.encoder == "omp":
        vals, idx = omp(jax.lax.stop_gradient(params.W_dec), x_c, vis, cfg.k)
    else:
        scale = 1.0 if cfg.objective == "plain" else x.shape[1] / n_visible(cfg, x.shape[1])
        vals, idx = _topk_code(cfg, params, x_c * vis * scale)
    x_hat = sparse_decode(vals, idx, params.W_dec) + params.b_dec
    hidden = vis if cfg.objective == "plain" else 1.0 - vis
    dev = x - jnp.mean(x, axis=0, keepdims=True)
    h_err = jnp.sum(hidden * jnp.square(x - x_hat))
    h_var = jnp.sum(hidden * jnp.square(dev))
    err, var = common.fvu_terms(x, x_hat)
    active = vals != 0
    fires = jnp.zeros((cfg.n_latents,), jnp.float32).at[idx.reshape(-1)].add(active.reshape(-1))
    return h_err / jnp.maximum(h_var, 1e-12), {
        "err": err,
        "var": var,
        "l0": jnp.mean(jnp.sum(active, axis=1).astype(jnp.float32)),
        "fires": fires,
    }


def update_state(cfg: MaskedConfig, state: State, aux: dict[str, jax.Array], step: jax.Array) -> State:
    return state.replace(step=state.step + 1)


def project_grads(cfg: MaskedConfig, params: Params, grads: Params) -> Params:
    grads = grads.replace(W_dec=common.remove_parallel_component(params.W_dec, grads.W_dec))
    return grads if cfg.train_b_dec else grads.replace(b_dec=jnp.zeros_like(grads.b_dec))


def constrain(cfg: MaskedConfig, params: Params) -> Params:
    return params.replace(W_dec=common.normalize_rows(params.W_dec))


def fold_scale(cfg: MaskedConfig, params: Params, state: State, s: float) -> tuple[Params, State]:
    """Trained on s·x. TopK: pre = (s·x − b)W + c = (x − b/s)(sW) + c. OMP picks by norm-normalised
    correlation and solves least squares, so atoms w/s give the same code for x − b/s; x̂ = f·W/s + b/s."""
    return (
        Params(W_enc=params.W_enc * s, b_enc=params.b_enc, W_dec=params.W_dec / s, b_dec=params.b_dec / s),
        state,
    )
