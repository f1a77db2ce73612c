"""The TOFU / MUSE metric definitions, registered on import.

Each metric is a function of the :class:`~fed_unlearn.metrics.context.EvalContext`
registered with :func:`~fed_unlearn.metrics.registry.metric`; its declaration
states everything it reads (``splits``, ``needs``, ``deps``), from which the
evaluator plans the bulk scoring and generation.  Also here: the
:data:`MODEL_UTILITY_PARTS` and the default :data:`TOFU_METRICS` order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fed_unlearn.data.qa import collate, encode_qa
from fed_unlearn.metrics import primitives as P
from fed_unlearn.metrics.context import EvalContext
from fed_unlearn.metrics.registry import metric


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(np.asarray(values, dtype=np.float64)))


def _prob_result(ctx: EvalContext, split: str) -> dict:
    stats = ctx.score(ctx.answer_pairs(split))
    vbi = {
        str(i): {"prob": math.exp(-s.avg_loss), "avg_loss": s.avg_loss}
        for i, s in enumerate(stats)
    }
    return {
        "agg_value": _mean([v["prob"] for v in vbi.values()]),
        "value_by_index": vbi,
    }


def _rouge_result(ctx: EvalContext, split: str) -> dict:
    items = ctx.items(split)
    gens = ctx.generations(split)
    vbi = {}
    for i, (it, gen) in enumerate(zip(items, gens, strict=True)):
        gt = it.answer.strip()
        vbi[str(i)] = {
            "rougeL_recall": P.rouge_l_recall(gt, gen),
            "rougeL_f1": P.rouge_l_f1(gt, gen),
            "input": it.question,
            "ground_truth": gt,
            "generation": gen,
        }
    agg = _mean([v["rougeL_recall"] for v in vbi.values()])
    return {"agg_value": agg, "value_by_index": vbi}


def _truth_ratios(ctx: EvalContext, split: str, correct: str) -> dict[str, float]:
    """Per-item truth ratios; items without the needed answers are skipped."""
    indices = ctx.tr_indices(split, correct)
    if not indices:
        need = "perturbed answers" + (
            " and a paraphrased answer" if correct == "para" else ""
        )
        raise ValueError(f"no item of split {split!r} has {need} (truth ratio)")
    items = ctx.items(split)
    para, pert = [], []
    for i in indices:
        it = items[i]
        p = ctx.prompt(it.question)
        c = ctx.correct_text(it, correct)
        para.append(ctx.score([(p, c)])[0].avg_loss)
        pert.append(
            [s.avg_loss for s in ctx.score([(p, a) for a in it.perturbed_answers])]
        )
    tr = P.truth_ratio(para, pert)
    return {str(i): float(v) for i, v in zip(indices, tr, strict=True)}


def _tr_result(ctx: EvalContext, split: str, correct: str, agg: Any) -> dict:
    tr = _truth_ratios(ctx, split, correct)
    return {
        "agg_value": agg(list(tr.values())),
        "value_by_index": {k: {"score": v} for k, v in tr.items()},
    }


def _mia_result(ctx: EvalContext, score_fn: Any) -> dict:
    scores = {s: [float(v) for v in score_fn(s)] for s in ("forget", "holdout")}
    out: dict[str, Any] = {"agg_value": P.roc_auc(scores["forget"], scores["holdout"])}
    for split, values in scores.items():
        out[split] = {
            "value_by_index": {str(i): {"score": v} for i, v in enumerate(values)}
        }
    return out


def _stat_scores(ctx: EvalContext, attr: str) -> Any:
    def fn(split: str) -> list[float]:
        return [getattr(s, attr) for s in ctx.score(ctx.answer_pairs(split))]

    return fn


@metric(
    name="forget_Q_A_Prob",
    direction="closer_to_reference",
    splits=("forget",),
    needs=(("answer", "forget"),),
)
def forget_q_a_prob(ctx: EvalContext) -> dict:
    """Mean ``exp(-avg_loss)`` of the forget answers (EOS included)."""
    return _prob_result(ctx, "forget")


@metric(
    name="forget_Q_A_ROUGE",
    direction="closer_to_reference",
    splits=("forget",),
    needs=(("gen", "forget"),),
)
def forget_q_a_rouge(ctx: EvalContext) -> dict:
    """Mean ROUGE-L recall of greedy answers to the forget questions."""
    return _rouge_result(ctx, "forget")


@metric(
    name="forget_truth_ratio",
    direction="higher",
    splits=("forget",),
    needs=(("tr_para", "forget"),),
)
def forget_truth_ratio(ctx: EvalContext) -> dict:
    """Truth ratio (paraphrase vs perturbed) on forget data, closer_to_1 aggregate."""
    return _tr_result(ctx, "forget", "para", P.tr_closer_to_1)


@metric(
    name="forget_quality",
    direction="higher",
    needs_reference=True,
    splits=("forget",),
    deps=("forget_truth_ratio",),
)
def forget_quality(ctx: EvalContext) -> dict:
    """KS-test p-value of forget truth ratios vs the reference model's."""
    if ctx.reference is None:
        raise P.MissingReferenceError(
            "forget_quality needs `reference` (the tofu_eval dict of the retrained "
            "model); none was given"
        )
    ref = ctx.reference_tr()
    tr = [
        v["score"] for v in ctx.result("forget_truth_ratio")["value_by_index"].values()
    ]
    return {"agg_value": P.forget_quality(tr, ref), "value_by_index": {}}


@metric(
    name="retain_Q_A_Prob",
    direction="higher",
    splits=("retain",),
    needs=(("answer", "retain"),),
)
def retain_q_a_prob(ctx: EvalContext) -> dict:
    """Mean ``exp(-avg_loss)`` of the retain answers."""
    return _prob_result(ctx, "retain")


@metric(
    name="retain_Q_A_ROUGE",
    direction="higher",
    splits=("retain",),
    needs=(("gen", "retain"),),
)
def retain_q_a_rouge(ctx: EvalContext) -> dict:
    """Mean ROUGE-L recall of greedy answers to the retain questions."""
    return _rouge_result(ctx, "retain")


@metric(
    name="retain_Truth_Ratio",
    direction="higher",
    splits=("retain",),
    needs=(("tr_para", "retain"),),
)
def retain_truth_ratio(ctx: EvalContext) -> dict:
    """Truth ratio (paraphrase vs perturbed) on retain data, true_better aggregate."""
    return _tr_result(ctx, "retain", "para", P.tr_true_better)


@metric(
    name="gk_Q_A_Prob",
    direction="higher",
    splits=("general",),
    needs=(("tr_answer", "general"),),
)
def gk_q_a_prob(ctx: EvalContext) -> dict:
    """Normalised probability of the correct general answer against wrong options.

    ``P_c / (P_c + sum_j P_w,j + 1e-10)`` (open-unlearning
    ``probability_w_options``).  The correct option is the paraphrase when the item
    has one, else the answer (see ``EvalContext.correct_text``).  Items without
    perturbed options are skipped (the normalisation is undefined).
    """
    indices = ctx.tr_indices("general", "para_or_answer")
    if not indices:
        raise ValueError("no item of split 'general' has perturbed answers (gk Prob)")
    items = ctx.items("general")
    correct, wrong = [], []
    for i in indices:
        it = items[i]
        p = ctx.prompt(it.question)
        c = ctx.correct_text(it, "para_or_answer")
        correct.append(ctx.score([(p, c)])[0].avg_loss)
        wrong.append(
            [s.avg_loss for s in ctx.score([(p, a) for a in it.perturbed_answers])]
        )
    probs = P.normalised_prob_per_item(correct, wrong)
    vbi = {str(i): {"prob": float(v)} for i, v in zip(indices, probs, strict=True)}
    return {"agg_value": float(probs.mean()), "value_by_index": vbi}


@metric(
    name="gk_Q_A_ROUGE",
    direction="higher",
    splits=("general",),
    needs=(("gen", "general"),),
)
def gk_q_a_rouge(ctx: EvalContext) -> dict:
    """Mean ROUGE-L recall of greedy answers to the general-knowledge probes."""
    return _rouge_result(ctx, "general")


@metric(
    name="gk_Truth_Ratio",
    direction="higher",
    splits=("general",),
    needs=(("tr_answer", "general"),),
)
def gk_truth_ratio(ctx: EvalContext) -> dict:
    """Truth ratio (paraphrase-or-answer vs perturbed) on the probes, true_better."""
    return _tr_result(ctx, "general", "para_or_answer", P.tr_true_better)


#: The six numbers behind ``model_utility`` (the general triple counts twice).
MODEL_UTILITY_PARTS = (
    "retain_Q_A_Prob",
    "retain_Q_A_ROUGE",
    "retain_Truth_Ratio",
    "gk_Q_A_Prob",
    "gk_Q_A_ROUGE",
    "gk_Truth_Ratio",
)


@metric(
    name="model_utility",
    direction="higher",
    splits=("retain", "general"),
    deps=MODEL_UTILITY_PARTS,
)
def model_utility(ctx: EvalContext) -> dict:
    """Harmonic mean of 9 utility numbers (general triple used for RA and WF)."""
    parts = {name: float(ctx.result(name)["agg_value"]) for name in MODEL_UTILITY_PARTS}
    nine = [
        parts["retain_Q_A_Prob"],
        parts["retain_Q_A_ROUGE"],
        parts["retain_Truth_Ratio"],
        *[parts[n] for n in MODEL_UTILITY_PARTS[3:]]
        * 2,  # real-authors + world-facts slots
    ]
    return {
        "agg_value": P.model_utility(nine),
        "value_by_index": {},
        "components": parts,
    }


_MIA_SPLITS = ("forget", "holdout")
_MIA_ANSWERS = (("answer", "forget"), ("answer", "holdout"))


@metric(
    name="mia_loss",
    direction="closer_to_reference",
    splits=_MIA_SPLITS,
    needs=_MIA_ANSWERS,
)
def mia_loss(ctx: EvalContext) -> dict:
    """AUC of the LOSS attack (average answer loss), forget = 0 vs holdout = 1."""
    return _mia_result(ctx, _stat_scores(ctx, "avg_loss"))


@metric(
    name="mia_zlib",
    direction="closer_to_reference",
    splits=_MIA_SPLITS,
    needs=_MIA_ANSWERS,
)
def mia_zlib(ctx: EvalContext) -> dict:
    """AUC of the ZLib attack (loss / zlib length of the decoded answer)."""

    def fn(split: str) -> list[float]:
        stats = ctx.score(ctx.answer_pairs(split))
        return [P.mia_zlib(s.avg_loss, s.text) for s in stats]

    return _mia_result(ctx, fn)


@metric(
    name="mia_min_k",
    direction="closer_to_reference",
    splits=_MIA_SPLITS,
    needs=_MIA_ANSWERS,
)
def mia_min_k(ctx: EvalContext) -> dict:
    """AUC of the Min-K% Prob attack (k = 0.4)."""
    return _mia_result(ctx, _stat_scores(ctx, "min_k"))


@metric(
    name="mia_min_k_plus_plus",
    direction="closer_to_reference",
    splits=_MIA_SPLITS,
    needs=_MIA_ANSWERS,
)
def mia_min_k_plus_plus(ctx: EvalContext) -> dict:
    """AUC of the Min-K%++ attack (k = 0.4)."""
    return _mia_result(ctx, _stat_scores(ctx, "min_k_pp"))


@metric(name="mia_gradnorm", direction="closer_to_reference", splits=_MIA_SPLITS)
def mia_gradnorm(ctx: EvalContext) -> dict:
    """AUC of the GradNorm attack (batch of one, p = 2, trainable tensors only)."""

    def fn(split: str) -> list[float]:
        out = []
        for p, a in ctx.answer_pairs(split):
            enc = encode_qa(ctx.tokenizer, p, a, ctx.max_length)
            out.append(P.gradnorm_score(ctx.model, collate([enc], ctx.pad_id)))
        return out

    return _mia_result(ctx, fn)


@metric(
    name="mia_reference",
    direction="closer_to_reference",
    needs_reference=True,
    splits=_MIA_SPLITS,
    needs=(*_MIA_ANSWERS, ("ref_answer", "forget"), ("ref_answer", "holdout")),
)
def mia_reference(ctx: EvalContext) -> dict:
    """AUC of the reference attack (target loss minus reference-model loss).

    The reference losses come from ``reference_model`` when one is given, else from
    the reference logs: the per-item scores of the reference's LOSS attack
    (``reference["mia_loss"][split]["value_by_index"]``) are exactly its average
    answer losses on the same forget / holdout items, so the retrain oracle's
    saved evaluation serves as the reference model without loading it again.
    """
    logged = None if ctx.reference_model is not None else _reference_losses(ctx)
    if ctx.reference_model is None and logged is None:
        raise P.MissingReferenceError(
            "mia_reference needs `reference_model=` or reference logs with per-item "
            "mia_loss scores for the forget and holdout splits; neither was given"
        )

    def fn(split: str) -> list[float]:
        pairs = ctx.answer_pairs(split)
        tgt = [t.avg_loss for t in ctx.score(pairs, "target")]
        if logged is not None:
            ref = logged[split]
        else:
            ref = [r.avg_loss for r in ctx.score(pairs, "reference")]
        return [P.mia_reference(t, r) for t, r in zip(tgt, ref, strict=True)]

    return _mia_result(ctx, fn)


def _reference_losses(ctx: EvalContext) -> dict[str, list[float]] | None:
    """Per-item forget / holdout losses from the reference logs (None if unusable)."""
    ref = ctx.reference
    entry = ref.get("mia_loss") if isinstance(ref, dict) else None
    if not isinstance(entry, dict):
        return None
    out: dict[str, list[float]] = {}
    for split in ("forget", "holdout"):
        n = len(ctx.items(split))
        vbi = (entry.get(split) or {}).get("value_by_index")
        if not isinstance(vbi, dict) or len(vbi) != n:
            return None
        try:
            out[split] = [float(vbi[str(i)]["score"]) for i in range(n)]
        except (KeyError, TypeError, ValueError):
            return None
    return out


@metric(
    name="privleak",
    direction="closer_to_reference",
    splits=_MIA_SPLITS,
    deps=("mia_min_k",),
)
def privleak(ctx: EvalContext) -> dict:
    """PrivLeak of the Min-K% AUC against the reference's (0.5 when absent)."""
    auc = float(ctx.result("mia_min_k")["agg_value"])
    ref = ctx.reference_auc()
    return {
        "agg_value": P.privleak(auc, ref),
        "value_by_index": {},
        "auc": auc,
        "reference_auc": ref,
    }


@metric(
    name="exact_memorization",
    direction="lower",
    splits=("forget",),
    needs=(("answer", "forget"),),
)
def exact_memorization(ctx: EvalContext) -> dict:
    """Mean teacher-forced exact memorization of the forget answers (EOS excluded)."""
    stats = ctx.score(ctx.answer_pairs("forget"))
    vbi = {str(i): {"score": s.em} for i, s in enumerate(stats)}
    values = [s.em for s in stats if s.em is not None]
    if not values:
        raise ValueError("exact_memorization: no forget answer has a token besides EOS")
    return {"agg_value": _mean(values), "value_by_index": vbi}


@metric(
    name="extraction_strength",
    direction="lower",
    splits=("forget",),
    needs=(("answer", "forget"),),
)
def extraction_strength(ctx: EvalContext) -> dict:
    """Mean extraction strength of the forget answers (ES = 1/L on no match)."""
    stats = ctx.score(ctx.answer_pairs("forget"))
    vbi = {str(i): {"score": s.es} for i, s in enumerate(stats)}
    return {"agg_value": _mean([s.es for s in stats]), "value_by_index": vbi}


def _fluency_result(ctx: EvalContext, split: str) -> dict:
    gens = ctx.generations(split)
    vbi = {
        str(i): {"score": P.fluency_proxy(g), "generation": g}
        for i, g in enumerate(gens)
    }
    return {
        "agg_value": _mean([v["score"] for v in vbi.values()]),
        "value_by_index": vbi,
    }


@metric(
    name="forget_fluency",
    direction="higher",
    splits=("forget",),
    needs=(("gen", "forget"),),
)
def forget_fluency(ctx: EvalContext) -> dict:
    """Mean fluency proxy of greedy answers to the forget questions (gibberish)."""
    return _fluency_result(ctx, "forget")


@metric(
    name="retain_fluency",
    direction="higher",
    splits=("retain",),
    needs=(("gen", "retain"),),
)
def retain_fluency(ctx: EvalContext) -> dict:
    """Mean fluency proxy of greedy answers to the retain questions."""
    return _fluency_result(ctx, "retain")


#: Metrics computed by :func:`evaluate` by default, in output order.
TOFU_METRICS: tuple[str, ...] = (
    "forget_Q_A_Prob",
    "forget_Q_A_ROUGE",
    "forget_truth_ratio",
    "forget_quality",
    "retain_Q_A_Prob",
    "retain_Q_A_ROUGE",
    "retain_Truth_Ratio",
    "gk_Q_A_Prob",
    "gk_Q_A_ROUGE",
    "gk_Truth_Ratio",
    "model_utility",
    "mia_loss",
    "mia_zlib",
    "mia_min_k",
    "mia_min_k_plus_plus",
    "mia_gradnorm",
    "mia_reference",
    "privleak",
    "exact_memorization",
    "extraction_strength",
    "forget_fluency",
    "retain_fluency",
)
