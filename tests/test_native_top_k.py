"""The native CPU top-k (sae.native): built with the system compiler, equal to jax.lax.top_k."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae import common, native, sharding


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert native.available(), "the native top-k kernel did not build or register: is g++ installed?"


def _cases() -> list[tuple[str, np.ndarray, int]]:
    rng = np.random.default_rng(0)
    special = np.array([0.0, -0.0, np.nan, np.inf, -np.inf, 1.0, -np.nan, 0.0, 3e-45, -3e-45], np.float32)
    return [
        ("normal", rng.normal(size=(64, 16384)).astype(np.float32), 32),
        ("ties", rng.integers(-4, 4, (37, 1000)).astype(np.float32), 50),  # most values tie
        ("relu zeros", np.maximum(rng.normal(size=(20, 300)) - 2, 0).astype(np.float32), 40),
        ("k = n", rng.normal(size=(5, 33)).astype(np.float32), 33),
        ("k = 1", rng.normal(size=(9, 17)).astype(np.float32), 1),
        ("batch dims", rng.normal(size=(3, 4, 257)).astype(np.float32), 7),
        ("special values", np.tile(special, (3, 30)), 25),
        ("ascending", np.tile(np.arange(4096, dtype=np.float32), (4, 1)), 32),  # every element enters
    ]


@pytest.mark.parametrize(("name", "x", "k"), _cases(), ids=[c[0] for c in _cases()])
def test_native_top_k_equals_lax_top_k(name: str, x: np.ndarray, k: int) -> None:
    got_v, got_i = jax.jit(native.top_k, static_argnums=1)(jnp.asarray(x), k)
    want_v, want_i = jax.lax.top_k(jnp.asarray(x), k)
    np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
    np.testing.assert_array_equal(np.asarray(got_v).view(np.int32), np.asarray(want_v).view(np.int32))


def test_relu_top_k_equals_lax_top_k_of_the_scores() -> None:
    """ReLU(z + bias) * scale searched without forming the scores; rows with fewer than k positive
    scores tie at zero and must break as lax.top_k does; vmapped over SAEs with their own bias."""
    rng = np.random.default_rng(1)
    z = jnp.asarray(rng.normal(size=(3, 130, 1000)).astype(np.float32))
    bias = jnp.asarray(rng.normal(size=(3, 1000)).astype(np.float32) - 2.5)
    scale = jnp.asarray(rng.uniform(0.5, 2.0, (3, 1000)).astype(np.float32))
    got = jax.jit(jax.vmap(lambda z, b, s: native.relu_top_k(z, b, s, 32)))(z, bias, scale)
    want = jax.vmap(lambda z, b, s: jax.lax.top_k(jax.nn.relu(z + b) * s, 32))(z, bias, scale)
    assert int(jnp.sum(jnp.all(want[0] > 0, axis=-1) == 0)) > 0  # some rows do tie at zero
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))


@pytest.mark.parametrize("n_dead", [0, 5, 40, 700, 1000])
def test_relu_top_k_and_dead_equals_lax_top_k_of_the_scores_and_the_masked_scores(n_dead: int) -> None:
    """Both of a TopK step's searches in one pass: the top k of the scores and AuxK's top k_aux of
    where(dead, scores, -inf), index for index, including fewer dead latents than k_aux (the rest are
    the lowest live ids at -inf), ties at zero among the dead, and SAEs vmapped with their own masks."""
    rng = np.random.default_rng(3)
    n, k, k_aux = 1000, 32, 64
    z = jnp.asarray(rng.normal(size=(2, 130, n)).astype(np.float32))
    dead = np.zeros((2, n), bool)
    for m in range(2):
        dead[m, rng.choice(n, n_dead, replace=False)] = True
    # most dead latents score a ReLU'd zero, some are positive; the live ones fire often
    bias = jnp.asarray(
        np.where(dead, -2.5, 0.0).astype(np.float32) + rng.normal(size=(2, n)).astype(np.float32) * 0.1
    )
    scale = jnp.asarray(rng.uniform(0.5, 2.0, (2, n)).astype(np.float32))
    dead = jnp.asarray(dead)
    got = jax.jit(jax.vmap(lambda z, b, s, m: native.relu_top_k_and_dead(z, b, s, m, k, k_aux)))(
        z, bias, scale, dead
    )

    def want_one(z: jax.Array, b: jax.Array, s: jax.Array, m: jax.Array) -> tuple[jax.Array, ...]:
        score = jax.nn.relu(z + b) * s
        return (*jax.lax.top_k(score, k), *jax.lax.top_k(jnp.where(m[None, :], score, -jnp.inf), k_aux))

    want = jax.vmap(want_one)(z, bias, scale, dead)
    if 0 < n_dead < 1000:
        positive = np.asarray(want[2] > 0)
        assert positive.any() and not positive.all()  # the dead picks do tie at zero
    # the dead search alone, over scores already formed (BatchTopK, Matryoshka)
    score = jax.nn.relu(z + bias[:, None, :]) * scale[:, None, :]
    alone = jax.jit(jax.vmap(lambda s, m: native.dead_top_k(s, m, k_aux)))(score, dead)
    for g, w in zip((*got, *alone), (*want, *want[2:]), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_encode_top_k_searches_natively_with_dead_latents() -> None:
    """A TopK step with dead latents takes the one-pass native search, and gives the same picks."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(64, 16)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(16, 300)).astype(np.float32))
    b = jnp.asarray(rng.normal(size=300).astype(np.float32) - 1)
    dead = jnp.asarray(rng.random(300) < 0.3)
    fused = lambda x: common.encode_top_k(x, w, b, 8, None, dead, 20)  # noqa: E731
    assert "saewb_relu_top_k_and_dead_f32" in str(jax.make_jaxpr(fused)(x))
    top, idx, (aux_top, aux_idx) = jax.jit(fused)(x)
    score = jax.nn.relu(x @ w + b)
    want = (*jax.lax.top_k(score, 8), *jax.lax.top_k(jnp.where(dead[None, :], score, -jnp.inf), 20))
    for g, v in zip((top, idx, aux_top, aux_idx), want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(v), rtol=1e-6)


def test_native_top_k_is_differentiable_and_vmaps_like_lax() -> None:
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(4, 6, 200)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(6, 10)).astype(np.float32))

    def loss(f, x):
        return jnp.sum(jnp.sin(jax.vmap(lambda r: f(r, 10)[0])(x)) * w)

    np.testing.assert_allclose(
        jax.grad(lambda x: loss(native.top_k, x))(x), jax.grad(lambda x: loss(jax.lax.top_k, x))(x), rtol=1e-6
    )


def test_top_k_takes_the_native_kernel_on_cpu_outside_a_mesh() -> None:
    score = jnp.zeros((8, 64), jnp.float32)
    assert "saewb_top_k_f32" in str(jax.make_jaxpr(lambda s: sharding.top_k(s, 4))(score))
    assert "saewb_" not in str(jax.make_jaxpr(lambda s: sharding.top_k(s, 4))(score.astype(jnp.bfloat16)))


def test_native_top_k_refuses_k_past_the_axis() -> None:
    with pytest.raises(Exception, match="1 <= k <= the last axis"):
        jax.block_until_ready(native.top_k(jnp.zeros((2, 5), jnp.float32), 6))
