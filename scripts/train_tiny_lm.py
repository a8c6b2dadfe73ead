"""Train `tiny-lm`, the project's own small causal language model, from text every install has.

The corpus is docstrings, read with `ast` (nothing is imported): the Python standard library and a
fixed list of packages the workbench depends on. Documents are deduplicated exactly (by the SHA-256 of
their text) and split into train and validation by that hash, so the split does not depend on order.
A byte-level BPE tokenizer (`tokenizers`) is trained on the train split, then a GPT-2 model
(`transformers`) on packed windows of `<|endoftext|>` + `ctx_len - 1` tokens: every window starts with
BOS, exactly like the windows `saewb harvest` feeds a causal LM.

Everything is deterministic given `--seed` (and the same Python / package versions, which decide the
corpus; the manifest records them and the corpus hash). Validation loss is compared with add-k smoothed
unigram and bigram models fit on the train split, scored on the same validation targets.

    python scripts/train_tiny_lm.py --out activations/tiny_lm            # the shipped model
    python scripts/train_tiny_lm.py --out /tmp/t --steps 20 --max-chars 300000   # a smoke run
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import platform
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from activations.corpus import module_docstrings

PACKAGES = (
    "numpy",
    "jax",
    "flax",
    "optax",
    "torch",
    "transformers",
    "tokenizers",
    "huggingface_hub",
    "transformer_lens",
    "pandas",
    "pyarrow",
    "duckdb",
    "safetensors",
    "streamlit",
    "tqdm",
    "yaml",
    "psutil",
)
"""Installed packages whose docstrings join the stdlib's: the workbench's dependencies (and theirs)."""
_DIST_NAMES = {"yaml": "pyyaml", "transformer_lens": "transformer-lens", "huggingface_hub": "huggingface-hub"}
_SKIP_DIRS = {
    "test",
    "tests",
    "testing",
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "turtledemo",
    "_vendor",
    "vendored",
    "third_party",
}
EOT = "<|endoftext|>"


@dataclass(frozen=True)
class TinyLMConfig:
    """Everything that decides the shipped weights (stored in manifest.json)."""

    seed: int = 0
    """Seeds the window shuffle and torch's initialisation."""
    vocab_size: int = 4096
    """Byte-level BPE vocabulary, `<|endoftext|>` included."""
    n_layer: int = 2
    n_embd: int = 256
    n_head: int = 4
    ctx_len: int = 256
    """Tokens per training window, BOS included (also the model's n_positions)."""
    batch_size: int = 16
    """Windows per optimiser step."""
    steps: int = 1500
    """Optimiser steps: the budget is set in steps (tokens), never in wall-clock time."""
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1
    min_doc_chars: int = 40
    max_chars: int = 12_000_000
    """Stop reading docstrings after this many characters (0 = all); the defaults train for about 1.8 epochs of it."""
    val_permille: int = 30
    """Documents whose text hash falls in the first this-many of 1000 buckets form the validation split."""
    max_val_windows: int = 400
    """Validation windows scored (the first ones of the packed validation stream)."""
    threads: int = 2


def _package_root(name: str) -> tuple[Path, str] | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    try:
        version = importlib.metadata.version(_DIST_NAMES.get(name, name))
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return root, version


def _tree_docs(root: Path, module_prefix: str) -> Iterator[tuple[str, str]]:
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        parts = path.relative_to(root).with_suffix("").parts
        yield from module_docstrings(
            tree, ".".join((module_prefix, *parts)) if module_prefix else ".".join(parts)
        )


def build_corpus(cfg: TinyLMConfig) -> tuple[list[tuple[str, str]], dict]:
    """(qualified name, text) documents, exact duplicates removed, in a fixed order; and what went in."""
    sources: list[tuple[str, str, Path, str]] = [
        ("stdlib", platform.python_version(), Path(sysconfig.get_paths()["stdlib"]), "")
    ]
    for name in PACKAGES:
        found = _package_root(name)
        if found is not None:
            sources.append((name, found[1], found[0], name))
    seen: set[str] = set()
    docs: list[tuple[str, str]] = []
    stats = []
    total = 0
    for name, version, root, prefix in sources:
        n_docs = n_dup = chars = 0
        for qualname, text in _tree_docs(root, prefix):
            if len(text) < cfg.min_doc_chars:
                continue
            h = hashlib.sha256(text.encode()).hexdigest()
            if h in seen:
                n_dup += 1
                continue
            seen.add(h)
            docs.append((qualname, text))
            n_docs += 1
            chars += len(text)
            total += len(text)
            if cfg.max_chars and total >= cfg.max_chars:
                break
        stats.append(
            {"source": name, "version": version, "docs": n_docs, "duplicates_dropped": n_dup, "chars": chars}
        )
        if cfg.max_chars and total >= cfg.max_chars:
            break
    corpus_hash = hashlib.sha256("\x00".join(t for _, t in docs).encode()).hexdigest()
    return docs, {
        "sources": stats,
        "docs": len(docs),
        "chars": total,
        "sha256": corpus_hash,
        "python": platform.python_version(),
    }


def split_docs(docs: list[tuple[str, str]], val_permille: int) -> tuple[list[str], list[str]]:
    """Validation = documents whose text hash lands in the first `val_permille` of 1000 buckets."""
    train, val = [], []
    for _, text in docs:
        bucket = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 1000
        (val if bucket < val_permille else train).append(text)
    return train, val


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT, model_max_length=1_000_000
    )


def pack_windows(tokenizer, texts: list[str], ctx_len: int) -> np.ndarray:
    """[n, ctx_len] int32: the stream `EOT doc EOT doc ...` cut into `ctx_len - 1` chunks, each after a BOS."""
    eot = tokenizer.eos_token_id
    stream: list[int] = []
    for start in range(0, len(texts), 2048):
        for ids in tokenizer(texts[start : start + 2048], add_special_tokens=False)["input_ids"]:
            stream.append(eot)
            stream.extend(ids)
    body = ctx_len - 1
    n = len(stream) // body
    chunks = np.asarray(stream[: n * body], dtype=np.int32).reshape(n, body)
    return np.concatenate([np.full((n, 1), eot, dtype=np.int32), chunks], axis=1)


def ngram_baselines(train: np.ndarray, val: np.ndarray, vocab: int) -> dict[str, dict]:
    """Add-k unigram and bigram cross-entropy (nats/token) on the validation targets (positions 1..).

    Counts come from the train windows' targets (and, for the bigram, their previous token). k is chosen
    from a grid by validation loss, which favours the baselines, never the model.
    """
    uni = np.bincount(train[:, 1:].ravel(), minlength=vocab).astype(np.float64)
    prev, nxt = train[:, :-1].ravel().astype(np.int64), train[:, 1:].ravel().astype(np.int64)
    bi = np.bincount(prev * vocab + nxt, minlength=vocab * vocab).reshape(vocab, vocab).astype(np.float64)
    vp, vn = val[:, :-1].ravel().astype(np.int64), val[:, 1:].ravel().astype(np.int64)
    out: dict[str, dict] = {}
    best_u = min(
        (-np.mean(np.log((uni[vn] + k) / (uni.sum() + k * vocab))), k) for k in (0.01, 0.1, 0.5, 1.0)
    )
    out["unigram"] = {"loss": float(best_u[0]), "ppl": float(math.exp(best_u[0])), "k": best_u[1]}
    row = bi.sum(1)
    best_b = min(
        (-np.mean(np.log((bi[vp, vn] + k) / (row[vp] + k * vocab))), k)
        for k in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    )
    out["bigram"] = {"loss": float(best_b[0]), "ppl": float(math.exp(best_b[0])), "k": best_b[1]}
    return out


def evaluate(model, windows: np.ndarray, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats) over positions 1.. of each window."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            x = torch.from_numpy(windows[start : start + batch_size].astype(np.int64))
            logits = model(x).logits[:, :-1].double()
            lp = torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None])
            total -= float(lp.sum())
            count += lp.numel()
    return total / count


def train(cfg: TinyLMConfig, out: Path, log=print) -> dict:
    """Build the corpus, train tokenizer and model, evaluate, write `out`; returns the manifest."""
    import torch

    with torch.enable_grad():  # whatever the caller's mode (a notebook cell under torch.no_grad, say)
        return _train(cfg, out, log)


def _train(cfg: TinyLMConfig, out: Path, log) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()
    docs, corpus = build_corpus(cfg)
    train_texts, val_texts = split_docs(docs, cfg.val_permille)
    log(
        f"corpus: {corpus['docs']} docs, {corpus['chars'] / 1e6:.1f} M chars, train {len(train_texts)} "
        f"val {len(val_texts)} docs ({time.time() - t0:.0f}s)"
    )
    tokenizer = train_tokenizer(train_texts, cfg.vocab_size)
    tr = pack_windows(tokenizer, train_texts, cfg.ctx_len)
    va = pack_windows(tokenizer, val_texts, cfg.ctx_len)[: cfg.max_val_windows]
    vocab = len(tokenizer)
    log(
        f"tokenizer: vocab {vocab}; train {tr.size / 1e6:.2f} M tokens ({len(tr)} windows), "
        f"val scored {va.size} tokens ({time.time() - t0:.0f}s)"
    )
    baselines = ngram_baselines(tr, va, vocab)
    log(f"baselines: {json.dumps(baselines)}")

    torch.manual_seed(cfg.seed)
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=cfg.ctx_len,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,  # under two epochs: dropout would only slow learning
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(tr))
    need = cfg.steps * cfg.batch_size
    while len(order) < need:  # more steps than windows: further epochs, each freshly shuffled
        order = np.concatenate([order, rng.permutation(len(tr))])
    curve = []
    model.train()
    t_train = time.time()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        x = torch.from_numpy(tr[idx].astype(np.int64))
        loss = model(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == cfg.steps - 1:
            entry = {
                "step": step,
                "train_loss": round(float(loss.detach()), 4),
                "lr": lr_at(step),
                "elapsed_s": round(time.time() - t_train, 1),
            }
            if step % 100 == 0 or step == cfg.steps - 1:
                model.eval()
                entry["val_loss"] = round(evaluate(model, va[:48]), 4)
                model.train()
            curve.append(entry)
            log(json.dumps(entry))
    model.eval()
    val_loss = evaluate(model, va)
    result = {
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "val_tokens_scored": int(va[:, 1:].size),
        "baselines": baselines,
        "train_tokens_seen": need * cfg.ctx_len,
        "train_tokens_available": int(tr.size),
        "train_seconds": round(time.time() - t_train, 1),
    }
    log(f"final: {json.dumps(result)}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    manifest = {
        "config": asdict(cfg),
        "corpus": corpus,
        "result": result,
        "curve": curve,
        "n_params": sum(p.numel() for p in model.parameters()),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": importlib.metadata.version("transformers"),
            "tokenizers": importlib.metadata.version("tokenizers"),
        },
        "weights_sha256": hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for the model, tokenizer and manifest"
    )
    defaults = TinyLMConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    train(TinyLMConfig(**args), out, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
