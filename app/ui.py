"""Small pieces shared by the pages: error display, token highlighting, links between pages."""

from __future__ import annotations

import functools
import html
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from analysis.render import highlight
from app import data

__all__ = ["highlight"]  # drawn by analysis.render, shared with the notebook API

DASHBOARD = "views/dashboard.py"
TABLE_CSS = (
    "<style>.swb-table{border-collapse:collapse;font-size:0.85rem;width:100%}"
    ".swb-table th{text-align:left;border-bottom:2px solid #d4d4d8;padding:3px 8px;white-space:nowrap}"
    ".swb-table td{border-bottom:1px solid #ececf0;padding:2px 8px;white-space:pre}"
    ".swb-table td.num{text-align:right;font-variant-numeric:tabular-nums}"
    ".swb-table tr:hover td{background:#fff7ed}</style>"
)


def guarded(render: Callable[[], None]) -> Callable[[], None]:
    """Show our own errors as a message in the page, never as a traceback."""

    @functools.wraps(render)
    def page() -> None:
        try:
            render()
        except data.AppDataError as err:
            st.info(str(err))
        except (ValueError, LookupError, FileNotFoundError) as err:
            st.error(str(err))

    return page


def pick_run(runs: list[str], key: str = "run") -> str:
    """A run selector that follows (and sets) the `run` query parameter, so URLs can be shared."""
    wanted = st.query_params.get("run")
    index = runs.index(wanted) if wanted in runs else 0
    run = st.selectbox("Run", runs, index=index, key=key)
    st.query_params["run"] = run
    return run


def trained_run(path: str, purpose: str) -> str:
    """The selected run, finished runs first; an explanation when nothing has been trained."""
    runs = data.runs_frame(path)
    if runs.empty:
        raise data.AppDataError(f"No trained run yet: train one with `saewb train` to {purpose}.")
    return pick_run(list(runs[runs["status"] == "done"]["run"]) or list(runs["run"]))


def analysed_run(path: str) -> tuple[str, str]:
    """The selected analysed run and its analysis version; an explanation when there is none."""
    analysed = data.analysed_runs(path)
    if not analysed:
        trained = data.runs_frame(path)
        hint = f" Runs without analysis: {', '.join(trained['run'])}." if len(trained) else ""
        raise data.AppDataError(
            "No analysed run in this workspace yet. Run `saewb analyze RUN --workspace ...` after training."
            + hint
        )
    run = pick_run(list(analysed))
    return run, analysed[run]


def shown_token(token: str) -> str:
    """A token as a table cell: quoted and escaped, so whitespace tokens (`\\n   `, ` `) stay visible."""
    return repr(token)


def html_table(frame: pd.DataFrame, formats: dict[str, str] | None = None) -> str:
    """A small table as plain HTML: a few rows need no grid widget to load and mount."""
    formats = formats or {}
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for values in frame.itertuples(index=False):
        cells = []
        for column, value in zip(frame.columns, values, strict=True):
            if isinstance(value, int | float | np.number) and not isinstance(value, bool):
                cells.append(f'<td class="num">{_number(value, formats.get(column))}</td>')
            else:
                cells.append(f"<td>{'' if value is None else html.escape(str(value))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'{TABLE_CSS}<table class="swb-table"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def histogram(density: np.ndarray, edges: np.ndarray, height_px: int = 160, label: str = "activation") -> str:
    """Bars as plain HTML (no chart library to load and mount), each bar's range and density on hover."""
    top = float(density.max()) if density.size and density.max() > 0 else 1.0
    bars = "".join(
        f'<div title="{lo:.3f} to {hi:.3f}: density {d:.4g}" style="flex:1;height:{max(d / top * 100, 0.5):.1f}%;'
        f'background:#ea580c;margin-right:1px"></div>'
        for d, lo, hi in zip(density, edges[:-1], edges[1:], strict=True)
    )
    return (
        f'<div style="display:flex;align-items:flex-end;height:{height_px}px;border-bottom:1px solid #a1a1aa">{bars}</div>'
        f'<div style="display:flex;justify-content:space-between;font-size:0.75rem;color:#71717a">'
        f"<span>{edges[0]:.2f}</span><span>{label}</span><span>{edges[-1]:.2f}</span></div>"
    )


def _number(value: float, spec: str | None) -> str:
    if pd.isna(value):
        return ""
    if spec is None:  # whole numbers (ids, counts; NaN turns int columns float) print whole
        spec = "d" if float(value).is_integer() else ".4g"
    return format(int(value) if spec.endswith("d") else value, spec)


def latent_links(run: str, latents: list[tuple[int, Any]], fmt: Callable[[Any], str], key: str) -> None:
    """One link per latent, to its dashboard."""
    if not latents:
        st.caption("none")
        return
    for latent, extra in latents:
        st.page_link(
            DASHBOARD, label=f"#{latent} · {fmt(extra)}", query_params={"run": run, "latent": str(latent)}
        )
