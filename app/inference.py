"""Running a run's model and SAE on text typed into the app (inspector, text search, interventions)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import streamlit as st

MAX_TEXT_TOKENS = 512
MODEL_LOCK = threading.Lock()
"""Held around every forward pass: a TransformerBridge's hooks are shared state, and Streamlit runs
sessions (and the runs page's warm-up) in threads of one process."""


@st.cache_resource(show_spinner=False, max_entries=2)
def model_and_run(path: str, run: str) -> tuple[Any, Any]:
    """(TransformerBridge, RunContext) of a run, loaded once per server process."""
    import sys

    from analysis.runs import load_run, load_run_model

    ctx = load_run(path, run)
    print(f"saewb app: loading model {ctx.model_name!r} for run {run!r}", file=sys.stderr, flush=True)
    return load_run_model(ctx), ctx


@st.cache_data(show_spinner=False, max_entries=64)
def token_codes(path: str, run: str, text: str) -> tuple[list[str], np.ndarray]:
    """Tokens of `text` (as the harvest cut them) and the SAE's code of each, [tokens, n_latents]."""
    import torch

    from activations.corpus import Document
    from activations.tokenize import TokenStrings, WindowTokenizer

    model, ctx = model_and_run(path, run)
    splitter = WindowTokenizer(model.tokenizer, min(ctx.ctx_len, MAX_TEXT_TOKENS))
    window = next(splitter.windows(0, Document(text=text, source="app")))
    ids = torch.from_numpy(window.token_ids[None, :])
    with MODEL_LOCK, torch.inference_mode():
        _, cache = model.run_with_cache(ids, names_filter=[ctx.hook])
        x = cache[ctx.hook][0].float().numpy()
    codes = np.array(ctx.sae.encode(x))  # a writable copy
    codes[window.special] = 0.0  # special tokens are outside the SAE's training distribution
    tokens = TokenStrings(model.tokenizer)(window.token_ids)
    return tokens, codes


def rank_latents(path: str, run: str, text: str) -> list[tuple[int, float, str]]:
    """Latents by their largest activation on `text`: (latent, value, token where it peaks)."""
    tokens, codes = token_codes(path, run, text)
    best = codes.max(axis=0)
    order = np.argsort(-best, kind="stable")
    return [(int(j), float(best[j]), tokens[int(codes[:, j].argmax())]) for j in order if best[j] > 0]
