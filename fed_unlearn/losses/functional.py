"""Pure tensor forms of the unlearning losses (no model, no optimiser).

Conventions (as in :mod:`fed_unlearn.data.qa` and open-unlearning):

* ``labels`` are ``-100`` outside the answer (prompt, padding) and hold the answer
  token ids followed by EOS.
* Logits at position ``t`` predict the token at ``t + 1``: every token-level loss
  shifts by one (``logits[:, :-1]`` against ``labels[:, 1:]``).
* ``NLL_sum`` is the per-sequence sum of the answer-token cross-entropies, so
  ``log p(y|x) = -NLL_sum``; ``NLL_mean`` is the token mean over *all* answer
  tokens of the batch (Hugging Face ``outputs.loss``).
* ``sg`` (stop-gradient) is ``.detach()``.

All "forget" losses are written so that *minimising* them lowers the probability
of the forget answers. Computations run in float32 whatever the model dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_nll(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token answer cross-entropy after the causal shift.

    Parameters
    ----------
    logits : torch.Tensor
        ``[B, T, V]`` model logits.
    labels : torch.Tensor
        ``[B, T]`` labels, ``-100`` outside the answer.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        ``[B, T-1]`` float32 CE ``ℓ_t`` (0 where ignored) and the ``[B, T-1]``
        boolean mask of answer positions.
    """
    lg = logits[:, :-1, :].float()
    lb = labels[:, 1:]
    mask = lb != IGNORE_INDEX
    nll = F.cross_entropy(
        lg.reshape(-1, lg.size(-1)),
        lb.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(lb)
    return nll, mask


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``NLL_sum`` per sequence: ``-log p(y|x)`` over the answer tokens.

    Parameters
    ----------
    logits : torch.Tensor
        ``[B, T, V]`` logits.
    labels : torch.Tensor
        ``[B, T]`` labels.

    Returns
    -------
    torch.Tensor
        ``[B]`` summed answer NLLs.
    """
    nll, _ = token_nll(logits, labels)
    return nll.sum(-1)


def answer_lengths(labels: torch.Tensor) -> torch.Tensor:
    """Count the scored answer tokens per sequence (after the shift).

    Parameters
    ----------
    labels : torch.Tensor
        ``[B, T]`` labels.

    Returns
    -------
    torch.Tensor
        ``[B]`` float32 counts.
    """
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1).float()


def mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``NLL_mean``: token mean over every answer token of the batch.

    Equals Hugging Face's causal-LM ``outputs.loss`` (0 instead of NaN when the
    batch has no answer token).

    Parameters
    ----------
    logits : torch.Tensor
        ``[B, T, V]`` logits.
    labels : torch.Tensor
        ``[B, T]`` labels.

    Returns
    -------
    torch.Tensor
        Scalar.
    """
    nll, mask = token_nll(logits, labels)
    return nll.sum() / mask.sum().clamp(min=1)


def ga_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Gradient ascent: ``-NLL_mean`` of the forget batch [V].

    Parameters
    ----------
    logits : torch.Tensor
        ``[B, T, V]`` logits.
    labels : torch.Tensor
        ``[B, T]`` labels.

    Returns
    -------
    torch.Tensor
        Scalar (unbounded below).
    """
    return -mean_nll(logits, labels)


def npo_loss(
    logp_seq: torch.Tensor, ref_logp_seq: torch.Tensor, beta: float
) -> torch.Tensor:
    """NPO: ``-(2/β)·mean log σ(-β·(log π - log π_ref))`` [V].

    Equivalently ``(2/β)·mean log(1 + (π/π_ref)^β)``; equals ``(2/β)·log 2`` when
    the model and the reference agree.

    Parameters
    ----------
    logp_seq : torch.Tensor
        ``[B]`` sequence log-probs ``log π_θ(y|x)`` (``-NLL_sum``).
    ref_logp_seq : torch.Tensor
        ``[B]`` the same under the reference model.
    beta : float
        Inverse temperature β > 0.

    Returns
    -------
    torch.Tensor
        Scalar.
    """
    ratio = logp_seq - ref_logp_seq.detach()
    return -(2.0 / beta) * F.logsigmoid(-beta * ratio).mean()


def simnpo_loss(
    nll_seq: torch.Tensor, lengths: torch.Tensor, beta: float, delta: float
) -> torch.Tensor:
    """SimNPO: ``-(2/β)·mean log σ(β·(NLL_sum/|y| - δ))`` [V].

    Reference-free and length-normalised.

    Parameters
    ----------
    nll_seq : torch.Tensor
        ``[B]`` summed answer NLLs.
    lengths : torch.Tensor
        ``[B]`` answer lengths ``|y|`` (clamped to ≥ 1).
    beta : float
        β > 0.
    delta : float
        Margin δ (``= γ_paper / β``).

    Returns
    -------
    torch.Tensor
        Scalar.
    """
    avg = nll_seq / lengths.clamp(min=1)
    return -(2.0 / beta) * F.logsigmoid(beta * (avg - delta)).mean()


def dpo_loss(
    win_logp: torch.Tensor,
    win_ref_logp: torch.Tensor,
    lose_logp: torch.Tensor,
    lose_ref_logp: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO scaled by ``2/β``: ``-(2/β)·mean log σ(β·(Δ_w - Δ_l))`` [V].

    ``Δ = log π_θ - log π_ref`` per sequence; IdkDPO uses the refusal as the
    win and the true answer as the lose sample.

    Parameters
    ----------
    win_logp, win_ref_logp : torch.Tensor
        ``[B]`` log-probs of the preferred answers (model, reference).
    lose_logp, lose_ref_logp : torch.Tensor
        ``[B]`` log-probs of the rejected answers (model, reference).
    beta : float
        β > 0.

    Returns
    -------
    torch.Tensor
        Scalar.
    """
    margin = (win_logp - win_ref_logp.detach()) - (lose_logp - lose_ref_logp.detach())
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()


def undial_targets(
    ref_logits: torch.Tensor, labels: torch.Tensor, beta: float
) -> torch.Tensor:
    """UnDIAL soft targets ``q = softmax(z_ref - β·onehot(y_t))`` per position.

    Parameters
    ----------
    ref_logits : torch.Tensor
        ``[B, T, V]`` reference logits (unshifted).
    labels : torch.Tensor
        ``[B, T]`` labels (unshifted).
    beta : float
        Strength β of the logit reduction on the true token.

    Returns
    -------
    torch.Tensor
        ``[B, T-1, V]`` target distributions (rows at ignored positions are
        computed with token 0 and must be masked by the caller).
    """
    z = ref_logits[:, :-1, :].detach().float()
    tgt = labels[:, 1:].clamp(min=0)
    onehot = F.one_hot(tgt, z.size(-1)).to(z.dtype)
    return torch.softmax(z - beta * onehot, dim=-1)


def undial_loss(
    logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor, beta: float
) -> torch.Tensor:
    """UnDIAL self-distillation: ``mean_t -Σ_v q_v log p_θ(v)`` over answer tokens.

    Parameters
    ----------
    logits : torch.Tensor
        ``[B, T, V]`` trainable-model logits.
    ref_logits : torch.Tensor
        ``[B, T, V]`` reference logits.
    labels : torch.Tensor
        ``[B, T]`` labels.
    beta : float
        β of :func:`undial_targets`.

    Returns
    -------
    torch.Tensor
        Scalar (token mean over the batch's answer positions).
    """
    q = undial_targets(ref_logits, labels, beta)
    logp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
    ce = -(q * logp).sum(-1)
    mask = (labels[:, 1:] != IGNORE_INDEX).float()
    return (ce * mask).sum() / mask.sum().clamp(min=1)


def weighted_ascent_loss(
    nll: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``-mean_t[sg(w_t)·ℓ_t]`` over the answer tokens of the batch.

    Parameters
    ----------
    nll : torch.Tensor
        ``[B, T-1]`` token CE (:func:`token_nll`).
    mask : torch.Tensor
        ``[B, T-1]`` answer mask.
    weights : torch.Tensor
        ``[B, T-1]`` token weights (detached here).

    Returns
    -------
    torch.Tensor
        Scalar.
    """
    m = mask.float()
    return -(weights.detach() * nll * m).sum() / m.sum().clamp(min=1)


def wga_loss(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """WGA (weighted gradient ascent): ``-mean_t[sg(p_t^β)·ℓ_t]`` [V].

    Parameters
    ----------
    logits : torch.Tensor
        ``[B, T, V]`` logits.
    labels : torch.Tensor
        ``[B, T]`` labels.
    beta : float
        Exponent β of the token probability ``p_t = exp(-ℓ_t)``.

    Returns
    -------
    torch.Tensor
        Scalar.
    """
    nll, mask = token_nll(logits, labels)
    p = torch.exp(-nll.detach())
    return weighted_ascent_loss(nll, mask, p.pow(beta))


def satimp_loss(
    logits: torch.Tensor, labels: torch.Tensor, beta1: float, beta2: float
) -> torch.Tensor:
    """SatImp: ``-mean_t[sg(p_t^β1·(1-p_t)^β2)·ℓ_t]`` [V].

    Parameters
    ----------
    logits : torch.Tensor
        ``[B, T, V]`` logits.
    labels : torch.Tensor
        ``[B, T]`` labels.
    beta1 : float
        Exponent of ``p_t``.
    beta2 : float
        Exponent of ``1 - p_t``.

    Returns
    -------
    torch.Tensor
        Scalar.
    """
    nll, mask = token_nll(logits, labels)
    p = torch.exp(-nll.detach())
    return weighted_ascent_loss(nll, mask, p.pow(beta1) * (1.0 - p).pow(beta2))


def uce_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Unlearning cross-entropy per answer token: ``mean_t -log(1 - p_t/2)``.

    Bounded in ``[0, log 2]``; minimising it drives ``p_t → 0`` with finite
    gradients (FedOSD code version, token mapping [R]).

    Parameters
    ----------
    logits : torch.Tensor
        ``[B, T, V]`` logits.
    labels : torch.Tensor
        ``[B, T]`` labels.

    Returns
    -------
    torch.Tensor
        Scalar (token mean over the batch's answer tokens).
    """
    nll, mask = token_nll(logits, labels)
    p = torch.exp(-nll)
    per_tok = -torch.log1p(-0.5 * p)
    m = mask.float()
    return (per_tok * m).sum() / m.sum().clamp(min=1)


def masked_mse(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RMU's masked activation distance [V].

    ``D(X, Y) = mean_b[Σ_t m_bt·mean_d (X_btd - Y_btd)² / Σ_t m_bt]``.

    Parameters
    ----------
    x, y : torch.Tensor
        ``[B, T, d]`` activations (``y`` may be broadcastable, e.g. ``[d]``).
    mask : torch.Tensor
        ``[B, T]`` answer mask (unshifted ``labels != -100``).

    Returns
    -------
    torch.Tensor
        Scalar.
    """
    m = mask.float()
    per_pos = (x.float() - y.float()).pow(2).mean(-1)
    per_seq = (per_pos * m).sum(-1) / m.sum(-1).clamp(min=1)
    return per_seq.mean()


def rmu_control_vector(dim: int, coeff: float, seed: int) -> torch.Tensor:
    """RMU's fixed random control vector ``u = c·r/‖r‖``, ``r ~ U[0, 1)^d``.

    Parameters
    ----------
    dim : int
        Hidden size d.
    coeff : float
        Steering coefficient c.
    seed : int
        Seed of the private CPU generator drawing ``r``.

    Returns
    -------
    torch.Tensor
        ``[d]`` float32 vector of norm ``c``.
    """
    gen = torch.Generator().manual_seed(int(seed) % 2**63)
    r = torch.rand(dim, generator=gen)
    return coeff * r / r.norm()
