"""Pieces shared by every architecture and the trainer.

One geometric median, one input-scale estimator, one unit-norm projection, one AuxK loss: the
architecture files import these rather than carrying copies.
"""

from __future__ import annotations

import contextvars
import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec

from sae import native
from sae.sharding import MODEL_AXIS, model_shards, top_k
from sae.sparse_ops import gather_encode, sparse_decode

LATENT_AXIS = MODEL_AXIS
"""Mesh axis the latent dimension is sharded over (``sae.sharding`` builds the mesh)."""

SHARD_LATENT_COL = PartitionSpec(None, LATENT_AXIS)  # W_enc [d, n]
SHARD_LATENT_ROW = PartitionSpec(LATENT_AXIS, None)  # W_dec [n, d]
SHARD_LATENT_VEC = PartitionSpec(LATENT_AXIS)  # b_enc [n]
REPLICATED = PartitionSpec()  # b_dec [d], scalars


@struct.dataclass
class LinearParams:
    """The classic SAE parameters (TopK, ReLU-L1): encoder, decoder and their biases."""

    W_enc: Any  # [d, n]
    b_enc: Any  # [n]
    W_dec: Any  # [n, d], rows are dictionary atoms
    b_dec: Any  # [d]


LINEAR_PARTITION_SPECS = LinearParams(
    W_enc=SHARD_LATENT_COL, b_enc=SHARD_LATENT_VEC, W_dec=SHARD_LATENT_ROW, b_dec=REPLICATED
)
"""The latent axis of W_enc, b_enc and W_dec sharded over `model`; b_dec replicated."""


def linear_params(weights: dict[str, Any]) -> LinearParams:
    """``LinearParams`` from arrays named W_enc, b_enc, W_dec, b_dec (an SAELens weights file)."""
    return LinearParams(
        **{k: jnp.asarray(weights[k], jnp.float32) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    )


def linear_weights(params: Any, **more: Any) -> dict[str, Any]:
    """The W_enc, b_enc, W_dec, b_dec arrays of linear-encoder params by name, and ``more``
    (an SAELens weights file)."""
    return {k: getattr(params, k) for k in ("W_enc", "b_enc", "W_dec", "b_dec")} | more


@struct.dataclass
class StepState:
    """Architecture state for SAEs that keep nothing besides the trainer's dead-latent counters."""

    step: Any


_MEDIANS: contextvars.ContextVar[dict[bytes, np.ndarray] | None] = contextvars.ContextVar(
    "medians", default=None
)


@contextmanager
def shared_geometric_medians() -> Iterator[None]:
    """Within this, ``geometric_median`` runs once per distinct sample: a sweep's members that share
    a hook start from the same init sample."""
    token = _MEDIANS.set({})
    try:
        yield
    finally:
        _MEDIANS.reset(token)


def geometric_median(x: np.ndarray, iters: int = 100, eps: float = 1e-8, tol: float = 1e-7) -> np.ndarray:
    """Weiszfeld's algorithm: the point minimising the summed Euclidean distance to the rows of x.

    Computed in float64 numpy on a sample (it runs once, before training). Starts from the mean and
    stops early when a step moves less than ``tol`` relative to the scale of the data.
    """
    memo = _MEDIANS.get()
    if memo is None:
        return weiszfeld(x, iters, eps, tol)
    arr = np.ascontiguousarray(x)
    key = hashlib.blake2b(
        repr((arr.shape, arr.dtype.str, iters, eps, tol)).encode() + arr.tobytes(), digest_size=16
    ).digest()
    if key not in memo:
        memo[key] = weiszfeld(arr, iters, eps, tol)
    return memo[key].copy()


def weiszfeld(x: np.ndarray, iters: int, eps: float, tol: float) -> np.ndarray:
    pts = np.asarray(x, dtype=np.float64)
    if pts.ndim != 2 or len(pts) == 0:
        raise ValueError(f"geometric_median needs a non-empty [N, d] array, got shape {pts.shape}")
    med = pts.mean(axis=0)
    scale = float(np.linalg.norm(pts.std(axis=0))) + eps
    for _ in range(iters):
        dist = np.linalg.norm(pts - med, axis=1)
        w = 1.0 / np.maximum(dist, eps)
        new = (w[:, None] * pts).sum(axis=0) / w.sum()
        moved = float(np.linalg.norm(new - med))
        med = new
        if moved < tol * scale:
            break
    return med.astype(np.float32)


def outlier_cutoff(sample: np.ndarray, ratio: float | None) -> float | None:
    """The norm above which a token is an outlier (``TrainConfig.outlier_ratio``): ``ratio`` × the
    sample's median token norm, in raw units; None when ``ratio`` is None."""
    if ratio is None:
        return None
    return float(ratio * np.median(np.linalg.norm(np.asarray(sample, dtype=np.float32), axis=1)))


def typical_rows(x: np.ndarray, cutoff: float | None) -> np.ndarray:
    """Bool [rows]: the rows of ``x`` whose norm is at most ``cutoff`` (all of them when None)."""
    if cutoff is None:
        return np.ones(len(x), dtype=bool)
    return np.linalg.norm(np.asarray(x, dtype=np.float32), axis=1) <= cutoff


def replace_outliers(batch: np.ndarray, cutoff: float | None) -> np.ndarray:
    """The batch with each row above ``cutoff`` replaced by one of its typical rows, in order (the
    shape stays, so the jitted step is not recompiled and resumed runs see the same batches). A batch
    with no typical row is not a few sinks but data that changed scale (or blew up): it is kept as
    it is, for the divergence guard to judge."""
    keep = typical_rows(batch, cutoff)
    if keep.all() or not keep.any():
        return batch
    good = np.flatnonzero(keep)
    bad = np.flatnonzero(~keep)
    out = batch.copy()
    out[bad] = batch[good[np.arange(len(bad)) % len(good)]]
    return out


def estimate_input_scale(sample: np.ndarray, target: str, d: int) -> float:
    """One scalar s for the inputs, estimated on a sample before training.

    ``target``: "sq_norm_d" gives E‖s·x‖² = d (OpenAI / sparsify style); "norm_sqrt_d" gives
    E‖s·x‖ = √d (Anthropic April-2024 recipe); "unit" gives E‖s·x‖² = 1 (GBA: biases live in [−1, 0]);
    "none" gives 1.
    """
    x = np.asarray(sample, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1)
    if target == "none":
        return 1.0
    if target == "sq_norm_d":
        ms = float(np.mean(norms**2))
        return float(np.sqrt(d / ms)) if ms > 0 else 1.0
    if target == "norm_sqrt_d":
        m = float(np.mean(norms))
        return float(np.sqrt(d) / m) if m > 0 else 1.0
    if target == "unit":
        ms = float(np.mean(norms**2))
        return float(1.0 / np.sqrt(ms)) if ms > 0 else 1.0
    raise ValueError(f"unknown input scaling target {target!r}; use sq_norm_d, norm_sqrt_d, unit or none")


def dense_codes(vals: jax.Array, idx: jax.Array, n: int) -> jax.Array:
    """[B, n] codes from a sparse code: values [B, k] at latent indices [B, k] (distinct per row)."""
    rows = jnp.arange(vals.shape[0])[:, None]
    return jnp.zeros((vals.shape[0], n), vals.dtype).at[rows, idx].add(vals)


def random_unit_rows(key: jax.Array, n: int, d: int, norm: float = 1.0) -> jax.Array:
    """n random directions in R^d, each of Euclidean norm ``norm``."""
    w = jax.random.normal(key, (n, d), dtype=jnp.float32)
    return norm * w / jnp.linalg.norm(w, axis=1, keepdims=True)


def tied_weights(
    key: jax.Array, n: int, d: int, sample: np.ndarray, norm: float = 1.0, rows: str = "random"
) -> dict[str, jax.Array]:
    """The usual init: decoder rows of norm ``norm`` (``rows``: "random" directions, or "data": the
    directions of centred ``sample`` rows, ``data_rows``), the encoder their transpose, a zero encoder
    bias and the decoder bias at the geometric median of ``sample``."""
    b_dec = geometric_median(sample)
    if rows == "data":
        w_dec = norm * data_rows(key, np.asarray(sample) - b_dec, n)
    else:
        w_dec = random_unit_rows(key, n, d, norm)
    return {
        "W_enc": w_dec.T,
        "b_enc": jnp.zeros((n,), jnp.float32),
        "W_dec": w_dec,
        "b_dec": jnp.asarray(b_dec),
    }


def firing_thresholds(
    centred: np.ndarray, rows: np.ndarray | jax.Array, freq: np.ndarray, chunk: int = 1024
) -> np.ndarray:
    """Per latent m, the value its pre-activation ``centred @ rows[m]`` exceeds on a fraction ``freq[m]``
    of the ``centred`` sample rows: the 1 − freq quantile (latents in chunks, so memory is rows x chunk).
    A bias of minus it makes latent m fire at frequency freq[m] on the sample."""
    x = jnp.asarray(centred, jnp.float32)
    n_rows = len(x)
    out = np.empty(len(rows), np.float32)
    for lo in range(0, len(rows), chunk):
        u = jnp.sort(x @ jnp.asarray(rows[lo : lo + chunk]).T, axis=0)  # [rows, chunk] ascending
        at = jnp.asarray(
            np.clip(np.floor((1.0 - freq[lo : lo + chunk]) * n_rows).astype(np.int64), 0, n_rows - 2)
        )
        # halfway between two order statistics: no sample point sits on its threshold, where float
        # noise (another reduction order, a sharded matmul) would flip whether it fires
        pair = jnp.take_along_axis(u, jnp.stack([at, at + 1]), axis=0)
        out[lo : lo + chunk] = np.asarray(pair.mean(axis=0))
    return out


def data_rows(key: jax.Array, centred: np.ndarray, n: int, jitter: float = 0.1) -> jax.Array:
    """n unit rows from the directions of ``centred`` samples (drawn without replacement while they
    last), each nudged by ``jitter`` x a random unit vector so repeated draws differ."""
    k_pick, k_noise = jax.random.split(key)
    pick = np.asarray(jax.random.choice(k_pick, len(centred), (n,), replace=len(centred) < n))
    rows = normalize_rows(jnp.asarray(centred[pick], jnp.float32))
    return normalize_rows(rows + random_unit_rows(k_noise, n, centred.shape[1], jitter))


def resample_due_every(frac: float, step: int, total_steps: int) -> bool:
    """Whether ``step`` (1-based, after the update) is a multiple of ``frac`` of the run with a whole
    period still to train: a resample in the last period would leave its latents untrained (a 61-step
    TopK run resampled at step 60 ended at held-out FVU 0.27 instead of 0.17)."""
    if frac <= 0:
        return False
    every = max(1, int(round(frac * total_steps)))
    return step % every == 0 and step + every <= total_steps


def resample_dead_rows(
    params: LinearParams,
    x_in: np.ndarray,
    sq_err: np.ndarray,
    dead: np.ndarray,
    seed: int,
    enc_gain: float,
    dec_norm: float | None,
    err_power: float = 2.0,
    distinct: bool = False,
    enc_norm: float | None = None,
) -> tuple[LinearParams, LinearParams]:
    """Anthropic's resampling (Towards Monosemanticity): dead latents get the directions of inputs
    ``x_in`` (the encoder's input) drawn with probability ∝ their loss ``sq_err`` to the power
    ``err_power`` (Anthropic: 2), each a different input when ``distinct``: decoder rows at norm
    ``dec_norm`` (None: the mean norm of the alive rows), encoder columns at norm ``enc_norm`` (None:
    ``enc_gain`` × the mean alive encoder norm), b_enc = 0. Returns (params, mask of the reset entries), the mask for
    ``sae.trainer.reset_adam_moments``."""
    dead = np.asarray(dead, bool)
    n_dead = int(dead.sum())
    w_enc = np.array(params.W_enc)
    b_enc = np.array(params.b_enc)
    w_dec = np.array(params.W_dec)
    if n_dead:
        weight = np.asarray(sq_err, np.float64) ** err_power
        prob = weight / weight.sum() if weight.sum() > 0 else None
        unique = distinct and n_dead <= (np.count_nonzero(weight) if prob is not None else len(x_in))
        pick = np.random.default_rng(seed).choice(len(x_in), size=n_dead, p=prob, replace=not unique)
        new = np.asarray(x_in, np.float32)[pick]
        new = new / np.maximum(np.linalg.norm(new, axis=1, keepdims=True), 1e-8)
        alive = ~dead
        if enc_norm is None:
            alive_enc = float(np.linalg.norm(w_enc[:, alive], axis=0).mean()) if alive.any() else 1.0
            enc_norm = enc_gain * alive_enc
        if dec_norm is None:
            dec_norm = float(np.linalg.norm(w_dec[alive], axis=1).mean()) if alive.any() else 1.0
        w_dec[dead] = new * dec_norm
        w_enc[:, dead] = new.T * enc_norm
        b_enc[dead] = 0.0
    mask = LinearParams(
        W_enc=np.broadcast_to(dead[None, :], w_enc.shape),
        b_enc=dead,
        W_dec=np.broadcast_to(dead[:, None], w_dec.shape),
        b_dec=np.zeros(params.b_dec.shape, bool),
    )
    new_params = LinearParams(
        W_enc=jnp.asarray(w_enc), b_enc=jnp.asarray(b_enc), W_dec=jnp.asarray(w_dec), b_dec=params.b_dec
    )
    return new_params, mask


def rebias_dead(
    params: LinearParams, x_in: np.ndarray, dead: np.ndarray, freq: float
) -> tuple[LinearParams, None]:
    """Dead latents keep their directions; each one's encoder bias becomes minus the 1 − ``freq``
    quantile of its pre-activation ``x_in @ W_enc`` on the batch, so it is positive on ``freq`` of it
    again (``firing_thresholds``). Returns (params, None): no entry to reset, Adam's moments are kept.
    Late in a run Adam's bias correction is ~1, so moments zeroed there restart m/√v at
    (1 − β1^t)/√(1 − β2^t): 3 to 6.5 for the next ~100 steps (β 0.9, 0.999), moving the latent 3-6× the
    lr a step. On tiny-lm (n 8192, 250k tokens) re-biasing every 10% with the moments
    zeroed left 68% dead, kept 2.8%."""
    dead = np.asarray(dead, bool)
    b_enc = np.array(params.b_enc)
    if dead.any():
        cols = np.asarray(params.W_enc)[:, dead].T
        b_enc[dead] = -firing_thresholds(x_in, cols, np.full(len(cols), freq, np.float32))
    return params.replace(b_enc=jnp.asarray(b_enc)), None


def normalize_rows(w: jax.Array, eps: float = 1e-8) -> jax.Array:
    return w / jnp.maximum(jnp.linalg.norm(w, axis=1, keepdims=True), eps)


def remove_parallel_component(w: jax.Array, g: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Drop from each row of the gradient g its component along the matching row of w.

    With unit-norm rows the parallel part would only change the norm, which the projection after
    the step undoes; removing it keeps Adam's moments about directions only.
    """
    unit = normalize_rows(w, eps)
    return g - jnp.sum(g * unit, axis=1, keepdims=True) * unit


def fvu_terms(x: jax.Array, x_hat: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(Σ‖x − x̂‖², Σ‖x − mean_batch(x)‖²) for one batch."""
    err = jnp.sum(jnp.square(x - x_hat))
    var = jnp.sum(jnp.square(x - jnp.mean(x, axis=0, keepdims=True)))
    return err, var


_MEMBERS_VMAPPED: contextvars.ContextVar[bool] = contextvars.ContextVar("members_vmapped", default=False)


@contextmanager
def members_vmapped() -> Iterator[None]:
    """Trace inside this when the step is vmapped over sweep members.

    Under ``vmap`` a ``lax.switch`` on a per-member value runs every branch, so data-dependent
    shortcuts cost more than they save; ``dead_top_k`` then takes its one plain search.
    """
    token = _MEMBERS_VMAPPED.set(True)
    try:
        yield
    finally:
        _MEMBERS_VMAPPED.reset(token)


DEAD_BUCKETS = (256, 1024, 4096)
"""Static widths for ``dead_top_k``'s compacted search (the dead count picks the smallest that fits)."""


def dead_top_k(score: jax.Array, dead: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(scores, indices) [B, k] of the top-k scores among the dead latents, sorted as top_k's.

    Equal to ``top_k(where(dead, score, −inf), k)``: picks past the number of dead latents score −inf.
    On CPU outside a mesh ``native.dead_top_k`` searches the dead columns in one pass. Elsewhere, when
    few latents are dead, the search runs on their columns only: the dead ids are compacted (in index
    order, so ties break alike) into the smallest static bucket that holds them and top-k runs over
    [B, bucket] rather than [B, n] (picks past the dead count then point at latent 0). A top-k of
    k = d/2 over every latent was the dominant cost of a TopK step with dead latents on CPU. Under a
    model mesh the plain masked search runs, sharded over latents.
    """
    if native.serves(score):
        return native.dead_top_k(score, dead, k)
    masked = lambda: tuple(top_k(jnp.where(dead[None, :], score, -jnp.inf), k))  # noqa: E731
    buckets = [b for b in DEAD_BUCKETS if k <= b < score.shape[1]]
    if not buckets or model_shards() > 1 or _MEMBERS_VMAPPED.get():
        return masked()
    n_dead = jnp.sum(dead)

    def compacted(width: int):
        def search() -> tuple[jax.Array, jax.Array]:
            cols = jnp.nonzero(dead, size=width, fill_value=0)[0]
            picked = jnp.where((jnp.arange(width) < n_dead)[None, :], score[:, cols], -jnp.inf)
            vals, pos = top_k(picked, k)  # native on CPU
            return vals, cols[pos]

        return search

    branch = jnp.searchsorted(jnp.asarray(buckets), n_dead)  # len(buckets): too many dead to compact
    return jax.lax.switch(branch, [compacted(b) for b in buckets] + [masked])


def unscaled(score_vals: jax.Array, idx: jax.Array, score_scale: jax.Array | None) -> jax.Array:
    """Pre-activations of the picks from their selection scores (score = pre · score_scale, [1, n])."""
    return score_vals if score_scale is None else score_vals / score_scale[0, idx]


def aux_width(k_aux: int | None, d: int, n_latents: int, min_frac: float | None = None) -> int:
    """Latents AuxK uses: ``k_aux``, or when None d/2 (Gao et al.) and at least ``min_frac`` · n; at most n."""
    wide = int(min_frac * n_latents) if min_frac else 0
    return min(k_aux or max(d // 2, wide), n_latents)


AUX_WIDTHS = (64, 256, 1024)
"""Static prefixes of AuxK's k_aux picks. A dead latent that scores a ReLU'd zero adds nothing to ê or
to any gradient, so outside a mesh and a vmapped sweep each step reconstructs over the smallest of
these (or k_aux) that holds every token's positive picks: the same loss and gradients, with the
O(B·k_aux·d) gathers cut to the picks that count."""


def auxk_loss(
    x_c: jax.Array,
    pre: jax.Array | None,
    dead: jax.Array | None,
    residual: jax.Array,
    w_enc: jax.Array,
    b_enc: jax.Array,
    w_dec: jax.Array,
    k_aux: int,
    score_scale: jax.Array | None = None,
    b_dec: jax.Array | None = None,
    picks: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """AuxK (Gao et al. 2024): reconstruct the stopped residual from the top-k_aux dead latents.

    ``pre`` is the dense ReLU'd pre-activation: its scores pick the indices (no gradient flows through
    the choice) and supply the chosen values' forward; their gradient goes through the sparse
    backward of ``gather_encode`` to the dead latents' encoder columns at O(B·k_aux·d). ``picks``:
    those (scores, indices) [B, k_aux] when the caller already searched them (``encode_top_k``); then
    ``pre`` is not read. ê has no b_dec (pass ``b_dec`` when x_c = x − b_dec: see ``gather_encode``).
    Returns ‖e − ê‖² / ‖e − mean_batch(e)‖², and 0 when nothing is dead. Only the first #dead picks
    count, which caps k_aux at the number of dead latents, and only the positive ones do any work
    (``AUX_WIDTHS``).

    The trainer compiles this out (``dead`` None) when no latent is dead; otherwise it sits in a
    ``lax.cond`` on #dead > 0. The branch reads the selection scores, not ``pre``: a second [B, n]
    operand of the cond costs its own materialised buffer, measured at 50 ms a step (B = 4096,
    n = 16384, CPU).
    """
    if dead is None:  # the trainer checked: nothing is dead, so no branch is compiled
        return jnp.zeros((), residual.dtype)
    n_dead = jnp.sum(dead)
    if picks is None:
        assert pre is not None, "auxk_loss needs pre or picks"
        score = jax.lax.stop_gradient(pre if score_scale is None else pre * score_scale)
        search = lambda: dead_top_k(score, dead, k_aux)  # noqa: E731  (inside the branch: skipped when none is dead)
    else:
        search = lambda: picks  # noqa: E731

    def aux_branch() -> jax.Array:
        e = jax.lax.stop_gradient(residual)
        top, idx = search()

        def error_over(width: int) -> Callable[[], jax.Array]:
            def error() -> jax.Array:
                t, i = top[:, :width], idx[:, :width]
                vals = jax.nn.relu(
                    gather_encode(x_c, w_enc, b_enc, i, chosen=unscaled(t, i, score_scale), b_dec=b_dec)
                )
                vals = jnp.where((jnp.arange(width) < n_dead)[None, :], vals, 0.0)
                return jnp.sum(jnp.square(e - sparse_decode(vals, i, w_dec)))

            return error

        widths = [w for w in AUX_WIDTHS if w < k_aux] + [k_aux]
        if len(widths) == 1 or _MEMBERS_VMAPPED.get() or not jax.sharding.get_abstract_mesh().empty:
            num = error_over(k_aux)()
        else:  # the picks are sorted, so the positive ones (all that count) come first
            positive = jnp.max(jnp.sum(top > 0, axis=1))
            num = jax.lax.switch(
                jnp.searchsorted(jnp.asarray(widths), positive), [error_over(w) for w in widths]
            )
        den = jnp.sum(jnp.square(e - jnp.mean(e, axis=0, keepdims=True)))
        return (num / jnp.maximum(den, 1e-12)).astype(residual.dtype)

    def zero_branch() -> jax.Array:
        return jnp.zeros((), residual.dtype)

    return jax.lax.cond(n_dead > 0, aux_branch, zero_branch)


ENCODE_CHUNK = 512
"""Tokens per chunk of ``encode_top_k`` on CPU: 512 was fastest of 128 to 1024 (select 522 → 350 ms at
B = 4096, n = 16384, k = 32, d = 384; a [512, n] block of scores stays in cache)."""
ENCODE_CHUNK_MIN_SCORES = 8 * 2**20
"""``encode_top_k`` chunks only from this many scores (B·n, 32 MB in fp32) on: smaller, the dense matrix
stays in cache anyway. Whole TopK steps, chunked vs dense, medians of 16: 153 vs 172 ms at n = 16384,
B = 1024; 131 vs 149 ms at n = 2048, B = 4096; 60 vs 58 ms at n = 4096, B = 1024 (no gain)."""


def encode_top_k(
    x_c: jax.Array,
    w_enc: jax.Array,
    b_enc: jax.Array,
    k: int,
    score_scale: jax.Array | None = None,
    dead: jax.Array | None = None,
    k_aux: int = 0,
) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array] | None]:
    """(scores [B, k], indices [B, k], dead picks) of the top k of ReLU(x_c W_enc + b_enc) · score_scale.

    With ``dead`` the top-k_aux among dead latents (``dead_top_k``) comes from the same scores, as
    (scores, indices) [B, k_aux]; else None. No gradient flows through any of it. On CPU, without a
    mesh, once the [B, n] scores would not fit in cache (``ENCODE_CHUNK_MIN_SCORES``), the tokens go
    in chunks of ``ENCODE_CHUNK`` under ``lax.map``: each chunk's scores are searched while still in
    cache and the [B, n] matrix is never formed. Elsewhere it is one dense product. On CPU outside a
    mesh the search is ``native.relu_top_k`` (``relu_top_k_and_dead`` with dead latents: both searches
    in one pass), which never writes the scores.
    """

    native_scale = jnp.ones_like(b_enc) if score_scale is None else score_scale.astype(b_enc.dtype)

    def search(xc: jax.Array) -> tuple[jax.Array, ...]:
        z = xc @ w_enc
        if native.serves(z):  # ReLU, bias and scale applied inside the search
            if dead is None:
                return native.relu_top_k(z, b_enc, native_scale, k)
            return native.relu_top_k_and_dead(z, b_enc, native_scale, dead, k, k_aux)
        pre = jax.nn.relu(z + b_enc)
        score = jax.lax.stop_gradient(pre if score_scale is None else pre * score_scale)
        top, idx = top_k(score, k)  # local top-k + global merge when latents are sharded
        return (top, idx) if dead is None else (top, idx, *dead_top_k(score, dead, k_aux))

    (b, d), n = x_c.shape, w_enc.shape[-1]
    dense = jax.default_backend() != "cpu" or not jax.sharding.get_abstract_mesh().empty
    if dense or b <= ENCODE_CHUNK or b * n < ENCODE_CHUNK_MIN_SCORES:
        out = search(x_c)
    else:
        pad = (-b) % ENCODE_CHUNK
        chunks = jnp.pad(x_c, ((0, pad), (0, 0))).reshape(-1, ENCODE_CHUNK, d)
        out = tuple(o.reshape(b + pad, -1)[:b] for o in jax.lax.map(search, jax.lax.stop_gradient(chunks)))
    return out[0], out[1], (None if dead is None else (out[2], out[3]))


@struct.dataclass
class ThresholdState:
    """A running (EMA) estimate of an inference threshold, for SAEs whose training selection depends
    on the batch (BatchTopK, Matryoshka, Feature Choice). ``ema`` may be a scalar or per latent."""

    step: Any  # [] int32 training steps seen
    ema: Any  # [] or [n] float32, bias-uncorrected EMA of the observed values
    count: Any  # like ema, int32: observations folded into each entry of the EMA


def threshold_state(shape: tuple[int, ...] = ()) -> ThresholdState:
    return ThresholdState(
        step=jnp.zeros((), jnp.int32), ema=jnp.zeros(shape, jnp.float32), count=jnp.zeros(shape, jnp.int32)
    )


def track_threshold(
    state: ThresholdState,
    value: jax.Array,
    progress: jax.Array,
    decay: float,
    start_step: int,
    start_frac: float,
    valid: jax.Array | bool = True,
) -> ThresholdState:
    """Fold this step's observed threshold into the EMA once tracking has started.

    Tracking starts at ``start_step`` or at ``start_frac`` of the run, whichever comes first (the
    sheet's "from step 1000" would never start in a short run); ``valid`` (bool, broadcast like
    ``value``) leaves entries with no observation this step untouched. The estimate is read with
    ``threshold_value`` (Adam-style bias correction, so it is usable after a few steps).
    """
    on = (state.step >= start_step) | (progress >= start_frac)
    upd = jnp.logical_and(on, valid)
    ema = jnp.where(upd, decay * state.ema + (1.0 - decay) * value, state.ema)
    return ThresholdState(step=state.step + 1, ema=ema, count=state.count + upd.astype(jnp.int32))


def threshold_value(state: ThresholdState, decay: float) -> jax.Array:
    """The bias-corrected EMA: ema / (1 − decay^count); 0 before tracking started (check ``count``)."""
    corr = 1.0 - jnp.power(jnp.float32(decay), state.count.astype(jnp.float32))
    return jnp.where(state.count > 0, state.ema / jnp.maximum(corr, 1e-12), 0.0)


def tree_specs(params: Any, specs: dict[str, PartitionSpec]) -> Any:
    """A pytree like ``params`` whose leaves are the named PartitionSpecs."""
    return params.replace(**specs)
