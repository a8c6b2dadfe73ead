"""Lockstep sweep against sequential runs: 8 TopK SAEs on the same tokens.

Members: k in {16, 32} x n in {2048, 4096} x seeds {0, 1} (one vmapped group of 4 per n: k and
seed vary inside a group), d from the workspace's hook. Sequential: `sae.trainer.train` once per member,
each with its own `ActivationStream` (what 8 `saewb train` runs do, without the workspace logging).
Lockstep: `sae.sweep.train_lockstep` over one stream. Both read the same batches (data seed 0) and
write no checkpoints. Each mode starts with JAX's compilation caches cleared, as a fresh process
would: without that, later repetitions of the lockstep mode reused the steps compiled by earlier ones.

Reported per mode, medians over --reps: wall time end to end (compilation, init sample, stream
setup included), member-tokens per wall second (8 x train tokens / wall), and the steady-state
member-tokens/s from the trainers' own logged rows (the first log window, which holds the
compilation, left out). The speed-up is sequential / lockstep in the same repetition.

    python benchmarks/sweep.py [--workspace workspace.duckdb] [--hook blocks.3.hook_out] \
        [--steps 40] [--batch-size 1024] [--reps 3] [--cli]

With ``--cli`` the two modes are what a user runs instead: eight ``saewb train`` processes one after
the other against one ``saewb sweep`` process (the same members, no held-out evaluation), each mode
on its own copy of the workspace, since both write their runs, metrics and final checkpoints there.
Wall time per mode, process start-up included; no steady-state column.

The workspace is only read.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from activations.stream import ActivationStream  # noqa: E402
from sae.sweep import Member, train_lockstep  # noqa: E402
from sae.topk import TopKConfig  # noqa: E402
from sae.trainer import TrainConfig, train  # noqa: E402
from saewb.hugepages import reexec_with_huge_pages  # noqa: E402


def members(steps: int, batch: int, log_every: int) -> list[Member]:
    out = []
    for k, n, seed in itertools.product((16, 32), (2048, 4096), (0, 1)):
        tc = TrainConfig(
            train_tokens=steps * batch,
            batch_size=batch,
            seed=seed,
            log_every=log_every,
            ckpt_every=10**9,
            init_sample_tokens=8192,
        )
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


def _saewb(*args: str) -> None:
    saewb = Path(sys.executable).with_name("saewb")
    subprocess.run([str(saewb), *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_cli(ws: str, hook: str, ms: list[Member], mode: str) -> float:
    """Wall seconds of the mode run as the CLI runs it, on a fresh copy of the workspace."""
    tc = ms[0].train_config
    with tempfile.TemporaryDirectory(dir=Path(ws).parent) as tmp:
        copy = Path(tmp) / "ws.duckdb"
        shutil.copy(ws, copy)
        common = {
            "train_tokens": tc.train_tokens,
            "batch_size": tc.batch_size,
            "log_every": tc.log_every,
            "init_sample_tokens": tc.init_sample_tokens,
        }
        t0 = time.perf_counter()
        if mode == "lockstep":
            import yaml

            spec = {
                "workspace": str(copy),
                "name": "bench",
                "hook": hook,
                "eval_tokens": 0,
                "progress": False,
                "train": {**common, "seed": 0},
                "members": [
                    {
                        "name": m.name,
                        "k": m.sae_config.k,
                        "n_latents": m.sae_config.n_latents,
                        "seed": m.train_config.seed,
                    }
                    for m in ms
                ],
            }
            (Path(tmp) / "sweep.yaml").write_text(yaml.safe_dump(spec))
            _saewb("sweep", str(Path(tmp) / "sweep.yaml"))
        else:
            for m in ms:
                flags = [f"--{k.replace('_', '-')}={v}" for k, v in common.items()]
                _saewb(
                    "train",
                    "--workspace",
                    str(copy),
                    "--hook",
                    hook,
                    "--arch",
                    "topk",
                    "--name",
                    m.name,
                    f"--k={m.sae_config.k}",
                    f"--n-latents={m.sae_config.n_latents}",
                    f"--seed={m.train_config.seed}",
                    "--eval-tokens=0",
                    "--no-progress",
                    *flags,
                )
        return time.perf_counter() - t0


def main_cli(args: argparse.Namespace, ms: list[Member]) -> None:
    walls: dict[str, list[float]] = {"sequential": [], "lockstep": []}
    speedups = []
    for rep in range(args.reps):
        order = ("sequential", "lockstep") if rep % 2 == 0 else ("lockstep", "sequential")
        got = {}
        for mode in order:
            got[mode] = run_cli(args.workspace, args.hook, ms, mode)
            walls[mode].append(got[mode])
            print(f"rep {rep} {mode} (CLI): wall {got[mode]:.1f}s", flush=True)
        speedups.append(got["sequential"] / got["lockstep"])
    tokens = args.steps * args.batch_size * len(ms)
    print(
        f"\n8 TopK members (k 16/32 x n 2048/4096 x 2 seeds), {args.steps} steps of {args.batch_size} tokens "
        f"each, hook {args.hook}; 8 `saewb train` processes vs one `saewb sweep`; medians of {args.reps} reps"
    )
    print("| mode | wall s | member-tokens/s (end to end) |")
    print("|---|---|---|")
    for mode, vals in walls.items():
        wall = statistics.median(vals)
        print(f"| {mode} | {wall:.1f} | {tokens / wall:,.0f} |")
    print(f"| speed-up (same rep) | {statistics.median(speedups):.2f}x | |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", default=str(Path(__file__).resolve().parents[1] / "workspace.duckdb"))
    ap.add_argument("--hook", default="blocks.3.hook_out")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--cli", action="store_true", help="time `saewb train` x 8 against `saewb sweep` (processes)"
    )
    args = ap.parse_args()
    reexec_with_huge_pages()  # both modes run as the saewb program runs them
    log_every = max(1, args.steps // 8)
    ms = members(args.steps, args.batch_size, log_every)
    if args.cli:
        main_cli(args, ms)
        return
    tokens = args.steps * args.batch_size * len(ms)
    rows: dict[str, list[tuple[float, float, float]]] = {"sequential": [], "lockstep": []}
    speedups, steady_speedups = [], []
    for rep in range(args.reps):
        # alternate the order so that drifting machine load does not favour one mode
        order = ("sequential", "lockstep") if rep % 2 == 0 else ("lockstep", "sequential")
        got = {}
        for mode in order:
            fn = run_sequential if mode == "sequential" else run_lockstep
            jax.clear_caches()  # both modes compile from cold
            cpu0 = time.process_time()  # every thread of this process: cores kept busy = cpu / wall
            wall, st = fn(args.workspace, args.hook, ms)
            got[mode] = (wall, st, (time.process_time() - cpu0) / wall)
            rows[mode].append(got[mode])
            print(
                f"rep {rep} {mode}: wall {wall:.1f}s, steady {st:,.0f} member-tok/s, "
                f"{got[mode][2]:.2f} cores busy",
                flush=True,
            )
        speedups.append(got["sequential"][0] / got["lockstep"][0])
        steady_speedups.append(got["lockstep"][1] / got["sequential"][1])
    print(
        f"\n8 TopK members (k 16/32 x n 2048/4096 x 2 seeds; 2 vmapped groups), {args.steps} steps of {args.batch_size} tokens "
        f"each, hook {args.hook}; medians of {args.reps} reps"
    )
    print(f"cores: {os.cpu_count()}; 'cores busy' = process CPU time / wall time")
    print("| mode | wall s | member-tokens/s (end to end) | member-tokens/s (steady) | cores busy |")
    print("|---|---|---|---|---|")
    for mode, vals in rows.items():
        wall = statistics.median(v[0] for v in vals)
        st = statistics.median(v[1] for v in vals)
        busy = statistics.median(v[2] for v in vals)
        print(f"| {mode} | {wall:.1f} | {tokens / wall:,.0f} | {st:,.0f} | {busy:.2f} |")
    print(
        f"| speed-up (same rep) | {statistics.median(speedups):.2f}x | {statistics.median(speedups):.2f}x | "
        f"{statistics.median(steady_speedups):.2f}x | |"
    )


if __name__ == "__main__":
    main()
