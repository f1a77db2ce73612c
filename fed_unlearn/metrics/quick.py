"""Cheap per-round metric: mean answer probability over a few items.

Used by the per-round evaluation hook (forgetting curves) and by the ClientApp's
federated evaluation. Same definition as ``forget_Q_A_Prob`` (open-unlearning's
``probability``: ``exp(-avg NLL)`` over answer tokens, EOS included).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from fed_unlearn.data.qa import PromptFn, collate, encode_qa
from fed_unlearn.metrics.primitives import avg_loss, exact_memorization, token_logprobs
from fed_unlearn.types import QAItem


@torch.no_grad()
def answer_prob(
    model: Any,
    tokenizer: Any,
    prompt_fn: PromptFn,
    items: Sequence[QAItem],
    max_length: int,
    batch_size: int = 16,
) -> float:
    """Mean per-item answer probability ``exp(-avg NLL)``.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        Causal LM (its training mode is restored afterwards).
    tokenizer : PreTrainedTokenizerBase
        Its tokenizer.
    prompt_fn : PromptFn
        Prompt format.
    items : Sequence[QAItem]
        Items to score (must not be empty).
    max_length : int
        Token limit per example.
    batch_size : int
        Batch size.

    Returns
    -------
    float
        The mean probability.
    """
    if not items:
        raise ValueError("answer_prob needs at least one item")
    probs: list[float] = []
    for logits, labels in _batches(
        model, tokenizer, prompt_fn, items, max_length, batch_size
    ):
        probs.extend(torch.exp(-avg_loss(logits, labels)).tolist())
    return float(sum(probs) / len(probs))


@torch.no_grad()
def token_accuracy(
    model: Any,
    tokenizer: Any,
    prompt_fn: PromptFn,
    items: Sequence[QAItem],
    max_length: int,
    batch_size: int = 16,
) -> float:
    """Mean per-item teacher-forced token accuracy of the answers.

    Per item, the share of answer tokens (EOS excluded) that the greedy
    prediction gets right: exact memorization (open-unlearning's
    ``exact_memorization``, :func:`~fed_unlearn.metrics.primitives.exact_memorization`);
    items without such a token are skipped.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        Causal LM (its training mode is restored afterwards).
    tokenizer : PreTrainedTokenizerBase
        Its tokenizer.
    prompt_fn : PromptFn
        Prompt format.
    items : Sequence[QAItem]
        Items to score (must not be empty).
    max_length : int
        Token limit per example.
    batch_size : int
        Batch size.

    Returns
    -------
    float
        The mean accuracy in [0, 1].

    Raises
    ------
    ValueError
        No items, or no item with an answer token besides EOS.
    """
    if not items:
        raise ValueError("token_accuracy needs at least one item")
    accs: list[float] = []
    for logits, labels in _batches(
        model, tokenizer, prompt_fn, items, max_length, batch_size
    ):
        for _tok, vocab_lp, item_labels in token_logprobs(logits, labels):
            em = exact_memorization(vocab_lp.argmax(-1), item_labels)
            if em is not None:
                accs.append(em)
    if not accs:
        raise ValueError("token_accuracy: no answer has a token besides EOS")
    return float(sum(accs) / len(accs))


def _batches(
    model: Any,
    tokenizer: Any,
    prompt_fn: PromptFn,
    items: Sequence[QAItem],
    max_length: int,
    batch_size: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(logits, labels)`` per batch of items, the model in eval mode.

    The model's training mode is restored when the generator ends.
    """
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(items), batch_size):
            enc = [
                encode_qa(tokenizer, prompt_fn(it.question), it.answer, max_length)
                for it in items[s : s + batch_size]
            ]
            batch = collate(enc, int(tokenizer.pad_token_id))
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            yield logits, batch["labels"]
    finally:
        model.train(was_training)


#: T2F's tolerance: this share of the |original - oracle| forget-level gap.
T2F_BAND = 0.1


def t2f_delta(original: float, oracle: float) -> float:
    """T2F's tolerance δ = :data:`T2F_BAND` x |original - oracle|."""
    return T2F_BAND * abs(original - oracle)


def time_to_forget(
    curve: Sequence[float], oracle: float, delta: float, patience: int = 3
) -> int | None:
    """T2F: first round whose value stays within ``delta`` of the oracle.

    Our operational definition: the first round ``r`` (1-based) such that
    ``|curve[t] - oracle| <= delta`` for rounds ``r .. r + patience - 1``; when the
    curve is shorter than that window from ``r`` on, every remaining round must be
    within ``delta`` (and at least one). ``None`` if no round qualifies.

    Parameters
    ----------
    curve : Sequence[float]
        Forget metric per unlearning round.
    oracle : float
        The retrain model's value.
    delta : float
        Tolerance (the runner uses :func:`t2f_delta`).
    patience : int
        Rounds the value must stay within ``delta``.

    Returns
    -------
    int or None
        The round, or None.
    """
    if delta < 0 or patience < 1:
        raise ValueError("delta must be >= 0 and patience >= 1")
    ok = [abs(v - oracle) <= delta for v in curve]
    for r in range(len(ok)):
        window = ok[r : r + patience]
        if window and all(window):
            return r + 1
    return None


def spread_items(items: Sequence[Any], cap: int) -> list[Any]:
    """At most ``cap`` evenly spaced items (all when ``cap`` is 0 or large enough).

    Parameters
    ----------
    items : Sequence
        A split (e.g. items of several people, person by person).
    cap : int
        Maximum count; 0 = no cap.

    Returns
    -------
    list
        The selection, in the original order, covering the whole split.
    """
    if cap <= 0 or len(items) <= cap:
        return list(items)
    return [items[(i * len(items)) // cap] for i in range(cap)]
