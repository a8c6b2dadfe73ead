"""BatchTopK, JumpReLU, HierarchicalTopK and Matryoshka against naive references on tiny problems,
and Matryoshka (tuple config, threshold state) end to end through `saewb train` / `saewb eval`.

Training, saving and loading of all four on the shared trainer: tests/test_sae_trainer.py
(parametrised); bit-for-bit resume: tests/test_arch_conformance.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sae
from sae import batchtopk, common, hierarchical_topk, jumprelu, matryoshka
from sae.base import StepCtx

jax.config.update("jax_default_matmul_precision", "highest")  # naive and kernel paths sum alike

B, D, N = 12, 6, 20
NO_DEAD = StepCtx(dead=jnp.zeros(N, bool), progress=jnp.float32(0.5))


def _problem(seed: int = 0) -> tuple[jax.Array, common.LinearParams]:
    r = np.random.default_rng(seed)
    x = jnp.asarray(r.standard_normal((B, D)) * 2 + 0.5, jnp.float32)
    params = common.LinearParams(
        W_enc=jnp.asarray(r.standard_normal((D, N)) * 0.5, jnp.float32),
        b_enc=jnp.asarray(r.standard_normal(N) * 0.1, jnp.float32),
        W_dec=jnp.asarray(r.standard_normal((N, D)) * r.uniform(0.2, 2.0, (N, 1)), jnp.float32),
        b_dec=jnp.asarray(r.standard_normal(D) * 0.3, jnp.float32),
    )
    return x, params


def _naive_batch_mask(score: np.ndarray, kb: int) -> np.ndarray:
    """Keep the kb largest entries of the whole [B, n] matrix."""
    flat = np.argsort(-score.reshape(-1), kind="stable")[:kb]
    mask = np.zeros(score.size, bool)
    mask[flat] = True
    return mask.reshape(score.shape)


def _scores(cfg, params, x):
    pre = jax.nn.relu((x - params.b_dec) @ params.W_enc + params.b_enc)
    norms = jnp.linalg.norm(params.W_dec, axis=1)
    return pre, (pre * norms if cfg.decoder == "free" else pre)


def _jit(fn, *args):
    """Run ``fn(*args)`` compiled (eager JAX compiles op by op, far slower on tiny arrays)."""
    return jax.jit(fn)(*args)


def _allclose_tree(a, b, rtol=2e-4, atol=1e-5) -> None:
    for (path, la), lb in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b), strict=True
    ):
        np.testing.assert_allclose(np.asarray(la), np.asarray(lb), rtol=rtol, atol=atol, err_msg=str(path))


@pytest.mark.parametrize("decoder", ["free", "unit"])
def test_batchtopk_selection_exact_with_enough_candidates_and_capped_otherwise(decoder: str) -> None:
    x, params = _problem(1)
    k = 3
    cfg = batchtopk.BatchTopKConfig(n_latents=N, k=k, decoder=decoder, candidates=N)  # c·k >= n: exact
    pre, score = _scores(cfg, params, x)
    want = np.where(_naive_batch_mask(np.asarray(score), k * B), np.asarray(pre), 0.0)
    got = _jit(lambda p: batchtopk.encode_batch(cfg, p, x), params)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    assert (np.asarray(got) != 0).sum() <= k * B

    # one token far larger than the rest wants most of the budget: with c = 2 it keeps at most c·k
    big = x.at[0].multiply(50.0)
    small = batchtopk.BatchTopKConfig(n_latents=N, k=k, decoder=decoder, candidates=2)
    pre_b, score_b = _scores(small, params, big)
    naive = _naive_batch_mask(np.asarray(score_b), k * B)
    assert naive[0].sum() > 2 * k  # the exact selection would give token 0 more than c·k latents
    got_b = np.asarray(_jit(lambda p: batchtopk.encode_batch(small, p, big), params))
    assert (got_b[0] != 0).sum() == 2 * k
    codes = _jit(
        lambda p: batchtopk.select_batch(small, p, big - p.b_dec, pre_b, batchtopk.score_scale(small, p), k),
        params,
    )
    per_row = np.bincount(np.asarray(codes.rows), minlength=B)
    assert per_row[0] == 2 * k and float(codes.overflow) == pytest.approx(np.mean(per_row == 2 * k))
    # the rest of the budget goes to the next-best entries of the other tokens, still k·B in all
    assert len(np.asarray(codes.vals)) == k * B
    exact = batchtopk.BatchTopKConfig(n_latents=N, k=k, decoder=decoder, candidates=N)
    np.testing.assert_allclose(
        np.asarray(_jit(lambda p: batchtopk.encode_batch(exact, p, big), params)),
        np.where(naive, np.asarray(pre_b), 0.0),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batch_losses_and_grads_match_naive_dense_form(arch: str) -> None:
    x, params = _problem(2)
    k = 3
    if arch == "batchtopk":
        cfg = batchtopk.BatchTopKConfig(n_latents=N, k=k, candidates=N)
        ends = [N]
        mod = batchtopk
    else:
        cfg = matryoshka.MatryoshkaConfig(n_latents=N, k=k, candidates=N, group_sizes=(3, 5, 12))
        ends = [3, 8, 20]
        mod = matryoshka
    state = mod.init(cfg, jax.random.PRNGKey(0), D, np.asarray(x))[1]
    # the choice gets no gradient, so the naive form may take it as a constant
    mask = jnp.asarray(_naive_batch_mask(np.asarray(_scores(cfg, params, x)[1]), k * B))

    def naive(p: common.LinearParams) -> jax.Array:
        pre, _ = _scores(cfg, p, x)
        f = jnp.where(mask, pre, 0.0)
        var = jnp.sum((x - x.mean(0)) ** 2)
        errs = []
        for end in ends:  # plain loop over the nested prefixes
            x_hat = f[:, :end] @ p.W_dec[:end] + p.b_dec
            errs.append(jnp.sum((x - x_hat) ** 2) / var)
        return sum(errs) / len(errs)

    def ours(p: common.LinearParams) -> jax.Array:
        return mod.loss(cfg, p, state, x, NO_DEAD)[0]

    (l_ours, g_ours), (l_naive, g_naive) = (jax.jit(jax.value_and_grad(fn))(params) for fn in (ours, naive))
    np.testing.assert_allclose(float(l_ours), float(l_naive), rtol=1e-5)
    _allclose_tree(g_ours, g_naive)
    aux = jax.jit(lambda p: mod.loss(cfg, p, state, x, NO_DEAD)[1])(params)
    pre, score = _scores(cfg, params, x)
    kept = np.where(_naive_batch_mask(np.asarray(score), k * B), np.asarray(score), np.inf)
    assert float(aux["threshold"]) == pytest.approx(float(kept[np.asarray(pre) > 0].min()), rel=1e-6)
    assert float(aux["l0"]) == pytest.approx(k)


def test_threshold_tracking_inference_and_folding() -> None:
    x, params = _problem(3)
    cfg = batchtopk.BatchTopKConfig(
        n_latents=N, k=3, threshold_decay=0.9, threshold_start_step=3, threshold_start_frac=1.0
    )
    state = common.threshold_state()
    seen = []
    for i, v in enumerate([5.0, 4.0, 3.0, 0.7, 0.9, 1.1]):
        state = batchtopk.update_state(
            cfg,
            state,
            {"threshold": jnp.float32(v), "threshold_seen": True, "progress": jnp.float32(0.1)},
            jnp.asarray(i),
        )
        if i >= 3:
            seen.append(v)
    # bias-corrected EMA of the values from step 3 on
    w = 0.9 ** np.arange(len(seen))[::-1]
    theta = float(np.sum(w * 0.1 * np.array(seen)) / (1 - 0.9 ** len(seen)))
    assert float(common.threshold_value(state, 0.9)) == pytest.approx(theta, rel=1e-5)
    assert int(state.count) == 3

    pre, score = _jit(lambda p: _scores(cfg, p, x), params)
    want = np.where(np.asarray(score) > theta, np.asarray(pre), 0.0)
    enc = jax.jit(lambda p, st, v: batchtopk.encode(cfg, p, st, v))
    np.testing.assert_allclose(np.asarray(enc(params, state, x)), want, rtol=1e-6)
    # batch-independent: one token alone gets the same code
    np.testing.assert_allclose(np.asarray(enc(params, state, x[4:5]))[0], want[4], rtol=1e-6)
    # before tracking starts the code is the per-token top-k
    f0 = np.asarray(enc(params, common.threshold_state(), x))
    assert np.all((f0 != 0).sum(1) == 3)

    # the saved form on raw activations reconstructs like the training form on s·x (θ rescaled)
    s = 0.37
    folded_p, folded_s = _jit(lambda p, st: batchtopk.fold_scale(cfg, p, st, s), params, state)
    raw = x / s
    f_raw = enc(folded_p, folded_s, raw)
    got = f_raw @ folded_p.W_dec + folded_p.b_dec
    ref = (enc(params, state, x) @ params.W_dec + params.b_dec) / s
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(f_raw) != 0, want != 0)


def test_hierarchical_loss_grads_chunks_and_budgets_match_naive() -> None:
    x, params = _problem(4)
    kk = 5
    cfg = hierarchical_topk.HierarchicalTopKConfig(
        n_latents=N, k=kk, chunk_size=5
    )  # 12 tokens: 3 chunks, padded
    state = common.StepState(step=jnp.zeros((), jnp.int32))

    order = np.argsort(-np.asarray(_scores(cfg, params, x)[1]), axis=1, kind="stable")[:, :kk]

    def naive(p: common.LinearParams) -> jax.Array:
        pre, _ = _scores(cfg, p, x)
        var = jnp.sum((x - x.mean(0)) ** 2)
        total = 0.0
        for j in range(1, kk + 1):  # x̂_j from the j largest, one budget at a time
            idx = order[:, :j]
            x_hat = (
                jnp.einsum("bj,bjd->bd", jnp.take_along_axis(pre, jnp.asarray(idx), 1), p.W_dec[idx])
                + p.b_dec
            )
            total = total + jnp.sum((x - x_hat) ** 2) / var
        return total / kk

    def ours(p: common.LinearParams, chunk: int = 5) -> jax.Array:
        c = hierarchical_topk.HierarchicalTopKConfig(n_latents=N, k=kk, chunk_size=chunk)
        return hierarchical_topk.loss(c, p, state, x, NO_DEAD)[0]

    (l_ours, g_ours), (l_naive, g_naive), (_, g_one) = (
        jax.jit(jax.value_and_grad(fn))(params) for fn in (ours, naive, lambda p: ours(p, chunk=B))
    )
    np.testing.assert_allclose(float(l_ours), float(l_naive), rtol=1e-5)
    _allclose_tree(g_ours, g_naive)
    _allclose_tree(g_one, g_ours, rtol=1e-5, atol=1e-6)  # chunked (padded) = one chunk

    pre, score = _scores(cfg, params, x)
    order = np.argsort(-np.asarray(score), axis=1, kind="stable")
    for j in (1, 3, kk):
        f = np.asarray(jax.jit(lambda p, j=j: hierarchical_topk.encode(cfg, p, state, x, k=j))(params))
        assert np.all((f != 0).sum(1) <= j)
        rows = np.arange(B)[:, None]
        np.testing.assert_allclose(f[rows, order[:, :j]], np.asarray(pre)[rows, order[:, :j]], rtol=1e-6)
    with pytest.raises(ValueError, match=r"k=6 is outside the budgets this SAE was trained for \(1..K=5\)"):
        hierarchical_topk.encode(cfg, params, state, x, k=6)


def test_jumprelu_forward_and_straight_through_grads_match_formulas() -> None:
    x, lin = _problem(5)
    r = np.random.default_rng(5)
    eps, lam = 0.4, 0.03
    params = jumprelu.Params(
        W_enc=lin.W_enc,
        b_enc=lin.b_enc,
        W_dec=lin.W_dec,
        b_dec=lin.b_dec,
        threshold=jnp.asarray(r.uniform(0.0, 0.8, N), jnp.float32),
    )
    cfg = jumprelu.JumpReLUConfig(n_latents=N, l0_coef=lam, bandwidth=eps, l0_warmup_frac=0.0)
    state = common.StepState(step=jnp.zeros((), jnp.int32))
    pre = np.asarray((x - params.b_dec) @ params.W_enc + params.b_enc)
    theta = np.asarray(params.threshold)
    f_want = pre * (pre > theta)
    np.testing.assert_allclose(np.asarray(jumprelu.encode(cfg, params, state, x)), f_want, rtol=1e-6)
    loss, aux = jax.jit(lambda p: jumprelu.loss(cfg, p, state, x, NO_DEAD))(params)
    var = float(np.sum((np.asarray(x) - np.asarray(x).mean(0)) ** 2))
    x_hat = f_want @ np.asarray(params.W_dec) + np.asarray(params.b_dec)
    l0 = (pre > theta).sum() / B
    assert float(loss) == pytest.approx(np.sum((np.asarray(x) - x_hat) ** 2) / var + lam * l0, rel=1e-5)
    assert float(aux["l0"]) == pytest.approx(l0)

    grads = jax.jit(jax.grad(lambda p: jumprelu.loss(cfg, p, state, x, NO_DEAD)[0]))(params)

    def naive(p: jumprelu.Params) -> jax.Array:  # the gate as a constant: gradients of everything but θ
        z = (x - p.b_dec) @ p.W_enc + p.b_enc
        f = z * jnp.asarray(pre > theta)
        return jnp.sum((x - f @ p.W_dec - p.b_dec) ** 2) / var

    g_naive = jax.jit(jax.grad(naive))(params)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_allclose(
            np.asarray(getattr(grads, name)),
            np.asarray(getattr(g_naive, name)),
            rtol=2e-4,
            atol=1e-5,
            err_msg=name,
        )
    # θ: −(θ/ε)·K((z−θ)/ε)·∂L/∂f from the reconstruction, −(λ/ε)·mean_b K((z−θ)/ε) from the L0 term
    g_f = 2 * (x_hat - np.asarray(x)) @ np.asarray(params.W_dec).T / var
    kern = (np.abs((pre - theta) / eps) < 0.5).astype(np.float64)
    want_theta = np.sum(-(theta / eps) * kern * g_f, axis=0) - lam / eps * kern.sum(0) / B
    assert kern.sum() > 5  # the window catches enough entries for the check to mean something
    np.testing.assert_allclose(np.asarray(grads.threshold), want_theta, rtol=2e-4, atol=1e-6)

    target = jumprelu.JumpReLUConfig(
        n_latents=N, l0_coef=lam, bandwidth=eps, l0_warmup_frac=0.0, target_l0=4.0
    )
    loss_t = jax.jit(lambda p: jumprelu.loss(target, p, state, x, NO_DEAD)[0])(params)
    assert float(loss_t) == pytest.approx(float(loss) - lam * l0 + lam * (l0 / 4.0 - 1) ** 2, rel=1e-5)


def test_jumprelu_dead_preact_loss_reaches_only_the_dead_latents_and_revives_them() -> None:
    import optax

    x, lin = _problem(7)
    theta = jnp.full(N, 0.05, jnp.float32)
    dead_ids = np.arange(N) % 3 == 0
    b_enc = jnp.where(jnp.asarray(dead_ids), -20.0, lin.b_enc)  # below θ on every token: no gradient at all
    params = jumprelu.Params(W_enc=lin.W_enc, b_enc=b_enc, W_dec=lin.W_dec, b_dec=lin.b_dec, threshold=theta)
    state = common.StepState(step=jnp.zeros((), jnp.int32))
    ctx = StepCtx(dead=jnp.asarray(dead_ids), progress=jnp.float32(0.5))
    coef = 0.5
    on, off = (jumprelu.JumpReLUConfig(n_latents=N, dead_preact_coef=c) for c in (coef, 0.0))
    grad = lambda cfg: jax.grad(lambda p: jumprelu.loss(cfg, p, state, x, ctx)[0])(params)  # noqa: E731
    g_on, g_off = grad(on), grad(off)
    # the term is coef·mean_b Σ_dead (θ − pre) through b_enc and θ: −coef and +coef there, nothing elsewhere
    np.testing.assert_allclose(
        np.asarray(g_on.b_enc - g_off.b_enc), np.where(dead_ids, -coef, 0.0), atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(g_on.threshold - g_off.threshold), np.where(dead_ids, coef, 0.0), atol=1e-6
    )
    np.testing.assert_allclose(np.asarray(g_on.W_enc), np.asarray(g_off.W_enc), atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_on.b_dec), np.asarray(g_off.b_dec), atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_on.W_dec), np.asarray(g_off.W_dec), atol=1e-6)

    def ever_fired(cfg: jumprelu.JumpReLUConfig, steps: int = 200) -> np.ndarray:
        """Latents that fired on some step of a short Adam run (dead = did not fire on that step's batch)."""
        opt = optax.adam(0.2)  # the dead biases climb ~0.2 a step: from −20 in ~100

        @jax.jit
        def step(p: jumprelu.Params, o: optax.OptState) -> tuple[jumprelu.Params, optax.OptState, jax.Array]:
            fired = jnp.any(jumprelu.encode(cfg, p, state, x) > 0, axis=0)
            ctx_t = StepCtx(dead=~fired, progress=jnp.float32(0.5))
            g = jax.grad(lambda q: jumprelu.loss(cfg, q, state, x, ctx_t)[0])(p)
            upd, o = opt.update(g, o)
            return jumprelu.constrain(cfg, optax.apply_updates(p, upd)), o, fired

        p, o, seen = params, opt.init(params), np.zeros(N, bool)
        for _ in range(steps):
            p, o, fired = step(p, o)
            seen |= np.asarray(fired)
        return seen

    assert not ever_fired(off)[dead_ids].any()  # without the term the dead stay dead
    assert ever_fired(on)[dead_ids].all()


def test_new_archs_registered_and_refuse_bad_configs() -> None:
    from sae.base import make_config, registry

    assert {"batchtopk", "jumprelu", "hierarchical_topk", "matryoshka"} <= set(registry())
    with pytest.raises(ValueError, match=r"group_sizes \(4, 4\) sum to 8, not n_latents=16"):
        make_config(matryoshka.MatryoshkaConfig, {"n_latents": 16, "k": 2, "group_sizes": [4, 4]})
    cfg = make_config(matryoshka.MatryoshkaConfig, {"n_latents": 16, "k": 2, "group_sizes": [4, 12]})
    assert cfg.group_sizes == (4, 12) and cfg.group_ends() == (4, 16)  # JSON lists come back as tuples
    assert matryoshka.MatryoshkaConfig(n_latents=4096).group_ends() == (1024, 2048, 3072, 4096)
    doubling = matryoshka.MatryoshkaConfig(n_latents=4096, group_layout="doubling")
    assert doubling.group_ends() == (256, 512, 1024, 2048, 4096)
    with pytest.raises(ValueError, match="k=9 must be between 1 and n_latents=8"):
        make_config(batchtopk.BatchTopKConfig, {"n_latents": 8, "k": 9})
    with pytest.raises(ValueError, match="--target-l0 must be > 0, got 0.0"):  # the shared range check
        make_config(jumprelu.JumpReLUConfig, {"target_l0": 0.0})


def test_sae_object_encodes_any_budget_up_to_k() -> None:
    x, params = _problem(6)
    cfg = hierarchical_topk.HierarchicalTopKConfig(n_latents=N, k=5)
    state = common.StepState(step=jnp.zeros((), jnp.int32))
    model = sae.SAE(cfg, params, state, D)
    xn = np.asarray(x)
    for j in (1, 5):
        want = np.asarray(jax.jit(lambda p, j=j: hierarchical_topk.encode(cfg, p, state, x, k=j))(params))
        np.testing.assert_allclose(model.encode(xn, k=j), want, rtol=1e-6)
    np.testing.assert_allclose(model.encode(xn), model.encode(xn, k=5), rtol=1e-6)
    with pytest.raises(ValueError, match="outside the budgets"):
        model.encode(xn, k=9)
    jr = jumprelu.Params(
        W_enc=params.W_enc, b_enc=params.b_enc, W_dec=params.W_dec, b_dec=params.b_dec, threshold=jnp.zeros(N)
    )
    with pytest.raises(ValueError, match="'jumprelu' has no per-call budget"):
        sae.SAE(jumprelu.JumpReLUConfig(n_latents=N), jr, state, D).encode(xn, k=2)


@pytest.fixture()
def ws(minilm_ws: Path, tmp_path: Path) -> Path:
    path = tmp_path / "ws.duckdb"
    shutil.copy(minilm_ws, path)  # the shared harvest stays read-only
    return path


def test_matryoshka_through_cli_train_resume_and_eval(ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from analysis.evaluate import list_evals
    from saewb.cli import main

    base = [
        "train",
        "--workspace",
        str(ws),
        "--hook",
        "blocks.1.hook_out",
        "--n-latents",
        "64",
        "--train-tokens",
        "2048",
        "--batch-size",
        "256",
        "--log-every",
        "4",
        "--ckpt-every",
        "4",
        "--init-sample-tokens",
        "512",
        "--eval-tokens",
        "512",
        "--no-progress",
    ]
    mat = [*base, "--arch", "matryoshka", "--k", "4", "--group-sizes", "8,24,32", "--name", "mat"]
    assert main(mat) == 0
    assert main(mat) == 0  # the same flags resume (nothing left to do): the tuple config matches itself
    model = sae.load("mat", workspace=ws)
    assert model.config.group_sizes == (8, 24, 32) and int(model.state.count) > 0
    assert 0 < model.metrics["fvu"] < 1 and 1 < model.metrics["l0"] < 12  # θ inference, not forced to 4
    capsys.readouterr()
    assert main(["eval", "mat", "--workspace", str(ws), "--max-seqs", "12"]) == 0
    out = capsys.readouterr().out
    assert "emb_cosine" in out and "fvu" in out
    stored = list_evals(ws, "mat", "eval")[-1]["metrics"]
    assert 0 < stored["fvu"] < 1 and stored["emb_cosine"] > 0
