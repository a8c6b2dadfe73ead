"""Where GBA's reconstruction gap to TopK comes from: which latents fire, or how much they say.

For each saved run, over the held-out split of its harvest (every token, one pass), the held-out FVU of:

  as trained        the SAE's own code
  + NNLS            the same support per token, amplitudes refitted by non-negative least squares on the
                    decoder rows (the best any encoder could do with that support and that dictionary)
  top-L support     GBA only: per token the L = round(L0) latents with the largest contributions
                    a_m·ReLU(u_m) (u_m the pre-activation before the threshold), amplitudes as trained
  top-L + NNLS      that support, amplitudes refitted

Reading: if "+ NNLS" closes most of the gap to TopK, the dictionary is fine and the amplitudes are off
(tied or unit-norm encoding); if "top-L support" closes it, the per-neuron thresholds pick the wrong
latents per token; if neither, the dictionary itself is the limit.

Run:  .venv/bin/python benchmarks/gba_gap.py --workspace ws.duckdb --hook blocks.3.hook_out --runs gba topk
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sae  # noqa: E402
from activations.stream import ActivationStream  # noqa: E402


def fvu(x: np.ndarray, x_hat: np.ndarray) -> float:
    return float(np.sum((x - x_hat) ** 2) / np.sum((x - x.mean(0)) ** 2))


def decoder_matrix(model: sae.SAE) -> tuple[np.ndarray, np.ndarray]:
    """Rows D and bias b with decode(f) = f·D + b on raw activations (every architecture decodes linearly)."""
    n = model.config.n_latents
    b = np.asarray(model.decode(np.zeros((1, n), np.float32)))[0]
    rows = [np.asarray(model.decode(np.eye(n, dtype=np.float32)[i : i + 512])) - b for i in range(0, n, 512)]
    return np.concatenate(rows), b


def refit(x: np.ndarray, support: np.ndarray, d_rows: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per token: min ‖x − b − c·D_S‖ over c ≥ 0 on the token's support S."""
    out = np.empty_like(x)
    for t in range(len(x)):
        s = np.flatnonzero(support[t])
        c = nnls(d_rows[s].T.astype(np.float64), (x[t] - b).astype(np.float64))[0] if len(s) else np.zeros(0)
        out[t] = b + c @ d_rows[s]
    return out


def gba_top_l(model: sae.SAE, x: np.ndarray, l0: int) -> np.ndarray:
    """GBA's code with the thresholds replaced by a per-token top-L on a_m·ReLU(u_m)."""
    import jax.numpy as jnp

    u = np.asarray(model.arch._pre(model.config, model.params, jnp.asarray(x)))  # before the threshold
    score = np.maximum(u, 0.0) * np.asarray(model.params.a)
    keep = np.argpartition(-score, l0, axis=1)[:, :l0]
    f = np.zeros_like(u)
    np.put_along_axis(f, keep, np.take_along_axis(np.maximum(u, 0.0), keep, axis=1), axis=1)
    return f


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", type=Path, required=True)
    p.add_argument("--hook", required=True)
    p.add_argument("--runs", nargs="+", required=True, help="run names in the workspace")
    p.add_argument("--max-tokens", type=int, default=20000, help="held-out tokens used (NNLS is per token)")
    a = p.parse_args()

    stream = ActivationStream(a.workspace, a.hook, batch_size=a.max_tokens, seed=0, split="eval")
    x = np.asarray(next(stream.epoch()), np.float32)  # the first max_tokens of the split's seeded order
    print(f"{len(x):,} held-out tokens, d = {x.shape[1]}", file=sys.stderr)
    print("| run | arch | L0 | as trained | + NNLS | top-L support | top-L + NNLS |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in a.runs:
        model = sae.load(name, workspace=a.workspace)
        f = np.asarray(model.encode(x))
        x_hat = np.asarray(model.decode(f))
        l0 = float(np.mean(np.sum(f != 0, axis=1)))
        d_rows, b = decoder_matrix(model)
        cells = [fvu(x, x_hat), fvu(x, refit(x, f != 0, d_rows, b))]
        if model.config.arch == "gba":
            g = gba_top_l(model, x, max(1, round(l0)))
            cells += [fvu(x, np.asarray(model.decode(g))), fvu(x, refit(x, g != 0, d_rows, b))]
        shown = " | ".join(f"{c:.4f}" for c in cells) + " | –" * (4 - len(cells))
        print(f"| {name} | {model.config.arch} | {l0:.1f} | {shown} |", flush=True)


if __name__ == "__main__":
    main()
