"""Sweeps in lockstep: many SAEs trained on one pass over the activation stream.

    saewb sweep sweep.yaml

Every member sees the same batches in the same order (one `ActivationStream` per hook, all seeded
with the sweep's data seed, read in step: the streams of different hooks of one harvest visit the
same tokens in the same order). One jitted function advances every member by one step: members whose
architecture config and optimiser settings agree and differ only in their init ``seed`` are stacked
and ``jax.vmap``-ed into one jitted step (TopK members may also differ in k, up to a factor of 2: the
step searches the largest and zeroes each member's picks past its own k, which leaves exactly its
top k); the other groups (another n, lambda, arch or hook) get their own jitted step, called in turn
on the same batch. Each member is an ordinary run of the workspace (``runs`` / ``metrics`` rows, checkpoints in
``<workspace>.runs/<run>/``, a final SAE that ``sae.load`` and ``saewb eval`` read).

The pieces are the trainer's (``sae.trainer``): ``Trainer`` (optimizer, schedules, the step,
dead-latent counters, metric rows), the init sample and input scale; the run lifecycle's
(``sae.lifecycle``): checkpoints, resume and the saved SAE; ``sae.runs`` for the tables. A member trained here gets the parameters that
``sae.trainer.train`` gives the same config on the same batches, up to float reduction order (vmap
batches the matrix products).

YAML format (keys with dashes or underscores)::

    workspace: ws.duckdb          # or a list: [shard0.duckdb, shard1.duckdb, export_dir] (the first holds the runs)
    harvest: default              # optional: the workspace's only harvest
    name: sw                      # sweep name; member runs are named <name>-<member>
    hook: blocks.3.hook_out       # default hook of the members
    arch: topk                    # default architecture of the members
    eval_tokens: 200000           # held-out tokens evaluated per member at the end (0: none)
    from_model:                   # optional: no harvest, activations computed on the fly (one forward
      model: tiny-lm              #   pass per buffer for every hook; see `saewb train --from-model`):
      corpus: stdlib-docs         #   model, corpus, ctx_len, model_batch_size, shuffle_tokens, device
    train:                        # shared by every member (one stream: same batch size, steps, order)
      train_tokens: 2000000
      batch_size: 4096
      seed: 0                     # the data order (and the default init seed)
      log_every: 50
      ckpt_every: 500
    defaults:                     # architecture fields (and per-member train fields) for every member
      n_latents: 4096
    grid:                         # optional: the cartesian product of these values
      k: [16, 32]
      n_latents: [2048, 4096]
      seed: [0, 1]                # a member's seed seeds its init; the data order stays train.seed
    members:                      # optional: explicit members (each crossed with the grid)
      - {name: wide, n_latents: 8192}
      - {name: l1, arch: relu_l1, l1_coef: 5.0, hook: blocks.2.hook_out}

A member may set ``name``, ``hook``, ``arch``, its architecture's fields and these train fields:
``seed lr warmup_steps decay_frac grad_clip adam_b1 adam_b2 adam_eps dead_window_tokens
dense_threshold init_sample_tokens``. Grid members are named from their values (``k16-n_latents2048-seed0``).
Everything (unknown keys, k > n, hooks, widths, names, a different config under an existing run
name or sweep) is checked before any work.

Resume: checkpoints of all members are written at the same steps, then the sweep's state file
(``<workspace>.runs/.sweeps/<name>.json``) records that step. An interrupted sweep restarts every
member from that step with its saved state and the streams seeked to it, so it reaches bit for bit
the parameters of an uninterrupted one (keep_checkpoints >= 2 keeps the recorded step on disk while
the next one is written).

Divergence: the trainer's guard (``sae.trainer.divergence``) watches every member at each metric row
and before each checkpoint; a member that diverges stops the sweep before any checkpoint past the
last good one, is marked failed with the reason (the others as stopped with it), and may come back
with another ``lr`` (only that) to go on from the recorded step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sae import checkpoint as ckpt
from sae import common
from sae.base import arch_module, optional, validate_config
from sae.lifecycle import (
    RunDivergedError,
    TrainResult,
    checkpoint_meta,
    config_record,
    finish_training,
    read_train_state,
    refuse_different_config,
    stop_diverged,
    train_trees,
    write_checkpoint,
)
from sae.trainer import (
    TrainConfig,
    Trainer,
    TrainState,
    check_batch,
    collect_sample,
    divergence,
    resample_dead,
    zero_window,
)
from saewb.progress import progress_bar

TOP_KEYS = (
    "workspace",
    "harvest",
    "name",
    "hook",
    "arch",
    "eval_tokens",
    "progress",
    "train",
    "defaults",
    "grid",
    "members",
    "from_model",
)
MEMBER_TRAIN_KEYS = (
    "seed",
    "lr",
    "warmup_steps",
    "decay_frac",
    "grad_clip",
    "adam_b1",
    "adam_b2",
    "adam_eps",
    "dead_window_tokens",
    "dense_threshold",
    "init_sample_tokens",
)
"""Train fields a member may set: they change its init or optimiser, not the shared stream."""


class SweepError(ValueError):
    """A sweep file or sweep state that cannot be run; the message names the fix."""


@dataclass(frozen=True)
class Member:
    """One SAE of a sweep."""

    name: str
    """Run name in the workspace."""
    hook: str
    sae_config: Any
    train_config: TrainConfig


@dataclass
class SweepPlan:
    """A validated sweep."""

    name: str
    workspace: Path
    sources: list[str]
    """Data sources (workspaces / Parquet exports); the first is `workspace`."""
    harvest: str
    members: list[Member]
    widths: dict[str, int]
    """Hook -> activation width d."""
    data_seed: int
    eval_tokens: int = 200_000
    progress: bool = True
    record: dict[str, Any] = field(default_factory=dict)
    """The sweep's identity, compared on resume."""
    live: dict[str, Any] | None = None
    """`from_model:` settings: every member trains on activations computed on the fly, all hooks of a
    buffer from one forward pass (activations/live.py); None: the harvest's cache."""

    def run_record(self, m: Member) -> dict[str, Any]:
        """A member's stored run config: the `saewb train` record plus the sweep and the data seed."""
        out = {
            **config_record(m.sae_config, m.train_config),
            "hook": m.hook,
            "harvest": self.harvest,
            "sweep": self.name,
            "data_seed": self.data_seed,
        }
        if self.live is not None:
            from activations.live import live_record

            out["from_model"] = live_record(self.live)
        return {**out, "sources": self.sources} if len(self.sources) > 1 else out

    @property
    def state_path(self) -> Path:
        from saewb.workspace import Workspace

        return Workspace(self.workspace).runs_dir / ".sweeps" / f"{self.name}.json"


def _norm(d: Any, where: str) -> dict[str, Any]:
    from sae.orchestrate import normalise_keys

    return normalise_keys(d, where, SweepError)


def _value_name(v: Any) -> str:
    return str(v).replace(".", "p").replace("-", "m")


def load_sweep(path: str | Path) -> dict[str, Any]:
    from sae.orchestrate import load_yaml

    return load_yaml(path, "sweep file", SweepError)


def plan_sweep(values: dict[str, Any]) -> SweepPlan:
    """Validate a sweep (the YAML's mapping) into a plan; raises SweepError / ValueError naming the fix."""
    from activations.store import check_name, open_parts
    from sae.base import config_fields, make_config
    from sae.orchestrate import check_lockstep, open_sources

    unknown = sorted(set(values) - set(TOP_KEYS))
    if unknown:
        raise SweepError(f"unknown top-level key(s) {unknown}; valid keys are {list(TOP_KEYS)}")
    for req in ("workspace", "name", "train"):
        if req not in values:
            raise SweepError(f"the sweep file needs `{req}:` (see `saewb sweep --help` for the format)")
    name = check_name(str(values["name"]), "sweep name")
    train = _norm(values["train"], "train")
    train_fields = set(config_fields(TrainConfig))
    bad = sorted(set(train) - train_fields)
    if bad:
        raise SweepError(f"unknown train field(s) {bad}; valid fields are {sorted(train_fields)}")
    base_tc = TrainConfig(**train)
    base_tc.validate()
    if getattr(base_tc, "mesh_data", 1) * getattr(base_tc, "mesh_model", 1) != 1:
        raise SweepError("a sweep trains on one device; drop mesh_data / mesh_model from train:")
    if base_tc.keep_checkpoints < 2:
        raise SweepError(
            "a sweep needs keep_checkpoints >= 2 (its resume step stays on disk while the next is written)"
        )
    defaults = _norm(values.get("defaults"), "defaults")
    grid = _norm(values.get("grid"), "grid")
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise SweepError(f"grid: {k} must be a non-empty list of values, got {v!r}")
    raw_members = values.get("members") or [{}]
    if not isinstance(raw_members, list):
        raise SweepError("members must be a list of mappings")
    if not grid and values.get("members") is None:
        raise SweepError("the sweep has no members: give `members:` and/or `grid:`")

    live = None
    if values.get("from_model") is not None:
        from activations.live import live_settings, open_live
        from saewb.workspace import Workspace

        try:
            live = live_settings(_norm(values["from_model"], "from_model"))
        except ValueError as err:
            raise SweepError(str(err)) from err
        ws, resolved = Workspace(values["workspace"]), []
    else:
        ws, resolved = open_sources(values["workspace"], SweepError)

    specs: list[tuple[str, dict[str, Any]]] = []
    for i, raw in enumerate(raw_members):
        base = {**defaults, **_norm(raw, f"members[{i}]")}
        for combo in itertools.product(*grid.values()) if grid else [()]:
            vals = {**base, **dict(zip(grid, combo, strict=True))}
            label = "-".join(f"{k}{_value_name(v)}" for k, v in zip(grid, combo, strict=True))
            mname = "-".join(p for p in (str(vals.pop("name", "")) or "", label) if p) or f"m{i}"
            specs.append((f"{name}-{mname}", vals))

    parts_by_hook: dict[str, int] = {}
    members: list[Member] = []
    harvest_name = None
    for run_name, vals in specs:
        check_name(run_name, "member run name")
        hook = str(vals.pop("hook", values.get("hook", "")))
        if not hook:
            raise SweepError(f"member {run_name!r} has no hook; set `hook:` at the top or in the member")
        arch_name = str(vals.pop("arch", values.get("arch", "topk")))
        arch = arch_module(arch_name)
        check_lockstep(arch_name, f"member {run_name!r}", SweepError)
        arch_fields = set(config_fields(arch.Config))
        wrong = sorted(set(vals) - arch_fields - set(MEMBER_TRAIN_KEYS))
        if wrong:
            shared = sorted(set(wrong) & train_fields)
            hint = (
                f"; {shared} must be the same for every member: put them under train:"
                if shared
                else f"; {arch.Config.arch} fields are {sorted(arch_fields)}"
            )
            raise SweepError(f"member {run_name!r}: option(s) {wrong} do not apply{hint}")
        sae_cfg = make_config(arch.Config, {k: v for k, v in vals.items() if k in arch_fields})
        tc = dataclasses.replace(base_tc, **{k: v for k, v in vals.items() if k in MEMBER_TRAIN_KEYS})
        tc.validate()
        if live is not None:  # the model itself says which hooks it has and how wide
            every = [str(v.get("hook", values.get("hook", ""))) for _, v in specs]
            source = open_live(live, list(dict.fromkeys(h for h in every if h)))  # loaded once
            hook = source.hook(hook)
            parts_by_hook[hook] = int(source.widths[hook])
            harvest_name = ""
        elif hook not in parts_by_hook:
            parts = open_parts(resolved, values.get("harvest"), hook)
            parts_by_hook[hook] = int(parts[0].info.hooks[hook])
            harvest_name = parts[0].info.name
        validate_config(sae_cfg, parts_by_hook[hook])
        members.append(Member(run_name, hook, sae_cfg, tc))
    names = [m.name for m in members]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SweepError(f"member names {dupes} occur twice; give the members distinct `name:`s")
    plan = SweepPlan(
        name=name,
        workspace=ws.path,
        sources=resolved,
        harvest=str(harvest_name),
        members=members,
        widths=parts_by_hook,
        data_seed=base_tc.seed,
        eval_tokens=int(values.get("eval_tokens", 200_000)),
        progress=bool(values.get("progress", True)),
        live=live,
    )
    plan.record = json.loads(
        json.dumps(
            {
                "sources": plan.sources,
                "harvest": plan.harvest,
                "data_seed": plan.data_seed,
                "members": {m.name: plan.run_record(m) for m in members},
            }
        )
    )
    _check_existing(plan)
    return plan


def _check_existing(plan: SweepPlan) -> None:
    from sae import runs
    from saewb.workspace import Workspace

    ws = Workspace(plan.workspace)
    rows = {m.name: runs.get_run(ws, m.name) for m in plan.members}
    if plan.state_path.exists():
        stored = json.loads(plan.state_path.read_text())["record"]
        # a member stopped by the divergence guard may come back with another lr (sae/trainer.py)
        diverged = {n for n, row in rows.items() if runs.is_diverged(row)}

        def relax(rec: dict[str, Any]) -> dict[str, Any]:
            members = rec.get("members", {})
            return {
                **rec,
                "members": {n: runs.without_lr(r) if n in diverged else r for n, r in members.items()},
            }

        if relax(stored) != relax(plan.record):
            raise SweepError(
                f"sweep {plan.name!r} already ran in {ws.path} with a different config; use another name:, "
                "or repeat the original file to resume it"
            )
    for m in plan.members:
        row = rows[m.name]
        if row is not None:
            refuse_different_config(
                row["config"],
                plan.run_record(m),
                runs.is_diverged(row),
                f"a run named {m.name!r} (of this sweep or not) already exists",
                error=SweepError,
                fix="rename the sweep or the member",
            )


# --------------------------------------------------------------------------- lockstep training


_STEP_CACHE: dict[str, Any] = {}
"""Jitted group steps by group config: a resume in the same process reuses their compilation."""


@dataclass
class StepGroup:
    """Members advanced together: stacked and vmapped when `vmapped`, else one member."""

    members: list[int]
    trainer: Trainer
    hook: str
    vmapped: bool
    k_active: jax.Array | None = None
    """Each member's k when they differ (TopK): the trainer's config holds the largest."""


def _varies_k(m: Member) -> bool:
    """Whether members differing from this one only in k may share its vmapped step."""
    return bool(optional(arch_module(m.sae_config.arch), "vmaps_k")(m.sae_config))


def _k_bands(members: list[Member], idx: list[int]) -> list[list[int]]:
    """Members that differ in k share a step while the largest k is at most twice the smallest: the
    smaller ones search and carry the largest k's picks (one step of 4 members at n = 4096, k 16 and
    32 together: 153 ms against 136 ms in two steps, with no dead latents; equal with AuxK on)."""
    if not _varies_k(members[idx[0]]):
        return [idx]
    bands: list[list[int]] = []
    for i in sorted(idx, key=lambda i: (members[i].sae_config.k, i)):
        if bands and members[i].sae_config.k <= 2 * members[bands[-1][0]].sae_config.k:
            bands[-1].append(i)
        else:
            bands.append([i])
    return bands


def _group_key(m: Member) -> str:
    tc = {k: v for k, v in dataclasses.asdict(m.train_config).items() if k != "seed"}
    cfg = dataclasses.asdict(m.sae_config)
    if _varies_k(m):
        cfg.pop("k")
    return json.dumps([m.hook, m.sae_config.arch, cfg, tc], sort_keys=True, default=str)


def _stack(trees: list[Any]) -> Any:
    """Stack on the host and put once: eager jnp.stack would compile a kernel per leaf shape."""
    return jax.tree_util.tree_map(lambda *a: jnp.asarray(np.stack([np.asarray(x) for x in a])), *trees)


def _unstack(tree: Any, i: int) -> Any:
    """Member i of a stacked tree already fetched to the host (numpy indexing compiles nothing)."""
    return jax.tree_util.tree_map(lambda a: np.asarray(a)[i], tree)


def _resample_group(
    g: StepGroup, state: Any, batch: np.ndarray, members: list[Member], scales: list[float], step: int
) -> Any:
    """Dead-latent resampling (host code) of each member of a group, with the member's own config (a
    k-band's trainer holds the largest k) and seed; a vmapped group is unstacked and stacked again."""
    if not g.vmapped:
        i = g.members[0]
        return resample_dead(g.trainer, state, batch, scales[i], members[i].train_config.seed + step)
    if not np.any(np.asarray(state.since_fired) >= g.trainer.window):
        return state  # nothing dead in any member
    host = jax.device_get(state)
    views = []
    for j, i in enumerate(g.members):
        view = jax.tree_util.tree_map(jnp.asarray, _unstack(host, j))
        seed = members[i].train_config.seed + step
        views.append(resample_dead(g.trainer, view, batch, scales[i], seed, cfg=members[i].sae_config))
    return _stack(views)


@partial(jax.jit, static_argnums=(1,))
def _finite_members(params: Any, vmapped: bool) -> jax.Array:
    """Whether each member's params are all finite: [members] for a vmapped group, else [1]."""
    leaves = [a for a in jax.tree_util.tree_leaves(params) if jnp.issubdtype(a.dtype, jnp.floating)]
    if vmapped:
        return jnp.stack([jnp.all(jnp.isfinite(a.reshape(a.shape[0], -1)), axis=1) for a in leaves]).all(0)
    return jnp.stack([jnp.all(jnp.isfinite(a)) for a in leaves]).all(0, keepdims=True).reshape(1)


def step_groups(members: list[Member], widths: dict[str, int]) -> list[StepGroup]:
    """The members that advance together, each group with its one trainer."""
    by_key: dict[str, list[int]] = {}
    for i, m in enumerate(members):
        by_key.setdefault(_group_key(m), []).append(i)
    out = []
    for idx in (band for same in by_key.values() for band in _k_bands(members, same)):
        m = members[idx[0]]
        cfg, k_active = m.sae_config, None
        ks = [members[i].sae_config.k for i in idx] if _varies_k(m) else []
        if len(set(ks)) > 1:
            cfg = dataclasses.replace(cfg, k=max(ks))
            k_active = jnp.asarray(ks, jnp.int32)
        out.append(
            StepGroup(idx, Trainer(cfg, m.train_config, widths[m.hook]), m.hook, len(idx) > 1, k_active)
        )
    return out


def train_lockstep(
    members: list[Member],
    batches: dict[str, Callable[[int], Iterator[np.ndarray]]],
    *,
    run_dirs: dict[str, Path] | None = None,
    state_path: Path | None = None,
    state_record: dict[str, Any] | None = None,
    on_log: Callable[[str, dict[str, float]], None] | None = None,
    on_checkpoint: Callable[[str, Path, int], None] | None = None,
    progress: bool = True,
) -> dict[str, TrainResult]:
    """Train (or resume) every member on one pass over `batches[hook](start)` (one iterator per hook).

    The members must share batch_size, train_tokens, log_every, ckpt_every and keep_checkpoints.
    With `run_dirs` and `state_path`, checkpoints go to each member's run directory and the step
    they were all written at to `state_path`; a sweep with a state file resumes from that step.
    """
    shared = ("batch_size", "train_tokens", "log_every", "ckpt_every", "keep_checkpoints", "outlier_ratio")
    tc0 = members[0].train_config
    for m in members:
        diff = [k for k in shared if getattr(m.train_config, k) != getattr(tc0, k)]
        if diff:
            raise SweepError(f"member {m.name!r} differs in {diff}; lockstep members must share them")
    total = tc0.total_steps
    hooks = list(dict.fromkeys(m.hook for m in members))

    start = 0
    if state_path is not None and state_path.exists():
        start = int(json.loads(state_path.read_text())["step"])
    scales: list[float] = []
    states: list[TrainState] = []
    widths: dict[str, int] = {}
    cutoffs: dict[str, float | None] = {}
    """Per hook: the outlier cutoff its members share (they share its batches)."""
    if start > 0:
        assert run_dirs is not None
        for m in members:
            cdir = ckpt.checkpoints_dir(run_dirs[m.name]) / f"step_{start:09d}"
            manifest = ckpt.read_manifest(cdir)
            widths[m.hook] = int(manifest["d"])
            states.append(read_train_state(Trainer(m.sae_config, m.train_config, widths[m.hook]), cdir))
            scales.append(float(manifest["scale"]))
            cutoffs[m.hook] = manifest.get("outlier_cutoff")
    else:
        samples: dict[str, np.ndarray] = {}
        for hook in hooks:
            want = max(m.train_config.init_sample_tokens for m in members if m.hook == hook)
            samples[hook] = collect_sample(batches[hook], want)
            widths[hook] = int(samples[hook].shape[1])
            cutoffs[hook] = common.outlier_cutoff(samples[hook], tc0.outlier_ratio)
        with common.shared_geometric_medians():  # members of one hook share the init sample
            for m in members:
                # the same sample, scale and init that `train` computes for this member on these batches
                sample = samples[m.hook][: m.train_config.init_sample_tokens]
                sample = sample[common.typical_rows(sample, cutoffs[m.hook])]
                arch = arch_module(m.sae_config.arch)
                validate_config(m.sae_config, widths[m.hook])
                scale = common.estimate_input_scale(
                    sample, arch.input_scale_target(m.sae_config), widths[m.hook]
                )
                trainer = Trainer(m.sae_config, m.train_config, widths[m.hook])
                states.append(trainer.init_state(sample * np.float32(scale)))
                scales.append(scale)

    groups = step_groups(members, widths)
    g_states = [_stack([states[i] for i in g.members]) if g.vmapped else states[g.members[0]] for g in groups]
    g_scales = [
        jnp.asarray([scales[i] for i in g.members], jnp.float32)
        if g.vmapped
        else jnp.float32(scales[g.members[0]])
        for g in groups
    ]
    del states
    hook_index = {h: i for i, h in enumerate(hooks)}

    # One jitted step per group, called one after the other on the same batch. A first version
    # compiled all groups into one program and was OOM-killed at 9 GB RSS (8 TopK members,
    # B = 1024, n <= 4096, CPU); separate programs free each group's intermediates before the next.
    # What identifies a group's step program, built once (it is looked up every step).
    group_keys = [
        [
            [_group_key(members[i]) for i in g.members],
            None if g.k_active is None else np.asarray(g.k_active).tolist(),
            widths[g.hook],
        ]
        for g in groups
    ]

    def compiled(gi: int, maybe_dead: bool) -> Any:
        g = groups[gi]
        key = json.dumps([*group_keys[gi], maybe_dead], sort_keys=True)
        if key not in _STEP_CACHE:

            def fn(ts: TrainState, x: jax.Array, scale: jax.Array, k_active: jax.Array | None) -> TrainState:
                return g.trainer.step_impl(
                    ts, x, scale, maybe_dead, k_active
                )  # maybe_dead static: AuxK in or out

            axes = (0, None, 0, None if g.k_active is None else 0)
            _STEP_CACHE[key] = jax.jit(jax.vmap(fn, in_axes=axes) if g.vmapped else fn, donate_argnums=(0,))
        return _STEP_CACHE[key]

    hook_of = [hook_index[g.hook] for g in groups]

    def step_fn(all_states: tuple, xs: tuple, all_scales: tuple) -> tuple:
        # Every group's flag first (a vmapped group compiles AuxK in when any member has a dead
        # latent), then every dispatch: one wait per step, and the groups' programs still overlap.
        flags = [g.trainer.maybe_dead(ts.since_fired) for g, ts in zip(groups, all_states, strict=True)]
        out = []
        for gi, (flag, ts, h, sc) in enumerate(zip(flags, all_states, hook_of, all_scales, strict=True)):
            with (
                common.members_vmapped() if groups[gi].vmapped else contextlib.nullcontext()
            ):  # read when tracing
                out.append(compiled(gi, flag)(ts, xs[h], sc, groups[gi].k_active))
        return tuple(out)

    def host_view(gi: int) -> list[TrainState]:
        """The members of group gi with what metric rows need (counters, window, step) on the host."""
        ts = g_states[gi]
        part = jax.device_get({"win": ts.win, "since_fired": ts.since_fired, "step": ts.step})
        views = [_unstack(part, j) for j in range(len(groups[gi].members))] if groups[gi].vmapped else [part]
        return [TrainState(params=None, opt_state=None, arch_state=None, rng=None, **v) for v in views]

    def guard(rows: dict[str, dict[str, float]] | None) -> None:
        """Stop the sweep when a member's metric row (or, at a checkpoint, its window so far) or params diverged."""
        reasons: dict[str, str] = {}
        for gi, g in enumerate(groups):
            finite = np.asarray(jax.device_get(_finite_members(g_states[gi].params, g.vmapped))).reshape(-1)
            views = host_view(gi) if rows is None else [None] * len(g.members)
            for j, (i, view) in enumerate(zip(g.members, views, strict=True)):
                name = members[i].name
                row = rows[name] if rows is not None else g.trainer.metrics_row(view, 0.0)
                reason = divergence(row, histories[name])
                if reason is None and not finite[j]:
                    reason = f"diverged: the parameters turned non-finite by step {int(row['step'])}"
                if reason is not None:
                    reasons[name] = reason
        if reasons:
            for name, reason in reasons.items():
                stop_diverged(run_dirs[name] if run_dirs is not None else None, reason)  # records the reason
            names = ", ".join(f"{n} ({r})" for n, r in reasons.items())
            err = RunDivergedError(
                f"sweep stopped, member(s) {names}; the last good checkpoints are kept: lower "
                "their lr in the sweep file and run it again to go on from them",
                "",
            )
            err.reasons = reasons  # type: ignore[attr-defined]
            raise err

    def save(step: int) -> None:
        assert run_dirs is not None and state_path is not None
        for gi, g in enumerate(groups):
            host = jax.device_get(g_states[gi])
            for j, i in enumerate(g.members):
                m = members[i]
                ts = _unstack(host, j) if g.vmapped else host
                meta = checkpoint_meta(
                    config_record(m.sae_config, m.train_config),
                    widths[m.hook],
                    scales[i],
                    last_rows.get(m.name, {}),
                    {"sweep_state": str(state_path)},
                    rng=[int(v) for v in np.asarray(ts.rng)],
                    outlier_cutoff=cutoffs[m.hook],
                )
                write_checkpoint(
                    run_dirs[m.name],
                    step,
                    train_trees(ts),
                    meta,
                    m.train_config.keep_checkpoints,
                    None if on_checkpoint is None else partial(on_checkpoint, m.name),
                )
        # Only now does the sweep move on: a kill before this line resumes from the previous step.
        state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": step, "record": state_record or {}}))
        os.replace(tmp, state_path)

    last_rows: dict[str, dict[str, float]] = {}
    histories: dict[str, list[dict[str, float]]] = {m.name: [] for m in members}
    its = {h: batches[h](start) for h in hooks}
    bar = progress_bar(f"sweep x{len(members)}", total, initial=start, unit="step", enabled=progress)
    t_last, steps_since = time.perf_counter(), 0
    step = start
    while step < total:
        xs_host = {
            h: common.replace_outliers(check_batch(next(its[h]), tc0, widths[h]), cutoffs[h]) for h in hooks
        }
        xs = tuple(jnp.asarray(xs_host[h]) for h in hooks)
        g_states = list(step_fn(tuple(g_states), xs, tuple(g_scales)))
        step += 1
        steps_since += 1
        for gi, g in enumerate(groups):
            due = optional(g.trainer.arch, "resample_due")
            if due is not None and due(g.trainer.cfg, step, total):
                g_states[gi] = _resample_group(g, g_states[gi], xs_host[g.hook], members, scales, step)
        if step % tc0.log_every == 0 or step == total:
            jax.block_until_ready(g_states)
            now = time.perf_counter()
            tps = steps_since * tc0.batch_size / max(now - t_last, 1e-9)  # tokens per second per member
            new_rows = {
                members[i].name: g.trainer.metrics_row(view, tps)
                for gi, g in enumerate(groups)
                for i, view in zip(g.members, host_view(gi), strict=True)
            }
            guard(new_rows)
            for gi, g in enumerate(groups):
                for i in g.members:
                    row = new_rows[members[i].name]
                    histories[members[i].name].append(row)
                    last_rows[members[i].name] = row
                    if on_log is not None:
                        on_log(members[i].name, row)
                win = zero_window(g.trainer.cfg.n_latents)
                g_states[gi] = g_states[gi].replace(win=_stack([win] * len(g.members)) if g.vmapped else win)
            bar.set_postfix(fvu=f"{np.mean([r['fvu'] for r in last_rows.values()]):.4f}")
            t_last, steps_since = time.perf_counter(), 0
        if run_dirs is not None and state_path is not None and (step % tc0.ckpt_every == 0 or step == total):
            if step % tc0.log_every:  # the log rows were just checked otherwise
                guard(None)
            save(step)
        bar.update(1)
    bar.close()

    results: dict[str, TrainResult] = {}
    for gi, g in enumerate(groups):
        host = jax.device_get((g_states[gi].params, g_states[gi].arch_state))
        for j, i in enumerate(g.members):
            m = members[i]
            p_host, s_host = _unstack(host, j) if g.vmapped else host
            run_dir = run_dirs[m.name] if run_dirs is not None else None
            last_row = {}
            if not histories[m.name] and run_dir is not None:  # resumed at the very end: the last logged row
                last_row = ckpt.read_manifest(ckpt.checkpoints_dir(run_dir) / f"step_{start:09d}").get(
                    "last_metrics", {}
                )
            res = finish_training(
                m.sae_config,
                m.train_config,
                jax.tree_util.tree_map(jnp.asarray, p_host),
                jax.tree_util.tree_map(jnp.asarray, s_host),
                scales[i],
                widths[m.hook],
                histories[m.name],
                last_row,
                run_dir,
                outlier_cutoff=cutoffs[m.hook],
            )
            results[m.name] = res
    return results


def run_sweep(plan: SweepPlan) -> dict[str, dict[str, Any]]:
    """Train (or resume) every member of a planned sweep, log them as runs, evaluate them on held-out tokens."""
    from activations.stream import ActivationStream
    from sae.lifecycle import end_of_run_metrics
    from sae.orchestrate import RunSpec, train_runs
    from saewb.workspace import Workspace

    ws = Workspace(plan.workspace)
    tc0 = plan.members[0].train_config
    data: Any = plan.sources if len(plan.sources) > 1 else ws
    hooks = list(dict.fromkeys(m.hook for m in plan.members))

    def stream(hook: str, **kw: Any) -> Any:
        if plan.live is None:
            values = "stored" if kw.get("split", "train") == "train" else "float32"  # widened by the step
            return ActivationStream(
                data, hook, harvest=plan.harvest, seed=plan.data_seed, values=values, **kw
            )
        from activations.live import LiveStream, open_live

        source = open_live(plan.live, hooks)  # one model, one forward pass per buffer for every hook
        return LiveStream(source, hook, seed=plan.data_seed, buffer_tokens=plan.live["shuffle_tokens"], **kw)

    streams = {h: stream(h, batch_size=tc0.batch_size) for h in hooks}
    start = int(json.loads(plan.state_path.read_text())["step"]) if plan.state_path.exists() else 0
    specs = [
        RunSpec(m.name, m.hook, m.sae_config.arch, plan.run_record(m), ws.runs_dir / m.name)
        for m in plan.members
    ]

    def train(on_log: Any, on_checkpoint: Any) -> dict[str, Any]:
        return train_lockstep(
            plan.members,
            {h: (lambda s, st=streams[h]: st.batches(start=s)) for h in hooks},
            run_dirs={s.name: s.run_dir for s in specs},
            state_path=plan.state_path,
            state_record=plan.record,
            on_log=on_log,
            on_checkpoint=on_checkpoint,
            progress=plan.progress,
        )

    evals: dict[str, Any] = {}  # one eval stream per hook

    def heldout(spec: RunSpec) -> Any:
        def eval_stream() -> Any:
            if spec.hook not in evals:
                evals[spec.hook] = stream(spec.hook, batch_size=min(tc0.batch_size, 4096), split="eval")
            return evals[spec.hook]

        return (
            (lambda: end_of_run_metrics(spec.run_dir, eval_stream, plan.eval_tokens))
            if plan.eval_tokens > 0
            else None
        )

    return train_runs(ws, plan.harvest or None, specs, start, train, heldout)
