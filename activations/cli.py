"""`saewb harvest`, `saewb export-parquet`, `saewb sql` and `saewb hooks`."""

from __future__ import annotations

import argparse

from activations.harvest import HarvestConfig


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" unless the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        return text if "(default" in text else super()._get_help_string(action)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "harvest",
        help="cache a model's hidden states over a corpus into a DuckDB workspace",
        description=(
            "Run a TransformerLens model over a corpus and store the activations at the chosen hooks, "
            "with token ids, token strings and document positions, in a workspace: the DuckDB file is the "
            "catalogue, the activations go to shard files in <workspace>.acts/ beside it (float16 by default). "
            "Interrupted harvests resume where they stopped when the same command is run again."
        ),
        formatter_class=DefaultsHelp,
    )
    d = HarvestConfig()
    p.add_argument("--workspace", required=True, help="workspace file (created if missing), e.g. ws.duckdb")
    p.add_argument(
        "--model",
        default=d.model,
        help="HF name (cached or downloadable), local model folder, or a built-in: `minilm`, `tiny-lm`, `smollm2`",
    )
    p.add_argument(
        "--corpus",
        default=d.corpus,
        help="built in: `stdlib-docs` (stdlib docstrings, 1 MB) or `python-code` (the stdlib's and installed packages' "
        "source); or a .txt / .jsonl / .parquet file or a datasets folder",
    )
    p.add_argument(
        "--hook",
        action="append",
        dest="hooks",
        metavar="HOOK",
        help="hook point to capture; repeat for several (default: blocks.2.hook_out)",
    )
    p.add_argument(
        "--ctx-len", type=int, default=d.ctx_len, help="tokens per context window, special tokens included"
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="stop at the first window boundary at or past this many tokens (default: whole corpus)",
    )
    p.add_argument("--name", default=d.name, help="harvest name inside the workspace")
    p.add_argument(
        "--text-column", default=d.text_column, help="text column of JSONL / Parquet / datasets corpora"
    )
    p.add_argument(
        "--whole-file",
        action="store_true",
        help="plain-text corpus: the whole file is one document (default: one per line)",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="JSONL corpus of {messages: [{role, content}]} rendered with the model's chat template",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per forward pass")
    p.add_argument(
        "--commit-tokens",
        type=int,
        default=d.commit_tokens,
        help="tokens per commit (the most an interruption can lose)",
    )
    p.add_argument("--device", default=d.device, help="torch device, e.g. cpu or cuda")
    p.add_argument(
        "--shard",
        default=None,
        metavar="i/N",
        help="harvest only shard i of N (0 <= i < N): documents are split by a hash of their text, "
        "so N hosts can harvest disjoint shards into their own workspaces",
    )
    p.add_argument(
        "--nonfinite",
        choices=("refuse", "skip"),
        default=d.nonfinite,
        help="activation rows with NaN/inf: refuse stops naming the documents; skip stores them as zeros, "
        "listed in the nonfinite_tokens table, and training leaves them out",
    )
    p.add_argument(
        "--store-dtype",
        choices=("float16", "bfloat16", "float32"),
        default=None,
        help="how activations are stored on disk (read back as float32): float16 halves the bytes for under "
        "0.001 held-out FVU (docs/storage.md); bfloat16 for models whose activations pass 65504 "
        "(default: float16, or the stored harvest's when resuming)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_harvest)

    e = sub.add_parser(
        "export-parquet",
        help="write a harvest's tokens, documents and activations as Parquet files",
        description=(
            "Copy one harvest of a workspace into OUT_DIR as Parquet (DuckDB COPY): tokens.parquet, "
            "documents.parquet, one act__<hook>.parquet per hook (x as a list of d floats) and harvest.json. "
            "`saewb train --workspace OUT_DIR` and the training stream read the directory (local or object "
            "storage) like a workspace."
        ),
        formatter_class=DefaultsHelp,
    )
    e.add_argument("workspace", help="workspace file holding the harvest")
    e.add_argument("out_dir", help="output directory (created; must not already hold an export)")
    e.add_argument("--harvest", default=None, help="harvest name (default: the workspace's only harvest)")
    e.set_defaults(func=_export)

    q = sub.add_parser(
        "sql",
        help="run one read-only SQL query on a workspace (activations included) and print its rows",
        description=(
            "Every table of the workspace (tokens, documents, runs, metrics, ...) and every hook's activations "
            "as act__<harvest>__<hook> (tok_idx, x FLOAT[d]), read from the shard files on demand. "
            'Example: saewb sql ws.duckdb "SELECT count(*) FROM act__default__blocks_2_hook_out"'
        ),
        formatter_class=DefaultsHelp,
    )
    q.add_argument("workspace", help="workspace file")
    q.add_argument("query", help="one SQL statement (read-only)")
    q.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    q.add_argument("--max-rows", type=int, default=50, help="rows shown in a table (all with --csv)")
    q.set_defaults(func=_sql)

    h = sub.add_parser(
        "hooks", help="list a model's hook points", description="List the canonical hook names of a model."
    )
    h.add_argument(
        "--model",
        default=d.model,
        help="HF name, local folder or a built-in (`minilm`, `tiny-lm`, `smollm2`)",
    )
    h.set_defaults(func=_hooks)


def _harvest(args: argparse.Namespace) -> int:
    from activations.harvest import parse_shard, run_harvest
    from activations.store import nonfinite_counts
    from saewb.workspace import Workspace

    shard = parse_shard(args.shard) if args.shard is not None else None  # before the model loads
    cfg = HarvestConfig(
        model=args.model,
        corpus=args.corpus,
        hooks=tuple(args.hooks or HarvestConfig.hooks),
        ctx_len=args.ctx_len,
        max_tokens=args.max_tokens,
        name=args.name,
        text_column=args.text_column,
        doc_per_line=not args.whole_file,
        chat=args.chat,
        batch_size=args.batch_size,
        commit_tokens=args.commit_tokens,
        device=args.device,
        shard=shard,
        nonfinite=args.nonfinite,
        store_dtype=args.store_dtype,
    )
    info = run_harvest(cfg, args.workspace, progress=not args.quiet)
    hooks = ", ".join(f"{h} (d={d})" for h, d in info.hooks.items())
    print(
        f"harvest {info.name!r}: {info.n_tokens} tokens, {info.n_docs} documents, hooks {hooks} -> {args.workspace}"
    )
    skipped = nonfinite_counts(Workspace(args.workspace), info.name)
    if skipped:
        counts = ", ".join(f"{h}: {n}" for h, n in skipped.items())
        print(
            f"non-finite activation rows stored as zeros and left out of training ({counts}); see nonfinite_tokens"
        )
    return 0


def _export(args: argparse.Namespace) -> int:
    from activations.store import export_parquet

    manifest = export_parquet(args.workspace, args.out_dir, args.harvest)
    files = ", ".join(
        [manifest["tokens"], manifest["documents"], *(h["file"] for h in manifest["hooks"].values())]
    )
    print(f"harvest {manifest['name']!r}: {manifest['n_tokens']} tokens -> {args.out_dir} ({files})")
    return 0


def _sql(args: argparse.Namespace) -> int:
    import sys

    from saewb.api import sql

    frame = sql(args.workspace, args.query)
    if args.csv:
        frame.to_csv(sys.stdout, index=False)
    else:
        print(frame.to_string(max_rows=args.max_rows, index=False))
    return 0


def _hooks(args: argparse.Namespace) -> int:
    from activations.models import list_hooks, load_model

    model = load_model(args.model)
    for name in list_hooks(model):
        print(name)
    return 0
