"""Automated interpretability (`saewb explain`): an explanation and scores for each latent.

Explainers
* 'llm': an LLM (analysis/llm.py) reads the latent's top-activating contexts and contexts sampled from
  its activation quantile bands, the tokens where it fires marked <<like this>> (Bills et al. 2023,
  delphi), and answers with a short phrase.
* 'baseline': no LLM; the most frequent peak tokens of the same contexts with their usual neighbours.

Scorers (a number in [0, 1] per latent and explanation), all on held-out contexts (not shown to the
explainer) against non-activating contexts (random analysed windows where the latent fires nowhere):
* detection: the LLM reads the explanation and one unmarked context and says whether the feature is
  present; balanced accuracy over activating and non-activating contexts;
* fuzzing: the LLM reads the explanation and an activating context with marked tokens, marked where
  the latent fires or at random positions, and says whether the marks fit; balanced accuracy;
* embedding: MiniLM sentence embeddings rank activating above non-activating contexts by cosine to the
  explanation; AUROC. No LLM.

Answers are cached by content (analysis/explanations.py), so the same prompt is never sent twice,
and every latent's rows are written in one short transaction: a killed job resumes where it stopped.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from analysis import explanations as store
from analysis import tables
from analysis.llm import Chat, LLMAnswerError
from saewb.progress import progress_bar
from saewb.workspace import Workspace

PROMPT_VERSION = "v1"
"""Bump when a prompt changes: explanations and scores are stored under it."""
SCORERS = ("detection", "fuzzing", "embedding")
BASELINE_MODEL = "tokens"
SYSTEM = "You are an interpretability researcher who explains features of a language model in a few words."
REFUSAL = re.compile(r"^(i'?m sorry|i cannot|i can'?t|as an ai)", re.IGNORECASE)


@dataclass
class ExplainConfig:
    """Knobs of `saewb explain`."""

    n_top_shown: int = 10
    """Top contexts the explainer reads (the rest of the stored top contexts are held out for scoring)."""
    n_band_shown: int = 2
    """Samples per activation quantile band the explainer reads."""
    n_score: int = 4
    """Activating and as many non-activating contexts per LLM scorer (detection, fuzzing)."""
    n_embed: int = 10
    """Activating and as many non-activating contexts for the embedding scorer."""
    window: int = 8
    """Tokens either side of a context's peak."""
    explain_tokens: int = 24
    """Longest explanation the LLM may write (in its tokens)."""
    chunk: int = 8
    """Latents explained and scored together (one batch of prompts, one transaction)."""
    pool: int = 400
    """Random windows drawn once to find non-activating contexts."""
    scorers: tuple[str, ...] = SCORERS
    seed: int = 0


@dataclass
class Shown:
    """One context as text for a prompt, plus what the scorers need to know about it."""

    tok_idx: int
    tokens: list[str]
    acts: list[float]
    center: int


def _clean(token: str) -> str:
    return token.replace("\n", "\\n").replace("\t", " ")


def render(tokens: Sequence[str], marks: set[int] | None = None) -> str:
    """A context as one line; tokens at `marks` wrapped as <<token>> (a leading space stays outside)."""
    parts = []
    for i, tok in enumerate(tokens):
        t = _clean(tok)
        if marks and i in marks:
            stripped = t.lstrip(" ")
            parts.append(t[: len(t) - len(stripped)] + "<<" + stripped + ">>")
        else:
            parts.append(t)
    return "".join(parts).strip()


def firing(acts: Sequence[float]) -> set[int]:
    return {i for i, a in enumerate(acts) if a > 0}


EXPLAIN_ASK = (
    "Text excerpts where one feature fires; the tokens where it fires are marked <<like this>>:\n\n{lines}\n\n"
    "What do the marked tokens have in common? Reply with a short phrase of at most six words."
)


def explain_prompt(contexts: Sequence[Shown]) -> Chat:
    # No worked example: SmolLM2-135M copied an example's answer for most latents (measured on the demo run).
    lines = "\n".join(f"{i + 1}. {render(c.tokens, firing(c.acts))}" for i, c in enumerate(contexts))
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": EXPLAIN_ASK.format(lines=lines)},
    ]


def detection_prompt(explanation: str, context: Shown) -> Chat:
    return [
        {"role": "system", "content": SYSTEM},
        {
            "role": "user",
            "content": (
                f"A feature is described as: {explanation}\n\nText: {render(context.tokens)}\n\n"
                "Does this text contain what the feature describes? Answer Yes or No."
            ),
        },
    ]


def fuzzing_prompt(explanation: str, context: Shown, marks: set[int]) -> Chat:
    return [
        {"role": "system", "content": SYSTEM},
        {
            "role": "user",
            "content": (
                f"A feature is described as: {explanation}\n\nText: {render(context.tokens, marks)}\n\n"
                "Are the tokens marked <<like this>> examples of what the feature describes? Answer Yes or No."
            ),
        },
    ]


def parse_explanation(answer: str) -> str:
    """The first non-empty line, without quotes or a lead-in; raises LLMAnswerError if nothing usable."""
    lines = [ln.strip() for ln in answer.strip().splitlines() if ln.strip()]
    if not lines:
        raise LLMAnswerError("empty answer")
    head, colon, rest = lines[0].partition(":")
    line = (
        rest.strip() if colon and rest.strip() and len(head) < 80 else lines[0]
    )  # "The tokens have ...: X" -> X
    text = re.sub(
        r"^(\d+[.)]\s*)?(the )?(marked tokens|feature)?( (have in common|detects?|fires on))?\s*:?\s*",
        "",
        line,
        flags=re.IGNORECASE,
    )
    text = text.replace("<<", "").replace(">>", "").strip(" \"'`*-.")
    if REFUSAL.match(text):
        raise LLMAnswerError(f"refused: {text[:120]}")
    if not text or not re.search(r"\w", text):
        raise LLMAnswerError(f"malformed answer: {answer[:120]!r}")
    return text[:300]


def baseline_explanation(contexts: Sequence[Shown], n_tokens: int = 3) -> str:
    """The most frequent peak tokens, and the usual previous and next token of the commonest one."""
    peaks = Counter(_clean(c.tokens[c.center]).strip() or repr(c.tokens[c.center]) for c in contexts)
    top = [t for t, _ in peaks.most_common(n_tokens)]
    if not top:
        return ""
    before = Counter(
        _clean(c.tokens[c.center - 1]).strip()
        for c in contexts
        if c.center > 0 and (_clean(c.tokens[c.center]).strip() == top[0])
    )
    after = Counter(
        _clean(c.tokens[c.center + 1]).strip()
        for c in contexts
        if c.center + 1 < len(c.tokens) and (_clean(c.tokens[c.center]).strip() == top[0])
    )
    text = "the tokens " + ", ".join(f'"{t}"' for t in top)
    if before:
        text += f'; often after "{before.most_common(1)[0][0]}"'
    if after:
        text += f' and before "{after.most_common(1)[0][0]}"'
    return text


def balanced_accuracy(truth: Sequence[bool], said: Sequence[bool | None]) -> float:
    """Mean of the hit rates on positives and on negatives; an unreadable answer counts as wrong."""
    rates = []
    for cls in (True, False):
        idx = [i for i, t in enumerate(truth) if t is cls]
        if idx:
            rates.append(sum(said[i] is cls for i in idx) / len(idx))
    return float(np.mean(rates)) if rates else float("nan")


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a positive outranks a negative), ties counting half."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


class Embedder:
    """MiniLM sentence embeddings (the bundled all-MiniLM-L6-v2), unit length."""

    def __init__(self) -> None:
        from activations.models import load_model

        self.model = load_model("minilm")

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        from analysis.evaluate import sentence_embeddings

        out = []
        for lo in range(0, len(texts), 64):
            enc = self.model.tokenizer(
                list(texts[lo : lo + 64]), return_tensors="pt", padding=True, truncation=True, max_length=128
            )
            with torch.inference_mode():
                out.append(sentence_embeddings(self.model, enc["input_ids"], enc["attention_mask"]))
        emb = np.concatenate(out).astype(np.float32) if out else np.zeros((0, 384), np.float32)
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


class CachedLLM:
    """A chat backend behind the workspace's content cache: only prompts never answered are sent."""

    def __init__(self, ws: Workspace, backend: Any) -> None:
        self.ws, self.backend = ws, backend
        self.cache_model = f"{getattr(backend, 'url', 'local')}|{backend.model}"
        self.new: list[tuple[str, str, int, str]] = []
        self.sent = 0
        self.hits = 0

    def ask(self, chats: Sequence[Chat], max_tokens: int) -> list[str | LLMAnswerError]:
        """Free answers of at most `max_tokens`."""
        return self._cached(chats, max_tokens, lambda todo: self.backend.chat(todo, max_tokens))

    def choose(self, chats: Sequence[Chat], options: Sequence[str]) -> list[str | LLMAnswerError]:
        """One of `options` per chat (cached apart from free answers: max_tokens 0, options in the key)."""
        keyed = [[*c, {"role": "options", "content": "|".join(options)}] for c in chats]
        return self._cached(keyed, 0, lambda todo: self.backend.choose([c[:-1] for c in todo], options))

    def _cached(
        self, chats: Sequence[Chat], max_tokens: int, send: Callable[[list[Chat]], list[str | LLMAnswerError]]
    ) -> list[str | LLMAnswerError]:
        keys = [store.cache_key(self.cache_model, max_tokens, c) for c in chats]
        known = store.cached_answers(self.ws, keys)
        known.update({k: a for k, _, _, a in self.new})
        todo: dict[str, Chat] = {}
        for k, c in zip(keys, chats, strict=True):
            if k not in known:
                todo.setdefault(k, c)
        self.hits += len(keys) - len(todo)
        if todo:
            self.sent += len(todo)
            got = send(list(todo.values()))
            for k, answer in zip(todo, got, strict=True):
                if isinstance(answer, str):  # failures are not cached: a rerun tries them again
                    known[k] = answer
                    self.new.append((k, self.cache_model, max_tokens, answer))
                else:
                    known[k] = answer  # type: ignore[assignment]
        return [known[k] for k in keys]

    def take_new(self) -> list[tuple[str, str, int, str]]:
        new, self.new = self.new, []
        return new


def parse_ranges(spec: str) -> list[int]:
    """'0-99' or '3,7,10-12' -> sorted latent ids."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"--latents {spec!r}: give ids and ranges like 0-99 or 3,7,10-12")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"--latents {spec!r}: range {part} runs backwards")
        out.update(range(lo, hi + 1))
    return sorted(out)


MIN_FIRES = 10
"""Firings a latent needs to be picked by ``--sample``, ``--top-by`` or "all": with fewer, the explainer sees
the same one or two contexts again and the scorers have too few activating examples to score."""


def select_latents(
    stats: list[dict[str, Any]],
    *,
    latents: str | None = None,
    top_by: str | None = None,
    limit: int | None = None,
    sample: int | None = None,
    seed: int = 0,
    min_fires: int = MIN_FIRES,
) -> list[int]:
    """The latents to explain: an id list (any live latent), the top by a statistic, a uniform sample of
    the explainable latents (at least ``min_fires`` firings), or all explainable ones."""
    n = len(stats)
    explainable = [s for s in stats if (s["n_fires"] or 0) >= min_fires]
    if latents:
        chosen = parse_ranges(latents)
        if chosen and chosen[-1] >= n:
            raise ValueError(f"--latents {latents}: the run has latents 0..{n - 1}")
        alive = {int(s["latent"]) for s in stats if (s["n_fires"] or 0) > 0}
        return [i for i in chosen if i in alive]
    if top_by:
        keys = {"freq": "freq", "max-act": "max_act", "mean-act": "mean_act"}
        if top_by not in keys:
            raise ValueError(f"--top-by {top_by!r}: choose one of {', '.join(keys)}")
        ranked = sorted(explainable, key=lambda s: (-(s[keys[top_by]] or 0), s["latent"]))
        return sorted(int(s["latent"]) for s in ranked[: limit or len(ranked)])
    pool = [int(s["latent"]) for s in explainable]
    if sample:
        rng = np.random.default_rng(seed)
        return sorted(int(i) for i in rng.choice(pool, size=min(sample, len(pool)), replace=False))
    return pool[:limit] if limit else pool


def _as_shown(c: Any, acts: list[float] | None = None) -> Shown:
    return Shown(
        tok_idx=c.tok_idx,
        tokens=list(c.tokens),
        acts=list(acts if acts is not None else c.acts),
        center=c.center,
    )


@dataclass
class LatentContexts:
    latent: int
    shown: list[Shown]
    held_out: list[Shown]
    negatives: list[Shown]


def gather_contexts(
    ws: Workspace, run: str, latents: Sequence[int], pool: list[tables.Window], cfg: ExplainConfig
) -> list[LatentContexts]:
    """For each latent: contexts to show, held-out activating ones, and non-activating ones (one read)."""
    rng = np.random.default_rng(cfg.seed)
    out = []
    with ws.read() as con:
        for lat in latents:
            top = tables.top_contexts(ws, run, lat, kind="top", window=cfg.window, con=con)
            band = tables.top_contexts(ws, run, lat, kind="band", window=cfg.window, con=con)
            shown = [_as_shown(c) for c in top[: cfg.n_top_shown]]
            shown += [_as_shown(c) for c in band if c.rank < cfg.n_band_shown]
            rest_top = [_as_shown(c) for c in top[cfg.n_top_shown :]]
            rest_band = [_as_shown(c) for c in band if c.rank >= cfg.n_band_shown]
            held = [c for pair in zip(rest_band, rest_top, strict=False) for c in pair]  # alternate
            held += rest_band[len(rest_top) :] + rest_top[len(rest_band) :]
            neg = [w for w in pool if not any(w.acts(lat))]
            pick = rng.permutation(len(neg))[: max(cfg.n_embed, cfg.n_score)]
            negatives = [
                Shown(
                    tok_idx=neg[i].tok_idx,
                    tokens=neg[i].tokens,
                    acts=[0.0] * len(neg[i].tokens),
                    center=neg[i].center,
                )
                for i in pick
            ]
            out.append(LatentContexts(lat, shown, held, negatives))
    return out


def _fuzzed_marks(ctx: Shown, rng: np.random.Generator) -> set[int]:
    """As many marks as the context has firing tokens, at random positions where it does not fire."""
    right = firing(ctx.acts)
    others = [i for i in range(len(ctx.tokens)) if i not in right]
    k = min(max(len(right), 1), len(others))
    return {int(i) for i in rng.choice(others, size=k, replace=False)} if others else set()


@dataclass
class Setting:
    explainer: str
    model: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.explainer, self.model, PROMPT_VERSION)


def explain_chunk(
    llm: CachedLLM,
    embed: Callable[[Sequence[str]], np.ndarray] | None,
    items: list[LatentContexts],
    cfg: ExplainConfig,
    seconds: dict[str, float] | None = None,
) -> tuple[list[store.Explanation], list[store.Score]]:
    """Explain and score a chunk of latents with both explainers (prompts batched across latents);
    the time of each stage is added to `seconds` (explain and each scorer)."""
    model = llm.backend.model
    rng = np.random.default_rng(cfg.seed)
    seconds = {} if seconds is None else seconds
    t = time.perf_counter()
    answers = llm.ask([explain_prompt(it.shown) for it in items], cfg.explain_tokens)
    exps: list[store.Explanation] = []
    for it, ans in zip(items, answers, strict=True):
        ids = [c.tok_idx for c in it.shown]
        try:
            if isinstance(ans, LLMAnswerError):
                raise ans
            exps.append(
                store.Explanation(
                    it.latent, "llm", model, PROMPT_VERSION, "ok", parse_explanation(ans), context_ids=ids
                )
            )
        except LLMAnswerError as err:
            exps.append(
                store.Explanation(it.latent, "llm", model, PROMPT_VERSION, "failed", "", str(err), ids)
            )
        exps.append(
            store.Explanation(
                it.latent,
                "baseline",
                BASELINE_MODEL,
                PROMPT_VERSION,
                "ok",
                baseline_explanation(it.shown),
                context_ids=ids,
            )
        )
    by_latent = {it.latent: it for it in items}
    seconds["explain"] = seconds.get("explain", 0.0) + time.perf_counter() - t

    # LLM scorers: each scorer's yes/no prompts of the whole chunk in one batch.
    jobs: list[tuple[int, str, bool]] = []  # (explanation index, scorer, truth) per prompt
    chats: list[Chat] = []
    for ei, e in enumerate(exps):
        if e.status != "ok":
            continue
        it = by_latent[e.latent]
        pos, neg = it.held_out[: cfg.n_score], it.negatives[: cfg.n_score]
        if "detection" in cfg.scorers:
            for ctx, truth in [(c, True) for c in pos] + [(c, False) for c in neg]:
                jobs.append((ei, "detection", truth))
                chats.append(detection_prompt(e.text, ctx))
        if "fuzzing" in cfg.scorers:
            for ctx in pos:
                jobs.append((ei, "fuzzing", True))
                chats.append(fuzzing_prompt(e.text, ctx, firing(ctx.acts)))
                jobs.append((ei, "fuzzing", False))
                chats.append(fuzzing_prompt(e.text, ctx, _fuzzed_marks(ctx, rng)))
    said: list[str | LLMAnswerError] = []
    for scorer in [s for s in ("detection", "fuzzing") if s in cfg.scorers]:
        t = time.perf_counter()
        picked = [c for c, job in zip(chats, jobs, strict=True) if job[1] == scorer]
        said += llm.choose(picked, ("Yes", "No")) if picked else []
        seconds[scorer] = seconds.get(scorer, 0.0) + time.perf_counter() - t
    jobs = [j for scorer in ("detection", "fuzzing") for j in jobs if j[1] == scorer]  # the order of `said`
    collected: dict[tuple[int, str], tuple[list[bool], list[bool | None], list[str]]] = {}
    for (ei, scorer, truth), ans in zip(jobs, said, strict=True):
        t, s, errs = collected.setdefault((ei, scorer), ([], [], []))
        t.append(truth)
        if isinstance(ans, LLMAnswerError):
            s.append(None)
            errs.append(str(ans))
        else:
            s.append(ans == "Yes")

    # Embedding scorer: the explanation and its contexts in one MiniLM batch per chunk.
    emb_scores: dict[int, tuple[float, int]] = {}
    if embed is not None:
        texts: list[str] = []
        spans: list[tuple[int, int, int, int]] = []
        for ei, e in enumerate(exps):
            if e.status != "ok":
                continue
            it = by_latent[e.latent]
            pos = [render(c.tokens) for c in it.held_out[: cfg.n_embed]]
            neg = [render(c.tokens) for c in it.negatives[: cfg.n_embed]]
            spans.append((ei, len(texts), len(pos), len(neg)))
            texts += [e.text, *pos, *neg]
        t = time.perf_counter()
        vecs = embed(texts) if texts else np.zeros((0, 0))
        seconds["embedding"] = seconds.get("embedding", 0.0) + time.perf_counter() - t
        for ei, at, n_pos, n_neg in spans:
            q, p, n = vecs[at], vecs[at + 1 : at + 1 + n_pos], vecs[at + 1 + n_pos : at + 1 + n_pos + n_neg]
            exps[ei].embedding = q.tolist() if exps[ei].explainer == "llm" else None
            emb_scores[ei] = (auroc(p @ q, n @ q), n_pos + n_neg)

    scores: list[store.Score] = []
    for ei, e in enumerate(exps):
        for scorer in cfg.scorers:
            base = dict(
                latent=e.latent,
                explainer=e.explainer,
                model=e.model,
                prompt_version=PROMPT_VERSION,
                scorer=scorer,
                scorer_model="minilm" if scorer == "embedding" else model,
            )
            if e.status != "ok":
                scores.append(store.Score(**base, status="failed", error="no explanation to score"))
                continue
            if scorer == "embedding":
                value, n = emb_scores.get(ei, (float("nan"), 0))
                n_invalid, errs = 0, []
            else:
                truth, s, errs = collected.get((ei, scorer), ([], [], []))
                value, n, n_invalid = balanced_accuracy(truth, s), len(truth), sum(x is None for x in s)
                if n and n_invalid == n:
                    value = float("nan")
            if math.isnan(value):
                why = errs[0] if errs else "no held-out or non-activating contexts to score on"
                scores.append(
                    store.Score(**base, status="failed", n_contexts=n, n_invalid=n_invalid, error=why)
                )
            else:
                scores.append(
                    store.Score(
                        **base,
                        status="ok",
                        score=value,
                        n_contexts=n,
                        n_invalid=n_invalid,
                        error=errs[0] if errs else None,
                    )
                )
    return exps, scores


def explain_run(
    ws: Workspace | str,
    run: str,
    backend: Any,
    cfg: ExplainConfig | None = None,
    *,
    latents: list[int],
    progress: bool = False,
    embed: Callable[[Sequence[str]], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Explain and score `latents` of an analysed run; skips latents already done (resume).

    Returns counts, timings and the summary (see `summarize`).
    """
    ws = ws if isinstance(ws, Workspace) else Workspace(ws)
    cfg = cfg or ExplainConfig()
    unknown = set(cfg.scorers) - set(SCORERS)
    if unknown:
        raise ValueError(f"unknown scorer(s) {', '.join(sorted(unknown))}; choose from {', '.join(SCORERS)}")
    tables.analysis_info(ws, run)  # a clear error when the run has not been analysed
    store.ensure_schema(ws)
    llm = CachedLLM(ws, backend)
    settings = [Setting("llm", backend.model).key, Setting("baseline", BASELINE_MODEL).key]
    done = store.done_latents(ws, run, settings, list(cfg.scorers))
    todo = [lat for lat in latents if lat not in done]
    if embed is None and "embedding" in cfg.scorers and todo:
        embed = Embedder()
    pool = tables.random_windows(ws, run, cfg.pool, seed=cfg.seed, window=cfg.window) if todo else []
    t0 = time.perf_counter()
    bar = progress_bar(f"explain {run}", len(todo), unit="latent", enabled=progress)
    failed = 0
    stage_seconds: dict[str, float] = {}
    for lo in range(0, len(todo), cfg.chunk):
        chunk = todo[lo : lo + cfg.chunk]
        items = gather_contexts(ws, run, chunk, pool, cfg)
        exps, scores = explain_chunk(llm, embed, items, cfg, stage_seconds)
        store.store_latents(ws, run, exps, scores, llm.take_new())
        failed += sum(e.status != "ok" for e in exps) + sum(s.status != "ok" for s in scores)
        done_now = lo + len(chunk)  # seconds per latent of each stage so far, and failures, beside the ETA
        bar.set_postfix({k: f"{v / done_now:.1f}s" for k, v in stage_seconds.items()} | {"failures": failed})
        bar.update(len(chunk))
    bar.close()
    seconds = time.perf_counter() - t0
    return {
        "run": run,
        "selected": len(latents),
        "skipped_done": len(latents) - len(todo),
        "explained": len(todo),
        "failures": failed,
        "seconds": seconds,
        "seconds_per_latent": seconds / max(len(todo), 1),
        "stage_seconds": stage_seconds,
        "prompts_sent": llm.sent,
        "cache_hits": llm.hits,
        "summary": summarize(ws, run, latents, backend.model),
    }


def explain_selected(
    ws: Workspace | str,
    run: str,
    cfg: ExplainConfig | None = None,
    *,
    latents: str | None = None,
    top_by: str | None = None,
    limit: int | None = None,
    sample: int | None = None,
    explainer_url: str | None = None,
    explainer_model: str | None = None,
    timeout_s: float = 60.0,
    batch_size: int = 16,
    redo: bool = False,
    progress: bool = False,
    backend: Any = None,
) -> dict[str, Any]:
    """`saewb explain` and ``saewb.explain``: check the selection and the explainer before any work,
    then explain and score the selected live latents (``select_latents``; ``cfg.seed`` seeds
    ``sample``). ``backend``: an explainer already made (else ``make_backend`` of the URL/model)."""
    from analysis.llm import make_backend
    from saewb.workspace import existing_workspace

    ws = existing_workspace(ws)
    cfg = cfg or ExplainConfig()
    if limit is not None and limit < 1 or sample is not None and sample < 1:
        raise ValueError("--limit and --sample must be positive")
    stats = tables.latent_summary(ws, run)  # a clear error when the run is not analysed
    chosen = select_latents(stats, latents=latents, top_by=top_by, limit=limit, sample=sample, seed=cfg.seed)
    if not chosen:
        raise ValueError(
            f"no latent to explain selected; check --latents (dead latents have no contexts to explain; "
            f"--sample, --top-by and the default take latents with at least {MIN_FIRES} firings)"
        )
    if backend is None:
        backend = make_backend(explainer_url, explainer_model, timeout_s, batch_size)  # checked first
    if redo:
        from analysis.explanations import forget

        forget(ws, run, chosen)
    return explain_run(ws, run, backend, cfg, latents=chosen, progress=progress)


def mean_ci(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, half-width of the 95% normal interval, n)."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    half = 1.96 * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return float(v.mean()), float(half), len(v)


def summarize(ws: Workspace, run: str, latents: Sequence[int], model: str) -> list[dict[str, Any]]:
    """Mean score per explainer and scorer over `latents` (95% interval), and the paired LLM − baseline difference."""
    wanted = set(int(x) for x in latents)
    rows = [
        r
        for r in store.score_table(ws, run)
        if r["latent"] in wanted and r["prompt_version"] == PROMPT_VERSION
    ]
    by: dict[tuple[str, str], dict[int, float]] = {}
    for r in rows:
        if (r["explainer"] == "llm" and r["model"] == model) or r["explainer"] == "baseline":
            by.setdefault((r["explainer"], r["scorer"]), {})[r["latent"]] = r["score"]
    out = []
    for scorer in SCORERS:
        llm_s, base_s = by.get(("llm", scorer), {}), by.get(("baseline", scorer), {})
        if not llm_s and not base_s:
            continue
        both = sorted(set(llm_s) & set(base_s))
        for name, vals in (
            (f"llm ({model})", list(llm_s.values())),
            ("baseline", list(base_s.values())),
            ("llm - baseline", [llm_s[i] - base_s[i] for i in both]),
        ):
            m, h, n = mean_ci(vals)
            out.append({"scorer": scorer, "explainer": name, "mean": m, "ci95": h, "n": n})
    return out


def format_summary(summary: list[dict[str, Any]]) -> str:
    lines = [f"{'scorer':<10} {'explainer':<28} {'mean':>7} {'95% CI':>17} {'n':>5}"]
    for r in summary:
        ci = "" if math.isnan(r["ci95"]) else f"[{r['mean'] - r['ci95']:+.3f}, {r['mean'] + r['ci95']:+.3f}]"
        lines.append(f"{r['scorer']:<10} {r['explainer']:<28} {r['mean']:>7.3f} {ci:>17} {r['n']:>5}")
    return "\n".join(lines)
