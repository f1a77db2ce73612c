"""Evaluation metrics (TOFU / MUSE as implemented by open-unlearning).

* :mod:`~fed_unlearn.metrics.primitives` -- pure metric functions on tensors.
* :mod:`~fed_unlearn.metrics.registry` -- the typed metric registry (what each
  metric reads is declared there, once).
* :mod:`~fed_unlearn.metrics.definitions` -- the TOFU / MUSE metrics (importing it
  registers them).
* :mod:`~fed_unlearn.metrics.evaluator` -- :func:`evaluate`, the batched TOFU-style
  evaluation of a causal LM, built on :mod:`~fed_unlearn.metrics.context` (the
  state metrics read), :mod:`~fed_unlearn.metrics.scoring` (teacher-forced
  scores, KV-sharing and plain passes), :mod:`~fed_unlearn.metrics.model_api`,
  :mod:`~fed_unlearn.metrics.generation` and
  :mod:`~fed_unlearn.metrics.lora_merge`.
* :mod:`~fed_unlearn.metrics.quick` / :mod:`~fed_unlearn.metrics.relearn` --
  cheap per-round probes and the relearning attack.
"""

from __future__ import annotations

from fed_unlearn.metrics.evaluator import (
    MODEL_UTILITY_PARTS,
    TOFU_METRICS,
    EvalSplits,
    evaluate,
    merged_lora,
)
from fed_unlearn.metrics.primitives import (
    MissingReferenceError,
    avg_loss,
    exact_memorization,
    extraction_strength,
    fluency_proxy,
    forget_quality,
    gradnorm_score,
    mia_loss,
    mia_min_k,
    mia_min_k_plus_plus,
    mia_reference,
    mia_zlib,
    model_utility,
    normalised_prob,
    normalised_prob_per_item,
    privleak,
    prob_from_avg_loss,
    roc_auc,
    rouge_l_f1,
    rouge_l_recall,
    token_logprobs,
    tr_closer_to_1,
    tr_prob_mean,
    tr_true_better,
    truth_ratio,
)
from fed_unlearn.metrics.quick import answer_prob, spread_items, time_to_forget
from fed_unlearn.metrics.registry import (
    METRIC_REGISTRY,
    MetricSpec,
    get_metric,
    list_metrics,
    metric,
    metric_deps,
    metric_needs,
)

__all__ = [
    "merged_lora",
    "answer_prob",
    "spread_items",
    "time_to_forget",
    "EvalSplits",
    "METRIC_REGISTRY",
    "MetricSpec",
    "MODEL_UTILITY_PARTS",
    "MissingReferenceError",
    "TOFU_METRICS",
    "avg_loss",
    "evaluate",
    "exact_memorization",
    "extraction_strength",
    "fluency_proxy",
    "forget_quality",
    "get_metric",
    "gradnorm_score",
    "list_metrics",
    "metric",
    "metric_deps",
    "metric_needs",
    "mia_loss",
    "mia_min_k",
    "mia_min_k_plus_plus",
    "mia_reference",
    "mia_zlib",
    "model_utility",
    "normalised_prob",
    "normalised_prob_per_item",
    "privleak",
    "prob_from_avg_loss",
    "roc_auc",
    "rouge_l_f1",
    "rouge_l_recall",
    "token_logprobs",
    "tr_closer_to_1",
    "tr_prob_mean",
    "tr_true_better",
    "truth_ratio",
]
