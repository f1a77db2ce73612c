"""FedRecovery: subtract the departed clients' weighted residuals, add Gaussian noise.

Paper: Zhang, Zhu, Zhang, Xiong, Zhou, "FedRecovery: Differentially Private
Machine Unlearning for Federated Learning Frameworks", IEEE TIFS 2023. Spec:
``shared/specs/methods.md`` §2.5. Server only: no client is contacted, and
nothing crosses the wire.

From the history (rounds t = 1..T, θ_t the global adapter sent in round t,
θ_{T+1} the final one, ΔL_t^k client k's delta, n_t^k its examples):

1. ΔG_t = θ_{t+1} − θ_t, the global update of round t [P].
2. ΔG_t^{−U} = Σ_{k∈P_t∖U} n_t^k ΔL_t^k / Σ_{k∈P_t∖U} n_t^k: round t's FedAvg
   without the departed set U (P_t: the round's participants; 0 if no remaining
   client took part) [R: the spec's equal-weight form (N·ΔG_t − ΔL_t^u)/(N−1)
   with FedAvg weights, and several departed clients at once].
3. Residual r_t = ΔG_t − ΔG_t^{−U}: what the departed clients changed in round t.
   It is 0 in a round none of them took part in [R].
4. Weights w_t = ‖ΔG_t‖² / Σ_{j<t} ‖ΔG_j‖² for t ≥ 2, and w_1 = 1 [P "weighted
   sum", third-party code for t ≥ 2; R for w_1: the first round has no earlier
   update to compare with, and the third-party code skips it, which leaves the
   departed clients' first-round contribution, typically the largest for a LoRA
   B that starts at 0, in the model].
5. θ̃ = θ_{T+1} − Σ_t w_t r_t + n, n ~ N(0, σ² I) on every adapter entry [P].
   σ = Δ·√(2 ln(1.25/δ))/ε, the Gaussian mechanism for an L2 sensitivity Δ [P].
   The paper bounds Δ = ‖θ̃ − θ_retrain‖ under assumptions a LoRA-tuned LLM does
   not meet; here Δ is ``sensitivity`` × ‖Σ_t w_t r_t‖ (the length of the
   correction itself) [R]. ε = ∞ (the default) adds no noise and claims no
   guarantee; ``run.json`` records ε, δ, Δ and σ whichever is used.

Contract: the residuals assume the history's global updates are FedAvg of the
recorded client deltas (``aggregation=fedavg``). Under another aggregation
ΔG_t ≠ Σ p_k ΔL_t^k and the residual is not the departed share; the method
refuses a history whose round-1 update disagrees with the FedAvg of its deltas
by more than ``fedavg_tolerance`` (relative).

The noise seed comes from ``secrets`` unless ``seed`` ≥ 0 (tests, benchmarks).
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass

import torch

from fed_unlearn import adapters as ad
from fed_unlearn.aggregation import fedavg
from fed_unlearn.methods.base import (
    Requirement,
    UnlearnConfig,
    UnlearnContext,
    UnlearningMethod,
    UnlearnResult,
)
from fed_unlearn.types import AdapterState


@dataclass(kw_only=True)
class FedRecoveryConfig(UnlearnConfig):
    """FedRecovery options.

    Parameters
    ----------
    epsilon : float
        ε of the Gaussian mechanism; ``inf`` = no noise, no guarantee
        (default: inf) [R].
    delta : float
        δ of the Gaussian mechanism, in (0, 1) (default: 1e-5).
    sensitivity : float
        Δ as a multiple of ‖Σ_t w_t r_t‖ (default: 1.0) [R].
    first_round_weight : float
        w_1 (default: 1.0; 0 = the third-party code, which skips round 1) [R].
    fedavg_tolerance : float
        Largest relative gap between round 1's recorded global update and the
        FedAvg of its client deltas before the history is refused as not
        FedAvg (default: 1e-3; fp16 histories round at about 1e-3).
    seed : int
        Noise seed; -1 = fresh from ``secrets`` (default: -1).
    """

    epsilon: float = math.inf
    delta: float = 1e-5
    sensitivity: float = 1.0
    first_round_weight: float = 1.0
    fedavg_tolerance: float = 1e-3
    seed: int = -1

    def __post_init__(self) -> None:
        if not self.epsilon > 0:
            raise ValueError(
                f"epsilon must be > 0 (inf = no noise), got {self.epsilon}"
            )
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if not (self.sensitivity >= 0 and math.isfinite(self.sensitivity)):
            raise ValueError(f"sensitivity must be >= 0, got {self.sensitivity}")
        if not self.first_round_weight >= 0:
            raise ValueError(
                f"first_round_weight must be >= 0, got {self.first_round_weight}"
            )
        if not self.fedavg_tolerance > 0:
            raise ValueError(
                f"fedavg_tolerance must be > 0, got {self.fedavg_tolerance}"
            )

    def sigma(self, correction_norm: float) -> tuple[float, float]:
        """Return (Δ, σ) for a correction of length ``correction_norm``."""
        sens = self.sensitivity * correction_norm
        if math.isinf(self.epsilon):
            return sens, 0.0
        return sens, sens * math.sqrt(2 * math.log(1.25 / self.delta)) / self.epsilon


def _sq_norm(state: AdapterState) -> float:
    return float(sum(float(v.double().pow(2).sum()) for v in state.values()))


class FedRecovery(UnlearningMethod):
    """Server-only: final adapter minus the weighted residuals, plus noise."""

    summary = (
        "FedRecovery: subtract the departed clients' ‖ΔG_t‖²-weighted round "
        "residuals from the history, then Gaussian noise from (ε, δ) [P/R]"
    )
    requires = frozenset({Requirement.HISTORY})
    config: FedRecoveryConfig
    needs_fedavg = True

    def unlearn(self, ctx: UnlearnContext) -> UnlearnResult:
        """Apply steps 1-5 of the module docstring."""
        self.check(ctx)
        cfg = self.config
        assert ctx.history is not None
        t0 = time.perf_counter()
        store, departed = ctx.history, set(ctx.departed)
        rounds = store.rounds()
        states = [store.load(r) for r in rounds]
        nexts = [rec.global_state for rec in states[1:]] + [store.final()]
        correction: AdapterState = {
            k: torch.zeros_like(v) for k, v in ctx.trained.items()
        }
        prior, weights, touched = 0.0, [], 0
        for i, (rec, after) in enumerate(zip(states, nexts, strict=True)):
            dg = ad.sub(after, rec.global_state)
            if i == 0:
                self._check_fedavg(rec, dg)
            keep = [c for c in rec.participants if c not in departed]
            if keep:
                without = fedavg(
                    [rec.client_deltas[c] for c in keep],
                    [float(rec.num_examples[c]) for c in keep],
                )
            else:
                without = {k: torch.zeros_like(v) for k, v in dg.items()}
            norm2 = _sq_norm(dg)
            w = (
                cfg.first_round_weight
                if i == 0
                else (norm2 / prior if prior > 0 else 0.0)
            )
            prior += norm2
            weights.append(w)
            if departed & set(rec.participants):
                touched += 1
                correction = ad.add(correction, ad.scale(ad.sub(dg, without), w))
        theta = ad.sub({k: v.float() for k, v in ctx.trained.items()}, correction)
        c_norm = math.sqrt(_sq_norm(correction))
        sens, sigma = cfg.sigma(c_norm)
        if sigma > 0:
            seed = cfg.seed if cfg.seed >= 0 else secrets.randbits(63)
            g = torch.Generator().manual_seed(seed)
            theta = {
                k: v + sigma * torch.randn(v.shape, generator=g, dtype=v.dtype)
                for k, v in theta.items()
            }
        return UnlearnResult(
            theta,
            rounds=0,
            info={
                "server_step_seconds": time.perf_counter() - t0,
                "rounds_with_departed": touched,
                "round_weights": weights,
                "correction_norm": c_norm,
                "privacy": {
                    "epsilon": cfg.epsilon if math.isfinite(cfg.epsilon) else "inf",
                    "delta": cfg.delta,
                    "sensitivity_l2": sens,
                    "sigma": sigma,
                    "guarantee": "none (no noise)"
                    if sigma == 0
                    else ("Gaussian mechanism for the stated L2 sensitivity [R]"),
                },
            },
        )

    def _check_fedavg(self, rec: object, dg: AdapterState) -> None:
        """Refuse a history whose round-1 update is not FedAvg of its deltas."""
        parts = rec.participants  # type: ignore[attr-defined]
        if not parts:
            return
        avg = fedavg(
            [rec.client_deltas[c] for c in parts],  # type: ignore[attr-defined]
            [float(rec.num_examples[c]) for c in parts],  # type: ignore[attr-defined]
        )
        gap = math.sqrt(_sq_norm(ad.sub(dg, avg)))
        scale = math.sqrt(_sq_norm(dg)) or 1.0
        if gap > self.config.fedavg_tolerance * scale:
            raise ValueError(
                "fed_recovery assumes FedAvg of the recorded client deltas "
                f"(aggregation=fedavg); round 1's global update differs from it by "
                f"{gap / scale:.2%} of its length"
            )
