"""TOFU-style evaluation of a causal LM (open-unlearning key names and formats).

:func:`evaluate` scores any Hugging Face causal LM (plain or PEFT-wrapped) on four
splits of :class:`~fed_unlearn.types.QAItem`:

* ``forget``  -- the departed client's data (what should be forgotten);
* ``retain``  -- the remaining clients' held-in data;
* ``holdout`` -- same-distribution data never trained on (MIA non-members);
* ``general`` -- general-knowledge probes with perturbed (wrong) options.

TOFU's model utility averages 9 numbers: retain, real-authors and world-facts x
{Prob, ROUGE, Truth Ratio}.  We have a single general-knowledge split, so its
triple (``gk_Q_A_Prob``, ``gk_Q_A_ROUGE``, ``gk_Truth_Ratio``) is used for BOTH the
real-authors and the world-facts slots (it weighs twice in the harmonic mean).
On the probes the correct option compared with the perturbed ones (normalised
Prob, truth ratio) is the paraphrase when an item has one, else the answer: our
generator shapes the perturbed answers like the paraphrase (TOFU's RA/WF options
are shaped like the answer, which is why open-unlearning uses the answer there).
Items without paraphrase/perturbed answers are skipped for the truth ratio (and
for the normalised Prob); a ValueError is raised if no item remains.

Every metric is a function registered in
:data:`~fed_unlearn.metrics.registry.METRIC_REGISTRY`, taking the evaluation
context, and declares there what it reads.  Teacher-forced scores are computed
once per (prompt, answer) pair under ``torch.no_grad()`` in eval mode and shared by
all metrics: each unique prompt runs once (batched, left padding) and its answers
are scored as continuations of its KV cache (batched, right padding), which equals
one full forward pass per pair (the old path, kept as
``evaluate(..., share_prompts=False)`` and as the fallback); greedy generations
(left padding) are cached as well.

This module orchestrates an evaluation; the parts live in

* :mod:`~fed_unlearn.metrics.definitions` -- the metric functions and their
  declarations (:data:`TOFU_METRICS`, :data:`MODEL_UTILITY_PARTS`);
* :mod:`~fed_unlearn.metrics.context` -- :class:`EvalSplits` and the context the
  metrics read;
* :mod:`~fed_unlearn.metrics.scoring` -- the teacher-forced scorer (KV-sharing and
  plain passes), with :mod:`~fed_unlearn.metrics.model_api` for the model's
  forward / cache API;
* :mod:`~fed_unlearn.metrics.generation` -- greedy generation;
* :mod:`~fed_unlearn.metrics.lora_merge` -- :func:`merged_lora`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from fed_unlearn.data.qa import PromptFn
from fed_unlearn.metrics import primitives as P
from fed_unlearn.metrics.context import SPLIT_NAMES, EvalContext, EvalSplits
from fed_unlearn.metrics.definitions import MODEL_UTILITY_PARTS, TOFU_METRICS
from fed_unlearn.metrics.lora_merge import merged_lora
from fed_unlearn.metrics.registry import METRIC_REGISTRY, get_metric


def _closure(names: Sequence[str]) -> list[str]:
    """Return ``names`` and, transitively, the metrics they depend on (``deps``)."""
    closure: list[str] = []
    stack = list(names)
    while stack:
        n = stack.pop()
        if n not in closure:
            closure.append(n)
            stack.extend(get_metric(n).deps)
    return closure


def _plan(
    ctx: EvalContext, names: Sequence[str]
) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, int]]]:
    """Return what the metrics (and their dependencies) read, by their needs.

    Returns ``(pairs, reference_pairs, generation_keys)``: the (prompt, answer)
    pairs to score with the target and the reference model, and the
    ``(split, index)`` items to generate for.
    """
    needs = {need for n in _closure(names) for need in get_metric(n).needs}
    pairs: list[tuple[str, str]] = []
    ref_pairs: list[tuple[str, str]] = []
    gens: list[tuple[str, int]] = []
    for split in SPLIT_NAMES:
        if ("answer", split) in needs:
            pairs += ctx.answer_pairs(split)
        if ("tr_para", split) in needs:
            pairs += ctx.tr_pairs(split, "para")
        if ("tr_answer", split) in needs:
            pairs += ctx.tr_pairs(split, "para_or_answer")
        if ("ref_answer", split) in needs and ctx.reference_model is not None:
            ref_pairs += ctx.answer_pairs(split)
        if ("gen", split) in needs:
            gens += [(split, i) for i in range(len(ctx.items(split)))]
    return pairs, ref_pairs, gens


def _prefetch(ctx: EvalContext, names: Sequence[str]) -> None:
    """Score / generate everything the metrics need in as few batches as possible."""
    pairs, ref_pairs, gens = _plan(ctx, names)
    ctx.score(pairs)
    if ref_pairs:
        ctx.score(ref_pairs, "reference")
    ctx.prefetch_generations(gens)


def _check_tokenizer(model: Any, tokenizer: Any, what: str) -> None:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and int(vocab) < len(tokenizer):
        raise ValueError(
            f"tokenizer/{what} mismatch: the {what}'s config.vocab_size is {vocab} "
            f"but the tokenizer has {len(tokenizer)} tokens"
        )


def _select_metrics(
    metrics: Sequence[str] | None,
    reference: dict | None,
    reference_model: Any,
    gradnorm: bool,
) -> list[str]:
    if metrics is None:
        names = [
            n
            for n in TOFU_METRICS
            if (n != "forget_quality" or reference is not None)
            and (n != "mia_gradnorm" or gradnorm)
            and (
                n != "mia_reference"
                or _has_reference_losses(reference_model, reference)
            )
        ]
        return names
    if isinstance(metrics, str):
        metrics = [metrics]
    names = list(dict.fromkeys(metrics))
    for n in names:
        get_metric(n)  # ValueError listing the valid names
    if gradnorm and "mia_gradnorm" not in names:
        names.append("mia_gradnorm")
    if "forget_quality" in names and reference is None:
        raise P.MissingReferenceError(
            "metric 'forget_quality' was requested but no `reference` (the tofu_eval "
            "dict of the retrained model) was given"
        )
    if "mia_reference" in names and not _has_reference_losses(
        reference_model, reference
    ):
        raise P.MissingReferenceError(
            "metric 'mia_reference' was requested but neither a `reference_model` "
            "nor reference logs with per-item mia_loss scores were given"
        )
    return names


def _has_reference_losses(reference_model: Any, reference: dict | None) -> bool:
    """Whether ``mia_reference`` has a reference model or logged reference losses."""
    if reference_model is not None:
        return True
    entry = reference.get("mia_loss") if isinstance(reference, dict) else None
    return isinstance(entry, dict) and all(
        isinstance((entry.get(s) or {}).get("value_by_index"), dict)
        for s in ("forget", "holdout")
    )


def evaluate(
    model: Any,
    tokenizer: Any,
    prompt_fn: PromptFn,
    splits: EvalSplits,
    reference: dict | None = None,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    max_length: int = 256,
    metrics: Sequence[str] | None = None,
    gradnorm: bool = False,
    num_samples: int = 5,
    reference_model: Any = None,
    share_prompts: bool = True,
    gen_batch_size: int | None = None,
    merge_lora: bool = True,
) -> tuple[dict, dict]:
    """Evaluate a causal LM with the TOFU / open-unlearning metric suite.

    Probabilities are teacher-forced on ``prompt_fn(question) + answer + EOS``
    (answer-only labels, :func:`~fed_unlearn.data.qa.encode_qa`); generations are
    greedy (``do_sample=False``), left padded, cut at EOS and stripped.

    Parameters
    ----------
    model : transformers.PreTrainedModel or peft.PeftModel
        The causal LM to evaluate; its train/eval mode is restored afterwards.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer (needs an EOS or a pad token).
    prompt_fn : PromptFn
        Maps a question to the full prompt text.
    splits : EvalSplits
        Forget / retain / holdout / general items.
    reference : dict or None
        ``tofu_eval`` of the reference (retrained) model.  Used by
        ``forget_quality`` (its ``forget_truth_ratio`` value_by_index) and
        ``privleak`` (its ``mia_min_k`` agg_value; 0.5 when absent).
    batch_size : int
        Batch size for scoring and generation.
    max_new_tokens : int
        Generation length.
    max_length : int
        Maximum tokens per scored sequence (prompt truncated from the left).
    metrics : Sequence[str] or None
        Metric names to compute (see
        :func:`~fed_unlearn.metrics.registry.list_metrics`).  ``None`` = all of
        :data:`TOFU_METRICS` that apply: ``forget_quality`` only with ``reference``,
        ``mia_gradnorm`` only with ``gradnorm=True``, ``mia_reference`` only with
        ``reference_model`` or with ``reference`` logs holding per-item
        ``mia_loss`` scores (the reference's own answer losses).
    gradnorm : bool
        Also compute ``mia_gradnorm`` (one backward per forget/holdout item;
        zeroes the model's gradients).
    num_samples : int
        Number of forget / retain generations copied to ``tofu_eval["generations"]``.
    reference_model : transformers.PreTrainedModel or None
        Reference model (same tokenizer) for ``mia_reference``.
    share_prompts : bool
        Teacher-forced scoring runs each unique prompt once and scores all its
        answers (answer, paraphrase, perturbed answers) as continuations of the
        prompt's KV cache: the same statistics as one full forward pass per pair
        (within 1e-4; checked on a few pairs of the first batch of each model,
        which falls back with a ``RuntimeWarning`` if its cache cannot reproduce
        the full pass).  fp32/fp64 models only; pairs whose statistics float32
        rounding alone could move (near-tie argmax, Min-K%++ of flat
        distributions; checked on the forget / holdout answers, the only pairs
        whose EM, ES and Min-K%++ a metric reads) and prompts with a single
        answer use the full pass, and so does everything when most checked
        pairs are such (e.g. a randomly initialised model).  ``False`` always
        uses one full forward pass per pair.
    gen_batch_size : int or None
        Batch size of greedy generation (default: ``max(batch_size, 64)``).
    merge_lora : bool
        Fold a peft LoRA adapter into the base weights while evaluating (see
        :func:`merged_lora`; the weights are restored bit-exactly). Ignored with
        ``gradnorm=True`` or a ``reference_model``.

    Returns
    -------
    tuple[dict, dict]
        ``(tofu_eval, tofu_summary)``: ``tofu_eval[name]`` holds ``agg_value`` and
        ``value_by_index`` (MIA metrics: ``agg_value`` = AUC plus ``forget`` /
        ``holdout`` ``value_by_index``), and ``tofu_eval["generations"]`` the
        sample generations; ``tofu_summary[name]`` is the ``agg_value``.

    Raises
    ------
    ValueError
        On an unknown metric name, a tokenizer/model vocabulary mismatch, an empty
        split needed by a requested metric, or no item usable for a truth ratio.
    MissingReferenceError
        If ``forget_quality`` / ``mia_reference`` is requested explicitly without
        ``reference`` / ``reference_model``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    names = _select_metrics(metrics, reference, reference_model, gradnorm)
    _check_tokenizer(model, tokenizer, "model")
    if reference_model is not None:
        _check_tokenizer(reference_model, tokenizer, "reference model")
    for n in names:
        for split in get_metric(n).splits:
            if not getattr(splits, split):
                raise ValueError(
                    f"metric {n!r} needs a non-empty {split!r} split, but it is empty"
                )

    ctx = EvalContext(
        model,
        tokenizer,
        prompt_fn,
        splits,
        reference,
        reference_model,
        batch_size,
        max_new_tokens,
        max_length,
        share_prompts,
        gen_batch_size,
    )
    models = [m for m in (model, reference_model) if m is not None]
    modes = [P._module_modes(m) for m in models]
    # gradnorm needs the adapter's own gradients; a reference model may share the
    # base weights: evaluate those unmerged
    merge = merge_lora and not gradnorm and reference_model is None
    try:
        for m in models:
            m.eval()
        with (
            torch.no_grad(),
            merged_lora(model) if merge else contextlib.nullcontext(),
        ):
            _prefetch(ctx, names)
            tofu_eval = {n: ctx.result(n) for n in names}
            samples = {}
            for split in ("forget", "retain"):
                items = ctx.items(split)
                k = min(max(num_samples, 0), len(items))
                gens = ctx.generations(split, range(k))
                samples[split] = [
                    {
                        "question": it.question,
                        "ground_truth": it.answer,
                        "generation": g,
                    }
                    for it, g in zip(items[:k], gens, strict=True)
                ]
    finally:
        for m in modes:
            P._restore_modes(m)
    tofu_eval["generations"] = samples
    tofu_summary = {n: float(tofu_eval[n]["agg_value"]) for n in names}
    return tofu_eval, tofu_summary


__all__ = [
    "METRIC_REGISTRY",
    "MODEL_UTILITY_PARTS",
    "TOFU_METRICS",
    "EvalSplits",
    "evaluate",
    "merged_lora",
]
