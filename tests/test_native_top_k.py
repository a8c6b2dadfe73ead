"""The native CPU top-k (sae.native): built with the system compiler, equal to jax.lax.top_k."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae import native, sharding


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
