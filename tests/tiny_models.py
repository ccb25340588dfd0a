"""Tiny random models with the embedded model's real tokenizer, for fast tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from chameleon.core.model import embedded_model_dir, prepare_tokenizer


def embedded_tokenizer():
    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    prepare_tokenizer(tok)
    return tok


def tiny_llama(tok, seed: int = 0, layers: int = 4, hidden: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def save_tiny_model(path: Path, seed: int = 0, layers: int = 4) -> Path:
    tok = embedded_tokenizer()
    model = tiny_llama(tok, seed=seed, layers=layers)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def random_llama(seed: int, layers: int = 2, hidden: int = 64, vocab: int = 256) -> LlamaForCausalLM:
    """A tiny random Llama without a tokenizer (for fingerprints and shapes)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()
