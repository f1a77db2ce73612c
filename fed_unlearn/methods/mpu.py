"""MPU: Multiple Perturbed copies Unlearning, with harmonic denoising.

Paper: Wang, Yan, Wu, Hao, Jiang/Xie, Huang, Lim, "MPU" (arXiv 2602.23798);
official code ``Tristan0318/MPU`` @ 6ffb4c3 (``PUM.run``). Spec:
``shared/specs/foul_mpu.md`` Part B (B.2 algorithm, B.7 pitfalls, B.8 LoRA port).

Per round r, for each departed client (server side in :mod:`fed_unlearn.mpu_ops`):

1. Pre-process [V algorithm, R LoRA port]: per LoRA tensor n,
   σ_n = κ·RMS(θ_n) (B.8; ``granularity="layer"`` pools each transformer layer as
   the code does [V]); z_k ~ N(0, σ²); ε0_k = sqrt(m/(m-1))·(z_k - mean_k z_k)
   (zero-sum over the m copies) [V]; ε_k = α_k·ε0_k; then the LoRA gauge
   A' = Q_k A, B' = B Q_kᵀ with Q_k Haar-orthogonal (or a permutation) per module
   [R, B.8]: the adapted function is unchanged. α_k, the noise and gauge seeds are
   drawn with ``secrets`` fresh every round and never leave the server [R, B.7-4/8]
   (``alpha_schedule="linear"`` = the paper's public 1 → 2 [V]).
2. The m copies travel in one ``local-update`` request (``copy<k>.*`` arrays,
   :mod:`fed_unlearn.protocol`). The client runs the inner loss
   (:mod:`fed_unlearn.losses`) on each copy from a fresh AdamW for E epochs on
   its own data with gradient clipping 1.0 [V]; its reference model
   (NPO, IdkDPO, UnDIAL, RMU) is the received copy, not the clean adapter [R,
   B.7-2]; retain term from ``retain`` = none | proxy | local [R, B.7-3].
3. Post-process [V]: Δ_k = T_k⁻¹(Δ'_k); Δ̄ = Σ_k Δ_k/α_k / Σ_k 1/α_k;
   θ ← θ + η_srv·Δ̄. fp32 throughout [R, B.7-5]; m ≥ 2.

The harmonic weights cancel the first-order noise: with Δ(θ+ε) ≈ Δ(θ) + Jε,
Σ_k (1/α_k)(Δ(θ) + J α_k ε0_k) / Σ 1/α_k = Δ(θ) + J Σ_k ε0_k / Σ 1/α_k = Δ(θ).

What MPU is and is not: *obfuscation*, not differential privacy. The client sees
m noisy, gauge-rotated copies; the product BA of each copy is θ's product plus
noise, and with known α the zero-sum noise would cancel in a weighted average of
the copies (hence secret α and the gauge). No formal guarantee is claimed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from fed_unlearn import adapters as ad
from fed_unlearn import seeds
from fed_unlearn.aggregation import fedavg
from fed_unlearn.methods.base import (
    RUN_LR,
    ClientFailure,
    Requirement,
    UnlearnContext,
    UnlearningMethod,
    UnlearnResult,
)
from fed_unlearn.methods.rounds import (
    RoundLog,
    StopOptions,
    check_positive,
    loss_params,
    recovery_rounds,
    recovery_step,
)
from fed_unlearn.mpu_ops import draw_secrets, merge_returned, prepare_copies
from fed_unlearn.protocol import LocalUpdateRequest
from fed_unlearn.training import derive_seed
from fed_unlearn.types import AdapterState

RETAIN_SOURCES = ("none", "proxy", "local")
DEPARTED_MERGES = ("mean", "sum")


def check_inner(inner_loss: str, retain: str, params: str) -> None:
    """Validate an inner loss name, a retain source and its params."""
    from fed_unlearn.losses import get_loss

    spec = get_loss(inner_loss)  # KeyError lists the known ones
    if retain not in RETAIN_SOURCES:
        raise ValueError(f"retain must be one of {RETAIN_SOURCES}, got {retain!r}")
    unknown = sorted(set(loss_params(params)) - set(spec.defaults))
    if unknown:
        raise ValueError(
            f"loss_params {unknown} are not parameters of {inner_loss!r} "
            f"(it has {sorted(spec.defaults)})"
        )


@dataclass(kw_only=True)
class InnerLossConfig(StopOptions):
    """Options of a client-side inner-loss run (shared by MPU and its baseline).

    Parameters
    ----------
    inner_loss : str
        Client's unlearning loss (default: ``"npo"``).
    retain : str
        Retain term source: ``"proxy"`` (public data, default), ``"none"``,
        ``"local"``.
    loss_params : str
        JSON object overriding the inner loss's parameters (default: none).
    rounds : int
        Round budget R (default: 4; chosen on the ``calibration`` suite's
        10-client federation, where 8 over-forgot; on 3 clients 4 rounds
        forget a little less than the oracle) [R].
    local_epochs : int
        Epochs E per copy and round (default: 1).
    lr : float
        Client learning rate; 0 (``RUN_LR``) = ``lr_scale`` x the run's
        (default: 0).
    lr_scale : float
        Unlearning learning rate relative to the FL one when ``lr`` is 0
        (default: 0.1; the run's own rate overshoots the oracle in one round).
    server_lr : float
        η_srv (default: 1.0).
    departed_merge : str
        How the steps of several departed clients combine into the round's
        step: ``"mean"`` (FedAvg over the departed, by ``num-examples``) or
        ``"sum"`` (each client's step is applied whole: their forget sets are
        disjoint, so each unlearns its own data at full strength) (default:
        ``"sum"``, chosen on the ``calibration`` suite's two-client departure,
        where the mean under-forgot) [R]. With one departed client both are the
        same.
    stop, audit_tol
        See :class:`~fed_unlearn.methods.rounds.StopOptions`.
    recovery_rounds : int
        FedAvg rounds of the remaining clients after unlearning (default: 0; see
        :func:`~fed_unlearn.methods.rounds.recovery_rounds`) [R].
    interleave_recovery : bool
        One such FedAvg round after every unlearning round, before the round is
        evaluated (default: True) [R]. The departed client alone cannot repair
        what its unlearning does to the other clients' knowledge, and a
        recovery only *after* unlearning brings part of the forgotten answers
        back (README). Set False for MPU exactly as published.
    """

    inner_loss: str = "npo"
    retain: str = "proxy"
    loss_params: str = ""
    rounds: int = 4
    local_epochs: int = 1
    lr: float = RUN_LR
    lr_scale: float = 0.1
    server_lr: float = 1.0
    departed_merge: str = "sum"
    recovery_rounds: int = 0
    interleave_recovery: bool = True

    def __post_init__(self) -> None:
        check_inner(self.inner_loss, self.retain, self.loss_params)
        if self.recovery_rounds < 0:
            raise ValueError(
                f"recovery_rounds must be >= 0, got {self.recovery_rounds}"
            )
        if self.rounds < 1 or self.local_epochs < 1:
            raise ValueError("rounds and local_epochs must be >= 1")
        if self.lr < RUN_LR:
            raise ValueError(f"lr must be >= 0 (0 = the run's), got {self.lr}")
        check_positive(server_lr=self.server_lr, lr_scale=self.lr_scale)
        if self.departed_merge not in DEPARTED_MERGES:
            raise ValueError(
                f"departed_merge must be one of {DEPARTED_MERGES}, "
                f"got {self.departed_merge!r}"
            )
        super().__post_init__()

    def merge(
        self, steps: Sequence[AdapterState], weights: Sequence[float]
    ) -> AdapterState:
        """Combine the departed clients' steps by ``departed_merge``.

        Parameters
        ----------
        steps : Sequence[AdapterState]
            One step per departed client.
        weights : Sequence[float]
            Their ``num-examples`` (used by ``"mean"``).

        Returns
        -------
        AdapterState
            The round's step, before ``server_lr``.
        """
        if self.departed_merge == "mean" or len(steps) == 1:
            return fedavg(steps, weights)
        total = steps[0]
        for step in steps[1:]:
            total = ad.add(total, step)
        return total

    def begin(self, ctx: UnlearnContext) -> tuple[AdapterState, RoundLog]:
        """Return the fp32 starting adapter and the started round log.

        After a restart, the adapter is the unlearning log's last round's.
        """
        theta = {k: v.float().clone() for k, v in ctx.trained.items()}
        log = self.round_log(ctx)
        return log.start(theta), log

    def repair(
        self,
        ctx: UnlearnContext,
        theta: AdapterState,
        log: RoundLog,
        r: int,
        method: str,
    ) -> AdapterState:
        """Round ``r``'s interleaved recovery step, when ``interleave_recovery``.

        Parameters
        ----------
        ctx : UnlearnContext
            The request's context.
        theta : AdapterState
            Adapter after round ``r``'s unlearning step.
        log : RoundLog
            The method's round log (client compute).
        r : int
            Round number (seeds the clients' data order).
        method : str
            Method name for error messages.

        Returns
        -------
        AdapterState
            The repaired adapter, or ``theta`` when the option is off.
        """
        if not self.interleave_recovery:
            return theta
        return recovery_step(ctx, theta, log, seeds.RECOVERY + r, method)

    def finish(
        self,
        ctx: UnlearnContext,
        theta: AdapterState,
        log: RoundLog,
        r: int,
        method: str,
        **info: object,
    ) -> UnlearnResult:
        """Apply the T2F rollback and the recovery rounds; build the result.

        Parameters
        ----------
        ctx : UnlearnContext
            The request's context.
        theta : AdapterState
            Adapter after the last unlearning round.
        log : RoundLog
            The method's round log.
        r : int
            Unlearning rounds run.
        method : str
            Method name for error messages.
        **info : object
            Method-specific entries of ``UnlearnResult.info``.

        Returns
        -------
        UnlearnResult
            Adapter, rounds (recovery included) and info.
        """
        theta = recovery_rounds(
            ctx,
            log.result(theta),
            self.recovery_rounds,
            log,
            r,
            method,
            # after the interleaved repairs' streams RECOVERY + 1..r
            seed_offset=r if self.interleave_recovery else 0,
        )
        return UnlearnResult(
            theta,
            rounds=r + self.recovery_rounds,
            info=log.info(
                inner_loss=self.inner_loss,
                retain=self.retain,
                recovery_rounds=self.recovery_rounds,
                interleave_recovery=self.interleave_recovery,
                departed_merge=self.departed_merge,
                **info,
            ),
        )

    def request(
        self, copies: list[AdapterState], seed_round: int
    ) -> LocalUpdateRequest:
        """Return the ``local-update`` request of this inner-loss run.

        Parameters
        ----------
        copies : list[AdapterState]
            The adapter copies to run the inner loss on.
        seed_round : int
            Seed stream of the client's data order (the round).

        Returns
        -------
        LocalUpdateRequest
            The typed request.
        """
        return LocalUpdateRequest(
            copies=copies,
            loss=self.inner_loss,
            retain=self.retain,
            epochs=self.local_epochs,
            loss_params=loss_params(self.loss_params),
            **({"lr": self.lr} if self.lr > RUN_LR else {"lr_scale": self.lr_scale}),
            seed_round=seed_round,
        )


@dataclass(kw_only=True)
class MPUConfig(InnerLossConfig):
    """MPU options (plus those of :class:`InnerLossConfig`).

    Parameters
    ----------
    copies : int
        m ≥ 2 perturbed copies per round (default: 2, the paper's script).
    kappa : float
        Noise scale κ ≥ 0: σ = κ·RMS(tensor) (default: 0.05).
    alpha_schedule : str
        ``"random"`` (secret sorted U[1,3], default) or ``"linear"`` (1 → 2).
    granularity : str
        σ per ``"tensor"`` (default) or per ``"layer"``.
    gauge : str
        ``"orthogonal"`` (default), ``"permutation"`` or ``"none"``.
    seed : int
        -1 (default): every secret from ``secrets``. Set it only in tests.
    """

    copies: int = 2
    kappa: float = 0.05
    alpha_schedule: str = "random"
    granularity: str = "tensor"
    gauge: str = "orthogonal"
    seed: int = -1

    def __post_init__(self) -> None:
        if self.copies < 2:
            raise ValueError(f"copies (m) must be >= 2, got {self.copies}")
        if self.kappa < 0:
            raise ValueError(f"kappa must be >= 0, got {self.kappa}")
        for name, value, allowed in (
            ("alpha_schedule", self.alpha_schedule, ("random", "linear")),
            ("granularity", self.granularity, ("tensor", "layer")),
            ("gauge", self.gauge, ("orthogonal", "permutation", "none")),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        super().__post_init__()


class MPU(UnlearningMethod):
    """The departed client unlearns on m perturbed, gauge-rotated copies."""

    summary = (
        "MPU: m perturbed + reparameterised copies, client-side inner loss, "
        "harmonic merge on the server [V/R]"
    )
    requires = frozenset({Requirement.LIVE_CLIENTS, Requirement.DEPARTED_COOPERATION})
    config: MPUConfig

    def resume_refusal(self) -> str | None:
        """MPU resumes: its round state is the adapter (secrets are per round)."""
        return None

    def unlearn(self, ctx: UnlearnContext) -> UnlearnResult:
        """Run MPU rounds until T2F or the budget; see the module docstring."""
        self.check(ctx)
        cfg = self.config
        assert ctx.clients is not None
        theta, log = cfg.begin(ctx)
        pre = post = 0.0
        r = 0
        for r in range(1, cfg.rounds + 1):
            if (stop := log.resumed(r)) is not None:
                if stop:
                    break
                continue  # logged before a restart: ``theta`` is its result
            t0 = time.perf_counter()
            requests: dict[int, LocalUpdateRequest] = {}
            rounds = {}
            for cid in ctx.departed:
                seed = None if cfg.seed < 0 else derive_seed(cfg.seed, r, cid)
                secrets_ = draw_secrets(cfg.copies, cfg.alpha_schedule, seed=seed)
                copies, rounds[cid] = prepare_copies(
                    theta,
                    cfg.copies,
                    cfg.kappa,
                    secrets_,
                    granularity=cfg.granularity,
                    gauge=cfg.gauge,
                )
                requests[cid] = cfg.request(copies, seed_round=r)
            pre += time.perf_counter() - t0
            try:
                replies = ctx.clients.query(requests)
            except ClientFailure as exc:
                if not log.departed_left(exc, r, "mpu"):
                    raise
                r -= 1
                break
            log.add_compute(replies)
            t0 = time.perf_counter()
            merged, weights = [], []
            for cid in ctx.departed:
                reply = replies[cid]
                if not reply.deltas:
                    raise ValueError(f"mpu: client {cid} returned no copies")
                merged.append(merge_returned(reply.deltas, rounds[cid], theta))
                weights.append(float(reply.num_examples))
            step = cfg.merge(merged, weights)
            theta = ad.add(theta, ad.scale(step, cfg.server_lr))  # type: ignore[arg-type]
            post += time.perf_counter() - t0
            theta = cfg.repair(ctx, theta, log, r, "mpu")
            if log.end_round(r, theta, {"step_norm": float(ad.flatten(step).norm())}):  # type: ignore[arg-type]
                break
        return cfg.finish(
            ctx,
            theta,
            log,
            r,
            "mpu",
            copies=cfg.copies,
            kappa=cfg.kappa,
            server_pre_seconds=pre,
            server_post_seconds=post,
        )
