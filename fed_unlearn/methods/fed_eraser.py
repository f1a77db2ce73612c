"""FedEraser: calibrated retraining from the stored updates.

Paper: Liu, Ma, Yang, Wang, Liu, "FedEraser: Enabling Efficient Client-Level
Data Removal from Federated Learning Models", IWQoS 2021. Spec:
``shared/specs/methods.md`` §2.2. The departed client is never contacted.

From the history (rounds t = 1..T; U_k^t client k's delta in round t, n_k^t its
examples), with the stored rounds t_j = 1, 1 + Δt, 1 + 2Δt, ... (j = 1..T'):

1. M̃^{t_1} = θ_1, the global adapter sent in round 1: it never saw the
   departed clients [V].
2. Calibration training [V, R budget]: each remaining client k that took part
   in round t_j trains from M̃^{t_j} on its own data and returns Û_k. It sees
   ``calibration_ratio`` r x its FL epochs' examples (r = E_cali / E_loc = 0.5
   in the paper), in ``calibration_steps`` local steps: the recovery-round
   budget of :func:`~fed_unlearn.training.budget_batches` with share r / T
   [R: the step count and batch sizing; the paper trains r epochs].
3. Calibration, per tensor on the FedAvg updates [V: the authors' code; the
   paper states it per client]: Ũ = ‖Ū_old‖ · Û_new / ‖Û_new‖, where Ū_old is
   the FedAvg of the stored U_k^{t_j} over the remaining participants
   (weights re-normalised over them) and Û_new the FedAvg of the Û_k. A tensor
   whose new update is shorter than ``eps`` takes the old update's direction
   instead (the ε guard) [R].
4. M̃^{t_{j+1}} = M̃^{t_j} + Ũ [V]; the result is M̃ after the last stored round.

``calibrate=False`` is the FedAccum ablation [V]: M̃ ← M̃ + Ū_old, the stored
updates of the remaining clients summed without any client contact.

Contract: FedAvg histories (``aggregation=fedavg``): the stored deltas are what
FedAvg averaged. Each stored round costs one round of client contact.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from fed_unlearn import adapters as ad
from fed_unlearn import seeds
from fed_unlearn.aggregation import fedavg
from fed_unlearn.methods.base import (
    Requirement,
    UnlearnConfig,
    UnlearnContext,
    UnlearningMethod,
    UnlearnResult,
)
from fed_unlearn.methods.rounds import RoundLog, recovery_step
from fed_unlearn.types import AdapterState


@dataclass(kw_only=True)
class FedEraserConfig(UnlearnConfig):
    """FedEraser options.

    Parameters
    ----------
    interval : int
        Δt, rounds between stored updates used (default: 2, the paper's) [V].
    calibration_ratio : float
        r = E_cali / E_loc, the share of an FL round's local training each
        calibration round does (default: 0.5, the paper's) [V].
    calibration_steps : int
        Local steps of a calibration round (default: 2) [R].
    calibrate : bool
        False: the FedAccum ablation, no client contacted (default: True) [V].
    eps : float
        Norm below which a new update has no direction (default: 1e-12) [R].
    """

    interval: int = 2
    calibration_ratio: float = 0.5
    calibration_steps: int = 2
    calibrate: bool = True
    eps: float = 1e-12

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")
        if not self.calibration_ratio > 0:
            raise ValueError(
                f"calibration_ratio must be > 0, got {self.calibration_ratio}"
            )
        if self.calibration_steps < 1:
            raise ValueError(
                f"calibration_steps must be >= 1, got {self.calibration_steps}"
            )
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")


def calibrated(
    old: AdapterState, new: AdapterState, eps: float = 1e-12
) -> AdapterState:
    """Per tensor ‖old‖ · new / ‖new‖ (``old`` itself where ‖new‖ < ``eps``)."""
    out: AdapterState = {}
    for k, o in old.items():
        n = new[k].double()
        norm = float(n.norm())
        if norm < eps:
            out[k] = o.clone()
        else:
            out[k] = (float(o.double().norm()) * n / norm).to(o.dtype)
    return out


class FedEraser(UnlearningMethod):
    """Rebuild the adapter from the stored updates of the remaining clients."""

    summary = (
        "FedEraser: rebuild from the stored updates of the remaining clients "
        "every Δt rounds, each calibrated to a short round of fresh training "
        "(calibrate=False: FedAccum) [V/R]"
    )
    requires = frozenset({Requirement.HISTORY, Requirement.LIVE_CLIENTS})
    config: FedEraserConfig
    needs_fedavg = True

    def needs(self) -> frozenset[Requirement]:
        """FedAccum (``calibrate=False``) needs the history only."""
        if not self.config.calibrate:
            return frozenset({Requirement.HISTORY})
        return self.requires

    def resume_refusal(self) -> str | None:
        """FedEraser resumes: its round state is the rebuilt adapter."""
        return None

    def unlearn(self, ctx: UnlearnContext) -> UnlearnResult:
        """Run steps 1-4 of the module docstring."""
        self.check(ctx)
        cfg = self.config
        assert ctx.history is not None
        store, departed = ctx.history, set(ctx.departed)
        rounds = store.rounds()
        stored = rounds[:: cfg.interval]
        theta = {
            k: v.float().clone() for k, v in store.load(rounds[0]).global_state.items()
        }
        log = RoundLog(ctx, "budget")
        theta = log.start(theta)
        contacted, server_s = 0, 0.0
        for j, t in enumerate(stored, start=1):
            if log.resumed(j) is not None:  # logged before a restart
                contacted += cfg.calibrate
                continue
            t0 = time.perf_counter()
            rec = store.load(t)
            keep = [c for c in rec.participants if c not in departed]
            if not keep:
                continue
            old = fedavg(
                [rec.client_deltas[c] for c in keep],
                [float(rec.num_examples[c]) for c in keep],
            )
            server_s += time.perf_counter() - t0
            if cfg.calibrate:
                fresh = recovery_step(
                    _Only(ctx, keep),
                    theta,
                    log,
                    seeds.FEDERASER + j,
                    self.name,
                    max_steps=cfg.calibration_steps,
                    budget=cfg.calibration_ratio / len(rounds),
                )
                contacted += 1
                t0 = time.perf_counter()
                step = calibrated(old, ad.sub(fresh, theta), cfg.eps)
                server_s += time.perf_counter() - t0
            else:
                step = old
            theta = ad.add(theta, step)
            log.end_round(j, theta)
        info = log.info(
            stored_rounds=stored,
            calibrated=cfg.calibrate,
            server_step_seconds=server_s,
            speedup_bound=(cfg.interval / cfg.calibration_ratio)
            if cfg.calibrate
            else math.inf,
        )
        return UnlearnResult(theta, rounds=contacted, info=info)


class _Only:
    """The context with ``remaining`` narrowed to one round's participants."""

    def __init__(self, ctx: UnlearnContext, remaining: list[int]) -> None:
        self.clients = ctx.clients
        self.remaining = tuple(remaining)
