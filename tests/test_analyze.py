"""`saewb analyze` / `saewb mcs`: streaming results against a naive dense computation, MST against
brute force, MCS self/other-seed, and the errors a user can hit."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import run_saewb

HOOK = "blocks.1.hook_out"


def _train(ws: Path, name: str, seed: int) -> None:
    from sae.cli import plan_from_values, run_plan

    run_plan(
        plan_from_values(
            {
                "workspace": str(ws),
                "hook": HOOK,
                "arch": "topk",
                "n_latents": 128,
                "k": 8,
                "train_tokens": 8192,
                "batch_size": 1024,
                "seed": seed,
                "name": name,
                "progress": False,
                "eval_tokens": 512,
            }
        )
    )


@pytest.fixture(scope="module")
def trained(minilm_ws: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the MiniLM harvest (analysis writes to it) with two seeds of a tiny TopK SAE."""
    ws = tmp_path_factory.mktemp("analyze") / "ws.duckdb"
    shutil.copy(minilm_ws, ws)
    _train(ws, "s0", 0)
    _train(ws, "s1", 1)
    return ws


@pytest.fixture(scope="module")
def analysed(trained: Path) -> dict[str, Any]:
    """Analyse s0 with small batches and chunks so batch padding and chunk seams are exercised."""
    from analysis.features import AnalyzeConfig, analyze_run

    cfg = AnalyzeConfig(batch_size=500, chunk_tokens=1000, top_n=5, n_cooc=6, n_neighbors=4, logits=True)
    summary = analyze_run(trained, "s0", cfg)
    return {"ws": trained, "cfg": cfg, "summary": summary}


@pytest.fixture(scope="module")
def dense(trained: Path) -> dict[str, Any]:
    """The naive reference: every non-special activation encoded at once into a dense matrix."""
    import sae
    from activations.reader import read_activations
    from activations.store import harvest_info
    from saewb.workspace import Workspace

    ws = Workspace(trained)
    info = harvest_info(ws)
    idx, x = read_activations(ws, info.tables[HOOK], 0, info.n_tokens)
    with ws.read() as con:
        special = con.execute(
            "SELECT tok_idx FROM tokens WHERE harvest = ? AND is_special", [info.name]
        ).fetchall()
    keep = ~np.isin(idx, [r[0] for r in special])
    idx, x = idx[keep], x[keep]
    model = sae.load("s0", workspace=trained)
    return {"idx": idx, "f": model.encode(x), "model": model}


def test_stats_match_dense(analysed: dict[str, Any], dense: dict[str, Any]) -> None:
    from analysis import tables
    from saewb.workspace import Workspace

    f = dense["f"]
    rows = tables.latent_summary(Workspace(analysed["ws"]), "s0")
    assert [r["latent"] for r in rows] == list(range(f.shape[1]))
    assert analysed["summary"]["tokens"] == f.shape[0]
    fires = (f > 0).sum(0)
    np.testing.assert_array_equal([r["n_fires"] for r in rows], fires)
    np.testing.assert_allclose([r["freq"] for r in rows], fires / f.shape[0])
    np.testing.assert_allclose([r["max_act"] for r in rows], f.max(0), rtol=1e-6)
    mean = np.where(fires > 0, f.sum(0) / np.maximum(fires, 1), 0)
    np.testing.assert_allclose([r["mean_act"] for r in rows], mean, rtol=1e-5)
    n_bins = analysed["cfg"].n_bins
    for r in rows:
        assert sum(r["hist"]) == r["n_fires"]
        col = f[:, r["latent"]]
        if r["n_fires"]:
            ref = np.minimum((col[col > 0] / col.max() * n_bins).astype(int), n_bins - 1)
            np.testing.assert_array_equal(r["hist"], np.bincount(ref, minlength=n_bins))
    # Encoders get no logit effect (documented in find_unembedding).
    assert all(r["logit_pos_ids"] is None for r in rows)
    assert analysed["summary"]["logit_effect"] is False


def _table(ws: Path, query: str, params: list[Any]) -> list[tuple[Any, ...]]:
    from saewb.workspace import Workspace

    with Workspace(ws).read() as con:
        return con.execute(query, params).fetchall()


def test_top_contexts_match_dense(analysed: dict[str, Any], dense: dict[str, Any]) -> None:
    from analysis import tables
    from saewb.workspace import Workspace

    ws, top_n = Workspace(analysed["ws"]), analysed["cfg"].top_n
    f, idx = dense["f"], dense["idx"]
    stored: dict[int, list[tuple[int, float]]] = {}
    for latent, tok, value in _table(
        analysed["ws"],
        "SELECT latent, tok_idx, value FROM latent_contexts WHERE run = ? AND kind = 'top' "
        "ORDER BY latent, rank",
        ["s0"],
    ):
        stored.setdefault(latent, []).append((tok, value))
    for latent in range(f.shape[1]):  # every latent, in bulk
        col = f[:, latent]
        ref = np.argsort(-col, kind="stable")[: min(top_n, int((col > 0).sum()))]
        got = stored.get(latent, [])
        np.testing.assert_allclose([g[1] for g in got], col[ref], rtol=1e-6)
        assert [g[0] for g in got] == idx[ref].tolist()
    pos = {int(t): i for i, t in enumerate(idx)}
    for latent in np.argsort(-(f > 0).sum(0))[:3].tolist() + [5, 77]:  # windows through the read helper
        got = tables.top_contexts(ws, "s0", latent, window=3)
        assert [c.tok_idx for c in got] == [t for t, _ in stored.get(latent, [])]
        for c in got:  # the per-token activations of the window come from the stored sparse codes
            assert c.acts[c.center] == pytest.approx(c.value)
            for t, a in zip(c.tok_idxs, c.acts, strict=True):
                assert a == pytest.approx(float(f[pos[t], latent]) if t in pos else 0.0, abs=1e-6)


def test_bands_hold_samples_from_their_quantile_range(
    analysed: dict[str, Any], dense: dict[str, Any]
) -> None:
    from analysis import tables
    from saewb.workspace import Workspace

    ws, f = Workspace(analysed["ws"]), dense["f"]
    n_bands = analysed["cfg"].n_bands
    checked = 0
    for latent in np.flatnonzero((f > 0).sum(0) >= 50)[:6].tolist():
        ranges = tables.band_ranges(ws, "s0", latent)
        assert len(ranges) == n_bands
        pos = f[:, latent][f[:, latent] > 0]
        for band, lo, hi in ranges:
            share = ((pos >= lo) & (pos < hi)).mean() if band < n_bands - 1 else (pos >= lo).mean()
            assert abs(share - 1 / n_bands) < 0.12, (latent, band, share)  # approximate equal-count bands
        for c in tables.top_contexts(ws, "s0", latent, kind="band"):
            _, lo, hi = ranges[c.band]
            assert lo - 1e-5 <= c.value <= hi + 1e-5
        checked += 1
    assert checked


def test_cooccurrence_and_neighbors_match_dense(analysed: dict[str, Any], dense: dict[str, Any]) -> None:
    f, n_co = dense["f"], analysed["cfg"].n_cooc
    b = (f > 0).astype(np.int64)
    c = b.T @ b
    fires = np.diag(c)
    dirs = dense["model"].decoder_directions
    sims = dirs @ dirs.T
    co: dict[int, list[tuple[int, int, float]]] = {}
    for latent, other, count, norm in _table(
        analysed["ws"],
        "SELECT latent, other, count, norm FROM latent_cooccurrence WHERE run = ? ORDER BY latent, rank",
        ["s0"],
    ):
        co.setdefault(latent, []).append((other, count, norm))
    nb: dict[int, list[float]] = {}
    for latent, cos in _table(
        analysed["ws"],
        "SELECT latent, cosine FROM latent_neighbors WHERE run = ? ORDER BY latent, rank",
        ["s0"],
    ):
        nb.setdefault(latent, []).append(cos)
    for latent in range(f.shape[1]):
        got = co.get(latent, [])
        norm = c[latent] / np.maximum(np.minimum(fires[latent], fires), 1)
        expected = np.sort(norm[(c[latent] > 0) & (np.arange(len(norm)) != latent)])[::-1][:n_co]
        np.testing.assert_allclose([g[2] for g in got], expected, rtol=1e-5)
        for other, count, _ in got:
            assert count == c[latent, other]
        s = sims[latent].copy()
        s[latent] = -np.inf
        assert len(nb[latent]) == analysed["cfg"].n_neighbors
        np.testing.assert_allclose(nb[latent], np.sort(s)[::-1][: len(nb[latent])], rtol=1e-4, atol=1e-5)


def test_search_and_families_read_back(analysed: dict[str, Any]) -> None:
    from analysis import tables
    from saewb.workspace import Workspace

    ws = Workspace(analysed["ws"])
    ctx = tables.top_contexts(ws, "s0", 0, limit=1)[0]
    hits = tables.search_by_token(ws, "s0", ctx.tokens[ctx.center].upper())
    assert 0 in [h["latent"] for h in hits]
    for row in tables.latent_summary(ws, "s0"):
        if row["family"] is not None:
            members = tables.family_of(ws, "s0", row["latent"])
            assert row["latent"] in [m["latent"] for m in members]
            break


def test_bad_input_names_problem_and_fix(analysed: dict[str, Any]) -> None:
    from analysis import tables
    from analysis.features import analyze_run
    from sae import runs
    from saewb.workspace import Workspace

    ws = Workspace(analysed["ws"])
    with pytest.raises(tables.AnalysisError, match="out of range.*0..127"):
        tables.top_contexts(ws, "s0", 128)
    with pytest.raises(tables.AnalysisError, match="has not been analysed.*saewb analyze s1"):
        tables.latent_summary(ws, "s1")
    with pytest.raises(tables.AnalysisError, match="no run named 'nope'.*s0"):
        analyze_run(ws, "nope")
    runs.start_run(ws, "loose", harvest=None, hook=None, arch="topk", config={}, checkpoint_path="/nowhere")
    with pytest.raises(tables.AnalysisError, match="no harvest/hook"):
        analyze_run(ws, "loose")
    proc = run_saewb("analyze", "nope", "--workspace", str(ws.path), check=False)
    assert proc.returncode == 1 and "no run named 'nope'" in proc.stderr


def test_mcs_self_is_one_and_other_seed_lower(trained: Path) -> None:
    from analysis import tables
    from analysis.consistency import compare_runs, max_cosine
    from saewb.workspace import Workspace

    same = compare_runs(trained, "s0", "s0", store=False)
    np.testing.assert_allclose(same["mcs_a"], 1.0, atol=1e-5)
    assert same["a_to_b"]["share_above_09"] == 1.0
    other = compare_runs(trained, "s0", "s1")
    assert other["a_to_b"]["mean_mcs"] < 0.99
    assert other["a_to_b"]["share_above_09"] < 1.0
    stored = tables.run_consistency(Workspace(trained), "s1", "s0")
    assert stored is not None and stored["share_above_09"] == pytest.approx(other["a_to_b"]["share_above_09"])
    # max_cosine against a brute-force loop
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 5)), rng.normal(size=(9, 5))
    ref = [max(float(u @ v / np.linalg.norm(u) / np.linalg.norm(v)) for v in b) for u in a]
    np.testing.assert_allclose(max_cosine(a, b, block=3), ref, rtol=1e-5)


def _brute_force_mst_weight(n: int, edges: list[tuple[int, int, float]]) -> float:
    best = -np.inf
    for subset in itertools.combinations(edges, n - 1):
        parent = list(range(n))

        def find(a: int, parent: list[int] = parent) -> int:
            while parent[a] != a:
                a = parent[a]
            return a

        ok = True
        for i, j, _ in subset:
            ri, rj = find(i), find(j)
            if ri == rj:
                ok = False
                break
            parent[ri] = rj
        if ok:
            best = max(best, sum(w for _, _, w in subset))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_mst_matches_brute_force(seed: int) -> None:
    from analysis.families import maximum_spanning_tree

    rng = np.random.default_rng(seed)
    n = 6
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if rng.random() < 0.7]
    for i in range(n - 1):  # keep it connected
        if (i, i + 1) not in pairs:
            pairs.append((i, i + 1))
    w = rng.integers(1, 6, size=len(pairs)).astype(float)  # small integers: ties on purpose
    i, j = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    ti, tj, tw = maximum_spanning_tree(n, i, j, w)
    assert len(tw) == n - 1
    assert tw.sum() == pytest.approx(
        _brute_force_mst_weight(n, list(zip(i.tolist(), j.tolist(), w.tolist(), strict=True)))
    )


def test_mst_of_a_forest_and_families() -> None:
    from analysis.families import feature_families, maximum_spanning_tree

    ti, _, _ = maximum_spanning_tree(5, np.array([0, 2]), np.array([1, 3]), np.array([1.0, 2.0]))
    assert len(ti) == 2  # two components plus an isolated node: a forest
    # Latent 0 is dense; 1, 2, 3 fire mostly with it; 4 and 5 co-fire with each other only.
    fires = np.array([100, 20, 15, 10, 8, 8])
    c = np.diag(fires).astype(np.int64)
    for k, v in ((1, 18), (2, 12), (3, 9), (5, 0)):
        c[0, k] = c[k, 0] = v
    c[4, 5] = c[5, 4] = 7
    c[1, 2] = c[2, 1] = 1
    fam = feature_families(c, fires, min_weight=0.1, min_children=2)
    members = {
        int(lat): int(f)
        for f, lat, d in zip(fam["family"], fam["latent"], fam["depth"], strict=True)
        if f == 0
    }
    assert set(members) == {0, 1, 2, 3}
    assert 4 not in fam["latent"] and 5 not in fam["latent"]  # a pair is not a family (one child)


def test_analyze_causal_lm_stores_logit_effect(tiny_gpt2: Path, tmp_path: Path) -> None:
    from activations.harvest import HarvestConfig, run_harvest
    from analysis import tables
    from analysis.features import AnalyzeConfig, analyze_run
    from sae.cli import plan_from_values, run_plan
    from saewb.workspace import Workspace

    ws = tmp_path / "gpt2.duckdb"
    run_harvest(
        HarvestConfig(model=str(tiny_gpt2), hooks=("blocks.1.hook_out",), ctx_len=64, max_tokens=2000),
        ws,
        progress=False,
    )
    run_plan(
        plan_from_values(
            {
                "workspace": str(ws),
                "hook": "blocks.1.hook_out",
                "arch": "topk",
                "n_latents": 32,
                "k": 4,
                "train_tokens": 2048,
                "batch_size": 512,
                "seed": 0,
                "name": "g",
                "progress": False,
                "eval_tokens": 256,
            }
        )
    )
    out = analyze_run(ws, "g", AnalyzeConfig(batch_size=256, n_logits=5))
    assert out["logit_effect"] is True
    import sae

    dirs = sae.load("g", workspace=ws).decoder_directions
    from activations.models import load_model
    from analysis.features import find_unembedding

    w_u = find_unembedding(load_model(str(tiny_gpt2)))
    assert w_u is not None and w_u.shape == (64, 512)
    row = tables.latent_summary(Workspace(ws), "g", 7)[0]
    eff = dirs[7] @ w_u
    assert row["logit_pos_ids"] == np.argsort(-eff)[:5].tolist()
    assert row["logit_neg_ids"] == np.argsort(eff)[:5].tolist()
    assert len(row["logit_pos_tokens"]) == 5 and all(isinstance(t, str) for t in row["logit_pos_tokens"])
    # logit_effects against a dense argsort, across block seams
    from analysis.features import logit_effects

    d = np.random.default_rng(0).normal(size=(10, 64)).astype(np.float32)
    pos_ids, pos_vals, neg_ids, _ = logit_effects(d, w_u, 5, block=4)
    np.testing.assert_array_equal(pos_ids, np.argsort(-(d @ w_u), axis=1)[:, :5])
    np.testing.assert_array_equal(neg_ids, np.argsort(d @ w_u, axis=1)[:, :5])
    np.testing.assert_allclose(pos_vals, np.sort(d @ w_u, axis=1)[:, ::-1][:, :5], rtol=1e-5)


def test_sparse_cooccurrence_and_top_per_group_match_naive(monkeypatch: pytest.MonkeyPatch) -> None:
    from analysis import features

    rng = np.random.default_rng(0)
    n, batches = 40, [(rng.random((30, 40)) < 0.1) * rng.random((30, 40)) for _ in range(4)]
    monkeypatch.setattr(features, "DENSE_COOC_MAX", 0)  # force the sparse path used above 4096 latents
    sparse, dense = features.CoocCounter(n), None
    top = features.TopPerGroup(n, 3)
    for b, f in enumerate(batches):
        rows, cols, vals = features.sparse_code(f)
        sparse.add(rows, cols, f.shape[0])
        top.update(cols.astype(np.int64), vals.astype(np.float64), rows + 30 * b, vals)
        dense = (f > 0).astype(np.int64).T @ (f > 0) + (0 if dense is None else dense)
    np.testing.assert_array_equal(sparse.result().toarray(), dense)
    allf = np.concatenate(batches)
    for j in range(n):
        ref = np.argsort(-allf[:, j], kind="stable")[:3]
        ref = ref[allf[ref, j] > 0]
        assert top.tok[j, : len(ref)].tolist() == ref.tolist()
        assert (top.tok[j, len(ref) :] == -1).all()
