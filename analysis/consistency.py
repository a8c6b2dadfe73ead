"""Cross-seed consistency (MCS) between two runs [paper]: per latent, the max cosine of its decoder
direction to any latent of the other run; report the share with MCS > 0.9 (`saewb mcs`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from analysis import tables
from analysis.runs import find_run
from saewb.workspace import Workspace

THRESHOLD = 0.9


def max_cosine(a: np.ndarray, b: np.ndarray, block: int = 2048) -> np.ndarray:
    """[n_a] max cosine of each row of `a` to any row of `b` (rows need not be unit; blocked over a)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"direction matrices must be [n, d] with the same d, got {a.shape} and {b.shape}")
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    a, b = a.astype(np.float32), b.astype(np.float32)
    out = np.empty(a.shape[0], np.float32)
    for lo in range(0, a.shape[0], block):
        out[lo : lo + block] = (a[lo : lo + block] @ b.T).max(axis=1)
    return np.minimum(out, 1.0)  # float rounding can give 1.0000001 for identical rows


def summarize(mcs: np.ndarray, threshold: float = THRESHOLD) -> dict[str, float]:
    return {
        "n_latents": int(len(mcs)),
        "share_above_09": float((mcs > threshold).mean()),
        "mean_mcs": float(mcs.mean()),
        "median_mcs": float(np.median(mcs)),
    }


def compare_runs(ws: Workspace | str, run_a: str, run_b: str, *, store: bool = True) -> dict[str, Any]:
    """MCS of run_a's latents against run_b and of run_b's against run_a; stores the a→b summary."""
    import sae as sae_api

    ws = ws if isinstance(ws, Workspace) else Workspace(ws)
    for name in (run_a, run_b):
        find_run(ws, name)
    sa = sae_api.load(run_a, workspace=ws.path)
    sb = sae_api.load(run_b, workspace=ws.path)
    if sa.d != sb.d:
        raise tables.AnalysisError(
            f"runs {run_a!r} (d={sa.d}) and {run_b!r} (d={sb.d}) have different widths; MCS compares runs on the same hook"
        )
    da, db = sa.decoder_directions, sb.decoder_directions
    ab, ba = max_cosine(da, db), max_cosine(db, da)
    out = {
        "run_a": run_a,
        "run_b": run_b,
        "a_to_b": summarize(ab),
        "b_to_a": summarize(ba),
        "mcs_a": ab,
        "mcs_b": ba,
    }
    if store:
        tables.store_consistency(ws, run_a, run_b, out["a_to_b"])
    return out
