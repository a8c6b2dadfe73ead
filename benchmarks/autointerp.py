"""Automated interpretability: time per latent and mean scores, SmolLM2 explainer vs the token baseline.

    python benchmarks/autointerp.py --workspace ws.duckdb --run demo --sample 200 --seed 0 [--explainer-url URL
        --explainer-model NAME] [--examples 5]

Explains a uniform random sample of live latents with `saewb explain`'s code (resumable: run it again
to continue, finished latents are skipped and only the remaining ones are timed), then prints
* the seconds per latent of each stage (explain, detection, fuzzing, embedding) for this run;
* the mean detection, fuzzing and embedding scores of each explainer with 95% intervals, and the
  paired LLM - baseline difference, over every sampled latent stored so far;
* `--examples N`: N explanations beside the contexts they were written from (best and worst by embedding).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import explanations, tables  # noqa: E402
from analysis.autointerp import (  # noqa: E402
    ExplainConfig,
    explain_run,
    format_summary,
    render,
    select_latents,
    summarize,
)
from analysis.llm import make_backend  # noqa: E402
from saewb.workspace import Workspace  # noqa: E402


def examples(ws: Workspace, run: str, latents: list[int], n: int) -> None:
    """The best and worst LLM explanations by embedding score, each with its top contexts."""
    scored = [
        r
        for r in explanations.score_table(ws, run)
        if r["explainer"] == "llm" and r["scorer"] == "embedding" and r["latent"] in set(latents)
    ]
    scored.sort(key=lambda r: -r["score"])
    picks = scored[: (n + 1) // 2] + scored[-(n // 2) :] if len(scored) > n else scored
    for r in picks:
        got = explanations.latent_explanations(ws, run, r["latent"])
        llm, base = got["llm"], got["baseline"]
        print(f'\n### latent {r["latent"]}: "{llm["text"]}"')
        print(
            "scores (llm / baseline): "
            + ", ".join(
                f"{k} {llm['scores'].get(k) if llm['scores'].get(k) is None else round(llm['scores'][k], 2)} / "
                f"{base['scores'].get(k) if base['scores'].get(k) is None else round(base['scores'][k], 2)}"
                for k in ("detection", "fuzzing", "embedding")
            )
        )
        print(f"baseline: {base['text']}")
        for c in tables.top_contexts(ws, run, r["latent"], kind="top", limit=4, window=6):
            print(f"    {render(c.tokens, {i for i, a in enumerate(c.acts) if a > 0})}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workspace", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--sample", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scorers", default="detection,fuzzing,embedding")
    p.add_argument("--explainer-url")
    p.add_argument("--explainer-model")
    p.add_argument("--examples", type=int, default=0)
    p.add_argument("--summary-only", action="store_true", help="print what is stored; explain nothing")
    args = p.parse_args()
    ws = Workspace(args.workspace)
    latents = select_latents(tables.latent_summary(ws, args.run), sample=args.sample, seed=args.seed)
    backend = None
    if not args.summary_only:
        backend = make_backend(args.explainer_url, args.explainer_model)
        cfg = ExplainConfig(scorers=tuple(args.scorers.split(",")), seed=args.seed)
        out = explain_run(ws, args.run, backend, cfg, latents=latents, progress=True)
        n = max(out["explained"], 1)
        print(
            f"\nrun {args.run!r}: {out['explained']} latents explained now ({out['skipped_done']} done before), "
            f"{out['prompts_sent']} prompts sent, {out['failures']} failures; cores: {os.cpu_count()}"
        )
        print(f"{'stage':<12} {'s/latent':>9}")
        for stage, sec in out["stage_seconds"].items():
            print(f"{stage:<12} {sec / n:>9.2f}")
        print(f"{'total':<12} {out['seconds_per_latent']:>9.2f}")
    model = backend.model if backend is not None else (args.explainer_model or "smollm2")
    print(f"\nmean scores over the {len(latents)} sampled latents (those stored so far):")
    print(format_summary(summarize(ws, args.run, latents, model)))
    if args.examples:
        examples(ws, args.run, latents, args.examples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
