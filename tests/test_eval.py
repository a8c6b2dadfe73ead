"""Evaluation: splicing is exact where it must be, and the metrics agree with naive computations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import test_eval_support as support
import torch

import saewb
from analysis.evaluate import (
    EVAL_FRACTION,
    eval_windows,
    list_evals,
    lm_metrics,
    neighbour_overlap,
    pad_id_of,
    reconstruction_metrics,
)
from analysis.runs import load_run
from analysis.splice import active_hook_count, spliced, zero_ablated
from saewb.workspace import Workspace


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2: Path):
    ws = support.gpt2_workspace(str(tmp_path_factory.getbasetemp()), str(tiny_gpt2))
    return support.model(str(tiny_gpt2)), support.run_context(str(ws))


def _batch(model, ctx, n: int = 4):
    w = eval_windows(ctx.ws, ctx.harvest, pad_id_of(model), max_seqs=n)
    return torch.from_numpy(w.ids), torch.from_numpy(w.attention), torch.from_numpy(w.splice_mask)


def test_splice_with_error_term_reproduces_logits_exactly(gpt2) -> None:
    model, ctx = gpt2
    ids, att, mask = _batch(model, ctx)
    clean = model(ids, attention_mask=att)
    with spliced(model, ctx.hook, ctx.sae, error_term=True):
        same = model(ids, attention_mask=att)
    with spliced(model, ctx.hook, ctx.sae, error_term=False, mask=mask):
        recon = model(ids, attention_mask=att)
    assert torch.equal(clean, same)
    assert not torch.allclose(clean, recon, atol=1e-3)  # the splice without the error term does change things
    assert active_hook_count(model, ctx.hook) == 0


def test_zero_ablation_matches_hand_written_hook(gpt2) -> None:
    model, ctx = gpt2
    ids, att, mask = _batch(model, ctx)

    def by_hand(act, hook):
        out = act.clone()
        for b in range(act.shape[0]):
            for t in range(act.shape[1]):
                if mask[b, t]:
                    out[b, t] = 0.0
        return out

    with model.hooks(fwd_hooks=[(ctx.hook, by_hand)]):
        want = model(ids, attention_mask=att)
    with zero_ablated(model, ctx.hook, mask):
        got = model(ids, attention_mask=att)
    assert torch.equal(want, got)
    assert not torch.allclose(want, model(ids, attention_mask=att), atol=1e-3)


def _eval_activations(ctx, split: str = "eval") -> np.ndarray:
    """Every non-special activation of the run's hook in the held-out (or train) split, read in one
    naive query."""
    threshold = round(EVAL_FRACTION * 10_000)
    from activations.reader import read_activations
    from activations.store import harvest_info

    info = harvest_info(ctx.ws)
    side = "<" if split == "eval" else ">="
    with ctx.ws.read() as con:
        rows = con.execute(
            "SELECT tok_idx FROM tokens t WHERE t.harvest = ? "
            f"AND (((t.doc_id * 2654435761) % 4294967296) % 10000) {side} ? AND NOT t.is_special",
            [ctx.harvest, threshold],
        ).fetchall()
    _, x = read_activations(ctx.ws, info.tables[ctx.hook], 0, info.n_tokens)  # every row, tok_idx order
    return x[[r[0] for r in rows]].astype(np.float64)


def test_reconstruction_metrics_match_naive_full_batch(gpt2) -> None:
    _, ctx = gpt2
    x = _eval_activations(ctx)
    f = np.asarray(ctx.sae.encode(x.astype(np.float32)))
    xh = np.asarray(ctx.sae.decode(f)).astype(np.float64)
    err = ((x - xh) ** 2).sum(1)
    fvu = err.sum() / ((x - x.mean(0)) ** 2).sum()
    legacy = np.mean(1 - err / ((x - x.mean(0)) ** 2).sum(1).mean())
    xn, hn = np.linalg.norm(x, axis=1), np.linalg.norm(xh, axis=1)
    freq = (f != 0).mean(0)
    naive = {
        "fvu": fvu,
        "legacy_ev": legacy,
        "l0": (f != 0).sum(1).mean(),
        "dead_frac": np.mean(freq == 0),
        "dense_frac": np.mean(freq > 0.1),
        "cosine": np.mean((x * xh).sum(1) / (xn * hn)),
        "l2_ratio": np.mean(hn / xn),
        "rel_bias": (hn**2).sum() / (x * xh).sum(),
        "eval_tokens": len(x),
    }
    full = reconstruction_metrics(ctx, batch_size=len(x) + 1)
    small = reconstruction_metrics(ctx, batch_size=97)
    for key, want in naive.items():
        assert full[key] == pytest.approx(want, rel=1e-5, abs=1e-7), key
        if key != "legacy_ev":  # the legacy EV centres on each batch's mean, by definition
            assert small[key] == pytest.approx(want, rel=1e-5, abs=1e-7), key
    assert 0 < fvu < 1.5
    # max_tokens stops inside a batch: the first 150 tokens of the stream, not two whole batches
    assert reconstruction_metrics(ctx, batch_size=97, max_tokens=150)["eval_tokens"] == 150 < len(x)


def test_dead_over_train_counts_latents_silent_on_the_whole_train_split(
    gpt2, capsys: pytest.CaptureFixture[str]
) -> None:
    """`saewb eval --dead-over-train`: the latents that fire on no token of the train split, as a naive
    encode of every train token counts them; latents silenced by hand are among them."""
    from saewb.cli import main

    _, ctx = gpt2
    x = _eval_activations(ctx, split="train").astype(np.float32)
    fired = (np.asarray(ctx.sae.encode(x)) != 0).any(0)
    got = reconstruction_metrics(ctx, batch_size=97, dead_over_train=True)
    assert got["train_split_tokens"] == len(x) > got["eval_tokens"]
    assert got["dead_train_split"] == pytest.approx(np.mean(~fired))

    class Silenced:  # the run's SAE with its first 40 latents never firing
        outlier_cutoff = ctx.sae.outlier_cutoff

        def encode(self, rows: np.ndarray) -> np.ndarray:
            f = np.array(ctx.sae.encode(rows))
            f[:, :40] = 0
            return f

    from activations.stream import ActivationStream
    from sae.lifecycle import split_dead_fraction

    stream = ActivationStream(ctx.ws, ctx.hook, harvest=ctx.harvest, batch_size=500, split="train")
    silenced = split_dead_fraction(Silenced(), stream)["dead_train_split"]
    assert silenced == pytest.approx(np.mean(~fired[40:]) * (len(fired) - 40) / len(fired) + 40 / len(fired))

    assert main(["eval", "t", "--workspace", str(ctx.ws.path), "--no-downstream", "--dead-over-train"]) == 0
    assert f"{got['dead_train_split']:.6g}" in capsys.readouterr().out.split("dead_train_split")[1]


def test_lm_metrics_match_per_window_computation(gpt2) -> None:
    """Batched + padded CE/KL equal one unpadded forward per window, with the splice applied by hand."""
    model, ctx = gpt2
    w = eval_windows(ctx.ws, ctx.harvest, pad_id_of(model), max_seqs=6)
    got = lm_metrics(model, ctx, w, batch_size=4)
    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl_sae": 0.0, "kl_zero": 0.0}
    n_t = n_kl = 0
    for i in range(len(w)):
        n = int(w.attention[i].sum())
        ids = torch.from_numpy(w.ids[i : i + 1, :n])
        keep = ~w.special[i, :n]

        def recon(act, hook, keep=keep):
            x = act[0].numpy().copy()
            x[keep] = np.asarray(ctx.sae.decode(np.asarray(ctx.sae.encode(x[keep]))))
            return torch.from_numpy(x)[None]

        def zero(act, hook, keep=keep):
            x = act[0].numpy().copy()
            x[keep] = 0.0
            return torch.from_numpy(x)[None]

        outs = {"clean": model(ids)}
        for key, fn in (("sae", recon), ("zero", zero)):
            with model.hooks(fwd_hooks=[(ctx.hook, fn)]):
                outs[key] = model(ids)
        lp = {k: torch.log_softmax(v[0].double(), -1).numpy() for k, v in outs.items()}
        tgt = w.ids[i, 1:n]
        for key in ("clean", "sae", "zero"):
            sums[key] -= lp[key][np.arange(n - 1), tgt].sum()
        p = np.exp(lp["clean"])
        sums["kl_sae"] += (p * (lp["clean"] - lp["sae"])).sum()
        sums["kl_zero"] += (p * (lp["clean"] - lp["zero"])).sum()
        n_t += n - 1
        n_kl += n
    ce = {k: sums[k] / n_t for k in ("clean", "sae", "zero")}
    assert got["ce_clean"] == pytest.approx(ce["clean"], rel=1e-5)
    assert got["ce_sae"] == pytest.approx(ce["sae"], rel=1e-5)
    assert got["ce_zero"] == pytest.approx(ce["zero"], rel=1e-5)
    assert got["ce_score"] == pytest.approx((ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]), rel=1e-4)
    assert got["delta_ce"] == pytest.approx(ce["sae"] - ce["clean"], rel=1e-4, abs=1e-7)
    kl_sae, kl_zero = sums["kl_sae"] / n_kl, sums["kl_zero"] / n_kl
    assert got["kl_score"] == pytest.approx((kl_zero - kl_sae) / kl_zero, rel=1e-4)
    assert got["lm_targets"] == n_t


def test_eval_cli_prints_table_and_stores_row(
    gpt2, tiny_gpt2: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from saewb.cli import main

    _, ctx = gpt2
    before = len(list_evals(ctx.ws, "t", "eval"))
    rc = main(["eval", "t", "--workspace", str(ctx.ws.path), "--model", str(tiny_gpt2), "--max-seqs", "4"])
    out = capsys.readouterr().out
    assert rc == 0
    for key in ("fvu", "legacy_ev", "ce_clean", "ce_sae", "ce_zero", "ce_score", "delta_ce", "kl_score"):
        assert key in out
    rows = list_evals(ctx.ws, "t", "eval")
    assert len(rows) == before + 1
    stored = rows[-1]["metrics"]
    assert stored["model_kind"] == "causal_lm" and stored["lm_windows"] == 4
    assert f"{stored['ce_score']:.6g}" in out
    json.dumps(stored)


def test_targets_take_few_windows_spread_over_the_split(gpt2, capsys: pytest.CaptureFixture[str]) -> None:
    """`--targets N` instead of `--max-seqs`: as few windows as hold N next-token targets, evenly spaced
    from the first held-out window to the last (the leading ones would come from the fewest documents)."""
    from analysis.evaluate import evaluate_run
    from saewb.cli import main

    model, ctx = gpt2
    every = eval_windows(ctx.ws, ctx.harvest, pad_id_of(model), max_seqs=None)
    per_window = every.targets
    assert len(per_window) >= 6 and (per_window > 0).all()
    want = int(per_window[:2].sum()) + 1  # one more than two windows hold
    chosen = every.covering(want)
    assert chosen.targets.sum() >= want and 3 <= len(chosen) < len(every)
    rows = [int(np.flatnonzero((every.ids == row).all(1))[0]) for row in chosen.ids]
    assert rows[0] == 0 and rows[-1] == len(every) - 1 and rows == sorted(set(rows))
    gaps = np.diff(rows)
    assert gaps.max() - gaps.min() <= 1  # evenly spaced
    assert len(chosen) <= int(np.ceil(want / per_window.min()))  # no more than any k windows need
    assert len(set(chosen.doc_id)) >= len(set(every.first(len(chosen)).doc_id))
    got = evaluate_run(ctx.ws, "t", model=model, targets=want, store=False)
    assert got["lm_windows"] == len(chosen) and got["lm_targets"] == chosen.targets.sum()
    everything = evaluate_run(ctx.ws, "t", model=model, targets=10**9, store=False)  # more than there are
    assert everything["lm_windows"] == len(per_window) and everything["lm_targets"] == per_window.sum()
    assert main(["eval", "t", "--workspace", str(ctx.ws.path), "--targets", "0"]) == 1
    assert "--targets must be at least 1" in capsys.readouterr().err


def test_eval_errors_are_clear(gpt2, capsys: pytest.CaptureFixture[str]) -> None:
    from saewb.cli import main

    _, ctx = gpt2
    with pytest.raises(ValueError, match="no run named 'nope'.*runs there: t"):
        load_run(ctx.ws, "nope")
    assert main(["eval", "t", "--workspace", str(ctx.ws.path), "--max-seqs", "1"]) == 1
    assert "--max-seqs must be at least 2" in capsys.readouterr().err


def test_neighbour_overlap() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(30, 8))
    assert neighbour_overlap(a, a) == 1.0
    assert neighbour_overlap(a, a * 3.0) == 1.0  # cosine neighbours ignore scale
    b = rng.normal(size=(30, 8))
    assert neighbour_overlap(a, b) < 0.6  # unrelated embeddings share ~10/29 neighbours by chance


def test_encoder_metrics_on_minilm(minilm_ws: Path) -> None:
    from analysis.evaluate import encoder_metrics, sentence_embeddings

    ctx = support.minilm_context(str(minilm_ws))
    model = support.model("minilm")
    w = eval_windows(ctx.ws, ctx.harvest, pad_id_of(model), max_seqs=8)
    out = encoder_metrics(model, ctx, w, batch_size=3)  # 3 does not divide 8: a short last batch
    assert -1.0 <= out["emb_cosine"] < 0.9999  # an untrained SAE does not reproduce the embedding
    assert 0.0 <= out["top10_overlap"] <= 1.0
    assert out["emb_windows"] == 8
    # The clean embedding equals a hand mean-pool of the last block's output for one unpadded window.
    n = int(w.attention[0].sum())
    ids = torch.from_numpy(w.ids[:1, :n])
    _, cache = model.run_with_cache(ids, names_filter=["blocks.5.hook_out"])
    want = cache["blocks.5.hook_out"][0].double().mean(0).numpy()
    got = sentence_embeddings(model, torch.from_numpy(w.ids[:2]), torch.from_numpy(w.attention[:2]))[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_ce_kl_scores_are_meaningful_on_the_trained_tiny_lm(tiny_lm_ws: Path) -> None:
    """On a trained LM (not a random one) a trained SAE must recover most of the loss a zero-ablation costs."""
    import math

    model = support.model("tiny-lm")
    ctx = load_run(tiny_lm_ws, "lm")
    w = eval_windows(ctx.ws, ctx.harvest, pad_id_of(model), max_seqs=8)
    m = lm_metrics(model, ctx, w, batch_size=8)
    assert m["ce_clean"] < math.log(model.cfg.d_vocab) - 1.5  # a random LM sits at ln(vocab)
    assert m["ce_clean"] < m["ce_sae"] < m["ce_zero"]
    assert m["ce_zero"] - m["ce_clean"] > 1.0  # the middle block matters: ablating it costs > 1 nat
    assert 0.5 < m["ce_score"] < 1.0 and 0.0 < m["kl_score"] < 1.0
    assert m["delta_ce"] == pytest.approx(m["ce_sae"] - m["ce_clean"])


def test_random_error_keeps_the_sae_error_size_in_a_new_direction(gpt2) -> None:
    from analysis.splice import decode_rows, encode_rows, random_error_hook_fn

    _, ctx = gpt2
    act = torch.randn(2, 6, ctx.sae.d, generator=torch.Generator().manual_seed(0))
    act *= 0.2 * ctx.sae.outlier_cutoff / ctx.sae.d**0.5  # typical tokens, far under the outlier cutoff
    act[1, 2] *= 100.0  # an attention-sink-like outlier: passed through like an unmasked position
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 1:4] = mask[1, 5] = mask[1, 2] = True
    out = random_error_hook_fn(ctx.sae, mask, seed=3)(act)
    assert torch.equal(out[~mask], act[~mask]) and torch.equal(out[1, 2], act[1, 2])
    mask[1, 2] = False
    x = act[mask].numpy()
    sae_err = decode_rows(ctx.sae, encode_rows(ctx.sae, x)) - x
    got_err = out[mask].numpy() - x
    np.testing.assert_allclose(np.linalg.norm(got_err, axis=1), np.linalg.norm(sae_err, axis=1), rtol=1e-4)
    cos = (got_err * sae_err).sum(1) / np.linalg.norm(got_err, axis=1) / np.linalg.norm(sae_err, axis=1)
    assert np.abs(cos).max() < 0.9  # a random direction, not the SAE's
    assert torch.equal(out, random_error_hook_fn(ctx.sae, mask, seed=3)(act))  # seeded


def test_random_error_baseline_on_the_trained_tiny_lm(
    tiny_lm_ws: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`saewb eval --random-error`: ΔCE of the SAE's error size in random directions, and the ratio."""
    from analysis.evaluate import evaluate_run
    from saewb.cli import main

    model = support.model("tiny-lm")
    plain = evaluate_run(tiny_lm_ws, "lm", model=model, max_seqs=8, store=False)
    got = evaluate_run(tiny_lm_ws, "lm", model=model, max_seqs=8, random_error=True, store=False)
    assert "delta_ce_rand" not in plain and "error_pathology" not in plain
    assert got["delta_ce"] == plain["delta_ce"]  # the extra forward leaves the SAE's numbers alone
    assert got["delta_ce_rand"] > 0 and got["kl_rand"] > 0
    assert got["error_pathology"] == pytest.approx(got["delta_ce"] / got["delta_ce_rand"])
    assert got["delta_ce_rand"] != pytest.approx(got["delta_ce"], rel=1e-3)
    path = _copied_workspace(Workspace(tiny_lm_ws), tmp_path)  # the CLI stores its evaluation
    rc = main(["eval", "lm", "--workspace", str(path), "--max-seqs", "4", "--random-error", "--json"])
    assert rc == 0 and "error_pathology" in json.loads(capsys.readouterr().out)


def test_costliest_documents_add_up_to_the_whole_delta_ce(
    tiny_lm_ws: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`saewb eval --documents N`: per-document targets, clean CE and ΔCE that sum back to the run's
    totals, the costliest first, each named by its source; the top N is a prefix of the full list."""
    from analysis.evaluate import evaluate_run
    from saewb.cli import main

    model = support.model("tiny-lm")
    full = evaluate_run(tiny_lm_ws, "lm", model=model, max_seqs=12, documents=10_000, store=False)
    docs = full["documents"]
    assert 1 < len(docs) <= full["lm_windows"]
    assert sum(d["targets"] for d in docs) == full["lm_targets"]
    assert sum(d["share"] for d in docs) == pytest.approx(1.0)
    for key in ("delta_ce", "ce_clean"):
        assert sum(d[key] * d["targets"] for d in docs) / full["lm_targets"] == pytest.approx(full[key])
    excess = [d["delta_ce"] * d["targets"] for d in docs]
    assert excess == sorted(excess, reverse=True) and len({d["doc_id"] for d in docs}) == len(docs)
    assert all(d["source"] for d in docs)
    top = evaluate_run(tiny_lm_ws, "lm", model=model, max_seqs=12, documents=2, store=False)
    assert top["documents"] == docs[:2] and top["delta_ce"] == full["delta_ce"]
    assert "documents" not in evaluate_run(tiny_lm_ws, "lm", model=model, max_seqs=12, store=False)
    path = _copied_workspace(Workspace(tiny_lm_ws), tmp_path)
    rc = main(["eval", "lm", "--workspace", str(path), "--max-seqs", "12", "--documents", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "share" in out and docs[0]["source"] in out
    evaluation = saewb.evaluate(path, "lm", model=model, max_seqs=12, documents=2, progress=False)
    assert evaluation.documents["source"].tolist() == [d["source"] for d in docs[:2]]
    assert "documents" not in evaluation.frame["metric"].tolist()
    assert main(["eval", "lm", "--workspace", str(path), "--documents", "-1"]) == 1
    assert "--documents must be 0 or more" in capsys.readouterr().err


def _copied_workspace(ws: Workspace, dest: Path) -> Path:
    import shutil

    path = dest / ws.path.name
    shutil.copy(ws.path, path)
    shutil.copytree(ws.runs_dir, dest / ws.runs_dir.name)
    return path


def test_several_saes_share_the_forwards_and_get_a_paired_interval(tiny_lm_ws: Path) -> None:
    """One pass for several SAEs gives each the numbers of its own evaluation; a sign-flipped decoder is
    worse than the trained one by an interval that excludes 0."""
    import dataclasses

    from analysis.evaluate import lm_summary, lm_window_sums, paired_delta_ce
    from sae.api import SAE

    model = support.model("tiny-lm")
    ctx = load_run(tiny_lm_ws, "lm")
    sae = ctx.sae
    flipped = SAE(sae.config, dataclasses.replace(sae.params, W_dec=-sae.params.W_dec), sae.state, sae.d)
    w = eval_windows(ctx.ws, ctx.harvest, pad_id_of(model), max_seqs=8)
    sums = lm_window_sums(model, ctx.hook, {"lm": sae, "flipped": flipped}, w, batch_size=4)
    alone = lm_metrics(model, ctx, w, batch_size=8)
    for key, want in alone.items():
        assert lm_summary(sums, "lm")[key] == pytest.approx(want, rel=1e-9), key
    assert len(sums.targets) == len(w) and sums.targets.sum() == alone["lm_targets"]
    diff, half = paired_delta_ce(sums, "flipped", "lm")
    assert diff == pytest.approx(lm_summary(sums, "flipped")["delta_ce"] - alone["delta_ce"], rel=1e-9)
    assert diff - half > 0 and half > 0
    assert paired_delta_ce(sums, "lm", "lm") == (0.0, 0.0)


def test_eval_of_several_runs_compares_them_on_the_same_tokens(
    gpt2, tiny_gpt2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`saewb eval A B`: an exported and re-imported copy of a run differs from it by ~0; both are stored."""
    from analysis.evaluate import evaluate_runs
    from sae.interop import export_run, import_saelens
    from saewb.cli import main

    model, ctx = gpt2
    path = _copied_workspace(ctx.ws, tmp_path)
    import_saelens(export_run(path, "t", tmp_path / "t-sl"), path, "t-copy", hook=ctx.hook)
    before = len(list_evals(path, kind="eval"))
    rc = main(["eval", "t", "t-copy", "--workspace", str(path), "--model", str(tiny_gpt2), "--max-seqs", "6"])
    out = capsys.readouterr().out
    assert rc == 0 and "+0.0000 ± 0.0000" in out and "(reference)" in out
    stored = list_evals(path, kind="eval")
    assert len(stored) == before + 2 and [r["run"] for r in stored[-2:]] == ["t", "t-copy"]
    outs = evaluate_runs(path, ["t", "t-copy"], model=model, max_seqs=6, batch_size=4, store=False)
    assert abs(outs[1]["delta_ce_diff"]) < 1e-6 and outs[1]["vs_run"] == "t"  # export rounds in float32
    assert outs[0]["ce_sae"] == stored[-2]["metrics"]["ce_sae"]
    frame = saewb.compare(path, ["t-copy", "t"], model=model, max_seqs=6, progress=False)  # the notebook form
    assert list(frame["run"]) == ["t-copy", "t"] and frame["delta_ce_diff"].isna().tolist() == [True, False]
    assert frame["ce_score"].tolist() == pytest.approx([outs[1]["ce_score"], outs[0]["ce_score"]], rel=1e-9)


def test_several_runs_must_be_distinct(gpt2, capsys: pytest.CaptureFixture[str]) -> None:
    from saewb.cli import main

    _, ctx = gpt2
    assert main(["eval", "t", "t", "--workspace", str(ctx.ws.path)]) == 1
    assert "distinct run names" in capsys.readouterr().err
