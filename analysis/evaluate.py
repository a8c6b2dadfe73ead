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
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from activations.store import HarvestError, window_tokens
from activations.stream import EVAL_FRACTION, ActivationStream, doc_split_sql, split_threshold
from analysis.runs import RunContext, load_run, load_run_model
from analysis.splice import hooked, sae_hook_fn, zero_ablate_hook_fn
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

    def __len__(self) -> int:
        return len(self.ids)

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
    return Windows(ids, attention, special)


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


def lm_metrics(
    model: Any, ctx: RunContext, windows: Windows, batch_size: int = 8, progress: bool = False
) -> dict[str, float]:
    """CE clean / SAE-spliced / zero-ablated, CE score, ΔCE and KL score, summed over next-token targets."""

    sums = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "kl_sae": 0.0, "kl_zero": 0.0}
    n_targets = 0
    n_kl = 0
    for ids, att, mask in window_batches(windows, batch_size, f"eval {ctx.name}: model", progress):
        clean = _log_softmax64(model(ids, attention_mask=att))
        with hooked(model, [(ctx.hook, sae_hook_fn(ctx.sae, error_term=False, mask=mask))]):
            spliced = _log_softmax64(model(ids, attention_mask=att))
        with hooked(model, [(ctx.hook, zero_ablate_hook_fn(mask))]):
            zero = _log_softmax64(model(ids, attention_mask=att))
        # Target t+1 predicted at t, where both are real tokens.
        tgt_ok = (att[:, :-1] == 1) & (att[:, 1:] == 1)
        targets = ids[:, 1:].unsqueeze(-1)
        for key, lp in (("ce_clean", clean), ("ce_sae", spliced), ("ce_zero", zero)):
            nll = -lp[:, :-1].gather(-1, targets).squeeze(-1)
            sums[key] += float(nll[tgt_ok].sum())
        n_targets += int(tgt_ok.sum())
        real = att == 1
        p_clean = clean.exp()
        for key, lp in (("kl_sae", spliced), ("kl_zero", zero)):
            kl = (p_clean * (clean - lp)).sum(-1)
            sums[key] += float(kl[real].sum())
        n_kl += int(real.sum())
    if n_targets == 0:
        raise ValueError("no next-token targets in the held-out windows (windows of one token?)")
    ce_clean, ce_sae, ce_zero = (sums[k] / n_targets for k in ("ce_clean", "ce_sae", "ce_zero"))
    kl_sae, kl_zero = sums["kl_sae"] / n_kl, sums["kl_zero"] / n_kl
    return {
        "ce_clean": ce_clean,
        "ce_sae": ce_sae,
        "ce_zero": ce_zero,
        "ce_score": (ce_zero - ce_sae) / (ce_zero - ce_clean) if ce_zero != ce_clean else float("nan"),
        "delta_ce": ce_sae - ce_clean,
        "kl_sae": kl_sae,
        "kl_zero": kl_zero,
        "kl_score": (kl_zero - kl_sae) / kl_zero if kl_zero > 0 else float("nan"),
        "lm_windows": float(len(windows)),
        "lm_targets": float(n_targets),
    }


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
    ctx: RunContext, batch_size: int = 4096, max_tokens: int | None = None, progress: bool = False
) -> dict[str, float]:
    """Streaming reconstruction metrics over the stored held-out activations of the run's hook
    (``sae.lifecycle.heldout_metrics``, as at the end of a training run)."""
    from sae.lifecycle import heldout_metrics

    data = list(ctx.sources) if ctx.sources else ctx.ws
    stream = ActivationStream(data, ctx.hook, harvest=ctx.harvest, batch_size=batch_size, split="eval")
    bar = progress_bar(f"eval {ctx.name}: reconstruction", unit="tok", unit_scale=True, enabled=progress)
    try:
        return heldout_metrics(ctx.sae, stream, max_tokens, on_batch=bar.update)
    finally:
        bar.close()


def evaluate_run(
    workspace: str | Path | Workspace,
    run: str,
    *,
    model: Any = None,
    model_name: str | None = None,
    max_seqs: int = 64,
    batch_size: int = 8,
    downstream: bool = True,
    store: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Every metric for one run; `model` (a loaded TransformerBridge) skips loading it again."""
    if max_seqs < 2 or batch_size < 1:
        raise ValueError("--max-seqs must be at least 2 and --batch-size at least 1")
    ctx = load_run(existing_workspace(workspace), run)
    out: dict[str, Any] = {"run": run, "hook": ctx.hook, "harvest": ctx.harvest}
    out.update(reconstruction_metrics(ctx, progress=progress))
    if downstream:
        if model is None:
            model = load_run_model(ctx, model_name)
        windows = eval_windows(ctx.ws, ctx.harvest, pad_id_of(model), max_seqs=max_seqs)
        if is_causal_lm(model):
            out["model_kind"] = "causal_lm"
            out.update(lm_metrics(model, ctx, windows, batch_size, progress=progress))
        else:
            out["model_kind"] = "encoder"
            out.update(encoder_metrics(model, ctx, windows, batch_size, progress=progress))
    if store:
        store_eval(ctx.ws, run, "eval", out)
    return out


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
    "kl_sae",
    "kl_zero",
    "kl_score",
    "lm_windows",
    "lm_targets",
    "emb_cosine",
    "top10_overlap",
    "emb_windows",
)


def format_table(metrics: dict[str, Any]) -> str:
    """A two-column text table, reference-sheet metrics first."""
    keys = [k for k in METRIC_ORDER if k in metrics] + [k for k in metrics if k not in METRIC_ORDER]
    width = max(len(k) for k in keys)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 12}"]
    for k in keys:
        v = metrics[k]
        text = f"{v:.6g}" if isinstance(v, float) else str(v)
        lines.append(f"{k:<{width}}  {text}")
    return "\n".join(lines)
