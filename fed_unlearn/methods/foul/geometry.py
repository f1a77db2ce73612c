"""FOUL's server-side gradient geometry: the conflict-averse direction and θ_V.

Part of the FOUL family (:mod:`fed_unlearn.methods.foul`).

The direction (Part A.3 of ``specs/foul_mpu.md``)
    The server receives one pseudo-gradient ``g_u`` per client (convention
    ``θ ← θ − η·d``), signs ``s_u = +1`` for retain and ``−1`` for forget clients,
    and solves the CAGrad-style problem

    ``max_d min_i ⟨s_i g_i, d⟩  s.t.  ‖d − g0‖ ≤ κ‖g0‖``

    through its dual on the simplex:
    ``Γ* = argmin_Γ Γᵀb + κ‖g0‖·sqrt(ΓᵀGΓ)`` with ``G_ij = ⟨s_i g_i, s_j g_j⟩``
    and ``b_i = ⟨s_i g_i, g0⟩``; then ``d = g0 + κ‖g0‖/‖g_Γ‖ · g_Γ`` with
    ``g_Γ = Σ γ_i s_i g_i`` (Theorem 1). See :func:`cagrad_direction`.

    The forgettable sub-network θ_V of a LoRA adapter is chosen once from cached
    client updates by per-tensor gradient conflict (A.7 option B), see
    :func:`select_subnetwork`.

Everything is pure torch/numpy/scipy and works on flattened fp32 vectors (see
:func:`fed_unlearn.adapters.flatten`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from fed_unlearn.types import AdapterState

log = logging.getLogger(__name__)

__all__ = [
    "ConflictStep",
    "SubnetworkSelection",
    "cagrad_direction",
    "conflict_scores",
    "norm_ratios",
    "select_subnetwork",
    "select_subnetwork_detailed",
]

#: ``‖g_Γ‖`` below this fraction of the largest ``‖g_i‖`` counts as zero: the
#: origin is (numerically) in the convex hull of the signed gradients.
_DEGENERATE_RTOL = 1e-6

#: Keeps ``sqrt(ΓᵀGΓ)`` differentiable at 0 in the normalised dual objective.
_SQRT_EPS = 1e-12


# --------------------------------------------------------------------------- FOUL
@dataclass
class ConflictStep:
    """Result of one FOUL server step.

    Parameters
    ----------
    direction : torch.Tensor
        The update direction ``d`` (shape ``[d]``, dtype of the computation);
        apply as ``θ ← θ − η·d``.
    gamma : numpy.ndarray
        Dual simplex weights ``Γ*`` (shape ``[U]``, float64, sums to 1).
    g0_norm : float
        ``‖g0‖`` of the weighted base direction.
    min_retain_inner : float
        ``min_{u∈R} ⟨d, g_u⟩`` (``≥ 0`` means no retain client is hurt to first
        order).
    max_forget_inner : float
        ``max_{f∈F} ⟨d, g_f⟩`` (``≤ 0`` means every forget client's objective
        is ascended to first order).
    solve_seconds : float
        Wall time of the dual solve alone (SLSQP).
    degenerate : bool
        True when ``‖g_Γ*‖ ≈ 0`` (the origin lies in the convex hull of the
        signed gradients); then ``direction`` is ``g0`` (no conflict term).
    objective : float
        Dual objective ``F(Γ*) = Γ*ᵀb + κ‖g0‖‖g_Γ*‖``; by strong duality it
        equals the primal value ``min_i ⟨s_i g_i, d⟩``.
    """

    direction: torch.Tensor
    gamma: np.ndarray
    g0_norm: float
    min_retain_inner: float
    max_forget_inner: float
    solve_seconds: float
    degenerate: bool = False
    objective: float = float("nan")


def _check_grads(grads: torch.Tensor) -> torch.Tensor:
    """Validate a ``[U, d]`` gradient matrix; return it in fp32 or fp64."""
    if not isinstance(grads, torch.Tensor):
        raise ValueError(f"grads must be a torch.Tensor, got {type(grads).__name__}")
    if grads.dim() != 2:
        raise ValueError(
            f"grads must be a 2-D [clients, params] tensor, got shape "
            f"{tuple(grads.shape)}"
        )
    if not grads.is_floating_point():
        raise ValueError(f"grads must be floating point, got {grads.dtype}")
    if grads.dtype != torch.float64:
        grads = grads.to(torch.float32)
    return grads


def _raise_non_finite(grads: torch.Tensor) -> None:
    """Name the rows of ``grads`` holding NaN/Inf (called when the Gram is not finite).

    A NaN or Inf entry makes the matching Gram diagonal entry NaN/Inf, so the
    (expensive) element-wise check only runs once the cheap one has failed.
    """
    finite = torch.isfinite(grads).all(dim=1)
    bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
    if bad:
        raise ValueError(f"grads contain NaN/Inf (client rows {bad[:10]})")
    raise ValueError(
        f"squared gradient norms overflow {grads.dtype}; rescale the gradients"
    )


_BLAS_LOCK = threading.Lock()


@contextlib.contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Run the block with the BLAS libraries limited to one thread.

    SLSQP's subproblems are tiny (U×U) but run through scipy's BLAS/LAPACK; with
    OpenBLAS's thread pool on a few shared cores every call pays a thread
    hand-off, which made a 20-client solve take 80-200 ms instead of about
    1.5 ms in our measurements. ``threadpoolctl`` sets every loaded BLAS to one
    thread for the block and restores the previous counts after it.
    """
    with _BLAS_LOCK, threadpool_limits(limits=1, user_api="blas"):
        yield


def _solve_dual(
    gram: np.ndarray, b: np.ndarray, radius: float
) -> tuple[np.ndarray, float]:
    """Minimise ``Γᵀb + radius·sqrt(ΓᵀGΓ)`` over the simplex with SLSQP.

    Inputs are already normalised to O(1) so that the solver's tolerances do not
    depend on the gradients' scale. Returns ``(Γ*, wall seconds)``.
    """
    n = b.shape[0]
    x0 = np.full(n, 1.0 / n)

    def fun(x: np.ndarray) -> float:
        return float(x @ b + radius * math.sqrt(max(x @ gram @ x, 0.0) + _SQRT_EPS))

    def jac(x: np.ndarray) -> np.ndarray:
        gx = gram @ x
        return b + radius * gx / math.sqrt(max(x @ gx, 0.0) + _SQRT_EPS)

    t0 = time.perf_counter()
    with _single_threaded_blas():
        res = minimize(
            fun,
            x0,
            jac=jac,
            method="SLSQP",
            bounds=[(0.0, 1.0)] * n,
            constraints=(
                {
                    "type": "eq",
                    "fun": lambda x: x.sum() - 1.0,
                    "jac": lambda x: np.ones(n),
                },
            ),
            options={"maxiter": 500, "ftol": 1e-12},
        )
    seconds = time.perf_counter() - t0
    gamma = np.clip(np.asarray(res.x, dtype=np.float64), 0.0, None)
    total = gamma.sum()
    gamma = gamma / total if total > 0 else x0
    # SLSQP may stop early on a flat objective; never return worse than the start.
    if fun(gamma) > fun(x0):
        gamma = x0
    if not res.success:
        log.debug("FOUL dual solve: SLSQP reported %r", res.message)
    return gamma, seconds


def cagrad_direction(
    grads: torch.Tensor,
    signs: Sequence[int],
    weights: Sequence[float],
    kappa: float,
) -> ConflictStep:
    """FOUL's server direction: CAGrad with sign-flipped forget gradients.

    Parameters
    ----------
    grads : torch.Tensor
        ``[U, d]`` pseudo-gradients, one row per client, with the convention
        ``θ ← θ − η·d`` (a pseudo-gradient is ``θ_start − θ_end``). fp32 inputs
        are computed in fp32 and fp64 inputs in fp64; other float dtypes are
        cast to fp32.
    signs : Sequence[int]
        ``+1`` for a retain client, ``−1`` for a forget client.
    weights : Sequence[float]
        Data-size weights ``p_u ≥ 0`` of ``g0 = Σ p_u g_u / Σ p_u``. Pass 0 for
        forget clients to get the recommended retain-only base direction
        (A.6-2); non-zero forget weights are allowed and then include those
        clients in ``g0``.
    kappa : float
        Conflict radius ``κ ≥ 0``. ``κ = 0`` returns ``g0`` exactly.

    Returns
    -------
    ConflictStep
        The direction, ``Γ*``, ``‖g0‖``, the retain/forget inner products and
        the solve time. If ``‖g_Γ*‖ ≈ 0`` (relative to the largest gradient
        norm) the direction is ``g0`` and ``degenerate`` is True.

    Raises
    ------
    ValueError
        If ``kappa`` is negative or not finite, ``grads`` is not a finite 2-D
        float tensor, ``U < 2``, ``signs``/``weights`` lengths differ from
        ``U``, a sign is not ±1, a weight is negative or not finite, there is
        no retain or no forget client, or all retain weights are zero.

    Notes
    -----
    Cost: one ``[U, d] × [d, U]`` matmul (the Gram matrix of the raw
    gradients, from which ``G``, ``b``, ``‖g0‖`` and all inner products are
    derived) plus one ``[U] × [U, d]`` matvec for ``d``. The dual is solved on
    the Gram matrix divided by its mean diagonal, so ``Γ*`` is invariant to a
    common rescaling of the gradients and ``d`` scales with them.
    """
    kappa = float(kappa)
    if not math.isfinite(kappa) or kappa < 0:
        raise ValueError(f"kappa must be a finite number >= 0, got {kappa}")
    grads = _check_grads(grads)
    n_clients = grads.shape[0]
    if n_clients < 2:
        raise ValueError(
            f"FOUL needs at least 2 clients (>= 1 retain and >= 1 forget), got "
            f"{n_clients}"
        )
    if len(signs) != n_clients:
        raise ValueError(f"got {n_clients} gradient rows but {len(signs)} signs")
    if len(weights) != n_clients:
        raise ValueError(f"got {n_clients} gradient rows but {len(weights)} weights")
    if any(float(x) not in (1.0, -1.0) for x in signs):
        raise ValueError(f"signs must be +1 (retain) or -1 (forget), got {list(signs)}")
    s = np.asarray([float(x) for x in signs], dtype=np.float64)
    retain, forget = s > 0, s < 0
    if not retain.any():
        raise ValueError("FOUL needs at least one retain client (sign +1)")
    if not forget.any():
        raise ValueError("FOUL needs at least one forget client (sign -1)")
    w = np.asarray([float(x) for x in weights], dtype=np.float64)
    if not np.isfinite(w).all():
        raise ValueError(f"weights must be finite, got {list(weights)}")
    if (w < 0).any():
        raise ValueError(f"weights must be >= 0, got {list(weights)}")
    if w[retain].sum() <= 0:
        raise ValueError("all retain-client weights are zero: g0 is undefined")
    w = w / w.sum()

    # Everything below d is derived from the raw Gram matrix K = grads gradsᵀ.
    kmat_t = grads @ grads.T
    if not bool(torch.isfinite(kmat_t.diagonal()).all()):
        _raise_non_finite(grads)
    kmat = kmat_t.double().cpu().numpy()
    kmat = 0.5 * (kmat + kmat.T)
    kw = kmat @ w
    g0_sq = max(float(w @ kw), 0.0)
    g0_norm = math.sqrt(g0_sq)
    gram = kmat * np.outer(s, s)  # G_ij = <s_i g_i, s_j g_j>
    b = s * kw  # b_i = <s_i g_i, g0>

    scale = float(np.mean(np.diag(kmat)))
    if scale > 0:
        gamma, solve_s = _solve_dual(
            gram / scale, b / scale, kappa * g0_norm / math.sqrt(scale)
        )
    else:  # every gradient is zero: nothing to solve, d = g0 = 0
        gamma, solve_s = np.full(n_clients, 1.0 / n_clients), 0.0

    g_gamma_sq = max(float(gamma @ gram @ gamma), 0.0)
    g_gamma_norm = math.sqrt(g_gamma_sq)
    max_norm = math.sqrt(max(float(np.max(np.diag(kmat))), 0.0))
    degenerate = g_gamma_norm <= _DEGENERATE_RTOL * max_norm
    coef = w.copy()
    if kappa > 0 and not degenerate:
        coef = coef + (kappa * g0_norm / g_gamma_norm) * gamma * s
    if degenerate and kappa > 0:
        log.warning(
            "FOUL: ||g_Gamma|| ~ 0 (origin in the hull of the signed gradients); "
            "returning g0 without a conflict term"
        )
    direction = torch.as_tensor(coef, dtype=grads.dtype, device=grads.device) @ grads
    inner = kmat @ coef  # <d, g_u> for every client
    objective = float(gamma @ b) + kappa * g0_norm * g_gamma_norm
    return ConflictStep(
        direction=direction,
        gamma=gamma,
        g0_norm=g0_norm,
        min_retain_inner=float(inner[retain].min()),
        max_forget_inner=float(inner[forget].max()),
        solve_seconds=solve_s,
        degenerate=bool(degenerate),
        objective=objective,
    )


# ------------------------------------------------------------ sub-network choice
def _check_pair(forget: AdapterState, retain_mean: AdapterState) -> list[str]:
    """Validate two adapter states of the same layout; return their sorted keys."""
    if not forget:
        raise ValueError("the forget update is empty: no tensor to score")
    kf, kr = set(forget), set(retain_mean)
    if kf != kr:
        only_f = sorted(kf - kr)[:5]
        only_r = sorted(kr - kf)[:5]
        raise ValueError(
            f"forget and retain-mean keys differ (only in forget: {only_f}; "
            f"only in retain mean: {only_r})"
        )
    for k in sorted(kf):
        if forget[k].shape != retain_mean[k].shape:
            raise ValueError(
                f"shape mismatch for {k!r}: forget {tuple(forget[k].shape)} vs "
                f"retain mean {tuple(retain_mean[k].shape)}"
            )
        for name, t in (("forget", forget[k]), ("retain mean", retain_mean[k])):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} tensor {k!r} contains NaN/Inf")
    return sorted(kf)


def _norms_and_dot(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """Return ``(‖a‖, ‖b‖, ⟨a, b⟩)`` in float64."""
    a64 = a.detach().reshape(-1).double()
    b64 = b.detach().reshape(-1).double()
    return float(a64.norm()), float(b64.norm()), float(a64 @ b64)


def conflict_scores(
    forget: AdapterState, retain_mean: AdapterState
) -> dict[str, float]:
    """Per-tensor cosine between the forget update and the retain mean.

    Parameters
    ----------
    forget : AdapterState
        The forget client's (cached or live) update ``g_f``.
    retain_mean : AdapterState
        The size-weighted mean retain update ``ḡ_R``.

    Returns
    -------
    dict[str, float]
        ``cos(g_f^j, ḡ_R^j)`` per tensor ``j`` in sorted key order; 0 where
        either norm is 0.

    Raises
    ------
    ValueError
        If the inputs are empty, their keys or shapes differ, or they contain
        NaN/Inf.
    """
    out: dict[str, float] = {}
    for k in _check_pair(forget, retain_mean):
        nf, nr, dot = _norms_and_dot(forget[k], retain_mean[k])
        out[k] = 0.0 if nf == 0 or nr == 0 else max(-1.0, min(1.0, dot / (nf * nr)))
    return out


def norm_ratios(forget: AdapterState, retain_mean: AdapterState) -> dict[str, float]:
    """Per-tensor norm ratio ``‖g_f^j‖ / (‖ḡ_R^j‖ + 1e-12)``.

    Parameters
    ----------
    forget : AdapterState
        The forget client's update.
    retain_mean : AdapterState
        The size-weighted mean retain update.

    Returns
    -------
    dict[str, float]
        The ratio per tensor, in sorted key order.

    Raises
    ------
    ValueError
        As :func:`conflict_scores`.
    """
    out: dict[str, float] = {}
    for k in _check_pair(forget, retain_mean):
        nf, nr, _ = _norms_and_dot(forget[k], retain_mean[k])
        out[k] = nf / (nr + 1e-12)
    return out


@dataclass
class SubnetworkSelection:
    """Outcome of :func:`select_subnetwork_detailed`.

    Parameters
    ----------
    keys : list[str]
        The selected tensors θ_V (sorted).
    rule : str
        The rule that produced ``keys`` (``"conflict"`` or ``"ratio"``).
    fell_back : bool
        True when rule ``"conflict"`` selected nothing and the top-p by norm
        ratio was used instead.
    scores : dict[str, float]
        Per-tensor conflict cosines.
    ratios : dict[str, float]
        Per-tensor norm ratios.
    """

    keys: list[str]
    rule: str
    fell_back: bool
    scores: dict[str, float] = field(repr=False)
    ratios: dict[str, float] = field(repr=False)


def _top_p(ratios: dict[str, float], top_p: float) -> list[str]:
    """Return the ``ceil(top_p·n)`` (at least 1) keys of largest ratio, sorted."""
    n = max(1, math.ceil(top_p * len(ratios) - 1e-9))
    ranked = sorted(ratios, key=lambda k: (-ratios[k], k))
    return sorted(ranked[:n])


def select_subnetwork_detailed(
    forget: AdapterState,
    retain_mean: AdapterState,
    rule: str = "conflict",
    tau: float = 0.0,
    top_p: float = 0.25,
) -> SubnetworkSelection:
    """Choose FOUL's forgettable tensors θ_V once, from cached updates (A.7-B).

    Parameters
    ----------
    forget : AdapterState
        The forget client's update ``g_f`` (keys = adapter tensors).
    retain_mean : AdapterState
        The size-weighted mean retain update ``ḡ_R``.
    rule : str
        ``"conflict"``: tensors with ``cos(g_f^j, ḡ_R^j) < tau``; if none
        qualifies, falls back to rule ``"ratio"`` (and says so in
        ``fell_back``). ``"ratio"``: the top ``ceil(top_p·n)`` tensors (at least
        one) by ``‖g_f^j‖ / (‖ḡ_R^j‖ + 1e-12)``.
    tau : float
        Cosine threshold of rule ``"conflict"`` (default 0).
    top_p : float
        Fraction in ``(0, 1]`` for rule ``"ratio"`` and for the fallback.

    Returns
    -------
    SubnetworkSelection
        The selected keys (sorted), the rule used, the fallback flag and the
        per-tensor scores.

    Raises
    ------
    ValueError
        If ``rule`` is unknown, ``top_p`` is outside ``(0, 1]``, ``tau`` is not
        finite, or the inputs are empty, differ in keys/shapes or are not
        finite.
    """
    if rule not in ("conflict", "ratio"):
        raise ValueError(
            f"unknown sub-network rule {rule!r}; use 'conflict' or 'ratio'"
        )
    if not (0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not math.isfinite(float(tau)):
        raise ValueError(f"tau must be finite, got {tau}")
    scores = conflict_scores(forget, retain_mean)
    ratios = norm_ratios(forget, retain_mean)
    fell_back = False
    if rule == "conflict":
        keys = sorted(k for k, c in scores.items() if c < tau)
        if not keys:
            log.warning(
                "FOUL sub-network: no tensor has conflict cosine < %g; falling back "
                "to the top %.0f%% by norm ratio",
                tau,
                100 * top_p,
            )
            keys, rule, fell_back = _top_p(ratios, top_p), "ratio", True
    else:
        keys = _top_p(ratios, top_p)
    if not keys:  # cannot happen with non-empty inputs; kept as a guard
        raise ValueError("the selected sub-network is empty")
    return SubnetworkSelection(
        keys=keys, rule=rule, fell_back=fell_back, scores=scores, ratios=ratios
    )


def select_subnetwork(
    forget: AdapterState,
    retain_mean: AdapterState,
    rule: str = "conflict",
    tau: float = 0.0,
    top_p: float = 0.25,
) -> list[str]:
    """Choose FOUL's forgettable tensors θ_V (keys only).

    Same as :func:`select_subnetwork_detailed` (which also reports whether rule
    ``"conflict"`` fell back to the norm-ratio rule; a fallback is also logged
    as a warning) but returns only the sorted list of selected keys.

    Parameters
    ----------
    forget : AdapterState
        The forget client's update.
    retain_mean : AdapterState
        The size-weighted mean retain update.
    rule : str
        ``"conflict"`` or ``"ratio"``.
    tau : float
        Cosine threshold of rule ``"conflict"``.
    top_p : float
        Fraction for rule ``"ratio"`` and the fallback.

    Returns
    -------
    list[str]
        Selected tensor names, sorted, never empty.

    Raises
    ------
    ValueError
        As :func:`select_subnetwork_detailed`.
    """
    return select_subnetwork_detailed(forget, retain_mean, rule, tau, top_p).keys
