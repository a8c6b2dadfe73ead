"""Interventions: edits do exactly what they say, are validated, and never leave hooks behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import test_eval_support as support
import torch

from analysis.interventions import Intervention, intervene_lm, run_logits, semantic_search
from analysis.splice import LatentEdit, Steering, active_hook_count, decoder_rows, spliced

PROMPT = "Return the number of items in a container."


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2: Path):
    ws = support.gpt2_workspace(str(tmp_path_factory.getbasetemp()), str(tiny_gpt2))
    return support.model(str(tiny_gpt2)), support.run_context(str(ws))


def _active_latents(model, ctx, n: int = 3) -> list[int]:
    """Latents that fire on the prompt, so that editing them must change something."""
    ids = model.to_tokens(PROMPT)
    _, cache = model.run_with_cache(ids, names_filter=[ctx.hook])
    f = np.asarray(ctx.sae.encode(cache[ctx.hook][0, 1:].numpy()))
    return [int(i) for i in np.argsort(-(f != 0).sum(0))[:n]]


def test_no_edit_with_error_term_is_the_exact_model(gpt2) -> None:
    model, ctx = gpt2
    r = intervene_lm(model, ctx, PROMPT, Intervention(error_term=True), max_new_tokens=5)
    assert r.max_abs_logit_diff == 0.0
    assert r.top_clean == r.top_edited
    assert r.generated_clean == r.generated_edited and r.generated_clean
    assert all(d["diff"] == 0.0 for d in r.logit_diff)


def _hand_hook(ctx, edit_f, steer=None):
    """x + decode(edit(f)) − decode(f) on non-BOS positions, plus an optional steering vector."""

    def hook(act, hook):
        x = act[0].numpy().astype(np.float32).copy()
        body = x[1:]
        f = np.asarray(ctx.sae.encode(body))
        g = edit_f(f.copy())
        new = body + (np.asarray(ctx.sae.decode(g)) - np.asarray(ctx.sae.decode(f)))
        if steer is not None:
            new = new + steer
        x[1:] = new
        return torch.from_numpy(x)[None]

    return hook


@pytest.mark.parametrize("op", ["ablate", "clamp", "scale"])
def test_latent_edits_match_hand_computation(gpt2, op: str) -> None:
    model, ctx = gpt2
    lat = _active_latents(model, ctx)
    value = {"ablate": 0.0, "clamp": 3.0, "scale": 2.5}[op]

    def edit(f):
        f[:, lat] = 0.0 if op == "ablate" else (value if op == "clamp" else f[:, lat] * value)
        return f

    ids = model.to_tokens(PROMPT)
    want = run_logits(model, ids, [(ctx.hook, _hand_hook(ctx, edit))])[0]
    r = intervene_lm(model, ctx, PROMPT, Intervention(edits=[LatentEdit(op, tuple(lat), value)]))
    np.testing.assert_allclose(r.logits_edited, want, rtol=1e-5, atol=1e-5)
    assert r.max_abs_logit_diff > 1e-3


def test_steering_adds_decoder_row(gpt2) -> None:
    model, ctx = gpt2
    coeff, i = 4.0, 7
    steer = coeff * decoder_rows(ctx.sae)[i]
    ids = model.to_tokens(PROMPT)
    want = run_logits(model, ids, [(ctx.hook, _hand_hook(ctx, lambda f: f, steer))])[0]
    r = intervene_lm(model, ctx, PROMPT, Intervention(steering=[Steering(i, coeff)]))
    np.testing.assert_allclose(r.logits_edited, want, rtol=1e-5, atol=1e-5)
    assert r.max_abs_logit_diff > 1e-3


def test_generation_is_seeded(gpt2) -> None:
    model, ctx = gpt2
    iv = Intervention(steering=[Steering(3, 8.0)])
    a = intervene_lm(model, ctx, PROMPT, iv, max_new_tokens=6, do_sample=True, seed=1)
    b = intervene_lm(model, ctx, PROMPT, iv, max_new_tokens=6, do_sample=True, seed=1)
    assert (a.generated_clean, a.generated_edited) == (b.generated_clean, b.generated_edited)


def test_bad_edits_and_hooks_are_rejected(gpt2) -> None:
    model, ctx = gpt2
    n = ctx.sae.n_latents
    with pytest.raises(ValueError, match=rf"\[{n}\] out of range: this SAE has {n} latents"):
        intervene_lm(model, ctx, PROMPT, Intervention(edits=[LatentEdit("ablate", (1, n))]))
    with pytest.raises(ValueError, match="steering latent id"):
        intervene_lm(model, ctx, PROMPT, Intervention(steering=[Steering(-1, 1.0)]))
    with pytest.raises(ValueError, match="trained on blocks.0.hook_out, not blocks.1.hook_out"):
        intervene_lm(model, ctx, PROMPT, Intervention(), hook="blocks.1.hook_out")
    with pytest.raises(ValueError, match="unknown hook 'blocks.9.nope'"):
        intervene_lm(model, ctx, PROMPT, Intervention(), hook="blocks.9.nope")
    with pytest.raises(ValueError, match="unknown edit"):
        intervene_lm(model, ctx, PROMPT, Intervention(edits=[LatentEdit("double", (1,))]))  # type: ignore[arg-type]


def test_hooks_are_removed_even_on_exceptions(gpt2) -> None:
    model, ctx = gpt2
    ids = model.to_tokens(PROMPT)
    clean = run_logits(model, ids)
    vocab = model.cfg.d_vocab
    # A token id past the vocabulary fails inside the forward pass, after the hooks went in.
    with pytest.raises((IndexError, RuntimeError)):
        intervene_lm(model, ctx, [0, 5, vocab + 10], Intervention(edits=[LatentEdit("ablate", (1,))]))
    assert active_hook_count(model, ctx.hook) == 0
    with pytest.raises(KeyError), spliced(model, ctx.hook, ctx.sae, error_term=False):
        assert active_hook_count(model, ctx.hook) == 1
        raise KeyError("boom")
    assert active_hook_count(model, ctx.hook) == 0
    assert np.array_equal(run_logits(model, ids), clean)


def test_intervene_cli(gpt2, tiny_gpt2: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from saewb.cli import main

    _, ctx = gpt2
    ws = str(ctx.ws.path)
    rc = main(
        [
            "intervene",
            "t",
            "--workspace",
            ws,
            "--model",
            str(tiny_gpt2),
            "--prompt",
            PROMPT,
            "--ablate",
            "1,2",
            "--clamp",
            "3=2.0",
            "--generate",
            "4",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "next-token top-k" in out and "generated (edited)" in out
    rc = main(["intervene", "t", "--workspace", ws, "--prompt", PROMPT, "--ablate", "99999"])
    assert rc == 1 and "out of range" in capsys.readouterr().err


def test_semantic_search_on_minilm(minilm_ws: Path) -> None:
    model, ctx = support.model("minilm"), support.minilm_context(str(minilm_ws))
    cands = ["Open a file and read its lines.", "The cat sat on the mat.", "Parse command line arguments."]
    query = "Read the contents of a text file."
    same = semantic_search(model, ctx, query, cands, Intervention(error_term=True))
    assert all(r["delta"] == 0.0 for r in same.rows)
    assert same.rows[0]["sim_clean"] > same.rows[1]["sim_clean"]  # the model itself ranks sensibly
    steered = semantic_search(model, ctx, query, cands, Intervention(steering=[Steering(5, 20.0)]))
    assert max(abs(r["delta"]) for r in steered.rows) > 1e-3
    with pytest.raises(ValueError, match="no next-token head"):
        intervene_lm(model, ctx, query, Intervention())
    with pytest.raises(ValueError, match="needs candidate texts"):
        semantic_search(model, ctx, query, [], Intervention())
