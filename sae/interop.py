"""SAELens format, both ways: export our SAEs as SAELens directories, import SAELens directories as runs.

An SAELens directory holds ``cfg.json`` (``architecture``, ``d_in``, ``d_sae``, ``apply_b_dec_to_input``,
``normalize_activations``, architecture fields such as ``k``, and a ``metadata`` object with
``model_name``/``hook_name``/``sae_lens_version``) and ``sae_weights.safetensors`` (``W_enc`` [d_in, d_sae],
``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in], plus ``threshold`` [d_sae] for JumpReLU).
This is what ``SAE.save_model`` writes and ``SAE.load_from_disk`` reads in sae-lens 6.x; GemmaScope and
the other releases on the Hugging Face hub use the same files once downloaded.

Architecture mapping (every one exact: the same latent values and reconstructions, up to float rounding):

=================================  ====================================================================
ours                               SAELens
=================================  ====================================================================
``topk``                           ``topk``, ``apply_b_dec_to_input`` true, ``rescale_acts_by_decoder_norm``
                                   false (the saved SAE already has the decoder norms folded in, or was
                                   trained to choose on raw pre-activations)
``relu_l1`` variant ``april``      ``standard``, ``apply_b_dec_to_input`` false
``relu_l1`` variant ``classic``    ``standard``, ``apply_b_dec_to_input`` true
``gba`` activation ``relu``        ``standard``: ``W_enc = s_in·Wᵀ``, ``b_enc = b``, ``W_dec = a·W``,
                                   ``b_dec = b_pre`` (the tied weights are untied on export)
``gba`` activation ``jumprelu``    ``jumprelu``: ``b_enc = 0``, ``threshold = −b`` (b ≤ 0, so
                                   u·1[u + b > 0] = ReLU(u)·1[u > −b])
``hierarchical_topk``              ``topk`` with k = K (its default budget)
``jumprelu``                       ``jumprelu`` (ours is pre·1[pre > θ] with θ ≥ 0: the same values)
``batchtopk``, ``matryoshka``      ``jumprelu``: their threshold inference ReLU(pre)·1[score > θ] with
                                   θ_i = θ / score scale_i (SAELens converts its own BatchTopK the same way)
``feature_choice``                 ``jumprelu`` with its per-latent θ
``masked``, ``itda``               none (refused with a clear error)
=================================  ====================================================================

Import goes the other way: ``standard`` → ``relu_l1`` (``april`` without, ``classic`` with
``apply_b_dec_to_input``), ``topk`` → ``topk`` (``decoder="free"``, ``rescale_by_decoder_norm`` false;
SAELens's ``rescale_acts_by_decoder_norm`` is folded into the encoder first, and a ``topk`` without
``apply_b_dec_to_input`` gets ``b_enc + b_dec·W_enc``), ``jumprelu`` → our ``jumprelu`` arch (a negative
threshold is clamped at 0, which leaves SAELens's ReLU(pre)·1[pre > θ] unchanged). Other
architectures (gated, batchtopk with its own thresholds, transcoders, matryoshka...) and per-token input
normalisations (``layer_norm``, ``constant_norm_rescale``) raise ``InteropError`` naming what is supported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sae.api import SAE

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"
"""Written as ``metadata.sae_lens_version``: the 6.x layout of ``cfg.json`` (older versions trigger
SAELens's pre-6 key renaming)."""
SUPPORTED_IMPORT = ("standard", "topk", "jumprelu")
_NORMALISATIONS_OK = ("none", "expected_average_only_in", None)
"""Input normalisations that leave inference a plain function of the raw activations (SAELens folds
the expected-average scale into the weights before saving)."""


class InteropError(ValueError):
    """A directory or SAE that cannot be converted; the message names what is supported."""


# ---------------------------------------------------------------- export


def to_saelens(model: SAE) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(cfg fields, float32 weights) of the SAELens form of one of our SAEs (see the module table)."""
    cfg = model.config
    p = model.params
    arch = cfg.arch

    def f32(a: Any) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(a, np.float32))

    if arch in ("topk", "hierarchical_topk"):  # hierarchical: its default budget K is a plain top-K code
        fields = {"architecture": "topk", "apply_b_dec_to_input": True, "k": int(cfg.k),
                  "rescale_acts_by_decoder_norm": False}
        w = {"W_enc": p.W_enc, "b_enc": p.b_enc, "W_dec": p.W_dec, "b_dec": p.b_dec}
    elif arch == "relu_l1":
        fields = {"architecture": "standard", "apply_b_dec_to_input": cfg.variant == "classic"}
        w = {"W_enc": p.W_enc, "b_enc": p.b_enc, "W_dec": p.W_dec, "b_dec": p.b_dec}
    elif arch == "gba":
        s_in = float(np.asarray(p.s_in))
        b = np.asarray(model.state.b, np.float32)
        w_enc = np.asarray(p.W, np.float32).T * s_in
        w_dec = np.asarray(p.a, np.float32)[:, None] * np.asarray(p.W, np.float32)
        if cfg.activation == "relu":
            fields = {"architecture": "standard", "apply_b_dec_to_input": True}
            w = {"W_enc": w_enc, "b_enc": b, "W_dec": w_dec, "b_dec": p.b_pre}
        else:
            if (b > 0).any():
                raise InteropError("a GBA JumpReLU SAE with positive biases has no SAELens jumprelu form")
            fields = {"architecture": "jumprelu", "apply_b_dec_to_input": True}
            w = {"W_enc": w_enc, "b_enc": np.zeros_like(b), "W_dec": w_dec, "b_dec": p.b_pre, "threshold": -b}
    elif arch == "jumprelu":
        fields = {"architecture": "jumprelu", "apply_b_dec_to_input": _jumprelu_applies_b_dec(cfg)}
        w = {"W_enc": p.W_enc, "b_enc": p.b_enc, "W_dec": p.W_dec, "b_dec": p.b_dec,
             "threshold": _jumprelu_threshold(model)}
    elif arch in ("batchtopk", "matryoshka", "feature_choice"):
        # threshold inference f = ReLU(pre)·1[score > θ] is SAELens's jumprelu with θ_i = θ / score scale_i
        fields = {"architecture": "jumprelu", "apply_b_dec_to_input": True}
        w = {"W_enc": p.W_enc, "b_enc": p.b_enc, "W_dec": p.W_dec, "b_dec": p.b_dec,
             "threshold": _threshold_inference(model)}
    else:
        raise InteropError(
            f"architecture {arch!r} has no SAELens form; exportable: topk, hierarchical_topk, relu_l1, gba, "
            "jumprelu, batchtopk, matryoshka, feature_choice"
        )
    weights = {k: f32(v) for k, v in w.items()}
    cfg_dict = {
        "d_in": int(model.d),
        "d_sae": int(model.n_latents),
        "dtype": "float32",
        "device": "cpu",
        "normalize_activations": "none",
        "reshape_activations": "none",
        **fields,
    }
    return cfg_dict, weights


def _jumprelu_threshold(model: SAE) -> np.ndarray:
    """Our jumprelu arch's per-latent threshold, whether stored directly or as its log."""
    for tree in (model.params, model.state):
        if hasattr(tree, "threshold"):
            return np.asarray(tree.threshold, np.float32)
        if hasattr(tree, "log_threshold"):
            return np.exp(np.asarray(tree.log_threshold, np.float32))
    raise InteropError("this jumprelu SAE has no threshold or log_threshold parameter to export")


def _threshold_inference(model: Any) -> np.ndarray:
    """Per-latent pre-activation thresholds of the threshold-inference SAEs (BatchTopK family)."""
    cfg, p, state = model.config, model.params, model.state
    n = model.n_latents
    if hasattr(state, "theta"):  # feature choice: per-latent θ on pre directly
        return np.maximum(np.asarray(state.theta, np.float32), 0.0)
    from sae import batchtopk, common

    if int(np.min(np.asarray(state.count))) == 0:
        raise InteropError(
            f"this {cfg.arch} SAE has no inference threshold yet (saved before tracking started); train longer"
        )
    theta = np.broadcast_to(np.asarray(common.threshold_value(state, cfg.threshold_decay), np.float32), (n,))
    scale = batchtopk.score_scale(cfg, p)  # score = pre · scale: score > θ ⇔ pre > θ / scale
    if scale is not None:
        theta = theta / np.maximum(np.asarray(scale, np.float32)[0], 1e-12)
    return np.maximum(theta, 0.0)


def _jumprelu_applies_b_dec(cfg: Any) -> bool:
    return bool(getattr(cfg, "apply_b_dec_to_input", getattr(cfg, "pre_encoder_bias", True)))


def write_saelens(out_dir: str | Path, cfg_dict: dict[str, Any], weights: dict[str, np.ndarray],
                  metadata: dict[str, Any] | None = None) -> Path:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` into ``out_dir`` (created; must be empty)."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise InteropError(f"{out} exists and is not empty; pick a new directory or empty it")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
            "exported_by": "saewb", **(metadata or {})}
    save_file(weights, str(out / SAELENS_WEIGHTS))
    (out / SAELENS_CFG).write_text(json.dumps({**cfg_dict, "metadata": meta}, indent=1))
    return out


def export_saelens(model: SAE, out_dir: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Export one loaded SAE (``sae.load(...)``) as an SAELens directory."""
    cfg_dict, weights = to_saelens(model)
    return write_saelens(out_dir, cfg_dict, weights, metadata)


def export_run(workspace: str | Path, run: str, out_dir: str | Path) -> Path:
    """Export a workspace run, with its model, hook, context size and corpus as SAELens metadata."""
    import sae as sae_pkg
    from activations.store import harvest_info
    from sae import runs
    from saewb.workspace import Workspace

    ws = Workspace(workspace)
    model = sae_pkg.load(run, workspace=ws.path)
    row = runs.get_run(ws, run) or {}
    meta: dict[str, Any] = {"hook_name": row.get("hook"), "saewb_run": run, "saewb_arch": model.config.arch}
    if row.get("harvest"):
        try:
            info = harvest_info(ws, row["harvest"])
        except ValueError:
            info = None
        if info is not None:
            ident = info.config.get("identity", info.config)
            meta.update({"model_name": ident.get("model"), "context_size": ident.get("ctx_len"),
                         "dataset_path": ident.get("corpus")})
    return export_saelens(model, out_dir, {k: v for k, v in meta.items() if v is not None})


# ---------------------------------------------------------------- import


def read_saelens(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The cfg dict and float32 weights of an SAELens directory (bf16/f16 weights are widened)."""
    from safetensors.flax import load_file  # handles bfloat16, which numpy cannot hold

    path = Path(path).expanduser()
    if not path.is_dir():
        raise InteropError(f"{path} is not a directory; pass the folder holding {SAELENS_CFG} and {SAELENS_WEIGHTS}")
    missing = [f for f in (SAELENS_CFG, SAELENS_WEIGHTS) if not (path / f).exists()]
    if missing:
        hint = ""
        if (path / "params.npz").exists():
            hint = " (params.npz is GemmaScope's original JAX format: load it with sae-lens once and save_model)"
        raise InteropError(
            f"{path} is not an SAELens directory: {', '.join(missing)} missing{hint}; it needs {SAELENS_CFG} "
            f"and {SAELENS_WEIGHTS} as written by sae_lens SAE.save_model"
        )
    try:
        cfg = json.loads((path / SAELENS_CFG).read_text())
    except json.JSONDecodeError as err:
        raise InteropError(f"{path / SAELENS_CFG} is not valid JSON ({err})") from err
    weights = {k: np.asarray(v.astype("float32")) for k, v in load_file(str(path / SAELENS_WEIGHTS)).items()}
    return cfg, weights


def _need(weights: dict[str, np.ndarray], names: tuple[str, ...], path: Any) -> None:
    missing = [n for n in names if n not in weights]
    if missing:
        raise InteropError(f"{path}/{SAELENS_WEIGHTS} lacks {missing} (has {sorted(weights)})")


def from_saelens(cfg: dict[str, Any], weights: dict[str, np.ndarray], where: Any = "SAELens SAE") -> SAE:
    """Our SAE equivalent to an SAELens (cfg, weights) pair; raises InteropError when there is none."""
    import jax.numpy as jnp

    from sae import common
    from sae.base import arch_module, make_config, registry

    arch = cfg.get("architecture", "standard")  # pre-6 configs without it are standard SAEs
    if arch not in SUPPORTED_IMPORT:
        raise InteropError(
            f"{where}: SAELens architecture {arch!r} is not supported; importable: {', '.join(SUPPORTED_IMPORT)}"
        )
    norm = cfg.get("normalize_activations", "none")
    if norm not in _NORMALISATIONS_OK:
        raise InteropError(
            f"{where}: normalize_activations={norm!r} rescales every token at run time, which our SAEs do not "
            "model; supported: 'none' (and 'expected_average_only_in', folded at save)"
        )
    _need(weights, ("W_enc", "b_enc", "W_dec", "b_dec"), where)
    w_enc, b_enc, w_dec, b_dec = (weights[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    d, n = w_enc.shape
    if w_dec.shape != (n, d) or b_enc.shape != (n,) or b_dec.shape != (d,):
        raise InteropError(
            f"{where}: inconsistent shapes W_enc {w_enc.shape}, W_dec {w_dec.shape}, b_enc {b_enc.shape}, "
            f"b_dec {b_dec.shape}"
        )
    for key, want in (("d_in", d), ("d_sae", n)):
        if key in cfg and int(cfg[key]) != want:
            raise InteropError(f"{where}: cfg.json says {key}={cfg[key]} but the weights have {want}")
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", True))

    def linear(we: np.ndarray, be: np.ndarray, wd: np.ndarray) -> Any:
        return common.LinearParams(W_enc=jnp.asarray(we), b_enc=jnp.asarray(be), W_dec=jnp.asarray(wd),
                                   b_dec=jnp.asarray(b_dec))

    state = common.StepState(step=jnp.zeros((), jnp.int32))
    if arch == "standard":
        ours = make_config(arch_module("relu_l1").Config,
                           {"n_latents": n, "variant": "classic" if apply_b_dec else "april"})
        return SAE(ours, linear(w_enc, b_enc, w_dec), state, d)
    if arch == "topk":
        if "k" not in cfg:
            raise InteropError(f"{where}: a topk cfg.json needs `k`")
        if cfg.get("rescale_acts_by_decoder_norm"):
            # choosing on pre·‖W_dec,i‖ and decoding f/‖W_dec,i‖ equals folding the norms into the encoder
            norms = np.maximum(np.linalg.norm(w_dec, axis=1), 1e-8).astype(np.float32)
            w_enc, b_enc, w_dec = w_enc * norms[None, :], b_enc * norms, w_dec / norms[:, None]
        if not apply_b_dec:
            b_enc = b_enc + b_dec @ w_enc  # x W + c = (x − b_dec) W + (c + b_dec W)
        ours = make_config(arch_module("topk").Config,
                           {"n_latents": n, "k": int(cfg["k"]), "decoder": "free", "rescale_by_decoder_norm": False})
        return SAE(ours, linear(w_enc, b_enc, w_dec), state, d)
    # jumprelu
    _need(weights, ("threshold",), where)
    if "jumprelu" not in registry():
        raise InteropError(
            f"{where}: importing a jumprelu SAE needs the `jumprelu` architecture, which this install does not "
            "register (sae/archs.py); update SAE Workbench"
        )
    return _jumprelu_from(cfg, weights, n, d, apply_b_dec, where)


def _jumprelu_from(cfg: dict[str, Any], weights: dict[str, np.ndarray], n: int, d: int, apply_b_dec: bool,
                   where: Any) -> SAE:
    """Fill our jumprelu arch's parameter template by name (it may store the threshold or its log)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from sae.base import arch_module, make_config

    mod = arch_module("jumprelu")
    names = {f.name for f in dataclasses.fields(mod.Config)}
    values: dict[str, Any] = {"n_latents": n}
    b_enc = weights["b_enc"]
    for flag in ("apply_b_dec_to_input", "pre_encoder_bias"):
        if flag in names:
            values[flag] = apply_b_dec
            break
    else:
        if not apply_b_dec:  # our arch always subtracts b_dec: fold it into b_enc instead
            b_enc = b_enc + weights["b_dec"] @ weights["W_enc"]
    ours = make_config(mod.Config, values)
    params, state = mod.init(ours, jax.random.PRNGKey(0), d, np.zeros((2, d), np.float32))
    # SAELens: ReLU(pre)·1[pre > θ]; ours: pre·1[pre > θ]. Equal for θ ≥ 0, and clamping a negative θ
    # at 0 leaves SAELens's values unchanged (ReLU zeroes what lies between).
    threshold = np.maximum(weights["threshold"], 0.0)
    src = {"W_enc": weights["W_enc"], "b_enc": b_enc, "W_dec": weights["W_dec"], "b_dec": weights["b_dec"],
           "threshold": threshold, "log_threshold": np.log(np.maximum(threshold, 1e-30))}

    def fill(tree: Any) -> Any:
        if not dataclasses.is_dataclass(tree):
            return tree
        repl = {f.name: jnp.asarray(src[f.name], jnp.float32).reshape(np.shape(getattr(tree, f.name)))
                for f in dataclasses.fields(tree) if f.name in src}
        return tree.replace(**repl)

    return SAE(ours, fill(params), fill(state), d)


def load_saelens(path: str | Path) -> SAE:
    """Load an SAELens directory as one of our SAEs (numpy in, numpy out), without a workspace."""
    cfg, weights = read_saelens(path)
    return from_saelens(cfg, weights, Path(path))


def import_saelens(
    path: str | Path, workspace: str | Path, name: str, *, hook: str | None = None, harvest: str | None = None,
) -> dict[str, Any]:
    """Register an SAELens directory as a finished run of a workspace (status 'done').

    The run is attached to a harvested hook (``hook``, else the cfg's ``metadata.hook_name``) whose
    width must equal ``d_in``, so `saewb eval`, `saewb analyze` and the app treat it like a trained run.
    Returns the runs row.
    """
    from activations.store import check_name, harvest_info
    from sae import checkpoint as ckpt
    from sae import runs
    from saewb.workspace import Workspace

    check_name(name, "run name")
    ws = Workspace(workspace)
    if not ws.exists():
        raise FileNotFoundError(
            f"workspace {ws.path} does not exist; harvest the SAE's hook first: "
            f"`saewb harvest --model MODEL --hook HOOK --workspace {ws.path}`"
        )
    src = Path(path).expanduser().resolve()
    cfg, weights = read_saelens(src)
    model = from_saelens(cfg, weights, src)
    info = harvest_info(ws, harvest)
    meta = cfg.get("metadata") or {}
    hook = hook or meta.get("hook_name") or cfg.get("hook_name")
    if hook is None or hook not in info.hooks:
        raise InteropError(
            f"{'no hook given' if hook is None else f'hook {hook!r} is not in harvest {info.name!r}'} "
            f"(it has {sorted(info.hooks)}); pass --hook with the harvested hook these activations come from, "
            "or harvest it with `saewb harvest --hook ...`"
        )
    if int(info.hooks[hook]) != model.d:
        raise InteropError(
            f"the SAE has d_in={model.d} but hook {hook!r} of harvest {info.name!r} has width {info.hooks[hook]}; "
            "pick the matching hook (or model)"
        )
    if runs.get_run(ws, name) is not None:
        raise InteropError(f"a run named {name!r} already exists in {ws.path}; pick another --name")
    from dataclasses import asdict

    record = {
        "arch": model.config.arch, "sae": asdict(model.config), "train": None,
        "source": {"format": "saelens", "path": str(src), "architecture": cfg.get("architecture", "standard"),
                   "model_name": meta.get("model_name") or cfg.get("model_name"),
                   "hook_name": meta.get("hook_name") or cfg.get("hook_name")},
    }
    run_dir = ws.runs_dir / name
    if run_dir.exists():
        raise InteropError(f"{run_dir} already exists (left by a removed run?); remove it or pick another --name")
    bundle = ckpt.write_bundle(
        run_dir / "sae", {"params": model.params, "state": model.state},
        {"config": record, "d": model.d, "input_scale_folded": 1.0, "final_metrics": {}},
    )
    runs.start_run(ws, name, harvest=info.name, hook=hook, arch=model.config.arch,
                   config={**record, "hook": hook, "harvest": info.name}, checkpoint_path=str(run_dir))
    runs.finish_run(ws, name, "done", {"imported_from": str(src)}, str(bundle))
    return runs.get_run(ws, name) or {}

