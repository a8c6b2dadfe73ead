"""`saewb explain` and `saewb serve-llm`.

saewb explain RUN --workspace ws.duckdb [--latents 0-99 | --top-by freq --limit N | --sample 200 --seed 0]
                  [--explainer-url http://HOST:PORT/v1 --explainer-model NAME] [--scorers detection,fuzzing,embedding]
saewb serve-llm [--port 8080]
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "explain",
        help="an LLM explanation and detection/fuzzing/embedding scores for latents of an analysed run",
        description="Explain latents of an analysed run (`saewb analyze` first) with the built-in SmolLM2, or any "
        "OpenAI-compatible server with --explainer-url, and score each explanation and a token baseline. "
        "Resumable: run it again after an interruption and it continues.",
    )
    p.add_argument("run", help="run name (see `saewb runs`)")
    p.add_argument("--workspace", required=True, help="workspace .duckdb file")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--latents", help="ids and ranges, e.g. 0-99 or 3,7,10-12 (dead latents are skipped)")
    which.add_argument(
        "--top-by",
        choices=("freq", "max-act", "mean-act"),
        help="the latents (with at least 10 firings) highest in this",
    )
    which.add_argument(
        "--sample", type=int, help="a uniform random sample of this many latents with at least 10 firings"
    )
    p.add_argument(
        "--limit", type=int, help="how many latents with --top-by (or the first N with at least 10 firings)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --sample and of the context draws")
    p.add_argument(
        "--explainer-url",
        help="an OpenAI-compatible API base, e.g. http://127.0.0.1:8080/v1 "
        "(key from $SAEWB_EXPLAINER_API_KEY or $OPENAI_API_KEY); default: the built-in SmolLM2",
    )
    p.add_argument("--explainer-model", help="the model name the server serves (needed with --explainer-url)")
    p.add_argument("--scorers", default="detection,fuzzing,embedding", help="comma-separated subset")
    p.add_argument("--timeout-s", type=float, default=60.0, help="per-request timeout of the HTTP backend")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch of the built-in model")
    p.add_argument(
        "--redo",
        action="store_true",
        help="explain the selected latents again (stored answers are reused: same prompt, same answer)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", default=True)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_explain)

    s = subparsers.add_parser(
        "serve-llm", help="an OpenAI-compatible chat server on 127.0.0.1 around the built-in SmolLM2"
    )
    s.add_argument("--port", type=int, default=8080)
    s.set_defaults(func=cmd_serve_llm)


def cmd_explain(args: argparse.Namespace) -> int:
    from analysis.autointerp import ExplainConfig, explain_selected, format_summary

    scorers = tuple(s.strip() for s in args.scorers.split(",") if s.strip())
    out = explain_selected(
        args.workspace,
        args.run,
        ExplainConfig(scorers=scorers, seed=args.seed),
        latents=args.latents,
        top_by=args.top_by,
        limit=args.limit,
        sample=args.sample,
        explainer_url=args.explainer_url,
        explainer_model=args.explainer_model,
        timeout_s=args.timeout_s,
        batch_size=args.batch_size,
        redo=args.redo,
        progress=args.progress,
    )
    if args.json:
        print(json.dumps(out))
        return 0
    print(
        f"explained {out['explained']} latents of {args.run!r} ({out['skipped_done']} already done) in "
        f"{out['seconds']:.1f}s, {out['seconds_per_latent']:.2f}s per latent; {out['prompts_sent']} prompts sent, "
        f"{out['cache_hits']} answered from the cache; {out['failures']} failures recorded"
    )
    print(format_summary(out["summary"]))
    return 0


def cmd_serve_llm(args: argparse.Namespace) -> int:
    from analysis.llm import LocalChat
    from analysis.llm_server import make_server

    local = LocalChat()
    server = make_server(local.chat, port=args.port)
    host, port = server.server_address[:2]
    print(f"serving {local.model} at http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
