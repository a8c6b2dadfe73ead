"""The one generic trainer: any architecture module, any iterator of float32 batches.

Per step (one jitted function, the train state donated):
  loss + grads → project decoder grads (remove the component along each unit row) → clip global
  norm → Adam with warmup/decay schedule → apply → renormalise rows (``arch.constrain``) →
  non-gradient state updates (``arch.update_state``) → dead-latent counters (in tokens).

Schedule: peak lr = ``TrainConfig.peak_lr`` (``sae.configs.default_lr`` unless given: it depends on
n and the number of steps, docs/learning_rate.md); linear warmup over min(1000, steps/10) steps
(scaled down for short runs); linear decay to 0 over the last 20% of steps.
Dead window: min(10M, max(5% of training tokens, one batch)) tokens unless given.
Input scaling: one scalar estimated on ``init_sample_tokens`` tokens before training (the arch picks
the target norm), applied to every batch, and folded into the weights of the saved SAE.
b_dec / b_pre init: geometric median (Weiszfeld) of the scaled sample.
Resume: the data iterator is restarted with ``batches(start=step)``; train state, optimiser state,
counters and rng come from the checkpoint, so an interrupted and resumed run reaches bit-for-bit
the parameters of an uninterrupted one.

Devices (``sae.sharding``): ``mesh_data`` x ``mesh_model`` > 1 trains on a ("data", "model") mesh:
the batch split over data, the latent axis of the weights and of every per-latent array split over
model, one jitted step over the whole mesh. It matches the single-device run up to float
reduction order. Checkpoints are gathered to the host, so they load on any mesh; the mesh is not
part of the run's identity (resuming on another mesh is allowed). With several processes
(``sae.distributed``) process i feeds its rows of each global batch; process 0 alone writes
checkpoints, the final SAE and calls ``on_log`` / ``on_checkpoint``.

Divergence guard (``divergence``): at every metric row and before every checkpoint, a run whose
loss or FVU is NaN/inf, whose parameters are not finite, or whose FVU exceeds DIVERGENCE_FACTOR x
the best FVU of its last DIVERGENCE_HISTORY rows (1, the FVU of predicting the mean, before the
first row) is stopped with ``RunDivergedError``. No checkpoint is written past the last good one,
and ``run_dir/DIVERGED.json`` records the reason; resuming such a run may change ``lr`` (only
``lr``), so a rerun with a lower ``--lr`` goes on from the last good checkpoint.

Precision: ``compute_dtype="bfloat16"`` runs the loss and its gradient in bf16 on bf16 copies of the
params, state and batch; the master weights, Adam moments, state updates and metrics stay float32.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from sae import common, runs, sharding
from sae.base import StepCtx, arch_module, optional, validate_config
from sae.configs import TrainConfig, default_lr  # noqa: F401  (default_lr re-exported)
from sae.lifecycle import (  # noqa: F401  (re-exported: the trainer's public names)
    DIVERGED_FILE,
    EXECUTION_FIELDS,
    RunDivergedError,
    TrainResult,
    checkpoint_meta,
    config_record,
    diverged_before,
    finish_training,
    read_train_state,
    resume_manifest,
    save_final,
    stop_diverged,
    train_trees,
    write_checkpoint,
)
from saewb.progress import progress_bar

DIVERGENCE_FACTOR = 100.0
"""A run has diverged when its FVU exceeds this many times its best recent FVU (floored at 0.01)."""
DIVERGENCE_HISTORY = 20
"""How many recent metric rows the divergence guard compares with."""


def divergence(row: dict[str, float], history: list[dict[str, float]], explosion: bool = True) -> str | None:
    """Why the metric row of a run means it diverged, or None (see the module docstring).

    ``explosion=False`` checks finiteness only (ITDA: no learning rate to blow up, and its first rows,
    decomposed on a nearly empty dictionary, may legitimately exceed the mean predictor's FVU).
    """
    for key in ("loss", "fvu"):
        if key in row and not math.isfinite(row[key]):
            return f"{runs.DIVERGED}: the {key} turned {row[key]} at step {int(row['step'])}"
    if not explosion:
        return None
    recent = [r["fvu"] for r in history[-DIVERGENCE_HISTORY:] if math.isfinite(r.get("fvu", math.nan))]
    best = min(recent) if recent else 1.0
    limit = DIVERGENCE_FACTOR * max(best, 0.01)
    if row["fvu"] > limit:
        ref = f"its best recent FVU ({best:.3g})" if recent else "the FVU of predicting the mean (1)"
        return f"{runs.DIVERGED}: the FVU reached {row['fvu']:.3g} at step {int(row['step'])}, over {DIVERGENCE_FACTOR:g}x {ref}"
    return None


_all_finite = jax.jit(
    lambda tree: jnp.all(
        jnp.stack(
            [
                jnp.all(jnp.isfinite(a))
                for a in jax.tree_util.tree_leaves(tree)
                if jnp.issubdtype(a.dtype, jnp.floating)
            ]
            or [jnp.bool_(True)]
        )
    )
)


def dead_window(tc: TrainConfig) -> int:
    if tc.dead_window_tokens is not None:
        return int(tc.dead_window_tokens)
    return int(min(10_000_000, max(0.05 * tc.train_tokens, tc.batch_size)))


def make_schedule(tc: TrainConfig, n_latents: int) -> Callable[[jax.Array], jax.Array]:
    total = tc.total_steps
    peak = tc.peak_lr(n_latents)
    warm = max(1, min(tc.warmup_steps, total // 10))
    decay_start = total * (1.0 - tc.decay_frac)

    def schedule(count: jax.Array) -> jax.Array:
        c = jnp.asarray(count, jnp.float32)
        w = jnp.minimum(1.0, (c + 1.0) / warm)
        d = jnp.clip((total - c) / (total - decay_start), 0.0, 1.0) if tc.decay_frac > 0 else jnp.ones_like(c)
        return peak * jnp.minimum(w, d)

    return schedule


def project_grads_transform(project: Callable[[Any, Any], Any]) -> optax.GradientTransformation:
    """Optax stage that applies the architecture's gradient projection (needs the params)."""

    def init_fn(params: Any) -> optax.EmptyState:
        return optax.EmptyState()

    def update_fn(updates: Any, state: Any, params: Any = None):
        if params is None:
            raise ValueError("the decoder gradient projection needs params: call tx.update(g, s, params)")
        return project(params, updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(arch: Any, cfg: Any, tc: TrainConfig) -> optax.GradientTransformation:
    stages = [
        project_grads_transform(lambda p, g: arch.project_grads(cfg, p, g)),
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adam(make_schedule(tc, cfg.n_latents), b1=tc.adam_b1, b2=tc.adam_b2, eps=tc.adam_eps),
    ]
    lr_scales = optional(arch, "lr_scales")
    scales = lr_scales(cfg, tc.peak_lr(cfg.n_latents)) if lr_scales is not None else None
    if scales is not None:  # only then: the optimiser state of other runs keeps its layout
        stages.append(scale_updates_transform(scales))
    return optax.chain(*stages)


def scale_updates_transform(scales: Any) -> optax.GradientTransformation:
    """Optax stage multiplying each parameter's step by its factor in ``scales`` (a params-shaped tree)."""

    def update_fn(updates: Any, state: Any, params: Any = None):
        return jax.tree_util.tree_map(lambda u, s: u * s, updates, scales), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


@struct.dataclass
class TrainState:
    params: Any
    opt_state: Any
    arch_state: Any
    since_fired: Any  # [n] int32 tokens since each latent last fired
    step: Any  # [] int32
    rng: Any  # [2] uint32
    win: Any  # dict of metric accumulators since the last log row


def zero_window(n: int) -> dict[str, jax.Array]:
    """Empty per-latent metric sums for the next logging window."""
    # separate buffers: the step donates its input and XLA refuses to donate one buffer twice
    out = {name: jnp.zeros((), jnp.float32) for name in ("tokens", "err", "var", "l0", "loss", "steps")}
    out["fires"] = jnp.zeros((n,), jnp.float32)
    return out


def collect_sample(batches: Callable[[int], Iterator[np.ndarray]], tokens: int) -> np.ndarray:
    """The first ``tokens`` rows of the stream, for initialisation (b_dec, input scale)."""
    out: list[np.ndarray] = []
    have = 0
    for b in batches(0):
        out.append(np.asarray(b, np.float32))
        have += len(b)
        if have >= tokens:
            break
    return np.concatenate(out)[:tokens]


def init_sample(
    batches: Callable[[int], Iterator[np.ndarray]], tc: TrainConfig
) -> tuple[np.ndarray, float | None]:
    """The init sample without its outliers, and the outlier cutoff (``TrainConfig.outlier_ratio``)
    measured on it: what the input scale, the init and every batch of the run are based on."""
    sample = collect_sample(batches, tc.init_sample_tokens)
    cutoff = common.outlier_cutoff(sample, tc.outlier_ratio)
    return sample[common.typical_rows(sample, cutoff)], cutoff


def reset_adam_moments(opt_state: Any, mask: Any) -> Any:
    """Zero Adam's mu/nu where ``mask`` (a params-shaped bool tree) is True; None: nothing to reset."""
    if mask is None:
        return opt_state
    if isinstance(opt_state, optax.ScaleByAdamState):
        zero = lambda t: jax.tree_util.tree_map(lambda a, m: jnp.where(m, 0.0, a), t, mask)  # noqa: E731
        return opt_state._replace(mu=zero(opt_state.mu), nu=zero(opt_state.nu))
    if isinstance(opt_state, tuple) and not hasattr(opt_state, "_fields"):
        return tuple(reset_adam_moments(s, mask) for s in opt_state)
    if isinstance(opt_state, tuple):
        return type(opt_state)(*(reset_adam_moments(s, mask) for s in opt_state))
    return opt_state


def _cast_floats(tree: Any, dtype: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a, tree
    )


class Trainer:
    """Holds the jitted step for one (arch config, train config, d) and the device mesh, if any."""

    def __init__(self, cfg: Any, tc: TrainConfig, d: int) -> None:
        tc.validate()
        self.cfg = cfg
        self.tc = tc
        self.d = d
        self.arch = arch_module(cfg.arch)
        validate_config(cfg)
        self.tx = make_optimizer(self.arch, cfg, tc)
        self.schedule = make_schedule(tc, cfg.n_latents)
        self.window = dead_window(tc)
        self.mesh = sharding.make_mesh(tc.mesh_data, tc.mesh_model)
        """The ("data", "model") mesh; None for one device in one process (the plain jit path)."""
        if self.mesh is not None:
            sharding.check_divisible(self.mesh, tc.batch_size, cfg.n_latents)
        self._shardings: Any = None
        self._sharded_step: Any = None
        self._step = jax.jit(self.step_impl, donate_argnums=(0,), static_argnums=(3,))
        self._skips_aux = bool(optional(self.arch, "SKIPS_AUX_WITHOUT_DEAD"))
        self._any_dead = jax.jit(lambda since: jnp.any(since >= self.window))

    def place(self, ts: TrainState) -> TrainState:
        """Lay a train state (host or single-device arrays) out on the mesh; identity without one."""
        if self.mesh is None:
            return ts
        if self._shardings is None:
            specs = sharding.train_state_specs(self.arch, self.cfg, self.tx, ts)
            self._shardings = sharding.named(self.mesh, specs)
        return sharding.place(ts, self._shardings)

    def reset_window(self, ts: TrainState) -> TrainState:
        """``ts`` with zeroed metric accumulators (after a log row)."""
        win = zero_window(self.cfg.n_latents)
        if self.mesh is not None:
            win = sharding.place(win, self._shardings.win)
        return ts.replace(win=win)

    def init_state(self, sample_scaled: np.ndarray) -> TrainState:
        key = jax.random.PRNGKey(self.tc.seed)
        key, sub = jax.random.split(key)
        params, astate = self.arch.init(self.cfg, sub, self.d, sample_scaled)
        n = self.cfg.n_latents
        ts = TrainState(
            params=params,
            opt_state=self.tx.init(params),
            arch_state=astate,
            since_fired=jnp.zeros((n,), jnp.int32),
            step=jnp.zeros((), jnp.int32),
            rng=key,
            win=zero_window(n),
        )
        ts = jax.tree_util.tree_map(jnp.array, ts)  # no two leaves may share a (donated) buffer
        return self.place(ts)

    def _loss_fn(self) -> Callable[..., Any]:
        if self.tc.compute_dtype == "float32":
            return self.arch.loss
        cdt = jnp.dtype(self.tc.compute_dtype)

        def loss(cfg: Any, params: Any, state: Any, x: jax.Array, ctx: StepCtx):
            # grads flow back through the casts, so they arrive in float32 for the master weights
            value, aux = self.arch.loss(
                cfg, _cast_floats(params, cdt), _cast_floats(state, cdt), x.astype(cdt), ctx
            )
            return value.astype(jnp.float32), _cast_floats(aux, jnp.float32)

        return loss

    def step_impl(
        self,
        ts: TrainState,
        batch: jax.Array,
        scale: jax.Array,
        maybe_dead: bool = True,
        k_active: jax.Array | None = None,
    ) -> TrainState:
        """One optimiser step, unjitted: the trainer jits it, the sweep vmaps it over members.

        ``maybe_dead=False`` (static) promises that no latent is dead; the loss then gets
        ``ctx.dead = None`` and the AuxK branch is left out of the program. Merely skipping it at
        run time inside a ``lax.cond`` still cost 100 ms of a 720 ms TopK step (B = 4096,
        n = 16384, CPU): the cond's gradient materialises dense zero cotangents and residuals.
        ``k_active``: see ``StepCtx`` (sweeps only).
        """
        x = batch.astype(jnp.float32) * scale  # a half-precision batch is widened here, on the device
        dead = ts.since_fired >= self.window if maybe_dead else None
        ctx = StepCtx(
            dead=dead, progress=ts.step.astype(jnp.float32) / max(1, self.tc.total_steps), k_active=k_active
        )
        grad_fn = jax.value_and_grad(self._loss_fn(), argnums=1, has_aux=True)
        (loss, aux), grads = grad_fn(self.cfg, ts.params, ts.arch_state, x, ctx)
        updates, opt_state = self.tx.update(grads, ts.opt_state, ts.params)
        params = self.arch.constrain(self.cfg, optax.apply_updates(ts.params, updates))
        astate = self.arch.update_state(self.cfg, ts.arch_state, aux, ts.step)
        b = x.shape[0]
        since = jnp.where(aux["fires"] > 0, 0, jnp.minimum(ts.since_fired + b, 2**30)).astype(jnp.int32)
        w = ts.win
        win = {
            "fires": w["fires"] + aux["fires"],
            "tokens": w["tokens"] + b,
            "err": w["err"] + aux["err"],
            "var": w["var"] + aux["var"],
            "l0": w["l0"] + aux["l0"],
            "loss": w["loss"] + loss,
            "steps": w["steps"] + 1.0,
        }
        return TrainState(
            params=params,
            opt_state=opt_state,
            arch_state=astate,
            since_fired=since,
            step=ts.step + 1,
            rng=ts.rng,
            win=win,
        )

    def maybe_dead(self, since_fired: jax.Array) -> bool:
        """The static ``maybe_dead`` of ``step_impl`` for a state with these counters (any shape).

        A one-scalar read: the host waits for the previous step before dispatching the next.
        """
        return not self._skips_aux or bool(sharding.to_host(self._any_dead(since_fired)))

    def step(self, ts: TrainState, batch: np.ndarray, scale: float) -> TrainState:
        """One step; with a mesh, ``batch`` is the global batch or (several processes) this
        process's rows of it."""
        maybe_dead = self.maybe_dead(ts.since_fired)
        if self.mesh is None:
            return self._step(ts, jnp.asarray(batch), jnp.float32(scale), maybe_dead)
        if self._sharded_step is None:
            if self._shardings is None:
                raise RuntimeError("place the train state on the mesh first (Trainer.place / init_state)")
            rep = jax.sharding.NamedSharding(self.mesh, sharding.REPLICATED)
            data = jax.sharding.NamedSharding(self.mesh, sharding.BATCH_SPEC)
            self._sharded_step = jax.jit(
                self.step_impl,
                in_shardings=(self._shardings, data, rep),
                out_shardings=self._shardings,
                donate_argnums=(0,),
                static_argnums=(3,),
            )
        x = sharding.put_batch(np.asarray(batch), self.mesh, self.tc.batch_size)
        with jax.set_mesh(self.mesh):  # the arch's top-k reads the mesh while tracing
            return self._sharded_step(ts, x, np.float32(scale), maybe_dead)

    def metrics_row(self, ts: TrainState, tokens_per_s: float) -> dict[str, float]:
        host = sharding.to_host({"win": ts.win, "since_fired": ts.since_fired, "step": ts.step})
        w = host["win"]
        steps = max(float(w["steps"]), 1.0)
        tok = max(float(w["tokens"]), 1.0)
        step = int(host["step"])
        return {
            "step": step,
            "tokens": step * self.tc.batch_size,
            "loss": float(w["loss"]) / steps,
            "fvu": float(w["err"]) / max(float(w["var"]), 1e-12),
            "l0": float(w["l0"]) / steps,
            "dead_frac": float(np.mean(np.asarray(host["since_fired"]) >= self.window)),
            "dense_frac": float(np.mean(w["fires"] / tok > self.tc.dense_threshold)),
            "lr": float(self.schedule(jnp.asarray(max(step - 1, 0)))),
            "tokens_per_s": tokens_per_s,
        }


def check_batch(batch: np.ndarray, tc: TrainConfig, d: int, rows: slice | None = None) -> np.ndarray:
    """A [batch_size, d] batch, float32 or a half-precision cache's values as stored (the step
    widens them on the device); with ``rows`` (several processes) this process's rows of it, cut
    here from a full batch or taken as given when the iterator already yields only them."""
    arr = np.asarray(batch)
    if arr.dtype.name not in ("float32", "float16", "bfloat16"):
        arr = arr.astype(np.float32)
    if rows is not None:
        if arr.shape == (tc.batch_size, d):
            return arr[rows]
        if arr.shape == (rows.stop - rows.start, d):
            return arr
    if arr.shape != (tc.batch_size, d):
        raise ValueError(
            f"data iterator gave a batch of shape {arr.shape}, expected ({tc.batch_size}, {d}); "
            "the trainer needs full batches of the configured size (use a stream with batch_size matching)"
        )
    return arr


def train(
    cfg: Any,
    tc: TrainConfig,
    batches: Callable[[int], Iterator[np.ndarray]],
    *,
    run_dir: str | Path | None = None,
    on_log: Callable[[dict[str, float]], None] | None = None,
    on_checkpoint: Callable[[Path, int], None] | None = None,
    progress: bool = True,
    extra_meta: dict[str, Any] | None = None,
    local_batches: Callable[[int, slice], Iterator[np.ndarray]] | None = None,
) -> TrainResult:
    """Train (or resume) one SAE.

    ``batches(start)`` must return an iterator of float32 [batch_size, d] arrays beginning at batch
    index ``start``, deterministic in (seed, start). With ``run_dir``, checkpoints go there and a
    run with a checkpoint resumes from it; a different config under the same run_dir is refused.

    Several processes (``sae.distributed``): every process calls ``train`` with the same arguments;
    ``local_batches(start, rows)``, when given, yields only this process's ``rows`` of each global
    batch (e.g. ``ActivationStream.batches(start, rows=rows)``), otherwise they are cut from
    ``batches``. The init sample is read from ``batches`` on every process, so all start alike.
    ``run_dir`` must be the same directory (a shared filesystem) for every process to resume.
    """
    tc.validate()
    validate_config(cfg)
    arch = arch_module(cfg.arch)
    record = config_record(cfg, tc)
    run_dir = Path(run_dir) if run_dir is not None else None
    resume = resume_manifest(run_dir, record)
    lead = jax.process_index() == 0

    last_row: dict[str, float] = {}
    if resume is not None:
        latest, manifest = resume
        last_row = manifest.get("last_metrics", {})
        d = int(manifest["d"])
        scale = float(manifest["scale"])
        cutoff = manifest.get("outlier_cutoff")
        trainer = Trainer(cfg, tc, d)
        ts = trainer.place(read_train_state(trainer, latest))
    else:
        sample, cutoff = init_sample(batches, tc)
        d = int(sample.shape[1])
        validate_config(cfg, d)
        scale = common.estimate_input_scale(sample, arch.input_scale_target(cfg), d)
        trainer = Trainer(cfg, tc, d)
        ts = trainer.init_state(sample * np.float32(scale))

    def guard(ts: TrainState, row: dict[str, float] | None) -> None:
        """Stop the run if this metric row (or, at a checkpoint, the window so far) or the params diverged."""
        reason = divergence(row if row is not None else trainer.metrics_row(ts, 0.0), history)
        if reason is None and not bool(sharding.to_host(_all_finite(ts.params))):
            reason = (
                f"{runs.DIVERGED}: the parameters turned non-finite by step {int(sharding.to_host(ts.step))}"
            )
        if reason is not None:
            raise stop_diverged(run_dir if lead else None, reason)

    def save(ts: TrainState) -> Path | None:
        assert run_dir is not None
        trees = train_trees(ts)
        if trainer.mesh is not None:
            trees = sharding.to_host(trees)  # one layout on disk, whatever the mesh (collective)
        if not lead:
            return None
        step = int(np.asarray(trees["state"]["step"]))
        mesh = (
            {"mesh": {str(k): int(v) for k, v in trainer.mesh.shape.items()}}
            if trainer.mesh is not None
            else {}
        )
        meta = checkpoint_meta(
            record,
            d,
            scale,
            history[-1] if history else last_row,
            extra_meta,
            rng=[int(v) for v in np.asarray(trees["state"]["rng"])],
            outlier_cutoff=cutoff,
            **mesh,
        )
        return write_checkpoint(run_dir, step, trees, meta, tc.keep_checkpoints, on_checkpoint)

    total = tc.total_steps
    start = int(np.asarray(sharding.to_host(ts.step)))
    history: list[dict[str, float]] = []
    resample_due = optional(arch, "resample_due")
    bar = progress_bar(f"train {cfg.arch}", total, initial=start, unit="step", enabled=progress and lead)
    t_last = time.perf_counter()
    steps_since = 0
    rows = sharding.process_rows(trainer.mesh, tc.batch_size) if jax.process_count() > 1 else None
    it = local_batches(start, rows) if rows is not None and local_batches is not None else batches(start)
    step = start
    while step < total:
        batch = common.replace_outliers(check_batch(next(it), tc, d, rows), cutoff)
        ts = trainer.step(ts, batch, scale)
        step += 1
        steps_since += 1
        if resample_due is not None and resample_due(cfg, step, total):
            ts = resample_dead(trainer, ts, batch, scale, tc.seed + step)
        if step % tc.log_every == 0 or step == total:
            jax.block_until_ready(ts.step)
            now = time.perf_counter()
            tps = steps_since * tc.batch_size / max(now - t_last, 1e-9)
            row = trainer.metrics_row(ts, tps)
            guard(ts, row)
            history.append(row)
            if on_log is not None and lead:
                on_log(row)
            bar.set_postfix(fvu=f"{row['fvu']:.4f}", l0=f"{row['l0']:.1f}", dead=f"{row['dead_frac']:.3f}")
            ts = trainer.reset_window(ts)
            t_last, steps_since = time.perf_counter(), 0
        if run_dir is not None and (step % tc.ckpt_every == 0 or step == total):
            if step % tc.log_every:  # a log row was just checked otherwise
                guard(ts, None)
            save(ts)
        bar.update(1)
    bar.close()

    final_params, final_state = ts.params, ts.arch_state
    if trainer.mesh is not None:  # back to ordinary single-device arrays on every process
        host = sharding.to_host((final_params, final_state))
        final_params, final_state = jax.tree_util.tree_map(jnp.asarray, host)
    return finish_training(
        cfg,
        tc,
        final_params,
        final_state,
        scale,
        d,
        history,
        last_row,
        run_dir,
        write=lead,
        outlier_cutoff=cutoff,
    )


def resample_dead(
    trainer: Trainer, ts: TrainState, batch: np.ndarray, scale: float, seed: int, cfg: Any = None
) -> TrainState:
    """The architecture's dead-latent resampling (host code) on the whole state and global batch;
    ``cfg`` overrides the trainer's (a sweep member's own k in a k-band)."""
    cfg, arch = (cfg if cfg is not None else trainer.cfg), trainer.arch
    dead = np.asarray(sharding.to_host(ts.since_fired)) >= trainer.window
    if not dead.any():
        return ts  # resampling would return the same state, after a round trip of all of it
    if trainer.mesh is None:
        params, mask = arch.resample(cfg, ts.params, ts.arch_state, batch * np.float32(scale), dead, seed)
        return ts.replace(params=params, opt_state=reset_adam_moments(ts.opt_state, mask))
    full = sharding.to_host(sharding.put_batch(batch, trainer.mesh, trainer.tc.batch_size))
    host = jax.tree_util.tree_map(jnp.asarray, sharding.to_host(ts))
    params, mask = arch.resample(cfg, host.params, host.arch_state, full * np.float32(scale), dead, seed)
    return trainer.place(host.replace(params=params, opt_state=reset_adam_moments(host.opt_state, mask)))


def state_part(ts: TrainState) -> dict[str, Any]:
    """The non-parameter training state a checkpoint stores for an exact resume."""
    return train_trees(ts)["state"]
