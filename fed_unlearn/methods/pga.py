"""PGA: projected gradient ascent by the departed client, then post-training.

Paper: Halimi, Kadhe, Rawat, Baracaldo, "Federated Unlearning: How to
Efficiently Erase a Client in FL?", arXiv 2207.05521, 2022. Spec:
``shared/specs/methods.md`` §2.3.

With U the departed clients, T the last FL round, θ_T the global adapter sent
in it, Δ_k client k's delta and n_k its examples in that round:

1. Reference model w_ref = θ_T + Σ_{k∉U} n_k Δ_k / Σ_{k∉U} n_k, the average of
   the other clients' last local models [V: the paper's w_ref; the client-side
   form (w^T − p_u w_u^{T−1})/(1 − p_u) is the same adapter under FedAvg]. The
   server computes it from the last round of its history in which a remaining
   client took part [R: server-side, so it never travels unless ``start`` asks].
2. Ω = {w : ‖w − w_ref‖₂ ≤ δ}: the L2 ball of radius δ around w_ref, the
   distance taken over the whole adapter (every tensor flattened into one
   vector, :func:`fed_unlearn.adapters.flatten`), not squared and not per
   tensor [V: the paper's Ω]. δ = ``delta`` when set, else ``delta_fraction``
   × ‖w_ref − θ_1‖₂, θ_1 the initial adapter of the history's round 1 [R: the
   spec's common third-party choice, 1/3 of the distance between w_ref and a
   random initialisation, with the run's own initialisation, which the server
   holds; no oracle].
3. Start from w_ref (``start="reference"``) or from P_Ω(θ_{T+1})
   (``start="trained"``) [R: the paper does not say].
4. Ascent round r = 1..R: each departed client runs ``local_steps`` steps of
   gradient ascent (the ``ga`` inner loss, a fresh AdamW with gradient
   clipping) on its own items from the current w and returns its delta; the
   server sums the departed clients' deltas (disjoint forget sets) and projects,
   w ← P_Ω(w + Σ_u Δ_u) with P_Ω(v) = w_ref + (v − w_ref)·min(1, δ/‖v − w_ref‖₂)
   [V: the update and the projection; R: the projection after each round of
   ``local_steps`` local steps, by the server; ``local_steps = 1`` is the
   paper's per-step projection at one round trip per step].
5. Early stop [P: "accuracy drops below τ"; R: the LLM mapping]: with τ > 0,
   after every round the departed clients report their token accuracy on their
   own items (teacher-forced greedy, EOS excluded: exact memorization, one
   scalar each, size-weighted mean over them; also once at the start point);
   the ascent stops once it is below τ. Oracle-free: only the departed
   clients' own scalar decides.
6. Post-training [V]: ``recovery_rounds`` FedAvg rounds of the remaining
   clients from the unlearned w (:func:`~fed_unlearn.methods.rounds.recovery_rounds`).

What crosses the wire: to the departed clients, the current iterate (w_ref
itself when ``start="reference"``, which a single departed client could compute
from w^T, its own last local model and p_u), ``local-update`` deltas back, and
with τ > 0 one ``token-accuracy`` scalar each per round; to the remaining
clients, the post-training rounds. δ, Ω and the history stay on the server.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from fed_unlearn import adapters as ad
from fed_unlearn import seeds
from fed_unlearn.aggregation import fedavg
from fed_unlearn.history import HistoryStore
from fed_unlearn.methods.base import (
    RUN_LR,
    Requirement,
    UnlearnConfig,
    UnlearnContext,
    UnlearningMethod,
    UnlearnResult,
)
from fed_unlearn.methods.rounds import (
    RoundLog,
    check_positive,
    copy_deltas,
    recovery_rounds,
)
from fed_unlearn.protocol import LocalUpdateRequest, TokenAccuracyRequest
from fed_unlearn.training import NO_CAP
from fed_unlearn.types import AdapterState

PGA_STARTS = ("reference", "trained")


@dataclass(kw_only=True)
class PGAConfig(UnlearnConfig):
    """PGA options.

    Parameters
    ----------
    rounds : int
        Ascent rounds R (default: 4) [R].
    local_steps : int
        Ascent steps of a departed client per round, before the round's
        projection; 0 = one epoch of its items (default: 0) [R].
    lr : float
        Ascent learning rate; 0 (``RUN_LR``) = ``lr_scale`` x the run's
        (default: 0).
    lr_scale : float
        Ascent rate relative to the FL one when ``lr`` is 0 (default: 0.1, as
        MPU's inner loss) [R].
    delta : float
        Radius δ of Ω; 0 = ``delta_fraction`` x ‖w_ref − θ_1‖₂ (default: 0).
    delta_fraction : float
        δ as a share of the distance between w_ref and the initial adapter
        (default: 1/3) [R].
    start : str
        ``"reference"`` (w_ref) or ``"trained"`` (the FL result projected onto
        Ω) (default: ``"reference"``) [R].
    tau : float
        Early stop once the departed clients' token accuracy on their own items
        is below τ; 0 = no accuracy stop and no accuracy query (default: 0).
    recovery_rounds : int
        Post-training FedAvg rounds of the remaining clients (default: 1; the
        paper reports one round enough on MNIST) [P].
    """

    rounds: int = 4
    local_steps: int = 0
    lr: float = RUN_LR
    lr_scale: float = 0.1
    delta: float = 0.0
    delta_fraction: float = 1 / 3
    start: str = "reference"
    tau: float = 0.0
    recovery_rounds: int = 1

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.local_steps < 0:
            raise ValueError(f"local_steps must be >= 0, got {self.local_steps}")
        if not (self.lr >= RUN_LR and math.isfinite(self.lr)):
            raise ValueError(f"lr must be >= 0 (0 = the run's), got {self.lr}")
        check_positive(lr_scale=self.lr_scale, delta_fraction=self.delta_fraction)
        if not (self.delta >= 0 and math.isfinite(self.delta)):
            raise ValueError(
                f"delta must be >= 0 (0 = from delta_fraction), got {self.delta}"
            )
        if self.start not in PGA_STARTS:
            raise ValueError(f"start must be one of {PGA_STARTS}, got {self.start!r}")
        if not 0 <= self.tau <= 1:
            raise ValueError(
                f"tau must be in [0, 1] (a token accuracy), got {self.tau}"
            )
        if self.recovery_rounds < 0:
            raise ValueError(
                f"recovery_rounds must be >= 0, got {self.recovery_rounds}"
            )


def project_ball(
    state: AdapterState, center: AdapterState, radius: float
) -> AdapterState:
    """P_Ω: the nearest adapter to ``state`` in the L2 ball around ``center``.

    Parameters
    ----------
    state, center : AdapterState
        Adapters of the same keys and shapes.
    radius : float
        δ >= 0; the distance is ‖state − center‖₂ over the whole flattened
        adapter.

    Returns
    -------
    AdapterState
        ``center + (state − center) · min(1, δ / ‖state − center‖₂)`` (new
        tensors, fp32).
    """
    diff = ad.sub(state, center)
    norm = float(ad.flatten(diff).double().norm())
    if norm <= radius:
        return {k: v.float().clone() for k, v in state.items()}
    return ad.add(center, ad.scale(diff, radius / norm))


def reference_model(
    store: HistoryStore, departed: set[int]
) -> tuple[AdapterState, int]:
    """w_ref: the FedAvg of the remaining clients' last local adapters.

    Parameters
    ----------
    store : HistoryStore
        The FL history.
    departed : set[int]
        The departed clients.

    Returns
    -------
    tuple[AdapterState, int]
        w_ref = θ_t + Σ_{k∉U} n_k Δ_k / Σ_{k∉U} n_k for the last round t in
        which a remaining client took part, and t.

    Raises
    ------
    ValueError
        If no remaining client took part in any round.
    """
    for t in reversed(store.rounds()):
        rec = store.load(t)
        keep = [c for c in rec.participants if c not in departed]
        if keep:
            avg = fedavg(
                [rec.client_deltas[c] for c in keep],
                [float(rec.num_examples[c]) for c in keep],
            )
            base = {k: v.float() for k, v in rec.global_state.items()}
            return ad.add(base, avg), t
    raise ValueError("pga: no remaining client took part in any recorded round")


class PGA(UnlearningMethod):
    """Projected gradient ascent of the departed clients around w_ref."""

    summary = (
        "PGA: the departed client's gradient ascent projected onto an L2 ball "
        "around the other clients' average, early stop on its own token "
        "accuracy, then FedAvg post-training [V/R]"
    )
    requires = frozenset(
        {
            Requirement.HISTORY,
            Requirement.LIVE_CLIENTS,
            Requirement.DEPARTED_COOPERATION,
        }
    )
    config: PGAConfig

    def unlearn(self, ctx: UnlearnContext) -> UnlearnResult:
        """Run steps 1-6 of the module docstring."""
        self.check(ctx)
        cfg = self.config
        assert ctx.history is not None and ctx.clients is not None
        t0 = time.perf_counter()
        w_ref, ref_round = reference_model(ctx.history, set(ctx.departed))
        init = ctx.history.load(ctx.history.rounds()[0]).global_state
        ref_dist = _dist(w_ref, init)
        delta = cfg.delta if cfg.delta > 0 else cfg.delta_fraction * ref_dist
        trained = {k: v.float() for k, v in ctx.trained.items()}
        theta = (
            {k: v.clone() for k, v in w_ref.items()}
            if cfg.start == "reference"
            else project_ball(trained, w_ref, delta)
        )
        server_s = time.perf_counter() - t0
        log = RoundLog(ctx, "budget")
        log.start(trained)  # the curve's round 0 is the trained adapter
        accuracy = [self._accuracy(ctx, theta)] if cfg.tau > 0 else []
        stopped_by, r = "budget", 0
        for r in range(1, cfg.rounds + 1):
            request = LocalUpdateRequest(
                copies=[theta],
                loss="ga",
                epochs=1,
                max_steps=cfg.local_steps if cfg.local_steps else NO_CAP,
                lr=cfg.lr if cfg.lr != RUN_LR else None,
                lr_scale=cfg.lr_scale,
                seed_round=seeds.PGA + r,
            )
            replies = ctx.clients.query(dict.fromkeys(ctx.departed, request))
            log.add_compute(replies)
            t1 = time.perf_counter()
            step: AdapterState | None = None
            for d, _ in copy_deltas(replies, theta, self.name).values():
                step = d if step is None else ad.add(step, d)
            assert step is not None
            theta = project_ball(ad.add(theta, step), w_ref, delta)
            server_s += time.perf_counter() - t1
            extra = {"distance": _dist(theta, w_ref)}
            if cfg.tau > 0:
                accuracy.append(self._accuracy(ctx, theta))
                extra["token_accuracy"] = accuracy[-1]
            log.end_round(r, theta, extra)
            if cfg.tau > 0 and accuracy[-1] < cfg.tau:
                stopped_by = "tau"
                break
        theta = recovery_rounds(ctx, theta, cfg.recovery_rounds, log, r, self.name)
        info = log.info(
            reference_round=ref_round,
            delta=delta,
            reference_to_init=ref_dist,
            start=cfg.start,
            ascent_rounds=r,
            recovery_rounds=cfg.recovery_rounds,
            server_step_seconds=server_s,
            **({"token_accuracy": accuracy} if accuracy else {}),
        )
        info["stopped_by"] = stopped_by
        return UnlearnResult(theta, rounds=r + cfg.recovery_rounds, info=info)

    def _accuracy(self, ctx: UnlearnContext, theta: AdapterState) -> float:
        """Return the departed clients' size-weighted mean token accuracy."""
        assert ctx.clients is not None
        replies = ctx.clients.query(
            dict.fromkeys(ctx.departed, TokenAccuracyRequest(theta))
        )
        total = sum(rep.num_examples for rep in replies.values())
        if total <= 0:
            raise ValueError("pga: the departed clients reported no items")
        return (
            sum(rep.token_accuracy * rep.num_examples for rep in replies.values())
            / total
        )


def _dist(a: AdapterState, b: AdapterState) -> float:
    return float(ad.flatten(ad.sub(a, b)).double().norm())
