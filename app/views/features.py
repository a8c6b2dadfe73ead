"""Features: a sortable, filterable table of latents with their explanations, four searches (id, token, text,
explanation) and the run's explanation score histograms."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app import data
from app.ui import DASHBOARD, analysed_run, guarded, histogram

# Plain comments, not attribute docstrings: Streamlit's "magic" would print a bare string on the page.
PAGE_ROWS = 100  # rows the latent table sends to the browser at once
SORT_ORDERS = {  # sort choice -> (column, ascending); ties keep latent order
    "latent id": ("latent", True),
    "frequency, highest first": ("freq", False),
    "frequency, lowest first": ("freq", True),
    "max activation, highest first": ("max_act", False),
    "mean activation, highest first": ("mean_act", False),
}


@guarded
def render() -> None:
    st.title("Features")
    path = str(data.workspace().path)
    run, version = analysed_run(path)
    # A row selected in the table: open its dashboard before drawing anything (the page would be thrown away)
    picked = st.session_state.get("latent_table", {}).get("selection", {}).get("rows", [])
    shown_latents = st.session_state.get("latent_window", [])
    if picked and picked[0] < len(shown_latents):
        st.switch_page(DASHBOARD, query_params={"run": run, "latent": str(shown_latents[picked[0]])})
    table = data.latent_table(path, run, version)
    texts = data.explanation_texts(path, run)
    table = table.assign(explanation=[texts.get(int(i), "") for i in table["latent"]])

    by_id, by_token, by_text, by_meaning = st.tabs(["By latent id", "By token", "By text", "By explanation"])
    with by_id:
        latent = st.number_input("Latent id", min_value=0, max_value=len(table) - 1, step=1, key="latent_id")
        st.page_link(
            DASHBOARD,
            label=f"Open latent #{int(latent)}",
            query_params={"run": run, "latent": str(int(latent))},
        )
    with by_token:
        token = st.text_input("Token", placeholder="def", key="token_query")
        if token.strip():
            hits = data.token_search(path, run, token, version)
            if hits.empty:
                st.caption(f"no latent has a top context on {token!r}")
            for row in hits.itertuples():
                st.page_link(
                    DASHBOARD,
                    label=f"#{row.latent}: {row.n_top} top contexts on {row.token!r}, best {row.best:.2f}",
                    query_params={"run": run, "latent": str(row.latent)},
                )
    with by_text:
        text = st.text_area(
            "Text", placeholder="Paste text to rank the latents that fire on it", key="text_query"
        )
        if text.strip():
            from app.inference import rank_latents

            ranked = rank_latents(path, run, text)
            for latent, best, token in ranked[:15]:
                st.page_link(
                    DASHBOARD,
                    label=f"#{latent}: max {best:.2f} on {token!r}",
                    query_params={"run": run, "latent": str(latent)},
                )

    with by_meaning:
        query = st.text_input("Meaning", placeholder="numbers in code", key="explanation_query")
        if not texts:
            st.caption(f"No explanations yet: `saewb explain {run} --workspace {path}` writes them.")
        elif query.strip():
            for row in data.explanation_search(path, run, query.strip()).itertuples():
                st.page_link(
                    DASHBOARD,
                    label=f"#{row.latent}: {row.explanation} ({row.similarity:.2f})",
                    query_params={"run": run, "latent": str(row.latent)},
                )
    scores = data.explanation_scores(path, run)
    if not scores.empty:
        with st.expander("Explanation scores of this run"):
            st.html(score_histograms(scores))

    st.subheader(f"{len(table)} latents")
    c1, c2, c3 = st.columns(3)
    min_freq = c1.number_input(
        "Min firing frequency", value=0.0, min_value=0.0, max_value=1.0, format="%.5f", key="latent_min_freq"
    )
    families = sorted(f for f in table["family"].dropna().unique())
    family = c2.selectbox("Family", ["any", *families])
    label_query = c3.text_input("Label or explanation contains")
    shown = table[table["freq"] >= min_freq]
    if family != "any":
        shown = shown[shown["family"] == family]
    if label_query:  # manual labels and explanations both
        shown = shown[
            shown["label"].str.contains(label_query, case=False, regex=False)
            | shown["explanation"].str.contains(label_query, case=False, regex=False)
        ]

    # Sorted and paged on the server: the browser draws PAGE_ROWS rows, not every latent.
    c4, c5 = st.columns(2)
    order = c4.selectbox("Sort by", list(SORT_ORDERS), key="latent_sort")
    column, ascending = SORT_ORDERS[order]
    shown = shown.sort_values([column, "latent"], ascending=[ascending, True], kind="stable")
    n_pages = max(1, -(-len(shown) // PAGE_ROWS))
    if st.session_state.get("latent_page", 1) > n_pages:  # the filters shrank the table under the page
        st.session_state["latent_page"] = n_pages
    page = int(
        c5.number_input(f"Page (of {n_pages})", min_value=1, max_value=n_pages, step=1, key="latent_page")
    )
    window = shown.iloc[(page - 1) * PAGE_ROWS : page * PAGE_ROWS]
    st.caption(
        f"{len(shown)} latents match; rows {min(len(shown), (page - 1) * PAGE_ROWS + 1)}"
        f" to {(page - 1) * PAGE_ROWS + len(window)}. Select a row to open its dashboard."
    )
    st.session_state["latent_window"] = [int(j) for j in window["latent"]]  # what the table's rows are
    st.dataframe(
        window,
        hide_index=True,
        on_select="rerun",
        selection_mode="single-row",
        key="latent_table",
        column_config={"freq": st.column_config.NumberColumn(format="%.5f")},
    )


def score_histograms(scores: pd.DataFrame) -> str:
    """Per scorer, a histogram of each explainer's scores over [0, 1] and its mean."""
    edges = np.linspace(0.0, 1.0, 11)
    parts = []
    for scorer in sorted(scores["scorer"].unique()):
        for explainer in ("llm", "baseline"):
            vals = scores[(scores["scorer"] == scorer) & (scores["explainer"] == explainer)][
                "score"
            ].to_numpy()
            if not len(vals):
                continue
            density = np.histogram(vals, edges, density=True)[0]
            parts.append(
                f"<div style='flex:1;min-width:12rem'><small>{scorer} · {explainer}: mean {vals.mean():.3f}"
                f" over {len(vals)} latents</small>{histogram(density, edges, height_px=80, label='score')}</div>"
            )
    return f"<div style='display:flex;flex-wrap:wrap;gap:1rem'>{''.join(parts)}</div>"


render()
