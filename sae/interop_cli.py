"""`saewb export-saelens` and `saewb import-saelens` (`saewb export-neuronpedia` is in analysis/analyze_cli.py).

saewb export-saelens RUN OUT_DIR --workspace ws.duckdb
saewb import-saelens DIR --workspace ws.duckdb --name NAME [--hook HOOK] [--harvest H]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    e = subparsers.add_parser(
        "export-saelens", help="write a run as an SAELens directory (cfg.json + weights)"
    )
    e.add_argument("run", help="run name (see `saewb runs`)")
    e.add_argument("out_dir", type=Path, help="new (or empty) directory to write")
    e.add_argument("--workspace", required=True, help="workspace .duckdb file")
    e.set_defaults(func=cmd_export_saelens)

    i = subparsers.add_parser(
        "import-saelens", help="register an SAELens directory (e.g. GemmaScope) as a run"
    )
    i.add_argument("dir", type=Path, help="folder with cfg.json and sae_weights.safetensors")
    i.add_argument("--workspace", required=True, help="workspace .duckdb file holding the harvested hook")
    i.add_argument("--name", required=True, help="run name to create")
    i.add_argument("--hook", help="harvested hook the SAE reads (default: cfg.json metadata.hook_name)")
    i.add_argument("--harvest", help="harvest name (default: the workspace's only harvest)")
    i.set_defaults(func=cmd_import_saelens)


def cmd_export_saelens(args: argparse.Namespace) -> int:
    from sae.interop import export_run

    out = export_run(args.workspace, args.run, args.out_dir)
    print(f"exported run {args.run!r} to {out} (load it with sae_lens: SAE.load_from_disk({str(out)!r}))")
    return 0


def cmd_import_saelens(args: argparse.Namespace) -> int:
    from sae.interop import import_saelens

    row = import_saelens(args.dir, args.workspace, args.name, hook=args.hook, harvest=args.harvest)
    print(
        f"imported {args.dir} as run {args.name!r} ({row.get('arch')}, hook {row.get('hook')}); "
        f"next: `saewb eval {args.name} --workspace {args.workspace}` and `saewb analyze ...`"
    )
    return 0
