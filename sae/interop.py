"""SAELens format, both ways: export our SAEs as SAELens directories, import SAELens directories as runs.

An SAELens directory holds ``cfg.json`` (``architecture``, ``d_in``, ``d_sae``, ``apply_b_dec_to_input``,
``normalize_activations``, architecture fields such as ``k``, and a ``metadata`` object with
``model_name``/``hook_name``/``sae_lens_version``) and ``sae_weights.safetensors`` (``W_enc`` [d_in, d_sae],
``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in], plus ``threshold`` [d_sae] for JumpReLU).
This is what ``SAE.save_model`` writes and ``SAE.load_from_disk`` reads in sae-lens 6.x; GemmaScope and
the other releases on the Hugging Face hub use the same files once downloaded.

Architecture mapping (every one exact: the same latent values and reconstructions, up to float rounding;
each architecture's export form is its module's ``saelens_export``, its import form ``saelens_import``,
see ``sae.base.OPTIONAL``):

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
_NORMALISATIONS_OK = ("none", "expected_average_only_in", None)
"""Input normalisations that leave inference a plain function of the raw activations (SAELens folds
the expected-average scale into the weights before saving)."""


class InteropError(ValueError):
    """A directory or SAE that cannot be converted; the message names what is supported."""


# ---------------------------------------------------------------- export


def to_saelens(model: SAE) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(cfg fields, float32 weights) of the SAELens form of one of our SAEs (see the module table)."""
    from sae.base import optional, registry

    export = optional(model.arch, "saelens_export")
    if export is None:
        exportable = [name for name, mod in registry().items() if optional(mod, "saelens_export") is not None]
        raise InteropError(
            f"architecture {model.config.arch!r} has no SAELens form; exportable: {', '.join(exportable)}"
        )
    fields, w = export(model)

    def f32(a: Any) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(a, np.float32))

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


def write_saelens(
    out_dir: str | Path,
    cfg_dict: dict[str, Any],
    weights: dict[str, np.ndarray],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` into ``out_dir`` (created; must be empty)."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise InteropError(f"{out} exists and is not empty; pick a new directory or empty it")
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "exported_by": "saewb",
        **(metadata or {}),
    }
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
            meta.update(
                {
                    "model_name": ident.get("model"),
                    "context_size": ident.get("ctx_len"),
                    "dataset_path": ident.get("corpus"),
                }
            )
    return export_saelens(model, out_dir, {k: v for k, v in meta.items() if v is not None})


# ---------------------------------------------------------------- import


def read_saelens(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The cfg dict and float32 weights of an SAELens directory (bf16/f16 weights are widened)."""
    from safetensors.flax import load_file  # handles bfloat16, which numpy cannot hold

    path = Path(path).expanduser()
    if not path.is_dir():
        raise InteropError(
            f"{path} is not a directory; pass the folder holding {SAELENS_CFG} and {SAELENS_WEIGHTS}"
        )
    missing = [f for f in (SAELENS_CFG, SAELENS_WEIGHTS) if not (path / f).exists()]
    if missing:
        hint = ""
        if (path / "params.npz").exists():
            hint = (
                " (params.npz is GemmaScope's original JAX format: load it with sae-lens once and save_model)"
            )
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


def importers() -> dict[str, Any]:
    """SAELens architecture → our architecture module that reads it (its ``SAELENS_IMPORTS``)."""
    from sae.base import optional, registry

    found = {name: mod for mod in registry().values() for name in optional(mod, "SAELENS_IMPORTS")}
    return dict(sorted(found.items()))


def from_saelens(cfg: dict[str, Any], weights: dict[str, np.ndarray], where: Any = "SAELens SAE") -> SAE:
    """Our SAE equivalent to an SAELens (cfg, weights) pair; raises InteropError when there is none.

    The generic checks are here; each architecture's import form is its module's ``saelens_import``."""
    arch = cfg.get("architecture", "standard")  # pre-6 configs without it are standard SAEs
    readers = importers()
    if arch not in readers:
        raise InteropError(
            f"{where}: SAELens architecture {arch!r} is not supported; importable: {', '.join(readers)}"
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
    ours, params, state = readers[arch].saelens_import(cfg, weights, where)
    return SAE(ours, params, state, d)


def load_saelens(path: str | Path) -> SAE:
    """Load an SAELens directory as one of our SAEs (numpy in, numpy out), without a workspace."""
    cfg, weights = read_saelens(path)
    return from_saelens(cfg, weights, Path(path))


def import_saelens(
    path: str | Path,
    workspace: str | Path,
    name: str,
    *,
    hook: str | None = None,
    harvest: str | None = None,
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
        "arch": model.config.arch,
        "sae": asdict(model.config),
        "train": None,
        "source": {
            "format": "saelens",
            "path": str(src),
            "architecture": cfg.get("architecture", "standard"),
            "model_name": meta.get("model_name") or cfg.get("model_name"),
            "hook_name": meta.get("hook_name") or cfg.get("hook_name"),
        },
    }
    run_dir = ws.runs_dir / name
    if run_dir.exists():
        raise InteropError(
            f"{run_dir} already exists (left by a removed run?); remove it or pick another --name"
        )
    bundle = ckpt.write_bundle(
        run_dir / "sae",
        {"params": model.params, "state": model.state},
        {"config": record, "d": model.d, "input_scale_folded": 1.0, "final_metrics": {}},
    )
    runs.start_run(
        ws,
        name,
        harvest=info.name,
        hook=hook,
        arch=model.config.arch,
        config={**record, "hook": hook, "harvest": info.name},
        checkpoint_path=str(run_dir),
    )
    runs.finish_run(ws, name, "done", {"imported_from": str(src)}, str(bundle))
    return runs.get_run(ws, name) or {}
