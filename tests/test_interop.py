"""SAELens format both ways, checked against the real sae-lens package in its own virtualenv.

`make test` creates `.bench-venvs/saelens` (benchmarks/peers_setup.sh) before pytest, so this test never
skips: without the venv it fails with the command that creates it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import REPO, run_saewb
from safetensors.numpy import load_file, save_file

from saewb.cli import main

SAELENS_PY = REPO / ".bench-venvs" / "saelens" / "bin" / "python"

# Runs inside the sae-lens venv: loads our exports with SAE.load_from_disk and encodes the same inputs;
# writes SAELens's own SAEs with save_model (random weights, every importable architecture).
PEER = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import load_file, save_file
    from sae_lens import SAE, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig, JumpReLUSAE, JumpReLUSAEConfig
    job = json.load(open(sys.argv[1]))
    x = load_file(job["x"])["x"]
    out = {}
    for name, path in job["load"].items():
        sae = SAE.load_from_disk(path)
        with torch.no_grad():
            f = sae.encode(x)
            out[name + ".f"] = f.contiguous()
            out[name + ".xhat"] = sae.decode(f).contiguous()
    torch.manual_seed(0)
    d, n = x.shape[1], job["n"]
    made = {
        "standard_nobdec": StandardSAE(StandardSAEConfig(d_in=d, d_sae=n, apply_b_dec_to_input=False)),
        "standard_bdec": StandardSAE(StandardSAEConfig(d_in=d, d_sae=n, apply_b_dec_to_input=True)),
        "topk_rescale": TopKSAE(TopKSAEConfig(d_in=d, d_sae=n, k=8, rescale_acts_by_decoder_norm=True,
                                              apply_b_dec_to_input=False)),
        "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=d, d_sae=n)),
        # GemmaScope's layout: no b_dec subtraction before the encoder
        "jumprelu_gemmascope": JumpReLUSAE(JumpReLUSAEConfig(d_in=d, d_sae=n, apply_b_dec_to_input=False)),
    }
    for name, sae in made.items():
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
            if hasattr(sae, "threshold"):
                sae.threshold.copy_(torch.rand_like(sae.threshold) * 0.5)
            sae.W_dec.mul_(torch.rand(n, 1) + 0.5)  # non-unit decoder rows
            sae.cfg.metadata.hook_name = job["hook"]
            sae.save_model(job["made"] + "/" + name)
            out["made." + name + ".f"] = sae.encode(x).contiguous()
            out["made." + name + ".xhat"] = sae.decode(sae.encode(x)).contiguous()
    save_file(out, job["out"])
""")


def _peer(job: dict, tmp: Path) -> dict[str, np.ndarray]:
    if not SAELENS_PY.exists():
        pytest.fail(f"{SAELENS_PY} is missing: run `make saelens-venv` (benchmarks/peers_setup.sh) first")
    script, jpath = tmp / "peer.py", tmp / "job.json"
    script.write_text(PEER)
    jpath.write_text(json.dumps(job))
    proc = subprocess.run(
        [str(SAELENS_PY), str(script), str(jpath)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(job["out"])


def _random_saes(d: int, n: int) -> dict:
    """Our other architectures in their saved (inference) form, from their own init + random state."""
    from sae.api import SAE
    from sae.base import arch_module, make_config

    out = {}
    rng = np.random.default_rng(0)
    specs = {
        "relu_april": ("relu_l1", {"variant": "april"}),
        "relu_classic": ("relu_l1", {"variant": "classic"}),
        "gba_relu": ("gba", {"activation": "relu", "n_groups": 2}),
        "gba_jump": ("gba", {"activation": "jumprelu", "n_groups": 2}),
        "jumprelu": ("jumprelu", {}),
        "batchtopk": ("batchtopk", {"k": 8}),
        "hierarchical_topk": ("hierarchical_topk", {"k": 8}),
    }
    for name, (arch, extra) in specs.items():
        mod = arch_module(arch)
        cfg = make_config(mod.Config, {"n_latents": n, **extra})
        sample = rng.normal(size=(64, d)).astype(np.float32)
        params, state = mod.init(cfg, jax.random.PRNGKey(1), d, sample)
        params = jax.tree_util.tree_map(
            lambda a: a + 0.05 * rng.normal(size=np.shape(a)).astype(np.float32), params
        )
        if arch == "gba":
            params = params.replace(a=jax.numpy.abs(params.a) + 0.5)
            state = state.replace(b=-jax.numpy.asarray(rng.uniform(0, 0.3, n), np.float32))
        if arch == "jumprelu":
            params = params.replace(threshold=jax.numpy.asarray(rng.uniform(0, 0.2, n), np.float32))
        if arch == "batchtopk":  # as if θ had been tracked for a few steps
            state = state.replace(
                count=state.count + 3, ema=state.ema * 0 + 0.05 * (1 - cfg.threshold_decay**3)
            )
        params, state = mod.fold_scale(cfg, params, state, 1.7)
        out[name] = SAE(cfg, params, state, d)
    return out


def _close(ours: np.ndarray, theirs: np.ndarray, what: str) -> None:
    scale = max(float(np.abs(theirs).max()), 1e-6)
    err = float(np.abs(ours - theirs).max()) / scale
    assert err < 1e-4, f"{what}: max relative difference {err:.2e}"


def test_saelens_round_trip(demo_ws: Path, tmp_path: Path) -> None:
    import sae as sae_pkg
    from activations.stream import ActivationStream
    from sae import interop, runs
    from sae.metrics import evaluate
    from saewb.workspace import Workspace

    hook = "blocks.2.hook_out"
    x = next(iter(ActivationStream(demo_ws, hook, batch_size=256, seed=0, split="eval").epoch()))
    save_file({"x": np.ascontiguousarray(x)}, str(tmp_path / "x.safetensors"))

    # export: our CLI for the trained TopK run, the API for the other architectures
    exports = {"topk": tmp_path / "exp" / "topk"}
    # the real CLI, in-process (a subprocess would add seconds of imports)
    assert main(["export-saelens", "demo", str(exports["topk"]), "--workspace", str(demo_ws)]) == 0
    cfg = json.loads((exports["topk"] / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 16 and cfg["metadata"]["hook_name"] == hook
    ours = {"topk": sae_pkg.load("demo", workspace=demo_ws)}
    for name, model in _random_saes(x.shape[1], 64).items():
        ours[name] = model
        exports[name] = interop.export_saelens(model, tmp_path / "exp" / name, {"hook_name": hook})
    made = tmp_path / "made"
    theirs = _peer(
        {
            "x": str(tmp_path / "x.safetensors"),
            "load": {k: str(v) for k, v in exports.items()},
            "n": 64,
            "hook": hook,
            "made": str(made),
            "out": str(tmp_path / "out.safetensors"),
        },
        tmp_path,
    )
    for name, model in ours.items():
        f = model.encode(x)
        assert (f != 0).sum() > 0, name
        _close(f, theirs[name + ".f"], f"{name} latents (SAELens vs ours)")
        _close(model.decode(f), theirs[name + ".xhat"], f"{name} reconstruction (SAELens vs ours)")

    # import: SAELens-written directories become runs that load, evaluate and encode like SAELens
    ws_path = tmp_path / "ws.duckdb"
    shutil.copy(demo_ws, ws_path)
    ws = Workspace(ws_path)
    assert (
        main(
            [
                "import-saelens",
                str(made / "topk_rescale"),
                "--workspace",
                str(ws_path),
                "--name",
                "sl-topk_rescale",
            ]
        )
        == 0
    )
    for name in ("standard_nobdec", "standard_bdec", "topk_rescale", "jumprelu", "jumprelu_gemmascope"):
        if name.startswith("jumprelu") and "jumprelu" not in _registered():
            with pytest.raises(interop.InteropError, match="jumprelu"):
                interop.import_saelens(made / name, ws_path, f"sl-{name}")
            continue
        if name != "topk_rescale":  # the CLI imported that one
            interop.import_saelens(made / name, ws_path, f"sl-{name}")
        row = runs.get_run(ws, f"sl-{name}")
        assert row["status"] == "done" and row["hook"] == hook
        model = sae_pkg.load(f"sl-{name}", workspace=ws_path)
        _close(model.encode(x), theirs["made." + name + ".f"], f"imported {name} latents")
        _close(model.reconstruct(x), theirs["made." + name + ".xhat"], f"imported {name} reconstruction")
        assert np.isfinite(evaluate(model, [x])["fvu"])
    # the same name twice is refused; so is a hook of the wrong width
    with pytest.raises(interop.InteropError, match="already exists"):
        interop.import_saelens(made / "standard_bdec", ws_path, "sl-standard_bdec")
    with pytest.raises(interop.InteropError, match="is not in harvest"):
        interop.import_saelens(made / "standard_bdec", ws_path, "sl-other", hook="blocks.9.hook_out")


def _registered() -> set[str]:
    from sae.base import registry

    return set(registry())


def test_saelens_clear_errors(tmp_path: Path) -> None:
    from safetensors.numpy import save_file as save_np

    from sae import interop

    with pytest.raises(interop.InteropError, match="sae_weights.safetensors missing"):
        interop.load_saelens(tmp_path)
    d, n = 8, 16
    w = {
        "W_enc": np.zeros((d, n), np.float32),
        "b_enc": np.zeros(n, np.float32),
        "W_dec": np.zeros((n, d), np.float32),
        "b_dec": np.zeros(d, np.float32),
    }
    save_np(w, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "gated", "d_in": d, "d_sae": n}))
    with pytest.raises(
        interop.InteropError, match="'gated' is not supported; importable: jumprelu, standard, topk"
    ):
        interop.load_saelens(tmp_path)
    (tmp_path / "cfg.json").write_text(
        json.dumps({"architecture": "standard", "d_in": d, "d_sae": n, "normalize_activations": "layer_norm"})
    )
    with pytest.raises(interop.InteropError, match="layer_norm"):
        interop.load_saelens(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": d + 1, "d_sae": n}))
    with pytest.raises(interop.InteropError, match="d_in=9 but the weights have 8"):
        interop.load_saelens(tmp_path)
    proc = run_saewb(
        "import-saelens",
        str(tmp_path),
        "--workspace",
        str(tmp_path / "none.duckdb"),
        "--name",
        "x",
        check=False,
    )  # one real subprocess: the exit code and the message a user sees
    assert proc.returncode == 1 and "does not exist" in proc.stderr
