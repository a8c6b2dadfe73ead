"""Tiny models built locally from a transformers config, for tests that need a causal LM offline."""

from __future__ import annotations

import itertools
from pathlib import Path

CHAT_TEMPLATE = "{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def build_tiny_gpt2(
    out_dir: Path, n_layer: int = 2, d_model: int = 64, vocab_size: int = 512, seed: int = 0
) -> Path:
    """A random few-layer GPT-2 with a byte-level BPE tokenizer trained on stdlib docstrings."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from activations.corpus import stdlib_docs

    texts = [d.text for d in itertools.islice(stdlib_docs(max_chars=200_000), 300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(fast),
        n_positions=256,
        n_embd=d_model,
        n_layer=n_layer,
        n_head=2,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir
