"""The analysis tables and their one owner: the schema, the writes of `saewb analyze` / `saewb mcs`,
and the reads the app and the exports use.

Every table is keyed by (run, latent) and written in latent order in one transaction, so a lookup
of one latent touches one or two DuckDB row groups (zone maps) plus an ART index on (run, latent).

* `analysis_runs(run PK, harvest, hook, status, n_tokens, n_latents, config JSON, updated_at)`
* `latent_stats(run, latent, n_fires, freq, mean_act, max_act, hist INTEGER[], family,
  logit_pos_ids INTEGER[], logit_pos_tokens VARCHAR[], logit_pos FLOAT[], logit_neg_ids INTEGER[],
  logit_neg_tokens VARCHAR[], logit_neg FLOAT[])`: `hist` has `n_bins` equal bins over [0, max_act];
  `freq` = fires / analysed (non-special) tokens; mean_act is over the tokens where the latent fires.
* `latent_contexts(run, latent, kind, band, rank, tok_idx, value)`: kind 'top' (band = -1, rank 0 =
  highest) or 'band' (random samples from quantile band `band` of the latent's positive activations).
* `latent_bands(run, latent, band, lo, hi)`: the activation range of each quantile band.
* `latent_neighbors(run, latent, rank, other, cosine)`: nearest decoder directions over all latents.
* `latent_cooccurrence(run, latent, rank, other, count, norm)`: top co-firing latents;
  norm = count / min(fires_latent, fires_other).
* `latent_families(run, family, latent, parent, depth, weight)`: see analysis/families.py.
* `feature_codes(run, tok_idx, latents INTEGER[], vals FLOAT[])`: the sparse code of every analysed
  token (indices and values, no dense [tokens × latents] anywhere), in tok_idx order so a window of
  tokens is a zone-map-pruned range read.
* `run_consistency(run_a, run_b, n_latents, share_above_09, mean_mcs, median_mcs, updated_at)`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from activations.store import insert_arrow, normalise_token, token_rows, tokens_matching
from saewb.workspace import Workspace, dict_rows

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS analysis_runs (
        run VARCHAR PRIMARY KEY, harvest VARCHAR, hook VARCHAR, status VARCHAR, n_tokens BIGINT,
        n_latents INTEGER, config VARCHAR, updated_at TIMESTAMP DEFAULT current_timestamp)""",
    """CREATE TABLE IF NOT EXISTS latent_stats (
        run VARCHAR NOT NULL, latent INTEGER NOT NULL, n_fires BIGINT, freq DOUBLE, mean_act DOUBLE,
        max_act DOUBLE, hist INTEGER[], family INTEGER,
        logit_pos_ids INTEGER[], logit_pos_tokens VARCHAR[], logit_pos FLOAT[],
        logit_neg_ids INTEGER[], logit_neg_tokens VARCHAR[], logit_neg FLOAT[])""",
    """CREATE TABLE IF NOT EXISTS latent_contexts (
        run VARCHAR NOT NULL, latent INTEGER NOT NULL, kind VARCHAR NOT NULL, band INTEGER NOT NULL,
        rank INTEGER NOT NULL, tok_idx BIGINT NOT NULL, value FLOAT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS latent_bands (
        run VARCHAR NOT NULL, latent INTEGER NOT NULL, band INTEGER NOT NULL, lo FLOAT, hi FLOAT)""",
    """CREATE TABLE IF NOT EXISTS latent_neighbors (
        run VARCHAR NOT NULL, latent INTEGER NOT NULL, rank INTEGER NOT NULL, other INTEGER NOT NULL,
        cosine FLOAT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS latent_cooccurrence (
        run VARCHAR NOT NULL, latent INTEGER NOT NULL, rank INTEGER NOT NULL, other INTEGER NOT NULL,
        count BIGINT NOT NULL, norm FLOAT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS latent_families (
        run VARCHAR NOT NULL, family INTEGER NOT NULL, latent INTEGER NOT NULL, parent INTEGER,
        depth INTEGER NOT NULL, weight FLOAT)""",
    """CREATE TABLE IF NOT EXISTS feature_codes (
        run VARCHAR NOT NULL, tok_idx BIGINT NOT NULL, latents INTEGER[], vals FLOAT[])""",
    """CREATE TABLE IF NOT EXISTS run_consistency (
        run_a VARCHAR NOT NULL, run_b VARCHAR NOT NULL, n_latents INTEGER, share_above_09 DOUBLE,
        mean_mcs DOUBLE, median_mcs DOUBLE, updated_at TIMESTAMP DEFAULT current_timestamp,
        PRIMARY KEY (run_a, run_b))""",
]
PER_LATENT_TABLES = (
    "latent_stats",
    "latent_contexts",
    "latent_bands",
    "latent_neighbors",
    "latent_cooccurrence",
    "latent_families",
)
INDEXES = [f"CREATE INDEX IF NOT EXISTS idx_{t}_run_latent ON {t} (run, latent)" for t in PER_LATENT_TABLES]


class AnalysisError(ValueError):
    """An unknown run or latent, or a run that has not been analysed."""


F = TypeVar("F", bound=Callable[..., Any])


def accepts_path(fn: F) -> F:
    """Let a read helper take a Workspace or a path to one."""

    @functools.wraps(fn)
    def wrapper(ws: Workspace | str | Path, *args: Any, **kwargs: Any) -> Any:
        return fn(ws if isinstance(ws, Workspace) else Workspace(ws), *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def ensure_schema(ws: Workspace) -> None:
    with ws.write() as con:
        for stmt in SCHEMA:
            con.execute(stmt)


def create_indexes(con: Any) -> None:
    for stmt in INDEXES:
        con.execute(stmt)


@contextmanager
def _reading(ws: Workspace, con: Any | None) -> Iterator[Any]:
    """The caller's connection when it has one (one open for a whole dashboard), else a short one."""
    if con is not None:
        yield con
    else:
        with ws.read() as own:
            yield own


def require_analysis(ws: Workspace, run: str, con: Any | None = None) -> dict[str, Any]:
    with _reading(ws, con) as c:
        has_table = c.execute(
            "SELECT 1 FROM information_schema.tables WHERE table_name = 'analysis_runs'"
        ).fetchone()
        row = (
            None
            if not has_table
            else c.execute(
                "SELECT harvest, hook, status, n_tokens, n_latents, config FROM analysis_runs WHERE run = ?",
                [run],
            ).fetchone()
        )
    if row is None or row[2] != "done":
        state = "has not been analysed" if row is None else f"has an unfinished analysis (status {row[2]!r})"
        raise AnalysisError(f"run {run!r} {state}; run `saewb analyze {run} --workspace {ws.path}`")
    return {
        "harvest": row[0],
        "hook": row[1],
        "status": row[2],
        "n_tokens": row[3],
        "n_latents": row[4],
        "config": json.loads(row[5]),
    }


def _check_latent(info: dict[str, Any], run: str, latent: int) -> None:
    if not 0 <= int(latent) < info["n_latents"]:
        raise AnalysisError(
            f"latent {latent} is out of range for run {run!r}; it has latents 0..{info['n_latents'] - 1}"
        )


def start_analysis(
    ws: Workspace, run: str, harvest: str, hook: str, n_latents: int, config: dict[str, Any]
) -> None:
    """Mark `run`'s analysis as running, its earlier sparse codes gone (pass 1 writes them anew)."""
    ensure_schema(ws)
    with ws.write() as con:
        create_indexes(con)
        con.execute("DELETE FROM feature_codes WHERE run = ?", [run])
        con.execute("DELETE FROM analysis_runs WHERE run = ?", [run])
        con.execute(
            "INSERT INTO analysis_runs VALUES (?, ?, ?, 'running', 0, ?, ?, current_timestamp)",
            [run, harvest, hook, n_latents, json.dumps(config)],
        )


def append_codes(ws: Workspace, run: str, codes: pa.Table) -> None:
    """Append sparse codes (tok_idx, latents, vals) of `run` to `feature_codes` in one transaction."""
    with ws.write() as con:
        con.execute("INSERT INTO feature_codes SELECT ?, tok_idx, latents, vals FROM codes", [run])


def finish_analysis(ws: Workspace, run: str, n_tokens: int, per_latent: dict[str, pa.Table]) -> None:
    """Replace `run`'s rows of the per-latent tables and mark its analysis done, in one transaction."""
    unknown = set(per_latent) - set(PER_LATENT_TABLES)
    if unknown:
        raise ValueError(f"not a per-latent analysis table: {', '.join(sorted(unknown))}")
    with ws.write() as con:
        for name, data in per_latent.items():
            con.execute(f"DELETE FROM {name} WHERE run = ?", [run])
            if data.num_rows:
                insert_arrow(con, name, data)
        con.execute(
            "UPDATE analysis_runs SET status = 'done', n_tokens = ?, updated_at = current_timestamp WHERE run = ?",
            [n_tokens, run],
        )


def code_batches(
    ws: Workspace, run: str, n_committed: int, chunk_tokens: int, memory_limit: str | None = None
) -> Iterator[tuple[np.ndarray, ...]]:
    """(tok_idx per entry, latent, value) of the stored sparse codes, chunk by chunk in tok_idx order."""
    for lo in range(0, n_committed, chunk_tokens):
        with ws.read(memory_limit=memory_limit) as con:
            res = con.sql(
                "SELECT tok_idx, latents, vals FROM feature_codes WHERE run = ? AND tok_idx >= ? AND tok_idx < ?",
                params=[run, lo, lo + chunk_tokens],
            ).to_arrow_table()
        if res.num_rows == 0:
            continue
        lat = res.column("latents").combine_chunks()
        vals = res.column("vals").combine_chunks()
        counts = np.diff(lat.offsets.to_numpy())
        tok = np.repeat(res.column("tok_idx").to_numpy(), counts)
        yield tok, lat.flatten().to_numpy().astype(np.int64), vals.flatten().to_numpy().astype(np.float32)


def store_consistency(ws: Workspace, run_a: str, run_b: str, summary: dict[str, Any]) -> None:
    """The MCS summary of run_a's latents against run_b (replacing an earlier one)."""
    ensure_schema(ws)
    with ws.write() as con:
        con.execute("DELETE FROM run_consistency WHERE run_a = ? AND run_b = ?", [run_a, run_b])
        con.execute(
            "INSERT INTO run_consistency VALUES (?, ?, ?, ?, ?, ?, current_timestamp)",
            [
                run_a,
                run_b,
                summary["n_latents"],
                summary["share_above_09"],
                summary["mean_mcs"],
                summary["median_mcs"],
            ],
        )


@accepts_path
def analysed_runs(ws: Workspace) -> dict[str, str]:
    """Run -> version (`updated_at`) of every finished analysis: the cache key of what was analysed."""
    if not ws.table_exists("analysis_runs"):
        return {}
    with ws.read() as con:
        rows = con.execute(
            "SELECT run, CAST(updated_at AS VARCHAR) FROM analysis_runs WHERE status = 'done' ORDER BY run"
        ).fetchall()
    return {r[0]: r[1] for r in rows}


@accepts_path
def analysis_info(ws: Workspace, run: str) -> dict[str, Any]:
    """The analysis record of a run (harvest, hook, n_tokens, n_latents, config)."""
    return require_analysis(ws, run)


@accepts_path
def latent_summary(
    ws: Workspace, run: str, latent: int | None = None, *, con: Any | None = None
) -> list[dict[str, Any]]:
    """Per-latent statistics (one dict per latent, ordered by latent); all latents when `latent` is None."""
    info = require_analysis(ws, run, con)
    query = "SELECT * FROM latent_stats WHERE run = ?"
    params: list[Any] = [run]
    if latent is not None:
        _check_latent(info, run, latent)
        query += " AND latent = ?"
        params.append(int(latent))
    with _reading(ws, con) as c:
        return dict_rows(c, query + " ORDER BY latent", params)


@dataclass
class Context:
    """One activating context of a latent: the window's tokens and the latent's value on each."""

    kind: str
    band: int
    rank: int
    tok_idx: int
    value: float
    doc_id: int
    tok_idxs: list[int]
    tokens: list[str]
    acts: list[float]
    center: int
    """Position of `tok_idx` inside the window."""


@accepts_path
def top_contexts(
    ws: Workspace,
    run: str,
    latent: int,
    *,
    kind: str = "top",
    window: int = 8,
    limit: int | None = None,
    con: Any | None = None,
) -> list[Context]:
    """Stored contexts of one latent (kind 'top' or 'band') with `window` tokens either side.

    The window stays inside the centre token's sequence; per-token values come from `feature_codes`
    (special tokens are not analysed and read as 0).
    """
    if kind not in ("top", "band"):
        raise AnalysisError(f"kind must be 'top' or 'band', not {kind!r}")
    with _reading(ws, con) as c:
        info = require_analysis(ws, run, c)
        _check_latent(info, run, latent)
        return _contexts(ws, c, info, run, int(latent), kind, window, limit)


def _contexts(
    ws: Workspace,
    con: Any,
    info: dict[str, Any],
    run: str,
    latent: int,
    kind: str | None,
    window: int,
    limit: int | None,
) -> list[Context]:
    """Contexts of one kind (None: 'top' ones up to `limit`, then every 'band' sample) with their windows."""
    if kind is None:
        ctx_rows = con.execute(
            "SELECT kind, band, rank, tok_idx, value FROM latent_contexts WHERE run = ? AND latent = ? "
            "AND (kind = 'band' OR rank < ?) ORDER BY kind DESC, band DESC, rank",
            [run, latent, int(limit) if limit else 2**31 - 1],
        ).fetchall()
    else:
        ctx_rows = con.execute(
            "SELECT kind, band, rank, tok_idx, value FROM latent_contexts WHERE run = ? AND latent = ? AND kind = ? "
            "ORDER BY band DESC, rank" + (" LIMIT ?" if limit else ""),
            [run, latent, kind] + ([int(limit)] if limit else []),
        ).fetchall()
    if not ctx_rows:
        return []
    tokens = _window_tokens(ws, con, info["harvest"], [r[3] for r in ctx_rows], window)
    needed = sorted(tokens)
    codes = con.execute(
        "SELECT tok_idx, list_extract(vals, list_position(latents, ?)) FROM feature_codes "
        "WHERE run = ? AND tok_idx BETWEEN ? AND ? AND tok_idx IN (SELECT unnest(?::BIGINT[])) "
        "AND list_contains(latents, ?)",
        [latent, run, needed[0], needed[-1], needed, latent],
    ).fetchall()
    acts = {int(r[0]): float(r[1]) for r in codes}
    out: list[Context] = []
    for kind_, band, rank, center, value in ctx_rows:
        idxs = _window_of(tokens, center, window)
        out.append(
            Context(
                kind=kind_,
                band=band,
                rank=rank,
                tok_idx=center,
                value=float(value),
                doc_id=tokens[center][2],
                tok_idxs=idxs,
                tokens=[tokens[i][0] for i in idxs],
                acts=[acts.get(i, 0.0) for i in idxs],
                center=idxs.index(center),
            )
        )
    return out


def _window_tokens(
    ws: Workspace, con: Any, harvest: str, centers: list[int], window: int
) -> dict[int, tuple[str, int, int]]:
    """tok_idx -> (token_str, seq_id, doc_id) of every token within `window` of a centre."""
    needed = sorted({i for c in centers for i in range(c - window, c + window + 1)})
    cols = ("tok_idx", "token_str", "seq_id", "doc_id")
    found = token_rows(ws, harvest, needed, cols, con=con)
    rows = zip(*(found.column(c).to_pylist() for c in cols), strict=True)
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def _window_of(tokens: dict[int, tuple[str, int, int]], center: int, window: int) -> list[int]:
    """The token ids around `center` that lie in its sequence."""
    seq = tokens[center][1]
    return [i for i in range(center - window, center + window + 1) if i in tokens and tokens[i][1] == seq]


@dataclass
class Window:
    """A context around a random analysed token, with the sparse code of each of its tokens (all latents)."""

    tok_idx: int
    tok_idxs: list[int]
    tokens: list[str]
    codes: list[dict[int, float]]
    center: int

    def acts(self, latent: int) -> list[float]:
        return [c.get(latent, 0.0) for c in self.codes]


@accepts_path
def random_windows(ws: Workspace, run: str, n: int, *, seed: int = 0, window: int = 8) -> list[Window]:
    """`n` contexts centred on analysed tokens drawn uniformly at random (without replacement): the pool
    that non-activating contexts of a latent are taken from (those where it fires nowhere in the window)."""
    with ws.read() as con:
        info = require_analysis(ws, run, con)
        total = con.execute(
            "SELECT count(*), min(tok_idx), max(tok_idx) FROM feature_codes WHERE run = ?", [run]
        ).fetchone()
        if not total or not total[0]:
            return []
        rng = np.random.default_rng(seed)
        analysed = con.execute(
            "SELECT tok_idx FROM feature_codes WHERE run = ? ORDER BY tok_idx", [run]
        ).fetchnumpy()["tok_idx"]
        centers = sorted(int(c) for c in rng.choice(analysed, size=min(n, len(analysed)), replace=False))
        tokens = _window_tokens(ws, con, info["harvest"], centers, window)
        needed = sorted(tokens)
        codes = {
            int(t): dict(zip(lat, val, strict=True))
            for t, lat, val in con.execute(
                "SELECT tok_idx, latents, vals FROM feature_codes WHERE run = ? AND tok_idx BETWEEN ? AND ? "
                "AND tok_idx IN (SELECT unnest(?::BIGINT[]))",
                [run, needed[0], needed[-1], needed],
            ).fetchall()
        }
    out = []
    for c in centers:
        idxs = _window_of(tokens, c, window)
        out.append(
            Window(
                tok_idx=c,
                tok_idxs=idxs,
                tokens=[tokens[i][0] for i in idxs],
                codes=[codes.get(i, {}) for i in idxs],
                center=idxs.index(c),
            )
        )
    return out


@accepts_path
def band_ranges(
    ws: Workspace, run: str, latent: int, *, con: Any | None = None
) -> list[tuple[int, float, float]]:
    """(band, lo, hi) activation range of each quantile band of a latent."""
    with _reading(ws, con) as c:
        _check_latent(require_analysis(ws, run, c), run, latent)
        return [
            tuple(r)
            for r in c.execute(  # type: ignore[misc]
                "SELECT band, lo, hi FROM latent_bands WHERE run = ? AND latent = ? ORDER BY band",
                [run, int(latent)],
            ).fetchall()
        ]


@accepts_path
def neighbors(ws: Workspace, run: str, latent: int, *, con: Any | None = None) -> list[tuple[int, float]]:
    """(other latent, decoder cosine), nearest first."""
    with _reading(ws, con) as c:
        _check_latent(require_analysis(ws, run, c), run, latent)
        return [
            (int(a), float(b))
            for a, b in c.execute(
                "SELECT other, cosine FROM latent_neighbors WHERE run = ? AND latent = ? ORDER BY rank",
                [run, int(latent)],
            ).fetchall()
        ]


@accepts_path
def cooccurring(
    ws: Workspace, run: str, latent: int, *, con: Any | None = None
) -> list[tuple[int, int, float]]:
    """(other latent, co-firing token count, normalised co-occurrence), strongest first."""
    with _reading(ws, con) as c:
        _check_latent(require_analysis(ws, run, c), run, latent)
        return [
            (int(a), int(b), float(n))
            for a, b, n in c.execute(
                "SELECT other, count, norm FROM latent_cooccurrence WHERE run = ? AND latent = ? ORDER BY rank",
                [run, int(latent)],
            ).fetchall()
        ]


@accepts_path
def family_of(ws: Workspace, run: str, latent: int, *, con: Any | None = None) -> list[dict[str, Any]]:
    """Members (latent, parent, depth, weight) of the feature family containing `latent`; [] if none."""
    with _reading(ws, con) as c:
        _check_latent(require_analysis(ws, run, c), run, latent)
        return dict_rows(
            c,
            "SELECT latent, parent, depth, weight, family FROM latent_families WHERE run = ? AND family IN "
            "(SELECT family FROM latent_families WHERE run = ? AND latent = ?) ORDER BY family, depth, latent",
            [run, run, int(latent)],
        )


@accepts_path
def dashboard(ws: Workspace, run: str, latent: int, *, n_top: int = 20, window: int = 8) -> dict[str, Any]:
    """Everything a latent's dashboard shows, read over one connection."""
    with ws.read() as con:
        info = require_analysis(ws, run, con)
        _check_latent(info, run, latent)
        return latent_dashboard(ws, con, info, run, int(latent), n_top=n_top, window=window)


def latent_dashboard(
    ws: Workspace, con: Any, info: dict[str, Any], run: str, latent: int, *, n_top: int, window: int
) -> dict[str, Any]:
    """`dashboard` over the caller's connection, the run's analysis record (`require_analysis`)
    already read: the Neuronpedia export reads many latents this way."""
    contexts = _contexts(ws, con, info, run, latent, None, window, n_top)  # both kinds in one lookup
    return {
        "summary": latent_summary(ws, run, latent, con=con)[0],
        "top": [c for c in contexts if c.kind == "top"],
        "bands": [c for c in contexts if c.kind == "band"],
        "band_ranges": band_ranges(ws, run, latent, con=con),
        "neighbors": neighbors(ws, run, latent, con=con),
        "cooccurring": cooccurring(ws, run, latent, con=con),
        "family": family_of(ws, run, latent, con=con),
    }


@accepts_path
def search_by_token(ws: Workspace, run: str, token_str: str, limit: int = 20) -> list[dict[str, Any]]:
    """Latents whose top contexts peak on a token matching `token_str`.

    Matching ignores case, surrounding spaces and the tokenizer's word markers ('Ġ', '▁', '##').
    Ranked by how many of the latent's top contexts peak on it, then by the best activation there.
    """
    info = require_analysis(ws, run)
    if not normalise_token(token_str):
        raise AnalysisError("token_str is empty; give the token text to search for, e.g. 'def'")
    with ws.read() as con:
        top = con.execute(
            "SELECT DISTINCT tok_idx FROM latent_contexts WHERE run = ? AND kind = 'top'", [run]
        ).fetchall()
    matched = tokens_matching(ws, info["harvest"], [r[0] for r in top], token_str)
    with ws.read() as con:
        rows = con.execute(
            "SELECT latent, count(*) AS n_top, max(value) AS best, any_value(tok_idx) FROM latent_contexts "
            "WHERE run = ? AND kind = 'top' AND tok_idx IN (SELECT unnest(?::BIGINT[])) "
            "GROUP BY latent ORDER BY n_top DESC, best DESC LIMIT ?",
            [run, list(matched), int(limit)],
        ).fetchall()
    return [{"latent": lat, "n_top": n, "best": best, "token": matched[t]} for lat, n, best, t in rows]


@accepts_path
def run_consistency(ws: Workspace, run_a: str, run_b: str) -> dict[str, Any] | None:
    """The stored MCS summary of two runs (either order), or None."""
    if not ws.table_exists("run_consistency"):
        return None
    with ws.read() as con:
        rows = dict_rows(
            con,
            "SELECT * FROM run_consistency WHERE (run_a = ? AND run_b = ?) OR (run_a = ? AND run_b = ?) "
            "ORDER BY updated_at DESC LIMIT 1",
            [run_a, run_b, run_b, run_a],
        )
    return rows[0] if rows else None


def hist_edges(max_act: float, n_bins: int) -> np.ndarray:
    """Bin edges of a stored `hist` (equal bins over [0, max_act])."""
    return np.linspace(0.0, max(float(max_act), 1e-12), n_bins + 1)
