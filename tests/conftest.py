"""Shared fixtures: a tiny randomly initialised Llama with a locally built tokenizer.

Every test run owns its caches: before any test module is imported, the
fed_unlearn cache (the tiny base, SmolLM2's conversion, cached FL phases) and
the XDG cache and config homes (matplotlib's font cache, Hugging Face's hub)
point into one fresh temporary directory, removed when the run ends; CLI runs
the tests start inherit it. So no result depends on what ``~/.cache`` holds,
and a run with an empty ``HOME`` writes nothing there
(``tests/test_home.py`` checks it). ``FED_UNLEARN_TEST_CACHE=DIR`` (opt-in)
takes the fed_unlearn cache from ``DIR`` instead, to reuse a built tiny base.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import helpers  # noqa: F401  (tests/helpers.py: shared helpers, importable)
import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: this test run's own cache directories (environment variable -> subdirectory)
RUN_CACHES = {
    "FED_UNLEARN_CACHE": "fed_unlearn",
    "FED_UNLEARN_RUNS": "fed_unlearn/runs",
    "XDG_CACHE_HOME": "xdg-cache",
    "XDG_CONFIG_HOME": "xdg-config",
    "MPLCONFIGDIR": "matplotlib",
}
RUN_CACHE_ROOT = Path(tempfile.mkdtemp(prefix="fed_unlearn-tests-"))
for _var, _sub in RUN_CACHES.items():
    os.environ[_var] = str(RUN_CACHE_ROOT / _sub)
#: opt-in for development on a busy machine: a fed_unlearn cache of your own
#: choice (e.g. a copy holding a built tiny base); FL phases stay per run
TEST_CACHE_ENV = "FED_UNLEARN_TEST_CACHE"
if os.environ.get(TEST_CACHE_ENV):
    os.environ["FED_UNLEARN_CACHE"] = os.environ[TEST_CACHE_ENV]


def pytest_unconfigure(config):
    """Remove this run's caches."""
    shutil.rmtree(RUN_CACHE_ROOT, ignore_errors=True)


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
