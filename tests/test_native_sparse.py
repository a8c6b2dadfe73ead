"""The native CPU sparse kernels (sae.native, sparse.cc) against their XLA references in sae.sparse_ops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae import native, sparse_ops


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert native.available(), "the native kernels did not build or register: is g++ installed?"


def _xla(fn, *args):
    """An sae.sparse_ops kernel with the native path turned off (its plain XLA reference)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(native, "usable_for", lambda x: False)
        return jax.jit(fn, static_argnums=tuple(i for i, a in enumerate(args) if isinstance(a, int)))(*args)


def _picks(b: int, k: int, n: int, seed: int, repeats: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if repeats:  # the same latent picked twice in a row, which top-k never does but the kernels allow
        return rng.integers(0, n, (b, k)).astype(np.int32)
    return np.argsort(rng.random((b, n)), axis=1)[:, :k].astype(np.int32)


# (B, k, n, d): a TopK step's shape scaled down, AuxK's wide k, a single token, latents never picked
SHAPES = [(300, 32, 2048, 96), (64, 192, 512, 40), (1, 5, 7, 3), (50, 4, 10_000, 17)]


@pytest.mark.parametrize(("b", "k", "n", "d"), SHAPES)
@pytest.mark.parametrize("repeats", [False, True])
def test_native_kernels_equal_the_xla_references(b: int, k: int, n: int, d: int, repeats: bool) -> None:
    rng = np.random.default_rng(b + k)
    idx = jnp.asarray(_picks(b, k, n, seed=n, repeats=repeats))
    vals = jnp.asarray(rng.normal(size=(b, k)).astype(np.float32))
    m = jnp.asarray(rng.normal(size=(n, d)).astype(np.float32))
    g = jnp.asarray(rng.normal(size=(b, d)).astype(np.float32))
    tol = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(native.weighted_row_sum(vals, idx, m)),
        np.asarray(_xla(sparse_ops.weighted_row_sum, vals, idx, m)),
        **tol,
    )
    np.testing.assert_allclose(
        np.asarray(native.row_dots(g, idx, m)), np.asarray(_xla(sparse_ops.row_dots, g, idx, m)), **tol
    )
    want = np.asarray(_xla(sparse_ops.scatter_outer, vals, idx, g, n))
    want_sums = np.zeros(n, np.float32)
    np.add.at(want_sums, np.asarray(idx).ravel(), np.asarray(vals).ravel())
    out, sums = native.scatter_outer(vals, idx, g, n)
    out_t, sums_t = native.scatter_outer(vals, idx, g, n, transposed=True)
    np.testing.assert_allclose(np.asarray(out), want, **tol)
    np.testing.assert_array_equal(np.asarray(out_t), np.asarray(out).T)  # the same sums, written transposed
    np.testing.assert_allclose(np.asarray(sums), want_sums, **tol)
    np.testing.assert_array_equal(np.asarray(sums_t), np.asarray(sums))
    unpicked = np.setdiff1d(np.arange(n), np.asarray(idx))
    assert not np.asarray(out)[unpicked].any()  # every row is written, untouched ones as zeros


def test_native_scatter_is_deterministic() -> None:
    """Each latent's row is summed in (b, j) order by one thread: repeated calls agree bit for bit."""
    b, k, n, d = 2048, 32, 512, 64  # ~128 picks per latent, spread over every thread
    rng = np.random.default_rng(0)
    idx = jnp.asarray(_picks(b, k, n, 1))
    coef = jnp.asarray(rng.normal(size=(b, k)).astype(np.float32))
    rows = jnp.asarray(rng.normal(size=(b, d)).astype(np.float32))
    first = np.asarray(native.scatter_outer(coef, idx, rows, n)[0])
    for _ in range(5):
        np.testing.assert_array_equal(np.asarray(native.scatter_outer(coef, idx, rows, n)[0]), first)


def test_native_kernels_vmap_over_members() -> None:
    """The sweep vmaps a step over SAEs: each member's matrix with its own picks."""
    rng = np.random.default_rng(2)
    members, b, k, n, d = 3, 40, 6, 90, 12
    idx = jnp.asarray(np.stack([_picks(b, k, n, s) for s in range(members)]))
    vals = jnp.asarray(rng.normal(size=(members, b, k)).astype(np.float32))
    m = jnp.asarray(rng.normal(size=(members, n, d)).astype(np.float32))
    got = jax.jit(jax.vmap(native.weighted_row_sum))(vals, idx, m)
    got_s = jax.jit(jax.vmap(lambda c, i, r: native.scatter_outer(c, i, r, n, transposed=True)[0]))(
        vals, idx, m[:, :b]
    )
    for i in range(members):
        np.testing.assert_allclose(
            np.asarray(got[i]), np.asarray(native.weighted_row_sum(vals[i], idx[i], m[i])), rtol=1e-6
        )
        np.testing.assert_allclose(
            np.asarray(got_s[i]),
            np.asarray(native.scatter_outer(vals[i], idx[i], m[i, :b], n, transposed=True)[0]),
            rtol=1e-6,
        )


def test_native_kernels_refuse_indices_out_of_range() -> None:
    idx = jnp.asarray([[0, 5]], jnp.int32)
    m = jnp.ones((5, 4), jnp.float32)
    with pytest.raises(Exception, match=r"every index in \[0, n\)"):
        jax.block_until_ready(native.weighted_row_sum(jnp.ones((1, 2), jnp.float32), idx, m))
    with pytest.raises(Exception, match=r"every index in \[0, n\)"):
        jax.block_until_ready(
            native.scatter_outer(jnp.ones((1, 2), jnp.float32), idx, jnp.ones((1, 4), jnp.float32), 5)
        )


def test_sparse_ops_take_the_native_kernels_on_cpu_outside_a_mesh() -> None:
    idx = jnp.zeros((4, 2), jnp.int32)
    vals, m = jnp.ones((4, 2), jnp.float32), jnp.ones((8, 3), jnp.float32)
    assert "saewb_weighted_row_sum_f32" in str(jax.make_jaxpr(sparse_ops.weighted_row_sum)(vals, idx, m))
    # bfloat16 (the bf16 compute option) stays in XLA
    bf = jax.make_jaxpr(sparse_ops.weighted_row_sum)(vals.astype(jnp.bfloat16), idx, m.astype(jnp.bfloat16))
    assert "saewb_" not in str(bf)
