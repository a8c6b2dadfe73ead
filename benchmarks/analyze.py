"""`saewb analyze` scaling: analysis tokens/s and peak RSS at two cache sizes (issue 4B).

Goal: memory flat and time linear in tokens. Each measurement runs in a fresh subprocess and reads
its own peak RSS from /proc/self/status (VmHWM); `ru_maxrss` is not used because Linux carries the
parent's peak over into a forked child. The child also reports its RSS after imports and loading the
SAE (before the analysis starts), so the table shows what the analysis itself adds.

Setup (once, reused): a MiniLM harvest of `--tokens` tokens and a TopK SAE trained on it, in
`--dir` (default /tmp/saewb-bench-analyze). The two sizes analyse the first `--small` (default a third) and all tokens
of the same cache (`--max-tokens`), so nothing but the token count changes.

Run:  .venv/bin/python benchmarks/analyze.py [--tokens 60000 --n-latents 4096 --k 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOOK = "blocks.3.hook_out"


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


def child(ws: str, run: str, max_tokens: int, batch_size: int) -> None:
    """One measurement (runs in a fresh interpreter)."""
    sys.path.insert(0, str(REPO))
    import sae
    from analysis.features import AnalyzeConfig, analyze_run

    sae.load(run, workspace=ws)  # imports, jax init and checkpoint read: the baseline, not the analysis
    base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    out = analyze_run(ws, run, AnalyzeConfig(max_tokens=max_tokens, batch_size=batch_size, logits=False))
    out["wall_s"] = time.perf_counter() - t0
    out["base_rss_mb"] = base / 1024
    out["peak_rss_mb"] = _status_kb("VmHWM") / 1024
    print("RESULT " + json.dumps(out))


def _saewb(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "saewb.cli", *args], check=True, cwd=REPO)


def setup(root: Path, tokens: int, n_latents: int, k: int) -> tuple[Path, str]:
    ws = root / "ws.duckdb"
    run = f"bench-n{n_latents}-k{k}"
    if not ws.exists():
        _saewb(
            "harvest",
            "--workspace",
            str(ws),
            "--model",
            "minilm",
            "--hook",
            HOOK,
            "--ctx-len",
            "128",
            "--max-tokens",
            str(tokens),
            "--quiet",
        )
    from sae import runs
    from saewb.workspace import Workspace

    row = runs.get_run(Workspace(ws), run)
    if row is None or row["status"] != "done":
        _saewb(
            "train",
            "--workspace",
            str(ws),
            "--hook",
            HOOK,
            "--arch",
            "topk",
            "--n-latents",
            str(n_latents),
            "--k",
            str(k),
            "--train-tokens",
            "20000",
            "--batch-size",
            "2048",
            "--seed",
            "0",
            "--name",
            run,
            "--no-progress",
        )
    return ws, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/saewb-bench-analyze"))
    ap.add_argument("--tokens", type=int, default=60_000, help="harvest size (the large cache)")
    ap.add_argument("--small", type=int, default=None, help="small cache size (default: tokens / 3)")
    ap.add_argument("--n-latents", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--child", nargs=3, metavar=("WS", "RUN", "MAX_TOKENS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), args.batch_size)
        return
    sys.path.insert(0, str(REPO))
    args.dir.mkdir(parents=True, exist_ok=True)
    ws, run = setup(args.dir, args.tokens, args.n_latents, args.k)
    sizes = [args.small or args.tokens // 3, args.tokens]
    rows = []
    for size in sizes:
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(ws),
                run,
                str(size),
                "--batch-size",
                str(args.batch_size),
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"},
        )
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        rows.append(json.loads(line[0][7:]))
    print(
        f"\nsaewb analyze scaling: MiniLM {HOOK}, TopK n={args.n_latents} k={args.k}, batch {args.batch_size}, "
        f"{os.cpu_count()} CPUs (shared)"
    )
    print(
        f"{'tokens':>8} {'stream tok/s':>13} {'total s':>8} {'stream s':>9} {'base RSS MB':>12} "
        f"{'peak RSS MB':>12} {'added MB':>9}"
    )
    for r in rows:
        print(
            f"{r['tokens']:>8} {r['tokens_per_s']:>13.0f} {r['seconds']:>8.1f} {r['stream_seconds']:>9.1f} "
            f"{r['base_rss_mb']:>12.0f} {r['peak_rss_mb']:>12.0f} {r['peak_rss_mb'] - r['base_rss_mb']:>9.0f}"
        )
    a, b = rows
    print(
        f"\ntokens x{b['tokens'] / a['tokens']:.2f}: stream time x{b['stream_seconds'] / a['stream_seconds']:.2f}, "
        f"peak RSS x{b['peak_rss_mb'] / a['peak_rss_mb']:.2f}"
    )


if __name__ == "__main__":
    main()
