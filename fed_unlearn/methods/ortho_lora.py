r"""``ortho_lora``: orthogonal-subspace continual unlearning with per-request LoRAs.

Paper: Rahulamathavan, Iqbal, Hu, Lambotharan, "Orthogonal Subspace Projection
for Continual Machine Unlearning via SVD-Based LoRA" (arXiv 2604.12526); no
public code. Spec: ``specs/methods.md`` §1.3, a reconstruction [R] consistent
with the abstract [P]. Math: :mod:`fed_unlearn.ortho`.

Deletion requests arrive one after another; each is served by its own LoRA
update, trained in the orthogonal complement of the output subspaces the
earlier requests used, and all are fused statically (no router) [P]. Here:

1. **One request per departed client** [R]: ``--depart 0,1,2`` in one call
   serves clients 0, 1 and 2 as three requests, in that order, each from the
   previous one's adapter with the basis extended in between; a sequential run
   (``sequential = true``) calls the method once per client anyway.
2. **The per-request LoRA** [R, our choice]: the federation's product is one
   LoRA adapter of rank r, so request t's LoRA is a fresh *delta of the lora_B
   factors* ΔB_t (starting at 0) over the federation's lora_A, which stays
   frozen: ΔW_t = s·ΔB_t A (LoRA-FA style). Then static fusion
   W = W0 + s·(B_0 + Σ_t ΔB_t)·A is exactly the adapter's own product: it keeps
   its shape, and evaluation, later requests and the history ledger work
   unchanged. (Extra rank blocks per request would grow the adapter with every
   request; a fresh A_t as well as B_t cannot be merged into rank r.) With A
   frozen, col(ΔW_t) = col(ΔB_t), so the one-sided projection below makes the
   updates exactly orthogonal; the two-sided A-projection of the spec does not
   apply (every request shares row(A)) and is not offered.
3. **Training** [R]: rounds as ``local_unlearn``'s: the server sends the
   adapter (lora_B as the copy, the rest as base) and the bases; the departed
   client runs the inner loss (:mod:`fed_unlearn.losses`, default NPO with a
   proxy retain term, as the other client-side methods) from a fresh AdamW and,
   after **every optimiser step**, re-projects ΔB ← (I − U_{<t} U_{<t}ᵀ) ΔB per
   adapted layer (:class:`fed_unlearn.ortho.Projector`) [R, spec step 2]. The
   server projects the returned delta again (idempotent for an honest client;
   the client's residual is logged) and applies θ ← θ + η_srv·ΔB.
4. **After the request** [R, spec step 3]: SVD of ΔW_t = B_t A − B_{t−1} A per
   layer; keep the smallest k_t with energy ≥ ``eps``; append to U and
   re-orthonormalise (QR). Capacity: Σ_t k_t ≤ d_out per layer; a request that
   finds a layer's output space used up fails with a
   :class:`~fed_unlearn.ortho.CapacityError` naming the layer.
5. **Federated placement** [R, spec "federated mapping"]: the server owns the
   bases. They are *derived* from the federation's unlearning ledger
   (:meth:`fed_unlearn.history.HistoryStore.unlearnings`): for every recorded
   unlearning i, ΔW_i = product(adapter i) − product(adapter i−1), whatever
   method served it, so every earlier request's subspace is protected and no
   second store exists. They travel in ``local-update`` as ``basis.<tensor>``
   arrays (:mod:`fed_unlearn.protocol`); clients apply the projection.

``project = false`` is the paper's baseline, *static fusion* of unconstrained
per-request LoRAs (bench label ``static_fusion``): the same requests and
representation without any projection. Both report per request ``overlap`` =
max over layers of ‖U_{<t}ᵀ ΔW_t‖_F / ‖ΔW_t‖_F (0 for ortho).

6. **Projected recovery** (``recovery_rounds`` > 0, off by default) [R, our
   extension; the paper has no recovery]: after request t's rounds, R_rec
   FedAvg rounds of the remaining clients. Of each aggregated update only the
   lora_B part is kept (lora_A stays frozen), projected off every request's
   subspace *including request t's*: ΔB_rec ← (I − U_{≤t} U_{≤t}ᵀ) ΔB_rec. So
   the recovery cannot undo any request along its subspace, and every
   request's own update stays orthogonal to the earlier ones'. The request's
   recorded change (unlearning plus recovery) is what later requests' bases
   come from, in a run and through the ledger alike. ``interleave_recovery``
   (a recovery round between the unlearning rounds) is refused: it would enter
   the request's own subspace while that is still being trained.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from fed_unlearn import seeds
from fed_unlearn.history import HistoryStore
from fed_unlearn.methods.base import (
    Requirement,
    UnlearnContext,
    UnlearningMethod,
    UnlearnResult,
)
from fed_unlearn.methods.mpu import InnerLossConfig
from fed_unlearn.methods.rounds import check_positive, copy_deltas, recovery_step
from fed_unlearn.ortho import (
    check_capacity,
    extend_basis,
    lora_products,
    project_out,
)
from fed_unlearn.types import AdapterState

__all__ = ["OrthoLora", "OrthoLoraConfig", "ledger_bases"]


@dataclass(kw_only=True)
class OrthoLoraConfig(InnerLossConfig):
    """``ortho_lora`` options (plus those of the inner-loss run).

    Parameters
    ----------
    project : bool
        Project every request's update onto the orthogonal complement of the
        earlier requests' subspaces (default: True); False = static fusion of
        unconstrained per-request LoRAs (the paper's baseline).
    eps : float
        Energy threshold ε of the SVD basis per request, in (0, 1]
        (default: 0.95; the spec's range is 0.95-0.99) [R].
    interleave_recovery : bool
        Must stay False (default: False): see the module docstring.
    recovery_rounds : int
        Projected FedAvg rounds of the remaining clients after each request
        (default: 0, the paper's method; module docstring, step 6). Needs
        ``project``.
    """

    project: bool = True
    eps: float = 0.95
    interleave_recovery: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive(eps=self.eps)
        if self.eps > 1.0:
            raise ValueError(f"eps must be in (0, 1], got {self.eps}")
        if self.interleave_recovery:
            raise ValueError(
                "ortho_lora: interleave_recovery would train inside the request's "
                "own subspace while it is being unlearned; use "
                "interleave_recovery=false (recovery_rounds runs projected "
                "recovery after each request)"
            )
        if self.recovery_rounds and not self.project:
            raise ValueError(
                "ortho_lora: recovery_rounds needs project=true (static fusion "
                "is the paper's baseline without recovery)"
            )


def _extend_all(
    bases: dict[str, torch.Tensor],
    before: AdapterState,
    after: AdapterState,
    eps: float,
) -> tuple[dict[str, torch.Tensor], dict[str, int], float]:
    """Extend every layer's basis by the request ``before -> after``.

    Returns the new bases (lora_B key -> U), k per layer and the overlap
    max_layer ‖Uᵀ ΔW‖_F / ‖ΔW‖_F with the *earlier* bases. A layer whose space
    is full is left as it is.
    """
    prod_before, prod_after = lora_products(before), lora_products(after)
    out, ks, overlap = dict(bases), {}, 0.0
    for prefix, (b_key, p_after) in prod_after.items():
        dw = p_after - prod_before[prefix][1]
        u = bases.get(b_key)
        norm = float(dw.norm())
        if u is not None and u.shape[1] and norm > 0:
            inside = float((u.double().T @ dw).norm())
            overlap = max(overlap, inside / norm)
        if u is not None and u.shape[1] >= dw.shape[0]:
            ks[prefix] = 0  # full: a new request into it is refused up front
            continue
        out[b_key], ks[prefix] = extend_basis(u, dw, eps)
    return out, ks, overlap


def ledger_bases(history: HistoryStore, eps: float) -> dict[str, torch.Tensor]:
    """Return the bases of every unlearning the federation's ledger records.

    Parameters
    ----------
    history : HistoryStore
        The federation's history (its final adapter and unlearning ledger).
    eps : float
        Energy threshold per request.

    Returns
    -------
    dict[str, torch.Tensor]
        ``lora_B`` key -> U_{<t} (empty before any recorded unlearning).
    """
    bases: dict[str, torch.Tensor] = {}
    entries = history.unlearnings()
    if not entries:
        return bases
    before = history.final()
    for i in range(1, len(entries) + 1):
        after = history.unlearned(i)
        bases, _, _ = _extend_all(bases, before, after, eps)
        before = after
    return bases


class OrthoLora(UnlearningMethod):
    """Per-request LoRA deltas in the complement of earlier requests' subspaces."""

    summary = (
        "continual unlearning: one lora_B delta per request, projected after "
        "every step off earlier requests' SVD subspaces; static fusion [R]"
    )
    requires = frozenset(
        {
            Requirement.HISTORY,
            Requirement.LIVE_CLIENTS,
            Requirement.DEPARTED_COOPERATION,
        }
    )
    config: OrthoLoraConfig

    def check_run(self, run: Any) -> None:
        """Refuse a dual-adapter run (its K/V split is not a per-request LoRA)."""
        super().check_run(run)
        if run.get("dual-adapter"):
            raise ValueError(
                "ortho_lora works on a single LoRA adapter; this run has "
                "dual-adapter = true"
            )

    def _projected_recovery(
        self,
        ctx: UnlearnContext,
        theta: AdapterState,
        bases: dict[str, torch.Tensor],
        log: Any,
        b_keys: list[str],
    ) -> AdapterState:
        """Run the projected recovery rounds after one request (step 6).

        Parameters
        ----------
        ctx : UnlearnContext
            The request's context (its remaining clients train).
        theta : AdapterState
            The adapter after the request's unlearning rounds.
        bases : dict[str, torch.Tensor]
            ``lora_B`` key -> U_{≤t}, the bases including this request's.
        log : RoundLog
            The request's round log (client compute is added).
        b_keys : list[str]
            The adapter's ``lora_B`` keys.

        Returns
        -------
        AdapterState
            ``theta`` with only its ``lora_B`` tensors moved, each off ``bases``.
        """
        for p in range(1, self.config.recovery_rounds + 1):
            moved = recovery_step(ctx, theta, log, seeds.RECOVERY + p, "ortho_lora")
            theta = dict(theta)
            for b in b_keys:
                d = moved[b].float() - theta[b]
                theta[b] = theta[b] + (project_out(d, bases[b]) if b in bases else d)
        return theta

    def unlearn(self, ctx: UnlearnContext) -> UnlearnResult:
        """Serve each departed client as one request; see the module docstring."""
        self.check(ctx)
        cfg = self.config
        assert ctx.clients is not None and ctx.history is not None
        theta = {k: v.float().clone() for k, v in ctx.trained.items()}
        layers = lora_products(theta)
        b_keys = [b for b, _ in layers.values()]
        bases = ledger_bases(ctx.history, cfg.eps)
        curve: list[dict[str, float]] = []
        compute = {"local_steps": 0.0, "tokens": 0.0, "client_seconds": 0.0}
        requests: list[dict[str, Any]] = []
        total_rounds = recovered = 0
        for cid in ctx.departed:
            if cfg.project:
                for prefix, (b_key, p) in layers.items():
                    check_capacity(bases.get(b_key), p.shape[0], prefix)
            start = dict(theta)
            sent = {b: u for b, u in bases.items() if u.shape[1]} if cfg.project else {}
            log = cfg.round_log(ctx)
            log.start(theta)
            r = 0
            residual = 0.0
            for r in range(1, cfg.rounds + 1):
                copy = {b: theta[b] for b in b_keys}
                request = dataclasses.replace(
                    cfg.request([copy], seed_round=r),
                    base={k: v for k, v in theta.items() if k not in copy},
                    bases=sent,
                )
                replies = ctx.clients.query({cid: request})
                log.add_compute(replies)
                delta, _ = copy_deltas(replies, copy, "ortho_lora")[cid]
                theta = dict(theta)
                for b in b_keys:
                    d = delta[b].float()
                    if b in sent:
                        inside = float((sent[b].T @ d).norm())
                        residual = max(residual, inside / max(float(d.norm()), 1e-30))
                        d = project_out(d, sent[b])
                    theta[b] = theta[b] + cfg.server_lr * d
                if log.end_round(r, theta, {"client": cid}):
                    break
            theta = dict(log.result(theta))
            bases_t, ks, overlap = _extend_all(bases, start, theta, cfg.eps)
            if cfg.recovery_rounds and ctx.remaining:
                theta = self._projected_recovery(ctx, theta, bases_t, log, b_keys)
                recovered += cfg.recovery_rounds
                # the request's recorded change includes its recovery, as the
                # ledger will give it to later requests
                bases_t, ks, _ = _extend_all(bases, start, theta, cfg.eps)
            bases = bases_t
            info = log.info()
            # one curve over all requests: rounds counted on, round 0 once
            curve += [
                {**p, "round": p["round"] + total_rounds, "request": len(requests) + 1}
                for p in info["curve"]
                if p["round"] or not requests
            ]
            for key in compute:
                compute[key] += info["client_compute"][key]
            total_rounds += r
            requests.append(
                {
                    "client": cid,
                    "rounds": r,
                    "stopped_by": info["stopped_by"],
                    "overlap": overlap,
                    "client_residual": residual,
                    "k_total": sum(ks.values()),
                    "k_max": max(ks.values(), default=0),
                    "capacity_used": max(
                        (
                            bases[b].shape[1] / p.shape[0]
                            for b, p in layers.values()
                            if b in bases
                        ),
                        default=0.0,
                    ),
                }
            )
        return UnlearnResult(
            theta,
            rounds=total_rounds + recovered,
            info={
                "curve": curve,
                "client_compute": compute,
                "requests": requests,
                "project": cfg.project,
                "recovery_rounds": cfg.recovery_rounds,
                "eps": cfg.eps,
                "inner_loss": cfg.inner_loss,
                "retain": cfg.retain,
                "basis_dims": {
                    p: int(bases[b].shape[1])
                    for p, (b, _) in layers.items()
                    if b in bases
                },
            },
        )
