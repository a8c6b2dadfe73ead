"""ITDA on the demo cache: dictionary size and held-out FVU against L0, plus the Jaccard similarity of
two ITDAs fitted with different stream seeds (the cache has one hook, so no second layer).

Reads the workspace only (no run is written): ITDAs are fitted with ``sae.itda.fit`` on the train
split of the stream (``--train-tokens`` tokens, tok_idx labels) and evaluated with
``sae.metrics.evaluate`` (the code behind `saewb eval`) on the first ``--eval-tokens`` held-out
tokens. For comparison, the workspace's TopK run (``--ref-run``, if present) on the same tokens.

    python benchmarks/itda.py
    python benchmarks/itda.py --train-tokens 32768 --ks 16 --taus 0.3
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np

from activations.stream import ActivationStream
from sae.api import SAE
from sae.itda import ITDAConfig, fit, jaccard
from sae.metrics import evaluate
from sae.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def held_out(workspace: Path, hook: str, tokens: int) -> list[np.ndarray]:
    ev = ActivationStream(workspace, hook, batch_size=1024, seed=0, split="eval")
    out, have = [], 0
    for x in ev.epoch():
        out.append(x[: tokens - have])
        have += len(out[-1])
        if have >= tokens:
            break
    return out


def seen_tokens(workspace: Path, hook: str, args: argparse.Namespace, seed: int) -> set[int]:
    """tok_idx of the tokens a fit with this seed reads (the stream draws a seeded subset of chunks)."""
    stream = ActivationStream(workspace, hook, batch_size=args.batch, seed=seed)
    it = stream.batches(start=0, with_index=True)
    return {int(i) for _ in range(args.train_tokens // args.batch) for i in next(it)[0]}


def fit_one(workspace: Path, hook: str, k: int, tau: float, args: argparse.Namespace, seed: int):
    stream = ActivationStream(workspace, hook, batch_size=args.batch, seed=seed)
    cfg = ITDAConfig(k=k, tau=tau, max_atoms=args.max_atoms, center=args.center)
    tc = TrainConfig(train_tokens=args.train_tokens, batch_size=args.batch, seed=seed, log_every=10**9)
    t0 = time.perf_counter()
    res = fit(cfg, tc, lambda start: stream.batches(start=start, with_index=True), progress=False)
    return res, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, default=ROOT / "workspace.duckdb")
    ap.add_argument("--hook", default="blocks.3.hook_out")
    ap.add_argument("--train-tokens", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--taus", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--max-atoms", type=int, default=16384)
    ap.add_argument("--center", action="store_true", help="subtract the sample mean (an adaptation)")
    ap.add_argument("--ref-run", default="demo-topk")
    ap.add_argument("--no-jaccard", action="store_true")
    args = ap.parse_args(argv)
    if not args.workspace.exists():
        raise SystemExit(f"workspace {args.workspace} not found; run `make demo` first or pass --workspace")
    x_eval = held_out(args.workspace, args.hook, args.eval_tokens)
    n_eval = sum(len(x) for x in x_eval)
    print(
        f"workspace={args.workspace.name} hook={args.hook} train_tokens={args.train_tokens} batch={args.batch} "
        f"eval_tokens={n_eval} (held-out docs) center={args.center} max_atoms={args.max_atoms}"
    )
    print(f"{'model':<10} {'k':>3} {'tau':>5} {'atoms':>6} {'L0':>6} {'FVU':>7} {'fit_s':>7} {'eval_s':>7}")
    fits = {}
    for k, tau in itertools.product(args.ks, args.taus):
        res, sec = fit_one(args.workspace, args.hook, k, tau, args, seed=0)
        model = SAE(res.config, res.params, res.arch_state, res.d)
        t0 = time.perf_counter()
        m = evaluate(model, x_eval)
        fits[(k, tau)] = res
        print(
            f"{'itda':<10} {k:>3} {tau:>5.2f} {model.n_latents:>6} {m['l0']:>6.1f} {m['fvu']:>7.4f} {sec:>7.1f} "
            f"{time.perf_counter() - t0:>7.1f}",
            flush=True,
        )
    try:
        import sae

        ref = sae.load(args.ref_run, workspace=args.workspace)
        m = evaluate(ref, x_eval)
        print(
            f"{args.ref_run:<10} {getattr(ref.config, 'k', '-'):>3} {'-':>5} {ref.n_latents:>6} {m['l0']:>6.1f} "
            f"{m['fvu']:>7.4f} {'-':>7} {'-':>7}   (trained SAE, same held-out tokens)"
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"(no reference run: {err})")
    keys = list(fits)
    if len(keys) > 1:  # same seed: every ITDA saw the same tokens, so the label sets are comparable
        print("Jaccard of atom label sets, seed 0 (same training tokens):")
        print(" " * 12 + " ".join(f"{f'k{k}/t{t}':>9}" for k, t in keys))
        for a in keys:
            print(f"{f'k{a[0]}/t{a[1]}':<12}" + " ".join(f"{jaccard(fits[a], fits[b]):>9.3f}" for b in keys))
    if not args.no_jaccard:
        k, tau = args.ks[len(args.ks) // 2], args.taus[0]
        other, _ = fit_one(args.workspace, args.hook, k, tau, args, seed=1)
        base = fits[(k, tau)]
        seen = [seen_tokens(args.workspace, args.hook, args, seed) for seed in (0, 1)]
        both = len(seen[0] & seen[1]) / len(seen[0] | seen[1])
        print(
            f"Jaccard(seed 0, seed 1) at k={k}, tau={tau}: {jaccard(base, other):.4f} "
            f"(atoms {len(base.arch_state.labels)} vs {len(other.arch_state.labels)}); the two seeds' "
            f"training token sets themselves have Jaccard {both:.4f}"
        )


if __name__ == "__main__":
    main()
