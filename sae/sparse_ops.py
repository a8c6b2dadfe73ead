"""Sparse encoder/decoder kernels with hand-written backward passes (jax.custom_vjp).

For TopK only the dense encoder forward (choosing indices) is O(B·n·d). Everything after the
choice touches k rows per token:

* ``gather_encode``: the chosen latents' pre-activations, x_c · W_enc[:, idx] + b_enc[idx], read
  from the dense pre-activations when the caller passes them (O(B·k)); the backward scatters B·k
  rows into dW_enc / db_enc.
* ``sparse_decode``: x̂ = Σ_j vals_j · W_dec[idx_j]; the backward gathers for dvals and scatters
  B·k rows into dW_dec.

How they touch rows, by measurement (XLA CPU, B = 4096, k = 32, d = 384, n = 16384; in units of
the dense encoder matmul): gathering a [B, k, d] block and contracting it cost 0.26, while one
row gather per j fused into a running multiply-add (``weighted_row_sum``, ``row_dots``) cost
0.02; the per-token input gradient through gathered encoder columns cost 1.1 to 1.3 and is
avoided when the caller passes ``b_dec`` (see ``gather_encode``). Scatters stay one
``.at[].add`` of B·k rows (0.17; a loop over j was 0.20). Indices come from top-k, so they are
in bounds and the gathers skip bounds handling. Indices get no gradient.

On CPU, for float32 outside a mesh, the three row kernels (``weighted_row_sum``, ``row_dots``,
``scatter_outer``) run natively instead (``sae.native``, ``sparse.cc``): tokens or latents shared
between threads, and the scatter reads each token's row in place instead of writing the [B·k, d]
block. The XLA versions below are the reference and serve accelerators and meshes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sae import native


def _rows(m: jax.Array, col: jax.Array) -> jax.Array:
    """Rows m[col] of m [n, d] for col [B] (in bounds by construction)."""
    return m.at[col].get(mode="promise_in_bounds")


def _column(a: jax.Array, j: jax.Array, keepdims: bool = False) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(a, j, axis=1, keepdims=keepdims)


def weighted_row_sum(vals: jax.Array, idx: jax.Array, m: jax.Array) -> jax.Array:
    """Σ_j vals[:, j] · m[idx[:, j]] → [B, d], never materialising the [B, k, d] gathered block."""
    if native.serves(vals, m):
        return native.weighted_row_sum(vals, idx, m)

    def body(j: jax.Array, acc: jax.Array) -> jax.Array:
        return acc + _column(vals, j, keepdims=True) * _rows(m, _column(idx, j))

    init = jnp.zeros((idx.shape[0], m.shape[1]), jnp.result_type(vals, m))
    return jax.lax.fori_loop(0, idx.shape[1], body, init)


def row_dots(g: jax.Array, idx: jax.Array, m: jax.Array) -> jax.Array:
    """[B, k] of g[b] · m[idx[b, j]], one fused row gather per j."""
    if native.serves(g, m):
        return native.row_dots(g, idx, m)

    def body(j: jax.Array, out: jax.Array) -> jax.Array:
        dots = jnp.sum(g * _rows(m, _column(idx, j)), axis=1)
        return jax.lax.dynamic_update_index_in_dim(out, dots.astype(out.dtype), j, axis=1)

    return jax.lax.fori_loop(0, idx.shape[1], body, jnp.zeros(idx.shape, jnp.result_type(g, m)))


SCATTER_LOOP_K = 64
"""Above this many picks per token, scatters go one pick at a time (a [B, k, d] block would be
1.2 GB for AuxK's k = 192 at B = 4096, d = 384)."""


def scatter_outer(coef: jax.Array, idx: jax.Array, rows: jax.Array, n: int) -> jax.Array:
    """[n, d] with Σ over (b, j) of coef[b, j] · rows[b] added at row idx[b, j]."""
    if native.serves(coef, rows):
        return native.scatter_outer(coef, idx, rows, n)[0]
    d = rows.shape[1]
    dtype = jnp.result_type(coef, rows)
    if idx.shape[1] <= SCATTER_LOOP_K:
        contrib = (coef[:, :, None] * rows[:, None, :]).reshape(-1, d)
        return jnp.zeros((n, d), dtype).at[idx.reshape(-1)].add(contrib, mode="promise_in_bounds")

    def body(j: jax.Array, acc: jax.Array) -> jax.Array:
        return acc.at[_column(idx, j)].add(_column(coef, j, keepdims=True) * rows, mode="promise_in_bounds")

    return jax.lax.fori_loop(0, idx.shape[1], body, jnp.zeros((n, d), dtype))


def _scatter_sum(g: jax.Array, idx: jax.Array, n: int) -> jax.Array:
    return jnp.zeros((n,), g.dtype).at[idx.reshape(-1)].add(g.reshape(-1), mode="promise_in_bounds")


@jax.custom_vjp
def sparse_decode(vals: jax.Array, idx: jax.Array, w_dec: jax.Array) -> jax.Array:
    """[B, k] values at [B, k] indices times rows of w_dec [n, d] → [B, d]."""
    return weighted_row_sum(vals, idx, w_dec)


def _decode_fwd(vals: jax.Array, idx: jax.Array, w_dec: jax.Array):
    return sparse_decode(vals, idx, w_dec), (vals, idx, w_dec)


def _decode_bwd(res, g: jax.Array):
    vals, idx, w_dec = res
    return row_dots(g, idx, w_dec), None, scatter_outer(vals, idx, g, w_dec.shape[0]).astype(w_dec.dtype)


sparse_decode.defvjp(_decode_fwd, _decode_bwd)


def gather_encode(
    x_c: jax.Array,
    w_enc: jax.Array,
    b_enc: jax.Array,
    idx: jax.Array,
    pre: jax.Array | None = None,
    b_dec: jax.Array | None = None,
    chosen: jax.Array | None = None,
) -> jax.Array:
    """Pre-activations of the chosen latents only: x_c [B, d], w_enc [d, n], idx [B, k] → [B, k].

    ``pre`` [B, n]: the dense pre-activations x_c · W_enc + b_enc the caller already computed (to
    choose idx), or their ReLU when the caller applies ReLU to the result (relu(relu(z)) = relu(z),
    with the same zero gradient where z <= 0). When given, the forward values are read from it,
    O(B·k), instead of computing k dot products per token, O(B·k·d). No gradient flows into ``pre``.
    ``chosen`` [B, k]: those values already read (top-k returns them), the cheapest of the three.

    ``b_dec``: pass it when x_c = x − b_dec with x data (the training case). Then no per-token
    gradient is formed for x_c; b_dec gets its exact gradient −W_enc · db_enc in one matrix-vector
    product instead (Σ_b dx_c[b] = W_enc · db_enc, since each chosen pair (b, j) adds g[b, j] to
    both). Without ``b_dec`` the full gradient of x_c is returned, for callers that need it.
    """
    if chosen is not None:
        vals = chosen
    elif pre is not None:
        vals = jnp.take_along_axis(pre, idx, axis=1)
    else:
        sg = jax.lax.stop_gradient  # the native kernels have no gradient rule; none is wanted here
        vals = row_dots(sg(x_c), idx, sg(w_enc).T) + b_enc[idx]
    vals = jax.lax.stop_gradient(vals)
    if b_dec is None:
        return _gather_encode(x_c, w_enc, b_enc, idx, vals)
    return _gather_encode_data(x_c, b_dec, w_enc, b_enc, idx, vals)


def _encoder_grads(
    g: jax.Array, x_c: jax.Array, w_enc: jax.Array, idx: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(dW_enc [d, n], db_enc [n]) of x_c · W_enc[:, idx] + b_enc[idx] with output cotangent g [B, k]."""
    n = w_enc.shape[1]
    if native.serves(g, x_c):  # written in W_enc's [d, n] layout, the bias sums alongside
        d_w, d_b = native.scatter_outer(g, idx, x_c, n, transposed=True)
        return d_w.astype(w_enc.dtype), d_b
    return scatter_outer(g, idx, x_c, n).T.astype(w_enc.dtype), _scatter_sum(g, idx, n)


@jax.custom_vjp
def _gather_encode(
    x_c: jax.Array, w_enc: jax.Array, b_enc: jax.Array, idx: jax.Array, vals: jax.Array
) -> jax.Array:
    """Identity on the precomputed ``vals`` [B, k]; the backward differentiates x_c · W_enc[:, idx] + b_enc[idx]."""
    return vals


def _encode_fwd(x_c: jax.Array, w_enc: jax.Array, b_enc: jax.Array, idx: jax.Array, vals: jax.Array):
    return vals, (x_c, w_enc, idx)


def _encode_bwd(res, g: jax.Array):
    x_c, w_enc, idx = res
    d_w, d_b = _encoder_grads(g, x_c, w_enc, idx)
    d_x = weighted_row_sum(g, idx, w_enc.T)
    return d_x.astype(x_c.dtype), d_w, d_b.astype(w_enc.dtype), None, None


_gather_encode.defvjp(_encode_fwd, _encode_bwd)


@jax.custom_vjp
def _gather_encode_data(
    x_c: jax.Array, b_dec: jax.Array, w_enc: jax.Array, b_enc: jax.Array, idx: jax.Array, vals: jax.Array
) -> jax.Array:
    """As ``_gather_encode`` with x_c = x − b_dec for data x: the gradient goes to b_dec, not x_c."""
    return vals


def _encode_data_fwd(x_c, b_dec, w_enc, b_enc, idx, vals):
    return vals, (x_c, w_enc, idx)


def _encode_data_bwd(res, g: jax.Array):
    x_c, w_enc, idx = res
    d_w, d_b = _encoder_grads(g, x_c, w_enc, idx)
    d_b_dec = -(w_enc @ d_b)
    return jnp.zeros_like(x_c), d_b_dec.astype(w_enc.dtype), d_w, d_b.astype(w_enc.dtype), None, None


_gather_encode_data.defvjp(_encode_data_fwd, _encode_data_bwd)


@jax.custom_vjp
def prefix_errors(
    x_c: jax.Array, vals: jax.Array, idx: jax.Array, w_dec: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Errors of every prefix of a sparse code, one row gather per pick (HierarchicalTopK's loss).

    With r_j = x_c − Σ_{i≤j} vals[:, i] · w_dec[idx[:, i]]: returns ([K] Σ_tokens ‖r_j‖² for j = 1..K,
    r_K [B, d]). Memory O(B·d): the [B, K, d] block of prefix reconstructions is never formed. The
    backward walks the picks from last to first, rebuilding r_{j-1} = r_j + v_j·w_j and accumulating
    Q_j = Σ_{i≥j} ∂L/∂r_i; then dv_j = −Q_j·w_j, dW_dec[idx_j] −= v_j·Q_j and dx_c = Q_1.
    """
    return _prefix_errors_fwd(x_c, vals, idx, w_dec)[0]


def _prefix_errors_fwd(x_c: jax.Array, vals: jax.Array, idx: jax.Array, w_dec: jax.Array):
    def body(j: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        r, errs = carry
        r = r - _column(vals, j, keepdims=True) * _rows(w_dec, _column(idx, j))
        return r, errs.at[j].set(jnp.sum(jnp.square(r.astype(jnp.float32))))

    r, errs = jax.lax.fori_loop(0, idx.shape[1], body, (x_c, jnp.zeros((idx.shape[1],), jnp.float32)))
    return (errs, r), (vals, idx, w_dec, r)


def _prefix_errors_bwd(res, cot: tuple[jax.Array, jax.Array]):
    vals, idx, w_dec, r_last = res
    g_errs, g_r = cot
    kk = idx.shape[1]

    def body(t: jax.Array, carry):
        r, q, dv, dw = carry  # r = r_j, q = Q_{j+1}
        j = kk - 1 - t
        q = q + (2.0 * g_errs[j]).astype(q.dtype) * r
        row = _rows(w_dec, _column(idx, j))
        v = _column(vals, j, keepdims=True)
        dv = jax.lax.dynamic_update_index_in_dim(dv, -jnp.sum(q * row, axis=1).astype(dv.dtype), j, axis=1)
        dw = dw.at[_column(idx, j)].add(-(v * q).astype(dw.dtype), mode="promise_in_bounds")
        return r + v * row, q, dv, dw

    init = (r_last, g_r.astype(r_last.dtype), jnp.zeros_like(vals), jnp.zeros_like(w_dec))
    _, q, dv, dw = jax.lax.fori_loop(0, kk, body, init)
    return q, dv, None, dw


prefix_errors.defvjp(_prefix_errors_fwd, _prefix_errors_bwd)
