"""The harvester: a model's hidden states at chosen hooks, for a whole corpus, into a workspace.

Work is committed in chunks, each one DuckDB transaction holding its tokens, its activations for
every hook and the harvest's new high-water mark. A killed harvest therefore stops at the last
commit, and running the same command again regenerates the same windows (the corpus order and the
batching are deterministic), skips the committed ones and goes on: no duplicates, no gaps.

Sharding (`shard=(i, N)`, `saewb harvest --shard i/N`): a document belongs to shard
`blake2b(text) mod N` (its text, or its chat turns as JSON), a function of the document alone, so
every host agrees on the partition whatever reads the corpus. A shard keeps the corpus-wide
`doc_id` of its documents (so the train/eval split by document is the one of an unsharded harvest)
and numbers its own tokens from 0. N hosts harvest disjoint shards into their own workspaces; each
resumes like an unsharded harvest, and `max_tokens` counts the shard's own tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from activations.corpus import (
    BUILTIN_CORPORA,
    CorpusSpec,
    Document,
    corpus_size_chars,
    iter_documents,
    python_code_fingerprint,
)
from activations.models import HookPlan, load_model, plan_hooks
from activations.store import (
    FILES_LAYOUT,
    HarvestError,
    HarvestInfo,
    NonFiniteActivationsError,
    check_name,
    check_store_dtype,
    commit_rows,
    encode,
    harvest_info,
    mark_complete,
    nonfinite_stored_rows,
    register_harvest,
    row_bytes,
    write_shards,
)
from activations.tokenize import TokenStrings, Window, WindowTokenizer
from saewb.progress import progress_bar
from saewb.workspace import Workspace

BLOCK_WINDOWS = 1024
"""Windows sorted by length together, so that batches carry little padding."""


@dataclass(frozen=True)
class HarvestConfig:
    """Everything that decides what a harvest stores."""

    model: str = "minilm"
    """Hugging Face name, local folder, or a built-in (`minilm`, `tiny-lm`, `smollm2`)."""
    corpus: str = "stdlib-docs"
    """Built-in corpus name or a path (.txt, .jsonl, .parquet, datasets folder)."""
    hooks: tuple[str, ...] = ("blocks.2.hook_out",)
    """Hook points to capture; aliases are stored once under their canonical name."""
    ctx_len: int = 128
    """Tokens per context window, special tokens included."""
    max_tokens: int | None = None
    """Stop at the first window boundary at or past this many tokens (None: whole corpus)."""
    name: str = "default"
    """Harvest name inside the workspace."""
    text_column: str = "text"
    """Text column for JSONL, Parquet and datasets corpora."""
    doc_per_line: bool = True
    """Plain-text corpora: one document per line, else the whole file is one document."""
    chat: bool = False
    """JSONL chat corpus rendered with the model's chat template."""
    batch_size: int = 32
    """Windows per forward pass (does not change what is stored)."""
    commit_tokens: int = 122_880
    """Tokens per commit: the most a kill can lose, and how often readers see new data. One DuckDB
    row group: the catalogue takes whole row groups at less than half the cost of 65,536-token
    commits (benchmarks/storage.py)."""
    device: str = "cpu"
    """Torch device of the model."""
    shard: tuple[int, int] | None = None
    """(i, N): harvest only the documents of shard i of N (see the module docstring); None: all."""
    nonfinite: str = "refuse"
    """Activation rows with a NaN or an infinity: "refuse" stops the harvest naming the documents;
    "skip" stores them as zeros and lists them in `nonfinite_tokens` (the training stream leaves
    them out). Not part of the identity: rerunning a refused harvest with "skip" resumes it."""
    store_dtype: str | None = None
    """How activations are stored: "float16", "bfloat16" or "float32" (read back as float32). None:
    the stored harvest's when resuming, else `DEFAULT_STORE_DTYPE` (float16). Part of the identity."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes stored with the config."""

    def corpus_spec(self) -> CorpusSpec:
        return CorpusSpec(
            corpus=self.corpus, text_column=self.text_column, doc_per_line=self.doc_per_line, chat=self.chat
        )

    def identity(self, plan: HookPlan) -> dict[str, Any]:
        """The fields a resumed harvest must share with the stored one."""
        named = self.corpus in BUILTIN_CORPORA or self.corpus.startswith("hf:")  # not paths: keep as given
        corpus = self.corpus if named else str(Path(self.corpus).expanduser().resolve())
        out = {
            "model": self.model,
            "hooks": list(plan.hooks),
            "ctx_len": self.ctx_len,
            "max_tokens": self.max_tokens,
            **{**self.corpus_spec().describe(), "corpus": corpus},
            "dtype": self.store_dtype,
        }
        if self.shard is not None:  # absent when unsharded: older harvests keep resuming
            out["shard"] = list(self.shard)
        if (
            self.corpus == "python-code"
        ):  # its content is whatever is installed: resume only on the same files
            out["python_code_files"] = python_code_fingerprint()
        return out


def parse_shard(text: str) -> tuple[int, int]:
    """'i/N' -> (i, N), with 0 <= i < N; a clear error for anything else."""
    parts = str(text).split("/")
    try:
        i, n = (int(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        i, n = None, None
    if i is None or n is None:
        raise HarvestError(
            f"--shard {text!r} is malformed; write it as i/N, e.g. --shard 0/4 for the first of 4 shards"
        )
    return check_shard((i, n))


def check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    i, n = (int(v) for v in shard)
    if n < 1:
        raise HarvestError(f"shard {i}/{n}: the number of shards N must be at least 1")
    if not 0 <= i < n:
        raise HarvestError(
            f"shard {i}/{n}: the shard index must be in 0..{n - 1} (shards are numbered from 0)"
        )
    return i, n


def shard_of(doc: Document, n_shards: int) -> int:
    """The shard of a document: a hash of its content, the same on every machine and reader."""
    key = doc.text if doc.text or not doc.messages else json.dumps(list(doc.messages), sort_keys=True)
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n_shards


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformer-lens", "transformers", "duckdb"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def iter_windows(cfg: HarvestConfig, splitter: WindowTokenizer) -> Iterator[Window]:
    """All windows in storage order: corpus order, cut at max_tokens, sorted by length per block."""
    total = 0
    block: list[Window] = []
    done = False
    for doc_id, doc in enumerate(iter_documents(cfg.corpus_spec())):
        if cfg.shard is not None and shard_of(doc, cfg.shard[1]) != cfg.shard[0]:
            continue  # another shard's document; doc_id stays the corpus-wide index
        for window in splitter.windows(doc_id, doc):
            block.append(window)
            total += len(window.token_ids)
            if cfg.max_tokens is not None and total >= cfg.max_tokens:
                done = True
                break
        if len(block) >= BLOCK_WINDOWS or done:
            yield from sorted(block, key=lambda w: -len(w.token_ids))
            block = []
        if done:
            return
    yield from sorted(block, key=lambda w: -len(w.token_ids))


@dataclass
class Chunk:
    """What one commit writes: token columns and activation rows as the batches came."""

    columns: dict[str, list[np.ndarray]] = field(default_factory=dict)
    acts: dict[str, list[np.ndarray]] = field(default_factory=dict)
    docs: list[tuple[int, str, str]] = field(default_factory=list)
    nonfinite: list[tuple[str, np.ndarray, np.ndarray]] = field(default_factory=list)
    """(hook, tok_idx, doc_id) of the rows stored as zeros because they were not finite."""
    n_windows: int = 0
    n_tokens: int = 0
    files: Future[list[str]] | None = None
    """Its shard files being written (`store.write_shards`), started when it was queued."""


def _register(ws: Workspace, cfg: HarvestConfig, plan: HookPlan, widths: dict[str, int]) -> HarvestInfo:
    """Create the harvest, or check that the stored one has the same identity."""
    identity = cfg.identity(plan)
    config = {"identity": identity, "settings": asdict(cfg), "versions": _versions()}
    return register_harvest(ws, cfg.name, config, cfg.model, cfg.ctx_len, {h: widths[h] for h in plan.hooks})


def hook_widths(model: Any, plan: HookPlan, pad_id: int) -> dict[str, int]:
    import torch

    ids = torch.full((1, 2), pad_id, dtype=torch.long)
    with torch.inference_mode():
        _, cache = model.run_with_cache(ids, names_filter=list(plan.hooks), stop_at_layer=plan.stop_at_layer)
    return {hook: int(cache[hook].shape[-1]) for hook in plan.hooks}


def commit_chunk(ws: Workspace, info: HarvestInfo, chunk: Chunk, totals: tuple[int, int, int]) -> None:
    """Commit one chunk (`store.commit_rows`): its token columns as Arrow tables, its activation
    batches as they came (written one after the other, never concatenated)."""
    name = info.name
    roles = [r for part in chunk.columns["role"] for r in part]
    n = len(roles)
    columns = {k: np.concatenate(v) for k, v in chunk.columns.items() if k != "role"}
    tokens = pa.table(
        {
            "harvest": pa.repeat(pa.scalar(name, pa.string()), n),
            **columns,
            "role": pa.array(roles, pa.string()) if any(roles) else pa.nulls(n, pa.string()),
        }
    )
    tok_idx = tokens.column("tok_idx")
    docs = None
    if chunk.docs:
        docs = pa.table(
            {
                "harvest": [name] * len(chunk.docs),
                "doc_id": [d[0] for d in chunk.docs],
                "source": [d[1] for d in chunk.docs],
                "text": [d[2] for d in chunk.docs],
            }
        )
    nonfinite = [
        pa.table({"harvest": [name] * len(idx), "hook": [hook] * len(idx), "tok_idx": idx, "doc_id": doc_ids})
        for hook, idx, doc_ids in chunk.nonfinite
    ]
    commit_rows(ws, info, docs, tokens, nonfinite, chunk.acts, int(tok_idx[0].as_py()), totals, chunk.files)


class ChunkWriter:
    """The harvest's writer thread: commits chunks in order beside the producer (the model's forward
    passes), since torch, numpy and DuckDB release the GIL; at most two chunks wait. A failure is
    raised in the producer at its next `put`, or by `check`."""

    def __init__(self, ws: Workspace, info: HarvestInfo, totals: tuple[int, int, int]) -> None:
        self.ws, self.info, self.totals = ws, info, totals
        """(n_windows, n_tokens, n_docs) committed so far."""
        self.write_s = 0.0
        self.pending: queue.Queue[Chunk | None] = queue.Queue(maxsize=2)
        self.failure: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="harvest-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (chunk := self.pending.get()) is not None:
            if self.failure:
                continue
            t = self.totals
            self.totals = (t[0] + chunk.n_windows, t[1] + chunk.n_tokens, t[2] + len(chunk.docs))
            t0 = time.perf_counter()
            try:
                commit_chunk(self.ws, self.info, chunk, self.totals)
            except BaseException as err:  # surfaced in the producer's thread
                self.failure.append(err)
            self.write_s += time.perf_counter() - t0

    def check(self) -> None:
        if self.failure:
            raise self.failure[0]

    def put(self, chunk: Chunk) -> None:
        """Queue a chunk; its shard files start writing now, so the disk works ahead of the commits."""
        if self.info.layout == FILES_LAYOUT and not self.failure:
            chunk.files = write_shards(self.ws, self.info, int(chunk.columns["tok_idx"][0][0]), chunk.acts)
        self.pending.put(chunk)
        self.check()

    def close(self) -> None:
        """Commit what is queued and stop the thread."""
        self.pending.put(None)
        self.thread.join()


@dataclass(frozen=True)
class HarvestStats:
    """What one `Harvester.run` did and where its time went."""

    tokens: int
    wall_s: float
    forward_s: float
    """Time inside the model's forward passes."""
    write_s: float
    """Time the writer thread spent committing (overlaps the forward passes)."""
    bytes_written: int
    """Activation bytes stored (in the store dtype)."""


def _pad(batch: list[Window], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lengths = np.array([len(w.token_ids) for w in batch])
    ids = np.full((len(batch), lengths.max()), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, w in enumerate(batch):
        ids[row, : lengths[row]] = w.token_ids
        mask[row, : lengths[row]] = 1
    return ids, mask, lengths


def forward_windows(model: Any, plan: HookPlan, pad_id: int, batch: list[Window]) -> dict[str, np.ndarray]:
    """One forward pass over a batch of windows: hook -> [tokens, d] float32, padding removed, the
    windows' tokens one after the other. The harvest and on-the-fly training (activations/live.py)
    both compute activations here."""
    import torch

    ids, mask, _ = _pad(batch, pad_id)
    with torch.inference_mode():
        _, cache = model.run_with_cache(
            torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            names_filter=list(plan.hooks),
            stop_at_layer=plan.stop_at_layer,
        )
    keep = torch.from_numpy(mask.astype(bool))
    return {hook: cache[hook][keep].float().cpu().numpy() for hook in plan.hooks}


def window_batches(windows: Iterator[Window], size: int) -> Iterator[list[Window]]:
    while batch := [w for _, w in zip(range(size), windows, strict=False)]:
        yield batch


class Harvester:
    """A harvest ready to run: model loaded, hooks checked, workspace registered."""

    def __init__(self, cfg: HarvestConfig, workspace: str | Path | Workspace) -> None:
        check_name(cfg.name)
        if cfg.ctx_len < 2:
            raise HarvestError("--ctx-len must be at least 2")
        if cfg.max_tokens is not None and cfg.max_tokens < 1:
            raise HarvestError("--max-tokens must be positive")
        if cfg.batch_size < 1 or cfg.commit_tokens < 1:
            raise HarvestError("--batch-size and --commit-tokens must be positive")
        if cfg.nonfinite not in ("refuse", "skip"):
            raise HarvestError(f"--nonfinite must be 'refuse' or 'skip', got {cfg.nonfinite!r}")
        if cfg.shard is not None:
            check_shard(cfg.shard)
        if cfg.store_dtype is not None:
            check_store_dtype(cfg.store_dtype)
        check_corpus_has_text(cfg)  # before the model loads and before the workspace is touched
        self.cfg = cfg
        self.ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)
        self.model = load_model(cfg.model, cfg.device)
        n_ctx = getattr(getattr(self.model, "cfg", None), "n_ctx", None)
        if isinstance(n_ctx, int) and cfg.ctx_len > n_ctx:
            raise HarvestError(
                f"--ctx-len {cfg.ctx_len} is more than model {cfg.model!r} can take ({n_ctx} positions); "
                f"use --ctx-len {n_ctx} or less"
            )
        self.plan = plan_hooks(self.model, list(cfg.hooks))
        self.splitter = WindowTokenizer(self.model.tokenizer, cfg.ctx_len)
        self.info = _register(
            self.ws, cfg, self.plan, hook_widths(self.model, self.plan, self.splitter.pad_id)
        )

    def windows(self) -> Iterator[Window]:
        """Every window of the harvest in storage order, the committed ones included."""
        return iter_windows(self.cfg, self.splitter)

    def forward(self, batch: list[Window]) -> dict[str, np.ndarray]:
        """Activations of one batch at every hook, padding removed: hook -> [tokens, d]."""
        return forward_windows(self.model, self.plan, self.splitter.pad_id, batch)

    def run(self, progress: bool = True) -> HarvestStats:
        cfg, info = self.cfg, self.info
        t_start = time.perf_counter()
        if info.status == "complete":
            print(f"harvest {cfg.name!r} is already complete ({info.n_tokens} tokens); nothing to do")
            return HarvestStats(0, 0.0, 0.0, 0.0, 0)
        token_strings = TokenStrings(self.model.tokenizer)
        n_windows, n_tokens = info.n_windows, info.n_tokens
        bar = progress_bar(
            f"harvest {cfg.name}",
            cfg.max_tokens,
            initial=n_tokens,
            unit="tok",
            unit_scale=True,
            enabled=progress,
        )
        writer = ChunkWriter(self.ws, info, (n_windows, n_tokens, info.n_docs))
        windows = self.windows()
        corpus_chars = corpus_size_chars(cfg.corpus_spec()) if cfg.max_tokens is None else None
        if corpus_chars and cfg.shard is not None:
            corpus_chars //= cfg.shard[1]  # a shard sees about 1/N of the text
        chars_seen = 0
        for _ in range(n_windows):  # the committed prefix
            w = next(windows)
            chars_seen += len(w.doc.text) if w.window == 0 else 0
        chunk = Chunk()
        seq_id, tok_idx, done, forward_s = n_windows, n_tokens, 0, 0.0
        try:
            for batch in window_batches(windows, cfg.batch_size):
                t0 = time.perf_counter()
                acts = self.forward(batch)
                forward_s += time.perf_counter() - t0
                lengths = np.array([len(w.token_ids) for w in batch])
                flat_ids = np.concatenate([w.token_ids for w in batch])
                n = len(flat_ids)
                seq_pos = np.concatenate([np.arange(k) for k in lengths])
                cols = {
                    "tok_idx": np.arange(tok_idx, tok_idx + n, dtype=np.int64),
                    "doc_id": np.repeat([w.doc_id for w in batch], lengths).astype(np.int64),
                    "pos": (np.repeat([w.window for w in batch], lengths) * cfg.ctx_len + seq_pos).astype(
                        np.int32
                    ),
                    "seq_id": np.repeat(np.arange(seq_id, seq_id + len(batch)), lengths).astype(np.int64),
                    "seq_pos": seq_pos.astype(np.int32),
                    "token_id": flat_ids.astype(np.int32),
                    "token_str": np.array(token_strings(flat_ids), dtype=object),
                    "is_special": np.concatenate([w.special for w in batch]),
                }
                for hook, x in acts.items():
                    raw = encode(x, info.store_dtype)  # a value past float16's range is infinite here
                    bad = nonfinite_stored_rows(raw, info.store_dtype)
                    if len(bad) and cfg.nonfinite == "refuse":
                        raise NonFiniteActivationsError(
                            _nonfinite_message(hook, bad, batch, cols, x, info.store_dtype)
                        )
                    if len(bad):
                        raw[bad] = 0
                        chunk.nonfinite.append((hook, cols["tok_idx"][bad], cols["doc_id"][bad]))
                    chunk.acts.setdefault(hook, []).append(raw)
                for key, value in cols.items():
                    chunk.columns.setdefault(key, []).append(value)
                chunk.columns.setdefault("role", []).append(
                    [r for w in batch for r in (w.roles or (None,) * len(w.token_ids))]
                )
                for w in batch:
                    if w.window == 0:
                        text = w.doc.text or json.dumps(list(w.doc.messages))
                        chunk.docs.append((w.doc_id, w.doc.source, text))
                chunk.n_windows += len(batch)
                chunk.n_tokens += n
                seq_id += len(batch)
                tok_idx += n
                done += n
                if corpus_chars:
                    # No --max-tokens: project the total from the share of the corpus's text seen so far.
                    chars_seen += sum(len(w.doc.text) for w in batch if w.window == 0)
                    bar.total = max(tok_idx, int(tok_idx * corpus_chars / max(chars_seen, 1)))
                bar.update(n)
                if chunk.n_tokens >= cfg.commit_tokens:
                    writer.put(chunk)
                    chunk = Chunk()
                writer.check()
            if chunk.n_tokens:
                writer.put(chunk)
        finally:
            writer.close()
            bar.close()
        writer.check()
        mark_complete(self.ws, cfg.name)
        self.info = harvest_info(self.ws, cfg.name)
        width = sum(row_bytes(d, info.store_dtype) for d in info.hooks.values())
        return HarvestStats(done, time.perf_counter() - t_start, forward_s, writer.write_s, done * width)


def check_corpus_has_text(cfg: HarvestConfig) -> None:
    """Refuse a corpus without one non-blank document (it would "harvest" 0 tokens)."""
    for doc in iter_documents(cfg.corpus_spec()):
        if doc.text.strip() or doc.messages:
            return
    raise HarvestError(
        f"corpus {cfg.corpus!r} holds no text (it is empty, or every document is blank); nothing to harvest: "
        "check the file (and --text-column) or pick another --corpus"
    )


def _nonfinite_message(
    hook: str, bad: np.ndarray, batch: list[Window], cols: dict[str, np.ndarray], x: np.ndarray, dtype: str
) -> str:
    if np.isfinite(x[bad]).all():  # finite in float32, out of range in the store dtype
        return (
            f"hook {hook!r}: {len(bad)} activation rows hold values beyond {dtype}'s range (largest "
            f"|x| = {float(np.abs(x[bad]).max()):.4g}); nothing of this batch was stored and the tokens committed "
            "before it are intact. Harvest this model with --store-dtype bfloat16 or float32 under a new --name"
        )
    docs = sorted({int(d) for d in cols["doc_id"][bad]})
    sources = {w.doc_id: w.doc.source for w in batch}
    named = ", ".join(f"{d} ({sources.get(d, '?')})" for d in docs[:5]) + (
        f" and {len(docs) - 5} more" if len(docs) > 5 else ""
    )
    return (
        f"hook {hook!r}: {len(bad)} activation rows are NaN or infinite, in documents {named}; this batch was not "
        "stored and the tokens committed before it are intact. Run the same command with --nonfinite skip "
        "to store such rows as zeros, listed in the nonfinite_tokens table and left out of training, or check the "
        "model (its weights, its dtype)"
    )


def run_harvest(cfg: HarvestConfig, workspace: str | Path, progress: bool = True) -> HarvestInfo:
    """Harvest (or resume harvesting) `cfg` into `workspace`; returns the finished harvest's info."""
    harvester = Harvester(cfg, workspace)
    harvester.run(progress=progress)
    return harvester.info
