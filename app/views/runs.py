"""Runs: every training run with its config, final metrics and curves; L0 against FVU for all."""

from __future__ import annotations

import streamlit as st

from app import data
from app.serve import start_warm_up
from app.ui import guarded, pick_run


@guarded
def render() -> None:
    st.title("Runs")
    path = str(data.workspace().path)
    if data.harvests_frame(path).empty:
        st.info(
            f"Workspace `{path}` is empty: no harvest yet. Start one with `saewb harvest --workspace {path}`."
        )
        return
    live(path)
    # A run that finished after the server started is warmed while the user reads this page.
    start_warm_up(path)


@st.fragment(run_every=data.LIVE_TTL_S)
def live(path: str) -> None:
    # A fragment re-runs on its own every couple of seconds: harvests and curves grow while jobs run.
    harvests = data.harvests_frame(path)
    st.markdown(
        "  \n".join(
            f"**harvest {h.name}** · {h.model} · {h.n_tokens:,} tokens, {h.n_docs:,} documents · {h.status}"
            for h in harvests.itertuples()
        )
    )
    runs = data.runs_frame(path)
    if runs.empty:
        st.info("No training run yet. Train one with `saewb train --workspace ... --hook ...`.")
        return
    latest = data.latest_metrics(path)
    progress = dict(zip(latest["run"], latest["tokens"], strict=True)) if not latest.empty else {}
    st.markdown(
        "  \n".join(
            f"**run {r.run}** · {r.arch} · {r.status} · {int(progress.get(r.run, 0)):,} tokens trained"
            for r in runs.itertuples()
        )
    )
    st.dataframe(runs, hide_index=True, key="runs_table")
    if not latest.empty:
        st.subheader("L0 vs FVU")
        st.scatter_chart(latest, x="l0", y="fvu", color="arch")
    run = pick_run(list(runs["run"]), key="curves_run")
    metrics = data.metrics_frame(path, run)
    st.subheader(f"Training curves: {run}")
    if metrics.empty:
        st.caption("no metrics logged yet")
    else:
        cols = st.columns(3)
        for col, metric in zip(cols, ("loss", "fvu", "l0"), strict=True):
            col.caption(metric)
            col.line_chart(metrics, x="tokens", y=metric, height=220)
    with st.expander("Config"):
        st.json(data.run_config(path, run))


render()
