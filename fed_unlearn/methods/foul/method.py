"""FOUL: Federated On-server UnLearning by gradient-conflict mitigation/expression.

Paper: Nguyen, Le, Yong et al., "FOUL", CVPR 2026 (arXiv 2603.13795). Spec:
``shared/specs/foul_mpu.md`` Part A. This is the LoRA port of A.7 ("FOUL-LoRA",
option B: a gradient-conflict mask on an already trained adapter).

Algorithm (per unlearning request)
----------------------------------
1. *Forgettable sub-network*, fixed once [P idea, R rule]: from the updates
   cached in the FL history, the departed clients' pseudo-gradient g_f and the
   size-weighted retain mean ḡ_R, per LoRA tensor j the conflict score
   c_j = cos(g_f^j, ḡ_R^j); θ_V = the top-p (25 %) tensors by
   ‖g_f^j‖/‖ḡ_R^j‖ (``subnetwork="ratio"``, default), or {j : c_j < τ}
   (``"conflict"``, falling back to the top-p when no tensor conflicts), every
   tensor (``"all"``), or the V adapter of a dual-adapter run (``"dual"``,
   below). ``granularity="rank"`` [R, A.7(i)-4] scores and selects each row
   of a LoRA A and each column of a LoRA B on its own; the server then reads
   and steps only those entries, and in ``cached``/``live`` mode only those
   ranks travel and train (the request's ``ranks``; the clients mask the
   gradients of the others).
   Never re-identified during unlearning (FOUL's efficiency argument).
2. Each round r [P formula, R derivation as CAGrad's dual]: remaining clients
   upload pseudo-gradients g_u = θ_V - θ_V,u^local after E local epochs of their
   normal loss, for θ_V only; the server forms g0 = Σ_R p_u g_u / Σ_R p_u,
   signs s_u = +1 (retain), -1 (forget), solves
   Γ* = argmin_{Γ∈Δ} Γᵀb + κ‖g0‖·sqrt(ΓᵀGΓ) with G_ij = ⟨s_i g_i, s_j g_j⟩,
   b_i = ⟨s_i g_i, g0⟩, and steps θ_V ← θ_V - η·d,
   d = g0 + κ‖g0‖/‖g_Γ‖·g_Γ, g_Γ = Σ γ_i s_i g_i (Theorem 1).
3. The forget gradient g_f [R, A.6-1]: ``mode="cached"`` (default; the departed
   client is gone) uses its updates from the history (``forget_grad="sum"``: its
   whole contribution Σ_t (θ_t - θ_t,f); ``"last"``: its last round only);
   ``mode="live"`` asks the departed client for a fresh pseudo-gradient every round.
   ``mode="server"`` [P for "the server-side optimisation uses previously uploaded
   gradients" (A.3 step 2), R for the rest] is the strict on-server reading: the
   retain pseudo-gradients come from the history too (same ``forget_grad`` rule),
   so no client is contacted and nothing crosses the wire. The gradients do not
   change, so d is solved once and the rounds are ``rounds`` equal steps along
   it. Their total length [R] is ``server_lr`` with ``server_step="fixed"``, or
   with ``"share"`` the length of what the departed clients added to the
   global adapter, from the history alone:
   under FedAvg with full participation the global adapter's change is
   θ_T - θ_0 = -Σ_t Σ_u p_u (θ_t - θ_t,u), so the departed clients added
   C = -Σ_f p_f g_f (p_f = n_f / Σ_u n_u, the last round's sizes), and the
   step is η = ``server_lr`` · ‖C‖ / ‖d‖ (on θ_V), i.e. a step along d exactly
   as long as the contribution to remove. Under partial participation p_f
   varies by round and this is an approximation. No oracle and no forget data
   enter it; ``server_lr`` scales it and is calibrated on the ``calibration``
   bench suite. ``server_direction="remove"`` [R] takes d = C = -Σ_f p_f g_f,
   so that a total step of 1 subtracts C exactly (``foul_server``'s default,
   at 1/2: the other clients' later updates were computed on a model that
   held C and carry part of it, so removing all of C over-forgets).
4. Stop after the round budget (``stop="budget"``, the default), or for
   research on the retrain oracle (``stop="oracle"``, an upper bound; see
   :mod:`fed_unlearn.methods.rounds`).
5. Optional ``recovery_rounds`` [R] (default 0): FedAvg rounds of the remaining
   clients on their own data after the stop (see
   :func:`fed_unlearn.methods.rounds.recovery_rounds`); they need live clients,
   in every mode.

Only θ_V travels during unlearning (``cached``/``live``), except once: in round 1
the frozen rest of the adapter is sent so clients can build the full adapter (they
keep it in their Flower context state; a tensor of which θ_V holds only some
ranks goes whole in that base, and each round's ranks are written into it).
``info`` reports θ_V's bytes against the whole adapter's.

In ``server`` mode a linear step inside the span of the cached updates can
remove the departed contribution but cannot re-learn what retraining teaches
the remaining clients' data; ``foul_server`` therefore adds one short recovery
round. Figures: the README and ``docs/results/``.

Logged every round: min over retain clients of ⟨d, g_r⟩ and max over forget
clients of ⟨d, g_f⟩ (conflict mitigation wants the first ≥ 0, expression the
second ≤ 0), Γ*, ‖g0‖.

Option A of A.7, dual adapters [R] (``subnetwork="dual"``): an FL run with
``dual-adapter=true`` trains a shared adapter K and a client-specific adapter V
side by side with L2U-style regularisers (:mod:`fed_unlearn.dual`); θ_V is then V
(the upper ranks of every LoRA A and B) and the step leaves K as trained. The
run config is checked before any FL phase: ``dual`` on a single-adapter run is
refused.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from fed_unlearn import adapters as ad
from fed_unlearn import seeds
from fed_unlearn.aggregation import fedavg
from fed_unlearn.dual import v_units
from fed_unlearn.history import HistoryStore
from fed_unlearn.methods.base import (
    NO_BUDGET,
    RUN_BATCH,
    RUN_LR,
    ClientFailure,
    MissingRequirementError,
    Requirement,
    UnlearnContext,
    UnlearningMethod,
    UnlearnResult,
)
from fed_unlearn.methods.foul.geometry import cagrad_direction, select_subnetwork
from fed_unlearn.methods.rounds import (
    RoundLog,
    StopOptions,
    check_positive,
    copy_deltas,
    recovery_rounds,
    to_wire,
    wire_dtype,
)
from fed_unlearn.protocol import LocalUpdateRequest
from fed_unlearn.training import NO_CAP
from fed_unlearn.types import AdapterState

MODES = ("server", "cached", "live")
SERVER_STEPS = ("fixed", "share")
SERVER_DIRECTIONS = ("foul", "remove")
SUBNETWORKS = ("conflict", "ratio", "all", "dual")
FORGET_GRADS = ("sum", "last")
GRANULARITIES = ("tensor", "rank")
_NEEDS_DUAL = (
    "subnetwork=dual needs the FL run trained with dual-adapter=true (its "
    "client-specific adapter V is θ_V)"
)


@dataclass(kw_only=True)
class FoulConfig(StopOptions):
    """FOUL options.

    Parameters
    ----------
    kappa : float
        Conflict radius κ ≥ 0 (default: 0.75; the paper's value is unknown and
        CAGrad uses 0.2-0.5) [R].
    mode : str
        ``"cached"`` (default) or ``"live"`` source of the forget gradient, or
        ``"server"``: every gradient from the history, no client contacted.
    forget_grad : str
        Cached g_f (and in ``server`` mode the retain g_u too): ``"sum"`` of all
        the client's updates (default) or ``"last"``.
    subnetwork : str
        θ_V rule: ``"ratio"`` (default), ``"conflict"``, ``"all"`` or ``"dual"``
        (the client-specific adapter V of a ``dual-adapter`` FL run). On the
        tiny testbed every tensor's cumulative departed/retain cosine is below 0,
        so ``"conflict"`` with τ = 0 selects the whole adapter; ``"ratio"`` keeps
        the top-p tensors by ‖g_f^j‖/‖ḡ_R^j‖ (the spec's alternative rule).
    granularity : str
        Unit of θ_V: ``"tensor"`` (default; whole LoRA tensors) or ``"rank"``
        (each row of a LoRA A and each column of a LoRA B scored and selected on
        its own, A.7(i)-4).
    tau : float
        Conflict threshold τ on the cosine (default: 0.0).
    top_p : float
        Fraction of tensors for ``"ratio"`` and the fallback (default: 0.25).
    rounds : int
        Round budget (default: 20).
    stop, audit_tol
        See :class:`~fed_unlearn.methods.rounds.StopOptions`.
    server_lr : float
        Server step η on d (default: 1.0: d is made of pseudo-gradients); in
        ``server`` mode with ``server_step="fixed"`` the total step, split into
        ``rounds`` equal steps.
    server_step : str
        ``server`` mode's total step: ``"fixed"`` (default; ``server_lr``) or
        ``"share"``: from the history alone, the step whose length is
        ``server_lr`` times that of the departed clients' FedAvg-weighted
        share of the cumulative update on θ_V (see the module docstring).
    server_direction : str
        ``server`` mode's direction: ``"foul"`` (default; the conflict-averse
        d) or ``"remove"`` [R]: d = -Σ_f p_f g_f, the departed clients' FedAvg
        share itself, so a total step of 1 subtracts exactly what they added
        (first order; ``server_step`` then scales that share).
    local_epochs : int
        Local epochs behind each pseudo-gradient (default: 1).
    local_steps : int
        Cap on the local steps behind each pseudo-gradient and each recovery
        round (the spec's E; default: 0 = ``NO_CAP``, ``local_epochs`` epochs).
    lr : float
        Clients' local learning rate; 0 (``RUN_LR``) = the run's (default: 0).
    recovery_rounds : int
        FedAvg rounds of the remaining clients after the stop (default: 0).
    recovery_batch_size : int
        Examples per local step in those rounds; 0 (``RUN_BATCH``) = the run's
        (default: 0).
    recovery_budget : float
        When ``recovery_batch_size`` is 0 and ``local_steps`` > 0: each
        remaining client's ``local_steps`` recovery steps see this share of the
        examples retraining would show it (FL rounds x local epochs x its items),
        split evenly over the steps (default: 0 = ``NO_BUDGET``, the run's
        batch).
    wire_dtype : str
        ``"float32"`` (default) or ``"float16"``: the dtype of the adapters and
        deltas that clients send and receive (fp16 halves the bytes; the server
        keeps and updates its fp32 copy).
    """

    kappa: float = 0.75
    mode: str = "cached"
    forget_grad: str = "sum"
    subnetwork: str = "ratio"
    granularity: str = "tensor"
    tau: float = 0.0
    top_p: float = 0.25
    rounds: int = 20
    server_lr: float = 1.0
    server_step: str = "fixed"
    server_direction: str = "foul"
    local_epochs: int = 1
    local_steps: int = NO_CAP
    lr: float = RUN_LR
    recovery_rounds: int = 0
    recovery_batch_size: int = RUN_BATCH
    recovery_budget: float = NO_BUDGET
    wire_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.kappa < 0:
            raise ValueError(f"kappa must be >= 0, got {self.kappa}")
        for name, value, allowed in (
            ("mode", self.mode, MODES),
            ("forget_grad", self.forget_grad, FORGET_GRADS),
            ("subnetwork", self.subnetwork, SUBNETWORKS),
            ("granularity", self.granularity, GRANULARITIES),
            ("server_step", self.server_step, SERVER_STEPS),
            ("server_direction", self.server_direction, SERVER_DIRECTIONS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.server_direction != "foul" and self.mode != "server":
            raise ValueError(
                f"server_direction={self.server_direction!r} is a step of "
                f"mode='server'; mode={self.mode!r} steps along FOUL's direction"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.rounds < 1 or self.local_epochs < 1:
            raise ValueError("rounds and local_epochs must be >= 1")
        check_positive(server_lr=self.server_lr)
        if self.lr < 0:
            raise ValueError(f"lr must be >= 0 (0 = the run's), got {self.lr}")
        wire_dtype(self.wire_dtype)
        if self.local_steps < 0:
            raise ValueError(f"local_steps must be >= 0, got {self.local_steps}")
        if self.recovery_batch_size < 0:
            raise ValueError(
                "recovery_batch_size must be >= 0 (0 = the run's), got "
                f"{self.recovery_batch_size}"
            )
        if self.recovery_rounds < 0:
            raise ValueError(
                f"recovery_rounds must be >= 0, got {self.recovery_rounds}"
            )
        if not (math.isfinite(self.recovery_budget) and self.recovery_budget >= 0):
            raise ValueError(
                "recovery_budget must be a finite number >= 0 (0 = unused), got "
                f"{self.recovery_budget}"
            )
        super().__post_init__()


def cached_updates(
    history: HistoryStore,
    clients: tuple[int, ...],
    how: str,
    required: tuple[int, ...] | None = None,
) -> dict[int, AdapterState]:
    """Pseudo-gradients θ_t - θ_t,u of ``clients`` from the FL history.

    Parameters
    ----------
    history : HistoryStore
        The FL run's history.
    clients : tuple[int, ...]
        Whose updates.
    how : str
        ``"sum"`` over all rounds or ``"last"`` round each client took part in.
    required : tuple[int, ...], optional
        The clients that must have an update (default: all of ``clients``); the
        others are left out of the result when the history has none of theirs.

    Returns
    -------
    dict[int, AdapterState]
        Client -> pseudo-gradient (minus its stored delta).

    Raises
    ------
    MissingRequirementError
        A required client has no update in the history.
    """
    out: dict[int, AdapterState] = {}
    for r in history.rounds():
        rec = history.load(r)
        for cid in clients:
            if cid not in rec.client_deltas:
                continue
            g = {k: -v.float() for k, v in rec.client_deltas[cid].items()}
            out[cid] = ad.add(out[cid], g) if how == "sum" and cid in out else g
    missing = [c for c in (clients if required is None else required) if c not in out]
    if missing:
        raise MissingRequirementError(
            f"foul (cached mode): the history has no update of client(s) {missing}"
        )
    return out


def weighted_mean(
    states: dict[int, AdapterState], weights: dict[int, float]
) -> AdapterState:
    """Σ w_u s_u / Σ w_u over the clients of ``states`` (FedAvg's average)."""
    return fedavg(list(states.values()), [weights[c] for c in states])


def departed_share_norm(
    grads: dict[int, torch.Tensor],
    weights: dict[int, float],
    departed: tuple[int, ...],
) -> float:
    """‖Σ_f p_f g_f‖: the length of the departed clients' share of the update.

    ``grads`` are the flattened cumulative pseudo-gradients g_c = Σ_t (θ_t -
    θ_t,c) of every client, ``weights`` their FedAvg weights n_c; p_f = n_f /
    Σ_c n_c. Under FedAvg with full participation, -Σ_f p_f g_f is exactly
    what the departed clients' local updates added to the global adapter.
    """
    return float(departed_share(grads, weights, departed).norm())


def departed_share(
    grads: dict[int, torch.Tensor],
    weights: dict[int, float],
    departed: tuple[int, ...],
) -> torch.Tensor:
    """Σ_f p_f g_f, with p_f = n_f / Σ_c n_c (see :func:`departed_share_norm`)."""
    total = sum(weights[c] for c in grads)
    return torch.as_tensor(sum(weights[f] / total * grads[f] for f in departed))


def replayed_contribution(
    history: HistoryStore,
    departed: tuple[int, ...],
    replay: Callable[[AdapterState, list[AdapterState]], AdapterState],
) -> AdapterState:
    """Return what the departed clients added under a server optimiser (replayed).

    Under FedAvg the departed clients added C = Σ_t Σ_f p_f,t Δ_f,t to the global
    adapter (Δ_f,t their delta in round t, p_f,t = n_f / Σ of that round's
    participants' n). A server optimiser (FedAdam, FedYogi, FedAdagrad, FedAvgM)
    steps on the round's average Δ̄_t instead, so [R] C is θ_T minus where the
    same optimiser ends when each round's average loses the departed terms,
    Δ̄_t - Σ_f p_f,t Δ_f,t, the other clients' deltas unchanged. Under FedAvg
    that is the C above exactly.

    Parameters
    ----------
    history : HistoryStore
        The FL run's history (its rounds and final adapter).
    departed : tuple[int, ...]
        Clients whose terms are dropped.
    replay : Callable
        :attr:`~fed_unlearn.methods.base.UnlearnContext.server_replay`.

    Returns
    -------
    AdapterState
        C, fp32.
    """
    rounds = history.rounds()
    start = history.load(rounds[0]).global_state
    steps = []
    for r in rounds:
        rec = history.load(r)
        total = float(sum(rec.num_examples[c] for c in rec.participants))
        keep = [c for c in rec.participants if c not in departed]
        step = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in start.items()}
        for c in keep:
            share = rec.num_examples[c] / total
            step = ad.add(step, ad.scale(rec.client_deltas[c], share))
        steps.append(step)
    return ad.sub(history.final(), replay(start, steps))


def rank_units(state: AdapterState) -> AdapterState:
    """Split LoRA tensors into rank units: rows of ``lora_A``, columns of ``lora_B``.

    Other tensors stay whole. Unit names are ``<key>#<i>``.
    """
    out: AdapterState = {}
    for k, v in state.items():
        if v.dim() == 2 and "lora_A" in k:
            out.update({f"{k}#{i}": v[i] for i in range(v.shape[0])})
        elif v.dim() == 2 and "lora_B" in k:
            out.update({f"{k}#{i}": v[:, i] for i in range(v.shape[1])})
        else:
            out[k] = v
    return out


@dataclass
class SubNetwork:
    """θ_V: per adapter tensor, the flat indices of its selected entries.

    Parameters
    ----------
    index : dict[str, torch.Tensor | None]
        Tensor -> flat indices of the selected entries (``None``: all of them).
    shapes : dict[str, torch.Size]
        Shapes of those tensors.
    ranks : dict[str, list[int]]
        For the tensors selected by rank units only: their selected ranks (rows
        of ``lora_A``, columns of ``lora_B``), sorted.
    """

    index: dict[str, torch.Tensor | None]
    shapes: dict[str, torch.Size]
    ranks: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def from_units(cls, units: list[str], like: AdapterState) -> SubNetwork:
        """Build θ_V from selected tensor names or ``<key>#<i>`` rank units."""
        rows: dict[str, list[int]] = {}
        whole: set[str] = set()
        for u in units:
            key, sep, i = u.partition("#")
            if sep:
                rows.setdefault(key, []).append(int(i))
            else:
                whole.add(key)
        index: dict[str, torch.Tensor | None] = dict.fromkeys(whole)
        for key, picked in rows.items():
            if key in whole:
                continue
            mask = torch.zeros(like[key].shape, dtype=torch.bool)
            sel = torch.tensor(sorted(picked))
            if "lora_A" in key:
                mask[sel, :] = True
            else:
                mask[:, sel] = True
            index[key] = mask.reshape(-1).nonzero().squeeze(1)
        return cls(
            {k: index[k] for k in sorted(index)},
            {k: like[k].shape for k in index},
            {k: sorted(set(v)) for k, v in rows.items() if k not in whole},
        )

    def gather(self, state: AdapterState) -> AdapterState:
        """Return what travels of θ_V: whole tensors, and rank slices.

        A tensor selected by rank units travels as its selected rows
        (``lora_A``) or columns (``lora_B``). Flattened in row-major order, the
        slices hold θ_V's entries in :meth:`flatten`'s order, so
        ``flatten_gathered(gather(s)) == flatten(s)``.
        """
        out = {}
        for k in self.index:
            ranks = self.ranks.get(k)
            out[k] = state[k] if ranks is None else ad.take_ranks(state[k], k, ranks)
        return out

    def flatten_gathered(self, gathered: AdapterState) -> torch.Tensor:
        """Return θ_V as one fp32 vector from :meth:`gather`'s tensors."""
        return torch.cat([gathered[k].detach().reshape(-1).float() for k in self.index])

    def keys(self) -> list[str]:
        """Return the tensors holding a selected entry (sorted)."""
        return list(self.index)

    def params(self) -> int:
        """Return the number of selected entries."""
        return sum(
            self.shapes[k].numel() if i is None else i.numel()
            for k, i in self.index.items()
        )

    def flatten(self, state: AdapterState) -> torch.Tensor:
        """Return the selected entries of ``state`` as one fp32 vector."""
        parts = []
        for k, i in self.index.items():
            flat = state[k].detach().reshape(-1).float()
            parts.append(flat if i is None else flat[i])
        return torch.cat(parts)

    def step(self, theta: AdapterState, vec: torch.Tensor, eta: float) -> AdapterState:
        """Return a new adapter: ``theta - eta * vec`` on θ_V, the rest unchanged."""
        out = dict(theta)
        offset = 0
        for k, i in self.index.items():
            flat = theta[k].reshape(-1).clone()
            n = flat.numel() if i is None else i.numel()
            part = vec[offset : offset + n].to(flat.dtype)
            if i is None:
                flat -= eta * part
            else:
                flat[i] -= eta * part
            out[k] = flat.reshape(theta[k].shape)
            offset += n
        return out


class Foul(UnlearningMethod):
    """On-server unlearning of θ_V along the conflict-averse direction."""

    summary = (
        "FOUL-LoRA: fixed conflict sub-network, CAGrad-style server step "
        "(retain +, forget -) from uploaded pseudo-gradients [P/R]"
    )
    requires = frozenset({Requirement.HISTORY, Requirement.LIVE_CLIENTS})
    config: FoulConfig

    def needs(self) -> frozenset[Requirement]:
        """History only in ``server`` mode; live clients otherwise."""
        if self.config.mode == "server" and not self.config.recovery_rounds:
            return frozenset({Requirement.HISTORY})
        return frozenset({Requirement.HISTORY, Requirement.LIVE_CLIENTS})

    def resume_refusal(self) -> str | None:
        """``server`` mode resumes; ``cached``/``live`` refuse.

        In those modes the clients keep the frozen rest of the adapter, sent in
        round 1, in their own state, which a restarted federation does not hold.
        """
        if self.config.mode == "server":
            return None
        return (
            f"method {self.name!r} in {self.config.mode} mode does not resume: its "
            "clients keep round 1's frozen adapter part in their own state, which "
            "a restarted federation does not hold; run the command again"
        )

    def check_run(self, run: Mapping[str, Any]) -> None:
        """``subnetwork=dual`` needs an FL run with ``dual-adapter``."""
        if self.config.subnetwork == "dual" and not run.get("dual-adapter"):
            raise ValueError(f"{self.name} {_NEEDS_DUAL}")

    def check(self, ctx: UnlearnContext) -> None:
        """Also require live-mode cooperation and, for ``dual``, a dual run."""
        super().check(ctx)
        if self.config.subnetwork == "dual" and not ctx.dual_split:
            raise MissingRequirementError(f"{self.name} {_NEEDS_DUAL}")
        if self.config.mode == "live" and not ctx.departed_cooperates:
            raise MissingRequirementError(
                f"method {self.name!r} in live mode needs departed_cooperation (the "
                "departed client must still answer); use mode=cached or mode=server"
            )

    def unlearn(self, ctx: UnlearnContext) -> UnlearnResult:
        """Run FOUL rounds (budget or oracle stop); see the module docstring."""
        self.check(ctx)
        cfg = self.config
        assert ctx.history is not None
        t0 = time.perf_counter()  # the server's own work: history read and steps
        # one pass over the history for both groups
        hist = cached_updates(
            ctx.history,
            (*ctx.remaining, *ctx.departed),
            cfg.forget_grad,
            required=ctx.departed,
        )
        # a remaining client with no update in the history (lost before its
        # first reply, e.g. a SuperNode killed in round 1) contributed nothing:
        # it is left out of the geometry and of the recovery rounds, and said so
        never = [c for c in ctx.remaining if c not in hist]
        if never:
            ctx = replace(ctx, remaining=tuple(c for c in ctx.remaining if c in hist))
            if not ctx.remaining:
                raise MissingRequirementError(
                    f"{self.name}: no remaining client has an update in the history"
                )
        hist_retain = {c: hist[c] for c in ctx.remaining}
        hist_forget = {c: hist[c] for c in ctx.departed}
        sizes = ctx.history.load(ctx.history.rounds()[-1]).num_examples
        weights = {c: float(sizes.get(c, 1)) for c in (*ctx.remaining, *ctx.departed)}
        theta = {k: v.float().clone() for k, v in ctx.trained.items()}
        if cfg.subnetwork == "all":
            units = sorted(theta)
        elif cfg.subnetwork == "dual":
            units = v_units(theta, ctx.dual_split)
        else:
            split = rank_units if cfg.granularity == "rank" else dict
            units = select_subnetwork(
                split(weighted_mean(hist_forget, weights)),
                split(weighted_mean(hist_retain, weights)),
                rule=cfg.subnetwork,
                tau=cfg.tau,
                top_p=cfg.top_p,
            )
        if not units:
            raise ValueError(f"{self.name}: the forgettable sub-network θ_V is empty")
        sub = SubNetwork.from_units(units, theta)
        log = cfg.round_log(ctx)
        theta = log.start(theta)
        if cfg.mode == "server":
            r = self._on_server(ctx, theta, sub, hist_retain, hist_forget, weights, log)
            rounds = 0
            more = {"server_steps": r, "server_step_seconds": time.perf_counter() - t0}
        else:
            r = self._with_clients(ctx, theta, sub, hist_forget, weights, log)
            rounds, more = r, {}
        final = log.result(theta)
        if cfg.recovery_rounds:
            final = recovery_rounds(
                ctx,
                final,
                cfg.recovery_rounds,
                log,
                r,
                self.name,
                wire_dtype(cfg.wire_dtype),
                cfg.local_steps,
                cfg.recovery_batch_size,
                cfg.recovery_budget,
            )
            rounds += cfg.recovery_rounds
        full_bytes = sum(v.numel() * 4 for v in theta.values())
        return UnlearnResult(
            final,
            rounds=rounds,
            info=log.info(
                mode=cfg.mode,
                kappa=cfg.kappa,
                subnetwork={
                    "rule": cfg.subnetwork,
                    "granularity": cfg.granularity,
                    "tensors": len(sub.keys()),
                    "of_tensors": len(theta),
                    "params": sub.params(),
                    "of_params": sum(v.numel() for v in theta.values()),
                    # what travels per round in cached/live mode: θ_V (whole
                    # tensors and rank slices)
                    "bytes": sum(v.numel() * 4 for v in sub.gather(theta).values()),
                    "adapter_bytes": full_bytes,
                },
                **more,
                **({"remaining_without_history": never} if never else {}),
            ),
        )

    def _step(
        self,
        ctx: UnlearnContext,
        grads: dict[int, torch.Tensor],
        weights: dict[int, float],
    ) -> tuple[torch.Tensor, dict[str, object]]:
        """Solve for d from flattened θ_V pseudo-gradients; return d and its log."""
        order = [*ctx.remaining, *ctx.departed]
        g = torch.stack([grads[c] for c in order])
        signs = [1] * len(ctx.remaining) + [-1] * len(ctx.departed)
        w = [weights[c] for c in ctx.remaining] + [0.0] * len(ctx.departed)
        step = cagrad_direction(g, signs, w, self.config.kappa)
        return step.direction, {
            "min_retain_inner": float(step.min_retain_inner),
            "max_forget_inner": float(step.max_forget_inner),
            "g0_norm": float(step.g0_norm),
            "gamma": [float(x) for x in step.gamma],
        }

    def _on_server(
        self,
        ctx: UnlearnContext,
        theta: AdapterState,
        sub: SubNetwork,
        hist_retain: dict[int, AdapterState],
        hist_forget: dict[int, AdapterState],
        weights: dict[int, float],
        log: RoundLog,
    ) -> int:
        """``server`` mode: d from the history alone, ``rounds`` steps along it.

        Returns
        -------
        int
            Server steps taken.
        """
        cfg = self.config
        grads = {
            c: sub.flatten(hist[c]) for hist in (hist_retain, hist_forget) for c in hist
        }
        if ctx.server_replay is None:
            share = -departed_share(grads, weights, ctx.departed)
        else:
            assert ctx.history is not None
            share = sub.flatten(
                replayed_contribution(ctx.history, ctx.departed, ctx.server_replay)
            )
        if cfg.server_direction == "remove":
            d = share
            extra: dict[str, object] = {"direction": "remove"}
        else:
            d, extra = self._step(ctx, grads, weights)
        if ctx.server_replay is not None:
            extra["share"] = "replayed server optimiser"
        total = cfg.server_lr
        if cfg.server_step == "share":
            total *= float(share.norm()) / max(float(d.norm()), 1e-12)
        extra["total_step"] = total
        eta = total / cfg.rounds
        r = 0
        for r in range(1, cfg.rounds + 1):
            if (stop := log.resumed(r)) is not None:
                if stop:
                    break
                continue  # logged before a restart: ``theta`` is its result
            # a new dict each round: the log may roll back to the previous one
            theta = sub.step(theta, d, eta)
            if log.end_round(r, theta, {**extra, "step": eta * r}):
                break
        return r

    def _with_clients(
        self,
        ctx: UnlearnContext,
        theta: AdapterState,
        sub: SubNetwork,
        hist_forget: dict[int, AdapterState],
        weights: dict[int, float],
        log: RoundLog,
    ) -> int:
        """``cached``/``live`` modes: fresh pseudo-gradients every round.

        Returns
        -------
        int
            Communication rounds used.
        """
        cfg = self.config
        assert ctx.clients is not None
        # the tensors outside θ_V, and whole the ones θ_V takes only ranks of:
        # the client keeps them and writes each round's θ_V slices into them
        frozen = {
            k: v for k, v in theta.items() if k not in sub.index or k in sub.ranks
        }
        live = list(ctx.remaining) + (list(ctx.departed) if cfg.mode == "live" else [])
        dtype = wire_dtype(cfg.wire_dtype)
        # cached mode: the departed clients' gradients do not change between rounds
        fixed = (
            {cid: sub.flatten(hist_forget[cid]) for cid in ctx.departed}
            if cfg.mode == "cached"
            else {}
        )
        r = 0
        for r in range(1, cfg.rounds + 1):
            sent = sub.gather(theta)
            request = LocalUpdateRequest(
                copies=[to_wire(sent, dtype)],
                base=to_wire(frozen, dtype) if r == 1 else {},
                loss="nll",
                epochs=cfg.local_epochs,
                max_steps=cfg.local_steps,
                lr=cfg.lr if cfg.lr > RUN_LR else None,
                ranks=sub.ranks,
                seed_round=seeds.FOUL_LIVE + r,
            )
            try:
                replies = ctx.clients.query(dict.fromkeys(live, request))
            except ClientFailure as exc:
                if not log.departed_left(exc, r, self.name):
                    raise
                r -= 1
                break
            log.add_compute(replies)
            grads: dict[int, torch.Tensor] = dict(fixed)
            for cid, (delta, n) in copy_deltas(replies, sent, self.name).items():
                grads[cid] = -sub.flatten_gathered(delta)
                weights[cid] = n
            d, extra = self._step(ctx, grads, weights)
            theta = sub.step(theta, d, cfg.server_lr)
            if log.end_round(r, theta, extra):
                break
        return r
