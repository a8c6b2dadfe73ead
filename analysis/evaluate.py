"""`saewb eval`: an SAE run's reference-sheet metrics on held-out documents.

* Reconstruction metrics (FVU, legacy EV, L0, dead/dense, cosine, L2 ratio, relative bias) stream
  the stored activations of the harvest's eval split through the one held-out evaluation,
  `sae.lifecycle.heldout_metrics` (streaming sums), which also ends every training run.
* Downstream metrics re-run the model on held-out windows rebuilt from the `tokens` table
  (`activations.store.window_tokens`: same token ids, right padding and attention mask as the
  harvester), `window_batches` at a time. The SAE is spliced in on the positions it was trained
  on: attended, non-special tokens; the others pass through, and the zero-ablation baseline
  ablates the same positions so the CE score compares like with like.
  Causal LMs: CE clean / spliced / zero-ablated, CE score, ΔCE, KL score. Encoders: cosine of the
  mean-pooled sentence embedding with and without the splice, top-10 neighbour overlap.

Results go to the workspace's `evals` table (run, kind, metrics JSON, created_at).

A run trained on a set of sources (`saewb train --workspace a --workspace b`, recorded as `sources` in
its config) gets its reconstruction metrics over the held-out documents of the whole set; the
downstream metrics use the held-out windows of its own (first) workspace.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from activations.store import HarvestError, document_sources, window_tokens
from activations.stream import EVAL_FRACTION, ActivationStream, doc_split_sql, split_threshold
from analysis.runs import RunContext, load_run, load_run_model
from analysis.splice import hooked, random_error_hook_fn, sae_hook_fn, zero_ablate_hook_fn
from saewb.progress import progress_bar
from saewb.workspace import Workspace, existing_workspace

EVALS_SCHEMA = """CREATE TABLE IF NOT EXISTS evals (
    run VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,
    metrics VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL
)"""


def is_causal_lm(model: Any) -> bool:
    """True for models with a next-token head (GPT-2, Llama...), False for encoders such as BERT/MiniLM."""
    arch = str(getattr(model.cfg, "architecture", "") or "")
    return arch.endswith(("CausalLM", "LMHeadModel"))


@dataclass(frozen=True)
class Windows:
    """Held-out context windows, padded like the harvester pads them."""

    ids: np.ndarray
    """int64 [n, ctx] token ids, right-padded."""
    attention: np.ndarray
    """int64 [n, ctx], 1 on real tokens."""
    special: np.ndarray
    """bool [n, ctx], True on special tokens (and padding)."""
    doc_id: np.ndarray
    """int64 [n], the document each window was cut from."""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def targets(self) -> np.ndarray:
        """int64 [n] next-token targets per window (t+1 predicted at t, both real tokens)."""
        return ((self.attention[:, :-1] == 1) & (self.attention[:, 1:] == 1)).sum(1)

    def take(self, rows: np.ndarray | slice) -> Windows:
        return Windows(self.ids[rows], self.attention[rows], self.special[rows], self.doc_id[rows])

    def first(self, n: int) -> Windows:
        return self.take(slice(0, n))

    def covering(self, targets: int) -> Windows:
        """As few windows as hold at least ``targets`` next-token targets, evenly spaced over all of them
        (all if they hold fewer). Spread rather than leading: a document's windows are stored together,
        so the leading windows come from a handful of documents, one long file can hold a sixth of the
        targets, and the estimate's noise is that of a few documents rather than of the split."""
        t = self.targets
        if t.sum() <= targets:
            return self

        def spaced(k: int) -> np.ndarray:
            return np.unique(np.linspace(0, len(self) - 1, k).round().astype(np.int64))

        lo, hi = 1, len(self)  # all windows hold enough; bisect on the count (near-monotone in k)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if t[spaced(mid)].sum() >= targets else (mid + 1, hi)
        return self.take(spaced(lo))

    @property
    def splice_mask(self) -> np.ndarray:
        """Positions the SAE is spliced on: real, non-special tokens."""
        return (self.attention == 1) & ~self.special


def eval_windows(
    ws: Workspace, harvest: str, pad_id: int, max_seqs: int | None = 64, eval_fraction: float = EVAL_FRACTION
) -> Windows:
    """The first `max_seqs` windows (by seq_id) of the harvest's held-out documents."""
    table = window_tokens(ws, harvest, doc_split_sql("eval"), [split_threshold(eval_fraction)], max_seqs)
    if table.num_rows == 0:
        raise HarvestError(f"harvest {harvest!r} has no held-out documents; harvest more tokens")
    seq_id = table.column("seq_id").to_numpy()
    seqs = np.unique(seq_id)
    pos = table.column("seq_pos").to_numpy()
    row = np.searchsorted(seqs, seq_id)
    width = int(pos.max()) + 1
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    attention = np.zeros((len(seqs), width), dtype=np.int64)
    special = np.ones((len(seqs), width), dtype=bool)
    ids[row, pos] = table.column("token_id").to_numpy()
    attention[row, pos] = 1
    special[row, pos] = table.column("is_special").to_numpy(zero_copy_only=False)
    doc_id = np.zeros(len(seqs), dtype=np.int64)
    doc_id[row] = table.column("doc_id").to_numpy()  # a window never spans two documents
    return Windows(ids, attention, special, doc_id)


def window_batches(
    windows: Windows, batch_size: int, label: str, progress: bool = False
) -> Iterator[tuple[Any, Any, Any]]:
    """(ids, attention, splice mask) torch tensors of `batch_size` windows at a time, in order; the
    progress bar counts the windows a caller has finished with."""
    import torch

    bar = progress_bar(label, len(windows), unit="window", enabled=progress)
    try:
        for start in range(0, len(windows), batch_size):
            sl = slice(start, start + batch_size)
            yield (
                torch.from_numpy(windows.ids[sl]),
                torch.from_numpy(windows.attention[sl]),
                torch.from_numpy(windows.splice_mask[sl]),
            )
            bar.update(len(windows.ids[sl]))
    finally:
        bar.close()


def pad_id_of(model: Any) -> int:
    tok = model.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return int(pad) if pad is not None else 0


def _log_softmax64(logits: Any) -> Any:
    import torch

    return torch.log_softmax(logits.to(torch.float64), dim=-1)


@dataclass(frozen=True)
class LMWindowSums:
    """Per-window sums of one pass over held-out windows: the clean and zero-ablated model once, and
    each spliced SAE, so SAEs of one hook are compared on identical tokens (paired)."""

    targets: np.ndarray
    """[windows] next-token targets (t+1 predicted at t, both real tokens)."""
    real: np.ndarray
    """[windows] real tokens (the positions KL is summed over)."""
    nll_clean: np.ndarray
    nll_zero: np.ndarray
    kl_zero: np.ndarray
    nll_sae: dict[str, np.ndarray]
    """Per SAE name: [windows] summed next-token NLL with that SAE spliced in."""
    kl_sae: dict[str, np.ndarray]
    nll_rand: dict[str, np.ndarray] = field(default_factory=dict)
    """Per SAE name, with ``random_error``: the NLL with an error of the SAE's size in a random direction."""
    kl_rand: dict[str, np.ndarray] = field(default_factory=dict)


def _window_nll(logprobs: Any, ids: Any, tgt_ok: Any) -> Any:
    """[batch] summed NLL of the next-token targets (t+1 predicted at t where both are real)."""
    import torch

    nll = -logprobs[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return torch.where(tgt_ok, nll, 0.0).sum(1)


def lm_window_sums(
    model: Any,
    hook: str,
    saes: dict[str, Any],
    windows: Windows,
    batch_size: int = 8,
    label: str = "eval",
    progress: bool = False,
    random_error: bool = False,
) -> LMWindowSums:
    """Runs the clean and zero-ablated model once per batch, then each SAE of ``saes`` spliced at ``hook``
    (and with ``random_error`` once more per SAE: its error's norm in a random direction)."""
    import torch

    parts: dict[str, list[np.ndarray]] = {}

    def add(key: str, values: Any) -> None:
        parts.setdefault(key, []).append(values.numpy())

    for i, (ids, att, mask) in enumerate(window_batches(windows, batch_size, f"{label}: model", progress)):
        tgt_ok = (att[:, :-1] == 1) & (att[:, 1:] == 1)
        real = att == 1
        clean = _log_softmax64(model(ids, attention_mask=att))
        p_clean = clean.exp()
        add("targets", tgt_ok.sum(1).to(torch.float64))
        add("real", real.sum(1).to(torch.float64))
        add("nll_clean", _window_nll(clean, ids, tgt_ok))
        variants = [("zero", zero_ablate_hook_fn(mask))]
        variants += [(f"sae:{n}", sae_hook_fn(sae, error_term=False, mask=mask)) for n, sae in saes.items()]
        if random_error:
            variants += [(f"rand:{n}", random_error_hook_fn(sae, mask, seed=i)) for n, sae in saes.items()]
        for key, fn in variants:
            with hooked(model, [(hook, fn)]):
                lp = _log_softmax64(model(ids, attention_mask=att))
            add(f"nll:{key}", _window_nll(lp, ids, tgt_ok))
            add(f"kl:{key}", torch.where(real, (p_clean * (clean - lp)).sum(-1), 0.0).sum(1))
            del lp
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    if not cat or cat["targets"].sum() == 0:
        raise ValueError("no next-token targets in the held-out windows (windows of one token?)")
    return LMWindowSums(
        targets=cat["targets"],
        real=cat["real"],
        nll_clean=cat["nll_clean"],
        nll_zero=cat["nll:zero"],
        kl_zero=cat["kl:zero"],
        nll_sae={name: cat[f"nll:sae:{name}"] for name in saes},
        kl_sae={name: cat[f"kl:sae:{name}"] for name in saes},
        nll_rand={name: cat[f"nll:rand:{name}"] for name in saes if random_error},
        kl_rand={name: cat[f"kl:rand:{name}"] for name in saes if random_error},
    )


def lm_summary(sums: LMWindowSums, name: str) -> dict[str, float]:
    """CE clean / spliced / zero-ablated, CE score, ΔCE and KL score of SAE ``name``, over all targets."""
    n_targets, n_kl = float(sums.targets.sum()), float(sums.real.sum())
    ce_clean, ce_sae, ce_zero = (
        float(v.sum()) / n_targets for v in (sums.nll_clean, sums.nll_sae[name], sums.nll_zero)
    )
    kl_sae, kl_zero = float(sums.kl_sae[name].sum()) / n_kl, float(sums.kl_zero.sum()) / n_kl
    out = {
        "ce_clean": ce_clean,
        "ce_sae": ce_sae,
        "ce_zero": ce_zero,
        "ce_score": (ce_zero - ce_sae) / (ce_zero - ce_clean) if ce_zero != ce_clean else float("nan"),
        "delta_ce": ce_sae - ce_clean,
        "kl_sae": kl_sae,
        "kl_zero": kl_zero,
        "kl_score": (kl_zero - kl_sae) / kl_zero if kl_zero > 0 else float("nan"),
        "lm_windows": float(len(sums.targets)),
        "lm_targets": n_targets,
    }
    if name in sums.nll_rand:
        delta_rand = float(sums.nll_rand[name].sum()) / n_targets - ce_clean
        out.update(
            delta_ce_rand=delta_rand,
            kl_rand=float(sums.kl_rand[name].sum()) / n_kl,
            error_pathology=out["delta_ce"] / delta_rand if delta_rand > 0 else float("nan"),
        )
    return out


def costliest_documents(sums: LMWindowSums, doc_id: np.ndarray, name: str, top: int) -> list[dict[str, Any]]:
    """The ``top`` documents whose windows the splice of SAE ``name`` costs most: their targets, clean CE,
    ΔCE and share of the excess NLL summed over all windows (shares of all documents sum to 1)."""
    docs, inverse = np.unique(doc_id, return_inverse=True)
    targets = np.bincount(inverse, weights=sums.targets, minlength=len(docs))
    clean = np.bincount(inverse, weights=sums.nll_clean, minlength=len(docs))
    excess = np.bincount(inverse, weights=sums.nll_sae[name] - sums.nll_clean, minlength=len(docs))
    total = float(excess.sum())
    out = []
    for i in np.argsort(-excess, kind="stable")[:top]:
        t = float(targets[i])
        out.append(
            {
                "doc_id": int(docs[i]),
                "targets": t,
                "ce_clean": float(clean[i]) / t if t else float("nan"),
                "delta_ce": float(excess[i]) / t if t else float("nan"),
                "share": float(excess[i]) / total if total else float("nan"),
            }
        )
    return out


def paired_delta_ce(sums: LMWindowSums, name: str, reference: str) -> tuple[float, float]:
    """ΔCE(name) − ΔCE(reference) on the same targets, and the half-width of its 95% interval.

    The difference is a ratio of window sums, Σ d_w / Σ t_w; its standard error is the delta method's
    over windows (the unit that is sampled), so correlated tokens inside a window are not counted as
    independent."""
    d = sums.nll_sae[name] - sums.nll_sae[reference]
    t = sums.targets
    diff = float(d.sum() / t.sum())
    n = len(d)
    if n < 2:
        return diff, float("nan")
    resid = d - diff * t
    se = math.sqrt(n / (n - 1) * float(np.sum(resid**2))) / float(t.sum())
    return diff, 1.96 * se


def lm_metrics(
    model: Any, ctx: RunContext, windows: Windows, batch_size: int = 8, progress: bool = False
) -> dict[str, float]:
    """CE clean / SAE-spliced / zero-ablated, CE score, ΔCE and KL score, summed over next-token targets."""
    sums = lm_window_sums(
        model, ctx.hook, {ctx.name: ctx.sae}, windows, batch_size, f"eval {ctx.name}", progress
    )
    return lm_summary(sums, ctx.name)


def final_hook(model: Any) -> str:
    return f"blocks.{model.cfg.n_layers - 1}.hook_out"


def sentence_embeddings(
    model: Any, ids: Any, attention: Any, extra_hooks: list[tuple[str, Any]] | None = None
) -> np.ndarray:
    """Mean-pooled last-layer states over attended tokens (sentence-transformers pooling), float64."""
    import torch

    store: list[torch.Tensor] = []

    def capture(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        store.append(act.detach())
        return act

    with hooked(model, [*(extra_hooks or []), (final_hook(model), capture)]):
        model(ids, attention_mask=attention)
    h = store[-1].to(torch.float64)
    m = attention.to(torch.float64).unsqueeze(-1)
    return ((h * m).sum(1) / m.sum(1).clamp(min=1.0)).numpy()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def neighbour_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean share of each row's top-k cosine neighbours (itself excluded) that two embeddings agree on."""
    n = len(a)
    k = min(k, n - 1)
    if k < 1:
        raise ValueError("neighbour overlap needs at least 2 held-out windows")
    out = 0.0
    tops = []
    for e in (_unit(a), _unit(b)):
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        tops.append(np.argsort(-sim, axis=1, kind="stable")[:, :k])
    for i in range(n):
        out += len(set(tops[0][i].tolist()) & set(tops[1][i].tolist())) / k
    return out / n


def encoder_metrics(
    model: Any, ctx: RunContext, windows: Windows, batch_size: int = 8, k: int = 10, progress: bool = False
) -> dict[str, float]:
    """Embedding cosine (original vs SAE-spliced) and top-k neighbour overlap over the held-out windows,
    which double as the fixed query set (each window queried against all the others)."""
    clean, spliced = [], []
    for ids, att, mask in window_batches(windows, batch_size, f"eval {ctx.name}: model", progress):
        clean.append(sentence_embeddings(model, ids, att))
        hook = (ctx.hook, sae_hook_fn(ctx.sae, error_term=False, mask=mask))
        spliced.append(sentence_embeddings(model, ids, att, [hook]))
    a, b = np.concatenate(clean), np.concatenate(spliced)
    cos = np.sum(_unit(a) * _unit(b), axis=1)
    out: dict[str, Any] = {
        "emb_cosine": float(cos.mean()),
        f"top{k}_overlap": neighbour_overlap(a, b, k),
        "emb_windows": float(len(a)),
    }
    if len(a) < 5 * (k + 1):
        # With few windows most of them are everyone's neighbours and the overlap is near 1 regardless.
        out["note"] = (
            f"top-{k} overlap over only {len(a)} windows is not informative; raise --max-seqs "
            "or harvest more documents"
        )
    return out


def reconstruction_metrics(
    ctx: RunContext,
    batch_size: int = 4096,
    max_tokens: int | None = None,
    progress: bool = False,
    dead_over_train: bool = False,
) -> dict[str, float]:
    """Streaming reconstruction metrics over the stored held-out activations of the run's hook
    (``sae.lifecycle.heldout_metrics``, as at the end of a training run). ``dead_over_train``: also
    ``dead_train_split``, the fraction of latents that fire on no token of the whole train split
    (``sae.lifecycle.split_dead_fraction``), and ``train_split_tokens``."""
    from sae.lifecycle import heldout_metrics, split_dead_fraction

    data = list(ctx.sources) if ctx.sources else ctx.ws

    def stream(split: str) -> ActivationStream:
        return ActivationStream(data, ctx.hook, harvest=ctx.harvest, batch_size=batch_size, split=split)  # type: ignore[arg-type]

    def with_bar(stage: str, run: Callable[[Callable[[int], Any]], dict[str, Any]]) -> dict[str, Any]:
        bar = progress_bar(f"eval {ctx.name}: {stage}", unit="tok", unit_scale=True, enabled=progress)
        try:
            return run(bar.update)
        finally:
            bar.close()

    out = with_bar("reconstruction", lambda tick: heldout_metrics(ctx.sae, stream("eval"), max_tokens, tick))
    if dead_over_train:
        out.update(
            with_bar("dead over train", lambda tick: split_dead_fraction(ctx.sae, stream("train"), tick))
        )
    return out


def evaluate_run(
    workspace: str | Path | Workspace,
    run: str,
    *,
    model: Any = None,
    model_name: str | None = None,
    max_seqs: int = 64,
    targets: int | None = None,
    batch_size: int = 8,
    downstream: bool = True,
    random_error: bool = False,
    documents: int = 0,
    dead_over_train: bool = False,
    store: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Every metric for one run; `model` (a loaded TransformerBridge) skips loading it again."""
    return evaluate_runs(
        workspace,
        [run],
        model=model,
        model_name=model_name,
        max_seqs=max_seqs,
        targets=targets,
        batch_size=batch_size,
        downstream=downstream,
        random_error=random_error,
        documents=documents,
        dead_over_train=dead_over_train,
        store=store,
        progress=progress,
    )[0]


def evaluate_runs(
    workspace: str | Path | Workspace,
    runs: list[str],
    *,
    model: Any = None,
    model_name: str | None = None,
    max_seqs: int = 64,
    targets: int | None = None,
    batch_size: int = 8,
    downstream: bool = True,
    random_error: bool = False,
    documents: int = 0,
    dead_over_train: bool = False,
    store: bool = True,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Every metric for each run, on the same held-out windows.

    Runs of one hook share the model's clean and zero-ablated forwards, and every run after the first
    gets ``delta_ce_diff`` = its ΔCE − the first run's on identical targets, with the half-width of the
    95% interval over windows (``delta_ce_diff_ci95``): the paired comparison two SAEs need, far
    tighter than the difference of two separately noisy ΔCEs.

    The model re-runs the first ``max_seqs`` held-out windows, or with ``targets`` as few windows as
    hold that many next-token targets, spread evenly over the held-out split (`Windows.covering`; all
    of them if the held-out documents hold fewer; ``lm_targets`` says how many were used).
    ``random_error`` (causal LMs) adds one forward per SAE with an error of the SAE's size in a random
    direction: ``delta_ce_rand``, ``kl_rand`` and ``error_pathology`` = ΔCE / ΔCE_rand (how much more the SAE's errors cost than errors of their size). ``documents`` = N
    (causal LMs) lists under ``documents`` the N held-out documents the splice costs most
    (`costliest_documents`, with their sources): where ΔCE comes from. ``dead_over_train`` adds
    ``dead_train_split``: latents that never fire over the whole train split (a held-out split is too
    short to tell a rare latent from a dead one).
    """
    if max_seqs < 2 or batch_size < 1:
        raise ValueError("--max-seqs must be at least 2 and --batch-size at least 1")
    if targets is not None and targets < 1:
        raise ValueError(f"--targets must be at least 1, got {targets}")
    if documents < 0:
        raise ValueError(f"--documents must be 0 or more, got {documents}")
    if not runs or len(set(runs)) != len(runs):
        raise ValueError(f"give one or more distinct run names, got {runs}")
    ws = existing_workspace(workspace)
    ctxs = [load_run(ws, run) for run in runs]
    first = ctxs[0]
    for c in ctxs[1:]:
        if (c.hook, c.harvest) != (first.hook, first.harvest):
            raise ValueError(
                f"run {c.name!r} is on {c.hook} of harvest {c.harvest!r} but {first.name!r} on {first.hook} of "
                f"{first.harvest!r}; evaluate runs of different hooks or harvests separately"
            )
    outs: list[dict[str, Any]] = []
    for c in ctxs:
        out: dict[str, Any] = {"run": c.name, "hook": c.hook, "harvest": c.harvest}
        out.update(reconstruction_metrics(c, progress=progress, dead_over_train=dead_over_train))
        outs.append(out)
    if downstream:
        if model is None:
            model = load_run_model(first, model_name)
        if targets is None:
            windows = eval_windows(ws, first.harvest, pad_id_of(model), max_seqs=max_seqs)
        else:
            windows = eval_windows(ws, first.harvest, pad_id_of(model), max_seqs=None).covering(targets)
        if is_causal_lm(model):
            label = f"eval {first.name}" + (f" +{len(ctxs) - 1}" if len(ctxs) > 1 else "")
            saes = {c.name: c.sae for c in ctxs}
            sums = lm_window_sums(model, first.hook, saes, windows, batch_size, label, progress, random_error)
            for c, out in zip(ctxs, outs, strict=True):
                out["model_kind"] = "causal_lm"
                out.update(lm_summary(sums, c.name))
                if c is not first:
                    diff, half = paired_delta_ce(sums, c.name, first.name)
                    out.update(vs_run=first.name, delta_ce_diff=diff, delta_ce_diff_ci95=half)
                if documents:
                    out["documents"] = costliest_documents(sums, windows.doc_id, c.name, documents)
            if documents:
                ids = sorted({d["doc_id"] for out in outs for d in out["documents"]})
                sources = document_sources(ws, first.harvest, ids)
                for out in outs:
                    for d in out["documents"]:
                        d["source"] = sources.get(d["doc_id"], "")
        else:
            for c, out in zip(ctxs, outs, strict=True):
                out["model_kind"] = "encoder"
                out.update(encoder_metrics(model, c, windows, batch_size, progress=progress))
    if store:
        for out in outs:
            store_eval(ws, out["run"], "eval", out)
    return outs


def store_eval(ws: Workspace, run: str, kind: str, metrics: dict[str, Any]) -> None:
    with ws.write() as con:
        con.execute(EVALS_SCHEMA)
        con.execute(
            "INSERT INTO evals VALUES (?, ?, ?, ?)",
            [run, kind, json.dumps(metrics), datetime.now(UTC).replace(tzinfo=None)],
        )


def list_evals(
    workspace: str | Path | Workspace, run: str | None = None, kind: str | None = None
) -> list[dict[str, Any]]:
    """Stored evaluations, oldest first."""
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
    if not ws.table_exists("evals"):
        return []
    with ws.read() as con:
        rows = con.execute(
            "SELECT run, kind, metrics, created_at FROM evals WHERE (? IS NULL OR run = ?) AND (? IS NULL OR kind = ?) "
            "ORDER BY created_at",
            [run, run, kind, kind],
        ).fetchall()
    return [{"run": r, "kind": k, "metrics": json.loads(m), "created_at": t} for r, k, m, t in rows]


METRIC_ORDER = (
    "fvu",
    "explained_variance",
    "legacy_ev",
    "l0",
    "dead_frac",
    "dead_train_split",
    "dense_frac",
    "cosine",
    "l2_ratio",
    "rel_bias",
    "eval_tokens",
    "ce_clean",
    "ce_sae",
    "ce_zero",
    "ce_score",
    "delta_ce",
    "vs_run",
    "delta_ce_diff",
    "delta_ce_diff_ci95",
    "kl_sae",
    "kl_zero",
    "kl_score",
    "delta_ce_rand",
    "kl_rand",
    "error_pathology",
    "lm_windows",
    "lm_targets",
    "emb_cosine",
    "top10_overlap",
    "emb_windows",
)


def format_table(metrics: dict[str, Any]) -> str:
    """A two-column text table, reference-sheet metrics first; then the costliest documents, if any."""
    keys = [k for k in METRIC_ORDER if k in metrics] + [
        k for k in metrics if k not in METRIC_ORDER and k != "documents"
    ]
    width = max(len(k) for k in keys)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 12}"]
    for k in keys:
        v = metrics[k]
        text = f"{v:.6g}" if isinstance(v, float) else str(v)
        lines.append(f"{k:<{width}}  {text}")
    if metrics.get("documents"):
        lines += ["", format_documents(metrics["documents"])]
    return "\n".join(lines)


def format_documents(documents: list[dict[str, Any]]) -> str:
    """The costliest documents (`costliest_documents`), one line each."""
    lines = [f"{'share':>6}  {'ΔCE':>7}  {'CE clean':>8}  {'targets':>8}  document"]
    for d in documents:
        lines.append(
            f"{d['share']:>6.1%}  {d['delta_ce']:>7.4f}  {d['ce_clean']:>8.4f}  {int(d['targets']):>8,}  "
            f"{d.get('source') or d['doc_id']}"
        )
    return "\n".join(lines)


COMPARE_COLUMNS = (
    "fvu",
    "l0",
    "dead_frac",
    "dead_train_split",
    "ce_score",
    "delta_ce",
    "kl_score",
    "error_pathology",
    "emb_cosine",
    "top10_overlap",
)


def signed4(v: float) -> str:
    """``v`` to 4 decimals with its sign; one that rounds to zero is +0.0000, never -0.0000."""
    return f"{v:+.4f}" if round(v, 4) != 0 else "+0.0000"


def format_comparison(outs: list[dict[str, Any]]) -> str:
    """One row per run: the headline metrics and, for causal LMs, ΔCE against the first run with its
    95% interval (paired over the same windows)."""
    cols = [c for c in COMPARE_COLUMNS if any(c in o for o in outs)]
    paired = any("delta_ce_diff" in o for o in outs)
    head = ["run", *cols] + ([f"ΔCE − {outs[0]['run']} [95%]"] if paired else [])
    rows = []
    for o in outs:
        row = [str(o["run"])] + [f"{o[c]:.4g}" if c in o else "" for c in cols]
        if paired:
            row.append(
                f"{signed4(o['delta_ce_diff'])} ± {o['delta_ce_diff_ci95']:.4f}"
                if "delta_ce_diff" in o
                else "(reference)"
            )
        rows.append(row)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    targets = outs[0].get("lm_targets")
    if targets is not None:
        lines.append(f"(CE over the same {int(targets):,} held-out next-token targets for every run)")
    for o in outs:
        if o.get("documents"):
            lines += ["", f"costliest documents for {o['run']}:", format_documents(o["documents"])]
    return "\n".join(lines)
