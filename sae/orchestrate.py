"""One orchestrator: train runs in a workspace, for `saewb train` (``sae.cli``) and `saewb sweep` (``sae.sweep``).

Planning (before any work): ``load_yaml`` / ``normalise_keys`` read option files (keys with dashes
or underscores), ``open_sources`` checks the data sources (the first is the workspace that holds
the runs) and resolves their paths, ``fit_function`` picks how a single run trains (the trainer, or an architecture's own fit:
``sae.archs.OWN_FIT``) and ``check_lockstep`` refuses such an architecture in a sweep.

One run (`saewb train`, ``saewb.train``): ``plan_from_values`` validates a run's options (the
CLI's flags, a YAML config's keys or the Python API's arguments: one set of checks and messages)
into a ``TrainPlan``; ``run_plan`` trains it.

Running: ``train_runs`` registers the runs, logs their metric rows and checkpoints, records a
failure or an interruption, and finalises each run (``sae.lifecycle.finalise_run``: held-out
evaluation, run row and status).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LIVE_KEYS = ("from_model", "corpus", "ctx_len", "model_batch_size", "shuffle_tokens", "device")
"""Keys of on-the-fly training (`--from-model`): where the activations come from instead of a harvest."""
RUN_KEYS = (
    "workspace",
    "hook",
    "harvest",
    "arch",
    "name",
    "d_in",
    "eval_tokens",
    "progress",
    "wandb",
    "wandb_project",
    *LIVE_KEYS,
)
"""Keys that are about the run, not the SAE or the optimiser."""


def normalise_keys(values: Any, where: str, error: type[Exception] = ValueError) -> dict[str, Any]:
    """A YAML mapping with its keys as option names (dashes become underscores); None is empty."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise error(f"{where} must be a mapping of option: value, got {type(values).__name__}")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def load_yaml(path: str | Path, what: str, error: type[Exception] = ValueError) -> dict[str, Any]:
    """The mapping of a YAML option file (``what``: "config file", "sweep file")."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise error(f"{what} {path} is not valid YAML: {err}") from err
    return normalise_keys(data, f"{what} {path}", error)


def open_sources(value: Any, error: type[Exception] = ValueError) -> tuple[Any, list[str]]:
    """The workspace that holds the runs and every data source, paths resolved.

    ``value``: one workspace, or a list (shards of one harvest, Parquet exports) whose first item
    is a workspace .duckdb file.
    """
    from activations.store import as_sources, is_parquet_source
    from saewb.workspace import Workspace

    sources = as_sources(value)
    if is_parquet_source(sources[0]):
        raise error(
            f"the first --workspace ({sources[0]}) must be a workspace .duckdb file: it holds the run's records "
            "and checkpoints; put a workspace first and the Parquet exports after it"
        )
    ws = Workspace(sources[0])
    if not ws.exists():
        raise FileNotFoundError(
            f"workspace {ws.path} does not exist; create it with `saewb harvest --workspace {ws.path} ...`"
        )
    return ws, [str(s) if "://" in str(s) else str(Path(s).resolve()) for s in sources]


def check_lockstep(arch: str, who: str, error: type[Exception] = ValueError) -> None:
    """Refuse, before any work, a sweep member that cannot train in lockstep.

    A sweep advances every member by gradient steps; an architecture with its own fit
    (``sae.archs.OWN_FIT``) is trained alone, by `saewb train` (``fit_function``).
    """
    from sae.archs import OWN_FIT

    if arch in OWN_FIT:
        raise error(
            f"{who}: arch {arch!r} is not trained by gradient steps (it has its own fit), so it cannot train in "
            f"lockstep with a sweep; train it alone with `saewb train --arch {arch}`"
        )


def fit_function(arch: str) -> tuple[Callable[..., Any], bool]:
    """How a single run of ``arch`` trains: (``sae.trainer.train`` or the architecture's own ``fit``,
    whether its batches carry ``tok_idx``: an own fit labels what it keeps with them)."""
    from sae.archs import OWN_FIT
    from sae.base import arch_module

    if arch in OWN_FIT:
        return arch_module(arch).fit, True
    from sae.trainer import train

    return train, False


@dataclass(frozen=True)
class RunSpec:
    """One run to register and finalise in the workspace."""

    name: str
    hook: str
    arch: str
    record: dict[str, Any]
    """Its stored config (``runs.config``)."""
    run_dir: Path


def train_runs(
    ws: Any,
    harvest: str,
    specs: list[RunSpec],
    resume_step: int,
    fit: Callable[
        [Callable[[str, dict[str, float]], None], Callable[[str, Path, int], None]], dict[str, Any]
    ],
    heldout: Callable[[RunSpec], Callable[[], dict[str, Any]] | None],
    *,
    lead: bool = True,
    on_row: Callable[[str, dict[str, float]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Register ``specs`` as running, train them with ``fit(on_log, on_checkpoint)`` (which returns
    each run's ``TrainResult`` by name), then finalise each with its held-out evaluation.

    With several processes only the ``lead`` writes the workspace. A failure or an interruption is
    recorded on every run (the members the divergence guard stopped with their own reason, from the
    error's ``reasons``) and raised again.
    """
    from sae import runs
    from sae.lifecycle import finalise_run

    if lead:
        for s in specs:
            runs.start_run(
                ws,
                s.name,
                harvest=harvest,
                hook=s.hook,
                arch=s.arch,
                config=s.record,
                checkpoint_path=str(s.run_dir),
                resume_step=resume_step,
            )

    def on_log(name: str, row: dict[str, float]) -> None:
        runs.log_metrics(ws, name, [row])  # one short transaction per log row
        if on_row is not None:
            on_row(name, row)

    def on_checkpoint(name: str, path: Path, step: int) -> None:
        runs.set_checkpoint(ws, name, str(path))

    try:
        results = fit(on_log, on_checkpoint)
    except BaseException as err:
        if lead:
            reasons = getattr(err, "reasons", {})  # the members the divergence guard stopped
            others = (
                {s.name: f"stopped with the sweep: {' '.join(str(err).split())}" for s in specs}
                if reasons
                else {}
            )
            runs.mark_stopped(ws, [s.name for s in specs], err, {**others, **reasons})
        raise
    if not lead:
        return {s.name: {f"train_{k}": v for k, v in results[s.name].final_metrics.items()} for s in specs}
    return {s.name: finalise_run(ws, s.name, s.run_dir, results[s.name], heldout(s)) for s in specs}


# --------------------------------------------------------------------------- one run (`saewb train`)


def all_config_fields() -> dict[str, dataclasses.Field]:
    """Every config field by name: the TrainConfig's, then each architecture's (first one wins)."""
    from sae.base import registry
    from sae.trainer import TrainConfig

    out: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for mod in registry().values():
        for f in dataclasses.fields(mod.Config):
            out.setdefault(f.name, f)
    return out


@dataclass
class TrainPlan:
    """Everything a training run needs, validated."""

    workspace: Path
    hook: str
    harvest: str
    name: str
    d: int
    sae_config: Any
    train_config: Any
    eval_tokens: int
    progress: bool
    sources: tuple[str, ...] = ()
    """Every data source when training on a set (the workspace first); empty: the workspace alone."""
    wandb: bool = False
    """Mirror the metric rows to Weights & Biases (sae/wandb_log.py)."""
    wandb_project: str | None = None
    live: dict[str, Any] | None = None
    """On-the-fly training (`--from-model`): model, corpus, ctx_len, model_batch_size, device."""

    def data(self) -> Any:
        """What `ActivationStream` reads: the workspace, or the list of sources."""
        return list(self.sources) if self.sources else self.workspace

    def record(self) -> dict[str, Any]:
        """The run's stored config (the sources only for a set, so single runs keep their record)."""
        from sae.trainer import config_record

        out = {
            **config_record(self.sae_config, self.train_config),
            "hook": self.hook,
            "harvest": self.harvest,
        }
        if self.live is not None:  # what decides its data, like a harvest's identity
            from activations.live import live_record

            out["from_model"] = live_record(self.live)
        return {**out, "sources": list(self.sources)} if self.sources else out

    def streams(self, seed: int, split: str = "train", batch_size: int | None = None) -> Any:
        """The run's batches: the cached stream of its harvest, or the model on the fly."""
        size = batch_size or self.train_config.batch_size
        if self.live is None:
            from activations.stream import ActivationStream
            from sae.archs import OWN_FIT

            values = "stored" if split == "train" and self.sae_config.arch not in OWN_FIT else "float32"
            return ActivationStream(
                self.data(),
                self.hook,
                harvest=self.harvest,
                batch_size=size,
                seed=seed,
                split=split,
                values=values,  # the trainer widens a half-precision batch on its device
            )
        from activations.live import LiveStream

        return LiveStream(
            live_source(self),
            self.hook,
            batch_size=size,
            seed=seed,
            split=split,
            buffer_tokens=self.live["shuffle_tokens"],
        )


def live_source(plan: TrainPlan) -> Any:
    from activations.live import open_live

    return open_live(plan.live or {}, [plan.hook])


def plan_from_values(values: dict[str, Any]) -> TrainPlan:
    """Validate merged options into a plan; raises ValueError naming the problem and the fix."""
    from activations.store import harvest_info
    from sae.base import arch_module, config_fields, make_config, validate_config
    from sae.trainer import TrainConfig

    values = {k: v for k, v in values.items() if v is not None}
    train_fields = set(config_fields(TrainConfig))
    known = set(RUN_KEYS) | train_fields | set(all_config_fields())
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; valid options are {sorted(known)}")
    for req in ("workspace", "hook", "arch", "name"):
        if req not in values:
            raise ValueError(f"missing --{req.replace('_', '-')} (or `{req}:` in the YAML config)")
    arch = arch_module(str(values["arch"]))
    arch_fields = set(config_fields(arch.Config))
    wrong = sorted(set(values) - set(RUN_KEYS) - train_fields - arch_fields)
    if wrong:
        raise ValueError(
            f"option(s) {wrong} do not apply to arch {values['arch']!r}; its options are {sorted(arch_fields)}"
        )
    sae_cfg = make_config(arch.Config, {k: values[k] for k in arch_fields if k in values})
    tc = TrainConfig(**{k: values[k] for k in train_fields if k in values})
    tc.validate()
    if values.get("from_model"):
        return _live_plan(values, sae_cfg, tc)
    stray = sorted(k for k in LIVE_KEYS if k in values)
    if stray:
        raise ValueError(f"option(s) {stray} only apply with --from-model MODEL (training on the fly)")
    from activations.store import open_parts
    from sae.orchestrate import open_sources

    ws, sources = open_sources(values["workspace"])
    info = harvest_info(ws, values.get("harvest"))
    hook = str(values["hook"])
    if hook not in info.hooks:
        raise ValueError(
            f"hook {hook!r} is not in harvest {info.name!r} (it has {sorted(info.hooks)}); "
            f"pick one of those with --hook or harvest it with `saewb harvest --hook {hook}`"
        )
    d = int(info.hooks[hook])
    if "d_in" in values and int(values["d_in"]) != d:
        raise ValueError(
            f"d_in={values['d_in']} but hook {hook!r} of harvest {info.name!r} has width {d}; "
            "fix d_in or drop it"
        )
    validate_config(sae_cfg, d)
    if len(sources) > 1:
        open_parts(sources, values.get("harvest"), hook)  # one model, the hook at one width, nothing twice
    from activations.store import check_name

    check_name(str(values["name"]), "run name")
    if values.get("wandb"):
        from sae.wandb_log import require_wandb

        require_wandb()  # before any work: a clear error naming `pip install wandb`
    return _plan(
        values, ws.path, hook, info.name, d, sae_cfg, tc, sources=tuple(sources) if len(sources) > 1 else ()
    )


def _plan(
    values: dict[str, Any],
    workspace: Path,
    hook: str,
    harvest: str,
    d: int,
    sae_cfg: Any,
    tc: Any,
    **data: Any,
) -> TrainPlan:
    """The plan of checked options (`data`: the sources of a set, or the on-the-fly settings)."""
    return TrainPlan(
        workspace=workspace,
        hook=hook,
        harvest=harvest,
        name=str(values["name"]),
        d=d,
        sae_config=sae_cfg,
        train_config=tc,
        eval_tokens=int(values.get("eval_tokens", 200_000)),
        progress=bool(values.get("progress", True)),
        wandb=bool(values.get("wandb", False)),
        wandb_project=values.get("wandb_project"),
        **data,
    )


def _live_plan(values: dict[str, Any], sae_cfg: Any, tc: Any) -> TrainPlan:
    """A plan for `--from-model`: the model is loaded to check the hook and learn its width."""
    from activations.live import live_settings
    from activations.store import as_sources, check_name
    from sae.base import validate_config
    from saewb.workspace import Workspace

    workspaces = as_sources(values["workspace"])
    if len(workspaces) > 1:
        raise ValueError("--from-model trains without a harvest: give one --workspace (it holds the run)")
    live = live_settings(
        {k: values.get(k) for k in LIVE_KEYS if k != "from_model"} | {"model": values["from_model"]}
    )
    check_name(str(values["name"]), "run name")
    ws = Workspace(workspaces[0])
    plan = _plan(values, ws.path, str(values["hook"]), "", 0, sae_cfg, tc, live=live)
    source = live_source(plan)
    hook = source.hook(plan.hook)
    d = int(source.widths[hook])
    if "d_in" in values and int(values["d_in"]) != d:
        raise ValueError(f"d_in={values['d_in']} but hook {hook!r} of model {live['model']!r} has width {d}")
    validate_config(sae_cfg, d)
    return dataclasses.replace(plan, hook=hook, d=d)


def _check_existing(plan: TrainPlan) -> int:
    """Refuse a different config under an existing name; return the step a resume starts from."""
    from sae import checkpoint as ckpt
    from sae import runs
    from sae.lifecycle import refuse_different_config
    from saewb.workspace import Workspace

    ws = Workspace(plan.workspace)
    row = runs.get_run(ws, plan.name)
    if row is not None:
        refuse_different_config(
            row["config"], plan.record(), runs.is_diverged(row), f"a run named {plan.name!r} already exists"
        )
    latest = ckpt.latest_checkpoint(ws.runs_dir / plan.name)
    return int(ckpt.read_manifest(latest)["step"]) if latest is not None else 0


def run_plan(plan: TrainPlan) -> dict[str, Any]:
    """Train (or resume) the planned run, log to the workspace, evaluate on the held-out split."""
    import jax

    from sae.lifecycle import end_of_run_metrics
    from sae.orchestrate import RunSpec, fit_function, train_runs
    from saewb.workspace import Workspace

    lead = jax.process_index() == 0  # several processes: process 0 alone writes the workspace
    ws = Workspace(plan.workspace)
    resume_step = _check_existing(plan)
    record = plan.record()
    spec = RunSpec(plan.name, plan.hook, plan.sae_config.arch, record, ws.runs_dir / plan.name)
    tc = plan.train_config
    stream = plan.streams(tc.seed)
    extra: dict[str, Any] = {}
    if jax.process_count() > 1:  # each process reads only its rows of every global batch
        extra["local_batches"] = lambda start, rows: stream.batches(start=start, rows=rows)

    wb = None
    if plan.wandb and lead:
        from sae.wandb_log import WandbLogger

        wb = WandbLogger(ws.path, plan.name, plan.wandb_project, record)
    fit, with_index = fit_function(plan.sae_config.arch)

    def train(on_log: Any, on_checkpoint: Any) -> dict[str, Any]:
        result = fit(
            plan.sae_config,
            tc,
            lambda start: stream.batches(start=start, with_index=with_index),
            run_dir=spec.run_dir,
            on_log=lambda row: on_log(plan.name, row),
            on_checkpoint=lambda path, step: on_checkpoint(plan.name, path, step),
            progress=plan.progress,
            **extra,
        )
        return {plan.name: result}

    def heldout(spec: RunSpec) -> Any:
        def eval_stream() -> Any:
            return plan.streams(tc.seed, "eval", min(tc.batch_size, 4096))

        return lambda: end_of_run_metrics(spec.run_dir, eval_stream, plan.eval_tokens)

    try:
        final = train_runs(
            ws,
            plan.harvest or None,
            [spec],
            resume_step,
            train,
            heldout,
            lead=lead,
            on_row=None if wb is None else lambda name, row: wb.log(row),
        )[plan.name]
    except BaseException:
        if wb is not None:
            wb.finish(None, ok=False)
        raise
    if wb is not None:
        wb.finish(final, ok=True)
    return final
