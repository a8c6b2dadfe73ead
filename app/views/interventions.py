"""Interventions: edit latents on a prompt and compare the model's output with and without the edit.

Every control mirrors a URL query parameter, so a result can be shared by copying the address.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import data
from app.ui import guarded, shown_token, trained_run

EDITS = ("steer", "ablate", "clamp", "scale")


def _param(name: str, default: str) -> str:
    return st.query_params.get(name, default)


@guarded
def render() -> None:
    st.title("Interventions")
    path = str(data.workspace().path)
    run = trained_run(path, "intervene with its latents")
    from analysis.evaluate import is_causal_lm
    from analysis.interventions import Intervention, intervene_lm, semantic_search
    from analysis.splice import LatentEdit, Steering
    from app.inference import MODEL_LOCK, model_and_run

    model, ctx = model_and_run(path, run)
    causal = is_causal_lm(model)
    c1, c2, c3 = st.columns(3)
    latents_raw = c1.text_input(
        "Latents (comma-separated ids)", value=_param("latents", "0"), key="iv_latents"
    )
    edit = c2.selectbox(
        "Edit",
        EDITS,
        index=EDITS.index(_param("edit", "steer")) if _param("edit", "steer") in EDITS else 0,
        key="iv_edit",
    )
    coeff = c3.number_input("Coefficient / value", value=float(_param("coeff", "5.0")), key="iv_coeff")
    prompt = st.text_area(
        "Prompt" if causal else "Query", value=_param("prompt", "def parse(text):"), key="iv_prompt"
    )
    candidates_raw = ""
    new_tokens = 20
    if causal:  # greedy generation, clean and edited, from the same prompt
        new_tokens = int(
            st.number_input(
                "New tokens to generate",
                min_value=0,
                max_value=200,
                step=1,
                value=int(_param("tokens", "20")),
                key="iv_tokens",
            )
        )
    else:
        candidates_raw = st.text_area(
            "Candidate texts (one per line)",
            key="iv_candidates",
            value=_param(
                "candidates", "Open a file for reading.\nSort a list in place.\nParse a JSON document."
            ),
        )
    try:
        latents = [int(v) for v in latents_raw.replace(" ", "").split(",") if v]
    except ValueError as err:
        raise ValueError(f"latents must be comma-separated whole numbers, not {latents_raw!r}") from err
    if not latents:
        st.caption("Give at least one latent id.")
        return
    st.query_params.update({"latents": latents_raw, "edit": edit, "coeff": str(coeff), "prompt": prompt})
    if causal:
        st.query_params["tokens"] = str(new_tokens)
    if edit == "steer":
        iv = Intervention(steering=[Steering(latent=j, coeff=coeff) for j in latents])
    else:
        iv = Intervention(edits=[LatentEdit(op=edit, latents=tuple(latents), value=coeff)])
    if not st.button("Run", key="iv_run", type="primary"):
        return
    if causal:
        with MODEL_LOCK:
            r = intervene_lm(model, ctx, prompt, iv, max_new_tokens=new_tokens, seed=0)
        a, b = st.columns(2)
        a.subheader("Clean")
        a.dataframe(_next_tokens(r.top_clean), hide_index=True)
        a.code(prompt + r.generated_clean)
        b.subheader("Edited")
        b.dataframe(_next_tokens(r.top_edited), hide_index=True)
        b.code(prompt + r.generated_edited)
        if new_tokens:
            same = r.generated_clean == r.generated_edited
            st.caption(
                "the edit left the generation unchanged" if same else "the edit changed the generation"
            )
        st.caption(f"largest logit change: {r.max_abs_logit_diff:.3f}")
        st.dataframe(pd.DataFrame(r.logit_diff), hide_index=True)
    else:
        st.query_params["candidates"] = candidates_raw
        cands = [c for c in candidates_raw.splitlines() if c.strip()]
        with MODEL_LOCK:
            r = semantic_search(model, ctx, prompt, cands, iv)
        frame = pd.DataFrame(r.rows)
        frame["rank_clean"] = frame["sim_clean"].rank(ascending=False).astype(int)
        frame["rank_edited"] = frame["sim_edited"].rank(ascending=False).astype(int)
        st.subheader("Semantic search, before and after the edit")
        st.dataframe(frame.sort_values("sim_edited", ascending=False), hide_index=True, key="iv_result")


def _next_tokens(top: list[tuple[str, float]]) -> pd.DataFrame:
    return pd.DataFrame([(shown_token(t), p) for t, p in top], columns=["next token", "p"])


render()
