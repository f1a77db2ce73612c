"""Server-side aggregation of client LoRA adapters.

Two rules are provided:

* :func:`fedavg` averages the factors ``A`` and ``B`` separately (what Flower's
  ``FedAvg`` does with ``num-examples`` weights). The product of the averaged
  factors is *not* the average of the products: ``B̄ Ā ≠ Σ w_i B_i A_i``.
* :func:`product_space_aggregate` averages the products ``B_i A_i`` (the actual
  weight updates) and refactorises the mean with a truncated SVD.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from fed_unlearn.adapters import lora_pairs
from fed_unlearn.types import AdapterState

__all__ = ["AGGREGATORS", "fedavg", "product_space_aggregate"]


def _normalised_weights(weights: Sequence[float], n: int) -> list[float]:
    """Check ``weights`` against ``n`` states and scale them to sum to 1."""
    if len(weights) != n:
        raise ValueError(f"got {n} states but {len(weights)} weights")
    ws = [float(w) for w in weights]
    for i, w in enumerate(ws):
        if not math.isfinite(w):
            raise ValueError(f"weight {i} is not finite ({w})")
        if w < 0:
            raise ValueError(f"weight {i} is negative ({w}); weights must be >= 0")
    total = math.fsum(ws)
    if total <= 0:
        raise ValueError("all weights are zero; nothing to aggregate")
    return [w / total for w in ws]


def _check_states(states: Sequence[AdapterState]) -> None:
    """Raise ``ValueError`` unless all states share keys, shapes and float dtypes."""
    if len(states) == 0:
        raise ValueError("cannot aggregate an empty list of states")
    ref = states[0]
    for key, t in ref.items():
        if not t.is_floating_point():
            raise ValueError(f"state 0: {key!r} has non-floating dtype {t.dtype}")
    for i, s in enumerate(states[1:], start=1):
        if set(s) != set(ref):
            missing = sorted(set(ref) - set(s))[:5]
            extra = sorted(set(s) - set(ref))[:5]
            raise ValueError(
                f"state {i} has different keys than state 0 "
                f"(missing: {missing}, unexpected: {extra})"
            )
        for key, t in ref.items():
            if s[key].shape != t.shape:
                raise ValueError(
                    f"state {i}: {key!r} has shape {tuple(s[key].shape)}, "
                    f"state 0 has {tuple(t.shape)}"
                )
            if not s[key].is_floating_point():
                raise ValueError(
                    f"state {i}: {key!r} has non-floating dtype {s[key].dtype}"
                )


def _weighted_mean(
    states: Sequence[AdapterState], ws: Sequence[float], key: str
) -> torch.Tensor:
    """Float64 weighted sum of ``states[i][key]`` with already normalised weights."""
    ref = states[0][key]
    acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
    for w, s in zip(ws, states, strict=True):
        if w != 0.0:
            t = s[key].detach().to(device=ref.device, dtype=torch.float64)
            acc.add_(t, alpha=w)
    return acc


def fedavg(states: Sequence[AdapterState], weights: Sequence[float]) -> AdapterState:
    """Weighted average of adapters in factor space.

    Every tensor (``lora_A`` and ``lora_B`` alike) is averaged separately, as
    Flower's ``FedAvg`` does with ``num-examples`` weights. Note that for LoRA
    this does not average the weight updates: ``B̄ @ Ā`` generally differs from
    ``Σ w_i B_i @ A_i`` (see :func:`product_space_aggregate`).

    Parameters
    ----------
    states : Sequence[AdapterState]
        Client adapters with identical keys and shapes.
    weights : Sequence[float]
        Non-negative weights (e.g. numbers of examples), one per state; they are
        normalised to sum to 1.

    Returns
    -------
    AdapterState
        The average, computed in float64 and returned in each tensor's original
        dtype (that of ``states[0]``) and device, in ``states[0]``'s key order.

    Raises
    ------
    ValueError
        On an empty input, a length mismatch between ``states`` and ``weights``,
        negative, non-finite or all-zero weights, or key/shape/dtype mismatches
        between states.
    """
    _check_states(states)
    ws = _normalised_weights(weights, len(states))
    return {
        key: _weighted_mean(states, ws, key).to(ref.dtype)
        for key, ref in states[0].items()
    }


def product_space_aggregate(
    states: Sequence[AdapterState],
    weights: Sequence[float],
    rank: int | None = None,
) -> AdapterState:
    """Average LoRA updates in product space and refactorise them by SVD.

    For each LoRA pair ``(A_i [r, in], B_i [out, r])`` this forms
    ``M = Σ_i w_i B_i @ A_i`` (normalised weights, float64), takes the truncated
    SVD ``M = U S Vᵀ`` and returns ``B = U[:, :r] · sqrt(S[:r])`` (shape
    ``[out, r]``) and ``A = sqrt(S[:r]) · Vᵀ[:r]`` (shape ``[r, in]``), so that
    ``B @ A`` is the best rank-``r`` approximation of ``M`` (Eckart-Young).

    This averages *products* (the actual weight updates ``s · B_i A_i``), while
    :func:`fedavg` averages *factors*, whose product ``B̄ Ā`` is not the mean of
    ``B_i A_i``. The result is exact (``B @ A == M`` up to rounding) whenever
    ``rank(M) <= r``, in particular when ``r`` is at least the sum of the client
    ranks; otherwise the components of ``M`` beyond the ``r`` largest singular
    values are dropped. Inputs must be full adapters, not deltas (``B @ A`` is
    not linear in the factors). If ``r`` exceeds ``min(out, in)`` the factors
    are zero-padded to rank ``r``.

    Tensors that are not LoRA factors (see :func:`~fed_unlearn.adapters.lora_pairs`)
    are combined with plain :func:`fedavg`.

    Parameters
    ----------
    states : Sequence[AdapterState]
        Client adapters with identical keys and shapes.
    weights : Sequence[float]
        Non-negative weights, one per state; normalised to sum to 1.
    rank : int or None
        Rank of the returned factors; ``None`` keeps the input rank
        (``A.shape[0]``).

    Returns
    -------
    AdapterState
        The aggregated adapter in ``states[0]``'s key order, dtypes and devices
        (the factor shapes change only if ``rank`` differs from the input rank).

    Raises
    ------
    ValueError
        As :func:`fedavg`, plus: invalid ``rank``, unpaired LoRA factors, or
        factor shapes that do not form ``[out, r] @ [r, in]``.
    """
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        raise ValueError(f"rank must be a positive int or None, got {rank!r}")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    _check_states(states)
    ws = _normalised_weights(weights, len(states))
    ref = states[0]
    pairs = lora_pairs(ref)
    out: AdapterState = {}
    for prefix, (a_key, b_key) in pairs.items():
        a0, b0 = ref[a_key], ref[b_key]
        if a0.dim() != 2 or b0.dim() != 2 or b0.shape[1] != a0.shape[0]:
            raise ValueError(
                f"{prefix!r}: LoRA factors must be B [out, r] and A [r, in], got "
                f"B {tuple(b0.shape)} and A {tuple(a0.shape)}"
            )
        r = a0.shape[0] if rank is None else rank
        device = a0.device
        m = torch.zeros((b0.shape[0], a0.shape[1]), dtype=torch.float64, device=device)
        for w, s in zip(ws, states, strict=True):
            if w != 0.0:
                b = s[b_key].detach().to(device=device, dtype=torch.float64)
                a = s[a_key].detach().to(device=device, dtype=torch.float64)
                m.addmm_(b, a, alpha=w)
        u, sv, vh = torch.linalg.svd(m, full_matrices=False)
        k = min(r, sv.shape[0])
        root = sv[:k].sqrt()
        b_new = torch.zeros((m.shape[0], r), dtype=torch.float64, device=device)
        a_new = torch.zeros((r, m.shape[1]), dtype=torch.float64, device=device)
        b_new[:, :k] = u[:, :k] * root
        a_new[:k] = root[:, None] * vh[:k]
        assert b_new.shape == (b0.shape[0], r) and a_new.shape == (r, a0.shape[1])
        out[a_key] = a_new.to(a0.dtype)
        out[b_key] = b_new.to(b0.dtype)
    for key, t in ref.items():
        if key not in out:
            out[key] = _weighted_mean(states, ws, key).to(t.dtype)
    return {key: out[key] for key in ref}


#: Aggregation rules by name (as used in run configurations).
AGGREGATORS: dict[str, Callable[..., AdapterState]] = {
    "fedavg": fedavg,
    "product_svd": product_space_aggregate,
}
