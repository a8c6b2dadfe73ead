"""Every page of the feature browser through Streamlit's AppTest, on real workspaces."""

from __future__ import annotations

import os
from html import escape
from pathlib import Path

import duckdb
import pytest
from streamlit.testing.v1 import AppTest

MAIN = str(Path(__file__).resolve().parents[1] / "app" / "main.py")
PAGES = (
    "views/runs.py",
    "views/features.py",
    "views/dashboard.py",
    "views/inspector.py",
    "views/interventions.py",
)


def _app(ws: Path, page: str | None = None, **params: str) -> AppTest:
    os.environ["SAEWB_WORKSPACE"] = str(ws)
    at = AppTest.from_file(MAIN, default_timeout=120)
    for key, value in params.items():
        at.query_params[key] = value
    at.run()
    if page:
        at.switch_page(page)
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _text(at: AppTest) -> str:
    parts = [m.value for m in (*at.markdown, *at.info, *at.error, *at.caption, *at.title, *at.subheader)]
    return "\n".join(str(p) for p in parts)


@pytest.mark.parametrize("page", PAGES)
def test_missing_workspace_explains_itself(tmp_path: Path, page: str) -> None:
    at = _app(tmp_path / "nope.duckdb", page)
    assert "does not exist" in _text(at) and "saewb harvest" in _text(at)


def test_empty_workspace_and_harvest_only(tmp_path: Path, minilm_ws: Path) -> None:
    empty = tmp_path / "empty.duckdb"
    duckdb.connect(str(empty)).close()
    assert "empty" in _text(_app(empty))
    runs_page = _app(minilm_ws)
    assert "No training run yet" in _text(runs_page)
    features = _app(minilm_ws, "views/features.py")
    assert "No analysed run" in _text(features)


def test_every_page_renders_on_an_analysed_run(demo_ws: Path) -> None:
    for page in PAGES:
        at = _app(demo_ws, page, run="demo", latent="1")
        assert at.title, page
    runs_page = _app(demo_ws)
    tables = [d.value for d in runs_page.dataframe if "run" in d.value.columns]
    assert tables and "demo" in tables[0]["run"].tolist()


def test_dashboard_shows_contexts_and_rejects_unknown_latents(demo_ws: Path) -> None:
    from analysis import tables
    from saewb.workspace import Workspace

    stats = tables.latent_summary(Workspace(demo_ws), "demo")
    busiest = max(stats, key=lambda r: r["n_fires"])["latent"]
    at = _app(demo_ws, "views/dashboard.py", run="demo", latent=str(busiest))
    assert f"Latent {busiest}" in at.title[0].value
    html = "".join(h.proto.body for h in at.get("html"))
    assert 'class="tok"' in html  # highlighted context tokens with hover values
    dead = [r["latent"] for r in stats if r["n_fires"] == 0]
    assert dead, "the demo fixture has no latent that never fired: the dead-latent dashboard goes untested"
    never = _app(demo_ws, "views/dashboard.py", run="demo", latent=str(dead[0]))  # _app asserts no exception
    assert "never fired" in _text(never) and "Nearest latents (decoder cosine)" in _text(never)
    bad = _app(demo_ws, "views/dashboard.py", run="demo", latent="999999")
    assert "does not exist" in _text(bad)
    words = _app(demo_ws, "views/dashboard.py", run="demo", latent="seven")
    assert "whole number" in _text(words)


def test_label_is_saved_in_the_workspace(demo_ws: Path) -> None:
    at = _app(demo_ws, "views/dashboard.py", run="demo", latent="2")
    at.text_input[0].input("docstring openers")
    at.button[0].click()
    at.run()
    con = duckdb.connect(str(demo_ws), read_only=True)
    assert con.execute("SELECT label FROM latent_labels WHERE run = 'demo' AND latent = 2").fetchone() == (
        "docstring openers",
    )
    con.close()


def test_latent_table_sorts_and_pages_on_the_server(demo_ws: Path) -> None:
    from app.views.features import PAGE_ROWS

    at = _app(demo_ws, "views/features.py", run="demo")
    first = at.dataframe[0].value
    assert len(first) == PAGE_ROWS and list(first["latent"]) == list(range(PAGE_ROWS))
    at.selectbox(key="latent_sort").select("frequency, highest first")
    at.number_input(key="latent_page").set_value(2)
    at.run()
    second = at.dataframe[0].value
    con = duckdb.connect(str(demo_ws), read_only=True)
    n = con.execute("SELECT count(*) FROM latent_stats WHERE run = 'demo'").fetchone()[0]
    con.close()
    assert len(second) == PAGE_ROWS and n > 2 * PAGE_ROWS
    freqs = list(second["freq"])
    assert freqs == sorted(
        freqs, reverse=True
    )  # sorted over all latents, then cut: page 2 starts below page 1
    at.number_input(key="latent_page").set_value(1)
    at.run()
    assert min(at.dataframe[0].value["freq"]) >= max(freqs)
    last = -(-n // PAGE_ROWS)
    at.number_input(key="latent_page").set_value(last)
    at.run()
    assert len(at.dataframe[0].value) == n - (last - 1) * PAGE_ROWS
    at.number_input(key="latent_min_freq").set_value(float(sorted(freqs)[len(freqs) // 2]))
    at.run()  # the filter leaves fewer rows than the page started at: the page moves back to the last one
    assert not at.exception, [e.value for e in at.exception]
    left = at.dataframe[0].value
    assert 0 < len(left) <= PAGE_ROWS and at.number_input(key="latent_page").value < last


def test_search_text_goes_through_parameters_only(demo_ws: Path) -> None:
    at = _app(demo_ws, "views/features.py", run="demo")
    at.text_input(key="token_query").input("'; DROP TABLE tokens; --")
    at.run()
    assert not at.exception
    at.text_input(key="token_query").input("the")
    at.run()
    assert not at.exception
    con = duckdb.connect(str(demo_ws), read_only=True)
    assert con.execute("SELECT count(*) FROM tokens").fetchone()[0] > 0
    con.close()


def test_inspector_and_semantic_search_intervention(demo_ws: Path) -> None:
    at = _app(demo_ws, "views/inspector.py", run="demo")
    assert "tok" in "".join(h.proto.body for h in at.get("html"))
    iv = _app(demo_ws, "views/interventions.py", run="demo", latents="3", edit="steer", coeff="20")
    iv.button(key="iv_run").click()
    iv.run()
    assert not iv.exception
    result = next(d.value for d in iv.dataframe if "sim_edited" in d.value.columns)
    assert {"sim_clean", "sim_edited"} <= set(result.columns)
    assert (result["sim_clean"] != result["sim_edited"]).any()  # the steering moved the query


def test_concurrent_sessions_do_not_mix_forward_passes(demo_ws: Path) -> None:
    """Streamlit serves sessions in threads of one process, all sharing the cached model."""
    from concurrent.futures import ThreadPoolExecutor

    from app.inference import token_codes

    texts = [f"{'word ' * (3 + 5 * i)}end of text number {i}" for i in range(6)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda t: token_codes(str(demo_ws), "demo", t), texts))
    for tokens, codes in results:
        assert codes.shape[0] == len(tokens)
    assert len({len(tokens) for tokens, _ in results}) == len(texts)


def test_pages_have_no_bare_strings_for_streamlit_magic_to_print() -> None:
    """Streamlit's "magic" writes any bare string expression of a page script onto the page
    (only the module docstring is exempt), so attribute docstrings there show up as stray text."""
    import ast

    for page in PAGES:
        tree = ast.parse((Path(MAIN).parent / page).read_text())
        stray = [
            node.lineno
            for node in ast.walk(tree)
            if isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
            and node is not tree.body[0]
        ]
        funcs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        docstrings = {f.body[0].lineno for f in funcs if f.body and isinstance(f.body[0], ast.Expr)}
        assert [line for line in stray if line not in docstrings] == [], page


def test_next_token_tables_keep_whitespace_tokens_visible(tiny_lm_ws: Path) -> None:
    """The LM's likeliest next tokens after `def parse(text):` are newlines and indents; shown raw,
    their cells would look empty, so every token is shown quoted and escaped."""
    at = _app(
        tiny_lm_ws, "views/interventions.py", run="lm", latents="7", edit="steer", coeff="40", tokens="4"
    )
    at.button(key="iv_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    clean, edited = at.dataframe[0].value, at.dataframe[1].value
    for frame in (clean, edited):
        cells = list(frame["next token"])
        assert len(cells) == 10 and all(c[0] in "'\"" and c[-1] == c[0] for c in cells), cells
    assert any("\\n" in c for c in clean["next token"])  # a newline token is spelt out, not blank


def test_dashboard_histogram_and_logit_tables_show_the_stored_stats(tiny_lm_ws: Path) -> None:
    """The dashboard draws the stored histogram (one bar per bin, tallest at the modal bin) and the
    stored logit effects, as plain HTML."""
    import html as html_lib
    import re

    import numpy as np

    from analysis import tables
    from saewb.workspace import Workspace

    ws = Workspace(tiny_lm_ws)
    busiest = max(tables.latent_summary(ws, "lm"), key=lambda r: r["n_fires"])["latent"]
    summary = tables.dashboard(ws, "lm", busiest)["summary"]
    at = _app(tiny_lm_ws, "views/dashboard.py", run="lm", latent=str(busiest))
    page = "".join(h.proto.body for h in at.get("html"))
    heights = [float(h) for h in re.findall(r'density [^"]*" style="flex:1;height:([\d.]+)%', page)]
    assert len(heights) == len(summary["hist"]) and max(heights) == 100.0
    assert heights.index(100.0) == int(np.argmax(summary["hist"]))
    cells = re.findall(r"<td>([^<]*)</td>", page)
    assert summary["logit_pos_tokens"] and summary["logit_neg_tokens"]
    for token in (*summary["logit_pos_tokens"], *summary["logit_neg_tokens"]):
        assert html_lib.escape(repr(token)) in cells, token


def test_explanations_show_on_the_dashboard_table_and_search(explained_ws: Path) -> None:
    from analysis import explanations, tables
    from analysis.autointerp import select_latents

    latent = select_latents(tables.latent_summary(explained_ws, "demo"), sample=2, seed=0)[0]
    got = explanations.latent_explanations(explained_ws, "demo", latent)
    board = _app(explained_ws, "views/dashboard.py", run="demo", latent=str(latent))
    html = "".join(h.proto.body for h in board.get("html"))
    assert "Explanation · smollm2" in html and "Baseline (frequent tokens)" in html
    for kind in ("llm", "baseline"):
        assert escape(got[kind]["text"]) in html
    assert "embedding " in html  # the scores are shown beside each explanation
    assert board.text_input[0].value == ""  # the manual label box stays
    features = _app(explained_ws, "views/features.py", run="demo")
    frame = features.dataframe[0].value
    assert "explanation" in frame.columns and "label" in frame.columns
    contains = next(t for t in features.text_input if t.label == "Label or explanation contains")
    contains.input(got["llm"]["text"]).run()
    frame = features.dataframe[0].value
    assert latent in set(frame["latent"]) and set(frame["explanation"]) == {got["llm"]["text"]}
    contains.input("").run()
    search = next(t for t in features.text_input if t.key == "explanation_query")
    search.input(got["llm"]["text"]).run()
    # the search's results are the links "#latent: text (score)" (the page has other links, "Open latent")
    results = [p.proto.label for p in features.get("page_link") if p.proto.label.startswith("#")]
    # its own text ranks it first, or second behind a latent whose explanation is the same words
    assert any(label.startswith(f"#{latent}: ") for label in results[:2]), results
    assert results[0].endswith("(1.00)"), results
    hist = "".join(h.proto.body for h in features.get("html"))
    assert "embedding · llm: mean" in hist and "embedding · baseline: mean" in hist
