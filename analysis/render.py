"""HTML for a latent's contexts: tokens shaded by activation, the way the app draws them.

The app's pages (`app/views/dashboard.py`, `app/views/inspector.py`) and the notebook API's
``_repr_html_`` (`saewb/api.py`) both draw with these, so a context looks the same in the browser
and in a notebook. No Streamlit import: a notebook can use it without the app.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any


def highlight(tokens: list[str], acts: list[float], scale: float, center: int | None = None) -> str:
    """Tokens as HTML spans shaded by activation, the value in a hover title."""
    spans = []
    scale = scale if scale > 0 else 1.0
    for i, (tok, act) in enumerate(zip(tokens, acts, strict=True)):
        alpha = max(0.0, min(1.0, act / scale))
        border = "border-bottom:2px solid #c2410c;" if i == center else ""
        spans.append(
            f'<span class="tok" title="{act:.3f}" style="background:rgba(234,88,12,{alpha:.2f});{border}'
            f'padding:1px 0;border-radius:2px">{html.escape(tok)}</span>'
        )
    return (
        '<div style="font-family:monospace;line-height:1.9;white-space:pre-wrap">' + "".join(spans) + "</div>"
    )


def contexts_html(contexts: Sequence[Any], scale: float) -> str:
    """Top contexts (``analysis.tables.Context``) as one block: value and document above each."""
    return "".join(
        f'<div style="margin-bottom:0.5rem"><small>{ctx.value:.3f} · doc {ctx.doc_id}</small>'
        f"{highlight(ctx.tokens, ctx.acts, scale, ctx.center)}</div>"
        for ctx in contexts
    )
