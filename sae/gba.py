"""Bias adaptation (BA) and Group Bias Adaptation (GBA): Chen et al., "Taming Polysemanticity" (2025).

f(x) = Σ_m a_m w_m φ(s_in · w_mᵀ(x − b_pre) + b_m) + b_pre with unit rows w_m (the paper ties encoder
and decoder; ours are untied by default, below), a_m ≥ 0. Loss: reconstruction only (no sparsity
penalty); Adam updates w, a, b_pre; the biases b_m live in the state and get no gradient. Every
``update_tokens`` tokens, from counters accumulated since the last update (fires and max
pre-activation per neuron; no activation buffer):

    freq_m = fires_m / tokens;  r_m = max pre-activation;  r̄_k = mean of positive r_m in group k
    freq_m > p_k:   b_m ← max(b_m − γ·r_m, −1)
    freq_m < ε:     b_m ← min(b_m + γ·r̄_k, 0)

With ``bias_rule="two_sided"`` (the default) the rule also raises the bias of a neuron that fires, but
below p_k / band, and lowers it only above p_k·band: the paper's rule raises a bias only when its
neuron never fired, so each noisy window above p_k ratchets the bias down and L0 drifts below its target
(measured: MiniLM, n 2048, 250k tokens, target L0 32: 14.9 with the paper's rule, 22.6 two-sided). The
default band is 1, the period 512 tokens (every step at the default batches) and γ 0.02: with a
tolerance band the biases settle at whichever edge the moving dictionary pushes them to, and 30 updates
of γ 0.01 in a 250k-token run could not follow it (L0 10-21 for 32 on three caches; 31-34 now, with
fewer dead, docs/learning_rate.md).

Neurons are split into K groups (K = 1 is BA) with target frequencies p_k geometric from
``htf`` down to ``ltf``. φ is JumpReLU (u·1[u + b > 0]: the bias is a threshold, not a shrink; the
paper's choice for LLMs and the default) or ReLU (φ(u + b) = ReLU(u + b); on MiniLM at 250k tokens FVU
0.380 at L0 27 against JumpReLU's 0.224 at L0 23). Inputs are scaled to E‖x‖² = 1 so the [−1, 0] range means something.

Deviations [adapt], each measured (benchmarks/recovery.py data model, s = 3 only, n = 128 features,
d = 42, 256 neurons, T = 10, 1500 steps of 256, lr 1e-3, seed 0):

* b_pre is kept at its init (the geometric median; ``train_b_pre=False``). Letting Adam move it, as
  the sheet says, drove ‖b_pre‖ from 0.08 to 4.1 on unit-norm data: a few neurons then fire on every
  token to cancel it, the [−1, 0] bias range stops meaning anything, and FRR@0.9 was 1.6%; frozen,
  FRR@0.9 was 79.7% (86.7% at 0.8). ``train_b_pre=True`` restores the paper's recipe.
* a_m starts at 0.05 rather than 1: with all biases at 0 about half of the neurons fire on every
  token and a = 1 made the initial reconstruction ~13× the data variance, which Adam "fixed" by
  wrecking b_pre and a in the first steps.
* W starts from normalised centred data samples (``init_w="data"``), so every neuron starts inside
  the data cone; random rows are available (``init_w="random"``).
* The reconstruction loss is normalised by the batch variance (the FVU, as for the other trainers;
  Adam is invariant to the constant); with K = 1 the target frequency is ``htf``; ``s_in`` is a
  fixed input gain (1 while training) so the input scale can be folded into a saved SAE whose
  encoder and decoder are tied; r_m is the max pre-activation including the bias (a neuron that
  never fired has r_m ≤ 0, hence the group mean r̄_k of the positive ones), which also shrinks the
  step as a neuron approaches its target.

* The encoder has unit rows V of its own (``tied=False``, the default; u = s_in·V(x − b_pre)); the
  paper's tied model is ``tied=True``. Untied was better at every budget measured
  (docs/learning_rate.md): held-out FVU at 250k tokens (n 2048) 0.1986 → 0.1893 on MiniLM and 0.1777
  → 0.1596 on tiny-lm, with fewer dead; 0.1682 → 0.1632 at 1M (n 4096); at 20M tokens on MiniLM
  (n 2048, target 32) from 1.40× to 1.15× TopK's FVU at equal L0.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sae import common
from sae.base import StepCtx
from sae.configs import GBAConfig, gba_group_frequencies

Config = GBAConfig


@struct.dataclass
class Params:
    W: Any  # [n, d] unit rows, encoder and decoder
    a: Any  # [n] output scale, >= 0
    b_pre: Any  # [d]
    s_in: Any  # [] fixed input gain (1 while training)
    V: Any = None  # [n, d] unit encoder rows when untied (``tied=False``); None: W encodes


@struct.dataclass
class State:
    b: Any  # [n] biases in [-1, 0], no gradient
    fires: Any  # [n] fires since the last bias update
    rmax: Any  # [n] max pre-activation since the last bias update
    tokens: Any  # [] tokens since the last bias update
    step: Any  # []


def partition_specs(cfg: GBAConfig) -> Params:
    return Params(
        W=common.SHARD_LATENT_ROW,
        a=common.SHARD_LATENT_VEC,
        b_pre=common.REPLICATED,
        s_in=common.REPLICATED,
        V=None if cfg.tied else common.SHARD_LATENT_ROW,
    )


def input_scale_target(cfg: GBAConfig) -> str:
    return "unit"


def group_targets(cfg: GBAConfig) -> np.ndarray:
    """Target frequency per neuron: group g = m·K // n, p_g geometric from htf (resolved from
    ``target_l0`` when None) to ltf."""
    p = np.asarray(gba_group_frequencies(cfg, cfg.resolved_htf()))
    groups = np.arange(cfg.n_latents) * cfg.n_groups // cfg.n_latents
    return p[groups].astype(np.float32)


def init(cfg: GBAConfig, key: jax.Array, d: int, sample: np.ndarray) -> tuple[Params, State]:
    cfg.validate()
    n = cfg.n_latents
    b_pre = (
        common.geometric_median(sample) if cfg.init_b_pre == "geometric_median" else np.zeros(d, np.float32)
    )
    if cfg.init_w == "data":
        pick = np.asarray(jax.random.choice(key, len(sample), (n,), replace=len(sample) < n))
        w = common.normalize_rows(jnp.asarray(sample[pick] - b_pre))
    else:
        w = common.random_unit_rows(key, n, d)
    params = Params(
        W=w,
        a=jnp.full((n,), cfg.init_a, jnp.float32),
        b_pre=jnp.asarray(b_pre),
        s_in=jnp.ones((), jnp.float32),
        V=None if cfg.tied else w,
    )
    b = (
        initial_biases(cfg, np.asarray(w), b_pre, sample)
        if cfg.init_b == "quantile"
        else np.zeros(n, np.float32)
    )
    state = State(
        b=jnp.asarray(b),
        fires=jnp.zeros((n,), jnp.float32),
        rmax=jnp.full((n,), -jnp.inf, jnp.float32),
        tokens=jnp.zeros((), jnp.float32),
        step=jnp.zeros((), jnp.int32),
    )
    return params, state


def initial_biases(cfg: GBAConfig, w: np.ndarray, b_pre: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """b_m = −(the 1 − p_m quantile of neuron m's pre-activations on the init sample), in [−1, 0]:
    each neuron starts firing at its group's target frequency p_m."""
    return np.clip(-common.firing_thresholds(sample - b_pre, w, group_targets(cfg)), -1.0, 0.0)


def _b_pre(cfg: GBAConfig, params: Params) -> jax.Array:
    return params.b_pre if cfg.train_b_pre else jax.lax.stop_gradient(params.b_pre)


def encoder_rows(params: Params) -> jax.Array:
    """The rows that encode: ``V`` when untied, else the tied ``W``."""
    return params.W if params.V is None else params.V


def _pre(cfg: GBAConfig, params: Params, x: jax.Array) -> jax.Array:
    return jax.lax.stop_gradient(params.s_in) * ((x - _b_pre(cfg, params)) @ encoder_rows(params).T)


def _phi(cfg: GBAConfig, u: jax.Array, b: jax.Array) -> jax.Array:
    if cfg.activation == "relu":
        return jax.nn.relu(u + b)
    return u * (u + b > 0)


def encode(cfg: GBAConfig, params: Params, state: State, x: jax.Array) -> jax.Array:
    return _phi(cfg, _pre(cfg, params, x), state.b)


def decode(cfg: GBAConfig, params: Params, f: jax.Array) -> jax.Array:
    return (f * params.a) @ params.W + _b_pre(cfg, params)


def loss(
    cfg: GBAConfig, params: Params, state: State, x: jax.Array, ctx: StepCtx
) -> tuple[jax.Array, dict[str, jax.Array]]:
    u = _pre(cfg, params, x)
    f = _phi(cfg, u, state.b)
    x_hat = decode(cfg, params, f)
    err, var = common.fvu_terms(x, x_hat)
    on = (u + state.b) > 0
    return err / jnp.maximum(var, 1e-12), {
        "err": err,
        "var": var,
        "l0": jnp.mean(jnp.sum(on, axis=1).astype(jnp.float32)),
        "fires": jnp.sum(on, axis=0).astype(jnp.float32),
        "rmax": jax.lax.stop_gradient(jnp.max(u + state.b, axis=0)),
        "tokens": jnp.asarray(x.shape[0], jnp.float32),
    }


def update_state(cfg: GBAConfig, state: State, aux: dict[str, jax.Array], step: jax.Array) -> State:
    fires = state.fires + aux["fires"]
    rmax = jnp.maximum(state.rmax, aux["rmax"])
    tokens = state.tokens + aux["tokens"]
    n = cfg.n_latents
    k = cfg.n_groups
    groups = jnp.arange(n) * k // n
    p = jnp.asarray(group_targets(cfg))
    freq = fires / jnp.maximum(tokens, 1.0)
    pos = rmax > 0
    grp_sum = jnp.zeros((k,), jnp.float32).at[groups].add(jnp.where(pos, rmax, 0.0))
    grp_cnt = jnp.zeros((k,), jnp.float32).at[groups].add(pos.astype(jnp.float32))
    r_bar = (grp_sum / jnp.maximum(grp_cnt, 1.0))[groups]
    band = cfg.band if cfg.bias_rule == "two_sided" else 1.0
    b = state.b
    b = jnp.where(freq > p * band, jnp.maximum(b - cfg.gamma * jnp.maximum(rmax, 0.0), -1.0), b)
    rare = freq < cfg.freq_eps if cfg.bias_rule == "paper" else freq < p / band
    b = jnp.where(rare, jnp.minimum(b + cfg.gamma * r_bar, 0.0), b)
    due = tokens >= cfg.update_tokens
    zero = jnp.zeros_like(fires)
    return State(
        b=jnp.where(due, b, state.b),
        fires=jnp.where(due, zero, fires),
        rmax=jnp.where(due, -jnp.inf, rmax),
        tokens=jnp.where(due, 0.0, tokens),
        step=state.step + 1,
    )


def project_grads(cfg: GBAConfig, params: Params, grads: Params) -> Params:
    grads = grads.replace(W=common.remove_parallel_component(params.W, grads.W))
    if params.V is None:
        return grads
    return grads.replace(V=common.remove_parallel_component(params.V, grads.V))


def constrain(cfg: GBAConfig, params: Params) -> Params:
    params = params.replace(W=common.normalize_rows(params.W), a=jnp.maximum(params.a, 0.0))
    return params if params.V is None else params.replace(V=common.normalize_rows(params.V))


def decoder_rows(cfg: GBAConfig, params: Params) -> jax.Array:
    """The tied dictionary ``W`` (the decoder scales its rows by ``a``)."""
    return params.W


def fold_scale(cfg: GBAConfig, params: Params, state: State, s: float) -> tuple[Params, State]:
    """Trained on s·x: u = w·(s·x − b_pre) = s·w·(x − b_pre/s); x̂_raw = x̂/s."""
    return (
        params.replace(a=params.a / s, b_pre=params.b_pre / s, s_in=params.s_in * s),
        state,
    )


def saelens_export(model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """SAELens ``standard`` (activation relu) or ``jumprelu`` (b_enc = 0, θ = −b; b ≤ 0, so
    u·1[u + b > 0] = ReLU(u)·1[u > −b]); W_enc = s_in·Wᵀ (s_in·Vᵀ when untied), W_dec = a·W."""
    from sae.interop import InteropError

    p = model.params
    s_in = float(np.asarray(p.s_in))
    b = np.asarray(model.state.b, np.float32)
    w_enc = np.asarray(encoder_rows(p), np.float32).T * s_in
    w_dec = np.asarray(p.a, np.float32)[:, None] * np.asarray(p.W, np.float32)
    if model.config.activation == "relu":
        return {"architecture": "standard", "apply_b_dec_to_input": True}, {
            "W_enc": w_enc,
            "b_enc": b,
            "W_dec": w_dec,
            "b_dec": p.b_pre,
        }
    if (b > 0).any():
        raise InteropError("a GBA JumpReLU SAE with positive biases has no SAELens jumprelu form")
    return {"architecture": "jumprelu", "apply_b_dec_to_input": True}, {
        "W_enc": w_enc,
        "b_enc": np.zeros_like(b),
        "W_dec": w_dec,
        "b_dec": p.b_pre,
        "threshold": -b,
    }
