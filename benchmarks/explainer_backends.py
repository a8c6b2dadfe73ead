"""The built-in explainer through transformers (what `saewb explain` uses) against llama-cpp-python on the
GGUF file itself, on the same prompts: explanations (greedy generation) and Yes/No scoring prompts.

Prompts are the real ones of `saewb explain` for ``--latents`` latents sampled from an analysed run:
one explanation prompt per latent, and the detection prompts (4 activating + 4 non-activating contexts,
each with the token baseline's explanation). Each backend answers them all; the table gives the seconds,
the seconds per latent of the whole explain + detection + fuzzing workload (fuzzing has as many
prompts as detection), and how often the two backends agree.

llama-cpp-python has no wheel on the package index here; build it (about half an hour on 2 cores):
``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON" pip install llama-cpp-python`` (a native build emits
AMX tile instructions, which this VM's kernel refuses: "Illegal instruction"). Installing it adds files
to site-packages, so the `python-code` corpus changes and a harvest of it refuses to resume until it is
uninstalled. Without it the script measures transformers alone and says so.

    python benchmarks/explainer_backends.py --workspace ws.duckdb --run my-run --latents 16 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


class LlamaCppChat:
    """SmolLM2 through llama-cpp-python on the bundled Q4_1 GGUF; the prompt text comes from the same
    chat template (the Hugging Face tokenizer's), so both backends read identical tokens."""

    def __init__(self, gguf: Path, tokenizer: Any, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_batch=512, verbose=False)
        self.tokenizer = tokenizer

    def _text(self, chat: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)

    def chat(self, chats: list[list[dict[str, str]]], max_tokens: int) -> list[str]:
        out = []
        for chat in chats:
            r = self.llm.create_completion(self._text(chat), max_tokens=max_tokens, temperature=0.0, top_k=1)
            out.append(r["choices"][0]["text"].strip())
        return out

    def choose(self, chats: list[list[dict[str, str]]], options: list[str]) -> list[str]:
        """The option whose first token is likelier as the answer's first token (one greedy token with
        the options' tokens boosted far above every other token)."""
        first = [self.tokenizer.encode(o, add_special_tokens=False)[0] for o in options]
        by_id = dict(zip(first, options, strict=True))
        out = []
        for chat in chats:
            r = self.llm.create_completion(
                self._text(chat), max_tokens=1, temperature=0.0, top_k=1, logit_bias={i: 100.0 for i in first}
            )
            tok = self.tokenizer.encode(r["choices"][0]["text"], add_special_tokens=False)
            out.append(by_id.get(tok[0], options[0]) if tok else options[0])
        return out


def build_prompts(ws_path: Path, run: str, n_latents: int, seed: int) -> tuple[list[Any], list[Any]]:
    from analysis import tables
    from analysis.autointerp import (
        ExplainConfig,
        baseline_explanation,
        detection_prompt,
        explain_prompt,
        gather_contexts,
        select_latents,
    )
    from saewb.workspace import Workspace

    ws = Workspace(ws_path)
    cfg = ExplainConfig()
    latents = select_latents(tables.latent_summary(ws, run), sample=n_latents, seed=seed)
    pool = tables.random_windows(ws, run, cfg.pool, seed=cfg.seed, window=cfg.window)
    explain, detect = [], []
    for lc in gather_contexts(ws, run, latents, pool, cfg):
        explain.append(explain_prompt(lc.shown))
        text = baseline_explanation(lc.shown)
        for c in lc.held_out[: cfg.n_score] + lc.negatives[: cfg.n_score]:
            detect.append(detection_prompt(text, c))
    return explain, detect


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", type=Path, required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--latents", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3, help="timed passes per backend (the median is shown)")
    a = p.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from activations.models import smollm2_gguf
    from analysis.autointerp import ExplainConfig
    from analysis.llm import LocalChat

    explain, detect = build_prompts(a.workspace, a.run, a.latents, a.seed)
    max_tokens = ExplainConfig().explain_tokens
    local = LocalChat()
    backends: dict[str, Any] = {"transformers (float32, batch 16)": local}
    try:
        backends["llama-cpp-python (Q4_1 GGUF)"] = LlamaCppChat(smollm2_gguf(), local.tokenizer, a.threads)
    except ImportError:
        print("llama-cpp-python is not installed: measuring transformers only", file=sys.stderr)

    rows, answers = [], {}
    for name, b in backends.items():
        b.chat(explain[:2], max_tokens)  # warm up
        gen, score = [], []
        for _ in range(a.repeats):
            t_gen, texts = timed(b.chat, explain, max_tokens)
            t_score, picks = timed(b.choose, detect, ["Yes", "No"])
            gen.append(t_gen)
            score.append(t_score)
        answers[name] = (texts, picks)
        g, s = statistics.median(gen), statistics.median(score)
        per_latent = (g + 2 * s) / len(explain)  # explain + detection + fuzzing (as many prompts)
        rows.append((name, g, s, per_latent))

    print(
        f"\n{len(explain)} latents of {a.run!r}: {len(explain)} explanation prompts ({max_tokens} new tokens at most), "
        f"{len(detect)} Yes/No prompts; {a.threads} threads; median of {a.repeats}\n"
    )
    print("| backend | explanations s | Yes/No prompts s | s per latent (explain + detection + fuzzing) |")
    print("|---|---:|---:|---:|")
    for name, g, s, per in rows:
        print(f"| {name} | {g:.1f} | {s:.1f} | {per:.2f} |")
    if len(answers) == 2:
        (ta, pa), (tb, pb) = answers.values()
        same_text = sum(x.strip() == y.strip() for x, y in zip(ta, tb, strict=True))
        same_pick = sum(x == y for x, y in zip(pa, pb, strict=True))
        print(
            f"\nagreement: {same_text}/{len(ta)} explanations identical, {same_pick}/{len(pa)} Yes/No answers the same"
        )
        for x, y in list(zip(ta, tb, strict=True))[:4]:
            print(f"- transformers: {x!r}\n  llama.cpp:    {y!r}")


if __name__ == "__main__":
    main()
