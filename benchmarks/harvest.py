"""Harvest and stream throughput on the bundled MiniLM and the built-in corpus.

Prints one table:
  * harvest tokens/s against the same pass without storage (corpus reading, tokenising, batching and
    the model forward over the same batches, in the same process): their ratio is the storage overhead
    (token strings, Arrow conversion, DuckDB writes);
  * activation MB/s written;
  * stream tokens/s (shuffled float32 batches of 4096), against the train-step tokens/s of a TopK
    SAE with d=384, n=16384, k=32 when the trainers are installed;
  * peak RSS of a process streaming a whole epoch, for two cache sizes (it must not grow with the cache).

Timings are medians over repetitions; compare the ratios, the machine is shared and noisy.

    python benchmarks/harvest.py [--tokens 30000] [--reps 3] [--rss-sizes 150000 600000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activations.harvest import HarvestConfig, Harvester, window_batches  # noqa: E402
from activations.store import activation_table, ensure_schema, fixed_size_list, insert_arrow, quote_ident  # noqa: E402
from activations.stream import ActivationStream  # noqa: E402
from saewb.workspace import Workspace  # noqa: E402

HOOK = "blocks.3.hook_out"


def bare_forward_s(harvester: Harvester) -> float:
    """Everything the harvest does except storing: read and cut the corpus, batch, forward."""
    t0 = time.perf_counter()
    for batch in window_batches(harvester.windows(), harvester.cfg.batch_size):
        harvester.forward(batch)
    return time.perf_counter() - t0


def stream_tokens_per_s(ws: Path, reps: int) -> float:
    s = ActivationStream(ws, HOOK, batch_size=4096, split="all")
    rates = []
    for epoch in range(reps):
        t0 = time.perf_counter()
        n = sum(len(b) for b in s.epoch(epoch))
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def topk_train_tokens_per_s(reps: int) -> float:
    """Train-step tokens/s of our TopK at d=384, n=16384, k=32, batch 4096 (one jitted step, medians)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from train_speed import ours_topk

    timed = ours_topk(d=384, n=16384, k=32, batch=4096, warmup=1)
    assert timed.rep is not None
    return 4096 / statistics.median(timed.rep(1) for _ in range(reps))


def synthetic_cache(path: Path, n_tokens: int, d: int = 384, chunk: int = 65_536) -> None:
    """A harvest-shaped workspace of random activations, to measure the stream at any size."""
    ws = Workspace(path)
    table = activation_table("default", HOOK)
    rng = np.random.default_rng(0)
    with ws.write() as con:
        ensure_schema(con)
        con.execute(
            "INSERT INTO harvests (name, config, model, ctx_len, status, n_tokens) VALUES ('default', '{}', 'synthetic', 128, 'complete', ?)",
            [n_tokens],
        )
        con.execute(f"CREATE TABLE {quote_ident(table)} (tok_idx BIGINT NOT NULL, x FLOAT[{d}])")
        con.execute("INSERT INTO harvest_hooks VALUES ('default', ?, ?, ?)", [HOOK, d, table])
    for start in range(0, n_tokens, chunk):
        n = min(chunk, n_tokens - start)
        idx = np.arange(start, start + n, dtype=np.int64)
        tokens = pa.table(
            {
                "harvest": ["default"] * n,
                "tok_idx": idx,
                "doc_id": idx // 100,
                "pos": (idx % 100).astype(np.int32),
                "seq_id": idx // 100,
                "seq_pos": (idx % 100).astype(np.int32),
                "token_id": np.zeros(n, np.int32),
                "token_str": ["x"] * n,
                "is_special": np.zeros(n, bool),
                "role": pa.nulls(n, pa.string()),
            }
        )
        with ws.write() as con:
            insert_arrow(con, "tokens", tokens)
            insert_arrow(
                con,
                table,
                pa.table({"tok_idx": idx, "x": fixed_size_list(rng.standard_normal((n, d), np.float32))}),
            )


def _rss_worker(path: str) -> None:
    s = ActivationStream(path, HOOK, batch_size=4096, split="all")
    n = sum(len(b) for b in s.epoch())
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec.
    status = Path("/proc/self/status").read_text().splitlines()
    hwm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"tokens": n, "peak_rss_mb": hwm_kb / 1024}))


def stream_peak_rss_mb(path: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--rss-worker", str(path)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=30_000, help="tokens per harvest repetition")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rss-sizes", type=int, nargs=2, default=[150_000, 600_000])
    parser.add_argument("--rss-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_worker:
        _rss_worker(args.rss_worker)
        return

    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        last_ws = Path(tmp) / "h0.duckdb"
        for rep in range(args.reps):
            ws = Path(tmp) / f"h{rep}.duckdb"
            cfg = HarvestConfig(
                model="minilm", corpus="stdlib-docs", hooks=(HOOK,), ctx_len=128, max_tokens=args.tokens
            )
            harvester = Harvester(cfg, ws)
            bare = bare_forward_s(harvester)
            stats = harvester.run(progress=False)
            rows.append((stats, bare, ws.stat().st_size))
            last_ws = ws
        overhead = statistics.median(s.wall_s / b - 1 for s, b, _ in rows)
        harvest_rate = statistics.median(s.tokens / s.wall_s for s, _, _ in rows)
        forward_rate = statistics.median(s.tokens / b for s, b, _ in rows)
        act_mb_s = statistics.median(s.bytes_written / 1e6 / s.wall_s for s, _, _ in rows)
        file_mb_s = statistics.median(size / 1e6 / s.wall_s for s, _, size in rows)
        bytes_per_token = statistics.median(size / s.tokens for s, _, size in rows)
        stream_rate = stream_tokens_per_s(last_ws, reps=5)

        rss = {}
        for size in args.rss_sizes:
            path = Path(tmp) / f"synthetic_{size}.duckdb"
            synthetic_cache(path, size)
            rss[size] = stream_peak_rss_mb(path)
            rss[size]["rate"] = stream_tokens_per_s(path, reps=3)

    train_rate = topk_train_tokens_per_s(reps=5)
    print(f"MiniLM {HOOK}, stdlib-docs, ctx 128, {args.tokens} tokens x {args.reps} reps (medians)\n")
    print("| measure | value | goal |")
    print("|---|---|---|")
    print(f"| same pass without storage, tokens/s | {forward_rate:,.0f} | |")
    print(f"| harvest tokens/s | {harvest_rate:,.0f} | |")
    print(f"| storage overhead (harvest / no-storage pass - 1) | {overhead:.1%} | <= 15% |")
    print(f"| activation MB/s written | {act_mb_s:.1f} | |")
    print(f"| workspace MB/s written (all tables) | {file_mb_s:.1f} | |")
    print(f"| workspace bytes per token (1 hook, d=384) | {bytes_per_token:,.0f} | |")
    print(
        f"| stream tokens/s, real cache (small enough to stay in one buffer: memory-bound) | {stream_rate:,.0f} | |"
    )
    disk_rate = min(r["rate"] for r in rss.values())
    print(f"| TopK d=384 n=16384 k=32 train tokens/s | {train_rate:,.0f} | |")
    print(f"| stream (slowest disk-bound cache below) / train | {disk_rate / train_rate:.1f}x | >= 20x |")
    for size, r in rss.items():
        print(
            f"| stream on {size:,}-token cache: tokens/s, peak RSS | {r['rate']:,.0f} tok/s, {r['peak_rss_mb']:.0f} MB | RSS flat |"
        )


if __name__ == "__main__":
    main()
