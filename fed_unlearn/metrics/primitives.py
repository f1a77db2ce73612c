"""Metric primitives following the open-unlearning implementation (spec §4).

Every function here is pure (tensors / numpy in, numbers or arrays out) except
:func:`gradnorm_score`, which runs a backward pass.  The docstring of each function
names the open-unlearning behaviour ("quirk") it reproduces, so numbers stay
comparable with published TOFU / MUSE tables.

Conventions shared by all functions:

* ``labels`` are ``-100`` outside the answer (prompt and padding) and hold the answer
  token ids followed by EOS (see :func:`fed_unlearn.data.qa.encode_qa`).
* Logits at position ``t`` predict the token at ``t + 1`` (shift by one).
* MIA scores are "loss-like": higher means "predicted non-member".
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import hmean, ks_2samp

IGNORE_INDEX = -100

#: Guard added to denominators exactly where open-unlearning adds it.
EPS = 1e-10

#: ``k`` of Min-K% / Min-K%++ used by the TOFU and MUSE configs.
MIN_K_DEFAULT = 0.4

ArrayLike = np.ndarray | Sequence[float] | torch.Tensor


class MissingReferenceError(ValueError):
    """Raised when a metric needs reference (retrained-model) logs that are absent."""


# --------------------------------------------------------------------------- helpers


def _as_np(x: Any) -> np.ndarray:
    """Convert a tensor / sequence / scalar to a float64 numpy array."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _as_float64_tensor(x: Any) -> torch.Tensor:
    """Float64 tensor, kept on its device (MPS, which lacks float64, goes to CPU)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if t.device.type == "mps":
            t = t.cpu()
        return t.double()
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def _rows(x: Any) -> list[np.ndarray]:
    """Split a 2-D array or a ragged sequence of sequences into 1-D float rows."""
    if isinstance(x, torch.Tensor | np.ndarray):
        arr = _as_np(x)
        if arr.ndim == 1:
            arr = arr[:, None]
        if arr.ndim != 2:
            raise ValueError(f"expected a 2-D [n, J] array, got shape {arr.shape}")
        return list(arr)
    return [_as_np(row).ravel() for row in x]


def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            "expected logits [B, T, V] and labels [B, T], got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )


def _shifted_answer_rows(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-softmax of the shifted labelled positions only.

    Returns ``(vocab_lp [N, V], targets [N], row [N])`` for the ``N`` positions ``t``
    with ``labels[b, t + 1] != -100`` (row-major order).  Only these rows are
    normalised, which avoids materialising a ``[B, T, V]`` float32 log-softmax.
    """
    _check_logits_labels(logits, labels)
    tgt = labels[:, 1:]
    mask = tgt != IGNORE_INDEX
    vocab_lp = F.log_softmax(logits[:, :-1][mask].float(), dim=-1)
    rows = mask.nonzero(as_tuple=True)[0]
    return vocab_lp, tgt[mask], rows


# ----------------------------------------------------------------------- likelihood


def avg_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example mean answer NLL (open-unlearning ``evaluate_probability``).

    Quirks followed: the sum of the shifted cross-entropy over labelled positions
    (EOS **included**) is divided by the number of labelled tokens counted on the
    *unshifted* labels, ``(labels != -100).sum(-1)``.  A row without any labelled
    token gives ``nan`` (0 / 0), as in open-unlearning.

    Parameters
    ----------
    logits : torch.Tensor
        ``[B, T, V]`` model logits (any float dtype; computed in float32).
    labels : torch.Tensor
        ``[B, T]`` labels, ``-100`` outside the answer.

    Returns
    -------
    torch.Tensor
        ``[B]`` float32 average losses.
    """
    return _avg_loss_rows(*_shifted_answer_rows(logits, labels), labels)


def _avg_loss_rows(
    vocab_lp: torch.Tensor, tgt: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    tok = vocab_lp.gather(-1, tgt[:, None]).squeeze(-1)
    nll = torch.zeros(labels.size(0), dtype=tok.dtype, device=tok.device)
    nll = nll.index_add(0, rows, -tok)
    count = (labels != IGNORE_INDEX).sum(-1).to(tok.dtype)
    return nll / count


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per-example answer-token log-probs (open-unlearning ``tokenwise_logprobs``).

    Quirk followed: the **final labelled token (EOS) is excluded**, as in
    ``tokenwise_logprobs`` / ``tokenwise_vocab_logprobs`` (used by Min-K%, Min-K%++,
    GradNorm, exact memorization and extraction strength).

    Parameters
    ----------
    logits : torch.Tensor
        ``[B, T, V]`` model logits; gradients flow through the result.
    labels : torch.Tensor
        ``[B, T]`` labels, ``-100`` outside the answer.

    Returns
    -------
    list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
        For each example ``(tok_lp [n], vocab_lp [n, V], labels [n])`` where
        ``n`` = number of labelled tokens minus one (``0`` allowed).
    """
    return _token_rows(*_shifted_answer_rows(logits, labels), labels)


def answer_statistics(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """:func:`avg_loss` and :func:`token_logprobs` from one log-softmax.

    Parameters
    ----------
    logits : torch.Tensor
        ``[B, T, V]`` model logits.
    labels : torch.Tensor
        ``[B, T]`` labels, ``-100`` outside the answer.

    Returns
    -------
    tuple
        ``(avg_loss(logits, labels), token_logprobs(logits, labels))``.
    """
    rows = _shifted_answer_rows(logits, labels)
    return _avg_loss_rows(*rows, labels), _token_rows(*rows, labels)


def _token_rows(
    vocab_lp: torch.Tensor, tgt: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    tok = vocab_lp.gather(-1, tgt[:, None]).squeeze(-1)
    counts = torch.bincount(rows, minlength=labels.size(0)).tolist()
    out = []
    start = 0
    for n in counts:
        keep = slice(start, start + max(n - 1, 0))
        out.append((tok[keep], vocab_lp[keep], tgt[keep]))
        start += n
    return out


def prob_from_avg_loss(avg_loss_value: Any) -> Any:
    """Turn an average loss into the TOFU "probability" ``exp(-avg_loss)``.

    Quirk followed: this is the per-token normalised probability
    ``P(y | x) ** (1 / |y|)`` (open-unlearning ``evaluate_probability``), not the
    sequence probability.

    Parameters
    ----------
    avg_loss_value : float, numpy.ndarray or torch.Tensor
        Average losses.

    Returns
    -------
    float, numpy.ndarray or torch.Tensor
        ``exp(-avg_loss)`` with the input's type.
    """
    if isinstance(avg_loss_value, torch.Tensor):
        return torch.exp(-avg_loss_value)
    if np.isscalar(avg_loss_value):
        return math.exp(-float(avg_loss_value))
    return np.exp(-np.asarray(avg_loss_value, dtype=np.float64))


def normalised_prob_per_item(avg_loss_correct: Any, avg_loss_wrong: Any) -> np.ndarray:
    """Per-item normalised probability against wrong options.

    Quirk followed (open-unlearning ``probability_w_options``):
    ``P_c / (P_c + sum_j P_w,j + 1e-10)`` with ``P = exp(-avg_loss)``.  Rows of
    ``avg_loss_wrong`` may have different lengths (ragged input).

    Parameters
    ----------
    avg_loss_correct : array-like
        ``[n]`` average losses of the correct answers.
    avg_loss_wrong : array-like
        ``[n, J]`` (or ragged) average losses of the wrong options.

    Returns
    -------
    numpy.ndarray
        ``[n]`` normalised probabilities.
    """
    correct = np.exp(-_as_np(avg_loss_correct).ravel())
    wrong = _rows(avg_loss_wrong)
    if len(wrong) != correct.size:
        raise ValueError(
            f"{correct.size} correct answers but {len(wrong)} rows of wrong options"
        )
    wrong_sum = np.array([np.exp(-row).sum() for row in wrong], dtype=np.float64)
    return correct / (correct + wrong_sum + EPS)


def normalised_prob(avg_loss_correct: Any, avg_loss_wrong: Any) -> float:
    """Mean normalised probability ``mean_i P_c / (P_c + sum_j P_w + 1e-10)``.

    Quirk followed: open-unlearning ``probability_w_options`` (real-authors /
    world-facts ``*_Q_A_Prob_normalised``); see :func:`normalised_prob_per_item`.

    Parameters
    ----------
    avg_loss_correct : array-like
        ``[n]`` average losses of the correct answers.
    avg_loss_wrong : array-like
        ``[n, J]`` (or ragged) average losses of the wrong options.

    Returns
    -------
    float
        The mean over items.
    """
    per_item = normalised_prob_per_item(avg_loss_correct, avg_loss_wrong)
    if per_item.size == 0:
        raise ValueError("normalised_prob needs at least one item")
    return float(per_item.mean())


# --------------------------------------------------------------------- truth ratio


def truth_ratio(avg_loss_para: Any, avg_loss_pert: Any) -> np.ndarray:
    """Per-item TOFU truth ratio ``TR_i = P_w / (P_c + 1e-10)``.

    Quirk followed (open-unlearning ``truth_ratio``): the wrong answers are averaged
    in **log space** first, ``P_w = exp(-mean_j avg_loss_j)`` (geometric mean of the
    per-token normalised probabilities), ``P_c = exp(-avg_loss_para)``.

    Parameters
    ----------
    avg_loss_para : array-like
        ``[n]`` average losses of the paraphrased (correct) answers.
    avg_loss_pert : array-like
        ``[n, J]`` (or ragged) average losses of the perturbed (wrong) answers.

    Returns
    -------
    numpy.ndarray
        ``[n]`` truth ratios.
    """
    para = _as_np(avg_loss_para).ravel()
    pert = _rows(avg_loss_pert)
    if len(pert) != para.size:
        raise ValueError(
            f"{para.size} paraphrased answers but {len(pert)} rows of perturbed ones"
        )
    if any(row.size == 0 for row in pert):
        raise ValueError("every item needs at least one perturbed answer")
    wrong_prob = np.exp(-np.array([row.mean() for row in pert], dtype=np.float64))
    return wrong_prob / (np.exp(-para) + EPS)


def _tr_array(tr: Any) -> np.ndarray:
    arr = _as_np(tr).ravel()
    if arr.size == 0:
        raise ValueError("truth-ratio aggregation needs at least one value")
    return arr


def tr_closer_to_1(tr: Any) -> float:
    """Forget-set truth-ratio aggregate ``mean_i min(TR_i, 1 / (TR_i + 1e-10))``.

    Quirk followed: open-unlearning aggregator ``closer_to_1_better``
    (``forget_truth_ratio``); 1 means the model cannot tell right from wrong.

    Parameters
    ----------
    tr : array-like
        Per-item truth ratios.

    Returns
    -------
    float
        The aggregate in ``[0, 1]``.
    """
    arr = _tr_array(tr)
    return float(np.mean(np.minimum(arr, 1.0 / (arr + EPS))))


def tr_true_better(tr: Any) -> float:
    """Retain / general truth-ratio aggregate ``mean_i max(0, 1 - TR_i)``.

    Quirk followed: open-unlearning aggregator ``true_better`` (retain, real-authors
    and world-facts ``*_Truth_Ratio``).

    Parameters
    ----------
    tr : array-like
        Per-item truth ratios.

    Returns
    -------
    float
        The aggregate in ``[0, 1]``.
    """
    arr = _tr_array(tr)
    return float(np.mean(np.maximum(0.0, 1.0 - arr)))


def tr_prob_mean(tr: Any) -> float:
    """Meta-eval truth-ratio variant ``mean_i P_c / (P_c + P_w)``.

    Quirk followed: open-unlearning's "prob_mean" form ``P_c / (P_c + P_w + 1e-10)``
    (spec §4.4).  Expressed through ``TR = P_w / (P_c + 1e-10)`` it is
    ``1 / (1 + TR)``, identical up to where the 1e-10 guard sits (relative
    difference below ``1e-10 / P_c``).

    Parameters
    ----------
    tr : array-like
        Per-item truth ratios.

    Returns
    -------
    float
        The aggregate in ``[0, 1]``.
    """
    arr = _tr_array(tr)
    return float(np.mean(1.0 / (1.0 + arr)))


def forget_quality(tr_unlearned: Any, tr_reference: Any) -> float:
    """TOFU forget quality: two-sided KS-test p-value between truth-ratio samples.

    Quirk followed: ``scipy.stats.ks_2samp(tr_unlearned, tr_reference).pvalue`` with
    the reference = the retrained model's per-item ``forget_truth_ratio`` values.
    Where open-unlearning returns ``None`` without reference logs, this raises
    :class:`MissingReferenceError` instead (never a silent ``None``).

    Parameters
    ----------
    tr_unlearned : array-like
        Per-item truth ratios of the evaluated model on the forget set.
    tr_reference : array-like or None
        Per-item truth ratios of the reference (retrained) model on the same set.

    Returns
    -------
    float
        The p-value in ``[0, 1]`` (1 = indistinguishable from retraining).

    Raises
    ------
    MissingReferenceError
        If ``tr_reference`` is ``None`` or empty.
    """
    if tr_reference is None:
        raise MissingReferenceError(
            "forget_quality needs the reference (retrained) model's "
            "forget_truth_ratio values; got None"
        )
    ref = _as_np(tr_reference).ravel()
    if ref.size == 0:
        raise MissingReferenceError(
            "forget_quality needs the reference model's forget_truth_ratio values; "
            "got an empty sample"
        )
    unl = _as_np(tr_unlearned).ravel()
    if unl.size == 0:
        raise ValueError("forget_quality needs at least one unlearned truth ratio")
    return float(ks_2samp(unl, ref).pvalue)


def model_utility(values: Any) -> float:
    """TOFU model utility: harmonic mean of the utility numbers.

    Quirk followed: ``scipy.stats.hmean`` of the 9 values (retain, real-authors,
    world-facts x {Prob, ROUGE, Truth Ratio}); any zero makes MU exactly 0.

    Parameters
    ----------
    values : array-like
        Non-negative metric values.

    Returns
    -------
    float
        The harmonic mean (0 when any value is 0).

    Raises
    ------
    ValueError
        If ``values`` is empty, negative or not finite.
    """
    arr = _as_np(values).ravel()
    if arr.size == 0:
        raise ValueError("model_utility needs at least one value")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"model_utility needs finite non-negative values, got {arr}")
    if np.any(arr == 0):
        return 0.0
    return float(hmean(arr))


# --------------------------------------------------------------------------- ROUGE

_ROUGE_SCORER: Any = None


def _rouge_scores(gt: str, gen: str) -> Any:
    global _ROUGE_SCORER
    if _ROUGE_SCORER is None:
        from rouge_score import rouge_scorer

        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    return _ROUGE_SCORER.score(gt, gen)


def rouge_l_recall(gt: str, gen: str) -> float:
    """ROUGE-L recall ``LCS / |reference|`` (TOFU ``*_Q_A_ROUGE``).

    Quirk followed: ``RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    .score(gt, gen)["rougeL"].recall`` (ground truth first); the scorer is created
    once per process.

    Parameters
    ----------
    gt : str
        Ground-truth answer.
    gen : str
        Generated answer.

    Returns
    -------
    float
        Recall in ``[0, 1]``.
    """
    return float(_rouge_scores(gt, gen)["rougeL"].recall)


def rouge_l_f1(gt: str, gen: str) -> float:
    """ROUGE-L F1 (MUSE knowmem / verbmem).

    Quirk followed: same scorer as :func:`rouge_l_recall`, ``["rougeL"].fmeasure``.

    Parameters
    ----------
    gt : str
        Ground-truth text.
    gen : str
        Generated text.

    Returns
    -------
    float
        F1 in ``[0, 1]``.
    """
    return float(_rouge_scores(gt, gen)["rougeL"].fmeasure)


# ----------------------------------------------------------------------------- MIA


def mia_loss(avg_loss_value: float) -> float:
    """LOSS attack score: the average answer loss itself.

    Quirk followed: open-unlearning ``LOSSAttack`` uses ``evaluate_probability``'s
    ``avg_loss`` (EOS included).

    Parameters
    ----------
    avg_loss_value : float
        Average answer NLL of the sample.

    Returns
    -------
    float
        The score (higher = predicted non-member).
    """
    return float(avg_loss_value)


def mia_zlib(avg_loss_value: float, text: str) -> float:
    """ZLib attack score ``avg_loss / len(zlib.compress(text.encode("utf-8")))``.

    Quirk followed: open-unlearning ``ZLIBAttack``; ``text`` is the decoded answer
    tokens (``skip_special_tokens=True``, so EOS is not part of it) and the length is
    that of the zlib-compressed bytes (never 0: even ``b""`` compresses to 8 bytes).

    Parameters
    ----------
    avg_loss_value : float
        Average answer NLL (EOS included).
    text : str
        The decoded answer.

    Returns
    -------
    float
        The score (higher = predicted non-member).
    """
    return float(avg_loss_value) / len(zlib.compress(text.encode("utf-8")))


def _check_k(k: float) -> None:
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")


def mia_min_k(tok_lp: Any, k: float = MIN_K_DEFAULT) -> float:
    """Min-K% Prob score: minus the mean of the ``k`` fraction lowest token log-probs.

    Quirks followed (open-unlearning ``MinKProbAttack``): EOS already excluded from
    ``tok_lp`` (see :func:`token_logprobs`); the number kept is
    ``max(1, int(n * k))`` (so with ``k * n < 1`` the single lowest value is used);
    an empty input scores 0.

    Parameters
    ----------
    tok_lp : array-like
        ``[n]`` answer-token log-probs.
    k : float
        Fraction of tokens kept (TOFU / MUSE configs use 0.4).

    Returns
    -------
    float
        The score (higher = predicted non-member).
    """
    _check_k(k)
    lp = _as_np(tok_lp).ravel()
    if lp.size == 0:
        return 0.0
    num = max(1, int(lp.size * k))
    return float(-np.sort(lp)[:num].mean())


def mia_min_k_plus_plus(tok_lp: Any, vocab_lp: Any, k: float = MIN_K_DEFAULT) -> float:
    """Min-K%++ score on per-position standardised token log-probs.

    Quirks followed (open-unlearning ``MinKPlusPlusAttack``): per position ``t``
    ``mu_t = sum_v p_t(v) l_t(v)``, ``var_t = sum_v p_t(v) l_t(v)^2 - mu_t^2``
    clamped at ``>= 1e-6``, ``z_t = (l_t(x_{t+1}) - mu_t) / sqrt(var_t)``, then
    ``-mean`` of the ``max(1, int(n * k))`` smallest ``z_t``; empty input scores 0.

    Parameters
    ----------
    tok_lp : array-like
        ``[n]`` log-probs of the actual next tokens (EOS excluded).
    vocab_lp : array-like
        ``[n, V]`` full log-softmax rows at the same positions.
    k : float
        Fraction of positions kept.

    Returns
    -------
    float
        The score (higher = predicted non-member).
    """
    _check_k(k)
    vlp = _as_float64_tensor(vocab_lp)
    lp = _as_float64_tensor(tok_lp).to(vlp.device).ravel()
    if lp.numel() == 0:
        return 0.0
    if vlp.dim() != 2 or vlp.size(0) != lp.numel():
        raise ValueError(
            f"vocab_lp must be [n, V] with n = {lp.numel()}, got {tuple(vlp.shape)}"
        )
    mu, var = vocab_moments(vlp)
    return min_k_plus_plus_from_moments(lp, mu, var, k)


def vocab_moments(vocab_lp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of the log-prob under the model, per position (float64).

    ``mu_t = sum_v p_t(v) l_t(v)`` and ``var_t = sum_v p_t(v) l_t(v)^2 - mu_t^2``
    (not clamped), the moments Min-K%++ standardises with.

    Parameters
    ----------
    vocab_lp : torch.Tensor
        ``[n, V]`` log-softmax rows.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        ``([n], [n])`` float64 ``mu`` and ``var``.
    """
    vlp = vocab_lp.detach().double()
    p = vlp.exp()
    mu = (p * vlp).sum(-1)
    var = (p * vlp.square()).sum(-1) - mu.square()
    return mu, var


def min_k_plus_plus_from_moments(
    tok_lp: Any, mu: torch.Tensor, var: torch.Tensor, k: float = MIN_K_DEFAULT
) -> float:
    """Min-K%++ score from the token log-probs and precomputed :func:`vocab_moments`.

    Same quirks as :func:`mia_min_k_plus_plus` (``var`` clamped at ``>= 1e-6``).
    """
    _check_k(k)
    lp = _as_float64_tensor(tok_lp).to(mu.device).ravel()
    if lp.numel() == 0:
        return 0.0
    if mu.numel() != lp.numel() or var.numel() != lp.numel():
        raise ValueError(
            f"moments must have one value per token ({lp.numel()}), "
            f"got {mu.numel()} and {var.numel()}"
        )
    z = ((lp - mu.ravel()) / var.ravel().clamp(min=1e-6).sqrt()).cpu().numpy()
    num = max(1, int(z.size * k))
    return float(-np.sort(z)[:num].mean())


def mia_reference(avg_loss_target: Any, avg_loss_ref: Any) -> Any:
    """Reference-based attack score ``avg_loss_target - avg_loss_ref``.

    Quirk followed: open-unlearning ``ReferenceAttack`` (reference = e.g. the
    retrained model), both losses from ``evaluate_probability`` (EOS included).

    Parameters
    ----------
    avg_loss_target : float or array-like
        Average losses under the evaluated model.
    avg_loss_ref : float or array-like
        Average losses under the reference model.

    Returns
    -------
    float or numpy.ndarray
        The score(s) (higher = predicted non-member).
    """
    if np.isscalar(avg_loss_target) and np.isscalar(avg_loss_ref):
        return float(avg_loss_target) - float(avg_loss_ref)
    return _as_np(avg_loss_target) - _as_np(avg_loss_ref)


def _module_modes(model: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def _restore_modes(modes: list[tuple[torch.nn.Module, bool]]) -> None:
    for module, training in modes:
        module.training = training


def gradnorm_score(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """GradNorm attack score of one sample (mean over tensors of their grad norms).

    Quirks followed (open-unlearning ``GradNormAttack``, ``p = 2``): loss =
    ``-mean`` of the answer-token log-probs **without EOS**; backward in train mode;
    for every parameter tensor with a gradient its L2 norm; score = the **mean over
    tensors** (not the global norm).  With LoRA only adapter tensors get gradients,
    so the score is over adapter tensors (not comparable with full-model numbers).
    Our choices: an answer with no token besides EOS scores 0 (as Min-K%); model
    gradients are zeroed before and after (never call this mid-training) and every
    module's train/eval mode is restored.

    Parameters
    ----------
    model : torch.nn.Module
        A causal LM returning ``.logits``.
    batch : dict[str, torch.Tensor]
        Batch of exactly one example: ``input_ids``, ``attention_mask``, ``labels``.

    Returns
    -------
    float
        The score (higher = predicted non-member).

    Raises
    ------
    ValueError
        If the batch holds more than one example or no parameter gets a gradient.
    """
    if batch["input_ids"].size(0) != 1:
        raise ValueError(
            f"gradnorm_score needs a batch of one, got {batch['input_ids'].size(0)}"
        )
    modes = _module_modes(model)
    device = next(model.parameters()).device
    model.train()
    try:
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            ).logits
            tok_lp = token_logprobs(logits, batch["labels"].to(device))[0][0]
            if tok_lp.numel() == 0:
                return 0.0
            (-tok_lp.mean()).backward()
        norms = [
            p.grad.detach().float().norm(2)
            for p in model.parameters()
            if p.grad is not None
        ]
        if not norms:
            raise ValueError("gradnorm_score: no parameter received a gradient")
        return float(torch.stack(norms).mean().item())
    finally:
        model.zero_grad(set_to_none=True)
        _restore_modes(modes)


def roc_auc(scores_forget: Any, scores_holdout: Any) -> float:
    """ROC AUC of MIA scores with labels forget = 0, holdout = 1.

    Quirk followed: equals ``sklearn.metrics.roc_auc_score(labels, scores)`` as used
    by open-unlearning; computed here with the rank (Mann-Whitney U) formula,
    ties receiving their average rank (so a tied pair counts 1/2).  1 = forget
    samples look much more "member" than holdout ones; 0.5 = no signal.

    Parameters
    ----------
    scores_forget : array-like
        Scores of the forget (member) samples.
    scores_holdout : array-like
        Scores of the holdout (non-member) samples.

    Returns
    -------
    float
        The AUC in ``[0, 1]``.

    Raises
    ------
    ValueError
        If either side is empty or a score is not finite.
    """
    f = _as_np(scores_forget).ravel()
    h = _as_np(scores_holdout).ravel()
    if f.size == 0 or h.size == 0:
        raise ValueError(
            f"roc_auc needs both classes, got {f.size} forget / {h.size} holdout"
        )
    both = np.concatenate([f, h])
    if not np.all(np.isfinite(both)):
        raise ValueError("roc_auc got non-finite scores")
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # 1-based rank of the last member of each tie group
    avg_rank = ends - (counts - 1) / 2.0
    ranks = avg_rank[inverse.ravel()]
    u = ranks[f.size :].sum() - h.size * (h.size + 1) / 2.0
    return float(u / (f.size * h.size))


def privleak(auc_unlearned: float, auc_reference: float = 0.5) -> float:
    """PrivLeak ``((1 - AUC) - (1 - AUC_ref)) / ((1 - AUC_ref) + 1e-10) * 100``.

    Quirk followed: open-unlearning ``privleak`` on the Min-K% (k = 0.4) AUC, with
    the reference AUC from the retrained model's logs, 0.5 when absent.  ~0 is
    ideal, strongly negative = knowledge still present, strongly positive =
    over-unlearning.

    Parameters
    ----------
    auc_unlearned : float
        AUC of the evaluated model.
    auc_reference : float
        AUC of the reference (retrained) model.

    Returns
    -------
    float
        The relative difference in percent.
    """
    score = 1.0 - float(auc_unlearned)
    ref = 1.0 - float(auc_reference)
    return (score - ref) / (ref + EPS) * 100.0


# ---------------------------------------------------------------- memorization


def _as_long_1d(x: Any) -> torch.Tensor:
    return torch.as_tensor(x).detach().to("cpu").reshape(-1).long()


def exact_memorization(pred: Any, labels: Any) -> float | None:
    """Exact memorization ``EM = (1/L) sum_t 1[pred_t == y_t]``.

    Quirks followed (open-unlearning ``exact_memorization``): teacher-forced greedy
    predictions over the answer positions with EOS excluded; ``None`` when
    ``L = 0`` (such items are skipped by the aggregate).

    Parameters
    ----------
    pred : array-like
        ``[L]`` argmax predictions.
    labels : array-like
        ``[L]`` answer token ids.

    Returns
    -------
    float or None
        EM in ``[0, 1]``, or ``None`` if ``L = 0``.
    """
    p, y = _as_long_1d(pred), _as_long_1d(labels)
    if p.numel() != y.numel():
        raise ValueError(f"pred has {p.numel()} tokens but labels {y.numel()}")
    if y.numel() == 0:
        return None
    return float((p == y).float().mean().item())


def extraction_strength(pred: Any, labels: Any) -> float:
    """Compute extraction strength ``ES = 1 - k*/L`` (open-unlearning loop quirks).

    ``k*`` is the smallest ``k`` with ``pred[k:] == labels[k:]``.  Quirks
    replicated: the loop runs ``k = 0 .. L-1`` and leaves ``k = L-1`` when nothing
    matches, so ES = ``1/L`` (not 0) for a total mismatch; ``L = 0`` gives 0.

    Parameters
    ----------
    pred : array-like
        ``[L]`` teacher-forced argmax predictions (EOS excluded).
    labels : array-like
        ``[L]`` answer token ids.

    Returns
    -------
    float
        ES in ``[0, 1]``.
    """
    p, y = _as_long_1d(pred), _as_long_1d(labels)
    if p.numel() != y.numel():
        raise ValueError(f"pred has {p.numel()} tokens but labels {y.numel()}")
    length = y.numel()
    if length == 0:
        return 0.0
    k = 0
    for k in range(length):  # noqa: B007 - the final k is the point (quirk)
        if torch.equal(p[k:], y[k:]):
            break
    return 1.0 - k / length


# ------------------------------------------------------------------------ fluency

_TOKEN_RE = re.compile(r"\S+")
_WORDLIKE_RE = re.compile(
    r"^[\"'(\[]*"  # optional opening quotes / brackets
    r"[^\W\d_]{1,20}(?:['\-][^\W\d_]{1,20})*"  # letters, joined by ' or -
    r"[\"')\].,;:!?]*$"  # optional closing quotes / punctuation
)


def fluency_proxy(text: str) -> float:
    """Cheap gibberish detector in ``[0, 1]`` (stand-in for a gibberish classifier).

    Not an open-unlearning metric (their optional ``forget_Q_A_gibberish`` uses a
    neural classifier, unavailable offline).  Definition: split ``text`` on
    whitespace into ``n`` tokens;

    * ``word_frac`` = fraction of tokens that look like words (1-20 letters,
      optionally joined by ``'``/``-``, optional surrounding quotes/brackets and
      trailing punctuation; digits and symbol soup do not count);
    * ``distinct`` = distinct bigrams / bigrams (1 for a single token), which is low
      for degenerate repetition such as ``"the the the the"``.

    Score = ``word_frac * distinct``; empty (or whitespace-only) text scores 0.

    Parameters
    ----------
    text : str
        Generated text.

    Returns
    -------
    float
        1 for varied word-like text, towards 0 for repetition or symbol soup.
    """
    tokens = _TOKEN_RE.findall(text.lower())
    if not tokens:
        return 0.0
    word_frac = sum(bool(_WORDLIKE_RE.match(t)) for t in tokens) / len(tokens)
    if len(tokens) < 2:
        distinct = 1.0
    else:
        bigrams = list(zip(tokens[:-1], tokens[1:], strict=True))
        distinct = len(set(bigrams)) / len(bigrams)
    return float(word_frac * distinct)
