"""Which DuckDB layout for activation vectors? Bytes per value, write and read MB/s, on real-shaped data.

Layouts compared, each holding `rows` float32 vectors of width d keyed by tok_idx:
  array   - x FLOAT[d] (fixed-size array), inserted from an Arrow FixedSizeListArray
  blob    - x BLOB with the raw little-endian float32 bytes
  wide    - d separate FLOAT columns
Reads are a full scan into a [rows, d] numpy array and random 8k-row range reads (what the stream does).

    python benchmarks/storage_layout.py [--rows 200000] [--d 384]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa


def _data(rows: int, d: int) -> np.ndarray:
    # Real activations are not random noise; a low-rank-plus-noise matrix compresses like them.
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((32, d)).astype(np.float32)
    return (
        rng.standard_normal((rows, 32)).astype(np.float32) @ basis + 0.1 * rng.standard_normal((rows, d))
    ).astype(np.float32)


def _table(layout: str, x: np.ndarray, start: int) -> pa.Table:
    idx = pa.array(np.arange(start, start + len(x), dtype=np.int64))
    if layout == "array":
        return pa.table(
            {"tok_idx": idx, "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])}
        )
    if layout == "blob":
        raw = x.tobytes()
        step = x.shape[1] * 4
        return pa.table(
            {
                "tok_idx": idx,
                "x": pa.array([raw[i * step : (i + 1) * step] for i in range(len(x))], pa.binary()),
            }
        )
    return pa.table({"tok_idx": idx, **{f"x{j}": pa.array(x[:, j]) for j in range(x.shape[1])}})


def _ddl(layout: str, d: int) -> str:
    if layout == "array":
        return f"CREATE TABLE t (tok_idx BIGINT, x FLOAT[{d}])"
    if layout == "blob":
        return "CREATE TABLE t (tok_idx BIGINT, x BLOB)"
    return "CREATE TABLE t (tok_idx BIGINT, " + ", ".join(f"x{j} FLOAT" for j in range(d)) + ")"


def _to_numpy(layout: str, tbl: pa.Table, d: int) -> np.ndarray:
    if layout == "array":
        return tbl.column("x").combine_chunks().values.to_numpy().reshape(-1, d)
    if layout == "blob":
        return np.frombuffer(b"".join(tbl.column("x").to_pylist()), dtype=np.float32).reshape(-1, d)
    return np.stack([tbl.column(f"x{j}").to_numpy() for j in range(d)], axis=1)


def measure(layout: str, x: np.ndarray, workdir: Path, chunk: int = 65_536) -> dict[str, float]:
    path = workdir / f"{layout}.duckdb"
    rows, d = x.shape
    mb = x.nbytes / 1e6
    con = duckdb.connect(str(path))
    con.execute(_ddl(layout, d))
    t0 = time.perf_counter()
    for start in range(0, rows, chunk):
        piece = _table(layout, x[start : start + chunk], start)  # noqa: F841 - DuckDB replacement scan
        con.execute("INSERT INTO t SELECT * FROM piece")
    con.execute("CHECKPOINT")
    write_s = time.perf_counter() - t0
    con.close()
    size = path.stat().st_size
    con = duckdb.connect(str(path), read_only=True)
    cols = "x" if layout != "wide" else ", ".join(f"x{j}" for j in range(d))
    t0 = time.perf_counter()
    full = _to_numpy(layout, con.sql(f"SELECT {cols} FROM t ORDER BY tok_idx").to_arrow_table(), d)
    scan_s = time.perf_counter() - t0
    assert np.array_equal(full, x)
    rng = np.random.default_rng(1)
    times = []
    for lo in rng.integers(0, rows - 8192, 10):
        t0 = time.perf_counter()
        _to_numpy(
            layout,
            con.sql(
                f"SELECT {cols} FROM t WHERE tok_idx >= ? AND tok_idx < ?", params=[int(lo), int(lo) + 8192]
            ).to_arrow_table(),
            d,
        )
        times.append(time.perf_counter() - t0)
    con.close()
    return {
        "bytes_per_value": size / x.size,
        "write_mb_s": mb / write_s,
        "scan_mb_s": mb / scan_s,
        "range8k_mb_s": 8192 * d * 4 / 1e6 / statistics.median(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=384)
    args = parser.parse_args()
    x = _data(args.rows, args.d)
    print(f"{args.rows} rows x d={args.d} float32 ({x.nbytes / 1e6:.0f} MB), duckdb {duckdb.__version__}\n")
    print("| layout | bytes/value | write MB/s | full scan MB/s | 8k-row range read MB/s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for layout in ("array", "blob", "wide"):
            r = measure(layout, x, Path(tmp))
            print(
                f"| {layout} | {r['bytes_per_value']:.2f} | {r['write_mb_s']:.0f} | {r['scan_mb_s']:.0f} | {r['range8k_mb_s']:.0f} |"
            )


if __name__ == "__main__":
    main()
