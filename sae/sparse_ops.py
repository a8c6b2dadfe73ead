"""Sparse encoder/decoder kernels with hand-written backward passes (jax.custom_vjp).

For TopK only the dense encoder forward (choosing indices) is O(B·n·d). Everything after the
choice touches k rows per token:

* ``gather_encode``: the chosen latents' pre-activations, x_c · W_enc[:, idx] + b_enc[idx], read
  from the dense pre-activations when the caller passes them (O(B·k)); backward scatters B·k rows into dW_enc / db_enc and gathers for dx.
* ``sparse_decode``: x̂ = Σ_j vals_j · W_dec[idx_j] (gather-sum); backward gathers for dvals and
  scatters B·k rows into dW_dec.

Both are O(B·k·d) in time and memory; indices get no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def sparse_decode(vals: jax.Array, idx: jax.Array, w_dec: jax.Array) -> jax.Array:
    """[B, k] values at [B, k] indices times rows of w_dec [n, d] → [B, d]."""
    return jnp.einsum("bk,bkd->bd", vals, w_dec[idx])


def _decode_fwd(vals: jax.Array, idx: jax.Array, w_dec: jax.Array):
    return sparse_decode(vals, idx, w_dec), (vals, idx, w_dec)


def _decode_bwd(res, g: jax.Array):
    vals, idx, w_dec = res
    rows = w_dec[idx]  # [B, k, d]
    d_vals = jnp.einsum("bd,bkd->bk", g, rows)
    contrib = vals[:, :, None] * g[:, None, :]  # [B, k, d]
    d_w = jnp.zeros_like(w_dec).at[idx.reshape(-1)].add(contrib.reshape(-1, w_dec.shape[1]))
    return d_vals, None, d_w


sparse_decode.defvjp(_decode_fwd, _decode_bwd)


def gather_encode(
    x_c: jax.Array, w_enc: jax.Array, b_enc: jax.Array, idx: jax.Array, pre: jax.Array | None = None
) -> jax.Array:
    """Pre-activations of the chosen latents only: x_c [B, d], w_enc [d, n], idx [B, k] → [B, k].

    ``pre`` [B, n]: the dense pre-activations x_c · W_enc + b_enc the caller already computed (to
    choose idx), or their ReLU when the caller applies ReLU to the result (relu(relu(z)) = relu(z),
    with the same zero gradient where z <= 0). When given, the forward values are read from it,
    O(B·k), instead of gathering k columns of W_enc per token, O(B·k·d). The backward is the same
    sparse one either way and no gradient flows into ``pre``.
    """
    if pre is None:
        cols = jnp.take(w_enc.T, idx, axis=0)  # [B, k, d]
        vals = jnp.einsum("bd,bkd->bk", x_c, cols) + b_enc[idx]
    else:
        vals = jnp.take_along_axis(pre, idx, axis=1)
    return _gather_encode(x_c, w_enc, b_enc, idx, jax.lax.stop_gradient(vals))


@jax.custom_vjp
def _gather_encode(x_c: jax.Array, w_enc: jax.Array, b_enc: jax.Array, idx: jax.Array, vals: jax.Array) -> jax.Array:
    """Identity on the precomputed ``vals`` [B, k]; the backward differentiates x_c · W_enc[:, idx] + b_enc[idx]."""
    return vals


def _encode_fwd(x_c: jax.Array, w_enc: jax.Array, b_enc: jax.Array, idx: jax.Array, vals: jax.Array):
    return vals, (x_c, w_enc, b_enc, idx)


def _encode_bwd(res, g: jax.Array):
    x_c, w_enc, b_enc, idx = res
    cols = jnp.take(w_enc.T, idx, axis=0)  # [B, k, d]
    d_x = jnp.einsum("bk,bkd->bd", g, cols)
    contrib = g[:, :, None] * x_c[:, None, :]  # [B, k, d]
    flat = idx.reshape(-1)
    d_wt = jnp.zeros((w_enc.shape[1], w_enc.shape[0]), w_enc.dtype).at[flat].add(
        contrib.reshape(-1, x_c.shape[1])
    )
    d_b = jnp.zeros_like(b_enc).at[flat].add(g.reshape(-1))
    return d_x, d_wt.T, d_b, None, None


_gather_encode.defvjp(_encode_fwd, _encode_bwd)
