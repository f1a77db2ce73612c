r"""``retrain``: exact unlearning by retraining without the departed clients.

Method (specs/methods.md §2.1, [V] FedEraser's "FedRetrain"): re-initialise the
adapter exactly as in the original run (same seed, same base model), run FedAvg
for the same T rounds with the same local epochs, learning rate, batch size and
per-(round, client) data-order seeds, over clients {1..N} \\ U with FedAvg weights
re-normalised over them: θ_retrain = FL_T(θ_0; clients ∖ U).

It is also the reference of forget quality and privleak and the cost denominator.
The orchestrator caches it by config hash, so ``retrain`` and the oracle of other
methods are one computation.
"""

from __future__ import annotations

from dataclasses import dataclass

from fed_unlearn.methods.base import (
    MissingRequirementError,
    Requirement,
    UnlearnConfig,
    UnlearnContext,
    UnlearningMethod,
    UnlearnResult,
)


@dataclass(kw_only=True)
class RetrainConfig(UnlearnConfig):
    """``retrain`` has no options (it reproduces the original run's settings)."""


class Retrain(UnlearningMethod):
    """Federated retraining from the same initialisation without the departed."""

    summary = "exact: FedAvg from the same init and seeds without the departed clients"
    requires = frozenset({Requirement.RETRAIN})
    is_oracle = True

    def unlearn(self, ctx: UnlearnContext) -> UnlearnResult:
        """Run (or load) the retrain and return its adapter."""
        self.check(ctx)
        if ctx.retrain is None:  # pragma: no cover - check() already raised
            raise MissingRequirementError("method 'retrain' needs retrain")
        # Its rounds, time and bytes are the retrain phase's (the orchestrator
        # reports them from the cached phase record).
        return UnlearnResult(ctx.retrain(), rounds=0, info={"exact": True})
