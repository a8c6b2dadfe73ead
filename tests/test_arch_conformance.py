"""Every registered architecture against the contract of sae/base.py (``Architecture``, ``OPTIONAL``).

One loop over the registry: the required members, init, encode/decode shapes, loss and gradient
(finite, with the aux keys the trainer reads), train + save + ``sae.load`` round trip (the loaded SAE
encodes like the trained form and evaluates), resume from the finished run (the lifecycle reads its
checkpoint back and changes nothing), resume of a run cut after its mid-run checkpoint (params,
optimiser and arch state bit for bit those of the uninterrupted run; ITDA's interrupted resume is in
tests/test_sae_archs_b.py), a different config under the run's name refused, the SAELens export
read back by our importer where the architecture has an export form, and sweep planning (an
architecture with its own fit is refused before any work). A new architecture needs a line in
SMALL: the test fails until it has one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import sae
from sae import checkpoint as ckpt
from sae.archs import OWN_FIT
from sae.base import OPTIONAL, Architecture, StepCtx, make_config, optional, registry
from sae.metrics import evaluate
from sae.trainer import TrainConfig

D = 6
SMALL: dict[str, dict[str, Any]] = {
    "topk": {"n_latents": 16, "k": 3},
    "relu_l1": {"n_latents": 16, "variant": "classic"},
    "gba": {"n_latents": 16, "n_groups": 2, "htf": 0.5, "update_tokens": 64},
    "batchtopk": {"n_latents": 16, "k": 3, "threshold_start_step": 2},
    "jumprelu": {"n_latents": 16},
    "hierarchical_topk": {"n_latents": 16, "k": 3},
    "matryoshka": {"n_latents": 16, "k": 3, "group_sizes": [4, 12], "threshold_start_step": 2},
    "feature_choice": {"n_latents": 16, "k": 2, "capacity": "zipf", "density_decay": 0.8},
    "masked": {"n_latents": 16, "k": 2},
    "itda": {"k": 3, "tau": 0.3},
}
"""A tiny config of every architecture. Tracked state starts before the step-4 checkpoint (the
thresholds from step 2; Feature Choice's Zipf term warms up at step 5, after it), so the resume check
carries it across; JSON lists come back as tuples (Matryoshka's group sizes)."""
REQUIRED = [name for name in Architecture.__dict__ if not name.startswith("_")] + ["Config"]
GRADIENT_MEMBERS = ("loss", "update_state", "project_grads", "constrain")


def _batches(seed: int = 0, batch: int = 32) -> Any:
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal((64 * batch, D)) @ rng.standard_normal((D, D)) + 0.5).astype(np.float32)

    def batches(start: int) -> Any:
        for i in range(start, len(data) // batch):
            yield data[i * batch : (i + 1) * batch]

    return batches


def _assert_same_arrays(a: Path, b: Path) -> None:
    """The two safetensors files hold the same arrays, bit for bit."""
    fa, fb = load_file(f"{a}.safetensors"), load_file(f"{b}.safetensors")
    assert fa.keys() == fb.keys()
    for key in fa:
        np.testing.assert_array_equal(fa[key], fb[key], err_msg=f"{a.name}{key}")


@pytest.fixture(scope="module", autouse=True)
def _compile_once(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Each fit builds its own jitted step, so the resume would compile the same program again; XLA's
    persistent cache (a fresh folder, this module only) turns that second compile into a lookup."""
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = [getattr(jax.config, k) for k in keys]
    jax.config.update(keys[0], str(tmp_path_factory.mktemp("xla-cache")))
    jax.config.update(keys[1], 0.0)
    yield
    for key, value in zip(keys, before, strict=True):
        jax.config.update(key, value)


def test_every_architecture_has_a_small_config() -> None:
    assert sorted(SMALL) == sorted(registry())
    assert set(registry()) >= OWN_FIT


@pytest.mark.parametrize("name", sorted(SMALL))
def test_architecture_conforms(name: str, tmp_path: Path) -> None:
    from sae.orchestrate import check_lockstep, fit_function
    from sae.sweep import SweepError

    mod = registry()[name]
    own_fit = name in OWN_FIT
    for member in REQUIRED:
        if own_fit and member in GRADIENT_MEMBERS:
            continue
        assert hasattr(mod, member), f"{name} lacks the required member {member}"
    assert own_fit == hasattr(mod, "fit")
    extra = {m for m in OPTIONAL if hasattr(mod, m)}
    assert all(optional(mod, m) is getattr(mod, m) for m in extra)
    cfg = make_config(mod.Config, SMALL[name])
    assert cfg.arch == name

    # init, shapes, loss and gradient
    sample = next(_batches(1)(0))
    params, state = mod.init(cfg, jax.random.PRNGKey(0), D, sample)
    x = jnp.asarray(sample)
    encode = jax.jit(lambda p, s, v: mod.encode(cfg, p, s, v))  # compiled once, used twice
    if not own_fit:
        n = cfg.n_latents
        f = encode(params, state, x)
        assert f.shape == (len(sample), n)
        assert mod.decode(cfg, params, f).shape == x.shape
        ctx = StepCtx(dead=jnp.zeros(n, bool), progress=jnp.float32(0.5))
        (value, aux), grads = jax.jit(
            jax.value_and_grad(lambda p: mod.loss(cfg, p, state, x, ctx), has_aux=True)
        )(params)
        assert np.isfinite(float(value))
        assert {"err", "var", "l0", "fires"} <= set(aux) and aux["fires"].shape == (n,)
        assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
        assert any(float(jnp.abs(g).sum()) > 0 for g in jax.tree_util.tree_leaves(grads))

    # train, save, load; resume the finished run (nothing changes)
    fit, with_index = fit_function(name)
    assert with_index == own_fit
    tc = TrainConfig(
        train_tokens=32 * 8,
        batch_size=32,
        lr=1e-2,
        log_every=4,
        ckpt_every=4,
        init_sample_tokens=64,
        dead_window_tokens=64,
    )
    run_dir = tmp_path / name
    result = fit(cfg, tc, _batches(), run_dir=run_dir, progress=False)
    model = sae.load(run_dir)
    assert model.config == cfg and model.d == D
    probe = next(_batches(2)(0))
    f = model.encode(probe)
    assert f.shape == (len(probe), model.n_latents) and model.decode(f).shape == probe.shape
    direct = encode(result.params, result.arch_state, jnp.asarray(probe))  # the inference form trained
    np.testing.assert_allclose(f, np.asarray(direct), rtol=1e-5, atol=1e-6)
    m = evaluate(model, [probe])
    assert 0 < m["fvu"] < 1.5 and m["l0"] > 0
    again = fit(cfg, tc, _batches(), run_dir=run_dir, progress=False)
    for a, b in zip(
        jax.tree_util.tree_leaves(again.params), jax.tree_util.tree_leaves(result.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="different config"):
        fit(cfg, TrainConfig(**{**tc.__dict__, "seed": 1}), _batches(), run_dir=run_dir, progress=False)
    if not own_fit:
        # a run killed after its step-4 checkpoint (only that one left) resumes bit for bit
        cut = tmp_path / "cut"
        shutil.copytree(run_dir, cut)
        shutil.rmtree(cut / "sae")
        cdir = ckpt.checkpoints_dir(cut)
        for p in cdir.glob("step_*"):
            if p.name != "step_000000004":
                shutil.rmtree(p)
        (cdir / "LATEST").write_text("step_000000004")
        fit(cfg, tc, _batches(), run_dir=cut, progress=False)
        for d in (run_dir, cut):
            assert int(ckpt.read_manifest(ckpt.latest_checkpoint(d))["step"]) == 8
        for part in ("params", "opt_state", "state"):
            _assert_same_arrays(ckpt.latest_checkpoint(run_dir) / part, ckpt.latest_checkpoint(cut) / part)
        for part in ("params", "state"):
            _assert_same_arrays(run_dir / "sae" / part, cut / "sae" / part)

    # SAELens export, read back by our importer: the same reconstructions
    if optional(mod, "saelens_export") is not None:
        from sae.interop import from_saelens, to_saelens

        back = from_saelens(*to_saelens(model))
        np.testing.assert_allclose(back.reconstruct(probe), model.reconstruct(probe), rtol=2e-4, atol=2e-4)
    else:
        from sae.interop import InteropError, to_saelens

        with pytest.raises(InteropError, match="no SAELens form"):
            to_saelens(model)

    # sweep planning: an architecture with its own fit is refused before any work
    if own_fit:
        with pytest.raises(SweepError, match="cannot train in lockstep"):
            check_lockstep(name, "member m", SweepError)
    else:
        check_lockstep(name, "member m", SweepError)
