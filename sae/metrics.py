"""Evaluation with streaming sums, so the numbers do not depend on the batch size."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np


def evaluate(model: Any, batches: Iterable[np.ndarray], dense_threshold: float = 0.1) -> dict[str, float]:
    """FVU (about the eval-set mean), legacy per-token EV, L0, dead/dense fractions, cosine, L2 ratio,
    relative reconstruction bias, over all of ``batches`` (raw activations).

    FVU = Σ‖x − x̂‖² / Σ‖x − μ‖² with μ the eval-set mean, from Σx, Σ‖x‖² (in float64): two sums
    instead of a second pass. Legacy EV is the mean over tokens of 1 − ‖x − x̂‖²/‖x − μ_batch‖².
    """
    n_tok = 0
    sum_x: np.ndarray | None = None
    sum_sq = 0.0
    err = 0.0
    legacy = 0.0
    l0 = 0.0
    fires: np.ndarray | None = None
    cos = 0.0
    ratio = 0.0
    xhat_sq = 0.0
    x_dot = 0.0
    for batch in batches:
        x = np.asarray(batch, np.float32)
        if len(x) == 0:
            continue
        f = np.asarray(model.encode(x))
        x_hat = np.asarray(model.decode(f)).astype(np.float64)
        x64 = x.astype(np.float64)
        e = np.sum((x64 - x_hat) ** 2, axis=1)
        err += float(e.sum())
        dev = np.sum((x64 - x64.mean(0)) ** 2, axis=1)
        legacy += float(np.sum(1.0 - e / np.maximum(dev.mean(), 1e-12)))
        sum_x = x64.sum(0) if sum_x is None else sum_x + x64.sum(0)
        sum_sq += float(np.sum(x64**2))
        on = f != 0
        l0 += float(on.sum())
        fires = on.sum(0).astype(np.float64) if fires is None else fires + on.sum(0)
        xn = np.linalg.norm(x64, axis=1)
        hn = np.linalg.norm(x_hat, axis=1)
        cos += float(np.sum(np.sum(x64 * x_hat, axis=1) / np.maximum(xn * hn, 1e-12)))
        ratio += float(np.sum(hn / np.maximum(xn, 1e-12)))
        xhat_sq += float(np.sum(hn**2))
        x_dot += float(np.sum(x64 * x_hat))
        n_tok += len(x)
    if n_tok == 0 or sum_x is None or fires is None:
        raise ValueError("evaluate got no tokens; the eval split is empty (use a larger harvest)")
    total_var = sum_sq - float(np.sum(sum_x**2)) / n_tok
    freq = fires / n_tok
    fvu = err / max(total_var, 1e-12)
    return {
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "legacy_ev": legacy / n_tok,
        "l0": l0 / n_tok,
        "dead_frac": float(np.mean(freq == 0)),
        "dense_frac": float(np.mean(freq > dense_threshold)),
        "cosine": cos / n_tok,
        "l2_ratio": ratio / n_tok,
        "rel_bias": xhat_sq / max(x_dot, 1e-12),
        "eval_tokens": float(n_tok),
    }


def never_fired(encode: Callable[[np.ndarray], Any], batches: Iterable[np.ndarray]) -> tuple[float, int]:
    """The fraction of latents that fire on none of the rows of ``batches``, and how many rows there
    were: "dead" over a whole split, where a held-out split of a few hundred thousand tokens or the
    trainer's window cannot tell a rare latent from a dead one."""
    fired: np.ndarray | None = None
    rows = 0
    for batch in batches:
        if len(batch) == 0:
            continue
        on = (np.asarray(encode(np.asarray(batch, np.float32))) != 0).any(0)
        fired = on if fired is None else fired | on
        rows += len(batch)
    if fired is None:
        raise ValueError("never_fired got no tokens; the split is empty (use a larger harvest)")
    return float(np.mean(~fired)), rows
