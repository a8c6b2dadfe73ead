"""Notebook API: ``sae.load(path_or_run, workspace=None)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sae import checkpoint as ckpt
from sae.base import arch_module, optional, saved_config

MIN_BUCKET = 16
LARGE_BUCKET = 4096


def bucket_rows(rows: int) -> int:
    """Padded row count for `rows`: powers of two from 16 up to 4096, then multiples of 4096.

    The jitted encoder compiles once per input shape (0.2 s each on 2 cores); padding to a few
    sizes keeps interactive use (every text has its own length) from recompiling on every call.
    """
    if rows > LARGE_BUCKET:
        return -(-rows // LARGE_BUCKET) * LARGE_BUCKET
    return max(MIN_BUCKET, 1 << (rows - 1).bit_length())


def shape_buckets(max_rows: int) -> list[int]:
    """Every bucket size up to the one holding `max_rows` (to compile them ahead of use)."""
    out = [MIN_BUCKET]
    while out[-1] < bucket_rows(max_rows):
        out.append(bucket_rows(out[-1] + 1))
    return out


def _padded_apply(fn: Any, x: jax.Array) -> jax.Array:
    rows = x.shape[0]
    padded = bucket_rows(rows)
    if padded == rows:
        return fn(x)
    return fn(jnp.pad(x, ((0, padded - rows), (0, 0))))[:rows]


class SAE:
    """A trained SAE on raw activations: ``encode`` / ``decode`` keep the array type they are given
    (numpy in → numpy out, jax in → jax out).

    Rows are encoded independently (the inference form of every architecture is per token), so
    inputs are zero-padded to a few bucket sizes and the padding is dropped from the output.
    """

    def __init__(
        self,
        config: Any,
        params: Any,
        state: Any,
        d: int,
        metrics: dict[str, Any] | None = None,
        path: Path | None = None,
        history: list[dict[str, Any]] | None = None,
        outlier_cutoff: float | None = None,
    ) -> None:
        self.config = config
        self.arch = arch_module(config.arch)
        self.params = params
        self.state = state
        self.d = d
        self.metrics = metrics or {}
        self.history = history or []
        self.path = path
        self.outlier_cutoff = outlier_cutoff
        """Tokens with a larger norm were left out of training; splices and held-out metrics skip them."""
        self._enc = jax.jit(lambda p, s, x: self.arch.encode(self.config, p, s, x))
        self._dec = jax.jit(lambda p, f: self.arch.decode(self.config, p, f))
        self._enc_k: dict[int, Any] = {}  # one jitted encoder per explicit budget k

    def __repr__(self) -> str:
        return f"SAE(arch={self.config.arch!r}, d={self.d}, n_latents={self.n_latents}, path={self.path})"

    @property
    def n_latents(self) -> int:
        return int(optional(self.arch, "latent_count")(self.config, self.params))

    def _check(self, x: Any, width: int, what: str) -> None:
        if x.ndim != 2 or x.shape[1] != width:
            raise ValueError(f"{what} must have shape [tokens, {width}], got {tuple(x.shape)}")

    def encode(self, x: Any, k: int | None = None) -> Any:
        """Latent activations [tokens, n_latents] of raw activations [tokens, d].

        ``k``: another budget, for architectures whose encoder takes one (TopK, HierarchicalTopK:
        any k <= K); None uses the trained one.
        """
        is_np = not isinstance(x, jax.Array)
        xj = jnp.asarray(x, jnp.float32)
        self._check(xj, self.d, "encode input")
        enc = self._enc if k is None else self._encoder_for(int(k))
        f = _padded_apply(lambda v: enc(self.params, self.state, v), xj)
        return np.asarray(f) if is_np else f

    def _encoder_for(self, k: int) -> Any:
        import inspect

        if "k" not in inspect.signature(self.arch.encode).parameters:
            raise ValueError(f"arch {self.config.arch!r} has no per-call budget; call encode(x) without k")
        if k not in self._enc_k:
            self._enc_k[k] = jax.jit(lambda p, s, x: self.arch.encode(self.config, p, s, x, k=k))
        return self._enc_k[k]

    def decode(self, f: Any) -> Any:
        """Reconstruction [tokens, d] from latents [tokens, n_latents]."""
        is_np = not isinstance(f, jax.Array)
        fj = jnp.asarray(f, jnp.float32)
        self._check(fj, self.n_latents, "decode input")
        x = _padded_apply(lambda v: self._dec(self.params, v), fj)
        return np.asarray(x) if is_np else x

    def reconstruct(self, x: Any) -> Any:
        return self.decode(self.encode(x))

    @property
    def decoder_directions(self) -> np.ndarray:
        """Dictionary atoms as unit rows [n_latents, d]."""
        w = np.asarray(optional(self.arch, "decoder_rows")(self.config, self.params))
        return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def _from_record(record: dict[str, Any]) -> Any:
    arch = arch_module(record["arch"])
    return saved_config(arch.Config, record["sae"])


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
    load_saved = optional(arch_module(cfg.arch), "load_saved")
    if load_saved is not None:  # sizes come from the manifest (ITDA's dictionary grows while fitting)
        params, state, metrics = load_saved(cfg, path, manifest)
        return SAE(cfg, params, state, d, metrics=metrics, path=path)
    params_t, state_t = _templates(cfg, d)
    if "input_scale_folded" in manifest:
        trees, _ = ckpt.read_bundle(path, {"params": params_t, "state": state_t})
        params, state = trees["params"], trees["state"]
        metrics = manifest.get("final_metrics", {})
    else:  # a training checkpoint: fold the input scale now
        from sae.lifecycle import read_train_state
        from sae.trainer import TrainConfig, Trainer

        ts = read_train_state(Trainer(cfg, saved_config(TrainConfig, manifest["config"]["train"]), d), path)
        params, state = arch_module(cfg.arch).fold_scale(
            cfg, ts.params, ts.arch_state, float(manifest["scale"])
        )
        metrics = {}
    return SAE(
        cfg, params, state, d, metrics=metrics, path=path, outlier_cutoff=manifest.get("outlier_cutoff")
    )


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
