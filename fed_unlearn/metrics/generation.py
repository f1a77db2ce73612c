"""Greedy generation for the generation-based metrics (ROUGE, fluency, samples).

:func:`greedy_generations` decodes greedily (``do_sample=False``, one beam),
batched and sorted by prompt length with left padding, cuts each generation at EOS
and strips it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fed_unlearn.data.qa import IGNORE_INDEX, collate
from fed_unlearn.metrics.model_api import model_device

#: Default greedy-generation batch: a decoding step on CPU costs about the same
#: for 16 and 64 rows (weight reads dominate), so generation batches are wider
#: than scoring ones (SmolLM2, 2 cores: 78 s -> 38 s for 300 generations).
GEN_BATCH_SIZE = 64


def encode_prompt(tokenizer: Any, prompt: str, max_length: int) -> list[int]:
    """Token ids of a generation prompt (BOS if the tokenizer adds one), left-cut.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
        The model's tokenizer.
    prompt : str
        Prompt text.
    max_length : int
        Keep at most this many trailing tokens.

    Returns
    -------
    list[int]
        The ids.

    Raises
    ------
    ValueError
        If the prompt encodes to no tokens.
    """
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [int(bos), *ids]
    ids = ids[-max_length:]
    if not ids:
        raise ValueError(f"prompt {prompt!r} encodes to no tokens")
    return ids


def greedy_generations(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    max_length: int,
    batch_size: int,
    pad_id: int,
    eos_id: int | None,
) -> list[str]:
    """Greedy generations for prompts (batched by length, left padding).

    Parameters
    ----------
    model : transformers.PreTrainedModel or peft.PeftModel
        The causal LM.
    tokenizer : PreTrainedTokenizerBase
        Its tokenizer.
    prompts : Sequence[str]
        Prompt texts.
    max_new_tokens : int
        Generation length.
    max_length : int
        Maximum prompt tokens (cut from the left).
    batch_size : int
        Prompts per ``generate`` call.
    pad_id : int
        Padding token id.
    eos_id : int or None
        EOS token id: generation stops there and the text is cut before it.

    Returns
    -------
    list[str]
        One stripped generation per prompt, in the order of ``prompts``.
    """
    if not prompts:
        return []
    from transformers import GenerationConfig

    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )
    device = model_device(model)
    enc = [encode_prompt(tokenizer, p, max_length) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(enc[i]))
    texts = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate(
            [(enc[i], [IGNORE_INDEX] * len(enc[i])) for i in idx],
            pad_id,
            "left",
        )
        width = batch["input_ids"].size(1)
        out = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            generation_config=gen_cfg,
        )
        for j, i in enumerate(idx):
            new = out[j, width:].tolist()
            if eos_id is not None and eos_id in new:
                new = new[: new.index(eos_id)]
            text = tokenizer.decode(new, skip_special_tokens=True)
            texts[i] = text.strip()
    return texts


__all__ = ["GEN_BATCH_SIZE", "encode_prompt", "greedy_generations"]
