"""FedOSD: federated unlearning with gradient descent and conflict mitigation.

Paper: Pan et al., "Federated Unlearning with Gradient Descent and Conflict
Mitigation", AAAI-25 (arXiv 2412.20200). Spec: ``shared/specs/methods.md`` §2.4
(read in the official code [V] unless tagged otherwise).

Unlearning stage, each round (``unlearn_rounds``):

- the departed (target) clients run E local epochs of the Unlearning
  Cross-Entropy ℓ_UCE = -log(1 - p(y|x)/2) [V] — per answer token, averaged over
  answer tokens, for causal LMs [R] — and upload their update; the remaining
  clients do the same with their ordinary loss. Pseudo-gradients
  g = θ - θ_local (so θ ← θ - η g follows the local objective);
- g_u = mean of the targets' pseudo-gradients, A = stacked remaining ones;
  d = g_u - Aᵀ(AAᵀ)⁺A g_u (pseudo-inverse by SVD [V]; eigenvalues of AAᵀ below
  ``tol`` = 1e-6 *times the largest* are dropped — relative, where the official
  code's threshold is absolute, because LoRA pseudo-gradients are small and an
  absolute 1e-6 would drop every direction [R]), rescaled to ‖g_u‖ [V];
  θ ← θ - η·d. To first order no
  remaining client's loss rises (⟨d, g_r⟩ = 0).

Post-training stage (``post_rounds``, targets dropped) [V]: with
ga = θ - θ_0 (θ_0 the adapter before unlearning), each remaining pseudo-gradient
loses its component along ga and is rescaled to its own norm (reversion-proof
projection), then they are averaged with uniform weights [V] and applied.

The whole adapter travels (FedOSD has no sub-network). Our defaults are far
fewer rounds than the paper's CIFAR-10 schedule (UR = 100): the unlearning stage
stops after its round budget, or for research on the oracle
(:mod:`fed_unlearn.methods.rounds`) [R].
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from fed_unlearn import adapters as ad
from fed_unlearn import seeds
from fed_unlearn.methods.base import (
    RUN_LR,
    ClientFailure,
    Requirement,
    UnlearnContext,
    UnlearningMethod,
    UnlearnResult,
)
from fed_unlearn.methods.rounds import (
    StopOptions,
    check_positive,
    copy_deltas,
)
from fed_unlearn.protocol import LocalUpdateReply, LocalUpdateRequest
from fed_unlearn.types import AdapterState

log = logging.getLogger(__name__)


# -------------------------------------------------------------- the geometry
def _check_vector(v: torch.Tensor, name: str) -> float:
    """Check that ``v`` is a finite 1-D float tensor; return its float64 norm.

    Finiteness is read off the norm (NaN/Inf entries make it NaN/Inf), which
    saves an element-wise pass over large vectors.
    """
    if not isinstance(v, torch.Tensor) or v.dim() != 1 or not v.is_floating_point():
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"{name} must be a 1-D float tensor, got {shape}")
    norm = _norm64(v)
    if not math.isfinite(norm):
        raise ValueError(f"{name} contains NaN/Inf")
    return norm


def _norm64(v: torch.Tensor) -> float:
    """Euclidean norm accumulated in float64."""
    return float(torch.linalg.vector_norm(v, dtype=torch.float64))


def orthogonal_direction(
    g_u: torch.Tensor, G_r: torch.Tensor, tol: float = 1e-6
) -> torch.Tensor:
    """FedOSD unlearning direction, orthogonal to every remaining gradient.

    ``d = g_u − G_rᵀ (G_r G_rᵀ)⁺ G_r g_u``, rescaled to ``‖g_u‖``.

    Parameters
    ----------
    g_u : torch.Tensor
        ``[d]`` unlearning gradient (mean of the target clients' vectors).
    G_r : torch.Tensor
        ``[K, d]`` remaining clients' gradients (``K = 0`` allowed: returns a
        copy of ``g_u``).
    tol : float
        Eigenvalues of ``G_r G_rᵀ`` below ``tol × (largest eigenvalue)`` are
        dropped from the pseudo-inverse (rank-deficient ``G_r``). The official
        code uses an absolute threshold; a relative one is used here because
        LoRA pseudo-gradients can be tiny (an absolute ``1e-6`` would drop every
        direction) or large.

    Returns
    -------
    torch.Tensor
        ``[d]`` direction with ``‖d‖ = ‖g_u‖``, in ``g_u``'s dtype (fp32 unless
        ``g_u`` is fp64); apply as ``θ ← θ − lr·d``. The zero vector when
        ``g_u = 0`` or when ``g_u`` lies (numerically) in the span of ``G_r``,
        which is logged as a warning.

    Raises
    ------
    ValueError
        On shape mismatch, non-finite inputs or a negative ``tol``.

    Notes
    -----
    The projection is applied twice (re-orthogonalisation), which brings
    ``|⟨d, g_r⟩|`` down to rounding level even for ill-conditioned ``G_r``.
    """
    g_norm = _check_vector(g_u, "g_u")
    if not isinstance(G_r, torch.Tensor) or G_r.dim() != 2:
        raise ValueError("G_r must be a 2-D [clients, params] tensor")
    if G_r.shape[1] != g_u.shape[0]:
        raise ValueError(
            f"G_r has {G_r.shape[1]} columns but g_u has {g_u.shape[0]} entries"
        )
    if not G_r.is_floating_point():
        raise ValueError(f"G_r must be floating point, got {G_r.dtype}")
    if not (tol >= 0):
        raise ValueError(f"tol must be >= 0, got {tol}")
    dtype = torch.float64 if g_u.dtype == torch.float64 else torch.float32
    g = g_u.to(dtype)
    if G_r.shape[0] == 0:
        return g.clone()
    rows = G_r.to(device=g.device, dtype=dtype)
    gram = (rows @ rows.T).double()
    # A NaN/Inf entry of G_r shows on the Gram diagonal; no element-wise pass.
    if not bool(torch.isfinite(gram.diagonal()).all()):
        raise ValueError("G_r contains NaN/Inf (or its squared row norms overflow)")
    if g_norm == 0.0:
        return torch.zeros_like(g)
    evals, evecs = torch.linalg.eigh(0.5 * (gram + gram.T))
    top = float(evals.max())
    if top <= 0.0:  # every remaining gradient is zero
        return g.clone()
    keep = evals > tol * top
    basis = evecs[:, keep]
    pinv = (basis / evals[keep]) @ basis.T  # (G_r G_rᵀ)⁺, K×K float64
    d = g
    for _ in range(2):  # d ← d − G_rᵀ (G_r G_rᵀ)⁺ G_r d; K-sized part in float64
        coef = (pinv @ (rows @ d).double()).to(dtype)
        d = d - coef @ rows
    d_norm = _norm64(d)
    if d_norm <= 1e-6 * g_norm:
        log.warning(
            "FedOSD: the unlearning gradient lies in the span of the remaining "
            "gradients; returning the zero direction"
        )
        return torch.zeros_like(g)
    return d * (g_norm / d_norm)


def post_project(g: torch.Tensor, ga: torch.Tensor) -> torch.Tensor:
    """FedOSD post-training: remove the component along ``ga``, keep the norm.

    Parameters
    ----------
    g : torch.Tensor
        ``[d]`` remaining client's gradient.
    ga : torch.Tensor
        ``[d]`` unlearning displacement ``θ − θ_0`` (model minus the model
        before unlearning).

    Returns
    -------
    torch.Tensor
        ``g − (⟨g, ga⟩/‖ga‖²)·ga`` rescaled to ``‖g‖``; ``g`` unchanged (a copy)
        when ``ga = 0``; the zero vector when ``g`` is parallel to ``ga``.

    Raises
    ------
    ValueError
        On shape mismatch or non-finite inputs.
    """
    g_norm = _check_vector(g, "g")
    a_norm = _check_vector(ga, "ga")
    if g.shape != ga.shape:
        raise ValueError(f"g has shape {tuple(g.shape)} but ga {tuple(ga.shape)}")
    dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    g = g.to(dtype)
    if a_norm == 0.0 or g_norm == 0.0:
        return g.clone()
    a = ga.to(device=g.device, dtype=dtype) / a_norm  # unit vector
    p = g - float(g @ a) * a
    p = p - float(p @ a) * a  # re-orthogonalise (fp32 rounding)
    p_norm = _norm64(p)
    if p_norm <= 1e-6 * g_norm:
        return torch.zeros_like(g)
    return p * (g_norm / p_norm)


@dataclass(kw_only=True)
class FedOSDConfig(StopOptions):
    """FedOSD options.

    Parameters
    ----------
    unlearn_rounds : int
        Budget of unlearning rounds (default: 10).
    post_rounds : int
        Post-training rounds with the reversion-proof projection (default: 1).
    server_lr : float
        Server step η on the (pseudo-gradient) directions (default: 1.0).
    local_epochs : int
        Local epochs behind each pseudo-gradient (default: 1).
    lr : float
        Clients' learning rate in the unlearning stage; 0 (``RUN_LR``) =
        ``lr_scale`` x the run's (default: 0).
    lr_scale : float
        Unlearning-stage rate relative to the FL one when ``lr`` is 0 (default:
        0.1; at the FL rate one round of UCE wipes out the tiny model).
    post_lr : float
        Clients' learning rate in post-training; 0 (``RUN_LR``) = the run's
        (default: 0).
    tol : float
        Relative cut-off of the pseudo-inverse's eigenvalues (default: 1e-6).
    stop, audit_tol
        See :class:`~fed_unlearn.methods.rounds.StopOptions`.
    """

    unlearn_rounds: int = 10
    post_rounds: int = 1
    server_lr: float = 1.0
    local_epochs: int = 1
    lr: float = RUN_LR
    lr_scale: float = 0.1
    post_lr: float = RUN_LR
    tol: float = 1e-6

    def __post_init__(self) -> None:
        if self.unlearn_rounds < 1 or self.local_epochs < 1:
            raise ValueError("unlearn_rounds and local_epochs must be >= 1")
        if self.post_rounds < 0:
            raise ValueError(f"post_rounds must be >= 0, got {self.post_rounds}")
        check_positive(server_lr=self.server_lr, tol=self.tol, lr_scale=self.lr_scale)
        if self.lr < 0 or self.post_lr < 0:
            raise ValueError("lr and post_lr must be >= 0 (0 = the run's)")
        super().__post_init__()


def _pseudo_grads(
    replies: dict[int, LocalUpdateReply], like: AdapterState
) -> dict[int, torch.Tensor]:
    """Client -> flattened pseudo-gradient θ - θ_local (minus its delta)."""
    return {
        cid: -ad.flatten({k: delta[k] for k in like})
        for cid, (delta, _w) in copy_deltas(replies, like, "fedosd").items()
    }


class FedOSD(UnlearningMethod):
    """UCE ascent projected orthogonally to the remaining clients' gradients."""

    summary = (
        "FedOSD: UCE on the departed client, direction orthogonal to remaining "
        "gradients, reversion-proof post-training [V]"
    )
    requires = frozenset({Requirement.LIVE_CLIENTS, Requirement.DEPARTED_COOPERATION})
    config: FedOSDConfig

    def resume_refusal(self) -> str | None:
        """FedOSD resumes: its round state is the adapter (θ_0 is ``trained``)."""
        return None

    def unlearn(self, ctx: UnlearnContext) -> UnlearnResult:
        """Unlearning stage then post-training; see the module docstring."""
        self.check(ctx)
        cfg = self.config
        assert ctx.clients is not None
        theta0 = {k: v.float().clone() for k, v in ctx.trained.items()}
        theta = {k: v.clone() for k, v in theta0.items()}
        log = cfg.round_log(ctx)
        theta = log.start(theta)
        unl = {"lr": cfg.lr} if cfg.lr > RUN_LR else {"lr_scale": cfg.lr_scale}
        post = {"lr": cfg.post_lr} if cfg.post_lr > RUN_LR else {}
        r = 0
        for r in range(1, cfg.unlearn_rounds + 1):
            if (stop := log.resumed(r)) is not None:
                if stop:
                    break
                continue  # logged before a restart: ``theta`` is its result
            try:
                tgt = ctx.clients.query(
                    dict.fromkeys(
                        ctx.departed,
                        LocalUpdateRequest(
                            copies=[theta],
                            epochs=cfg.local_epochs,
                            loss="uce",
                            seed_round=seeds.FEDOSD_UNLEARN + r,
                            **unl,
                        ),
                    )
                )
            except ClientFailure as exc:
                if not log.departed_left(exc, r, "fedosd"):
                    raise
                r -= 1
                break
            rem = ctx.clients.query(
                dict.fromkeys(
                    ctx.remaining,
                    LocalUpdateRequest(
                        copies=[theta],
                        epochs=cfg.local_epochs,
                        loss="nll",
                        seed_round=seeds.FEDOSD_UNLEARN + r,
                        **unl,
                    ),
                )
            )
            log.add_compute(tgt)
            log.add_compute(rem)
            g_t, g_r = _pseudo_grads(tgt, theta), _pseudo_grads(rem, theta)
            g_u = torch.stack(list(g_t.values())).mean(0)
            a = torch.stack([g_r[c] for c in ctx.remaining])
            d = orthogonal_direction(g_u, a, tol=cfg.tol)
            step = ad.unflatten(d, theta)
            theta = {k: theta[k] - cfg.server_lr * step[k] for k in theta}
            inner = (a @ d).abs().max().item() / max(
                float(d.norm() * a.norm(dim=1).max()), 1e-12
            )
            extra = {"stage": "unlearn", "max_rel_retain_inner": inner}
            if log.end_round(r, theta, extra):
                break
        theta = log.result(theta)
        for p in range(1, cfg.post_rounds + 1):
            if log.resumed(r + p) is not None:
                continue
            rem = ctx.clients.query(
                dict.fromkeys(
                    ctx.remaining,
                    LocalUpdateRequest(
                        copies=[theta],
                        epochs=cfg.local_epochs,
                        loss="nll",
                        seed_round=seeds.FEDOSD_POST + p,
                        **post,
                    ),
                )
            )
            log.add_compute(rem)
            g_r = _pseudo_grads(rem, theta)
            ga = ad.flatten(theta) - ad.flatten(theta0)
            g = torch.stack([post_project(g_r[c], ga) for c in ctx.remaining]).mean(0)
            step = ad.unflatten(g, theta)
            theta = {k: theta[k] - cfg.server_lr * step[k] for k in theta}
            log.end_round(r + p, theta, {"stage": "post"})
        return UnlearnResult(
            theta,
            rounds=r + cfg.post_rounds,
            info=log.info(unlearn_rounds=r, post_rounds=cfg.post_rounds),
        )
