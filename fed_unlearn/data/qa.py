"""Tokenisation of question/answer pairs with answer-only labels.

Labels are ``-100`` on the prompt (and on padding) and the answer token ids on the
answer, followed by the EOS token, as in TOFU / open-unlearning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

IGNORE_INDEX = -100

#: Maps a question to the full prompt text the answer follows (chat template
#: applied); provided by :func:`fed_unlearn.models.prompt_formatter`.
PromptFn = Callable[[str], str]


def encode_qa(
    tokenizer: object,
    prompt: str,
    answer: str,
    max_length: int = 256,
) -> tuple[list[int], list[int]]:
    """Tokenise ``prompt + answer + EOS`` with labels on the answer only.

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerBase
        Tokenizer of the model.
    prompt : str
        Fully formatted prompt (output of a :data:`PromptFn`).
    answer : str
        The answer text; EOS is appended.
    max_length : int
        Sequences are truncated from the left of the prompt so the answer survives.

    Returns
    -------
    tuple[list[int], list[int]]
        ``input_ids`` and ``labels`` of equal length.
    """
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    a_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    eos = tokenizer.eos_token_id  # type: ignore[attr-defined]
    if eos is not None:
        a_ids = [*a_ids, int(eos)]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and getattr(tokenizer, "add_bos_token", False):
        p_ids = [int(bos), *p_ids]
    a_ids = a_ids[:max_length]
    room = max_length - len(a_ids)
    p_ids = p_ids[-room:] if room > 0 else []
    return [*p_ids, *a_ids], [IGNORE_INDEX] * len(p_ids) + list(a_ids)


def collate(
    batch: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """Pad encoded pairs into ``input_ids``, ``attention_mask`` and ``labels``.

    Parameters
    ----------
    batch : Sequence[tuple[list[int], list[int]]]
        Output of :func:`encode_qa` for several items.
    pad_id : int
        Token id used for padding (labels get ``-100`` there).
    padding_side : str
        ``"right"`` (training, teacher-forced scoring) or ``"left"`` (generation).

    Returns
    -------
    dict[str, torch.Tensor]
        Batched long tensors of shape ``[B, T]``.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(
            f"padding_side must be 'left' or 'right', got {padding_side!r}"
        )
    width = max(len(ids) for ids, _ in batch)
    ids_t = torch.full((len(batch), width), pad_id, dtype=torch.long)
    lab_t = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    att_t = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, labels) in enumerate(batch):
        n = len(ids)
        sl = slice(width - n, width) if padding_side == "left" else slice(0, n)
        ids_t[i, sl] = torch.tensor(ids, dtype=torch.long)
        lab_t[i, sl] = torch.tensor(labels, dtype=torch.long)
        att_t[i, sl] = 1
    return {"input_ids": ids_t, "attention_mask": att_t, "labels": lab_t}
