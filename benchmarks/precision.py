"""What bf16 compute costs: held-out FVU and step time of TopK, float32 vs bfloat16 (issue 6).

``TrainConfig.compute_dtype="bfloat16"`` runs the loss and its gradient on bf16 copies of the params,
state and batch; the master weights, Adam moments and state updates stay float32. This script
trains the same SAE twice on the same cached activations (same seed, data order and schedule),
once per dtype, and reports:

* quality: held-out FVU, L0 and dead fraction on the eval split (evaluated in float32 with the
  saved inference-form params, ``sae.metrics.evaluate``), and the last training-window FVU;
* speed: train-step time, timed in interleaved rounds after warm-up (round r times each dtype
  once, ``--steps`` consecutive steps), so machine noise lands on both alike; medians quoted.

The workspace is only read. Defaults: the demo cache, TopK n=4096, k=32, batch 4096, 300k tokens.

    .venv/bin/python benchmarks/precision.py      # ~10 CPU-minutes per dtype (took 58 min on a loaded 2-core box)
    .venv/bin/python benchmarks/precision.py --train-tokens 65536 --rounds 3    # quick look
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from activations.stream import ActivationStream
from sae.api import SAE
from sae.metrics import evaluate
from sae.topk import TopKConfig
from sae.trainer import TrainConfig, Trainer, train

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=str(ROOT / "workspace.duckdb"))
    ap.add_argument("--hook", default="blocks.3.hook_out")
    ap.add_argument("--n-latents", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--train-tokens", type=int, default=300_000)
    ap.add_argument("--eval-tokens", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--steps", type=int, default=3, help="train steps per timing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = ap.parse_args()

    cfg = TopKConfig(n_latents=args.n_latents, k=args.k)
    stream = ActivationStream(args.workspace, args.hook, batch_size=args.batch_size, seed=args.seed)
    ev = ActivationStream(args.workspace, args.hook, batch_size=4096, seed=args.seed, split="eval")
    eval_batches = list(itertools.islice(ev.epoch(), max(1, args.eval_tokens // 4096)))
    print(
        f"device {jax.devices()[0].device_kind}; {args.workspace} {args.hook} d={stream.d}; train split "
        f"{stream.n_tokens} tokens, eval {sum(len(b) for b in eval_batches)} tokens; TopK n={cfg.n_latents} "
        f"k={cfg.k}, batch {args.batch_size}, {args.train_tokens} training tokens"
    )

    quality: dict[str, dict[str, float]] = {}
    for dtype in DTYPES:
        tc = TrainConfig(
            train_tokens=args.train_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
            log_every=8,
            compute_dtype=dtype,
        )
        t0 = time.perf_counter()
        result = train(cfg, tc, lambda start: stream.batches(start=start), progress=False)
        wall = time.perf_counter() - t0
        model = SAE(cfg, result.params, result.arch_state, result.d)
        m = evaluate(model, eval_batches)
        quality[dtype] = {
            "eval_fvu": m["fvu"],
            "eval_l0": m["l0"],
            "eval_dead_frac": m["dead_frac"],
            "train_fvu_last": result.final_metrics["fvu"],
            "train_wall_s": wall,
        }
        print(f"  trained {dtype}: {wall:.0f} s, held-out FVU {m['fvu']:.4f}", flush=True)

    # speed: both trainers warmed up, then interleaved rounds on the same batches
    batches = list(itertools.islice(stream.batches(), args.steps))
    sample = np.concatenate(list(itertools.islice(stream.batches(), 4)))[:16384]
    trainers, states = {}, {}
    for dtype in DTYPES:
        tc = TrainConfig(
            train_tokens=args.train_tokens, batch_size=args.batch_size, seed=args.seed, compute_dtype=dtype
        )
        trainers[dtype] = Trainer(cfg, tc, stream.d)
        states[dtype] = trainers[dtype].init_state(sample)
        states[dtype] = trainers[dtype].step(states[dtype], batches[0], 1.0)  # compile
        jax.block_until_ready(states[dtype].step)
    times: dict[str, list[float]] = {d: [] for d in DTYPES}
    for _ in range(args.rounds):
        for dtype in DTYPES:
            t0 = time.perf_counter()
            for b in batches:
                states[dtype] = trainers[dtype].step(states[dtype], b, 1.0)
            jax.block_until_ready(states[dtype].step)
            times[dtype].append((time.perf_counter() - t0) / len(batches))

    print()
    print(
        f"{'dtype':<10} {'held-out FVU':>12} {'L0':>7} {'dead':>6} {'train FVU':>10} "
        f"{'step s (median)':>16} {'min':>7} {'max':>7} {'tokens/s':>9}"
    )
    for dtype in DTYPES:
        q, t = quality[dtype], times[dtype]
        med = statistics.median(t)
        print(
            f"{dtype:<10} {q['eval_fvu']:>12.4f} {q['eval_l0']:>7.1f} {q['eval_dead_frac']:>6.3f} "
            f"{q['train_fvu_last']:>10.4f} {med:>16.3f} {min(t):>7.3f} {max(t):>7.3f} {args.batch_size / med:>9.0f}"
        )
    f32, b16 = quality["float32"], quality["bfloat16"]
    ratio = statistics.median(times["bfloat16"]) / statistics.median(times["float32"])
    print(
        f"\nbf16 − fp32 held-out FVU: {b16['eval_fvu'] - f32['eval_fvu']:+.4f} "
        f"({(b16['eval_fvu'] / f32['eval_fvu'] - 1) * 100:+.1f}%); step time bf16/fp32 = {ratio:.2f} "
        f"(medians of {args.rounds} interleaved rounds x {args.steps} steps)"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "quality": quality, "step_s": times},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
