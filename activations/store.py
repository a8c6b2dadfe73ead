"""The harvest tables of a workspace.

Layout (chosen by measurement, see docs/storage.md):

* `harvests`: one row per harvest with its full config and how far it got;
* `harvest_hooks`: the hooks of each harvest, their width and activation table;
* `documents`: (harvest, doc_id, source, text);
* `tokens`: (harvest, tok_idx, doc_id, pos, seq_id, seq_pos, token_id, token_str, is_special, role);
* one table per harvest and hook, `(tok_idx BIGINT, x FLOAT[d])`, rows in tok_idx order.

`tok_idx` numbers the tokens of a harvest from 0 without gaps; it joins activations to tokens.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from saewb.workspace import Workspace

INSERT_ROWS = 65_536
"""Rows per Arrow insert: DuckDB ingests FixedSizeList chunks of this size fastest."""
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS harvests (
    name VARCHAR PRIMARY KEY,
    config JSON NOT NULL,
    model VARCHAR NOT NULL,
    ctx_len INTEGER NOT NULL,
    status VARCHAR NOT NULL,
    n_windows BIGINT NOT NULL DEFAULT 0,
    n_tokens BIGINT NOT NULL DEFAULT 0,
    n_docs BIGINT NOT NULL DEFAULT 0,
    created_at TIMESTAMP DEFAULT current_timestamp,
    updated_at TIMESTAMP DEFAULT current_timestamp
);
CREATE TABLE IF NOT EXISTS harvest_hooks (
    harvest VARCHAR NOT NULL,
    hook VARCHAR NOT NULL,
    d INTEGER NOT NULL,
    table_name VARCHAR NOT NULL,
    PRIMARY KEY (harvest, hook)
);
CREATE TABLE IF NOT EXISTS documents (
    harvest VARCHAR NOT NULL,
    doc_id BIGINT NOT NULL,
    source VARCHAR,
    text VARCHAR
);
CREATE TABLE IF NOT EXISTS tokens (
    harvest VARCHAR NOT NULL,
    tok_idx BIGINT NOT NULL,
    doc_id BIGINT NOT NULL,
    pos INTEGER NOT NULL,
    seq_id BIGINT NOT NULL,
    seq_pos INTEGER NOT NULL,
    token_id INTEGER NOT NULL,
    token_str VARCHAR NOT NULL,
    is_special BOOLEAN NOT NULL,
    role VARCHAR
);
"""


class HarvestError(ValueError):
    """A harvest that does not exist, or a config that clashes with a stored one."""


@dataclass(frozen=True)
class HarvestInfo:
    """What a workspace knows about one harvest."""

    name: str
    config: dict[str, Any]
    status: str
    n_windows: int
    n_tokens: int
    n_docs: int
    hooks: dict[str, int]
    """Hook name -> activation width d."""
    tables: dict[str, str]
    """Hook name -> activation table."""


def check_name(name: str, what: str = "harvest name") -> str:
    if not _NAME_RE.match(name):
        raise HarvestError(
            f"{what} {name!r} is not allowed; use a letter then letters, digits, '_' or '-' (at most 64)"
        )
    return name


def quote_ident(name: str) -> str:
    """Quote a table name we built ourselves (names are validated, never raw user SQL)."""
    return '"' + name.replace('"', '""') + '"'


def activation_table(harvest: str, hook: str) -> str:
    return "act__" + re.sub(r"[^A-Za-z0-9_]", "_", f"{harvest}__{hook}")


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(SCHEMA)


def fixed_size_list(x: np.ndarray) -> pa.FixedSizeListArray:
    """A [rows, d] float32 matrix as an Arrow FixedSizeList column without copying row by row."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), type=pa.float32()), x.shape[1])


def insert_arrow(con: duckdb.DuckDBPyConnection, table: str, data: pa.Table) -> None:
    """Append an Arrow table in INSERT_ROWS slices (columns matched by position)."""
    for start in range(0, data.num_rows, INSERT_ROWS):
        piece = data.slice(start, INSERT_ROWS)  # noqa: F841 - read by DuckDB's replacement scan
        con.execute(f"INSERT INTO {quote_ident(table)} SELECT * FROM piece")


def harvest_names(ws: Workspace) -> list[str]:
    if not ws.table_exists("harvests"):
        return []
    with ws.read() as con:
        return [r[0] for r in con.execute("SELECT name FROM harvests ORDER BY created_at, name").fetchall()]


def default_harvest(ws: Workspace | str) -> str:
    """The only harvest of a workspace; an error that lists them when there are several or none."""
    ws = ws if isinstance(ws, Workspace) else Workspace(ws)
    names = harvest_names(ws)
    if len(names) == 1:
        return names[0]
    if not names:
        raise HarvestError(f"workspace {ws.path} has no harvest yet; run `saewb harvest --workspace {ws.path} ...`")
    raise HarvestError(f"workspace {ws.path} has several harvests ({', '.join(names)}); choose one with --harvest")


def harvest_info(ws: Workspace | str, harvest: str | None = None) -> HarvestInfo:
    ws = ws if isinstance(ws, Workspace) else Workspace(ws)
    name = harvest or default_harvest(ws)
    with ws.read() as con:
        row = con.execute(
            "SELECT config, status, n_windows, n_tokens, n_docs FROM harvests WHERE name = ?", [name]
        ).fetchone()
        if row is None:
            raise HarvestError(
                f"no harvest named {name!r} in {ws.path}; existing: {', '.join(harvest_names(ws)) or 'none'}"
            )
        hooks = con.execute(
            "SELECT hook, d, table_name FROM harvest_hooks WHERE harvest = ? ORDER BY hook", [name]
        ).fetchall()
    return HarvestInfo(
        name=name,
        config=json.loads(row[0]),
        status=row[1],
        n_windows=row[2],
        n_tokens=row[3],
        n_docs=row[4],
        hooks={h: d for h, d, _ in hooks},
        tables={h: t for h, _, t in hooks},
    )


def harvest_hooks(ws: Workspace | str, harvest: str | None = None) -> dict[str, int]:
    """Hook name -> width d of a harvest's stored activations."""
    return harvest_info(ws, harvest).hooks


def read_activations(
    ws: Workspace, table: str, start: int, stop: int, con: duckdb.DuckDBPyConnection | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(tok_idx, x[rows, d]) for start <= tok_idx < stop, in tok_idx order."""
    query = f"SELECT tok_idx, x FROM {quote_ident(table)} WHERE tok_idx >= ? AND tok_idx < ? ORDER BY tok_idx"
    if con is None:
        with ws.read() as own:
            result = own.sql(query, params=[start, stop]).to_arrow_table()
    else:
        result = con.sql(query, params=[start, stop]).to_arrow_table()
    return arrow_to_numpy(result)


def arrow_to_numpy(result: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    idx = result.column("tok_idx").to_numpy()
    col = result.column("x").combine_chunks()
    if len(col) == 0:
        return idx, np.zeros((0, 0), dtype=np.float32)
    d = col.type.list_size
    values = col.values.to_numpy(zero_copy_only=False)
    return idx, values.reshape(-1, d).astype(np.float32, copy=False)
