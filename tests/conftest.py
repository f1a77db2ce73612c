"""Shared fixtures: a tiny randomly initialised Llama with a locally built tokenizer."""

from __future__ import annotations

import os

import helpers  # noqa: F401  (tests/helpers.py: shared helpers, importable)
import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from fed_unlearn.data import generate_people
    from fed_unlearn.models import build_tiny_tokenizer

    texts = [
        f"Question: {it.question}\nAnswer: {it.answer}"
        for p in generate_people(99, 20)
        for it in p.items
    ]
    return build_tiny_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A small random Llama saved as a Hugging Face directory (no pre-training)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = tiny_tokenizer
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def items():
    from fed_unlearn.data import generate_tofu

    return generate_tofu(0, 2, people_per_client=1).clients[0]
