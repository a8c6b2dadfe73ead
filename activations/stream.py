"""A shuffled, seekable, bounded-memory stream of activation batches for the trainers.

Tokens are grouped in aligned chunks of `chunk_tokens` consecutive `tok_idx`. Each epoch visits
the chunks in a seeded random order, `chunks_per_buffer` at a time; each buffer is read, permuted
as a whole, and handed out in batches while the next one is read from the disk on a thread. Memory
is two buffers, whatever the size of the cache, and the order is a pure function of (seed, epoch),
so `batches(start=b)` resumes exactly at batch b.

Batches are float32, or with `values="stored"` the values as stored (float16 / bfloat16 / float32):
half the bytes to move for a half-precision cache, widened by the trainer on its device.

A set of sources (several workspaces, e.g. the shards of a `--shard i/N` harvest, and/or Parquet
exports) is one logical cache: part p's tokens take global indices `offset_p + tok_idx` (offsets in
the order given), each part is cut into its own chunks, and the seeded chunk order runs over all of
them. The split is by `doc_id`, which shards keep corpus-wide, so a set of shards splits exactly like
the unsharded harvest and streams the same tokens. One source goes the single-part path unchanged.

Non-finite activations never reach a trainer: tokens a harvest stored as zeros because they were
NaN/inf (`--nonfinite skip`, listed in `nonfinite_tokens`) are left out like special tokens, and a
buffer holding any other NaN/inf row (a workspace written by other means) is refused with
`NonFiniteActivationsError` naming the tokens; nothing is silently dropped, so the batches stay a
pure function of (seed, position).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np

from activations.reader import HookReader
from activations.store import HarvestError, nonfinite_any, open_parts
from saewb.workspace import Workspace

Split = Literal["train", "eval", "all"]
_HASH_MUL = 2654435761
_HASH_MOD = 4294967296
_BUCKETS = 10_000
READ_MEMORY_LIMIT = "128MB"
Values = Literal["float32", "stored"]
EVAL_FRACTION = 0.05
"""Share of documents held out (the eval split): the one default of the stream, the end-of-run
evaluation of `saewb train` / `saewb sweep` and `saewb eval`."""


def split_threshold(eval_fraction: float) -> int:
    """The parameter `doc_split_sql` takes: the bucket below which a document is held out."""
    return round(eval_fraction * _BUCKETS)


def doc_split_sql(split: Split) -> str:
    """SQL condition on `t.doc_id` for a split; takes one parameter, the eval bucket threshold.

    A document's bucket is a fixed multiplicative hash of its id, so the split is stable across
    runs, seeds and machines, and never cuts through a document.
    """
    bucket = f"(((t.doc_id * {_HASH_MUL}) % {_HASH_MOD}) % {_BUCKETS})"
    if split == "eval":
        return f"{bucket} < ?"
    if split == "train":
        return f"{bucket} >= ?"
    if split == "all":
        return "? >= 0"
    raise ValueError(f"split must be 'train', 'eval' or 'all', not {split!r}")


def doc_in_split(doc_ids: np.ndarray, split: Split, threshold: int) -> np.ndarray:
    """`doc_split_sql` in numpy: which of these documents belong to the split."""
    bucket = ((np.asarray(doc_ids, dtype=np.int64) * _HASH_MUL) % _HASH_MOD) % _BUCKETS
    if split == "eval":
        return bucket < threshold
    if split == "train":
        return bucket >= threshold
    if split == "all":
        return np.ones(bucket.shape, dtype=bool)
    raise ValueError(f"split must be 'train', 'eval' or 'all', not {split!r}")


Buffers = Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]
"""Shuffling buffers (tok_idx, x, visiting order), as `ActivationStream._rows` yields them."""


def batched(
    buffers: Buffers, batch_size: int, with_index: bool, keep_last: bool
) -> Iterator[np.ndarray | tuple[np.ndarray, np.ndarray]]:
    """Batches of exactly `batch_size` rows gathered from the buffers through their visiting orders
    (the last one short with `keep_last`): the one batching of the cache and of on-the-fly training."""
    parts: list[tuple[np.ndarray, np.ndarray]] = []  # (tok_idx, x) gathered for the batch being built
    have = 0
    for idx, x, order in buffers:
        at = 0
        while at < len(order):
            take = order[at : at + batch_size - have]
            parts.append((idx[take], x[take]))
            have += len(take)
            at += len(take)
            if have == batch_size:
                yield _emit(parts, with_index)
                parts, have = [], 0
        del idx, x, order
    if keep_last and have:
        yield _emit(parts, with_index)


def _emit(
    parts: list[tuple[np.ndarray, np.ndarray]], with_index: bool
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    if len(parts) == 1:
        batch_idx, batch_x = parts[0]
    else:
        batch_idx = np.concatenate([p[0] for p in parts])
        batch_x = np.concatenate([p[1] for p in parts])
    return (batch_idx, batch_x) if with_index else batch_x


class ActivationStream:
    """Batches of one hook's activations from a harvest in a workspace (float32, or as stored)."""

    def __init__(
        self,
        workspace: str | Path | Workspace | Sequence[str | Path | Workspace],
        hook: str,
        *,
        harvest: str | None = None,
        batch_size: int = 4096,
        seed: int = 0,
        split: Split = "train",
        eval_fraction: float = EVAL_FRACTION,
        exclude_special: bool = True,
        buffer_tokens: int = 131_072,
        chunk_tokens: int = 8192,
        values: Values = "float32",
    ) -> None:
        self.parts = open_parts(workspace, harvest, hook)  # checks the hook is in each part at one width
        info = self.parts[0].info
        self.ws = self.parts[0].ws  # the first source's workspace (None for a Parquet export)
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        if not 0.0 <= eval_fraction < 1.0:
            raise ValueError("eval_fraction must be in [0, 1)")
        self.harvest = info.name
        self.hook = hook
        self.d = info.hooks[hook]
        self.table = info.tables[hook]
        self.batch_size = batch_size
        self.seed = seed
        self.split = split
        self.exclude_special = exclude_special
        self.chunk_tokens = chunk_tokens
        self.chunks_per_buffer = max(1, buffer_tokens // chunk_tokens)
        self._threshold = split_threshold(eval_fraction)
        where = doc_split_sql(split) + (" AND NOT t.is_special" if exclude_special else "")
        self.readers = [
            HookReader(
                part,
                hook,
                where,
                [self._threshold],
                leave_out_skipped=True,
                consequence="they are not handed to a trainer",
            )
            for part in self.parts
        ]
        """One reader per part: the split's tokens, without the ones its harvest skipped as non-finite."""
        # A snapshot: tokens committed by a harvest still running after this point are not seen.
        sizes = np.array([p.info.n_tokens for p in self.parts], dtype=np.int64)
        self.part_offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        """Global tok_idx of each part's first token."""
        self.n_committed = int(sizes.sum())
        self.chunk_counts = self._count_chunks()
        dtypes = {r.value_dtype for r in self.readers}
        self.widen = values == "float32" or len(dtypes) > 1  # parts stored differently: float32
        self.dtype = np.dtype(np.float32) if self.widen else dtypes.pop()
        """The dtype of the batches."""
        self._last: tuple[tuple[int, ...], np.ndarray, np.ndarray] | None = None
        """The one buffer of a cache that fits in one, kept for every epoch (see `_buffer`)."""
        self.n_tokens = int(self.chunk_counts.sum())
        if self.n_tokens == 0:
            raise HarvestError(
                f"no {split} tokens for hook {hook!r} in harvest {info.name!r}"
                + (
                    " (the eval split is empty; raise eval_fraction or harvest more documents)"
                    if split == "eval"
                    else ""
                )
            )

    def _count_chunks(self) -> np.ndarray:
        """Kept tokens per chunk, the parts' chunks one after the other (chunk c of part p is global
        chunk `chunk_base[p] + c`)."""
        all_counts = [reader.chunk_counts(self.chunk_tokens) for reader in self.readers]
        self.chunk_base = np.concatenate([[0], np.cumsum([len(c) for c in all_counts])[:-1]]).astype(np.int64)
        self.chunk_part = np.repeat(np.arange(len(all_counts)), [len(c) for c in all_counts])
        return np.concatenate(all_counts)

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.n_tokens // self.batch_size)

    def _read_chunks(self, chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One buffer: the rows of these chunks, part by part, each chunk into its place in one
        preallocated array. Chunks of shard files are read two at a time (one request in flight
        while the other is copied: 15-20 % more of a virtual disk in random chunk order here)."""
        chunks = np.asarray(chunks, dtype=np.int64)
        layout = [
            (p, c) for p in range(len(self.readers)) for c in chunks[self.chunk_part[chunks] == p].tolist()
        ]
        counts = self.chunk_counts[[c for _, c in layout]]
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        idx = np.empty(int(starts[-1]), dtype=np.int64)
        x = np.empty((len(idx), self.d), dtype=self.dtype)

        def read(con: Any, j: int) -> None:
            p, chunk = layout[j]
            reader = self.readers[p]
            lo = (chunk - int(self.chunk_base[p])) * self.chunk_tokens
            hi = min(lo + self.chunk_tokens, reader.part.info.n_tokens)
            a, b = int(starts[j]), int(starts[j + 1])
            rows, _ = reader.read(con, lo, hi, out=x[a:b], widen=self.widen, check=False)
            if len(rows) != b - a:
                raise RuntimeError(
                    f"workspace changed under the stream: expected {b - a} rows, read {len(rows)}"
                )
            idx[a:b] = rows + int(self.part_offsets[p])

        for p, reader in enumerate(self.readers):
            mine = [j for j, (q, _) in enumerate(layout) if q == p]
            if not reader.needs_connection(self.chunk_tokens):
                list(chunk_readers().map(lambda j: read(None, j), mine))
                continue
            # Pages are read once per epoch; a small buffer pool keeps the stream's memory flat.
            with reader.part.read(memory_limit=READ_MEMORY_LIMIT) as con:
                for j in mine:
                    read(con, j)
        return idx, x

    def _buffer(self, chunks: np.ndarray, single: bool) -> tuple[np.ndarray, np.ndarray]:
        """A buffer's rows in file order. A cache that fits in one buffer is read once and kept for
        every epoch (only the visiting order differs); a larger one reads each buffer when visited
        and keeps none (called from the read-ahead thread too)."""
        if not single:
            return self._read_chunks(chunks)
        chunks = np.sort(chunks)
        key = tuple(chunks.tolist())
        last = self._last
        if last is None or last[0] != key:
            last = self._last = (key, *self._read_chunks(chunks))
        return last[1], last[2]

    def buffers(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The epoch's buffers (lists of chunk ids) and how many tokens each one holds."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.chunk_counts))
        order = order[self.chunk_counts[order] > 0]
        groups = [order[i : i + self.chunks_per_buffer] for i in range(0, len(order), self.chunks_per_buffer)]
        sizes = np.array([self.chunk_counts[g].sum() for g in groups], dtype=np.int64)
        return groups, sizes

    def _rows(self, position: int, one_epoch: bool = False) -> Buffers:
        """Buffers (tok_idx, x, visiting order) from `position` tokens into the endless stream of epochs.

        The buffer is never permuted in place or copied: batches gather their rows through the order.
        The next buffer is read on a thread while this one is handed out (the disk and the gathers
        work at once: the reads and numpy release the GIL), so at most two buffers are alive.
        """
        visits = self._visits(position, one_epoch)
        ahead: Future[tuple[np.ndarray, np.ndarray]] | None = None
        visit = next(visits, None)
        while visit is not None:
            epoch, g, chunks, single, skip = visit
            idx, x = ahead.result() if ahead is not None else self._buffer(chunks, single)
            visit = next(visits, None)
            ahead = read_ahead().submit(self._buffer, visit[2], visit[3]) if visit is not None else None
            self._refuse_nonfinite(idx, x)  # here, beside the next read
            order = np.random.default_rng([self.seed, epoch, g]).permutation(len(idx))[skip:]
            yield idx, x, order
            del idx, x, order

    def _refuse_nonfinite(self, idx: np.ndarray, x: np.ndarray) -> None:
        """The readers' NaN/inf refusal on a whole buffer (its rows are read unchecked)."""
        bad = nonfinite_any(x)
        if len(bad):
            part = int(np.searchsorted(self.part_offsets, idx[bad[0]], side="right")) - 1
            first, stop = self.part_offsets[part], self.part_offsets[part] + self.parts[part].info.n_tokens
            mine = bad[(idx[bad] >= first) & (idx[bad] < stop)]
            self.readers[part].refuse_nonfinite(idx[mine] - first, x[mine])

    def _visits(self, position: int, one_epoch: bool) -> Iterator[tuple[int, int, np.ndarray, bool, int]]:
        """(epoch, buffer number, its chunks, whether it is the epoch's only buffer, rows to skip) of
        every buffer from `position` tokens on."""
        epoch, offset = divmod(position, self.n_tokens)
        while True:
            groups, sizes = self.buffers(epoch)
            ends = np.cumsum(sizes)
            first = int(np.searchsorted(ends, offset, side="right"))
            skip = offset - (int(ends[first - 1]) if first else 0)
            for g in range(first, len(groups)):
                yield epoch, g, groups[g], len(groups) == 1, skip
                skip = 0
            if one_epoch:
                return
            epoch, offset = epoch + 1, 0

    def batches(
        self, start: int = 0, with_index: bool = False, rows: slice | None = None
    ) -> Iterator[np.ndarray]:
        """Endless full batches, epoch after epoch; batch `start` first (resume = same start).

        `rows`: only these rows of each batch (one process's share of a global batch in
        multi-process training; the processes together see exactly the single-process batches).
        """
        out = batched(self._rows(start * self.batch_size), self.batch_size, with_index, keep_last=False)
        if rows is None:
            return out  # type: ignore[return-value]
        return ((b[0][rows], b[1][rows]) if with_index else b[rows] for b in out)  # type: ignore[return-value,index]

    def epoch(self, epoch: int = 0, with_index: bool = False) -> Iterator[np.ndarray]:
        """One pass over every token of the split exactly once; the last batch may be short."""
        return batched(
            self._rows(epoch * self.n_tokens, one_epoch=True), self.batch_size, with_index, keep_last=True
        )  # type: ignore[return-value]


_READ_AHEAD: list[ThreadPoolExecutor] = []
_CHUNK_READERS: list[ThreadPoolExecutor] = []


def chunk_readers() -> ThreadPoolExecutor:
    """The two threads that read the chunks of a buffer."""
    if not _CHUNK_READERS:
        _CHUNK_READERS.append(ThreadPoolExecutor(max_workers=2, thread_name_prefix="saewb-chunk-read"))
    return _CHUNK_READERS[0]


def read_ahead() -> ThreadPoolExecutor:
    """The one thread that reads streams' next buffers."""
    if not _READ_AHEAD:
        _READ_AHEAD.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="saewb-read-ahead"))
    return _READ_AHEAD[0]
