"""Text inspector: colour typed text by one latent, or list the top latents of each token."""

from __future__ import annotations

import numpy as np
import streamlit as st

from app import data
from app.ui import DASHBOARD, guarded, highlight, trained_run

DEFAULT_TEXT = "Return the number of items in a container. Raise KeyError if the key is missing."


@guarded
def render() -> None:
    st.title("Text inspector")
    path = str(data.workspace().path)
    run = trained_run(path, "inspect text with it")
    text = st.text_area("Text", value=st.query_params.get("text", DEFAULT_TEXT), key="inspect_text")
    if not text.strip():
        st.caption("Type or paste some text.")
        return
    st.query_params["text"] = text
    from app.inference import rank_latents, token_codes

    tokens, codes = token_codes(path, run, text)
    mode = st.radio("Show", ["one latent", "top latents per token"], horizontal=True, key="inspect_mode")
    if mode == "one latent":
        ranked = rank_latents(path, run, text)
        default = ranked[0][0] if ranked else 0
        latent = int(
            st.number_input(
                "Latent", min_value=0, max_value=codes.shape[1] - 1, value=default, key="inspect_latent"
            )
        )
        acts = codes[:, latent].tolist()
        st.html(highlight(tokens, acts, float(max(max(acts), 1e-6))))
        st.page_link(
            DASHBOARD, label=f"Open latent #{latent}", query_params={"run": run, "latent": str(latent)}
        )
        st.caption("Strongest latents on this text:")
        for j, best, tok in ranked[:8]:
            st.page_link(
                DASHBOARD, label=f"#{j}: {best:.2f} on {tok!r}", query_params={"run": run, "latent": str(j)}
            )
    else:
        rows = []
        for tok, code in zip(tokens, codes, strict=True):
            top = np.argsort(-code, kind="stable")[:5]
            rows.append(
                {
                    "token": tok,
                    **{
                        f"top{i + 1}": (f"#{j} ({code[j]:.2f})" if code[j] > 0 else "")
                        for i, j in enumerate(top)
                    },
                }
            )
        st.dataframe(rows, hide_index=True)


render()
