"""SQL over the activation shard files: each hook of a harvest as a view named like its old table.

DuckDB cannot read raw arrays, and its Arrow import has no float16, so on a connection to the
workspace each hook of each shard-file harvest becomes a temporary view

    act__<harvest>__<hook>  (tok_idx BIGINT, x FLOAT[d])

over the harvest's `tokens` rows, with `x` computed by a vectorised Python function that reads the
rows of each DuckDB vector (about 2,048 tok_idx) from the shard files, memory-mapped, and widens them
to float32 with the reader's own `decode` (so the values are exactly the training stream's). The
view's rows come from `tokens`, so DuckDB's own pruning applies before any vector is read: a
`count(*)` reads no activation, `WHERE tok_idx BETWEEN a AND b` skips to the zone maps of
`tokens`, and a join with a filtered `tokens` reads only the joined rows. Memory stays one vector
of rows per thread whatever the cache size. Harvests made before the shard files keep their real
`act__...` tables, which SQL reads directly.

    with activation_sql(Workspace("ws.duckdb")) as con:
        con.sql("SELECT t.token_str, a.x[1] FROM act__default__blocks_0_hook_out a "
                "JOIN tokens t USING (tok_idx) WHERE t.harvest = 'default' LIMIT 5")
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from activations.store import (
    FILES_LAYOUT,
    RAW_DTYPE,
    HarvestError,
    ShardFiles,
    decode,
    harvest_info,
    harvest_names,
    quote_ident,
    shard_files,
)
from saewb.workspace import Workspace


class ShardRows:
    """Rows of one hook's shard files by tok_idx, each file memory-mapped on first use (no copy
    until a row is gathered)."""

    def __init__(self, shards: ShardFiles) -> None:
        self.shards = shards
        self._maps: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def _map(self, i: int) -> np.ndarray:
        if i not in self._maps:
            with self._lock:
                if i not in self._maps:
                    path = self.shards.folder / self.shards.files[i]
                    rows = int(self.shards.stops[i] - self.shards.starts[i])
                    try:
                        self._maps[i] = np.memmap(
                            path, dtype=RAW_DTYPE[self.shards.dtype], mode="r", shape=(rows, self.shards.d)
                        )
                    except FileNotFoundError as err:
                        raise HarvestError(
                            f"activation shard {path} is missing; a workspace's activations live in the folder "
                            f"beside it ({self.shards.folder.name}): copy or move it together with the .duckdb file"
                        ) from err
        return self._maps[i]

    def gather(self, tok_idx: np.ndarray) -> np.ndarray:
        """x[len(tok_idx), d] float32 of these rows, in the order given."""
        shards = self.shards
        raw = np.empty((len(tok_idx), shards.d), dtype=RAW_DTYPE[shards.dtype])
        which = np.searchsorted(shards.stops, tok_idx, side="right")
        if len(tok_idx) and (tok_idx.min() < 0 or which.max() >= len(shards.files)):
            raise HarvestError(f"tok_idx outside the committed rows 0..{int(shards.stops[-1]) - 1}")
        for i in np.unique(which):
            at = which == i
            raw[at] = self._map(int(i))[tok_idx[at] - shards.starts[i]]
        return decode(raw, shards.dtype)

    def arrow(self, tok_idx: pa.Array | pa.ChunkedArray) -> pa.FixedSizeListArray:
        """The DuckDB function: a vector of tok_idx -> its FLOAT[d] rows."""
        if isinstance(tok_idx, pa.ChunkedArray):
            tok_idx = tok_idx.combine_chunks()
        x = self.gather(tok_idx.to_numpy(zero_copy_only=False).astype(np.int64, copy=False))
        return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), type=pa.float32()), self.shards.d)


def register_activation_views(ws: Workspace, con: duckdb.DuckDBPyConnection) -> dict[str, tuple[str, str]]:
    """On `con` (a connection to `ws`), a temporary view `act__<harvest>__<hook>` (tok_idx BIGINT,
    x FLOAT[d]) for every hook of every shard-file harvest, over its committed rows as of now.
    Returns view name -> (harvest, hook)."""
    views: dict[str, tuple[str, str]] = {}
    if not ws.table_exists("act_shards"):
        return views
    for name in harvest_names(ws):
        info = harvest_info(ws, name)
        if info.layout != FILES_LAYOUT:
            continue  # its act__ tables are real DuckDB tables
        for hook, view in info.tables.items():
            rows = ShardRows(shard_files(ws, info, hook, con))
            n = int(rows.shards.stops[-1]) if len(rows.shards.files) else 0
            fn = f"saewb_rows_{len(views)}"
            con.create_function(
                fn,
                rows.arrow,
                ["BIGINT"],
                f"FLOAT[{int(info.hooks[hook])}]",
                type="arrow",
                side_effects=False,
            )
            # Literals, not parameters (a view cannot hold any): n is an int, the harvest name is
            # validated by check_name and quoted.
            harvest = "'" + name.replace("'", "''") + "'"
            con.execute(
                f"CREATE OR REPLACE TEMP VIEW {quote_ident(view)} AS SELECT tok_idx, {fn}(tok_idx) AS x "
                f"FROM main.tokens WHERE harvest = {harvest} AND tok_idx < {n}"
            )
            views[view] = (name, hook)
    return views


@contextmanager
def activation_sql(workspace: str | Path | Workspace) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short-lived read-only connection to a workspace with `register_activation_views` done:
    every hook's `act__<harvest>__<hook>` reachable from SQL, whatever its layout."""
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    with ws.read() as con:
        register_activation_views(ws, con)
        yield con
