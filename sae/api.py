"""Notebook API: ``sae.load(path_or_run, workspace=None)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sae import checkpoint as ckpt
from sae.base import arch_module, make_config


class SAE:
    """A trained SAE on raw activations: ``encode`` / ``decode`` keep the array type they are given
    (numpy in → numpy out, jax in → jax out)."""

    def __init__(
        self,
        config: Any,
        params: Any,
        state: Any,
        d: int,
        metrics: dict[str, Any] | None = None,
        path: Path | None = None,
        history: list[dict[str, Any]] | None = None,
    ) -> None:
        self.config = config
        self.arch = arch_module(config.arch)
        self.params = params
        self.state = state
        self.d = d
        self.metrics = metrics or {}
        self.history = history or []
        self.path = path
        self._enc = jax.jit(lambda p, s, x: self.arch.encode(self.config, p, s, x))
        self._dec = jax.jit(lambda p, f: self.arch.decode(self.config, p, f))

    def __repr__(self) -> str:
        return f"SAE(arch={self.config.arch!r}, d={self.d}, n_latents={self.config.n_latents}, path={self.path})"

    @property
    def n_latents(self) -> int:
        return int(self.config.n_latents)

    def _check(self, x: Any, width: int, what: str) -> None:
        if x.ndim != 2 or x.shape[1] != width:
            raise ValueError(f"{what} must have shape [tokens, {width}], got {tuple(x.shape)}")

    def encode(self, x: Any) -> Any:
        """Latent activations [tokens, n_latents] of raw activations [tokens, d]."""
        is_np = not isinstance(x, jax.Array)
        xj = jnp.asarray(x, jnp.float32)
        self._check(xj, self.d, "encode input")
        f = self._enc(self.params, self.state, xj)
        return np.asarray(f) if is_np else f

    def decode(self, f: Any) -> Any:
        """Reconstruction [tokens, d] from latents [tokens, n_latents]."""
        is_np = not isinstance(f, jax.Array)
        fj = jnp.asarray(f, jnp.float32)
        self._check(fj, self.n_latents, "decode input")
        x = self._dec(self.params, fj)
        return np.asarray(x) if is_np else x

    def reconstruct(self, x: Any) -> Any:
        return self.decode(self.encode(x))

    @property
    def decoder_directions(self) -> np.ndarray:
        """Dictionary atoms as unit rows [n_latents, d]."""
        p = self.params
        w = np.asarray(p.W if self.config.arch == "gba" else p.W_dec)
        return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def _from_record(record: dict[str, Any]) -> Any:
    arch = arch_module(record["arch"])
    return make_config(arch.Config, record["sae"])


def _templates(cfg: Any, d: int) -> tuple[Any, Any]:
    arch = arch_module(cfg.arch)
    return arch.init(cfg, jax.random.PRNGKey(0), d, np.zeros((2, d), np.float32))


def load_dir(path: str | Path) -> SAE:
    """Load a run directory, its ``sae`` bundle, or one training checkpoint (scale folded on load)."""
    path = Path(path)
    if (path / "sae" / "manifest.json").exists():
        path = path / "sae"
    elif not (path / "manifest.json").exists():
        latest = ckpt.latest_checkpoint(path) if (path / "checkpoints").exists() else None
        if latest is None:
            raise FileNotFoundError(
                f"{path} is not a saved SAE (no manifest.json, no sae/ bundle, no checkpoints/); "
                "pass a run directory or a run name with workspace="
            )
        path = latest
    manifest = ckpt.read_manifest(path)
    cfg = _from_record(manifest["config"])
    d = int(manifest["d"])
    params_t, state_t = _templates(cfg, d)
    if "input_scale_folded" in manifest:
        trees, _ = ckpt.read_bundle(path, {"params": params_t, "state": state_t})
        params, state = trees["params"], trees["state"]
        metrics = manifest.get("final_metrics", {})
    else:  # a training checkpoint: fold the input scale now
        from sae.trainer import TrainConfig, Trainer, _state_part

        tc = TrainConfig(**manifest["config"]["train"])
        template = Trainer(cfg, tc, d).init_state(np.zeros((2, d), np.float32))
        trees, _ = ckpt.read_bundle(
            path, {"params": template.params, "opt_state": template.opt_state, "state": _state_part(template)}
        )
        arch = arch_module(cfg.arch)
        params, state = arch.fold_scale(cfg, trees["params"], trees["state"]["arch_state"], float(manifest["scale"]))
        metrics = {}
    return SAE(cfg, params, state, d, metrics=metrics, path=path)


def load(path_or_run: str | Path, workspace: str | Path | None = None) -> SAE:
    """Load an SAE from a path, or by run name from a workspace's ``runs`` table.

    With ``workspace``, ``path_or_run`` is a run name; ``metrics`` then also carries the run's final
    metrics and ``history`` its logged metric rows.
    """
    if workspace is None:
        return load_dir(path_or_run)
    from sae import runs
    from saewb.workspace import Workspace

    ws = Workspace(workspace)
    row = runs.get_run(ws, str(path_or_run))
    if row is None:
        names = [r["name"] for r in runs.list_runs(ws)]
        raise ValueError(f"no run named {path_or_run!r} in {ws.path}; runs there: {names or 'none'}")
    run_dir = ws.runs_dir / str(path_or_run)
    model = load_dir(run_dir if run_dir.exists() else row["checkpoint_path"])
    model.metrics = {**model.metrics, **(row["final_metrics"] or {})}
    model.history = runs.run_metrics(ws, str(path_or_run))
    return model
