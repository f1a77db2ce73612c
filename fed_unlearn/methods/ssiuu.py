"""``ssiuu``: inner-loss unlearning with an attribution regulariser (Ssiuu-style).

Paper: Yang, Kim, Kwon, Kim, Jung, Cha, "Erase or Hide? Suppressing Spurious
Unlearning Neurons for Robust Unlearning" (arXiv 2509.22263). No public code;
spec ``methods.md`` §1.2 and the §5b snippet. The paper's finding [P]: GA, GD,
NPO lower the forget answers' likelihood partly by growing *spurious* neurons
whose attribution to those answers turns strongly negative (they hide the
answer), and a little later fine-tuning removes the suppression. Ssiuu is any
base loss plus a regulariser that forbids that growth, so the decrease has to
come from shrinking the positive influence.

Per round r (the round machinery of ``local_unlearn``,
:class:`~fed_unlearn.methods.mpu.InnerLossConfig`) [R federated wrapper]:

1. The server sends the global adapter θ_r to each departed client in one
   ``local-update`` request with ``attribution-weight`` λ (and variant,
   exact); the request of round 1 carries θ_0, the adapter before unlearning,
   and says ``attribution-reference = 1``.
2. Round 1, before its first step, the client computes the reference
   attributions A^0 of θ_0 on its own items (gradient x activation of every
   MLP neuron, the input of ``down_proj``, per item) and keeps them in its
   state; nothing per item leaves it [R].
3. It runs the base loss (``inner_loss``: ga, gd, npo, ...) plus λ·R for E
   epochs from a fresh AdamW, ``L = L_inner + λ·R`` [R loss, P intent], with
   R = mean_{items,neurons} ReLU(-A - ReLU(-A^0)) / mean|A^0| (``variant
   "increase"``, spec (a)) or ReLU(-A) / mean|A^0| (``"negative"``, (b)),
   differentiated through the activations only (the detached-gradient
   surrogate, default) or exactly (``exact``, second order)
   (:mod:`fed_unlearn.losses.attribution_reg`) [R].
4. The server applies θ ← θ + η·Δ (several departed: ``departed_merge``),
   optionally one interleaved FedAvg recovery round of the remaining clients,
   and stops by the oracle-free budget (``rounds``) unless told otherwise
   (``stop``) [R].

Privacy: as ``local_unlearn``, the departed client sees the clean adapter.
Diagnostics (attribution histograms before and after, neurons that turned
negative, positive against negative mass) are a measurement of the evaluator
(``eval-attribution``, :mod:`fed_unlearn.metrics.attribution`), for every
method.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fed_unlearn import adapters as ad
from fed_unlearn.losses.attribution_reg import VARIANTS, AttributionSpec
from fed_unlearn.methods.base import (
    Requirement,
    UnlearnContext,
    UnlearningMethod,
    UnlearnResult,
)
from fed_unlearn.methods.mpu import InnerLossConfig
from fed_unlearn.methods.rounds import copy_deltas
from fed_unlearn.protocol import LocalUpdateRequest
from fed_unlearn.types import AdapterState


@dataclass(kw_only=True)
class SsiuuConfig(InnerLossConfig):
    """Ssiuu options (plus those of :class:`~fed_unlearn.methods.mpu.InnerLossConfig`).

    Parameters
    ----------
    inner_loss : str
        The base loss (default: ``"npo"``, as ``local_unlearn``'s).
    reg_weight : float
        λ > 0 on the normalised regulariser R (default: 1.0; the spec's sweep
        is {0.1, 1, 10}) [R].
    variant : str
        ``"increase"`` (default; spec (a): only negative attribution beyond the
        original's) or ``"negative"`` ((b): every negative attribution).
    exact : bool
        Differentiate R through the attribution's gradient too
        (``create_graph``; slower) instead of the detached-gradient surrogate
        (default: False).
    """

    reg_weight: float = 1.0
    variant: str = "increase"
    exact: bool = False

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        AttributionSpec(self.reg_weight, self.variant, self.exact)  # λ > 0
        super().__post_init__()

    def regularised(
        self, copy: AdapterState, seed_round: int, first: bool
    ) -> LocalUpdateRequest:
        """Return the round's request: the inner loss plus the regulariser.

        Parameters
        ----------
        copy : AdapterState
            The adapter to unlearn from.
        seed_round : int
            Seed stream of the client's data order (the round).
        first : bool
            The first request: the client computes A^0 from ``copy``.

        Returns
        -------
        LocalUpdateRequest
            The typed request.
        """
        return dataclasses.replace(
            self.request([copy], seed_round=seed_round),
            attribution_weight=self.reg_weight,
            attribution_variant=self.variant,
            attribution_exact=int(self.exact),
            attribution_reference=int(first),
        )


class Ssiuu(UnlearningMethod):
    """The departed client runs its base loss plus the attribution regulariser."""

    summary = (
        "Ssiuu-style: the departed client's inner loss + λ·R, a penalty on new "
        "negative MLP-neuron attribution to its answers [P intent/R loss]"
    )
    requires = frozenset({Requirement.LIVE_CLIENTS, Requirement.DEPARTED_COOPERATION})
    config: SsiuuConfig

    def unlearn(self, ctx: UnlearnContext) -> UnlearnResult:
        """Run regularised rounds until the budget; see the module docstring."""
        self.check(ctx)
        cfg = self.config
        assert ctx.clients is not None
        theta, log = cfg.begin(ctx)
        r = 0
        for r in range(1, cfg.rounds + 1):
            request = cfg.regularised(theta, seed_round=r, first=r == 1)
            replies = ctx.clients.query(dict.fromkeys(ctx.departed, request))
            log.add_compute(replies)
            penalties = [
                p.attribution_penalty
                for p in replies.values()
                if p.attribution_penalty is not None
            ]
            parts = list(copy_deltas(replies, theta, "ssiuu").values())
            step = cfg.merge([d for d, _ in parts], [w for _, w in parts])
            theta = ad.add(theta, ad.scale(step, cfg.server_lr))
            theta = cfg.repair(ctx, theta, log, r, "ssiuu")
            extra = (
                {"attribution_penalty": sum(penalties) / len(penalties)}
                if penalties
                else {}
            )
            if log.end_round(r, theta, extra):
                break
        return cfg.finish(
            ctx,
            theta,
            log,
            r,
            "ssiuu",
            reg_weight=cfg.reg_weight,
            variant=cfg.variant,
            exact=cfg.exact,
        )
