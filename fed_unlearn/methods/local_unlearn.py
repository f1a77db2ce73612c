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
    Requirement,
    UnlearnConfig,
    UnlearnContext,
    UnlearningMethod,
    UnlearnResult,
)
from fed_unlearn.methods.mpu import check_inner, inner_request
from fed_unlearn.methods.rounds import RoundLog, check_positive, check_stop_rule
from fed_unlearn.types import AdapterState


@dataclass(kw_only=True)
class LocalUnlearnConfig(UnlearnConfig):
    """Options (same meaning and defaults as MPU's)."""

    inner_loss: str = "npo"
    retain: str = "proxy"
    loss_params: str = ""
    rounds: int = 8
    local_epochs: int = 1
    lr: float = 0.0
    lr_scale: float = 0.1
    server_lr: float = 1.0
    stop: str = "t2f"

    def __post_init__(self) -> None:
        check_inner(self.inner_loss, self.retain, self.loss_params)
        if self.rounds < 1 or self.local_epochs < 1:
            raise ValueError("rounds and local_epochs must be >= 1")
        if self.lr < 0:
            raise ValueError(f"lr must be >= 0 (0 = the run's), got {self.lr}")
        check_positive(server_lr=self.server_lr, lr_scale=self.lr_scale)
        check_stop_rule(self.stop)


class LocalUnlearn(UnlearningMethod):
    """Noise-free inner-loss unlearning by the departed client."""

    summary = (
        "noise-free baseline of MPU: the departed client runs the inner loss on "
        "the clean adapter (reveals it) [V losses/R]"
    )
    requires = frozenset({Requirement.LIVE_CLIENTS, Requirement.DEPARTED_COOPERATION})
    config: LocalUnlearnConfig

    def unlearn(self, ctx: UnlearnContext) -> UnlearnResult:
        """Run rounds of client-side unlearning on the clean adapter."""
        self.check(ctx)
        cfg = self.config
        assert ctx.clients is not None
        theta = {k: v.float().clone() for k, v in ctx.trained.items()}
        log = RoundLog(ctx, cfg.stop)
        log.start(theta)
        req = inner_request(
            cfg.inner_loss,
            cfg.retain,
            cfg.loss_params,
            cfg.local_epochs,
            cfg.lr,
            cfg.lr_scale,
        )
        r = 0
        for r in range(1, cfg.rounds + 1):
            arrays = {f"copy0.{k}": v for k, v in theta.items()}
            replies = ctx.clients.query(
                list(ctx.departed), "local-update", arrays, {**req, "seed-round": r}
            )
            log.add_compute(replies)
            parts: list[tuple[AdapterState, float]] = []
            for cid, (got, metrics) in replies.items():
                if got is None:
                    raise ValueError(f"local_unlearn: client {cid} returned nothing")
                delta = {k[len("copy0.") :]: v for k, v in got.items()}
                ad.validate_update(delta, theta)
                parts.append((delta, float(metrics.get("num-examples", 1))))
            total = sum(w for _, w in parts)
            step = {k: sum(d[k] * (w / total) for d, w in parts) for k in theta}
            theta = ad.add(theta, ad.scale(step, cfg.server_lr))  # type: ignore[arg-type]
            if log.end_round(r, theta):
                break
        return UnlearnResult(
            log.result(theta),
            rounds=r,
            info=log.info(inner_loss=cfg.inner_loss, retain=cfg.retain),
        )
