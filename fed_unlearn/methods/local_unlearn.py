"""``local_unlearn``: the departed client runs an inner loss on the clean adapter.

The noise-free baseline of MPU (spec ``foul_mpu.md`` B.6: "each algorithm under
MPU is compared with the same algorithm run noise-free on the clean model"). The
server sends the exact global adapter to the departed client, which runs the
chosen inner loss (:mod:`fed_unlearn.losses`) for E epochs from a fresh AdamW and
returns its update; θ ← θ + η·Δ. Rounds as MPU's, with the same stopping rule.

Provenance: [V] for the losses (open-unlearning), [R] for the federated wrapper.
Privacy: unlike MPU this *reveals the clean adapter* to the departed client.
"""

from __future__ import annotations

from dataclasses import dataclass

from fed_unlearn import adapters as ad
from fed_unlearn.methods.base import (
    ClientFailure,
    Requirement,
    UnlearnContext,
    UnlearningMethod,
    UnlearnResult,
)
from fed_unlearn.methods.mpu import InnerLossConfig
from fed_unlearn.methods.rounds import (
    copy_deltas,
)


@dataclass(kw_only=True)
class LocalUnlearnConfig(InnerLossConfig):
    """Options: those of :class:`~fed_unlearn.methods.mpu.InnerLossConfig`."""


class LocalUnlearn(UnlearningMethod):
    """Noise-free inner-loss unlearning by the departed client."""

    summary = (
        "noise-free baseline of MPU: the departed client runs the inner loss on "
        "the clean adapter (reveals it) [V losses/R]"
    )
    requires = frozenset({Requirement.LIVE_CLIENTS, Requirement.DEPARTED_COOPERATION})
    config: LocalUnlearnConfig

    def resume_refusal(self) -> str | None:
        """Resume: the round state is the adapter."""
        return None

    def unlearn(self, ctx: UnlearnContext) -> UnlearnResult:
        """Run rounds of client-side unlearning on the clean adapter."""
        self.check(ctx)
        cfg = self.config
        assert ctx.clients is not None
        theta, log = cfg.begin(ctx)
        r = 0
        for r in range(1, cfg.rounds + 1):
            if (stop := log.resumed(r)) is not None:
                if stop:
                    break
                continue  # logged before a restart: ``theta`` is its result
            request = cfg.request([theta], seed_round=r)
            try:
                replies = ctx.clients.query(dict.fromkeys(ctx.departed, request))
            except ClientFailure as exc:
                if not log.departed_left(exc, r, "local_unlearn"):
                    raise
                r -= 1
                break
            log.add_compute(replies)
            parts = list(copy_deltas(replies, theta, "local_unlearn").values())
            step = cfg.merge([d for d, _ in parts], [w for _, w in parts])
            theta = ad.add(theta, ad.scale(step, cfg.server_lr))
            theta = cfg.repair(ctx, theta, log, r, "local_unlearn")
            if log.end_round(r, theta):
                break
        return cfg.finish(ctx, theta, log, r, "local_unlearn")
