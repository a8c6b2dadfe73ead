"""The harvest tables of a workspace, and their one owner: every write and read of them is here
(activation rows are read through activations/reader.py).

Layout (chosen by measurement, see docs/storage.md):

* `harvests`: one row per harvest with its full config and how far it got;
* `harvest_hooks`: the hooks of each harvest, their width and activation table;
* `documents`: (harvest, doc_id, source, text);
* `tokens`: (harvest, tok_idx, doc_id, pos, seq_id, seq_pos, token_id, token_str, is_special, role);
* activations, per harvest and hook, as raw array shard files beside the workspace
  (`<workspace>.acts/<table>/<start>.bin`, rows start..stop-1 in tok_idx order, in the harvest's
  store dtype: float16, bfloat16 or float32), listed in `act_shards` (harvest, hook, start, stop,
  file) in the transaction that commits their tokens. DuckDB stays the catalogue; the arrays go to
  the disk at its own speed (docs/storage.md). Harvests made before this layout keep their
  activations in one DuckDB table per hook, `(tok_idx BIGINT, x FLOAT[d])`, and are still read and
  resumed as they are (`HarvestInfo.layout == "table"`);
* `nonfinite_tokens`: (harvest, hook, tok_idx, doc_id) of the activation rows a harvest run with
  `--nonfinite skip` found NaN/inf and stored as zeros; the training stream leaves these tokens out.

`tok_idx` numbers the tokens of a harvest from 0 without gaps; it joins activations to tokens.

A harvest can also be read from its Parquet export (`export_parquet`, `saewb export-parquet`), and
a *set* of harvests (shards in several workspaces, exports) through `open_parts`: each is a
`HarvestPart` that knows how to open a short-lived connection and name its tables in SQL.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import numpy as np
import pyarrow as pa

from saewb.workspace import Workspace

T = TypeVar("T")

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
CREATE TABLE IF NOT EXISTS act_shards (
    harvest VARCHAR NOT NULL,
    hook VARCHAR NOT NULL,
    start BIGINT NOT NULL,
    stop BIGINT NOT NULL,
    file VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS nonfinite_tokens (
    harvest VARCHAR NOT NULL,
    hook VARCHAR NOT NULL,
    tok_idx BIGINT NOT NULL,
    doc_id BIGINT NOT NULL
);
"""


TOKEN_COLUMNS = (
    "harvest",
    "tok_idx",
    "doc_id",
    "pos",
    "seq_id",
    "seq_pos",
    "token_id",
    "token_str",
    "is_special",
    "role",
)


class HarvestError(ValueError):
    """A harvest that does not exist, or a config that clashes with a stored one."""


class NonFiniteActivationsError(HarvestError):
    """Activations that are NaN or infinite, found by the harvest or by the training stream."""


def nonfinite_rows(x: np.ndarray) -> np.ndarray:
    """Indices of the rows of a [rows, d] matrix holding a NaN or an infinity. A row sum is NaN or
    infinite whenever the row holds one (or overflows): one cheap pass, then an exact look at those."""
    suspect = np.flatnonzero(~np.isfinite(x.sum(axis=1)))
    return suspect[~np.isfinite(x[suspect]).all(axis=1)]


_NONFINITE_BITS = {
    "float16": (np.uint16, 0x7FFF, 0x7C00),
    "bfloat16": (np.uint16, 0x7FFF, 0x7F80),
    "float32": (np.uint32, 0x7FFFFFFF, 0x7F800000),
}
"""Store dtype -> (its bits as an unsigned int, the mask without the sign, the smallest NaN/inf)."""
_CHECK_ROWS = 512


def nonfinite_stored_rows(raw: np.ndarray, dtype: str) -> np.ndarray:
    """`nonfinite_rows` on values in a store dtype, read off their bits (every exponent bit set: NaN or
    infinity) without widening them; in blocks of rows whose scratch stays in the CPU cache."""
    uint, magnitude, infinity = _NONFINITE_BITS[dtype]
    bits = np.ascontiguousarray(raw).view(uint)
    scratch = np.empty((min(_CHECK_ROWS, len(bits)), bits.shape[1]), dtype=uint)
    found = []
    for a in range(0, len(bits), _CHECK_ROWS):
        block = np.bitwise_and(bits[a : a + _CHECK_ROWS], magnitude, out=scratch[: len(bits) - a])
        largest = block.max(axis=1)
        if largest.max() >= infinity:
            found.append(a + np.flatnonzero(largest >= infinity))
    return np.concatenate(found) if found else np.empty(0, dtype=np.int64)


def nonfinite_any(x: np.ndarray) -> np.ndarray:
    """`nonfinite_rows` of float32 rows or of half-precision ones as stored (float16, bfloat16)."""
    return nonfinite_rows(x) if x.dtype == np.float32 else nonfinite_stored_rows(x, x.dtype.name)


def nonfinite_counts(ws: Workspace, harvest: str) -> dict[str, int]:
    """Hook -> how many of the harvest's tokens were found non-finite and skipped there."""
    if not ws.table_exists("nonfinite_tokens"):
        return {}
    with ws.read() as con:
        rows = con.execute(
            "SELECT hook, count(*) FROM nonfinite_tokens WHERE harvest = ? GROUP BY hook ORDER BY hook",
            [harvest],
        ).fetchall()
    return {h: int(n) for h, n in rows}


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
    model: str | None = None
    """The model it was harvested from, as given to `saewb harvest`."""
    layout: str = "table"
    """Where its activations live: "files" (raw shards beside the workspace) or "table" (DuckDB
    `FLOAT[d]` tables, the layout of harvests made before the shard files)."""
    store_dtype: str = "float32"
    """How its activations are stored on disk; they are always read back as float32."""


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


STORE_DTYPES = ("float16", "bfloat16", "float32")
"""How a harvest may store activations on disk (`saewb harvest --store-dtype`)."""
DEFAULT_STORE_DTYPE = "float16"
"""Half the bytes of float32; training on it costs under 0.001 held-out FVU (docs/storage.md)."""
RAW_DTYPE = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}
"""The numpy dtype of a shard file's values (bfloat16 as its 16 bits: numpy has no bfloat16)."""
FILES_LAYOUT = "files"


def value_dtype(dtype: str) -> np.dtype:
    """The numpy dtype a store dtype's values are handed out in without widening (bfloat16 as
    ml_dtypes' bfloat16, which JAX takes as is)."""
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(RAW_DTYPE[dtype])


def _layout_fields(config: dict[str, Any]) -> dict[str, str]:
    """A harvest's layout and store dtype from its config (older harvests: DuckDB tables, float32)."""
    return {
        "layout": config.get("layout", "table"),
        "store_dtype": config.get("identity", {}).get("dtype", "float32"),
    }


def check_store_dtype(dtype: str) -> str:
    if dtype not in STORE_DTYPES:
        raise HarvestError(f"--store-dtype {dtype!r} is not supported; use one of {', '.join(STORE_DTYPES)}")
    return dtype


def row_bytes(d: int, dtype: str) -> int:
    return d * np.dtype(RAW_DTYPE[dtype]).itemsize


def encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """Float32 [rows, d] -> the stored values, rounded to nearest even (bfloat16 as its 16 bits).
    torch converts with the CPU's vector instructions (F16C), about 6x numpy's float16 cast here, and
    a harvest has it loaded for the model anyway."""
    if dtype == "float32":
        return np.ascontiguousarray(x, dtype=np.float32)
    import torch

    out = np.empty(x.shape, dtype=RAW_DTYPE[dtype])
    target = torch.from_numpy(out.view(np.int16) if dtype == "bfloat16" else out)
    if dtype == "bfloat16":
        target = target.view(torch.bfloat16)
    target.copy_(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))  # past float16's range: inf
    return out


_DECODE_ROWS = 4096
"""Rows per piece when widening in parallel (numpy releases the GIL while it converts)."""


def decode(raw: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Stored values -> float32 (into `out` when given); large arrays in pieces on every core."""
    if out is not None and len(raw) >= 2 * _DECODE_ROWS and (os.cpu_count() or 1) > 1:
        pieces = range(0, len(raw), _DECODE_ROWS)
        list(
            _pool().map(
                lambda a: _decode(raw[a : a + _DECODE_ROWS], dtype, out[a : a + _DECODE_ROWS]), pieces
            )
        )
        return out
    return _decode(raw, dtype, out)


_POOL: list[Any] = []


def _pool() -> Any:
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=os.cpu_count(), thread_name_prefix="saewb-decode"))
    return _POOL[0]


def _decode(raw: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    if dtype == "bfloat16":
        wide = raw.astype(np.uint32) << 16
        values = wide.view(np.float32)
        if out is None:
            return values
        out[...] = values
        return out
    if out is None:
        return raw.astype(np.float32, copy=False)
    out[...] = raw
    return out


def acts_dir(ws: Workspace) -> Path:
    """The folder beside a workspace that holds its activation shard files."""
    return ws.path.with_suffix(".acts")


def shard_folder(ws: Workspace, info: HarvestInfo) -> Path:
    """Where a harvest's shard files are read from: the folder beside the workspace (moved or copied
    with it), else the one it was harvested into (the workspace file was copied alone: the copy
    reads the original's files, which are never modified)."""
    beside = acts_dir(ws)
    recorded = Path(info.config.get("acts_dir", beside))
    return beside if beside.is_dir() or not recorded.is_dir() else recorded


def write_shard(ws: Workspace, table: str, start: int, parts: Sequence[np.ndarray]) -> str:
    """Write one shard file, its rows from `parts` one after the other, durably (temporary name,
    fsync, rename, fsync of the folder); returns its name relative to `acts_dir`. A file whose commit never happened is an orphan that no reader looks
    at, replaced when the resumed harvest writes the same rows again."""
    folder = acts_dir(ws) / table
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{start:012d}.bin"
    tmp = folder / (name + ".tmp")
    with open(tmp, "wb") as f:
        for raw in parts:
            f.write(memoryview(np.ascontiguousarray(raw)).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(folder / name)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return f"{table}/{name}"


def remove_orphan_shards(ws: Workspace, info: HarvestInfo) -> None:
    """Delete shard files of a harvest that no commit lists (left by a killed harvest)."""
    if info.layout != FILES_LAYOUT or not ws.table_exists("act_shards"):
        return
    with ws.read() as con:
        listed = {
            r[0] for r in con.execute("SELECT file FROM act_shards WHERE harvest = ?", [info.name]).fetchall()
        }
    for table in info.tables.values():
        folder = acts_dir(ws) / table
        if folder.is_dir():
            for path in folder.iterdir():
                if f"{table}/{path.name}" not in listed:
                    path.unlink()


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


HARVEST_SUMMARY = ("name", "model", "ctx_len", "status", "n_tokens", "n_docs", "updated_at")


def list_harvests(ws: Workspace) -> list[dict[str, Any]]:
    """Every harvest's summary row (`HARVEST_SUMMARY`), oldest first."""
    if not ws.table_exists("harvests"):
        return []
    with ws.read() as con:
        rows = con.execute(
            f"SELECT {', '.join(HARVEST_SUMMARY)} FROM harvests ORDER BY created_at"
        ).fetchall()
    return [dict(zip(HARVEST_SUMMARY, r, strict=True)) for r in rows]


def default_harvest(ws: Workspace | str) -> str:
    """The only harvest of a workspace; an error that lists them when there are several or none."""
    ws = ws if isinstance(ws, Workspace) else Workspace(ws)
    names = harvest_names(ws)
    if len(names) == 1:
        return names[0]
    if not names:
        raise HarvestError(
            f"workspace {ws.path} has no harvest yet; run `saewb harvest --workspace {ws.path} ...`"
        )
    raise HarvestError(
        f"workspace {ws.path} has several harvests ({', '.join(names)}); choose one with --harvest"
    )


def harvest_info(ws: Workspace | str, harvest: str | None = None) -> HarvestInfo:
    ws = ws if isinstance(ws, Workspace) else Workspace(ws)
    name = harvest or default_harvest(ws)
    with ws.read() as con:
        row = con.execute(
            "SELECT config, status, n_windows, n_tokens, n_docs, model FROM harvests WHERE name = ?", [name]
        ).fetchone()
        if row is None:
            raise HarvestError(
                f"no harvest named {name!r} in {ws.path}; existing: {', '.join(harvest_names(ws)) or 'none'}"
            )
        hooks = con.execute(
            "SELECT hook, d, table_name FROM harvest_hooks WHERE harvest = ? ORDER BY hook", [name]
        ).fetchall()
    config = json.loads(row[0])
    return HarvestInfo(
        name=name,
        config=config,
        status=row[1],
        n_windows=row[2],
        n_tokens=row[3],
        n_docs=row[4],
        hooks={h: d for h, d, _ in hooks},
        tables={h: t for h, _, t in hooks},
        model=row[5],
        **_layout_fields(config),
    )


def token_rows(
    ws: Workspace,
    harvest: str,
    tok_idx: Sequence[int],
    columns: Sequence[str],
    con: duckdb.DuckDBPyConnection | None = None,
) -> pa.Table:
    """These columns of the harvest's `tokens` rows with these tok_idx, in no particular order (over
    the caller's connection when given). An explicit list of ids, bounded by its min and max for the
    zone maps: a range join is an order of magnitude slower on large caches."""
    unknown = set(columns) - set(TOKEN_COLUMNS)
    if unknown:
        raise ValueError(
            f"tokens has no column {', '.join(sorted(unknown))}; it has {', '.join(TOKEN_COLUMNS)}"
        )
    ids = [int(i) for i in tok_idx]
    if not ids:
        ids = [-1]  # matches nothing; keeps the query's shape
    query = (
        f"SELECT {', '.join(columns)} FROM tokens WHERE harvest = ? AND tok_idx BETWEEN ? AND ? "
        "AND tok_idx IN (SELECT unnest(?::BIGINT[]))"
    )
    params = [harvest, min(ids), max(ids), ids]
    if con is not None:
        return con.sql(query, params=params).to_arrow_table()
    with ws.read() as own:
        return own.sql(query, params=params).to_arrow_table()


def window_tokens(
    ws: Workspace, harvest: str, where: str, params: Sequence[Any], max_seqs: int | None
) -> pa.Table:
    """seq_id, seq_pos, token_id, is_special, doc_id of every token of the first `max_seqs` windows (by
    seq_id; all with None) that hold a token satisfying `where` (an SQL condition on `tokens t`, with
    `params`), in (seq_id, seq_pos) order; no rows when none does."""
    with ws.read() as con:
        seqs = [
            r[0]
            for r in con.execute(
                f"SELECT DISTINCT t.seq_id FROM tokens t WHERE t.harvest = ? AND {where} ORDER BY 1 LIMIT ?",
                [harvest, *params, max_seqs if max_seqs else 2**62],
            ).fetchall()
        ]
        return con.sql(
            "SELECT seq_id, seq_pos, token_id, is_special, doc_id FROM tokens WHERE harvest = ? AND seq_id IN "
            "(SELECT unnest(?::BIGINT[])) ORDER BY seq_id, seq_pos",
            params=[harvest, seqs],
        ).to_arrow_table()


def document_sources(ws: Workspace, harvest: str, doc_ids: list[int]) -> dict[int, str]:
    """doc_id → the document's source (file and line for `python-code`), where the harvest recorded one."""
    if not ws.table_exists("documents"):
        return {}
    with ws.read() as con:
        rows = con.execute(
            "SELECT doc_id, source FROM documents WHERE harvest = ? AND doc_id IN (SELECT unnest(?::BIGINT[]))",
            [harvest, doc_ids],
        ).fetchall()
    return {int(d): str(src) for d, src in rows if src is not None}


WORD_MARKERS = ("Ġ", "▁", "##")
"""Tokenizers' word-start markers (GPT-2/Llama BPE, SentencePiece, WordPiece)."""


def normalise_token(s: str) -> str:
    """A token string as searches match it: case, surrounding spaces and a word marker ignored."""
    s = s.strip()
    for p in WORD_MARKERS:
        if s.startswith(p):
            s = s[len(p) :]
    return s.strip().lower()


def tokens_matching(ws: Workspace, harvest: str, tok_idx: Sequence[int], text: str) -> dict[int, str]:
    """tok_idx → token string of those of these tokens whose string matches `text` (both as
    `normalise_token` makes them)."""
    ids = [int(i) for i in tok_idx] or [-1]
    markers = "|".join(WORD_MARKERS)
    with ws.read() as con:
        rows = con.execute(
            "SELECT tok_idx, token_str FROM tokens WHERE harvest = ? AND tok_idx BETWEEN ? AND ? "
            "AND tok_idx IN (SELECT unnest(?::BIGINT[])) "
            f"AND lower(trim(regexp_replace(token_str, '^({markers})', ''))) = ?",
            [harvest, min(ids), max(ids), ids, normalise_token(text)],
        ).fetchall()
    return dict(rows)


def register_harvest(
    ws: Workspace, name: str, config: dict[str, Any], model: str, ctx_len: int, widths: dict[str, int]
) -> HarvestInfo:
    """Create harvest `name` (its row and hooks), or check that the stored one has the same identity
    (`config["identity"]`): a harvest resumes only with the config it was made with. An identity
    `dtype` of None means the stored one when resuming, else `DEFAULT_STORE_DTYPE`. New harvests
    store their activations as shard files; a harvest made before them resumes in its DuckDB tables."""
    identity = config["identity"]
    with ws.write() as con:
        ensure_schema(con)
        row = con.execute("SELECT config FROM harvests WHERE name = ?", [name]).fetchone()
        if row is not None:
            stored = json.loads(row[0])["identity"]
            if identity.get("dtype") is None:
                identity["dtype"] = stored.get("dtype", "float32")
            diffs = {k: (stored.get(k), v) for k, v in identity.items() if stored.get(k) != v}
            if diffs:
                detail = "; ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in diffs.items())
                raise HarvestError(
                    f"harvest {name!r} in {ws.path} was made with a different config ({detail}). "
                    "Run the original command to resume it, or pick a new --name for this config."
                )
        else:
            if identity.get("dtype") is None:
                identity["dtype"] = DEFAULT_STORE_DTYPE
            check_store_dtype(identity["dtype"])
            config["layout"] = FILES_LAYOUT
            config["acts_dir"] = str(acts_dir(ws).resolve())
            con.execute(
                "INSERT INTO harvests (name, config, model, ctx_len, status) VALUES (?, ?, ?, ?, 'running')",
                [name, json.dumps(config), model, ctx_len],
            )
            for hook, d in widths.items():
                con.execute(
                    "INSERT INTO harvest_hooks (harvest, hook, d, table_name) VALUES (?, ?, ?, ?)",
                    [name, hook, int(d), activation_table(name, hook)],
                )
    info = harvest_info(ws, name)
    if info.layout == FILES_LAYOUT and info.n_tokens and shard_folder(ws, info) != acts_dir(ws):
        raise HarvestError(
            f"harvest {name!r} of {ws.path} keeps its activations in {shard_folder(ws, info)} (the workspace file "
            f"was copied without them); copy that folder to {acts_dir(ws)} to resume it here"
        )
    remove_orphan_shards(ws, info)
    return info


def commit_rows(
    ws: Workspace,
    info: HarvestInfo,
    documents: pa.Table | None,
    tokens: pa.Table,
    nonfinite: list[pa.Table],
    acts: dict[str, np.ndarray | Sequence[np.ndarray]],
    start: int,
    totals: tuple[int, int, int],
    files: Future[list[str]] | None = None,
) -> None:
    """One harvest commit: the activation rows of each hook (`encode`d in the store dtype, tok_idx
    `start`.. in order: an array, or consecutive parts) as shard files, and in one transaction the new documents, tokens, skipped
    non-finite tokens, the shards' catalogue rows and the harvest's totals (n_windows, n_tokens,
    n_docs). The files are written on a thread while DuckDB takes the rows (the disk and the CPU at
    once; `files`: their writing started earlier by `write_shards`); the transaction commits only
    once they are durable, so a kill leaves at most orphan files, never a listed gap."""
    acts = {hook: [parts] if isinstance(parts, np.ndarray) else parts for hook, parts in acts.items()}
    if info.layout == FILES_LAYOUT and files is None:
        files = write_shards(ws, info, start, acts)
    # One DuckDB thread: its appends are small, and the harvest's producer and file writer are busy
    # beside it (with DuckDB's default of one thread per core, 1M float16 rows took 23 % longer here).
    with ws.write(threads=1) as con:
        if documents is not None:
            insert_arrow(con, "documents", documents)
        insert_arrow(con, "tokens", tokens)
        for bad in nonfinite:
            insert_arrow(con, "nonfinite_tokens", bad)
        if files is not None:
            shards = [
                [info.name, hook, start, start + sum(len(p) for p in parts), file]
                for (hook, parts), file in zip(acts.items(), files.result(), strict=True)
            ]
            con.executemany("INSERT INTO act_shards VALUES (?, ?, ?, ?, ?)", shards)
        elif info.layout != FILES_LAYOUT:  # a harvest made before the shard files resumes in its tables
            for hook, parts in acts.items():
                x = np.concatenate(parts)
                rows = pa.table({"tok_idx": np.arange(start, start + len(x)), "x": fixed_size_list(x)})
                insert_arrow(con, info.tables[hook], rows)
        con.execute(
            "UPDATE harvests SET n_windows = ?, n_tokens = ?, n_docs = ?, updated_at = current_timestamp WHERE name = ?",
            [*totals, info.name],
        )


def write_shards(
    ws: Workspace, info: HarvestInfo, start: int, acts: dict[str, Sequence[np.ndarray]]
) -> Future[list[str]]:
    """Start writing one commit's shard files (`write_shard`, a file per hook) on the one shard-writer
    thread, in the order asked; the future gives their names."""
    return _shard_writer().submit(
        lambda: [write_shard(ws, info.tables[hook], start, parts) for hook, parts in acts.items()]
    )


_SHARD_WRITER: list[ThreadPoolExecutor] = []


def _shard_writer() -> ThreadPoolExecutor:
    if not _SHARD_WRITER:
        _SHARD_WRITER.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="saewb-shard-writer"))
    return _SHARD_WRITER[0]


def mark_complete(ws: Workspace, name: str) -> None:
    """The harvest has read its whole corpus."""
    with ws.write() as con:
        con.execute(
            "UPDATE harvests SET status = 'complete', updated_at = current_timestamp WHERE name = ?", [name]
        )


def harvest_hooks(ws: Workspace | str, harvest: str | None = None) -> dict[str, int]:
    """Hook name -> width d of a harvest's stored activations."""
    return harvest_info(ws, harvest).hooks


PARQUET_MANIFEST = "harvest.json"
"""The file that marks a directory as a complete Parquet export and describes it."""
PARQUET_FORMAT = 1
PARQUET_ACT_ROW_GROUP = 16_384
"""Rows per row group of an activation file: tok_idx range reads skip other groups by their stats."""


def export_parquet(
    workspace: str | Path | Workspace, out_dir: str | Path, harvest: str | None = None
) -> dict[str, Any]:
    """Write one harvest's tokens, documents and activations as Parquet files plus `harvest.json`.

    DuckDB COPY writes each table ordered by `tok_idx` / `doc_id`. Parquet has no fixed-size list
    type, so `x` is stored as a LIST of exactly d floats, with d in the manifest and in each activation
    file's key-value metadata (`saewb.d`); readers cast it back with `x::FLOAT[d]`. Only the committed
    prefix of a running harvest is exported (its status is recorded). The manifest is written last:
    a directory without it is an interrupted export.
    """
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    info = harvest_info(ws, harvest)
    out = Path(out_dir)
    if (out / PARQUET_MANIFEST).exists():
        raise HarvestError(
            f"{out} already holds an export ({PARQUET_MANIFEST}); choose a new or empty directory"
        )
    out.mkdir(parents=True, exist_ok=True)
    n = info.n_tokens
    hooks: dict[str, dict[str, Any]] = {}
    with ws.read() as con:
        con.execute(
            "COPY (SELECT * FROM tokens WHERE harvest = ? AND tok_idx < ? ORDER BY tok_idx) TO ? (FORMAT parquet)",
            [info.name, n, str(out / "tokens.parquet")],
        )
        con.execute(
            "COPY (SELECT * FROM documents WHERE harvest = ? ORDER BY doc_id) TO ? (FORMAT parquet)",
            [info.name, str(out / "documents.parquet")],
        )
        for hook, table in info.tables.items():
            d = int(info.hooks[hook])  # an int from our own schema, safe to format into the option
            fname = f"act__{re.sub(r'[^A-Za-z0-9_]', '_', hook)}.parquet"
            if info.layout == FILES_LAYOUT:
                _export_shards(shard_files(ws, info, hook, con), n, out / fname)
            else:
                con.execute(
                    f"COPY (SELECT tok_idx, x FROM {quote_ident(table)} WHERE tok_idx < ? ORDER BY tok_idx) TO ? "
                    f"(FORMAT parquet, ROW_GROUP_SIZE {PARQUET_ACT_ROW_GROUP}, KV_METADATA {{'saewb.d': '{d}'}})",
                    [n, str(out / fname)],
                )
            hooks[hook] = {"d": d, "file": fname}
        skipped = (
            con.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_name = 'nonfinite_tokens'"
            ).fetchone()[0]
            and con.execute(
                "SELECT count(*) FROM nonfinite_tokens WHERE harvest = ? AND tok_idx < ?", [info.name, n]
            ).fetchone()[0]
        )
        if skipped:  # the rows a --nonfinite skip harvest stored as zeros travel with the export
            con.execute(
                "COPY (SELECT * FROM nonfinite_tokens WHERE harvest = ? AND tok_idx < ? ORDER BY hook, tok_idx) "
                "TO ? (FORMAT parquet)",
                [info.name, n, str(out / "nonfinite_tokens.parquet")],
            )
    manifest = {
        "format": PARQUET_FORMAT,
        "name": info.name,
        "config": info.config,
        "status": info.status,
        "n_windows": info.n_windows,
        "n_tokens": n,
        "n_docs": info.n_docs,
        "tokens": "tokens.parquet",
        "documents": "documents.parquet",
        "hooks": hooks,
        **({"nonfinite_tokens": "nonfinite_tokens.parquet"} if skipped else {}),
    }
    tmp = out / (PARQUET_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out / PARQUET_MANIFEST)
    return manifest


def _export_shards(shards: ShardFiles, n_tokens: int, path: Path) -> None:
    """A hook's shard files as one Parquet file shaped like the COPY of a `FLOAT[d]` table."""
    import pyarrow.parquet as pq

    from activations.reader import read_files

    schema = pa.schema(
        [("tok_idx", pa.int64()), ("x", pa.list_(pa.float32()))], metadata={"saewb.d": str(shards.d)}
    )
    with pq.ParquetWriter(path, schema) as writer:
        for lo in range(0, n_tokens, PARQUET_ACT_ROW_GROUP):
            idx, x = read_files(shards, lo, min(lo + PARQUET_ACT_ROW_GROUP, n_tokens))
            col = pa.ListArray.from_arrays(
                pa.array(np.arange(0, x.size + 1, shards.d, dtype=np.int32)), pa.array(x.reshape(-1))
            )
            writer.write_table(pa.table({"tok_idx": idx, "x": col}, schema=schema))


def is_parquet_source(source: str | Path | Workspace) -> bool:
    """A Parquet export: a local directory, or a URL (s3://, gs://, https://...) DuckDB reads remotely."""
    if isinstance(source, Workspace):
        return False
    text = str(source)
    return "://" in text or Path(text).is_dir()


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name if "://" in base else str(Path(base) / name)


def _read_manifest(location: str) -> dict[str, Any]:
    path = _join(location, PARQUET_MANIFEST)
    try:
        if "://" in location:
            with duckdb.connect(":memory:") as con:  # httpfs loads itself for remote URLs
                text = con.execute("SELECT content FROM read_text(?)", [path]).fetchone()[0]
        else:
            text = Path(path).read_text()
    except (OSError, duckdb.Error) as err:
        raise HarvestError(
            f"{location} is not a Parquet export of a harvest (no readable {PARQUET_MANIFEST}: {err}); "
            "make one with `saewb export-parquet WORKSPACE OUT_DIR`"
        ) from err
    manifest = json.loads(text)
    if manifest.get("format") != PARQUET_FORMAT:
        raise HarvestError(f"{path}: unsupported export format {manifest.get('format')!r}")
    return manifest


@dataclass(frozen=True)
class ShardFiles:
    """The committed shard files of one hook: file i holds rows starts[i]..stops[i]-1, in order."""

    folder: Path
    """`acts_dir` of the workspace; `files` are relative to it."""
    starts: np.ndarray
    stops: np.ndarray
    files: list[str]
    d: int
    dtype: str


def shard_files(
    ws: Workspace, info: HarvestInfo, hook: str, con: duckdb.DuckDBPyConnection | None = None
) -> ShardFiles:
    """The shard files a hook's committed rows live in (over the caller's connection when given)."""
    query = "SELECT start, stop, file FROM act_shards WHERE harvest = ? AND hook = ? ORDER BY start"
    if con is None:
        with ws.read() as own:
            rows = own.execute(query, [info.name, hook]).fetchall()
    else:
        rows = con.execute(query, [info.name, hook]).fetchall()
    return ShardFiles(
        folder=shard_folder(ws, info),
        starts=np.array([r[0] for r in rows], dtype=np.int64),
        stops=np.array([r[1] for r in rows], dtype=np.int64),
        files=[r[2] for r in rows],
        d=int(info.hooks[hook]),
        dtype=info.store_dtype,
    )


@dataclass(frozen=True)
class HarvestPart:
    """One harvest as the readers see it: in a workspace, or in a Parquet export."""

    location: str
    info: HarvestInfo
    """For an export, `tables` maps each hook to its Parquet file."""
    ws: Workspace | None
    """The workspace; None for a Parquet export."""
    tokens_file: str | None = None
    nonfinite_file: str | None = None
    """An export's `nonfinite_tokens` rows (None: the harvest skipped none)."""
    shards: dict[str, ShardFiles] = field(default_factory=dict, compare=False, repr=False)
    """Hook -> its shard files, read on first use (a snapshot, like `info`)."""

    @property
    def parquet(self) -> bool:
        return self.ws is None

    @property
    def shard(self) -> tuple[int, int] | None:
        value = self.info.config.get("identity", {}).get("shard")
        return (int(value[0]), int(value[1])) if value else None

    @contextmanager
    def read(self, memory_limit: str | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived read-only connection (an in-memory one for an export)."""
        if self.ws is not None:
            with self.ws.read(memory_limit=memory_limit) as con:
                yield con
            return
        con = duckdb.connect(":memory:", config={"memory_limit": memory_limit} if memory_limit else {})
        try:
            yield con
        finally:
            con.close()

    def read_consistent(self, query: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """``query(con)`` on a read-only connection, run again if the workspace file reads short
        (``Workspace.read_consistent``)."""
        if self.ws is not None:
            return self.ws.read_consistent(query)
        with self.read() as con:
            return query(con)

    def tokens_ref(self) -> tuple[str, list[Any]]:
        """(FROM-clause text, its parameters) for the tokens table."""
        return ("read_parquet(?)", [self.tokens_file]) if self.ws is None else ("tokens", [])

    def acts_ref(self, hook: str) -> tuple[str, str, list[Any]] | ShardFiles:
        """Where a hook's activations are: its shard files, or (FROM-clause text, the x column
        expression, parameters) of a DuckDB table or Parquet file. Shard lists are read once."""
        if self.ws is not None and self.info.layout == FILES_LAYOUT:
            if hook not in self.shards:
                self.shards[hook] = shard_files(self.ws, self.info, hook)
            return self.shards[hook]
        if self.ws is None:
            return "read_parquet(?)", f"x::FLOAT[{int(self.info.hooks[hook])}] AS x", [self.info.tables[hook]]
        return quote_ident(self.info.tables[hook]), "x", []


def open_part(source: str | Path | Workspace, harvest: str | None = None) -> HarvestPart:
    """A workspace file or a Parquet export directory / URL as a `HarvestPart`."""
    if not is_parquet_source(source):
        ws = source if isinstance(source, Workspace) else Workspace(source)
        return HarvestPart(str(ws.path), harvest_info(ws, harvest), ws)
    location = str(source)
    m = _read_manifest(location)
    if harvest is not None and harvest != m["name"]:
        raise HarvestError(
            f"the export {location} holds harvest {m['name']!r}, not {harvest!r}; drop --harvest or fix it"
        )
    info = HarvestInfo(
        name=m["name"],
        config=m["config"],
        status=m["status"],
        n_windows=m["n_windows"],
        n_tokens=m["n_tokens"],
        n_docs=m["n_docs"],
        hooks={h: int(v["d"]) for h, v in m["hooks"].items()},
        tables={h: _join(location, v["file"]) for h, v in m["hooks"].items()},
    )
    skipped = _join(location, m["nonfinite_tokens"]) if m.get("nonfinite_tokens") else None
    return HarvestPart(location, info, None, _join(location, m["tokens"]), skipped)


def as_sources(
    sources: str | Path | Workspace | Sequence[str | Path | Workspace],
) -> list[str | Path | Workspace]:
    """One source or a list of them, as a list."""
    if isinstance(sources, str | Path | Workspace):
        return [sources]
    out = list(sources)
    if not out:
        raise HarvestError("no workspace given; pass at least one workspace file or Parquet export")
    return out


def open_parts(
    sources: str | Path | Workspace | Sequence[str | Path | Workspace],
    harvest: str | None = None,
    hook: str | None = None,
) -> list[HarvestPart]:
    """Every source as a part, checked to form one data set: the same model, `hook` at one width,
    and no harvest (or shard) twice."""
    parts = [open_part(s, harvest) for s in as_sources(sources)]
    first = parts[0]
    model = first.info.config.get("identity", {}).get("model")
    seen: dict[str, str] = {}
    for part in parts:
        ident = part.info.config.get("identity", {})
        if hook is not None and hook not in part.info.hooks:
            raise HarvestError(
                f"hook {hook!r} is not in harvest {part.info.name!r} of {part.location}; it has: "
                f"{', '.join(part.info.hooks)}. Harvest it first with `saewb harvest --hook ...`."
            )
        if hook is not None and part.info.hooks[hook] != first.info.hooks[hook]:
            raise HarvestError(
                f"hook {hook!r} has width {part.info.hooks[hook]} in {part.location} but "
                f"{first.info.hooks[hook]} in {first.location}; a set must share its activation width"
            )
        if ident.get("model") != model:
            raise HarvestError(
                f"{part.location} was harvested from model {ident.get('model')!r} but {first.location} from "
                f"{model!r}; a set of workspaces must come from one model"
            )
        key = json.dumps(ident, sort_keys=True)
        if key in seen:
            what = f"shard {part.shard[0]}/{part.shard[1]}" if part.shard else "the same harvest"
            raise HarvestError(
                f"{part.location} and {seen[key]} hold {what} (identical harvest configs); "
                "give each shard once, or the workspace or its Parquet export, not both"
            )
        seen[key] = part.location
    shards = {p.shard[1] for p in parts if p.shard}
    if len(shards) > 1:
        raise HarvestError(
            f"the set mixes shards of different N ({sorted(shards)}); use shards of one --shard i/N run"
        )
    return parts
