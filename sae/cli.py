"""`saewb train` and `saewb runs`.

    saewb train --workspace ws.duckdb --hook blocks.3.hook_out --arch topk --n-latents 4096 --k 32 \
        --train-tokens 2000000 --batch-size 4096 --seed 0 --name my-run
    saewb train --config run.yaml          # YAML keys = the flag names (dashes or underscores)
    saewb runs --workspace ws.duckdb

Every check (unknown field, k > n, hook not in the harvest, d mismatch, unknown arch, a different
config under an existing name) runs before any work. Running the same --name with the same config
resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
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
DISTRIBUTED_KEYS = ("coordinator", "num_processes", "process_id")
"""Keys that say how this process joins a multi-process run (``sae.distributed``)."""


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def _int_tuple(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in v.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {v!r}") from None


def _float_tuple(v: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in v.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {v!r}") from None


_SCALAR_TYPES: dict[Any, Any] = {
    int: int,
    float: float,
    bool: _bool,
    str: str,
    tuple[int, ...]: _int_tuple,
    tuple[float, ...]: _float_tuple,
}


def _flag_type(hint: Any) -> tuple[Any, tuple[str, ...] | None]:
    """A field's type hint → (argparse type, choices); ``X | None`` parses as X, ``Literal`` gives choices."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if typing.get_origin(hint) is typing.Literal:
        return str, typing.get_args(hint)
    if hint not in _SCALAR_TYPES:
        raise TypeError(f"no CLI type for {hint!r}")
    return _SCALAR_TYPES[hint], None


@dataclasses.dataclass(frozen=True)
class ConfigFlag:
    """One config field as a `saewb train` flag."""

    type: Any
    choices: tuple[str, ...] | None
    help: str


def config_flags() -> dict[str, ConfigFlag]:
    """Every config field → its flag, from the dataclasses in `sae.configs` (no JAX import).

    The trainer's fields come first; an architecture's help is prefixed with its name. A field
    shared by several architectures keeps the first docstring found.
    """
    from sae.configs import ARCH_CONFIGS, TrainConfig, field_docs

    out: dict[str, ConfigFlag] = {}
    for owner, cls in (("", TrainConfig), *((f"{a}: ", c) for a, c in ARCH_CONFIGS.items())):
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            try:
                typ, choices = _flag_type(hints[f.name])
            except TypeError as e:
                raise TypeError(f"{cls.__name__}.{f.name}: {e}") from None
            text = owner + docs[f.name].replace("%", "%%") if f.name in docs else ""  # argparse formats %
            out.setdefault(f.name, ConfigFlag(typ, choices, text))
    return out


FLAG_TYPES: dict[str, Any] = {name: flag.type for name, flag in config_flags().items()}
"""Every config field as a flag; a test checks it against the imported dataclasses."""


def _arch_names() -> list[str]:
    from sae.archs import ARCH_MODULES

    return list(ARCH_MODULES)


def _all_fields() -> dict[str, dataclasses.Field]:
    from sae.base import registry
    from sae.trainer import TrainConfig

    out: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for mod in registry().values():
        for f in dataclasses.fields(mod.Config):
            out.setdefault(f.name, f)
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train (or resume) an SAE on a harvested hook, or on a model's activations on the fly"
    )
    p.add_argument("--config", type=Path, help="YAML file; its keys are these flags' names")
    p.add_argument(
        "--workspace",
        action="append",
        default=None,
        help="workspace .duckdb file; repeat to train on a set (shards of one harvest, Parquet exports): "
        "the first must be a workspace file and holds the run",
    )
    p.add_argument("--hook", help="hook to train on (must be in the harvest)")
    p.add_argument(
        "--from-model",
        dest="from_model",
        metavar="MODEL",
        help="train on activations computed by MODEL while training, with no harvest (the workspace holds only "
        "the run): corpus windows as `saewb harvest` cuts them, the same shuffling buffer, resumable",
    )
    p.add_argument("--corpus", help="with --from-model: the corpus (as for `saewb harvest`; default stdlib-docs)")
    p.add_argument("--ctx-len", dest="ctx_len", type=int, help="with --from-model: tokens per window (default 128)")
    p.add_argument(
        "--model-batch-size", dest="model_batch_size", type=int, help="with --from-model: windows per forward pass (default 32)"
    )
    p.add_argument(
        "--shuffle-tokens",
        dest="shuffle_tokens",
        type=int,
        help="with --from-model: tokens per shuffling buffer (default 131072, the cached stream's buffer)",
    )
    p.add_argument("--device", help="with --from-model: torch device of the model (default cpu)")
    p.add_argument("--harvest", help="harvest name (default: the workspace's only harvest)")
    p.add_argument("--arch", help="architecture: " + ", ".join(_arch_names()))
    p.add_argument("--name", help="run name; the same name + config resumes")
    p.add_argument(
        "--d-in", dest="d_in", type=int, help="expected activation width (checked against the harvest)"
    )
    p.add_argument("--eval-tokens", dest="eval_tokens", type=int, help="held-out tokens for final metrics")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument(
        "--wandb",
        action="store_true",
        default=None,
        help="also log the metric rows to Weights & Biases (needs `pip install wandb`)",
    )
    p.add_argument("--wandb-project", dest="wandb_project", help="W&B project (default: saewb)")
    p.add_argument(
        "--coordinator",
        help="several processes (hosts): process 0's host:port, or 'auto' to let JAX "
        "detect the cluster (TPU pod slices, SLURM); env SAEWB_COORDINATOR. See docs/scaling.md",
    )
    p.add_argument(
        "--num-processes",
        dest="num_processes",
        type=int,
        help="several processes: how many (env SAEWB_NUM_PROCESSES)",
    )
    p.add_argument(
        "--process-id",
        dest="process_id",
        type=int,
        help="several processes: this one's index; process 0 writes the run (env SAEWB_PROCESS_ID)",
    )
    for name, flag in config_flags().items():
        p.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=flag.type,
            choices=flag.choices,
            metavar=name.upper(),  # as without choices: the help text names the values
            default=None,
            help=flag.help or None,
        )
    p.set_defaults(func=cmd_train)

    r = subparsers.add_parser("runs", help="list training runs and their final metrics")
    r.add_argument("--workspace", required=True)
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")
    r.set_defaults(func=cmd_runs)


@dataclasses.dataclass
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

            return ActivationStream(self.data(), self.hook, harvest=self.harvest, batch_size=size, seed=seed, split=split)
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
    known = set(RUN_KEYS) | train_fields | set(_all_fields())
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
    values: dict[str, Any], workspace: Path, hook: str, harvest: str, d: int, sae_cfg: Any, tc: Any, **data: Any
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
    from activations.store import check_name
    from sae.base import validate_config
    from saewb.workspace import Workspace

    if len(as_list(values["workspace"])) > 1:
        raise ValueError("--from-model trains without a harvest: give one --workspace (it holds the run)")
    live = live_settings({k: values.get(k) for k in LIVE_KEYS if k != "from_model"} | {"model": values["from_model"]})
    check_name(str(values["name"]), "run name")
    ws = Workspace(as_list(values["workspace"])[0])
    plan = _plan(values, ws.path, str(values["hook"]), "", 0, sae_cfg, tc, live=live)
    source = live_source(plan)
    hook = source.hook(plan.hook)
    d = int(source.widths[hook])
    if "d_in" in values and int(values["d_in"]) != d:
        raise ValueError(f"d_in={values['d_in']} but hook {hook!r} of model {live['model']!r} has width {d}")
    validate_config(sae_cfg, d)
    return dataclasses.replace(plan, hook=hook, d=d)


def as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


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

    from sae.lifecycle import heldout_metrics
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

        return lambda: heldout_metrics(spec.run_dir, eval_stream, plan.eval_tokens)

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


def cmd_train(args: argparse.Namespace) -> int:
    cli_values = {
        k: v
        for k, v in vars(args).items()
        if k not in ("func", "command", "config", "debug") and v is not None
    }
    from sae.orchestrate import load_yaml

    values = load_yaml(args.config, "config file") if args.config else {}
    values.update(cli_values)
    from sae import distributed

    joined = {k: values.pop(k, None) for k in DISTRIBUTED_KEYS}
    distributed.initialize(joined["coordinator"], joined["num_processes"], joined["process_id"])
    plan = plan_from_values(values)
    final = run_plan(plan)
    shown = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in final.items()}
    print(f"run {plan.name!r} done: {json.dumps(shown)}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from sae import runs
    from saewb.workspace import Workspace

    rows = runs.list_runs(Workspace(args.workspace))
    if args.json:
        print(json.dumps(rows, default=str, indent=1))
        return 0
    if not rows:
        print("no runs yet; start one with `saewb train`")
        return 0
    head = f"{'name':<24} {'arch':<8} {'hook':<22} {'status':<9} {'fvu':>7} {'l0':>7} {'dead':>6}"
    print(head)
    for r in rows:
        m = r["final_metrics"] or {}

        def num(key: str, fmt: str, m: dict = m) -> str:
            v = m.get(key, m.get(f"train_{key}"))
            return format(v, fmt) if isinstance(v, int | float) else "-"

        print(
            f"{r['name']:<24} {r['arch']:<8} {str(r['hook']):<22} {r['status']:<9} "
            f"{num('fvu', '7.4f')} {num('l0', '7.1f')} {num('dead_frac', '6.3f')}"
            + (f"  ({r['reason']})" if r.get("reason") and r["status"] == "failed" else "")
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
