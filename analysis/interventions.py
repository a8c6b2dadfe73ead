"""Interventions on SAE latents in one hooked forward pass: ablate, clamp or scale latents, with or
without the error term, and steer by adding `coeff · W_dec[i]` at the SAE's hook.

Causal LMs: next-token logits and top-k side by side, per-token logit differences, and greedy or
seeded sampled generation with and without the edit. Encoders: the change in the query's embedding
similarity to candidate texts (semantic-search steering).

The edit is applied to the prompt's non-special tokens (the positions the SAE was trained on).
Hooks live only inside `analysis.splice.hooked`, so they are gone after every call, raising or not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from activations.models import UnknownHookError, canonical_hook
from analysis.evaluate import is_causal_lm, sentence_embeddings
from analysis.runs import RunContext
from analysis.splice import LatentEdit, Steering, hooked, sae_hook_fn, validate_edits


@dataclass
class Intervention:
    """What to do at the SAE's hook."""

    edits: Sequence[LatentEdit] = ()
    steering: Sequence[Steering] = ()
    error_term: bool = True
    """Keep x − x̂ so that only the edit changes the model (without an edit: the exact model)."""

    def validate(self, sae: Any) -> None:
        validate_edits(sae, self.edits, self.steering)


@dataclass
class LMResult:
    """An intervention's effect on a causal LM, clean and edited side by side."""

    tokens: list[str]
    top_clean: list[tuple[str, float]]
    """Top-k next tokens after the prompt as (token, probability), clean model."""
    top_edited: list[tuple[str, float]]
    logit_diff: list[dict[str, Any]]
    """Per prompt position: the actual next token and its logit clean vs edited."""
    max_abs_logit_diff: float
    logits_clean: np.ndarray = field(repr=False)
    """[pos, vocab] logits of the prompt."""
    logits_edited: np.ndarray = field(repr=False)
    generated_clean: str = ""
    generated_edited: str = ""


@dataclass
class SearchResult:
    """Similarity of the query to each candidate, clean vs with the edit applied to the query."""

    rows: list[dict[str, Any]]


def check_hook(model: Any, ctx: RunContext, hook: str | None) -> str:
    """The hook to splice at; any hook other than the one the SAE was trained on is an error."""
    if hook is None:
        return ctx.hook
    try:
        name = canonical_hook(model, hook)
    except UnknownHookError as err:
        raise ValueError(f"{err} The SAE of run {ctx.name!r} was trained on {ctx.hook}.") from err
    if name != ctx.hook:
        raise ValueError(
            f"the SAE of run {ctx.name!r} was trained on {ctx.hook}, not {hook}; splice it there "
            f"(omit --hook) or train an SAE on {hook}"
        )
    return name


def _prompt_ids(model: Any, prompt: str | Sequence[int]) -> Any:
    import torch

    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("the prompt is empty; pass some text")
        if is_causal_lm(model):
            return model.to_tokens(prompt)  # prepends BOS, as the harvester's windows do
        return torch.tensor([model.tokenizer(prompt)["input_ids"]], dtype=torch.long)
    ids = torch.tensor([list(prompt)], dtype=torch.long)
    if ids.numel() == 0:
        raise ValueError("the prompt has no tokens")
    return ids


def _splice_mask(model: Any, ids: Any) -> Any:
    import torch

    special = torch.tensor(sorted(set(model.tokenizer.all_special_ids)), dtype=torch.long)
    return ~torch.isin(ids, special)


def _edited_hooks(
    model: Any, ctx: RunContext, hook: str, iv: Intervention, ids: Any
) -> list[tuple[str, Any]]:
    fn = sae_hook_fn(
        ctx.sae, error_term=iv.error_term, edits=iv.edits, steering=iv.steering, mask=_splice_mask(model, ids)
    )
    return [(hook, fn)]


def run_logits(model: Any, ids: Any, hooks: list[tuple[str, Any]] | None = None) -> np.ndarray:
    """Logits [batch, pos, vocab] (float32 numpy) of one forward pass with the given hooks."""
    with hooked(model, hooks or []):
        return model(ids).detach().float().numpy()


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def generate_ids(
    model: Any, ids: Any, n: int, hooks_for: Any, do_sample: bool, temperature: float, seed: int
) -> list[int]:
    """Greedy or seeded sampling, a full forward per step so the hooks see every position."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    cur = ids
    for _ in range(n):
        logits = torch.from_numpy(run_logits(model, cur, hooks_for(cur))[0, -1].astype(np.float64))
        if do_sample:
            probs = torch.softmax(logits / max(temperature, 1e-6), -1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        else:
            nxt = int(logits.argmax())
        out.append(nxt)
        cur = torch.cat([cur, torch.tensor([[nxt]], dtype=cur.dtype)], dim=1)
    return out


def intervene_lm(
    model: Any,
    ctx: RunContext,
    prompt: str | Sequence[int],
    iv: Intervention,
    *,
    hook: str | None = None,
    top_k: int = 10,
    max_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
) -> LMResult:
    """Run a prompt clean and edited; compare next-token predictions and (optionally) generations."""
    if not is_causal_lm(model):
        raise ValueError(
            "this model has no next-token head; use `semantic_search` (--candidate) for encoders"
        )
    hook = check_hook(model, ctx, hook)
    iv.validate(ctx.sae)
    ids = _prompt_ids(model, prompt)
    clean = run_logits(model, ids)[0]
    edited = run_logits(model, ids, _edited_hooks(model, ctx, hook, iv, ids))[0]
    tok = model.tokenizer
    strs = [tok.decode([i]) for i in ids[0].tolist()]

    def top(logits: np.ndarray) -> list[tuple[str, float]]:
        p = _softmax(logits.astype(np.float64))
        order = np.argsort(-p, kind="stable")[:top_k]
        return [(tok.decode([int(i)]), float(p[i])) for i in order]

    diffs = []
    for t in range(len(strs) - 1):
        nxt = int(ids[0, t + 1])
        diffs.append(
            {
                "pos": t,
                "token": strs[t],
                "next": strs[t + 1],
                "logit_clean": float(clean[t, nxt]),
                "logit_edited": float(edited[t, nxt]),
                "diff": float(edited[t, nxt] - clean[t, nxt]),
            }
        )
    result = LMResult(
        tokens=strs,
        top_clean=top(clean[-1]),
        top_edited=top(edited[-1]),
        logit_diff=diffs,
        max_abs_logit_diff=float(np.abs(edited - clean).max()),
        logits_clean=clean,
        logits_edited=edited,
    )
    if max_new_tokens > 0:
        g_clean = generate_ids(model, ids, max_new_tokens, lambda cur: [], do_sample, temperature, seed)
        g_edit = generate_ids(
            model,
            ids,
            max_new_tokens,
            lambda cur: _edited_hooks(model, ctx, hook, iv, cur),
            do_sample,
            temperature,
            seed,
        )
        result.generated_clean = tok.decode(g_clean)
        result.generated_edited = tok.decode(g_edit)
    return result


def semantic_search(
    model: Any,
    ctx: RunContext,
    query: str,
    candidates: Sequence[str],
    iv: Intervention,
    *,
    hook: str | None = None,
) -> SearchResult:
    """Cosine of the query's sentence embedding to each candidate, before and after editing the query."""
    import torch

    if not candidates:
        raise ValueError("semantic search needs candidate texts; pass --candidate TEXT (repeatable)")
    hook = check_hook(model, ctx, hook)
    iv.validate(ctx.sae)
    q_ids = _prompt_ids(model, query)
    q_att = torch.ones_like(q_ids)
    q_clean = sentence_embeddings(model, q_ids, q_att)[0]
    q_edit = sentence_embeddings(model, q_ids, q_att, _edited_hooks(model, ctx, hook, iv, q_ids))[0]
    enc = model.tokenizer(list(candidates), padding=True, return_tensors="pt")
    cand = sentence_embeddings(model, enc["input_ids"], enc["attention_mask"])

    def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (b @ a) / np.maximum(np.linalg.norm(b, axis=1) * np.linalg.norm(a), 1e-12)

    before, after = cos(q_clean, cand), cos(q_edit, cand)
    rows = [
        {"candidate": c, "sim_clean": float(s0), "sim_edited": float(s1), "delta": float(s1 - s0)}
        for c, s0, s1 in zip(candidates, before, after, strict=True)
    ]
    return SearchResult(rows=rows)


def intervene_run(
    workspace: Any,
    run: str,
    prompt: str,
    *,
    ablate: Sequence[Sequence[int]] = (),
    clamp: Sequence[tuple[Sequence[int], float]] = (),
    scale: Sequence[tuple[Sequence[int], float]] = (),
    steer: Sequence[tuple[Sequence[int], float]] = (),
    error_term: bool = True,
    model: Any = None,
    model_name: str | None = None,
    hook: str | None = None,
    top_k: int = 10,
    max_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    candidates: Sequence[str] = (),
) -> LMResult | SearchResult:
    """`saewb intervene` and ``saewb.intervene``: the edits (as the flags give them: ``ablate`` a list
    of latent-id groups, ``clamp`` / ``scale`` / ``steer`` a list of (ids, value)) checked against the
    SAE before the model loads, then ``intervene_lm`` (causal LMs) or ``semantic_search`` (encoders).
    ``model``: a TransformerBridge already loaded (else the run's model, or ``model_name``)."""
    from analysis.runs import load_run, load_run_model

    edits = [LatentEdit("ablate", tuple(ids)) for ids in ablate]
    edits += [LatentEdit("clamp", tuple(ids), float(v)) for ids, v in clamp]
    edits += [LatentEdit("scale", tuple(ids), float(v)) for ids, v in scale]
    steering = [Steering(int(i), float(v)) for ids, v in steer for i in ids]
    ctx = load_run(workspace, run)
    iv = Intervention(edits=edits, steering=steering, error_term=error_term)
    iv.validate(ctx.sae)  # before the slow model load
    if model is None:
        model = load_run_model(ctx, model_name)
    if is_causal_lm(model):
        return intervene_lm(
            model,
            ctx,
            prompt,
            iv,
            hook=hook,
            top_k=top_k,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            seed=seed,
        )
    return semantic_search(model, ctx, prompt, list(candidates), iv, hook=hook)


def format_lm_result(r: LMResult, max_rows: int = 20) -> str:
    lines = ["next-token top-k:", f"  {'clean':<28} {'edited':<28}"]
    for (a, pa), (b, pb) in zip(r.top_clean, r.top_edited, strict=True):
        lines.append(f"  {a!r:<18} {pa:8.4f}  {b!r:<18} {pb:8.4f}")
    lines.append(
        f"per-token logit of the actual next token (max |Δlogit| anywhere: {r.max_abs_logit_diff:.4g}):"
    )
    for d in r.logit_diff[:max_rows]:
        lines.append(
            f"  {d['pos']:>4} {d['token']!r:<14} -> {d['next']!r:<14} "
            f"{d['logit_clean']:9.4f} {d['logit_edited']:9.4f} {d['diff']:+9.4f}"
        )
    if r.generated_clean or r.generated_edited:
        lines += [f"generated (clean):  {r.generated_clean!r}", f"generated (edited): {r.generated_edited!r}"]
    return "\n".join(lines)


def format_search(r: SearchResult) -> str:
    lines = [f"  {'sim_clean':>9} {'sim_edit':>9} {'delta':>9}  candidate"]
    for row in sorted(r.rows, key=lambda x: -x["delta"]):
        lines.append(
            f"  {row['sim_clean']:9.4f} {row['sim_edited']:9.4f} {row['delta']:+9.4f}  {row['candidate']}"
        )
    return "\n".join(lines)
