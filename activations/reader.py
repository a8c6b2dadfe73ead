"""The one reader of stored activations: rows of one hook, by `tok_idx` range, in `tok_idx` order.

Everything that reads activation rows goes through here: the training stream (activations/stream.py
reads shuffled buffers of chunks), the analysis (analysis/features.py reads every non-special token in
order, `ordered_batches`) and `read_activations` (every stored row of a range, for tests and tools).

A `HookReader` keeps the tokens of one harvest part that satisfy a condition on the `tokens` table;
the activation rows themselves are a plain range read (a join of the two is several times slower in
DuckDB). Tokens a `--nonfinite skip` harvest stored as zeros (`nonfinite_tokens`) can be left out
like special tokens; any other kept row holding NaN/inf is refused with `NonFiniteActivationsError`
naming the tokens, never silently dropped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import duckdb
import numpy as np

from activations.store import (
    FILES_LAYOUT,
    RAW_DTYPE,
    HarvestError,
    HarvestPart,
    NonFiniteActivationsError,
    ShardFiles,
    decode,
    harvest_info,
    nonfinite_any,
    quote_ident,
    row_bytes,
    shard_files,
    value_dtype,
)
from saewb.workspace import Workspace

ActsRef = tuple[str, str, list[Any]]
"""(FROM-clause text, the x column expression, its parameters) of a hook's activations."""


def read_files(
    shards: ShardFiles,
    lo: int,
    hi: int,
    keep: np.ndarray | None = None,
    out: np.ndarray | None = None,
    widen: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(tok_idx, x[rows, d]) of the rows lo <= tok_idx < hi of a hook's shard files (only those with
    `keep[tok_idx - lo]` when given): one positioned read per file touched, into `out` when given.
    `widen`: float32 (widened in one pass); else the store dtype's values as they are on disk
    (`value_dtype`), half the bytes to move for float16."""
    first = int(np.searchsorted(shards.stops, lo, side="right"))
    last = int(np.searchsorted(shards.starts, hi, side="left"))
    spans = [
        (
            shards.files[i],
            max(lo, int(shards.starts[i])),
            min(hi, int(shards.stops[i])),
            int(shards.starts[i]),
        )
        for i in range(first, last)
    ]
    n = sum(b - a for _, a, b, _ in spans)
    rows = (
        np.concatenate([np.arange(a, b, dtype=np.int64) for _, a, b, _ in spans])
        if spans
        else np.empty(0, np.int64)
    )
    mask = None if keep is None else keep[rows - lo]
    if mask is not None and mask.all():
        mask = None
    direct = not widen and out is not None and mask is None  # straight from the file into `out`
    raw = out[:n] if direct else np.empty((n, shards.d), dtype=value_dtype(shards.dtype))
    width = row_bytes(shards.d, shards.dtype)
    view = memoryview(raw.view(np.uint8)).cast("B")
    at = 0
    for file, a, b, start in spans:
        try:
            fd = os.open(shards.folder / file, os.O_RDONLY)
        except FileNotFoundError as err:
            raise HarvestError(
                f"activation shard {shards.folder / file} is missing; a workspace's activations live in the "
                f"folder beside it ({shards.folder.name}): copy or move it together with the .duckdb file"
            ) from err
        try:
            want = (b - a) * width
            got = os.preadv(fd, [view[at : at + want]], (a - start) * width)
        finally:
            os.close(fd)
        if got != want:
            raise OSError(f"shard file {shards.folder / file} is shorter than its catalogue row says")
        at += want
    if direct:
        return rows, raw
    if mask is not None:
        rows, raw = rows[mask], raw[mask]  # in the store dtype: half the bytes to move for float16
    if not widen:
        if out is None:
            return rows, raw
        out[: len(rows)] = raw
        return rows, out[: len(rows)]
    x = np.empty((len(rows), shards.d), dtype=np.float32) if out is None else out[: len(rows)]
    return rows, decode(raw.view(RAW_DTYPE[shards.dtype]), shards.dtype, out=x)


def read_range(
    con: duckdb.DuckDBPyConnection | None,
    acts: ActsRef | ShardFiles,
    lo: int,
    hi: int,
    keep: np.ndarray | None = None,
    out: np.ndarray | None = None,
    widen: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(tok_idx, x[rows, d] float32) of every stored row with lo <= tok_idx < hi (and
    `keep[tok_idx - lo]` when given), in tok_idx order; written into `out` when given. Shard files
    need no connection; `widen=False` leaves their values in the store dtype (tables are float32)."""
    if isinstance(acts, ShardFiles):
        return read_files(acts, lo, hi, keep, out, widen)
    if con is None:
        raise ValueError("reading a DuckDB table or Parquet file needs a connection")
    source, x_expr, params = acts
    result = con.sql(
        f"SELECT tok_idx, {x_expr} FROM {source} WHERE tok_idx >= ? AND tok_idx < ?", params=[*params, lo, hi]
    ).to_arrow_table()
    rows = result.column("tok_idx").to_numpy()
    col = result.column("x").combine_chunks()
    values = col.values.to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size)
    del result, col
    order = np.argsort(rows, kind="stable")  # scans are not ordered; sorting a chunk's ints is cheap
    if keep is not None:
        order = order[keep[rows[order] - lo]]
    rows, values = rows[order], values[order].astype(np.float32, copy=False)
    if out is not None:
        out[: len(rows)] = values
        values = out[: len(rows)]
    return rows, values


def read_activations(
    ws: Workspace, table: str, start: int, stop: int, con: duckdb.DuckDBPyConnection | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(tok_idx, x[rows, d] float32) of every stored row of a hook, start <= tok_idx < stop; `table`
    is the hook's `HarvestInfo.tables` entry (shard folder or DuckDB table)."""
    files = _table_files(ws, table)
    if files is not None:
        return read_files(files, start, stop)
    acts: ActsRef = (quote_ident(table), "x", [])
    if con is not None:
        return read_range(con, acts, start, stop)
    with ws.read() as own:
        return read_range(own, acts, start, stop)


def _table_files(ws: Workspace, table: str) -> ShardFiles | None:
    """The shard files behind a `HarvestInfo.tables` entry, or None for a DuckDB table."""
    with ws.read() as con:
        row = con.execute("SELECT harvest, hook FROM harvest_hooks WHERE table_name = ?", [table]).fetchone()
    if row is None:
        return None
    info = harvest_info(ws, row[0])
    return shard_files(ws, info, row[1]) if info.layout == FILES_LAYOUT else None


class HookReader:
    """The kept rows of one hook of one harvest part.

    `where` is an SQL condition on `tokens t` (with `params`) besides the harvest; `leave_out_skipped`
    also leaves out the tokens the harvest skipped as non-finite. `consequence` ends the refusal of a
    NaN/inf row ("they are not handed to a trainer").
    """

    def __init__(
        self,
        part: HarvestPart,
        hook: str,
        where: str = "TRUE",
        params: Sequence[Any] = (),
        *,
        leave_out_skipped: bool,
        consequence: str,
    ) -> None:
        self.part = part
        self.hook = hook
        self.d = int(part.info.hooks[hook])
        self.consequence = consequence
        self.where = f"t.harvest = ? AND {where}"
        self.params: list[Any] = [part.info.name, *params]
        skipped, s_params = self._skipped_clause() if leave_out_skipped else ("", [])
        self.where += skipped
        self.params += s_params
        self.acts = part.acts_ref(hook)
        """Where the rows are (a shard list is read here, outside any read connection)."""
        self._kept_bits: np.ndarray | None = None
        """Which committed tokens are kept, 1 bit each (`chunk_counts` reads it)."""

    def _skipped_clause(self) -> tuple[str, list[Any]]:
        part = self.part
        if part.ws is None:  # a Parquet export carries its skipped tokens in a file of its own
            if part.nonfinite_file is None:
                return "", []
            return (
                " AND NOT EXISTS (SELECT 1 FROM read_parquet(?) n WHERE n.hook = ? AND n.tok_idx = t.tok_idx)",
                [part.nonfinite_file, self.hook],
            )
        if not part.ws.table_exists("nonfinite_tokens"):
            return "", []
        with part.read() as con:
            found = con.execute(
                "SELECT 1 FROM nonfinite_tokens WHERE harvest = ? AND hook = ? LIMIT 1",
                [part.info.name, self.hook],
            ).fetchall()
        if not found:
            return "", []  # the common case: the query stays as it was
        return (
            " AND NOT EXISTS (SELECT 1 FROM nonfinite_tokens n WHERE n.harvest = t.harvest AND n.hook = ?"
            " AND n.tok_idx = t.tok_idx)"
        ), [self.hook]

    def chunk_counts(self, chunk_tokens: int, span_chunks: int = 128) -> np.ndarray:
        """Kept tokens per aligned chunk of `chunk_tokens` committed tokens. Reads which tokens are kept
        once, a span of chunks per query, into a bitmap (1 bit per token: 6 MB for 50M tokens) that
        `read` then uses instead of a query per chunk."""
        n_tokens = self.part.info.n_tokens
        counts = np.zeros(-(-n_tokens // chunk_tokens), dtype=np.int64)
        bits = np.zeros(-(-n_tokens // 8), dtype=np.uint8)
        span = chunk_tokens * span_chunks

        def fill(con: duckdb.DuckDBPyConnection) -> None:
            for lo in range(0, n_tokens, span):
                hi = min(lo + span, n_tokens)
                mask = self._kept(con, lo, hi)
                counts[lo // chunk_tokens : -(-hi // chunk_tokens)] = np.add.reduceat(
                    mask, np.arange(0, hi - lo, chunk_tokens), dtype=np.int64
                )
                bits[lo // 8 : -(-hi // 8)] = np.packbits(mask)

        self.part.read_consistent(fill)
        if chunk_tokens % 8 == 0:  # chunk reads start on a byte of the bitmap
            self._kept_bits = bits
        return counts

    def _kept(self, con: duckdb.DuckDBPyConnection, lo: int, hi: int) -> np.ndarray:
        """Which tokens lo <= tok_idx < hi this reader keeps, as a mask over them."""
        tokens, params = self.part.tokens_ref()
        kept = con.sql(
            f"SELECT t.tok_idx FROM {tokens} t WHERE {self.where} AND t.tok_idx >= ? AND t.tok_idx < ?",
            params=[*params, *self.params, lo, hi],
        ).to_arrow_table()
        mask = np.zeros(hi - lo, dtype=bool)
        mask[kept.column("tok_idx").to_numpy() - lo] = True
        return mask

    def count(self, stop: int) -> int:
        """Kept tokens with tok_idx < stop."""
        tokens, params = self.part.tokens_ref()
        with self.part.read() as con:
            found = con.execute(
                f"SELECT count(*) FROM {tokens} t WHERE {self.where} AND t.tok_idx < ?",
                [*params, *self.params, stop],
            ).fetchone()
        return int(found[0]) if found else 0

    @property
    def value_dtype(self) -> np.dtype:
        """What `read(widen=False)` hands out: the store dtype of shard files, float32 otherwise."""
        return value_dtype(self.acts.dtype) if isinstance(self.acts, ShardFiles) else np.dtype(np.float32)

    def needs_connection(self, chunk_tokens: int) -> bool:
        """Whether reading aligned chunks of this size queries DuckDB (shard files whose kept tokens
        are in the bitmap do not: no connection is opened for them)."""
        return not (
            isinstance(self.acts, ShardFiles) and self._kept_bits is not None and chunk_tokens % 8 == 0
        )

    def read(
        self,
        con: duckdb.DuckDBPyConnection | None,
        lo: int,
        hi: int,
        out: np.ndarray | None = None,
        widen: bool = True,
        check: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(tok_idx, x) of the kept rows with lo <= tok_idx < hi, in tok_idx order (x written into
        `out` when given; float32, or with `widen=False` in `value_dtype`); NaN/inf refused (unless
        `check=False`: the caller runs `refuse_nonfinite` itself, e.g. on another thread)."""
        if self._kept_bits is not None and lo % 8 == 0:
            keep = np.unpackbits(self._kept_bits[lo // 8 : -(-hi // 8)], count=hi - lo).view(bool)
        elif con is None:
            raise ValueError("this read needs a connection (see needs_connection)")
        else:
            keep = self._kept(con, lo, hi)
        rows, values = read_range(con, self.acts, lo, hi, keep, out, widen)
        if check:
            self.refuse_nonfinite(rows, values)
        return rows, values

    def refuse_nonfinite(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Raise `NonFiniteActivationsError` naming the tokens if a row read (kept rows only: skipped
        and special tokens may hold anything) holds a NaN or an infinity."""
        bad = nonfinite_any(values)
        if len(bad):
            raise NonFiniteActivationsError(
                f"hook {self.hook!r} of {self.part.location} holds {len(bad)} NaN/inf activation rows (tok_idx "
                f"{', '.join(map(str, rows[bad][:5].tolist()))}{', ...' if len(bad) > 5 else ''}); "
                f"{self.consequence}. `saewb harvest` checks every batch, so these came from elsewhere: harvest "
                "again (with --nonfinite skip to leave such rows out)"
            )


def ordered_batches(
    reader: HookReader,
    n_committed: int,
    batch_size: int,
    chunk_tokens: int,
    max_tokens: int | None = None,
    memory_limit: str | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tok_idx, x) of the kept rows below `n_committed` in tok_idx order, in batches of exactly
    `batch_size` (the last may be short), at most `max_tokens` rows. One short read connection per chunk."""
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    have = 0
    seen = 0
    for lo in range(0, n_committed, chunk_tokens):
        with reader.part.read(memory_limit=memory_limit) as con:
            idx, x = reader.read(con, lo, min(lo + chunk_tokens, n_committed))
        if not len(idx):
            continue
        if max_tokens is not None and seen + len(idx) > max_tokens:
            idx, x = idx[: max_tokens - seen], x[: max_tokens - seen]
        seen += len(idx)
        parts.append((idx, x))
        have += len(idx)
        while have >= batch_size:
            cat_i = np.concatenate([p[0] for p in parts])
            cat_x = np.concatenate([p[1] for p in parts])
            yield cat_i[:batch_size], cat_x[:batch_size]
            parts = [(cat_i[batch_size:], cat_x[batch_size:])]
            have = len(cat_i) - batch_size
        if max_tokens is not None and seen >= max_tokens:
            break
    if have:
        yield np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
