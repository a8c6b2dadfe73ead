"""`saewb explain`: the real SmolLM2 explainer, a real OpenAI-compatible server, resume, cache, bad input."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from conftest import EXPLAIN_TEST_CONFIG, run_saewb

from analysis import explanations as store
from analysis import tables
from analysis.autointerp import (
    SCORERS,
    ExplainConfig,
    Shown,
    auroc,
    balanced_accuracy,
    baseline_explanation,
    explain_run,
    parse_explanation,
    parse_ranges,
    select_latents,
)
from analysis.llm import EndpointError, LLMAnswerError, OpenAIChat, make_backend
from analysis.llm_server import serve_in_thread


def _copy(ws: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ws.duckdb"
    shutil.copy(ws, out)
    return out


def test_smollm2_explains_and_scores_every_selected_latent(explained_ws: Path) -> None:
    latents = select_latents(tables.latent_summary(explained_ws, "demo"), sample=2, seed=0)
    for lat in latents:
        got = store.latent_explanations(explained_ws, "demo", lat)
        assert set(got) == {"llm", "baseline"}
        assert got["baseline"]["text"].startswith("the tokens ")
        llm = got["llm"]
        assert llm["model"] == "smollm2" and llm["prompt_version"]
        assert llm["status"] == "ok" and llm["text"], llm  # the real model answered something usable
        assert len(llm["context_ids"]) >= 3  # the contexts shown are recorded
        for ex in got.values():
            assert set(ex["scores"]) == set(SCORERS)
            for s in ex["scores"].values():
                assert s is None or 0.0 <= s <= 1.0
            assert any(s is not None for s in ex["scores"].values())
    counts = store.count_rows(explained_ws, "demo")
    assert counts["explanations"] == 4 and counts["scores"] == 12 and counts["cache"] > 0


def test_rerun_resumes_without_duplicates_and_cache_answers_redone_latents(
    explained_ws: Path, smollm2_chat: object, tmp_path: Path
) -> None:
    ws = _copy(explained_ws, tmp_path)
    latents = select_latents(tables.latent_summary(ws, "demo"), sample=2, seed=0)
    before = store.count_rows(ws, "demo")
    cfg = ExplainConfig(**EXPLAIN_TEST_CONFIG)
    again = explain_run(ws, "demo", smollm2_chat, cfg, latents=latents)
    assert again["explained"] == 0 and again["skipped_done"] == 2 and again["prompts_sent"] == 0
    assert store.count_rows(ws, "demo") == before
    # A latent lost mid-job (as after a kill between chunks) is redone; its prompts come from the cache.
    store.forget(ws, "demo", [latents[0]])
    redo = explain_run(ws, "demo", smollm2_chat, cfg, latents=latents)
    assert redo["explained"] == 1 and redo["prompts_sent"] == 0 and redo["cache_hits"] > 0
    assert store.count_rows(ws, "demo") == before
    assert (
        store.latent_explanations(ws, "demo", latents[0])["llm"]["text"]
        == store.latent_explanations(explained_ws, "demo", latents[0])["llm"]["text"]
    )


def test_http_backend_through_the_openai_client_records_a_bad_answer_and_goes_on(
    explained_ws: Path, smollm2_chat: object, tmp_path: Path
) -> None:
    ws = _copy(explained_ws, tmp_path)
    store.forget(ws, "demo", list(range(512)))
    broken: list[int] = []

    def flaky(chats: list, max_tokens: int) -> list:
        # The first explanation request gets an empty answer, as from a misbehaving server.
        if "have in common" in chats[0][-1]["content"] and not broken:
            broken.append(1)
            return [""]
        return smollm2_chat.chat(chats, max_tokens)

    server, url = serve_in_thread(flaky, "smollm2")
    try:
        backend = make_backend(url, "smollm2", timeout_s=60)
        assert isinstance(backend, OpenAIChat)
        latents = select_latents(tables.latent_summary(ws, "demo"), sample=2, seed=0)
        cfg = ExplainConfig(**{**EXPLAIN_TEST_CONFIG, "scorers": ("detection", "embedding")})
        out = explain_run(ws, "demo", backend, cfg, latents=latents)
        assert out["explained"] == 2 and out["failures"] >= 1
        status = {lat: store.latent_explanations(ws, "demo", lat)["llm"] for lat in latents}
        failed = [lat for lat, e in status.items() if e["status"] == "failed"]
        assert len(failed) == 1 and "empty answer" in status[failed[0]]["error"]
        ok = [lat for lat in latents if lat not in failed][0]
        assert status[ok]["text"] and 0 <= status[ok]["scores"]["embedding"] <= 1
        detection = [s for s in store.score_table(ws, "demo") if s["scorer"] == "detection"]
        unreadable = [f for f in store.failures(ws, "demo") if f["what"] == "detection"]
        assert all(0 <= s["score"] <= 1 for s in detection)  # yes/no read from the 135M model's text, or
        for f in unreadable:  # a failure that says why
            assert "malformed answer" in f["error"] or (
                f["latent"] == failed[0] and "no explanation" in f["error"]
            )
        assert len(detection) + len(unreadable) == 4
        assert all(
            store.latent_explanations(ws, "demo", lat)["baseline"]["status"] == "ok" for lat in latents
        )
        # Run again against the healthy server: the failed latent is redone (with it any latent whose
        # yes/no answers were unreadable), nothing is duplicated and what was stored stays.
        kept = status[ok]["text"]
        again = explain_run(ws, "demo", backend, cfg, latents=latents)
        assert again["explained"] >= 1
        assert store.latent_explanations(ws, "demo", failed[0])["llm"]["status"] == "ok"
        assert store.latent_explanations(ws, "demo", ok)["llm"]["text"] == kept
        assert store.count_rows(ws, "demo")["explanations"] == 4
        # A wrong model name or a wrong API path: refused before any work, one line.
        with pytest.raises(EndpointError, match="not served by"):
            make_backend(url, "gpt-none")
        with pytest.raises(EndpointError, match="HTTP 404"):
            make_backend(url.removesuffix("/v1") + "/nope", "smollm2")
    finally:
        server.shutdown()
        server.server_close()


def test_unreachable_endpoint_is_one_line_before_any_work(demo_ws: Path, tmp_path: Path) -> None:
    ws = _copy(demo_ws, tmp_path)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_saewb(
        "explain",
        "demo",
        "--workspace",
        str(ws),
        "--latents",
        "0-3",
        "--explainer-url",
        f"http://127.0.0.1:{port}/v1",
        "--explainer-model",
        "m",
        "--timeout-s",
        "5",
        check=False,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and "cannot reach the explainer endpoint" in lines[0]
        and "--explainer-url" in lines[0]
    )
    assert "Traceback" not in proc.stderr
    assert store.count_rows(ws, "demo") == {"explanations": 0, "scores": 0, "cache": 0}


def test_selection_parsing_and_scores() -> None:
    stats = [
        {"latent": i, "n_fires": 0 if i % 3 == 0 else i, "freq": i / 10, "max_act": 1.0, "mean_act": 1.0}
        for i in range(10)
    ]
    assert parse_ranges("0-3,7") == [0, 1, 2, 3, 7]
    with pytest.raises(ValueError, match="like 0-99"):
        parse_ranges("a-b")
    assert select_latents(stats, latents="0-4") == [1, 2, 4]  # dead latents skipped, any live one kept
    assert select_latents(stats, top_by="freq", limit=2, min_fires=1) == [7, 8]
    sample = select_latents(stats, sample=3, seed=0, min_fires=1)
    assert len(sample) == 3 and all(i % 3 for i in sample)
    assert sample == select_latents(stats, sample=3, seed=0, min_fires=1)
    assert select_latents(stats, min_fires=1) == [1, 2, 4, 5, 7, 8]
    # too few firings to explain or score: left out of --sample, --top-by and "all", not of --latents
    assert select_latents(stats, min_fires=5) == [5, 7, 8]
    assert set(select_latents(stats, sample=5, seed=0, min_fires=5)) == {5, 7, 8}
    assert select_latents(stats, top_by="freq", min_fires=8) == [8]
    assert select_latents(stats) == []  # the default MIN_FIRES (10) is above every count here
    assert auroc(np.array([0.9, 0.8]), np.array([0.1, 0.8])) == pytest.approx(0.875)
    assert balanced_accuracy([True, True, False, False], [True, None, False, True]) == pytest.approx(0.5)
    assert parse_explanation("The marked tokens have in common: numbers in code.\nmore") == "numbers in code"
    for bad in ("", "  \n ", "I'm sorry, I cannot help", "<<>>"):
        with pytest.raises(LLMAnswerError):
            parse_explanation(bad)
    ctx = [Shown(0, [" a", " def", " f"], [0, 1, 0], 1), Shown(1, [" x", " def", " g"], [0, 2, 0], 1)]
    assert baseline_explanation(ctx) == 'the tokens "def"; often after "a" and before "f"'


def test_killed_job_resumes_without_duplicates_or_losses(
    explained_ws: Path, smollm2_chat: object, tmp_path: Path
) -> None:
    """A `kill -9` in the middle of a job: whole latents only are stored, and a rerun completes the rest."""
    import os
    import subprocess
    import sys
    import threading

    ws = _copy(explained_ws, tmp_path)
    store.forget(ws, "demo", list(range(512)))
    explains: list[int] = []
    second, release = threading.Event(), threading.Event()

    def gate(chats: list, max_tokens: int) -> list:
        if "have in common" in chats[0][-1]["content"]:
            explains.append(1)
            if len(explains) == 2:  # the second latent's explanation: hold it until the job is killed
                second.set()
                release.wait(120)
        return smollm2_chat.chat(chats, max_tokens)

    server, url = serve_in_thread(gate, "smollm2")
    latents = select_latents(tables.latent_summary(ws, "demo"), sample=3, seed=1)
    cfg = {**EXPLAIN_TEST_CONFIG, "scorers": ("detection",), "chunk": 1}
    job = (
        "from analysis.autointerp import ExplainConfig, explain_run\nfrom analysis.llm import make_backend\n"
        f"explain_run({str(ws)!r}, 'demo', make_backend({url!r}, 'smollm2'), ExplainConfig(**{cfg!r}), "
        f"latents={latents!r})\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    child = subprocess.Popen([sys.executable, "-c", job], env={**os.environ, "PYTHONPATH": root}, cwd=root)
    try:
        assert second.wait(120), "the job never reached its second latent"
        child.kill()
        child.wait(30)
        release.set()
        stored = store.count_rows(ws, "demo")
        assert stored["explanations"] == 2 and stored["scores"] == 2  # the first latent, whole
        first = store.latent_explanations(ws, "demo", latents[0])["llm"]
        backend = make_backend(url, "smollm2")
        out = explain_run(ws, "demo", backend, ExplainConfig(**cfg), latents=latents)
        assert out["explained"] >= 2
        assert (
            store.count_rows(ws, "demo")["explanations"] == 6 and store.count_rows(ws, "demo")["scores"] == 6
        )
        if first["status"] == "ok":
            assert store.latent_explanations(ws, "demo", latents[0])["llm"]["text"] == first["text"]
    finally:
        release.set()
        if child.poll() is None:
            child.kill()
        server.shutdown()
        server.server_close()
