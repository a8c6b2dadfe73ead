"""`saewb analyze`, `saewb mcs` and `saewb export-neuronpedia`.

saewb analyze RUN --workspace ws.duckdb [--top-n 20 --batch-size 2048 --max-tokens N --no-logits]
saewb mcs RUN_A RUN_B --workspace ws.duckdb [--json]
saewb export-neuronpedia RUN OUT_DIR --workspace ws.duckdb [--latents 0-99] [--n-top 20] [--window 8]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from saewb.workspace import existing_workspace

_INT_FLAGS = (
    "batch_size",
    "top_n",
    "n_bins",
    "n_bands",
    "samples_per_band",
    "n_neighbors",
    "n_cooc",
    "n_logits",
    "family_min_children",
    "max_tokens",
    "seed",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("analyze", help="per-latent analysis of a trained run over its harvest")
    p.add_argument("run", help="run name (see `saewb runs`)")
    p.add_argument("--workspace", required=True, help="workspace .duckdb file")
    for name in _INT_FLAGS:
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None)
    p.add_argument("--family-min-weight", dest="family_min_weight", type=float, default=None)
    p.add_argument(
        "--no-logits",
        dest="logits",
        action="store_false",
        default=None,
        help="skip the logit effect (it loads the model)",
    )
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", default=True, help="no progress bar or lines"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_analyze)

    m = subparsers.add_parser("mcs", help="cross-seed consistency: share of latents with max cosine > 0.9")
    m.add_argument("run_a")
    m.add_argument("run_b")
    m.add_argument("--workspace", required=True)
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_mcs)


def cmd_analyze(args: argparse.Namespace) -> int:
    from analysis.features import AnalyzeConfig, analyze_run

    ws = existing_workspace(args.workspace)
    overrides = {
        f.name: getattr(args, f.name)
        for f in fields(AnalyzeConfig)
        if getattr(args, f.name, None) is not None
    }
    out = analyze_run(ws, args.run, AnalyzeConfig(**overrides), progress=args.progress)
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"analysed run {out['run']!r}: {out['tokens']} tokens in {out['seconds']:.1f}s "
            f"({out['tokens_per_s']:.0f} tok/s streaming); {out['alive']}/{out['n_latents']} latents fire; "
            f"{out['families']} families; logit effect: {'yes' if out['logit_effect'] else 'no (encoder or no unembedding)'}"
        )
    return 0


def cmd_mcs(args: argparse.Namespace) -> int:
    from analysis.consistency import compare_runs

    ws = existing_workspace(args.workspace)
    out = compare_runs(ws, args.run_a, args.run_b)
    summary = {"run_a": out["run_a"], "run_b": out["run_b"], "a_to_b": out["a_to_b"], "b_to_a": out["b_to_a"]}
    if args.json:
        print(json.dumps(summary))
    else:
        for key, (x, y) in (("a_to_b", (args.run_a, args.run_b)), ("b_to_a", (args.run_b, args.run_a))):
            s = summary[key]
            print(
                f"{x} -> {y}: {s['share_above_09']:.1%} of {s['n_latents']} latents have MCS > 0.9 "
                f"(mean {s['mean_mcs']:.3f}, median {s['median_mcs']:.3f})",
                file=sys.stdout,
            )
    return 0


def register_exports(subparsers: argparse._SubParsersAction) -> None:
    """After the SAELens commands in `saewb --help`: the export of an analysed run."""
    n = subparsers.add_parser("export-neuronpedia", help="one JSON file per latent with its dashboard data")
    n.add_argument("run", help="an analysed run (`saewb analyze RUN` first)")
    n.add_argument("out_dir", type=Path)
    n.add_argument("--workspace", required=True, help="workspace .duckdb file")
    n.add_argument("--latents", help="ids and ranges, e.g. 0,5,10-20 (default: all)")
    n.add_argument("--n-top", dest="n_top", type=int, default=20, help="top contexts per latent")
    n.add_argument("--window", type=int, default=8, help="tokens either side of each activating token")
    n.set_defaults(func=cmd_export_neuronpedia)


def cmd_export_neuronpedia(args: argparse.Namespace) -> int:
    from analysis.neuronpedia import export_neuronpedia

    rec = export_neuronpedia(
        args.workspace, args.run, args.out_dir, latents=args.latents, n_top=args.n_top, window=args.window
    )
    print(
        f"wrote {rec['exported_latents']} feature files to {args.out_dir / 'features'} and {args.out_dir / 'run.json'}"
    )
    return 0
