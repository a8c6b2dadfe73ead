"""Feature dashboard: one latent's explanation, contexts, histogram, logit effects, neighbours, family and label."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import streamlit as st

from analysis.render import contexts_html
from analysis.tables import hist_edges
from app import data
from app.ui import analysed_run, guarded, highlight, histogram, html_table, latent_links, shown_token


@guarded
def render() -> None:
    path = str(data.workspace().path)
    run, version = analysed_run(path)
    raw = st.query_params.get("latent", "0")
    try:
        latent = int(raw)
    except ValueError as err:
        raise ValueError(f"latent must be a whole number, not {raw!r}") from err
    n_latents = len(data.latent_table(path, run, version))
    if not 0 <= latent < n_latents:
        st.error(f"Latent {latent} does not exist in run {run!r}: it has latents 0 to {n_latents - 1}.")
        return
    st.query_params["latent"] = str(latent)
    board = data.dashboard(path, run, latent, version)
    s = board["summary"]
    label = data.labels_for(path, run).get(latent, "")
    st.title(f"Latent {latent}" + (f" · {label}" if label else ""))
    c = st.columns(4)
    c[0].metric("Firing frequency", f"{s['freq']:.5f}")
    c[1].metric("Mean activation", f"{(s['mean_act'] or 0):.3f}")
    c[2].metric("Max activation", f"{(s['max_act'] or 0):.3f}")
    c[3].metric("Fires on", f"{s['n_fires']:,} tokens")

    explained = data.latent_explanations(path, run, latent)
    if explained:
        st.html(explanation_html(explained))
    else:
        st.caption(
            f"No explanation yet: `saewb explain {run} --workspace {path} --latents {latent}` writes one."
        )

    with st.form("label_form"):
        new = st.text_input("Label", value=label, placeholder="what this latent means")
        if st.form_submit_button("Save label"):
            data.save_label(path, run, latent, new)
            st.success("Label saved.")

    left, right = st.columns([3, 2])
    with left:
        st.subheader("Top activating contexts")
        scale = float(s["max_act"] or 1.0)
        if not board["top"]:
            st.caption("This latent never fired on the analysed tokens.")
        else:  # one element for all contexts: each element costs the browser a mount
            st.html(contexts_html(board["top"], scale))
        if board["bands"]:
            st.subheader("Samples by activation quantile band")
            ranges = {b: (lo, hi) for b, lo, hi in board["band_ranges"]}
            for band in sorted({c.band for c in board["bands"]}, reverse=True):
                lo, hi = ranges.get(band, (0.0, 0.0))
                with st.expander(f"band {band}: {lo:.3f} to {hi:.3f}"):
                    st.html(
                        "".join(
                            highlight(c.tokens, c.acts, scale, c.center)
                            for c in board["bands"]
                            if c.band == band
                        )
                    )
    with right:
        st.subheader("Activation histogram")
        hist = np.asarray(s["hist"] or [], dtype=float)
        if hist.size:
            edges = hist_edges(scale, hist.size)
            density = hist / max(hist.sum() * (edges[1] - edges[0]), 1e-12)
            st.html(histogram(density, edges))
        if s.get("logit_pos_tokens"):
            st.subheader("Logit effect")
            pos = pd.DataFrame(
                {"token": [shown_token(t) for t in s["logit_pos_tokens"]], "logit": s["logit_pos"]}
            )
            neg = pd.DataFrame(
                {"token": [shown_token(t) for t in s["logit_neg_tokens"]], "logit": s["logit_neg"]}
            )
            a, b = st.columns(2)
            a.caption("promoted")
            a.html(html_table(pos, formats={"logit": ".3f"}))
            b.caption("suppressed")
            b.html(html_table(neg, formats={"logit": ".3f"}))
        st.subheader("Nearest latents (decoder cosine)")
        latent_links(run, board["neighbors"][:8], lambda v: f"cos {v:.3f}", "nb")
        st.subheader("Co-occurring latents")
        latent_links(
            run,
            [(o, (n, z)) for o, n, z in board["cooccurring"][:8]],
            lambda v: f"{v[0]} tokens, {v[1]:.2f}",
            "co",
        )
        st.subheader("Family")
        fam = board["family"]
        if fam:
            st.html(html_table(pd.DataFrame(fam), {"weight": ".3f"}))
        else:
            st.caption("not part of a family")


def explanation_html(explained: dict[str, dict]) -> str:
    """The LLM's explanation and the token baseline's, each with its scores, side by side."""
    cells = []
    for kind, title in (("llm", "Explanation"), ("baseline", "Baseline (frequent tokens)")):
        e = explained.get(kind)
        if e is None:
            continue
        if e["status"] == "ok":
            body = html.escape(e["text"])
        else:
            body = f"<i>failed: {html.escape(e['error'] or 'no answer')}</i>"
        scores = " · ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in sorted(e["scores"].items()))
        cells.append(
            f'<div style="flex:1;padding:0.4rem 0.6rem;border:1px solid #ececf0;border-radius:6px">'
            f"<small>{title} · {html.escape(e['model'])}</small><div>{body}</div>"
            f"<small>{scores}</small></div>"
        )
    return f'<div style="display:flex;gap:0.6rem;margin-bottom:0.6rem">{"".join(cells)}</div>'


render()
