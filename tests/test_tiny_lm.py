"""The built-in causal LM `tiny-lm`: shipped, loadable offline, trained, and reproducible from its script."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import test_eval_support as support
from conftest import TINY_LM_HOOK

from activations.models import TINY_LM_DIR, resolve_model_source

REPO = Path(__file__).resolve().parents[1]


def _script():
    """scripts/train_tiny_lm.py as a module (it is a script, not part of the package)."""
    if "train_tiny_lm" in sys.modules:
        return sys.modules["train_tiny_lm"]
    spec = importlib.util.spec_from_file_location("train_tiny_lm", REPO / "scripts" / "train_tiny_lm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_tiny_lm"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_shipped_files_are_small_and_described() -> None:
    files = {p.name: p.stat().st_size for p in TINY_LM_DIR.iterdir()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "manifest.json"):
        assert name in files, name
    assert sum(files.values()) <= 25 * 2**20
    manifest = json.loads((TINY_LM_DIR / "manifest.json").read_text())
    result = manifest["result"]
    # Clearly below the bigram baseline on the same validation targets (docs/tiny_lm.md).
    assert result["val_ppl"] < 0.8 * result["baselines"]["bigram"]["ppl"]
    assert result["baselines"]["bigram"]["ppl"] < result["baselines"]["unigram"]["ppl"]
    assert manifest["corpus"]["sources"][0]["source"] == "stdlib"
    assert resolve_model_source("tiny-lm") == str(TINY_LM_DIR)


def test_tiny_lm_predicts_docstrings_far_better_than_chance() -> None:
    """A real forward pass: CE on stdlib docstrings is far below ln(vocab), where an untrained model sits."""
    import torch

    from activations.corpus import stdlib_docs
    from analysis.evaluate import is_causal_lm

    model = support.model("tiny-lm")
    assert is_causal_lm(model) and model.cfg.n_layers == 2
    tok = model.tokenizer
    texts = [d.text for _, d in zip(range(8), stdlib_docs(max_chars=20_000), strict=False)]
    total = count = 0.0
    for text in texts:
        ids = torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"][:255]]])
        lp = torch.log_softmax(model(ids)[0, :-1].double(), -1)
        total -= float(lp.gather(-1, ids[0, 1:, None]).sum())
        count += ids.shape[1] - 1
    ce = total / count
    assert ce < math.log(len(tok)) - 1.5, (ce, math.log(len(tok)))


def test_ngram_baselines_match_naive_counts() -> None:
    mod = _script()
    rng = np.random.default_rng(0)
    vocab = 7
    train = rng.integers(0, vocab, size=(5, 9)).astype(np.int32)
    val = rng.integers(0, vocab, size=(3, 9)).astype(np.int32)
    got = mod.ngram_baselines(train, val, vocab)
    k_u, k_b = got["unigram"]["k"], got["bigram"]["k"]
    uni = np.zeros(vocab)
    bi = np.zeros((vocab, vocab))
    for row in train:
        for a, b in zip(row[:-1], row[1:], strict=True):
            uni[b] += 1
            bi[a, b] += 1
    nll_u = nll_b = 0.0
    n = 0
    for row in val:
        for a, b in zip(row[:-1], row[1:], strict=True):
            nll_u -= math.log((uni[b] + k_u) / (uni.sum() + k_u * vocab))
            nll_b -= math.log((bi[a, b] + k_b) / (bi[a].sum() + k_b * vocab))
            n += 1
    assert got["unigram"]["loss"] == pytest.approx(nll_u / n, rel=1e-9)
    assert got["bigram"]["loss"] == pytest.approx(nll_b / n, rel=1e-9)


def test_training_script_is_deterministic(tmp_path: Path) -> None:
    """Two runs with one seed give byte-identical tokenizer and weights; another seed does not."""
    mod = _script()
    small = {
        "vocab_size": 300,
        "n_layer": 1,
        "n_embd": 32,
        "n_head": 2,
        "ctx_len": 32,
        "batch_size": 4,
        "steps": 2,
        "warmup": 1,
        "max_chars": 15_000,
        "max_val_windows": 4,
    }
    hashes = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        manifest = mod.train(mod.TinyLMConfig(seed=seed, **small), tmp_path / name, log=lambda s: None)
        hashes.append(manifest["weights_sha256"])
        assert manifest["corpus"]["docs"] > 0 and manifest["result"]["val_tokens_scored"] > 0
    assert hashes[0] == hashes[1] != hashes[2]
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()
    a = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert (
        a["corpus"]["sha256"]
        == json.loads((tmp_path / "c" / "manifest.json").read_text())["corpus"]["sha256"]
    )


def test_steering_moves_logits_along_the_stored_logit_effect(tiny_lm_ws: Path) -> None:
    """The analysis' logit effect (W_dec·W_U) predicts how steering a latent really changes the logits."""
    from analysis import tables
    from analysis.interventions import Intervention, intervene_lm
    from analysis.runs import load_run
    from analysis.splice import Steering, decoder_rows

    model = support.model("tiny-lm")
    ctx = load_run(tiny_lm_ws, "lm")
    assert ctx.hook == TINY_LM_HOOK
    stats = tables.latent_summary(tiny_lm_ws, "lm")
    alive = [s["latent"] for s in sorted(stats, key=lambda s: -s["n_fires"])][:5]
    w_u = model.W_U.detach().double().numpy()
    corrs = []
    for latent in alive:
        row = stats[latent]
        assert row["logit_pos_tokens"] and len(row["logit_pos_ids"]) == 10
        predicted = decoder_rows(ctx.sae)[latent].astype(np.float64) @ w_u
        assert int(np.argmax(predicted)) == row["logit_pos_ids"][0]
        r = intervene_lm(
            model, ctx, "Return the number of items", Intervention(steering=[Steering(latent, 4.0)])
        )
        actual = (r.logits_edited[-1] - r.logits_clean[-1]).astype(np.float64)
        corrs.append(np.corrcoef(predicted, actual)[0, 1])
    # Later LayerNorms and blocks bend the direct path, but it must still dominate for most latents.
    assert np.median(corrs) > 0.3, corrs


def test_loading_a_model_freezes_it_and_leaves_autograd_on() -> None:
    """Loading a model must not switch autograd off for the whole process (notebooks train in it too)."""
    import torch

    from activations.models import load_model

    model = load_model("tiny-lm")
    assert torch.is_grad_enabled()
    assert not any(p.requires_grad for p in model.parameters())
    logits = model(torch.tensor([[0, 5, 9]]))
    assert not logits.requires_grad  # frozen weights: no graph is recorded
    w = torch.zeros(3, requires_grad=True)
    (w * 2).sum().backward()
    assert w.grad is not None
