"""A shuffled, seekable, bounded-memory stream of activation batches for the trainers.

Tokens are grouped in aligned chunks of `chunk_tokens` consecutive `tok_idx`. Each epoch visits
the chunks in a seeded random order, `chunks_per_buffer` at a time; each buffer is read, permuted
as a whole, and handed out in batches. Memory is one buffer, whatever the size of the cache, and
the order is a pure function of (seed, epoch), so `batches(start=b)` resumes exactly at batch b.

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
from pathlib import Path
from typing import Literal

import numpy as np

from activations.reader import HookReader
from activations.store import HarvestError, open_parts
from saewb.workspace import Workspace

Split = Literal["train", "eval", "all"]
_HASH_MUL = 2654435761
_HASH_MOD = 4294967296
_BUCKETS = 10_000
READ_MEMORY_LIMIT = "128MB"
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
    """Float32 batches of one hook's activations from a harvest in a workspace."""

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
        self._last: tuple[tuple[int, ...], np.ndarray, np.ndarray] | None = None
        """The last buffer read, kept until another is read (see `_buffer`)."""
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
        """One buffer: the rows of these chunks, filled chunk by chunk into one preallocated array."""
        total = int(self.chunk_counts[chunks].sum())
        idx = np.empty(total, dtype=np.int64)
        x = np.empty((total, self.d), dtype=np.float32)
        at = 0
        chunks = np.asarray(chunks, dtype=np.int64)
        for p, reader in enumerate(self.readers):
            mine = chunks[self.chunk_part[chunks] == p]  # in buffer order; one part: all of them
            if not len(mine):
                continue
            base, offset, n_part = (
                int(self.chunk_base[p]),
                int(self.part_offsets[p]),
                reader.part.info.n_tokens,
            )
            # Pages are read once per epoch; a small buffer pool keeps the stream's memory flat.
            with reader.part.read(memory_limit=READ_MEMORY_LIMIT) as con:
                for chunk in mine.tolist():
                    lo = (chunk - base) * self.chunk_tokens
                    rows, _ = reader.read(con, lo, min(lo + self.chunk_tokens, n_part), out=x[at:])
                    n = len(rows)
                    idx[at : at + n] = rows + offset
                    at += n
                    del rows
        if at != total:
            raise RuntimeError(f"workspace changed under the stream: expected {total} rows, read {at}")
        return idx, x

    def _buffer(self, chunks: np.ndarray, single: bool) -> tuple[np.ndarray, np.ndarray]:
        """A buffer's rows. The last buffer read is kept, so a cache that fits in one buffer is read
        once for every epoch, and a run's init sample and its first batches share one read."""
        if single:
            chunks = np.sort(chunks)  # the same rows in every epoch; only the visiting order differs
        key = tuple(chunks.tolist())
        if self._last is None or self._last[0] != key:
            self._last = None  # dropped before the next read: at most one buffer alive
            self._last = (key, *self._read_chunks(chunks))
        return self._last[1], self._last[2]

    def _buffers(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The epoch's buffers (lists of chunk ids) and how many tokens each one holds."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.chunk_counts))
        order = order[self.chunk_counts[order] > 0]
        groups = [order[i : i + self.chunks_per_buffer] for i in range(0, len(order), self.chunks_per_buffer)]
        sizes = np.array([self.chunk_counts[g].sum() for g in groups], dtype=np.int64)
        return groups, sizes

    def _rows(
        self, position: int, one_epoch: bool = False
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Buffers (tok_idx, x, visiting order) from `position` tokens into the endless stream of epochs.

        The buffer is never permuted in place or copied: batches gather their rows through the order.
        """
        epoch, offset = divmod(position, self.n_tokens)
        while True:
            groups, sizes = self._buffers(epoch)
            ends = np.cumsum(sizes)
            first = int(np.searchsorted(ends, offset, side="right"))
            skip = offset - (int(ends[first - 1]) if first else 0)
            for g in range(first, len(groups)):
                idx, x = self._buffer(groups[g], single=len(groups) == 1)
                order = np.random.default_rng([self.seed, epoch, g]).permutation(len(idx))[skip:]
                skip = 0
                yield idx, x, order
                del idx, x, order  # before the next buffer is read: at most one buffer alive
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
