"""Example latents of an analysed causal-LM run: top contexts, logit effects and one steering example.

Picks ``--n`` latents at random (``--seed``) among those firing on between ``--min-freq`` and
``--max-freq`` of the analysed tokens (neither the dead nor the dense ones), prints each with its top
contexts (firing tokens marked ``<<tok>>`` with the activation) and the tokens its decoder row promotes
and suppresses most through the unembedding; then steers the first of them (adds coeff·W_dec[latent] at
the run's hook on every position) on ``--prompt`` and prints the greedy generations before and after.
The coefficient defaults to ``--coeff-x`` times the latent's largest activation.

    python benchmarks/latent_examples.py --workspace ws.duckdb --run my-run --prompt "def load(path):"

Markdown tables, for docs/models.md. Runs ``saewb analyze`` first when the run has no analysis.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def pick_latents(latents: Any, n: int, seed: int, min_freq: float, max_freq: float) -> list[int]:
    import numpy as np

    live = latents[(latents["freq"] >= min_freq) & (latents["freq"] <= max_freq)]
    ids = sorted(int(i) for i in live["latent"])
    if len(ids) < n:
        raise SystemExit(
            f"only {len(ids)} latents fire on {min_freq:g} to {max_freq:g} of tokens; widen the range"
        )
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(ids, size=n, replace=False))


def context_text(ctx: Any, max_tokens: int = 24) -> str:
    words = []
    for tok, act in zip(ctx.tokens, ctx.acts, strict=True):
        t = tok.replace("\n", "⏎").replace("|", "\\|").replace("`", "'")
        words.append(f"<<{t}>>{act:.1f}" if act > 0 else t)
    return "".join(words[:max_tokens])


def effects(tokens: list[str], values: list[float], n: int = 6) -> str:
    return ", ".join(f"`{t!r}` {v:+.2f}" for t, v in zip(tokens[:n], values[:n], strict=False))


def show_latent(analysis: Any, latent: int, n_contexts: int) -> None:
    lat = analysis.latent(latent, window=8, limit=n_contexts)
    s = lat.stats
    pos, neg = effects(s["logit_pos_tokens"], s["logit_pos"]), effects(s["logit_neg_tokens"], s["logit_neg"])
    print(f"\n### latent {latent}: fires on {s['freq']:.3%} of tokens, max activation {s['max_act']:.2f}\n")
    print("| activation | context (firing tokens `<<tok>>act`) |")
    print("|---:|---|")
    for c in lat.contexts:
        print(f"| {c.value:.2f} | `{context_text(c)}` |")
    print(f"\nlogit effects (W_dec row through the unembedding): promotes {pos}; suppresses {neg}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", type=Path, required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--n", type=int, default=3, help="latents to show")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-freq", type=float, default=1e-4)
    p.add_argument("--max-freq", type=float, default=1e-2)
    p.add_argument("--contexts", type=int, default=5)
    p.add_argument("--prompt", default="def read_config(path):\n    ")
    p.add_argument("--steer-latent", type=int, default=None, help="default: the first latent shown")
    p.add_argument("--coeff-x", type=float, default=2.0, help="coeff = this × the latent's max activation")
    p.add_argument("--generate", type=int, default=32)
    p.add_argument(
        "--analyze-tokens",
        type=int,
        default=None,
        help="tokens `saewb analyze` reads when it runs (default: all)",
    )
    a = p.parse_args()

    import saewb
    from analysis.tables import analysed_runs
    from saewb.workspace import Workspace

    if a.run in analysed_runs(Workspace(a.workspace)):
        analysis = saewb.load(a.workspace, a.run).analysis()
    else:
        analysis = saewb.analyze(a.workspace, a.run, max_tokens=a.analyze_tokens)
    picked = pick_latents(analysis.latents, a.n, a.seed, a.min_freq, a.max_freq)
    for i in picked:
        show_latent(analysis, i, a.contexts)

    target = a.steer_latent if a.steer_latent is not None else picked[0]
    coeff = a.coeff_x * float(analysis.latents.set_index("latent").loc[target, "max_act"])
    r = saewb.intervene(a.workspace, a.run, a.prompt, steer={target: coeff}, generate=a.generate).result
    print(f"\n### steering latent {target} (coeff {coeff:.2f} = {a.coeff_x:g} × its max activation)\n")
    print(f"prompt: `{a.prompt!r}`\n")
    print("| | greedy continuation |")
    print("|---|---|")
    for label, text in (("clean", r.generated_clean), ("steered", r.generated_edited)):
        print(f"| {label} | `{text.replace(chr(10), '⏎').replace('|', chr(92) + '|')}` |")


if __name__ == "__main__":
    main()
