"""Activation storage against the disk's own bandwidth: harvest writes, shuffled stream reads, memory.

In one run, on the file system of `--dir`:

* the disk's baselines: a sequential write of `--disk-gb` GB in 8 MB blocks ending with fsync (what
  `dd conv=fsync` measures) and a sequential read of that file with the page cache dropped
  (`echo 3 > /proc/sys/vm/drop_caches`, needs root; otherwise the file is read with O_DIRECT);
* the harvest's write path with a synthetic producer (a model that costs nothing): the same
  `commit_rows` a harvest's writer thread calls, tokens included, in commits of the harvest's
  default size (`--commit-tokens`, one DuckDB row group);
  activation GB/s counts the activation bytes stored;
* the training stream (`ActivationStream`, shuffled, default buffer, the next buffer read ahead)
  over one whole epoch with the page cache dropped first, its batches as the trainer takes them
  (`--values stored`: a half-precision cache stays half, widened on the trainer's device; `float32`:
  widened here, as the analysis reads), GB/s of activation bytes read, and its peak RSS;
* for each store dtype and each `--rows` size, so growth from 1M to 50M rows shows (time linear,
  memory flat); float32 only up to `--max-float32-rows` (it is twice the bytes).

Every measurement runs in its own process (peak RSS is that process's) and each cache is deleted
right after it is measured. For comparison the old layout, one DuckDB `FLOAT[d]` table per hook, is
measured at `--table-rows`.

    nice ionice -c3 python benchmarks/storage.py --dir /var/tmp/bench --rows 1000000 10000000 50000000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import duckdb  # noqa: E402
import numpy as np  # noqa: E402

from activations.harvest import Chunk, ChunkWriter, HarvestConfig  # noqa: E402
from activations.store import (  # noqa: E402
    activation_table,
    encode,
    ensure_schema,
    harvest_info,
    quote_ident,
    register_harvest,
    row_bytes,
)
from saewb.workspace import Workspace  # noqa: E402

COMMIT = HarvestConfig.commit_tokens
HOOK = "blocks.5.hook_out"
DOC_TOKENS = 512
BATCH = 8192
"""Rows of one synthetic forward pass (16 documents of DOC_TOKENS tokens)."""


def drop_caches() -> bool:
    """Empty the page cache so reads come from the disk; False where not allowed (not root)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def disk_baseline(folder: Path, gb: float) -> dict[str, float]:
    path = folder / "disk-baseline.bin"
    block = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8).tobytes()
    n = max(1, int(gb * 1e9) // len(block))
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(n):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    write_s = time.perf_counter() - t0
    dropped = drop_caches()
    flags = os.O_RDONLY | (0 if dropped else getattr(os, "O_DIRECT", 0))
    buf = np.empty(len(block) + 4096, dtype=np.uint8)
    aligned = memoryview(buf[-buf.ctypes.data % 4096 :][: len(block)])  # O_DIRECT wants aligned memory
    fd = os.open(path, flags)
    t0 = time.perf_counter()
    try:
        while os.readv(fd, [aligned]) > 0:
            pass
    finally:
        os.close(fd)
    read_s = time.perf_counter() - t0
    path.unlink()
    size = n * len(block)
    return {"write_gb_s": size / 1e9 / write_s, "read_gb_s": size / 1e9 / read_s, "cache_dropped": dropped}


def _activations(d: int) -> np.ndarray:
    """One batch of rows shaped like activations (low rank plus noise), made once."""
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((32, d)).astype(np.float32)
    return rng.standard_normal((BATCH, 32)).astype(np.float32) @ basis + 0.1 * rng.standard_normal(
        (BATCH, d), dtype=np.float32
    )


def _columns(start: int, n: int) -> dict[str, np.ndarray]:
    """The token columns of one batch, as the harvest computes them (in the same order)."""
    tok = np.arange(start, start + n, dtype=np.int64)
    seq_pos = (tok % DOC_TOKENS).astype(np.int32)
    return {
        "tok_idx": tok,
        "doc_id": tok // DOC_TOKENS,
        "pos": seq_pos,
        "seq_id": tok // DOC_TOKENS,
        "seq_pos": seq_pos,
        "token_id": (tok * 7919 % 50_000).astype(np.int32),
        "token_str": np.full(n, "tok", dtype=object),
        "is_special": seq_pos == 0,
    }


def write_cache(ws_path: Path, rows: int, d: int, dtype: str, layout: str) -> dict[str, float]:
    """A harvest of `rows` synthetic tokens through the harvest's own write path: this thread is the
    model (a batch of BATCH rows encoded to the store dtype, its token columns), the harvest's
    `ChunkWriter` commits every `COMMIT` rows beside it. Returns its timing."""
    ws = Workspace(ws_path)
    x = _activations(d)
    identity = {"model": "synthetic", "hooks": [HOOK], "ctx_len": DOC_TOKENS, "dtype": dtype}
    if layout == "files":
        info = register_harvest(ws, "default", {"identity": identity}, "synthetic", DOC_TOKENS, {HOOK: d})
    else:  # the old layout: one DuckDB FLOAT[d] table per hook
        table = activation_table("default", HOOK)
        with ws.write() as con:
            ensure_schema(con)
            con.execute(
                "INSERT INTO harvests (name, config, model, ctx_len, status) VALUES ('default', ?, 'synthetic', ?, 'running')",
                [json.dumps({"identity": {**identity, "dtype": "float32"}}), DOC_TOKENS],
            )
            con.execute(f"CREATE TABLE {quote_ident(table)} (tok_idx BIGINT NOT NULL, x FLOAT[{d}])")
            con.execute("INSERT INTO harvest_hooks VALUES ('default', ?, ?, ?)", [HOOK, d, table])
        info = harvest_info(ws, "default")
    import torch  # noqa: F401 - loaded before timing: a harvest has it loaded for its model (encode uses it)

    t0 = time.perf_counter()
    writer = ChunkWriter(ws, info, (0, 0, 0))
    chunk = Chunk()
    for start in range(0, rows, BATCH):
        n = min(BATCH, rows - start)
        chunk.acts.setdefault(HOOK, []).append(encode(x[:n], info.store_dtype))
        for key, value in _columns(start, n).items():
            chunk.columns.setdefault(key, []).append(value)
        chunk.columns.setdefault("role", []).append([None] * n)
        docs = range(-(-start // DOC_TOKENS), -(-(start + n) // DOC_TOKENS))
        chunk.docs += [(i, f"synthetic:{i}", "synthetic document") for i in docs]
        chunk.n_windows += len(docs)
        chunk.n_tokens += n
        if chunk.n_tokens >= COMMIT:
            writer.put(chunk)
            chunk = Chunk()
    if chunk.n_tokens:
        writer.put(chunk)
    writer.close()
    writer.check()
    with ws.write() as con:
        con.execute("UPDATE harvests SET status = 'complete'")
    if layout == "table":  # its rows are on disk only after a checkpoint (the files were fsynced)
        with duckdb.connect(str(ws_path)) as con:
            con.execute("CHECKPOINT")
    return {"write_s": time.perf_counter() - t0}


def stream_epoch(ws_path: Path, values: str) -> dict[str, float]:
    """One shuffled epoch of the training stream over every token (special ones included), its
    batches as the trainer takes them (`values="stored"`) or widened to float32."""
    from activations.stream import ActivationStream

    dropped = drop_caches()
    t0 = time.perf_counter()
    stream = ActivationStream(
        ws_path, HOOK, batch_size=4096, split="all", exclude_special=False, values=values
    )
    open_s = time.perf_counter() - t0
    rows = 0
    for batch in stream.epoch():
        rows += len(batch)
    return {"epoch_s": time.perf_counter() - t0, "open_s": open_s, "rows": rows, "cache_dropped": dropped}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    ws = Path(args.ws)
    if args.child == "write":
        out = write_cache(ws, args.n, args.d, args.dtype, args.layout)
    else:
        out = stream_epoch(ws, args.values)
    print(json.dumps({**out, "rss_mb": _rss_mb()}))


def _run(*argv: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(
    folder: Path, rows: int, d: int, dtype: str, layout: str, stream: bool, values: str = "stored"
) -> dict[str, float]:
    case = folder / f"{layout}-{dtype}-{rows}"
    case.mkdir(parents=True)
    ws = case / "ws.duckdb"
    try:
        common = ["--ws", str(ws), "--n", str(rows), "--d", str(d), "--dtype", dtype, "--layout", layout]
        w = _run("--child", "write", *common)
        act_gb = rows * row_bytes(d, dtype) / 1e9
        out = {
            "rows": rows,
            "dtype": dtype,
            "layout": layout,
            "act_gb": act_gb,
            "disk_gb": _du(case) / 1e9,
            "write_s": w["write_s"],
            "write_gb_s": act_gb / w["write_s"],
            "write_rss_mb": w["rss_mb"],
        }
        if stream:
            r = _run("--child", "stream", *common, "--values", values)
            assert r["rows"] == rows, r
            out |= {
                "epoch_s": r["epoch_s"],
                "read_gb_s": act_gb / r["epoch_s"],
                "stream_rss_mb": r["rss_mb"],
                "rows_per_s": rows / r["epoch_s"],
            }
        return out
    finally:
        shutil.rmtree(case, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dir", default="/var/tmp/saewb-storage-bench", help="where the caches go (deleted after)"
    )
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "float32"])
    parser.add_argument("--max-float32-rows", type=int, default=10_000_000)
    parser.add_argument(
        "--table-rows", type=int, default=262_144, help="rows for the old DuckDB-table layout (0: skip)"
    )
    parser.add_argument("--disk-gb", type=float, default=4.0)
    parser.add_argument("--no-stream", action="store_true", help="only the write side")
    parser.add_argument(
        "--values",
        choices=("stored", "float32"),
        default="stored",
        help="stream batches as the trainer takes them (stored: a half-precision cache stays half) or widened",
    )
    parser.add_argument("--child", choices=("write", "stream"), help=argparse.SUPPRESS)
    parser.add_argument("--ws", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--layout", default="files", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    disk = disk_baseline(folder, args.disk_gb)
    results = []
    if args.table_rows:
        results.append(measure(folder, args.table_rows, args.d, "float32", "table", not args.no_stream))
        print(json.dumps(results[-1]), flush=True)
    for dtype in args.dtypes:
        for rows in args.rows:
            if dtype == "float32" and rows > args.max_float32_rows:
                continue
            need = rows * (row_bytes(args.d, dtype) + 40) + (4 << 30)  # activations, tokens, 4 GB to spare
            if shutil.disk_usage(folder).free < need:
                print(f"skipped {dtype} x {rows:,} rows: not enough free disk", flush=True)
                continue
            results.append(measure(folder, rows, args.d, dtype, "files", not args.no_stream, args.values))
            print(json.dumps(results[-1]), flush=True)
    how = "page cache dropped" if disk["cache_dropped"] else "O_DIRECT"
    print(
        f"\ndisk: sequential write with fsync {disk['write_gb_s']:.2f} GB/s, sequential read ({how}) "
        f"{disk['read_gb_s']:.2f} GB/s; d = {args.d}; stream reads after dropping the page cache\n"
    )
    print(
        "| layout | store dtype | rows | activation GB | write GB/s | % disk write | write peak RSS MB "
        "| shuffled epoch s | stream GB/s | % disk read | stream rows/s | stream peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        name = "DuckDB FLOAT[d] table (old)" if r["layout"] == "table" else "shard files"
        stream = (
            f"{r['epoch_s']:.1f} | {r['read_gb_s']:.2f} | {100 * r['read_gb_s'] / disk['read_gb_s']:.0f} % "
            f"| {r['rows_per_s'] / 1e6:.2f}M | {r['stream_rss_mb']:.0f}"
            if "epoch_s" in r
            else "- | - | - | - | -"
        )
        print(
            f"| {name} | {r['dtype']} | {r['rows']:,} | {r['act_gb']:.1f} | {r['write_gb_s']:.2f} "
            f"| {100 * r['write_gb_s'] / disk['write_gb_s']:.0f} % | {r['write_rss_mb']:.0f} | {stream} |"
        )
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
