"""Turning documents into fixed-size context windows the way the model expects them.

A document is tokenised without special tokens, cut into windows of `ctx_len` minus the model's
own wrapping (CLS/SEP for BERT-style encoders, BOS for causal LMs), and each window is wrapped
again. Nothing is truncated silently and no window mixes two documents.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from activations.corpus import Document

TEMPLATE_ROLE = "template"
"""Role given to chat-template scaffolding (headers, separators) as opposed to message content."""


class TokenizationError(ValueError):
    """The model's tokenizer cannot do what the corpus needs."""


@dataclass(frozen=True)
class Window:
    """One context window: what one row of a forward batch holds."""

    doc_id: int
    """Index of the document in corpus order."""
    window: int
    """Index of this window within its document."""
    token_ids: np.ndarray
    """int64 token ids, length <= ctx_len."""
    special: np.ndarray
    """True for tokens that are special (BOS/CLS/SEP/PAD and the like)."""
    doc: Document
    """The document the window was cut from."""
    roles: tuple[str, ...] | None = None
    """Per-token chat role for chat corpora, None otherwise."""


class WindowTokenizer:
    """Cuts documents into model-ready windows."""

    def __init__(self, tokenizer: Any, ctx_len: int) -> None:
        self.tokenizer = tokenizer
        self.ctx_len = ctx_len
        self.special_ids = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
        self.prefix, self.suffix = self._wrapping()
        self.body_len = ctx_len - len(self.prefix) - len(self.suffix)
        if self.body_len < 1:
            raise TokenizationError(
                f"--ctx-len {ctx_len} leaves no room for text after the model's special tokens"
            )

    def _wrapping(self) -> tuple[list[int], list[int]]:
        """The tokens the tokenizer wraps text in (BERT: [CLS] ... [SEP]), found by tokenising a probe."""
        tok = self.tokenizer
        bare = list(tok("probe", add_special_tokens=False)["input_ids"])
        full = list(tok("probe")["input_ids"])
        for at in range(len(full) - len(bare) + 1):
            if full[at : at + len(bare)] == bare and (full != bare):
                return full[:at], full[at + len(bare) :]
        # Causal LMs: TransformerLens prepends BOS by default, so the cache matches what it sees.
        bos = tok.bos_token_id
        if bos is not None and bos != tok.unk_token_id:
            return [bos], []
        return [], []

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        return int(pad) if pad is not None else 0

    def windows(self, doc_id: int, doc: Document) -> Iterator[Window]:
        if doc.messages:
            yield from self._chat_windows(doc_id, doc)
            return
        ids = self.tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        prefix = np.array(self.prefix, dtype=np.int64)
        suffix = np.array(self.suffix, dtype=np.int64)
        for w, start in enumerate(range(0, max(len(ids), 1), self.body_len)):
            body = np.asarray(ids[start : start + self.body_len], dtype=np.int64)
            token_ids = np.concatenate([prefix, body, suffix])
            special = np.isin(token_ids, self.special_ids)
            special[: len(prefix)] = True
            if len(suffix):
                special[-len(suffix) :] = True
            yield Window(doc_id=doc_id, window=w, token_ids=token_ids, special=special, doc=doc)

    def _chat_windows(self, doc_id: int, doc: Document) -> Iterator[Window]:
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise TokenizationError(
                "this model's tokenizer has no chat template, so a chat corpus cannot be rendered; "
                "use a chat/instruct model or a plain-text corpus"
            )
        messages = [dict(m) for m in doc.messages]
        text = tok.apply_chat_template(messages, tokenize=False)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        spans = _content_spans(text, messages)
        roles = []
        for start, end in enc["offset_mapping"]:
            role = TEMPLATE_ROLE
            for span_start, span_end, span_role in spans:
                if start >= span_start and end <= span_end and end > start:
                    role = span_role
                    break
            roles.append(role)
        special = np.isin(ids, self.special_ids)
        for w, start in enumerate(range(0, max(len(ids), 1), self.ctx_len)):
            sl = slice(start, start + self.ctx_len)
            yield Window(
                doc_id=doc_id,
                window=w,
                token_ids=ids[sl],
                special=special[sl],
                doc=doc,
                roles=tuple(roles[sl]),
            )


def _content_spans(text: str, messages: list[dict[str, str]]) -> list[tuple[int, int, str]]:
    """Character spans of each message's content inside the rendered chat text."""
    spans = []
    cursor = 0
    for message in messages:
        content = message["content"].strip()
        if not content:
            continue
        at = text.find(content, cursor)
        if at < 0:
            continue  # templates may rewrite content; its tokens then count as scaffolding
        spans.append((at, at + len(content), message["role"]))
        cursor = at + len(content)
    return spans


class TokenStrings:
    """Each token id as the text it stands for, spaces included, decoded once per id.

    Byte-level BPE tokens decode with their leading space already. WordPiece (BERT, MiniLM) drops
    word boundaries when tokens are decoded one at a time, so a word-initial piece gets a leading
    space back and a `##` continuation loses its marker: joining the strings gives readable text.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.special = set(tokenizer.all_special_ids)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.wordpiece = type(getattr(backend, "model", None)).__name__ == "WordPiece"
        self.cache: dict[int, str] = {}

    def one(self, token_id: int) -> str:
        s = self.cache.get(token_id)
        if s is None:
            if self.wordpiece and token_id not in self.special:
                piece = self.tokenizer.convert_ids_to_tokens(token_id)
                s = piece[2:] if piece.startswith("##") else " " + piece
            else:
                s = self.tokenizer.decode([token_id])
            self.cache[token_id] = s
        return s

    def __call__(self, ids: np.ndarray | list[int]) -> list[str]:
        return [self.one(i) for i in np.asarray(ids).tolist()]
