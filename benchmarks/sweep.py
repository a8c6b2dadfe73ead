"""Lockstep sweep against sequential runs: 8 TopK SAEs on the same tokens.

Members: k in {16, 32} x n in {2048, 4096} x seeds {0, 1} (4 vmapped pairs, one jitted step
per pair), d from the workspace's hook. Sequential: `sae.trainer.train` once per member,
each with its own `ActivationStream` (what 8 `saewb train` runs do, without the workspace logging).
Lockstep: `sae.sweep.train_lockstep` over one stream. Both read the same batches (data seed 0) and
write no checkpoints.

Reported per mode, medians over --reps: wall time end to end (compilation, init sample, stream
setup included), member-tokens per wall second (8 x train tokens / wall), and the steady-state
member-tokens/s from the trainers' own logged rows (the first log window, which holds the
compilation, left out). The speed-up is sequential / lockstep in the same repetition.

    python benchmarks/sweep.py [--workspace workspace.duckdb] [--hook blocks.3.hook_out] \
        [--steps 40] [--batch-size 1024] [--reps 3]

The workspace is only read.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activations.stream import ActivationStream  # noqa: E402
from sae.sweep import Member, train_lockstep  # noqa: E402
from sae.topk import TopKConfig  # noqa: E402
from sae.trainer import TrainConfig, train  # noqa: E402
from saewb.hugepages import reexec_with_huge_pages  # noqa: E402


def members(steps: int, batch: int, log_every: int) -> list[Member]:
    out = []
    for k, n, seed in itertools.product((16, 32), (2048, 4096), (0, 1)):
        tc = TrainConfig(train_tokens=steps * batch, batch_size=batch, seed=seed, log_every=log_every,
                         ckpt_every=10**9, init_sample_tokens=8192)
        out.append(Member(f"k{k}-n{n}-s{seed}", "", TopKConfig(n_latents=n, k=k), tc))
    return out


def steady(rows: list[dict[str, float]]) -> float:
    """Median logged tokens/s, the first window (compilation) left out."""
    rates = [r["tokens_per_s"] for r in rows[1:]] or [r["tokens_per_s"] for r in rows]
    return statistics.median(rates)


def run_sequential(ws: str, hook: str, ms: list[Member]) -> tuple[float, float]:
    t0 = time.perf_counter()
    seconds_per_token = 0.0
    for m in ms:
        stream = ActivationStream(ws, hook, batch_size=m.train_config.batch_size, seed=0)
        res = train(m.sae_config, m.train_config, lambda s, st=stream: st.batches(start=s), progress=False)
        seconds_per_token += 1.0 / steady(res.history)
    wall = time.perf_counter() - t0
    return wall, len(ms) / seconds_per_token  # member-tokens per second, steady state


def run_lockstep(ws: str, hook: str, ms: list[Member]) -> tuple[float, float]:
    t0 = time.perf_counter()
    stream = ActivationStream(ws, hook, batch_size=ms[0].train_config.batch_size, seed=0)
    named = [Member(m.name, hook, m.sae_config, m.train_config) for m in ms]
    results = train_lockstep(named, {hook: lambda s: stream.batches(start=s)}, progress=False)
    wall = time.perf_counter() - t0
    per_member = steady(next(iter(results.values())).history)  # every member advances together
    return wall, per_member * len(ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", default=str(Path(__file__).resolve().parents[1] / "workspace.duckdb"))
    ap.add_argument("--hook", default="blocks.3.hook_out")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    reexec_with_huge_pages()  # both modes run as the saewb program runs them
    log_every = max(1, args.steps // 8)
    ms = members(args.steps, args.batch_size, log_every)
    tokens = args.steps * args.batch_size * len(ms)
    rows: dict[str, list[tuple[float, float, float]]] = {"sequential": [], "lockstep": []}
    speedups, steady_speedups = [], []
    for rep in range(args.reps):
        # alternate the order so that drifting machine load does not favour one mode
        order = ("sequential", "lockstep") if rep % 2 == 0 else ("lockstep", "sequential")
        got = {}
        for mode in order:
            fn = run_sequential if mode == "sequential" else run_lockstep
            cpu0 = time.process_time()  # every thread of this process: cores kept busy = cpu / wall
            wall, st = fn(args.workspace, args.hook, ms)
            got[mode] = (wall, st, (time.process_time() - cpu0) / wall)
            rows[mode].append(got[mode])
            print(f"rep {rep} {mode}: wall {wall:.1f}s, steady {st:,.0f} member-tok/s, "
                  f"{got[mode][2]:.2f} cores busy", flush=True)
        speedups.append(got["sequential"][0] / got["lockstep"][0])
        steady_speedups.append(got["lockstep"][1] / got["sequential"][1])
    print(f"\n8 TopK members (k 16/32 x n 2048/4096 x 2 seeds), {args.steps} steps of {args.batch_size} tokens "
          f"each, hook {args.hook}; medians of {args.reps} reps")
    print(f"cores: {os.cpu_count()}; 'cores busy' = process CPU time / wall time")
    print("| mode | wall s | member-tokens/s (end to end) | member-tokens/s (steady) | cores busy |")
    print("|---|---|---|---|---|")
    for mode, vals in rows.items():
        wall = statistics.median(v[0] for v in vals)
        st = statistics.median(v[1] for v in vals)
        busy = statistics.median(v[2] for v in vals)
        print(f"| {mode} | {wall:.1f} | {tokens / wall:,.0f} | {st:,.0f} | {busy:.2f} |")
    print(f"| speed-up (same rep) | {statistics.median(speedups):.2f}x | {statistics.median(speedups):.2f}x | "
          f"{statistics.median(steady_speedups):.2f}x | |")


if __name__ == "__main__":
    main()
