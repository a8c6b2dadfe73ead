"""The TopK step's sparse backward must give the gradients plain autodiff gives on the dense formula."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae import common, native, topk
from sae.base import StepCtx
from sae.sparse_ops import gather_encode, sparse_decode


def _dense_topk_loss(cfg: topk.TopKConfig, params: topk.Params, x: jax.Array, dead: jax.Array) -> jax.Array:
    """The same loss written densely (mask multiply, full matmuls), differentiated by plain autodiff."""
    x_c = x - params.b_dec
    pre = jax.nn.relu(x_c @ params.W_enc + params.b_enc)
    scale = jnp.linalg.norm(params.W_dec, axis=1) if cfg.decoder == "free" else jnp.ones(pre.shape[1])
    score = jax.lax.stop_gradient(pre * scale)
    _, idx = jax.lax.top_k(score, cfg.k)
    mask = jnp.zeros_like(pre).at[jnp.arange(x.shape[0])[:, None], idx].set(1.0)
    x_hat = (pre * mask) @ params.W_dec + params.b_dec
    err, var = common.fvu_terms(x, x_hat)
    e = jax.lax.stop_gradient(x - x_hat)
    k_aux = x.shape[1] // 2
    _, aidx = jax.lax.top_k(jnp.where(dead[None, :], score, -jnp.inf), k_aux)
    keep = (jnp.arange(k_aux) < jnp.sum(dead))[None, :]
    amask = jnp.zeros_like(pre).at[jnp.arange(x.shape[0])[:, None], aidx].max(keep.astype(pre.dtype))
    e_hat = (pre * amask) @ params.W_dec
    aux = jnp.sum(jnp.square(e - e_hat)) / jnp.sum(jnp.square(e - e.mean(0)))
    aux = jnp.where(jnp.any(dead), aux, 0.0)  # L_aux = 0 when nothing is dead
    return err / var + cfg.aux_coef * aux


def _kernels(use_native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Native CPU kernels (top-k and the sparse row kernels) or their plain XLA references."""
    if use_native:
        assert native.available(), "the native kernels did not build: is g++ installed?"
    else:
        monkeypatch.setattr(native, "usable_for", lambda x: False)


@pytest.mark.parametrize("b", [32, 1100])  # 1100 > ENCODE_CHUNK: the selection runs in padded chunks on CPU
@pytest.mark.parametrize("some_dead", [True, False])
@pytest.mark.parametrize("decoder", ["unit", "free"])
@pytest.mark.parametrize("use_native", [True, False], ids=["native", "xla"])
def test_sparse_backward_matches_dense_autodiff(
    use_native: bool, decoder: str, some_dead: bool, b: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    _kernels(use_native, monkeypatch)
    d, n = 12, 64
    monkeypatch.setattr(common, "ENCODE_CHUNK_MIN_SCORES", 0)  # chunk even this small problem
    cfg = topk.TopKConfig(n_latents=n, k=5, decoder=decoder)
    key = jax.random.PRNGKey(3)
    x = jax.random.normal(key, (b, d)) + 0.5
    params, state = topk.init(cfg, jax.random.PRNGKey(1), d, np.asarray(x))
    # perturb so encoder and decoder differ and b_enc is non-zero
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(2), 3)
    params = params.replace(
        W_enc=params.W_enc + 0.1 * jax.random.normal(k1, params.W_enc.shape),
        b_enc=0.05 * jax.random.normal(k2, params.b_enc.shape),
        W_dec=params.W_dec + 0.1 * jax.random.normal(k3, params.W_dec.shape),
    )
    dead = (jnp.arange(n) % 3 == 0) & some_dead
    ctx = StepCtx(dead=dead, progress=jnp.float32(0.5))
    sparse_grads = jax.jit(jax.grad(lambda p: topk.loss(cfg, p, state, x, ctx)[0]))(params)
    dense_grads = jax.jit(jax.grad(lambda p: _dense_topk_loss(cfg, p, x, dead)))(params)
    sparse_val, sparse_aux = topk.loss(cfg, params, state, x, ctx)
    if not some_dead:
        assert float(sparse_aux["aux"]) == 0.0
    np.testing.assert_allclose(sparse_val, _dense_topk_loss(cfg, params, x, dead), rtol=1e-5)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        g_s = np.asarray(getattr(sparse_grads, name))
        g_d = np.asarray(getattr(dense_grads, name))
        assert np.abs(g_d).max() > 0, name
        np.testing.assert_allclose(g_s, g_d, rtol=2e-4, atol=2e-6, err_msg=name)


@pytest.mark.parametrize(("dead_bias", "width"), [(-3.0, 64), (-1.2, 256), (0.5, 400)])
def test_auxk_over_the_positive_prefix_equals_auxk_over_every_pick(
    dead_bias: float, width: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AuxK reconstructs over the smallest static prefix of its sorted picks that holds every token's
    positive ones: loss and gradients equal those over all k_aux picks, whichever prefix is taken."""
    d, n, b = 16, 1024, 96
    cfg = topk.TopKConfig(n_latents=n, k=8, k_aux=400)
    x = jax.random.normal(jax.random.PRNGKey(5), (b, d)) + 0.3
    params, state = topk.init(cfg, jax.random.PRNGKey(6), d, np.asarray(x))
    dead = jnp.arange(n) % 2 == 0
    params = params.replace(
        W_enc=jax.random.normal(jax.random.PRNGKey(7), params.W_enc.shape) / np.sqrt(d),
        b_enc=jnp.where(dead, dead_bias, 0.0),
    )
    pre = np.asarray(jax.nn.relu((x - params.b_dec) @ params.W_enc + params.b_enc))
    positive = int(np.max(np.sum((pre > 0) & np.asarray(dead)[None, :], axis=1)))
    assert positive <= width and (width == 64 or positive > width // 4)  # the case picks its prefix
    ctx = StepCtx(dead=dead, progress=jnp.float32(0.5))

    def value_and_grads() -> tuple[jax.Array, topk.Params]:
        return jax.jit(jax.value_and_grad(lambda p: topk.loss(cfg, p, state, x, ctx)[1]["aux"]))(params)

    got = value_and_grads()
    monkeypatch.setattr(common, "AUX_WIDTHS", ())  # every pick, one width
    want = value_and_grads()
    assert float(want[0]) > 0
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_allclose(
            getattr(got[1], name), getattr(want[1], name), rtol=1e-5, atol=1e-7, err_msg=name
        )


def test_kernels_vjp_match_gather_autodiff() -> None:
    rng = np.random.default_rng(0)
    b, k, n, d = 6, 3, 10, 4
    vals = jnp.asarray(rng.normal(size=(b, k)), jnp.float32)
    idx = jnp.asarray(rng.integers(0, n, size=(b, k)))  # repeats exercise the scatter-add
    w_dec = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
    w_enc = jnp.asarray(rng.normal(size=(d, n)), jnp.float32)
    b_enc = jnp.asarray(rng.normal(size=(n,)), jnp.float32)
    ref_dec = lambda v, w: jnp.sum(jnp.sin(jnp.einsum("bk,bkd->bd", v, w[idx])))  # noqa: E731
    got_dec = lambda v, w: jnp.sum(jnp.sin(sparse_decode(v, idx, w)))  # noqa: E731
    for a, r in zip(
        jax.grad(got_dec, (0, 1))(vals, w_dec), jax.grad(ref_dec, (0, 1))(vals, w_dec), strict=True
    ):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)
    ref_enc = lambda x, w, bb: jnp.sum(jnp.sin((x @ w + bb)[jnp.arange(b)[:, None], idx]))  # noqa: E731
    got_enc = lambda x, w, bb: jnp.sum(jnp.sin(gather_encode(x, w, bb, idx)))  # noqa: E731
    for a, r in zip(
        jax.grad(got_enc, (0, 1, 2))(x, w_enc, b_enc),
        jax.grad(ref_enc, (0, 1, 2))(x, w_enc, b_enc),
        strict=True,
    ):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)


def test_gather_encode_from_dense_pre_matches() -> None:
    """Reading the forward from the caller's dense pre-activations changes neither values nor grads."""
    rng = np.random.default_rng(1)
    b, k, n, d = 6, 3, 10, 4
    idx = jnp.asarray(rng.integers(0, n, size=(b, k)))
    x = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
    w_enc = jnp.asarray(rng.normal(size=(d, n)), jnp.float32)
    b_enc = jnp.asarray(rng.normal(size=(n,)), jnp.float32)
    plain = lambda x, w, bb: jnp.sum(jnp.sin(jax.nn.relu(gather_encode(x, w, bb, idx))))  # noqa: E731
    from_pre = lambda x, w, bb: jnp.sum(  # noqa: E731
        jnp.sin(jax.nn.relu(gather_encode(x, w, bb, idx, jax.nn.relu(x @ w + bb))))
    )
    np.testing.assert_allclose(from_pre(x, w_enc, b_enc), plain(x, w_enc, b_enc), rtol=1e-5)
    for a, r in zip(
        jax.grad(from_pre, (0, 1, 2))(x, w_enc, b_enc),
        jax.grad(plain, (0, 1, 2))(x, w_enc, b_enc),
        strict=True,
    ):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_dead", [1, 40, 250, 700, 3000, 4096])
@pytest.mark.parametrize("use_native", [True, False], ids=["native", "xla"])
def test_dead_top_k_matches_the_masked_search(
    n_dead: int, use_native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The search over dead columns (native, or compacted in XLA) picks exactly what top-k over all
    masked latents picks."""
    _kernels(use_native, monkeypatch)
    n, b, k = 4096, 16, 48
    rng = np.random.default_rng(n_dead)
    dead = np.zeros(n, bool)
    dead[rng.choice(n, n_dead, replace=False)] = True
    score = rng.random((b, n)).astype(np.float32)
    score[:, :8] = 0.0  # ties (ReLU zeros) must break alike
    got_vals, got = jax.jit(lambda s, m: common.dead_top_k(s, m, k))(jnp.asarray(score), jnp.asarray(dead))
    want_vals, want = jax.lax.top_k(jnp.where(jnp.asarray(dead)[None, :], score, -jnp.inf), k)
    valid = min(k, n_dead)  # past #dead both return arbitrary live latents, which AuxK masks out
    np.testing.assert_array_equal(np.asarray(got)[:, :valid], np.asarray(want)[:, :valid])
    np.testing.assert_array_equal(np.asarray(got_vals), np.asarray(want_vals))  # −inf past #dead
    assert dead[np.asarray(got)[:, :valid]].all()


@pytest.mark.parametrize("n_dead", [0, 30, 2000])
@pytest.mark.parametrize("use_native", [True, False], ids=["native", "xla"])
def test_encode_top_k_in_chunks_equals_the_dense_search(
    n_dead: int, use_native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunked (B > ENCODE_CHUNK, padded) or not, with the native CPU search or in plain XLA, the
    picks and the dead picks are those of one dense search."""
    b, d, n, k, k_aux = common.ENCODE_CHUNK * 2 + 37, 16, 2048, 16, 8
    monkeypatch.setattr(common, "ENCODE_CHUNK_MIN_SCORES", 0)  # chunk this small problem too
    _kernels(use_native, monkeypatch)
    rng = np.random.default_rng(n_dead)
    x_c = jnp.asarray(rng.normal(size=(b, d)).astype(np.float32))
    w_enc = jnp.asarray(rng.normal(size=(d, n)).astype(np.float32))
    b_enc = jnp.asarray(rng.normal(size=n).astype(np.float32) - 2.0)  # many ReLU zeros: ties must break alike
    scale = jnp.asarray(rng.uniform(0.5, 2.0, (1, n)).astype(np.float32))
    dead_np = np.zeros(n, bool)
    dead_np[rng.choice(n, n_dead, replace=False)] = True
    dead = jnp.asarray(dead_np) if n_dead else None
    search = lambda x: common.encode_top_k(x, w_enc, b_enc, k, scale, dead, k_aux)  # noqa: E731
    jaxpr = str(jax.make_jaxpr(search)(x_c))
    assert "scan" in jaxpr  # the chunked path is the one under test
    assert ("saewb_" in jaxpr) == use_native  # and the native search exactly when asked for
    got_v, got_i, got_dead = jax.jit(search)(x_c)
    score = jax.nn.relu(x_c @ w_enc + b_enc) * scale
    want_v, want_i = jax.lax.top_k(score, k)
    np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
    np.testing.assert_allclose(np.asarray(got_v), np.asarray(want_v), rtol=1e-6)
    if dead is None:
        assert got_dead is None
        return
    want_dv, want_di = jax.lax.top_k(jnp.where(dead[None, :], score, -jnp.inf), k_aux)
    valid = min(k_aux, n_dead)
    np.testing.assert_array_equal(np.asarray(got_dead[1])[:, :valid], np.asarray(want_di)[:, :valid])
    np.testing.assert_allclose(np.asarray(got_dead[0]), np.asarray(want_dv), rtol=1e-6)


@pytest.mark.parametrize("k", [3, 80])  # 80 > SCATTER_LOOP_K: the one-pick-at-a-time scatter
@pytest.mark.parametrize("use_native", [True, False], ids=["native", "xla"])
def test_sparse_kernels_match_dense_autodiff(
    use_native: bool, k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    _kernels(use_native, monkeypatch)
    b, n, d = 24, 200, 10
    rng = np.random.default_rng(k)
    idx = jnp.asarray(np.argsort(rng.random((b, n)), axis=1)[:, :k].astype(np.int32))
    vals = jnp.asarray(rng.normal(size=(b, k)).astype(np.float32))
    w_dec = jnp.asarray(rng.normal(size=(n, d)).astype(np.float32))
    w_enc, b_enc = w_dec.T * 0.7, jnp.asarray(rng.normal(size=n).astype(np.float32))
    x, b_dec = (
        jnp.asarray(rng.normal(size=(b, d)).astype(np.float32)),
        jnp.asarray(rng.normal(size=d).astype(np.float32)),
    )
    dense = jnp.zeros((b, n)).at[jnp.arange(b)[:, None], idx]

    def sparse_loss(v, wd, we, be, bd):
        codes = gather_encode(x - bd, we, be, idx, b_dec=bd) * v
        return jnp.sum(jnp.sin(sparse_decode(codes, idx, wd)))

    def dense_loss(v, wd, we, be, bd):
        pre = (x - bd) @ we + be
        codes = dense.set(jnp.take_along_axis(pre, idx, axis=1) * v)
        return jnp.sum(jnp.sin(codes @ wd))

    args = (vals, w_dec, w_enc, b_enc, b_dec)
    for g_s, g_d in zip(
        jax.grad(sparse_loss, argnums=(0, 1, 2, 3, 4))(*args),
        jax.grad(dense_loss, argnums=(0, 1, 2, 3, 4))(*args),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(g_s), np.asarray(g_d), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("k", [1, 7, 32])
def test_block_top_k_equals_lax_top_k_ties_included(k: int) -> None:
    from sae.sharding import block_top_k

    rng = np.random.default_rng(k)
    score = np.maximum(rng.standard_normal((64, 1024)), 0.0).astype(np.float32)  # half ReLU zeros
    score[:8] = np.where(rng.random((8, 1024)) < 0.995, 0.0, score[:8])  # rows with fewer than k positives
    score[8:16] = np.round(score[8:16], 1)  # many equal values across blocks
    score[16] = 1.0  # one row all equal
    score[17, ::16] = 5.0  # every block's maximum ties
    want_v, want_i = jax.lax.top_k(jnp.asarray(score), k)
    for block in (8, 16, 32):
        got_v, got_i = jax.jit(lambda s, b=block: block_top_k(s, k, b))(jnp.asarray(score))
        np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
        np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
