"""Everything the pages read or write, cached the way each piece changes.

Runs and metrics change while jobs train, so they are cached for a couple of seconds. Analysis
tables change only when `saewb analyze` runs again, so their cache key includes the analysis's
`updated_at`. Every query goes through `Workspace.read()`: a short read-only connection that never
blocks a harvest or a training job writing to the same file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from saewb.workspace import Workspace

LIVE_TTL_S = 2.0
"""How stale the runs page may be while a job trains."""


class AppDataError(RuntimeError):
    """Something the page should explain to the user instead of a traceback."""


def workspace() -> Workspace:
    path = os.environ.get("SAEWB_WORKSPACE", "workspace.duckdb")
    ws = Workspace(path)
    if not ws.exists():
        raise AppDataError(
            f"Workspace `{path}` does not exist. Create one with `saewb harvest --workspace {path} ...` "
            "(or `make demo`), then start the app with `saewb app PATH`."
        )
    return ws


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def runs_frame(path: str) -> pd.DataFrame:
    from sae import runs

    rows = runs.list_runs(Workspace(path))
    out = []
    for r in rows:
        m = r.get("final_metrics") or {}
        out.append(
            {
                "run": r["name"],
                "arch": r["arch"],
                "hook": r["hook"],
                "harvest": r["harvest"],
                "status": r["status"],
                "fvu": m.get("fvu"),
                "l0": m.get("l0"),
                "dead_frac": m.get("dead_frac"),
                "dense_frac": m.get("dense_frac"),
                "updated": r["updated_at"],
            }
        )
    return pd.DataFrame(out)


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def run_config(path: str, run: str) -> dict[str, Any]:
    from sae import runs

    row = runs.get_run(Workspace(path), run)
    return (row or {}).get("config") or {}


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def metrics_frame(path: str, run: str) -> pd.DataFrame:
    from sae import runs

    return pd.DataFrame(runs.run_metrics(Workspace(path), run))


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def latest_metrics(path: str) -> pd.DataFrame:
    """Latest logged step of every run, for the L0-vs-FVU scatter of runs still training."""
    from sae import runs

    return pd.DataFrame(runs.latest_metrics(Workspace(path)), columns=["run", "arch", "tokens", "l0", "fvu"])


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def harvests_frame(path: str) -> pd.DataFrame:
    from activations.store import HARVEST_SUMMARY, list_harvests

    return pd.DataFrame(list_harvests(Workspace(path)), columns=list(HARVEST_SUMMARY))


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def analysed_runs(path: str) -> dict[str, str]:
    """Analysed run -> its analysis version (updated_at), the cache key of everything analysed."""
    from analysis import tables

    return tables.analysed_runs(Workspace(path))


@st.cache_data(show_spinner=False, max_entries=32)
def latent_table(path: str, run: str, version: str) -> pd.DataFrame:
    from analysis import tables

    rows = tables.latent_summary(Workspace(path), run)
    frame = pd.DataFrame(rows)[["latent", "freq", "mean_act", "max_act", "n_fires", "family"]]
    labels = labels_for(path, run)
    frame["label"] = [labels.get(int(i), "") for i in frame["latent"]]
    return frame


@st.cache_data(show_spinner=False, max_entries=512)
def dashboard(path: str, run: str, latent: int, version: str) -> dict[str, Any]:
    """All of one latent's dashboard in one cached call (a handful of indexed queries)."""
    from analysis import tables

    return tables.dashboard(Workspace(path), run, latent)


@st.cache_data(show_spinner=False, max_entries=64)
def token_search(path: str, run: str, token: str, version: str) -> pd.DataFrame:
    from analysis import tables

    return pd.DataFrame(tables.search_by_token(Workspace(path), run, token))


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def labels_for(path: str, run: str) -> dict[int, str]:
    from analysis import labels

    return labels.labels_for(Workspace(path), run)


def save_label(path: str, run: str, latent: int, label: str) -> None:
    from analysis import labels

    labels.save_label(Workspace(path), run, latent, label)
    labels_for.clear()
    latent_table.clear()


@st.cache_resource(show_spinner="Loading the model and the SAE ...", max_entries=2)
def run_context(path: str, run: str) -> Any:
    """The model and the SAE of a run, loaded once per server (both are read-only)."""
    from analysis.runs import load_run

    return load_run(Workspace(path), run)


def check_workspace_path() -> Path:
    return workspace().path


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def latent_explanations(path: str, run: str, latent: int) -> dict[str, dict[str, Any]]:
    """The newest LLM and baseline explanation of a latent with their scores (`saewb explain`)."""
    from analysis import explanations

    return explanations.latent_explanations(Workspace(path), run, latent)


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def explanation_texts(path: str, run: str) -> dict[int, str]:
    from analysis import explanations

    return explanations.explanation_texts(Workspace(path), run)


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False)
def explanation_scores(path: str, run: str) -> pd.DataFrame:
    from analysis import explanations

    return pd.DataFrame(
        explanations.score_table(Workspace(path), run),
        columns=["latent", "explainer", "model", "prompt_version", "scorer", "score"],
    )


@st.cache_resource(show_spinner="Loading the sentence model ...", max_entries=1)
def sentence_embedder() -> Any:
    """MiniLM sentence embeddings for searching explanations, loaded once per server."""
    from analysis.autointerp import Embedder

    return Embedder()


@st.cache_data(ttl=LIVE_TTL_S, show_spinner=False, max_entries=64)
def explanation_search(path: str, run: str, query: str, limit: int = 15) -> pd.DataFrame:
    """Latents ranked by the cosine of the query to their explanation (MiniLM embeddings stored by `saewb explain`)."""
    from analysis import explanations

    latents, emb, texts = explanations.explanation_embeddings(Workspace(path), run)
    if not len(latents):
        return pd.DataFrame(columns=["latent", "similarity", "explanation"])
    sims = emb @ sentence_embedder()([query])[0]
    order = sims.argsort()[::-1][:limit]
    return pd.DataFrame(
        {"latent": latents[order], "similarity": sims[order], "explanation": [texts[i] for i in order]}
    )
