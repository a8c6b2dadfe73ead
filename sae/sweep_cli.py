"""`saewb sweep`: many SAEs trained in lockstep on one pass over the activations (see `sae.sweep`)."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    import ast
    from pathlib import Path

    # The module docstring's YAML section is the reference; read with ast so --help does not import JAX.
    doc = ast.get_docstring(ast.parse((Path(__file__).parent / "sweep.py").read_text())) or ""
    fmt = doc[doc.index("YAML format") : doc.index("Resume:")].rstrip()
    p = sub.add_parser(
        "sweep",
        help="train many SAEs in lockstep on one pass over the activation stream",
        description=(
            "Train every member of a sweep file on the same batches in one pass: members that differ only in "
            "their seed (and, for TopK, in k within a factor of 2) are vmapped, the others (n, lambda, arch, hook) "
            "get their own jitted step on the same batch. "
            "Each member becomes an ordinary run (saewb runs / eval / analyze). Running the same file again "
            "resumes an interrupted sweep exactly.\n\n" + fmt
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="sweep YAML file")
    p.add_argument("--dry-run", action="store_true", help="validate and list the members, train nothing")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.set_defaults(func=_sweep)


def _sweep(args: argparse.Namespace) -> int:
    from sae.sweep import load_sweep, plan_sweep, run_sweep

    values = load_sweep(args.config)
    if args.progress is not None:
        values["progress"] = args.progress
    plan = plan_sweep(values)  # every check, before any work
    for m in plan.members:
        fields = {k: v for k, v in vars(m.sae_config).items() if v is not None}
        print(f"{m.name}: {m.sae_config.arch} on {m.hook} {json.dumps(fields)} seed={m.train_config.seed}")
    if args.dry_run:
        return 0
    finals = run_sweep(plan)
    for name, final in finals.items():
        shown = {
            k: round(final[k], 5)
            for k in ("fvu", "l0", "dead_frac", "train_fvu")
            if isinstance(final.get(k), float)
        }
        print(f"run {name!r} done: {json.dumps(shown)}")
    return 0
