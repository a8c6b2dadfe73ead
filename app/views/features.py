"""Features: a sortable, filterable table of latents and three searches (token, text, id)."""

from __future__ import annotations

import streamlit as st

from app import data
from app.ui import DASHBOARD, analysed_run, guarded


@guarded
def render() -> None:
    st.title("Features")
    path = str(data.workspace().path)
    run, version = analysed_run(path)
    table = data.latent_table(path, run, version)

    by_id, by_token, by_text = st.tabs(["By latent id", "By token", "By text"])
    with by_id:
        latent = st.number_input("Latent id", min_value=0, max_value=len(table) - 1, step=1, key="latent_id")
        st.page_link(DASHBOARD, label=f"Open latent #{int(latent)}", query_params={"run": run, "latent": str(int(latent))})
    with by_token:
        token = st.text_input("Token", placeholder="def", key="token_query")
        if token.strip():
            hits = data.token_search(path, run, token, version)
            if hits.empty:
                st.caption(f"no latent has a top context on {token!r}")
            for row in hits.itertuples():
                st.page_link(
                    DASHBOARD, label=f"#{row.latent}: {row.n_top} top contexts on {row.token!r}, best {row.best:.2f}",
                    query_params={"run": run, "latent": str(row.latent)},
                )
    with by_text:
        text = st.text_area("Text", placeholder="Paste text to rank the latents that fire on it", key="text_query")
        if text.strip():
            from app.inference import rank_latents

            ranked = rank_latents(path, run, text)
            for latent, best, token in ranked[:15]:
                st.page_link(DASHBOARD, label=f"#{latent}: max {best:.2f} on {token!r}",
                             query_params={"run": run, "latent": str(latent)})

    st.subheader(f"{len(table)} latents")
    c1, c2, c3 = st.columns(3)
    min_freq = c1.number_input("Min firing frequency", value=0.0, min_value=0.0, max_value=1.0, format="%.5f")
    families = sorted(f for f in table["family"].dropna().unique())
    family = c2.selectbox("Family", ["any", *families])
    label_query = c3.text_input("Label contains")
    shown = table[table["freq"] >= min_freq]
    if family != "any":
        shown = shown[shown["family"] == family]
    if label_query:
        shown = shown[shown["label"].str.contains(label_query, case=False, regex=False)]
    event = st.dataframe(
        shown, hide_index=True, on_select="rerun", selection_mode="single-row", key="latent_table",
        column_config={"freq": st.column_config.NumberColumn(format="%.5f")},
    )
    rows = event.selection.rows if event else []
    if rows:
        latent = int(shown.iloc[rows[0]]["latent"])
        st.switch_page(DASHBOARD, query_params={"run": run, "latent": str(latent)})


render()
