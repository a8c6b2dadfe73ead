"""Activations computed by the model while training, with no cache: `saewb train --from-model`.

The corpus is cut into windows exactly as a harvest cuts it (`activations.harvest.iter_windows`:
corpus order, length-sorted blocks), and the windows are grouped, in that order, into shuffling
buffers: consecutive windows until a buffer holds at least `buffer_tokens` kept tokens (the split's
documents, special tokens left out). A buffer is one run of forward passes over its own windows in
batches of `batch_windows`, so its activations do not depend on where a run started; its rows are
permuted with the seeded order (seed, epoch, buffer) and cut into batches by the same batching as
the cached stream (`activations.stream.batched`). Batch b is therefore a pure function of (seed, b):
`batches(start=b)` resumes at the same corpus position by tokenising (not running the model over)
the buffers before it. At the end of the corpus the next epoch begins with new orders.

`LiveSource` runs the model once per buffer for every hook it was given and keeps the last buffer,
so the streams of several hooks (a sweep) advancing together share one forward pass.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np

from activations.harvest import HarvestConfig, forward_windows, hook_widths, iter_windows
from activations.models import load_model, plan_hooks
from activations.store import HarvestError
from activations.stream import EVAL_FRACTION, Buffers, Split, batched, doc_in_split, split_threshold
from activations.tokenize import Window, WindowTokenizer

BUFFER_TOKENS = 131_072
"""Kept tokens per shuffling buffer at least (the cached stream's default buffer)."""


class LiveSource:
    """A model and a corpus: buffers of windows and their activations at some hooks."""

    def __init__(self, cfg: HarvestConfig, model: Any | None = None) -> None:
        self.cfg = cfg
        self.model = model if model is not None else load_model(cfg.model, cfg.device)
        self.plan = plan_hooks(self.model, list(cfg.hooks))
        self.splitter = WindowTokenizer(self.model.tokenizer, cfg.ctx_len)
        self.widths = hook_widths(self.model, self.plan, self.splitter.pad_id)
        self._last: tuple[tuple[int, int, int], dict[str, np.ndarray]] | None = None
        """(epoch, first tok_idx, windows) and its activations: the last buffer computed, for every hook."""

    def hook(self, name: str) -> str:
        """The canonical name of a hook of this source (aliases allowed)."""
        canonical = plan_hooks(self.model, [name]).hooks[0]
        if canonical not in self.plan.hooks:
            raise HarvestError(
                f"hook {name!r} is not one of this source's hooks ({', '.join(self.plan.hooks)})"
            )
        return canonical

    def buffers(self, keep: Any, buffer_tokens: int) -> Iterator[tuple[list[Window], np.ndarray, int]]:
        """(windows, kept-token mask over their tokens, tok_idx of their first token) per buffer of one
        pass over the corpus; `keep(window)` gives a window's kept tokens. Tokenisation only."""
        group: list[Window] = []
        masks: list[np.ndarray] = []
        kept, tok, first = 0, 0, 0
        for window in iter_windows(self.cfg, self.splitter):
            mask = keep(window)
            group.append(window)
            masks.append(mask)
            kept += int(mask.sum())
            tok += len(window.token_ids)
            if kept >= buffer_tokens:
                yield group, np.concatenate(masks), first
                group, masks, kept, first = [], [], 0, tok
        if group:
            yield group, np.concatenate(masks), first

    def activations(self, key: tuple[int, int, int], windows: list[Window]) -> dict[str, np.ndarray]:
        """Hook -> [tokens, d] float32 of these windows, from the model or the last buffer computed;
        `key` (epoch, first tok_idx, windows) names the buffer whatever stream asks for it."""
        if self._last is None or self._last[0] != key:
            self._last = None  # at most one buffer alive
            size = self.cfg.batch_size
            parts = [
                forward_windows(self.model, self.plan, self.splitter.pad_id, windows[i : i + size])
                for i in range(0, len(windows), size)
            ]
            self._last = (key, {h: np.concatenate([p[h] for p in parts]) for h in self.plan.hooks})
        return self._last[1]


class LiveStream:
    """Float32 batches of one hook's activations computed on the fly: the interface of
    `ActivationStream` (`batches`, `epoch`, `d`, `batch_size`) without a cache."""

    def __init__(
        self,
        source: LiveSource,
        hook: str,
        *,
        batch_size: int = 4096,
        seed: int = 0,
        split: Split = "train",
        eval_fraction: float = EVAL_FRACTION,
        exclude_special: bool = True,
        buffer_tokens: int = BUFFER_TOKENS,
    ) -> None:
        if batch_size < 1 or buffer_tokens < 1:
            raise ValueError("batch_size and buffer_tokens must be positive")
        self.source = source
        self.hook = source.hook(hook)
        self.d = source.widths[self.hook]
        self.batch_size = batch_size
        self.seed = seed
        self.split = split
        self.exclude_special = exclude_special
        self.buffer_tokens = buffer_tokens
        self._threshold = split_threshold(eval_fraction)

    def _keep(self, window: Window) -> np.ndarray:
        mask = np.full(
            len(window.token_ids),
            bool(doc_in_split(np.array([window.doc_id]), self.split, self._threshold)[0]),
        )
        return mask & ~window.special if self.exclude_special else mask

    def _rows(self, position: int, one_epoch: bool = False) -> Buffers:
        """Buffers (tok_idx, x, visiting order) from `position` kept tokens into the endless stream."""
        epoch = 0
        while True:
            seen_any = False
            for k, (windows, mask, first) in enumerate(self.source.buffers(self._keep, self.buffer_tokens)):
                n = int(mask.sum())
                seen_any = seen_any or n > 0
                if position >= n:  # before the start: tokenised, never run through the model
                    position -= n
                    continue
                x = self.source.activations((epoch, first, len(windows)), windows)[self.hook][mask]
                idx = (first + np.flatnonzero(mask)).astype(np.int64)
                order = np.random.default_rng([self.seed, epoch, k]).permutation(n)[position:]
                position = 0
                yield idx, x, order
                del x, idx, order
            if not seen_any:
                raise HarvestError(
                    f"corpus {self.source.cfg.corpus!r} has no {self.split} tokens to train on "
                    "(it is empty, or every document is held out)"
                )
            if one_epoch:
                return
            epoch += 1

    def batches(self, start: int = 0, with_index: bool = False) -> Iterator[np.ndarray]:
        """Endless full batches; batch `start` first (resume = same start)."""
        return batched(self._rows(start * self.batch_size), self.batch_size, with_index, keep_last=False)  # type: ignore[return-value]

    def epoch(self, with_index: bool = False) -> Iterator[np.ndarray]:
        """One pass over the corpus's split; the last batch may be short."""
        return batched(self._rows(0, one_epoch=True), self.batch_size, with_index, keep_last=True)  # type: ignore[return-value]


LIVE_SETTINGS = ("model", "corpus", "ctx_len", "model_batch_size", "shuffle_tokens", "device")
"""What on-the-fly training is configured by (`saewb train --from-model`, a sweep's `from_model:`)."""


def live_settings(values: dict[str, Any]) -> dict[str, Any]:
    """The settings of on-the-fly training with their defaults (a harvest's), checked."""
    unknown = sorted(set(values) - set(LIVE_SETTINGS))
    if unknown:
        raise ValueError(f"unknown from_model setting(s) {unknown}; valid ones are {list(LIVE_SETTINGS)}")
    if not values.get("model"):
        raise ValueError(
            "on-the-fly training needs a model (--from-model MODEL, or `model:` under from_model:)"
        )
    default = HarvestConfig()
    out = {
        "model": str(values["model"]),
        "corpus": str(values.get("corpus") or default.corpus),
        "ctx_len": int(values.get("ctx_len") or default.ctx_len),
        "model_batch_size": int(values.get("model_batch_size") or default.batch_size),
        "shuffle_tokens": int(values.get("shuffle_tokens") or BUFFER_TOKENS),
        "device": str(values.get("device") or default.device),
    }
    if out["ctx_len"] < 2 or out["model_batch_size"] < 1 or out["shuffle_tokens"] < 1:
        raise ValueError("ctx_len must be at least 2, model_batch_size and shuffle_tokens positive")
    return out


_SOURCES: dict[str, LiveSource] = {}
"""The last source opened: a run's training and held-out streams share its model."""


def open_live(settings: dict[str, Any], hooks: list[str]) -> LiveSource:
    """The model of these settings, ready to compute these hooks (kept for the next call)."""
    key = json.dumps(settings, sort_keys=True)
    held = _SOURCES.get(key)
    if held is not None and all(h in held.plan.hooks or h in held.cfg.hooks for h in hooks):
        return held  # a source computing more hooks serves these too
    _SOURCES.clear()
    cfg = replace(
        HarvestConfig(),
        model=settings["model"],
        corpus=settings["corpus"],
        hooks=tuple(hooks),
        ctx_len=settings["ctx_len"],
        batch_size=settings["model_batch_size"],
        device=settings["device"],
    )
    _SOURCES[key] = LiveSource(cfg)
    return _SOURCES[key]


def live_record(settings: dict[str, Any]) -> dict[str, Any]:
    """What a run records of its on-the-fly data: everything that decides the batches (not the device)."""
    return {k: v for k, v in settings.items() if k != "device"}
