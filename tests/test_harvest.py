"""The harvester against real models and a real DuckDB file."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from activations.corpus import CorpusError, CorpusSpec, iter_documents, stdlib_docs
from activations.harvest import HarvestConfig, run_harvest
from activations.models import ModelNotAvailableError, UnknownHookError, load_model, plan_hooks
from activations.reader import read_activations
from activations.store import HarvestError, harvest_info
from saewb.workspace import Workspace


def test_tokens_are_contiguous_and_flag_cls_sep(minilm_ws: Path) -> None:
    info = harvest_info(minilm_ws)
    assert info.status == "complete"
    assert set(info.hooks) == {"blocks.1.hook_out", "blocks.2.hook_out"}  # resid_post stored as its alias
    con = duckdb.connect(str(minilm_ws), read_only=True)
    n, lo, hi, distinct = con.execute(
        "SELECT count(*), min(tok_idx), max(tok_idx), count(DISTINCT tok_idx) FROM tokens"
    ).fetchone()
    assert (n, lo, hi, distinct) == (info.n_tokens, 0, info.n_tokens - 1, info.n_tokens)
    assert 6000 <= n < 6000 + 64
    # every window starts with [CLS] and ends with [SEP], both flagged special, nothing else is
    firsts = con.execute("SELECT DISTINCT token_str, is_special FROM tokens WHERE seq_pos = 0").fetchall()
    assert firsts == [("[CLS]", True)]
    lasts = con.execute(
        "SELECT DISTINCT token_str FROM tokens t WHERE seq_pos = (SELECT max(seq_pos) FROM tokens u WHERE u.seq_id = t.seq_id)"
    ).fetchall()
    assert lasts == [("[SEP]",)]
    assert con.execute(
        "SELECT count(*) FROM tokens WHERE is_special AND token_str NOT IN ('[CLS]', '[SEP]')"
    ).fetchone() == (0,)
    # (doc_id, pos) is unique, and each activation table has one row per token
    assert con.execute("SELECT count(*) FROM (SELECT DISTINCT doc_id, pos FROM tokens)").fetchone() == (n,)
    con.close()
    for table in info.tables.values():
        idx, x = read_activations(Workspace(minilm_ws), table, 0, n + 100)
        assert x.shape == (n, info.hooks[next(iter(info.hooks))]) and np.array_equal(idx, np.arange(n))


def test_stored_activations_match_a_direct_forward(minilm_ws: Path) -> None:
    """Window 0 of the first document, recomputed with a plain run_with_cache, equals the cache."""
    info = harvest_info(minilm_ws)
    con = duckdb.connect(str(minilm_ws), read_only=True)
    seq = con.execute("SELECT seq_id FROM tokens WHERE doc_id = 0 AND pos = 0").fetchone()[0]
    rows = con.execute(
        "SELECT tok_idx, token_id FROM tokens WHERE seq_id = ? ORDER BY seq_pos", [seq]
    ).fetchall()
    con.close()
    model = load_model("minilm")
    ids = torch.tensor([[r[1] for r in rows]])
    with torch.inference_mode():
        _, cache = model.run_with_cache(ids, names_filter=["blocks.2.hook_out"])
    expected = cache["blocks.2.hook_out"][0].numpy()
    _, stored = read_activations(
        Workspace(minilm_ws), info.tables["blocks.2.hook_out"], rows[0][0], rows[-1][0] + 1
    )
    np.testing.assert_allclose(stored, expected, atol=2e-4, rtol=1e-3)  # stored as float16: 2^-11 relative


def test_long_documents_are_split_into_windows_not_truncated(tmp_path: Path) -> None:
    text = " ".join(f"word{i}" for i in range(300))
    corpus = tmp_path / "long.txt"
    corpus.write_text(text + "\nshort line\n")
    ws = tmp_path / "ws.duckdb"
    run_harvest(
        HarvestConfig(corpus=str(corpus), hooks=("blocks.0.hook_out",), ctx_len=32), ws, progress=False
    )
    model = load_model("minilm")
    body = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    con = duckdb.connect(str(ws), read_only=True)
    stored = [
        r[0]
        for r in con.execute(
            "SELECT token_id FROM tokens WHERE doc_id = 0 AND NOT is_special ORDER BY pos"
        ).fetchall()
    ]
    windows = con.execute(
        "SELECT count(DISTINCT seq_id), max(seq_pos) FROM tokens WHERE doc_id = 0"
    ).fetchone()
    assert stored == body  # every token, in order, none lost
    assert windows == (-(-len(body) // 30), 31)
    assert con.execute("SELECT count(*) FROM documents").fetchone() == (2,)
    con.close()


def test_causal_lm_gets_bos_and_chat_roles(tiny_gpt2: Path, tmp_path: Path) -> None:
    chat = tmp_path / "chat.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": "What does zip do?"},
                {"role": "assistant", "content": "It pairs items."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Define a class."},
                {"role": "assistant", "content": "Use the class keyword."},
            ]
        },
    ]
    chat.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ws = tmp_path / "ws.duckdb"
    info = run_harvest(
        HarvestConfig(
            model=str(tiny_gpt2), corpus=str(chat), chat=True, hooks=("blocks.1.hook_resid_post",), ctx_len=64
        ),
        ws,
        progress=False,
    )
    assert info.hooks == {"blocks.1.hook_out": 64}
    con = duckdb.connect(str(ws), read_only=True)
    per_seq = con.execute("SELECT seq_id, doc_id FROM tokens GROUP BY ALL ORDER BY seq_id").fetchall()
    assert sorted(d for _, d in per_seq) == [0, 1]  # one conversation per sequence, never packed
    roles = dict(con.execute("SELECT role, count(*) FROM tokens GROUP BY role").fetchall())
    assert {"user", "assistant", "template"} <= set(roles)
    text = "".join(
        r[0]
        for r in con.execute(
            "SELECT token_str FROM tokens WHERE doc_id = 0 AND role = 'assistant' ORDER BY pos"
        ).fetchall()
    )
    assert text.strip() == "It pairs items."
    assert con.execute(
        "SELECT bool_and(is_special) FROM tokens WHERE token_str = '<|endoftext|>'"
    ).fetchone() == (True,)
    con.close()

    plain = tmp_path / "plain.txt"
    plain.write_text("a plain document\n")
    run_harvest(
        HarvestConfig(model=str(tiny_gpt2), corpus=str(plain), hooks=("blocks.0.hook_out",), name="plain"),
        ws,
        progress=False,
    )
    con = duckdb.connect(str(ws), read_only=True)
    first = con.execute(
        "SELECT token_str, is_special FROM tokens WHERE harvest = 'plain' ORDER BY tok_idx LIMIT 1"
    ).fetchone()
    assert first == ("<|endoftext|>", True)  # BOS prepended, as TransformerLens does for causal LMs
    con.close()


def test_corpus_formats(tmp_path: Path) -> None:
    texts = ["first doc", "second doc", "third doc"]
    (tmp_path / "c.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in texts) + "\n")
    pq.write_table(pa.table({"body": texts}), tmp_path / "c.parquet")
    got = {
        "txt": [d.text for d in iter_documents(CorpusSpec(str(tmp_path / "c.txt")))],
        "whole": [d.text for d in iter_documents(CorpusSpec(str(tmp_path / "c.txt"), doc_per_line=False))],
        "jsonl": [d.text for d in iter_documents(CorpusSpec(str(tmp_path / "c.jsonl"), text_column="body"))],
        "parquet": [
            d.text for d in iter_documents(CorpusSpec(str(tmp_path / "c.parquet"), text_column="body"))
        ],
    }
    assert got["txt"] == got["jsonl"] == got["parquet"] == texts
    assert got["whole"] == ["\n".join(texts) + "\n"]
    with pytest.raises(CorpusError, match="--text-column"):
        list(iter_documents(CorpusSpec(str(tmp_path / "c.jsonl"), text_column="text")))
    with pytest.raises(CorpusError, match="neither a built-in"):
        list(iter_documents(CorpusSpec(str(tmp_path / "missing.txt"))))


def test_datasets_directory_corpus(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="datasets is a dev dependency installed by make test")
    datasets.Dataset.from_dict({"text": ["alpha beta", "gamma delta"]}).save_to_disk(str(tmp_path / "ds"))
    docs = list(iter_documents(CorpusSpec(str(tmp_path / "ds"))))
    assert [d.text for d in docs] == ["alpha beta", "gamma delta"]


def test_stdlib_docs_is_deterministic_and_about_a_megabyte() -> None:
    a = list(stdlib_docs())
    b = list(stdlib_docs())
    assert [d.source for d in a] == [d.source for d in b]
    size = sum(len(d.text) for d in a)
    assert 700_000 <= size <= 1_100_000
    modules = {d.source.split(".")[0] for d in a}
    assert {"asyncio", "json", "zipfile"} <= modules  # it spans the library, not just its first files


def test_hook_errors_and_aliases() -> None:
    model = load_model("minilm")
    plan = plan_hooks(model, ["blocks.3.hook_resid_post", "blocks.3.hook_out", "blocks.1.attn.hook_out"])
    assert plan.hooks == ("blocks.3.hook_out", "blocks.1.attn.hook_out")
    assert plan.stop_at_layer == 4
    with pytest.raises(UnknownHookError, match="blocks.3.hook_resid_post"):
        plan_hooks(model, ["blocks.3.hook_resid_pots"])


def test_model_not_available_offline_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="--model /path/to"):
        load_model("no-such-org/no-such-model-xyz")


def test_different_config_under_same_name_is_refused(minilm_ws: Path, tmp_path: Path) -> None:
    ws = tmp_path / "copy.duckdb"
    ws.write_bytes(minilm_ws.read_bytes())
    before = harvest_info(ws).n_tokens
    cfg = HarvestConfig(hooks=("blocks.1.hook_out", "blocks.2.hook_out"), ctx_len=32, max_tokens=6000)
    with pytest.raises(HarvestError, match="ctx_len: stored 64, now 32"):
        run_harvest(cfg, ws, progress=False)
    assert harvest_info(ws).n_tokens == before  # nothing written


def test_hub_name_loads_from_the_local_cache_offline(tiny_gpt2: Path, tmp_path: Path) -> None:
    """`--model org/name` works with no network when the weights are in the Hugging Face cache."""
    import os
    import shutil
    import subprocess
    import sys

    snapshot = tmp_path / "hf" / "hub" / "models--local-org--tiny-gpt2" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_gpt2, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    code = "from activations.models import load_model; m = load_model('local-org/tiny-gpt2'); print(m.cfg.n_layers)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "2"
