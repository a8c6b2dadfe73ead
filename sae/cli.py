"""`saewb train` and `saewb runs` (the checks and the run itself: ``sae.orchestrate.plan_from_values``, ``run_plan``).

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

from sae.orchestrate import RUN_KEYS, TrainPlan, plan_from_values, run_plan

__all__ = ["RUN_KEYS", "TrainPlan", "plan_from_values", "run_plan"]  # their home is sae.orchestrate

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


EXPLICIT_NONE: Any = object()
"""A flag given as "none": None for the config, where a flag left out (None) means its default."""


def _or_none(parse: Any) -> Any:
    """``parse``, with "none" for None (``--outlier-ratio none``)."""

    def parse_or_none(text: str) -> Any:
        return EXPLICIT_NONE if text.strip().lower() == "none" else parse(text)

    parse_or_none.__name__ = getattr(parse, "__name__", "value")  # argparse names it in errors
    return parse_or_none


def _flag_type(hint: Any) -> tuple[Any, tuple[str, ...] | None]:
    """A field's type hint → (argparse type, choices); ``X | None`` parses as X or "none", ``Literal``
    gives choices."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1
    if optional:
        hint = args[0]
    if typing.get_origin(hint) is typing.Literal:
        return str, typing.get_args(hint)
    if hint not in _SCALAR_TYPES:
        raise TypeError(f"no CLI type for {hint!r}")
    return (_or_none(_SCALAR_TYPES[hint]) if optional else _SCALAR_TYPES[hint]), None


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
    p.add_argument(
        "--corpus", help="with --from-model: the corpus (as for `saewb harvest`; default stdlib-docs)"
    )
    p.add_argument(
        "--ctx-len", dest="ctx_len", type=int, help="with --from-model: tokens per window (default 128)"
    )
    p.add_argument(
        "--model-batch-size",
        dest="model_batch_size",
        type=int,
        help="with --from-model: windows per forward pass (default 32)",
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


def cmd_train(args: argparse.Namespace) -> int:
    cli_values = {
        k: None if v is EXPLICIT_NONE else v
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
