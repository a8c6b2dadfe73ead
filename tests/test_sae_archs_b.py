"""Feature Choice, masked (Hiding Data Helps) and ITDA: each against a naive reference on a tiny
problem, ITDA's interrupted resume (no lost or duplicated atom), and ITDA end to end through
`saewb train` / `saewb eval` on a real MiniLM harvest. Save, load and bit-for-bit resume of the
gradient ones: tests/test_arch_conformance.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sae
from sae import checkpoint as ckpt
from sae import feature_choice as fc
from sae import itda, masked
from sae.base import StepCtx
from sae.trainer import TrainConfig
from saewb.cli import main

CTX = StepCtx(dead=jnp.zeros((6,), bool), progress=jnp.float32(0.0))


def _stream(d: int, batch: int, seed: int = 7):
    def batches(start: int):
        step = start
        while True:
            r = np.random.default_rng([seed, step])
            yield (r.standard_normal((batch, d)) * np.linspace(0.5, 2, d) + 0.5).astype(np.float32)
            step += 1

    return batches


# ----------------------------------------------------------------------------- Feature Choice


def test_feature_choice_matches_naive_reference() -> None:
    rng = np.random.default_rng(0)
    b, n, d, k = 12, 6, 5, 2
    x = jnp.asarray(rng.standard_normal((b, d)), jnp.float32)
    for capacity in ("uniform", "zipf"):
        cfg = fc.FeatureChoiceConfig(n_latents=n, k=k, capacity=capacity, aux_zipf_coef=0.0)
        params, state = fc.init(cfg, jax.random.PRNGKey(1), d, np.asarray(x))
        params = params.replace(b_enc=jnp.asarray(rng.normal(0, 0.3, n), jnp.float32))
        state = state.replace(density=jnp.asarray(rng.uniform(0, 1, n), jnp.float32))
        pre = np.maximum(
            (np.asarray(x) - np.asarray(params.b_dec)) @ np.asarray(params.W_enc) + np.asarray(params.b_enc),
            0,
        )
        # naive capacities: uniform k·B/n; Zipf by descending density rank, floor, clipped to [1, B]
        dens = np.asarray(state.density)
        rank = np.empty(n, int)
        rank[np.argsort(-dens, kind="stable")] = np.arange(n)
        if capacity == "uniform":
            m = np.full(n, k * b // n)
        else:
            w = 1.0 / (np.arange(n) + 1.0)
            m = np.clip(np.floor(k * b * w / w.sum()), 1, b).astype(int)[rank]
        want = np.zeros((b, n))
        kept_min = np.full(n, np.inf)
        for j in range(n):
            order = sorted(range(b), key=lambda t, j=j: -pre[t, j])
            for t in order[: m[j]]:
                if pre[t, j] > 0:
                    want[t, j] = pre[t, j]
                    kept_min[j] = min(kept_min[j], pre[t, j])
        assert want.astype(bool).sum() <= k * b
        total, aux = jax.jit(fc.loss, static_argnums=0)(cfg, params, state, x, CTX)
        x_hat = want @ np.asarray(params.W_dec) + np.asarray(params.b_dec)
        xn = np.asarray(x, np.float64)
        fvu = np.sum((xn - x_hat) ** 2) / np.sum((xn - xn.mean(0)) ** 2)
        np.testing.assert_allclose(float(total), fvu, rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(aux["fires"]), (want > 0).sum(0))
        np.testing.assert_allclose(np.asarray(aux["kept_min"]), kept_min, rtol=1e-5)
        # thresholds: first observation taken as is, then an EMA; inference keeps pre > θ
        s1 = fc.update_state(cfg, state, aux, state.step)
        np.testing.assert_allclose(np.asarray(s1.theta), kept_min, rtol=1e-5)
        s2 = fc.update_state(cfg, s1, {**aux, "kept_min": aux["kept_min"] * 0 + 1.0}, s1.step)
        seen = np.isfinite(kept_min)
        np.testing.assert_allclose(np.asarray(s2.theta)[seen], 0.99 * kept_min[seen] + 0.01, rtol=1e-5)
        f = np.asarray(fc.encode(cfg, params, s1, x))
        np.testing.assert_allclose(f, np.where(pre > kept_min[None], pre, 0), rtol=1e-5, atol=1e-6)


def test_zipf_fit_and_under_used() -> None:
    cfg = fc.FeatureChoiceConfig(n_latents=8, k=2, capacity="zipf")
    ranks = np.array([3, 0, 1, 2, 7, 6, 5, 4])
    dens = 0.2 / (ranks + 1.0) ** 1.3  # an exact power law: the fit reproduces it
    dens[4] *= 0.1  # one latent far below its rank's fit
    state = fc.State(step=jnp.int32(1000), density=jnp.asarray(dens, jnp.float32), theta=jnp.zeros(8))
    fit = np.asarray(fc.zipf_fit(state.density))
    assert fit[1] > fit[2] > fit[3] > fit[0]
    under = np.asarray(fc.under_used(cfg, state))
    assert under.tolist() == [False, False, False, False, True, False, False, False]
    assert not np.asarray(fc.under_used(cfg, state.replace(step=jnp.int32(3)))).any()  # EMA still warming up


# ------------------------------------------------------------------------------------ masked


def _naive_omp(w: np.ndarray, x: np.ndarray, vis: np.ndarray, k: int) -> np.ndarray:
    codes = np.zeros((len(x), len(w)))
    for t in range(len(x)):
        cols = vis[t] > 0
        a = w[:, cols]
        r = x[t, cols].copy()
        support: list[int] = []
        for _ in range(k):
            score = np.abs(a @ r) / np.linalg.norm(a, axis=1)
            score[support] = -1
            support.append(int(np.argmax(score)))
            coef, *_ = np.linalg.lstsq(a[support].T, x[t, cols], rcond=None)
            r = x[t, cols] - coef @ a[support]
        codes[t, support] = coef
    return codes


def test_masked_omp_and_loss_match_naive_reference() -> None:
    rng = np.random.default_rng(3)
    b, n, d, k = 10, 12, 8, 3
    cfg = masked.MaskedConfig(n_latents=n, k=k, encoder="omp", visible_frac=0.75)
    x = jnp.asarray(rng.standard_normal((b, d)), jnp.float32)
    params, state = masked.init(cfg, jax.random.PRNGKey(2), d, np.asarray(x))
    vis = np.asarray(masked.visible_mask(cfg, state, (b, d)))
    assert (vis.sum(1) == 6).all() and not np.array_equal(
        vis, np.asarray(masked.visible_mask(cfg, state.replace(step=state.step + 1), (b, d)))
    )
    w, b_dec = np.asarray(params.W_dec, np.float64), np.asarray(params.b_dec, np.float64)
    xc = np.asarray(x, np.float64) - b_dec
    codes = _naive_omp(w, xc, vis, k)
    # one compiled call for the value and the gradient
    step = jax.jit(jax.value_and_grad(masked.loss, argnums=1, has_aux=True), static_argnums=0)
    (total, aux), g = step(cfg, params, state, x, CTX)
    x_hat = codes @ w + b_dec
    xn = np.asarray(x, np.float64)
    hid = 1 - vis
    want = np.sum(hid * (xn - x_hat) ** 2) / np.sum(hid * (xn - xn.mean(0)) ** 2)
    np.testing.assert_allclose(float(total), want, rtol=1e-4)
    np.testing.assert_allclose(float(aux["err"]), np.sum((xn - x_hat) ** 2), rtol=1e-4)
    # inference: OMP on every coordinate
    f = np.asarray(jax.jit(masked.encode, static_argnums=0)(cfg, params, state, x))
    np.testing.assert_allclose(f, _naive_omp(w, xc, np.ones_like(vis), k), atol=1e-4)
    # the code is constant for the gradient: only the decoder learns, from the hidden coordinates
    assert float(jnp.abs(g.W_enc).sum()) == 0.0 and float(jnp.abs(g.W_dec).sum()) > 0


# ------------------------------------------------------------------------------------- ITDA


def _naive_mp(atoms: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    f = np.zeros((len(x), len(atoms)))
    for t in range(len(x)):
        r = x[t].astype(np.float64).copy()
        for _ in range(k):
            c = atoms @ r
            j = int(np.argmax(np.abs(c)))
            f[t, j] += c[j]
            r -= c[j] * atoms[j]
    return f


def _naive_itda(batches, steps: int, k: int, tau: float) -> tuple[np.ndarray, list[int]]:
    """The ITDA spec token by token: MP on the dictionary as it stood at the batch start; a candidate
    joins unless its label is known or a same-batch atom already added is within tau of it."""
    atoms: list[np.ndarray] = []
    labels: list[int] = []
    it = batches(0)
    for step in range(steps):
        x = next(it).astype(np.float64)
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        base = np.array(atoms) if atoms else np.zeros((0, x.shape[1]))
        added: list[np.ndarray] = []
        for t in range(len(u)):
            loss = (
                1.0
                if not len(base)
                else float(np.sum((u[t] - _naive_mp(base, u[t : t + 1], k)[0] @ base) ** 2))
            )
            label = step * len(u) + t
            if loss > tau and label not in labels and all((a @ u[t]) ** 2 < 1 - tau for a in added):
                added.append(u[t])
                atoms.append(u[t])
                labels.append(label)
    return np.array(atoms), labels


def test_itda_mp_and_fit_match_naive_reference() -> None:
    rng = np.random.default_rng(5)
    atoms = rng.standard_normal((7, 6))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    x = rng.standard_normal((9, 6))
    for use_gram in (True, False):
        got = np.asarray(
            itda.matching_pursuit(jnp.asarray(atoms, jnp.float32), jnp.asarray(x, jnp.float32), 4, use_gram)
        )
        np.testing.assert_allclose(got, _naive_mp(atoms, x, 4), atol=1e-4)
    assert ((got != 0).sum(1) <= 4).all()

    cfg = itda.ITDAConfig(k=3, tau=0.3)
    tc = TrainConfig(train_tokens=16 * 5, batch_size=16, log_every=5, ckpt_every=5, init_sample_tokens=16)
    batches = _stream(6, 16, seed=11)
    res = itda.fit(cfg, tc, batches, progress=False)
    want_atoms, want_labels = _naive_itda(batches, 5, 3, 0.3)
    assert np.asarray(res.arch_state.labels).tolist() == want_labels
    np.testing.assert_allclose(np.asarray(res.params.W_dec), want_atoms, atol=1e-6)
    assert 6 <= len(want_labels) < 80  # it grew, and it did not keep everything


def test_itda_resume_keeps_every_atom_once_and_jaccard(tmp_path: Path) -> None:
    cfg = itda.ITDAConfig(k=2, tau=0.2)
    tc = TrainConfig(train_tokens=16 * 8, batch_size=16, log_every=2, ckpt_every=2, init_sample_tokens=16)
    batches = _stream(6, 16, seed=4)
    ref = itda.fit(cfg, tc, batches, run_dir=tmp_path / "ref", progress=False)

    def dies_after(limit: int):
        def gen(start: int):
            for i, b in enumerate(batches(start)):
                if start + i == limit:
                    raise KeyboardInterrupt  # as a Ctrl-C between batches
                yield b

        return gen

    with pytest.raises(KeyboardInterrupt):
        itda.fit(cfg, tc, dies_after(5), run_dir=tmp_path / "cut", progress=False)
    assert int(ckpt.read_manifest(ckpt.latest_checkpoint(tmp_path / "cut"))["step"]) == 4
    res = itda.fit(cfg, tc, batches, run_dir=tmp_path / "cut", progress=False)
    labels = np.asarray(res.arch_state.labels)
    assert len(set(labels.tolist())) == len(labels)
    np.testing.assert_array_equal(labels, np.asarray(ref.arch_state.labels))
    np.testing.assert_array_equal(np.asarray(res.params.W_dec), np.asarray(ref.params.W_dec))
    with pytest.raises(ValueError, match="different config"):
        itda.fit(itda.ITDAConfig(k=2, tau=0.3), tc, batches, run_dir=tmp_path / "cut", progress=False)

    loaded = sae.load(tmp_path / "cut")
    assert loaded.n_latents == len(labels)
    assert itda.jaccard(loaded, ref) == 1.0
    other = itda.fit(itda.ITDAConfig(k=2, tau=0.5), tc, batches, progress=False)
    a, b = set(labels.tolist()), set(np.asarray(other.arch_state.labels).tolist())
    assert itda.jaccard(loaded, other) == pytest.approx(len(a & b) / len(a | b))
    assert 0 < itda.jaccard(loaded, other) < 1


def test_itda_cli_train_eval_and_labels(
    minilm_ws: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = tmp_path / "ws.duckdb"
    shutil.copy(minilm_ws, ws)
    hook = "blocks.1.hook_out"
    argv = [
        "train",
        "--workspace",
        str(ws),
        "--hook",
        hook,
        "--arch",
        "itda",
        "--name",
        "it",
        "--k",
        "8",
        "--tau",
        "0.3",
        "--train-tokens",
        "2048",
        "--batch-size",
        "256",
        "--log-every",
        "4",
        "--ckpt-every",
        "4",
        "--eval-tokens",
        "512",
        "--no-progress",
    ]
    assert main(argv) == 0
    assert "run 'it' done" in capsys.readouterr().out
    model = sae.load("it", workspace=ws)
    assert model.config.arch == "itda" and 0 < model.n_latents <= 2048
    assert 0 < model.metrics["fvu"] < 1 and model.metrics["l0"] <= 8
    toks = itda.atom_tokens(model, ws)
    assert len(toks["doc_id"]) == model.n_latents and (toks["pos"] >= 0).all()
    # each atom is the normalised activation of the token it is labelled with
    from activations.reader import read_activations
    from activations.store import harvest_info
    from saewb.workspace import Workspace

    table = harvest_info(Workspace(ws)).tables[hook]
    tok = int(toks["tok_idx"][0])
    xa = read_activations(Workspace(ws), table, tok, tok + 1)[1][0]
    np.testing.assert_allclose(np.asarray(model.params.W_dec)[0], xa / np.linalg.norm(xa), atol=1e-5)
    # the same command resumes (already complete: nothing changes), then `saewb eval`
    before = (Workspace(ws).runs_dir / "it" / "sae" / "params.safetensors").read_bytes()
    assert main(argv) == 0
    assert (Workspace(ws).runs_dir / "it" / "sae" / "params.safetensors").read_bytes() == before
    capsys.readouterr()
    assert main(["eval", "it", "--workspace", str(ws), "--no-downstream", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0 < out["fvu"] < 1 and 0 < out["l0"] <= 8
