"""The owner of the automated-interpretability tables (`saewb explain`); nothing else writes or queries them.

* `explanations(run, latent, explainer, model, prompt_version, status, text, error, context_ids BIGINT[],
  embedding FLOAT[], created_at)`: one explanation per latent and explainer setting. `explainer` is
  'llm' or 'baseline'; `model` the LLM (or 'tokens' for the baseline); `context_ids` the tok_idx of
  the centre token of each context shown; `embedding` the MiniLM sentence embedding of the text (for
  the app's search); `status` 'ok' or 'failed' (then `error` says why and `text` is empty).
* `explanation_scores(run, latent, explainer, model, prompt_version, scorer, scorer_model, status, score,
  n_contexts, n_invalid, error, created_at)`: each scorer's number in [0, 1] for that explanation.
* `llm_cache(key, model, max_tokens, answer, created_at)`: every answer an LLM gave, keyed by the
  SHA-256 of (model, max_tokens, messages), so the same prompt is never sent twice.

A latent's explanation, its scores and the answers behind them are written in one short transaction,
so a killed job leaves whole latents only, and a rerun replaces a latent's rows instead of adding them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from analysis.tables import accepts_path
from saewb.workspace import Workspace, dict_rows

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS explanations (
        run VARCHAR NOT NULL, latent INTEGER NOT NULL, explainer VARCHAR NOT NULL, model VARCHAR NOT NULL,
        prompt_version VARCHAR NOT NULL, status VARCHAR NOT NULL, text VARCHAR, error VARCHAR,
        context_ids BIGINT[], embedding FLOAT[], created_at TIMESTAMP DEFAULT current_timestamp,
        PRIMARY KEY (run, latent, explainer, model, prompt_version))""",
    """CREATE TABLE IF NOT EXISTS explanation_scores (
        run VARCHAR NOT NULL, latent INTEGER NOT NULL, explainer VARCHAR NOT NULL, model VARCHAR NOT NULL,
        prompt_version VARCHAR NOT NULL, scorer VARCHAR NOT NULL, scorer_model VARCHAR, status VARCHAR NOT NULL,
        score DOUBLE, n_contexts INTEGER, n_invalid INTEGER, error VARCHAR,
        created_at TIMESTAMP DEFAULT current_timestamp,
        PRIMARY KEY (run, latent, explainer, model, prompt_version, scorer))""",
    """CREATE TABLE IF NOT EXISTS llm_cache (
        key VARCHAR PRIMARY KEY, model VARCHAR NOT NULL, max_tokens INTEGER, answer VARCHAR NOT NULL,
        created_at TIMESTAMP DEFAULT current_timestamp)""",
]


@dataclass
class Explanation:
    latent: int
    explainer: str
    model: str
    prompt_version: str
    status: str
    text: str = ""
    error: str | None = None
    context_ids: list[int] = field(default_factory=list)
    embedding: list[float] | None = None


@dataclass
class Score:
    latent: int
    explainer: str
    model: str
    prompt_version: str
    scorer: str
    scorer_model: str
    status: str
    score: float | None = None
    n_contexts: int = 0
    n_invalid: int = 0
    error: str | None = None


def ensure_schema(ws: Workspace) -> None:
    with ws.write() as con:
        for stmt in SCHEMA:
            con.execute(stmt)


def cache_key(model: str, max_tokens: int, messages: list[dict[str, str]]) -> str:
    blob = json.dumps([model, max_tokens, messages], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def cached_answers(ws: Workspace, keys: list[str]) -> dict[str, str]:
    """The stored answers among `keys` (one read)."""
    if not keys or not ws.table_exists("llm_cache"):
        return {}
    with ws.read() as con:
        rows = con.execute(
            "SELECT key, answer FROM llm_cache WHERE key IN (SELECT unnest(?::VARCHAR[]))",
            [sorted(set(keys))],
        ).fetchall()
    return {k: a for k, a in rows}


def done_latents(
    ws: Workspace, run: str, settings: list[tuple[str, str, str]], scorers: list[str]
) -> set[int]:
    """Latents that already have every (explainer, model, prompt_version) setting explained with status ok
    and scored by every scorer: a rerun skips them (failed ones are tried again)."""
    if not ws.table_exists("explanations"):
        return set()
    with ws.read() as con:
        explained = con.execute(
            "SELECT latent, explainer, model, prompt_version FROM explanations WHERE run = ? AND status = 'ok'",
            [run],
        ).fetchall()
        scored = con.execute(
            "SELECT latent, explainer, model, prompt_version, scorer FROM explanation_scores WHERE run = ? "
            "AND status = 'ok'",
            [run],
        ).fetchall()
    have: dict[int, set[tuple[str, ...]]] = {}
    for lat, *setting in explained:
        have.setdefault(int(lat), set()).add(tuple(setting))
    for lat, *setting, scorer in scored:
        have.setdefault(int(lat), set()).add((*setting, scorer))
    need = {tuple(s) for s in settings} | {(*s, scorer) for s in settings for scorer in scorers}
    return {lat for lat, got in have.items() if need <= got}


def store_latents(
    ws: Workspace,
    run: str,
    explanations: list[Explanation],
    scores: list[Score],
    answers: list[tuple[str, str, int, str]],
) -> None:
    """Explanations, scores and new cache entries (key, model, max_tokens, answer) in one transaction;
    a latent's earlier rows for the same setting are replaced, never duplicated."""
    with ws.write() as con:
        for e in explanations:
            con.execute(
                "DELETE FROM explanations WHERE run = ? AND latent = ? AND explainer = ? AND model = ? "
                "AND prompt_version = ?",
                [run, e.latent, e.explainer, e.model, e.prompt_version],
            )
            con.execute(
                "INSERT INTO explanations (run, latent, explainer, model, prompt_version, status, text, error, "
                "context_ids, embedding) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    run,
                    e.latent,
                    e.explainer,
                    e.model,
                    e.prompt_version,
                    e.status,
                    e.text,
                    e.error,
                    e.context_ids,
                    e.embedding,
                ],
            )
        for s in scores:
            con.execute(
                "DELETE FROM explanation_scores WHERE run = ? AND latent = ? AND explainer = ? AND model = ? "
                "AND prompt_version = ? AND scorer = ?",
                [run, s.latent, s.explainer, s.model, s.prompt_version, s.scorer],
            )
            con.execute(
                "INSERT INTO explanation_scores (run, latent, explainer, model, prompt_version, scorer, scorer_model, "
                "status, score, n_contexts, n_invalid, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    run,
                    s.latent,
                    s.explainer,
                    s.model,
                    s.prompt_version,
                    s.scorer,
                    s.scorer_model,
                    s.status,
                    s.score,
                    s.n_contexts,
                    s.n_invalid,
                    s.error,
                ],
            )
        if answers:
            con.executemany(
                "INSERT OR IGNORE INTO llm_cache (key, model, max_tokens, answer) VALUES (?, ?, ?, ?)",
                [list(a) for a in answers],
            )


@accepts_path
def forget(ws: Workspace, run: str, latents: list[int]) -> None:
    """Drop these latents' explanations and scores (the answer cache stays, so redoing them sends nothing new)."""
    if not ws.table_exists("explanations"):
        return
    with ws.write() as con:
        for table in ("explanations", "explanation_scores"):
            con.execute(
                f"DELETE FROM {table} WHERE run = ? AND latent IN (SELECT unnest(?::INTEGER[]))",
                [run, [int(x) for x in latents]],
            )


def _latest(con: Any, run: str, latent: int | None) -> list[dict[str, Any]]:
    """The newest explanation of each explainer kind ('llm', 'baseline') per latent, with its scores."""
    where = "run = ?" + (" AND latent = ?" if latent is not None else "")
    params: list[Any] = [run] + ([int(latent)] if latent is not None else [])
    rows = dict_rows(
        con,
        "SELECT latent, explainer, model, prompt_version, status, text, error, context_ids FROM explanations "
        f"WHERE {where} QUALIFY row_number() OVER (PARTITION BY latent, explainer ORDER BY created_at DESC) = 1 "
        "ORDER BY latent, explainer",
        params,
    )
    scores = con.execute(
        f"SELECT latent, explainer, model, prompt_version, scorer, status, score FROM explanation_scores WHERE {where}",
        params,
    ).fetchall()
    by_key: dict[tuple[Any, ...], dict[str, float | None]] = {}
    for lat, ex, model, pv, scorer, status, score in scores:
        by_key.setdefault((lat, ex, model, pv), {})[scorer] = score if status == "ok" else None
    for r in rows:
        r["scores"] = by_key.get((r["latent"], r["explainer"], r["model"], r["prompt_version"]), {})
    return rows


@accepts_path
def latent_explanations(ws: Workspace, run: str, latent: int) -> dict[str, dict[str, Any]]:
    """{'llm': {...}, 'baseline': {...}} for one latent (the newest of each), with their scores; {} if none."""
    if not ws.table_exists("explanations"):
        return {}
    with ws.read() as con:
        return {r["explainer"]: r for r in _latest(con, run, latent)}


@accepts_path
def explanation_texts(ws: Workspace, run: str) -> dict[int, str]:
    """Latent -> its newest LLM explanation text (status ok), for the features table."""
    if not ws.table_exists("explanations"):
        return {}
    with ws.read() as con:
        rows = con.execute(
            "SELECT latent, text FROM explanations WHERE run = ? AND explainer = 'llm' AND status = 'ok' "
            "QUALIFY row_number() OVER (PARTITION BY latent ORDER BY created_at DESC) = 1",
            [run],
        ).fetchall()
    return {int(a): b for a, b in rows}


@accepts_path
def score_table(ws: Workspace, run: str) -> list[dict[str, Any]]:
    """Every ok score of a run: (latent, explainer, model, prompt_version, scorer, score), for histograms and summaries."""
    if not ws.table_exists("explanation_scores"):
        return []
    with ws.read() as con:
        return dict_rows(
            con,
            "SELECT latent, explainer, model, prompt_version, scorer, score FROM explanation_scores "
            "WHERE run = ? AND status = 'ok' ORDER BY explainer, scorer, latent",
            [run],
        )


@accepts_path
def failures(ws: Workspace, run: str) -> list[dict[str, Any]]:
    """Failed explanations and scores of a run (latent, explainer, what, error)."""
    if not ws.table_exists("explanations"):
        return []
    with ws.read() as con:
        rows = con.execute(
            "SELECT latent, explainer, 'explanation', error FROM explanations WHERE run = ? AND status = 'failed' "
            "UNION ALL SELECT latent, explainer, scorer, error FROM explanation_scores WHERE run = ? "
            "AND status = 'failed' ORDER BY 1, 2, 3",
            [run, run],
        ).fetchall()
    return [{"latent": r[0], "explainer": r[1], "what": r[2], "error": r[3]} for r in rows]


@accepts_path
def explanation_embeddings(ws: Workspace, run: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(latents, unit embeddings [n, d], texts) of the newest ok LLM explanations, for semantic search."""
    if not ws.table_exists("explanations"):
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32), []
    with ws.read() as con:
        rows = con.execute(
            "SELECT latent, embedding, text FROM explanations WHERE run = ? AND explainer = 'llm' AND status = 'ok' "
            "AND embedding IS NOT NULL QUALIFY row_number() OVER (PARTITION BY latent ORDER BY created_at DESC) = 1 "
            "ORDER BY latent",
            [run],
        ).fetchall()
    if not rows:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32), []
    emb = np.asarray([r[1] for r in rows], np.float32)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return np.asarray([r[0] for r in rows], np.int64), emb, [r[2] for r in rows]


@accepts_path
def count_rows(ws: Workspace, run: str) -> dict[str, int]:
    """Row counts of the run's explanations and scores and of the whole cache (tests check no duplicates)."""
    if not ws.table_exists("explanations"):
        return {"explanations": 0, "scores": 0, "cache": 0}
    with ws.read() as con:
        e = con.execute("SELECT count(*) FROM explanations WHERE run = ?", [run]).fetchone()
        s = con.execute("SELECT count(*) FROM explanation_scores WHERE run = ?", [run]).fetchone()
        c = con.execute("SELECT count(*) FROM llm_cache").fetchone()
    return {"explanations": int(e[0]), "scores": int(s[0]), "cache": int(c[0])}
