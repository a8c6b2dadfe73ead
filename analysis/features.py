"""Streaming per-latent analysis of a trained SAE over its harvest (`saewb analyze`).

Two passes over the cache, both in tok_idx order and in bounded memory:

1. Read activations in fixed-size batches, encode, keep only the sparse code (indices, values) and
   write it to `feature_codes`. From the sparse code accumulate per latent: fire count, sum and max
   of activations, a log-spaced histogram (for quantile estimates), the running top-N tokens, and the
   latent × latent co-occurrence counts (sparse products of the batch's code, never dense
   [tokens × latents]).
2. Read the sparse codes back (no encoding): an equal-width histogram over [0, max] per latent, and
   random samples from each quantile band (bottom-k of a random key = uniform sampling without
   replacement, in one pass).

Memory is O(batch · n + n · (top_n + bands · samples + log bins)) plus the co-occurrence matrix
(dense n × n up to DENSE_COOC_MAX latents, sparse above). Time is linear in tokens.
Then, from parameters only: decoder-cosine neighbours over all latents (blocked), the logit effect
for models with an unembedding, and feature families (analysis/families.py).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from activations.reader import HookReader, ordered_batches
from activations.store import HarvestError, open_part
from analysis import tables
from analysis.families import cooc_row_blocks, feature_families
from analysis.runs import run_harvest
from saewb.progress import progress_bar
from saewb.workspace import Workspace, existing_workspace

DENSE_COOC_MAX = 4096
"""Up to this many latents the co-occurrence counts are a dense int64 matrix (128 MB at 4096)."""
LOG_EDGES = np.geomspace(1e-4, 1e4, 32 * 8 + 1).astype(np.float32)
"""Fixed log grid (32 bins per decade) for the pass-1 histogram that sets the quantile bands."""
READ_MEMORY_LIMIT = "256MB"
CODES_FLUSH_TOKENS = 32_768
"""Sparse codes are written in one transaction per this many tokens (short holds, few opens)."""


@dataclass
class AnalyzeConfig:
    """Knobs of `saewb analyze` (stored with the results)."""

    batch_size: int = 2048
    top_n: int = 20
    """Top activating contexts kept per latent."""
    n_bins: int = 32
    """Bins of the stored activation histogram over [0, max_act]."""
    n_bands: int = 5
    """Equal-count quantile bands of each latent's positive activations."""
    samples_per_band: int = 4
    n_neighbors: int = 10
    n_cooc: int = 10
    n_logits: int = 10
    family_min_weight: float = 0.1
    family_min_children: int = 2
    max_tokens: int | None = None
    """Analyse only the first this many non-special tokens (None = all)."""
    logits: bool = True
    seed: int = 0
    chunk_tokens: int = 16_384


@dataclass
class StreamStats:
    """What pass 1 and 2 accumulate (numpy, per latent)."""

    n_tokens: int
    n_fires: np.ndarray
    sum_act: np.ndarray
    max_act: np.ndarray
    top_val: np.ndarray
    top_tok: np.ndarray
    cooc: Any
    """[n, n] token counts of co-firing (dense ndarray or scipy CSR); diagonal = n_fires."""
    hist: np.ndarray = field(default_factory=lambda: np.zeros(0))
    band_edges: np.ndarray = field(default_factory=lambda: np.zeros(0))
    band_val: np.ndarray = field(default_factory=lambda: np.zeros(0))
    band_tok: np.ndarray = field(default_factory=lambda: np.zeros(0))


class TopPerGroup:
    """The `size` highest-scoring items of each group, merged batch by batch (vectorised).

    Rows stay sorted by score, descending; empty slots have score -inf and tok -1.
    """

    def __init__(self, n_groups: int, size: int) -> None:
        self.size = size
        self.score = np.full((n_groups, size), -np.inf, np.float64)
        self.tok = np.full((n_groups, size), -1, np.int64)
        self.val = np.zeros((n_groups, size), np.float32)

    def update(self, group: np.ndarray, score: np.ndarray, tok: np.ndarray, val: np.ndarray) -> None:
        keep = score > self.score[group, -1]  # most items lose to a full row's minimum: drop them early
        if not keep.any():
            return
        group, score, tok, val = group[keep], score[keep], tok[keep], val[keep]
        touched = np.unique(group)
        g = np.concatenate([np.repeat(touched, self.size), group])
        s = np.concatenate([self.score[touched].ravel(), score])
        t = np.concatenate([self.tok[touched].ravel(), tok])
        v = np.concatenate([self.val[touched].ravel(), val])
        order = np.lexsort((-s, g))  # by group, then score descending (stable: old items win ties)
        g, s, t, v = g[order], s[order], t[order], v[order]
        rank = np.arange(len(g)) - np.searchsorted(g, g, side="left")
        sel = rank < self.size
        self.score[g[sel], rank[sel]] = s[sel]
        self.tok[g[sel], rank[sel]] = t[sel]
        self.val[g[sel], rank[sel]] = v[sel]


class CoocCounter:
    """Latent × latent co-firing token counts from sparse codes."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.dense = np.zeros((n, n), np.int64) if n <= DENSE_COOC_MAX else None
        self.sparse = sp.csr_matrix((n, n), dtype=np.int64)
        self._pending: list[sp.csr_matrix] = []

    def add(self, rows: np.ndarray, cols: np.ndarray, n_rows: int) -> None:
        if len(rows) == 0:
            return
        a = sp.csr_matrix((np.ones(len(rows), np.int64), (rows, cols)), shape=(n_rows, self.n))
        c = (a.T @ a).tocoo()  # O(Σ k²) per batch, not B·n²
        if self.dense is not None:
            self.dense[c.row, c.col] += c.data  # (row, col) pairs are unique in a COO from a product
        else:
            self._pending.append(c.tocsr())
            if len(self._pending) >= 16:
                self._flush()

    def _flush(self) -> None:
        for m in self._pending:
            self.sparse = self.sparse + m
        self._pending = []

    def result(self) -> Any:
        if self.dense is not None:
            return self.dense
        self._flush()
        return self.sparse


def sparse_code(f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, values) of the positive entries of a code batch, row-major."""
    rows, cols = np.nonzero(f > 0)
    return rows, cols.astype(np.int32), f[rows, cols].astype(np.float32)


def activation_reader(ws: Workspace, harvest: str, hook: str) -> HookReader:
    """The rows the analysis reads: every non-special token of the harvest, as stored (a `--nonfinite
    skip` harvest's skipped rows are zeros; any NaN/inf row is refused)."""
    return HookReader(
        open_part(ws, harvest),
        hook,
        "NOT t.is_special",
        leave_out_skipped=False,
        consequence="analysing them would give NaN statistics",
    )


def _codes_table(tok_idx: np.ndarray, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray) -> pa.Table:
    offsets = np.zeros(len(tok_idx) + 1, np.int32)
    np.cumsum(np.bincount(rows, minlength=len(tok_idx)), out=offsets[1:])
    return pa.table(
        {
            "tok_idx": pa.array(tok_idx.astype(np.int64)),
            "latents": pa.ListArray.from_arrays(pa.array(offsets), pa.array(cols.astype(np.int32))),
            "vals": pa.ListArray.from_arrays(pa.array(offsets), pa.array(vals.astype(np.float32))),
        }
    )


def quantile_edges(log_hist: np.ndarray, n_bands: int, max_act: np.ndarray) -> np.ndarray:
    """[n, n_bands + 1] activation values splitting each latent's positives into equal-count bands.

    Estimated from the fixed log-grid histogram (linear inside a bin, ~7% relative resolution);
    edge 0 is 0 and the last is the exact max.
    """
    n = log_hist.shape[0]
    lo_edges = np.concatenate([[0.0], LOG_EDGES]).astype(
        np.float64
    )  # bin b covers [lo_edges[b], lo_edges[b+1])
    hi_edges = np.concatenate([LOG_EDGES, [np.inf]]).astype(np.float64)
    cum = np.cumsum(log_hist, axis=1)
    total = cum[:, -1]
    out = np.zeros((n, n_bands + 1), np.float64)
    out[:, -1] = max_act
    for b in range(1, n_bands):
        target = total * b / n_bands
        k = np.minimum((cum < target[:, None]).sum(axis=1), log_hist.shape[1] - 1)
        before = np.where(k > 0, cum[np.arange(n), np.maximum(k - 1, 0)], 0)
        inbin = np.maximum(log_hist[np.arange(n), k], 1)
        frac = np.clip((target - before) / inbin, 0.0, 1.0)
        hi = np.minimum(hi_edges[k], np.maximum(max_act, lo_edges[k]))
        out[:, b] = lo_edges[k] + frac * (hi - lo_edges[k])
    return np.maximum.accumulate(np.minimum(out, max_act[:, None]), axis=1)


def stream_stats(
    ws: Workspace,
    sae: Any,
    run: str,
    harvest: str,
    hook: str,
    n_committed: int,
    cfg: AnalyzeConfig,
    store_codes: bool = True,
    progress: bool = False,
) -> StreamStats:
    """Passes 1 and 2 (see the module docstring)."""
    n = sae.n_latents
    n_fires = np.zeros(n, np.int64)
    sum_act = np.zeros(n, np.float64)
    max_act = np.zeros(n, np.float32)
    log_hist = np.zeros((n, len(LOG_EDGES) + 1), np.int64)
    top = TopPerGroup(n, cfg.top_n)
    cooc = CoocCounter(n)
    pending: list[pa.Table] = []
    pending_rows = 0
    n_tokens = 0
    reader = activation_reader(ws, harvest, hook)
    n_read = reader.count(n_committed)
    bar = progress_bar(
        f"analyze {run}: pass 1",
        n_read if cfg.max_tokens is None else min(n_read, cfg.max_tokens),
        unit="tok",
        unit_scale=True,
        enabled=progress,
    )
    batches = ordered_batches(
        reader, n_committed, cfg.batch_size, cfg.chunk_tokens, cfg.max_tokens, READ_MEMORY_LIMIT
    )
    from sae.common import typical_rows  # imports JAX: only when a pass runs

    cutoff = getattr(sae, "outlier_cutoff", None)
    for idx, x in batches:
        b = len(idx)
        if b < cfg.batch_size:  # pad: one jit shape for the whole pass
            x = np.concatenate([x, np.zeros((cfg.batch_size - b, x.shape[1]), np.float32)])
        f = sae.encode(x)[:b]
        if cutoff is not None:  # the attention sinks it was trained without fire nothing
            f = np.where(typical_rows(x[:b], cutoff)[:, None], f, 0)
        rows, cols, vals = sparse_code(f)
        del f
        n_tokens += b
        n_fires += np.bincount(cols, minlength=n)
        sum_act += np.bincount(cols, weights=vals, minlength=n)
        np.maximum.at(max_act, cols, vals)
        log_hist += np.bincount(
            cols.astype(np.int64) * log_hist.shape[1] + np.searchsorted(LOG_EDGES, vals, side="right"),
            minlength=log_hist.size,
        ).reshape(log_hist.shape)
        top.update(cols, vals.astype(np.float64), idx[rows], vals)
        cooc.add(rows, cols, b)
        if store_codes:
            pending.append(_codes_table(idx, rows, cols, vals))
            pending_rows += b
            if pending_rows >= CODES_FLUSH_TOKENS:
                tables.append_codes(ws, run, pa.concat_tables(pending))
                pending, pending_rows = [], 0
        bar.update(b)
    if pending:
        tables.append_codes(ws, run, pa.concat_tables(pending))
    bar.close()
    if n_tokens == 0:
        raise HarvestError(f"harvest {harvest!r} has no non-special tokens to analyse")

    # Pass 2: display histogram and quantile-band samples from the stored sparse codes.
    edges = quantile_edges(log_hist, cfg.n_bands, max_act.astype(np.float64))
    hist = np.zeros((n, cfg.n_bins), np.int64)
    bands = TopPerGroup(n * cfg.n_bands, cfg.samples_per_band)
    rng = np.random.default_rng(cfg.seed)
    safe_max = np.maximum(max_act, 1e-12)
    for tok, lat, val in tables.code_batches(ws, run, n_committed, cfg.chunk_tokens, READ_MEMORY_LIMIT):
        bins = np.minimum((val / safe_max[lat] * cfg.n_bins).astype(np.int64), cfg.n_bins - 1)
        hist += np.bincount(lat * cfg.n_bins + bins, minlength=hist.size).reshape(hist.shape)
        band = np.zeros(len(val), np.int64)
        for b in range(1, cfg.n_bands):  # one edge column at a time: no [entries, bands] temporary
            band += val >= edges[lat, b]
        bands.update(lat * cfg.n_bands + band, rng.random(len(val)), tok, val)
    return StreamStats(
        n_tokens=n_tokens,
        n_fires=n_fires,
        sum_act=sum_act,
        max_act=max_act,
        top_val=top.val,
        top_tok=top.tok,
        cooc=cooc.result(),
        hist=hist,
        band_edges=edges,
        band_val=bands.val.reshape(n, cfg.n_bands, -1),
        band_tok=bands.tok.reshape(n, cfg.n_bands, -1),
    )


def decoder_neighbors(directions: np.ndarray, k: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(indices [n, k], cosines [n, k]) of each latent's nearest other latents by decoder cosine,
    over all latents, computed in row blocks (memory block × n)."""
    n = directions.shape[0]
    k = min(k, n - 1)
    d = directions.astype(np.float32)
    idx = np.zeros((n, k), np.int64)
    cos = np.zeros((n, k), np.float32)
    for lo in range(0, n, block):
        sims = d[lo : lo + block] @ d.T
        sims[np.arange(sims.shape[0]), np.arange(lo, lo + sims.shape[0])] = -np.inf
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < n else np.argsort(-sims, axis=1)
        vals = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")
        idx[lo : lo + block] = np.take_along_axis(part, order, axis=1)
        cos[lo : lo + block] = np.take_along_axis(vals, order, axis=1)
    return idx, cos


def top_cooccurring(cooc: Any, n_fires: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """Per latent the k others with the highest normalised co-occurrence count/min(fires_i, fires_j)
    (ties: lower latent id first), computed in row blocks.

    Returns (latent, rank, other, count, norm) as flat arrays, only for pairs that co-fire.
    """
    n = len(n_fires)
    k = min(k, n - 1)
    out: list[list[np.ndarray]] = [[], [], [], [], []]
    if k < 1:
        return tuple(np.zeros(0) for _ in out)
    for lo, blk in cooc_row_blocks(cooc):
        rows = np.arange(lo, lo + blk.shape[0])
        denom = np.maximum(np.minimum(n_fires[rows][:, None], n_fires[None, :]), 1)
        norm = (blk / denom).astype(np.float64)
        norm[blk <= 0] = -1.0
        norm[np.arange(len(rows)), rows] = -1.0
        for r in range(len(rows)):
            cand = np.flatnonzero(norm[r] > 0)
            cand = cand[np.argsort(-norm[r, cand], kind="stable")][:k]  # stable: lower id first on ties
            out[0].append(np.full(len(cand), rows[r]))
            out[1].append(np.arange(len(cand)))
            out[2].append(cand)
            out[3].append(blk[r, cand].astype(np.int64))
            out[4].append(norm[r, cand])
    return tuple(np.concatenate(o) if o else np.zeros(0) for o in out)


def find_unembedding(model: Any) -> np.ndarray | None:
    """W_U [d_model, vocab] of a causal LM bridge, or None for encoders.

    Encoders (MiniLM/BERT) return None on purpose: all-MiniLM-L6-v2 is a sentence-embedding model whose
    tied word embeddings were never trained as an output layer (no MLM head ships with it), and a BERT
    MLM head would apply a dense+GELU+LayerNorm transform first, so W_dec·Eᵀ is not a logit effect.
    """
    # Only causal LMs (GPT2LMHeadModel, *ForCausalLM) have an output layer that was trained as one.
    arch = str(getattr(getattr(model, "cfg", None), "architecture", "") or "")
    if not (arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel")):
        return None
    for get in (lambda m: m.W_U, lambda m: m.unembed.W_U, lambda m: m.unembed.weight.T):
        try:
            w = get(model)
        except Exception:  # noqa: BLE001 - each bridge exposes a different subset
            continue
        if w is not None:
            return np.asarray(w.detach().float().cpu().numpy() if hasattr(w, "detach") else w, np.float32)
    return None


def logit_effects(
    directions: np.ndarray, w_u: np.ndarray, k: int, block: int = 512
) -> tuple[np.ndarray, ...]:
    """(pos_ids, pos_vals, neg_ids, neg_vals) [n, k]: the tokens each unit decoder direction most
    raises / lowers through the unembedding (direct path, final LayerNorm ignored as in Neuronpedia)."""
    n = directions.shape[0]
    k = min(k, w_u.shape[1])
    out = [
        np.zeros((n, k), np.int64),
        np.zeros((n, k), np.float32),
        np.zeros((n, k), np.int64),
        np.zeros((n, k), np.float32),
    ]
    for lo in range(0, n, block):
        eff = directions[lo : lo + block].astype(np.float32) @ w_u
        for sign, (ids_out, val_out) in ((1, (out[0], out[1])), (-1, (out[2], out[3]))):
            part = np.argpartition(-sign * eff, k - 1, axis=1)[:, :k]
            vals = np.take_along_axis(eff, part, axis=1)
            order = np.argsort(-sign * vals, axis=1, kind="stable")
            ids_out[lo : lo + block] = np.take_along_axis(part, order, axis=1)
            val_out[lo : lo + block] = np.take_along_axis(vals, order, axis=1)
    return tuple(out)


def analyze_run(
    ws: Workspace | str, run: str, cfg: AnalyzeConfig | None = None, *, progress: bool = False
) -> dict[str, Any]:
    """Analyse every latent of `run` over its harvest and store the results (see analysis/tables.py).

    Returns a summary dict (tokens, seconds, tokens/s, alive latents, families).
    """
    import sae as sae_api

    ws = existing_workspace(ws)
    cfg = cfg or AnalyzeConfig()
    if cfg.batch_size < 1 or cfg.top_n < 1 or cfg.n_bins < 1 or cfg.n_bands < 1 or cfg.samples_per_band < 1:
        raise ValueError("batch_size, top_n, n_bins, n_bands and samples_per_band must all be positive")
    row, info = run_harvest(ws, run)
    model = sae_api.load(run, workspace=ws.path)
    if model.d != info.hooks[row["hook"]]:
        raise tables.AnalysisError(
            f"run {run!r} has d={model.d} but hook {row['hook']!r} of harvest {info.name!r} has d={info.hooks[row['hook']]}"
        )
    t0 = time.perf_counter()
    tables.start_analysis(ws, run, info.name, row["hook"], model.n_latents, asdict(cfg))
    stats = stream_stats(ws, model, run, info.name, row["hook"], info.n_tokens, cfg, progress=progress)
    t_stream = time.perf_counter() - t0
    n = model.n_latents
    directions = model.decoder_directions
    nb_idx, nb_cos = decoder_neighbors(directions, cfg.n_neighbors)
    co_r, co_rank, co_o, co_cnt, co_norm = top_cooccurring(stats.cooc, stats.n_fires, cfg.n_cooc)
    fam = feature_families(stats.cooc, stats.n_fires, cfg.family_min_weight, cfg.family_min_children)
    logits = None
    if cfg.logits:
        logits = _logits_for(info.model, directions, cfg.n_logits)
    _store(ws, run, n, cfg, stats, nb_idx, nb_cos, (co_r, co_rank, co_o, co_cnt, co_norm), fam, logits)
    seconds = time.perf_counter() - t0
    return {
        "run": run,
        "tokens": stats.n_tokens,
        "seconds": seconds,
        "stream_seconds": t_stream,
        "tokens_per_s": stats.n_tokens / max(t_stream, 1e-9),
        "alive": int((stats.n_fires > 0).sum()),
        "n_latents": n,
        "families": int(len(np.unique(fam["family"]))) if len(fam["family"]) else 0,
        "logit_effect": logits is not None,
    }


def _logits_for(model_name: str | None, directions: np.ndarray, k: int) -> tuple[Any, ...] | None:
    if not model_name:
        return None
    from activations.models import load_model

    model = load_model(model_name)
    w_u = find_unembedding(model)
    if w_u is None or w_u.shape[0] != directions.shape[1]:
        return None
    pos_ids, pos_vals, neg_ids, neg_vals = logit_effects(directions, w_u, k)
    tok = getattr(model, "tokenizer", None)

    def strs(ids: np.ndarray) -> list[list[str]]:
        if tok is None:
            return [[str(i) for i in r] for r in ids.tolist()]
        # The text each token stands for (byte-level BPE's `Ġfor` reads ` for`), as in top contexts.
        from activations.tokenize import TokenStrings

        as_text = TokenStrings(tok)
        return [as_text(r) for r in ids.tolist()]

    return pos_ids, strs(pos_ids), pos_vals, neg_ids, strs(neg_ids), neg_vals


def _store(
    ws: Workspace,
    run: str,
    n: int,
    cfg: AnalyzeConfig,
    s: StreamStats,
    nb_idx: np.ndarray,
    nb_cos: np.ndarray,
    co: tuple[np.ndarray, ...],
    fam: dict[str, np.ndarray],
    logits: tuple[Any, ...] | None,
) -> None:
    """All per-latent tables in one transaction, in latent order (so a latent is one row-group read)."""
    latents = np.arange(n)
    mean_act = np.where(s.n_fires > 0, s.sum_act / np.maximum(s.n_fires, 1), 0.0)
    family_of = np.full(n, -1, np.int64)
    if len(fam["latent"]):  # a latent's family: the one it belongs to as a child, else the one it roots
        roots = fam["depth"] == 0
        family_of[fam["latent"][roots]] = fam["family"][roots]
        family_of[fam["latent"][~roots]] = fam["family"][~roots]
    none_i = [None] * n
    stats_tbl = pa.table(
        {
            "run": [run] * n,
            "latent": latents.astype(np.int32),
            "n_fires": s.n_fires,
            "freq": s.n_fires / s.n_tokens,
            "mean_act": mean_act,
            "max_act": s.max_act.astype(np.float64),
            "hist": pa.array(s.hist.astype(np.int32).tolist(), pa.list_(pa.int32())),
            "family": pa.array(np.where(family_of >= 0, family_of, 0).astype(np.int32), mask=family_of < 0),
            "logit_pos_ids": pa.array(logits[0].tolist() if logits else none_i, pa.list_(pa.int32())),
            "logit_pos_tokens": pa.array(logits[1] if logits else none_i, pa.list_(pa.string())),
            "logit_pos": pa.array(logits[2].tolist() if logits else none_i, pa.list_(pa.float32())),
            "logit_neg_ids": pa.array(logits[3].tolist() if logits else none_i, pa.list_(pa.int32())),
            "logit_neg_tokens": pa.array(logits[4] if logits else none_i, pa.list_(pa.string())),
            "logit_neg": pa.array(logits[5].tolist() if logits else none_i, pa.list_(pa.float32())),
        }
    )
    # Contexts: top-N (band -1), then the band samples; empty slots (tok -1) dropped.
    top_rank = np.broadcast_to(np.arange(cfg.top_n), s.top_tok.shape)
    ok = s.top_tok >= 0
    lat_b, band_b, rank_b = np.meshgrid(
        latents, np.arange(cfg.n_bands), np.arange(cfg.samples_per_band), indexing="ij"
    )
    # Band samples sorted by value inside a band so the app shows them in order; empty slots go last.
    border = np.argsort(-np.where(s.band_tok >= 0, s.band_val, -np.inf), axis=2, kind="stable")
    btok, bval = np.take_along_axis(s.band_tok, border, 2), np.take_along_axis(s.band_val, border, 2)
    ok_b = btok >= 0
    ctx = pa.table(
        {
            "run": [run] * int(ok.sum() + ok_b.sum()),
            "latent": np.concatenate([np.broadcast_to(latents[:, None], ok.shape)[ok], lat_b[ok_b]]).astype(
                np.int32
            ),
            "kind": ["top"] * int(ok.sum()) + ["band"] * int(ok_b.sum()),
            "band": np.concatenate([np.full(int(ok.sum()), -1), band_b[ok_b]]).astype(np.int32),
            "rank": np.concatenate([top_rank[ok], rank_b[ok_b]]).astype(np.int32),
            "tok_idx": np.concatenate([s.top_tok[ok], btok[ok_b]]).astype(np.int64),
            "value": np.concatenate([s.top_val[ok], bval[ok_b]]).astype(np.float32),
        }
    )
    bands_tbl = pa.table(
        {
            "run": [run] * (n * cfg.n_bands),
            "latent": np.repeat(latents, cfg.n_bands).astype(np.int32),
            "band": np.tile(np.arange(cfg.n_bands), n).astype(np.int32),
            "lo": s.band_edges[:, :-1].ravel().astype(np.float32),
            "hi": s.band_edges[:, 1:].ravel().astype(np.float32),
        }
    )
    kn = nb_idx.shape[1]
    nb_tbl = pa.table(
        {
            "run": [run] * (n * kn),
            "latent": np.repeat(latents, kn).astype(np.int32),
            "rank": np.tile(np.arange(kn), n).astype(np.int32),
            "other": nb_idx.ravel().astype(np.int32),
            "cosine": nb_cos.ravel().astype(np.float32),
        }
    )
    co_tbl = pa.table(
        {
            "run": [run] * len(co[0]),
            "latent": co[0].astype(np.int32),
            "rank": co[1].astype(np.int32),
            "other": co[2].astype(np.int32),
            "count": co[3].astype(np.int64),
            "norm": co[4].astype(np.float32),
        }
    )
    fam_tbl = pa.table(
        {
            "run": [run] * len(fam["latent"]),
            "family": fam["family"].astype(np.int32),
            "latent": fam["latent"].astype(np.int32),
            "parent": pa.array(np.maximum(fam["parent"], 0).astype(np.int32), mask=fam["parent"] < 0),
            "depth": fam["depth"].astype(np.int32),
            "weight": pa.array(fam["weight"].astype(np.float32), mask=np.isnan(fam["weight"])),
        }
    )
    tables.finish_analysis(
        ws,
        run,
        s.n_tokens,
        {
            "latent_stats": stats_tbl,
            "latent_contexts": ctx,
            "latent_bands": bands_tbl,
            "latent_neighbors": nb_tbl,
            "latent_cooccurrence": co_tbl,
            "latent_families": fam_tbl,
        },
    )
