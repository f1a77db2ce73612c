"""``none``: keep the trained adapter (the upper bound of what must be forgotten).

Provenance: [R] — a reference point, not a method; every unlearning method is
judged by how far it moves from this adapter towards ``retrain``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fed_unlearn.methods.base import (
    UnlearnConfig,
    UnlearnContext,
    UnlearningMethod,
    UnlearnResult,
)


@dataclass(kw_only=True)
class NoneConfig(UnlearnConfig):
    """``none`` has no options."""


class NoUnlearning(UnlearningMethod):
    """Return the trained global adapter unchanged."""

    summary = "keep the trained adapter (no unlearning; the gap to close)"

    def unlearn(self, ctx: UnlearnContext) -> UnlearnResult:
        """Return a copy of ``ctx.trained``."""
        self.check(ctx)
        return UnlearnResult({k: v.clone() for k, v in ctx.trained.items()}, rounds=0)
