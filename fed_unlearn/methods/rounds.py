"""Shared bookkeeping of round-based methods: curve, stopping rule, client compute.

Every method that talks to clients over several rounds logs the same things: the
cheap per-round forget/retain evaluation (``info["curve"]``, round 0 = the trained
adapter), the clients' local work (``info["client_compute"]``) and why it stopped.

Stopping rules (:data:`STOP_RULES`):

* ``"budget"`` (every method's default): the method's fixed rounds, steps and
  step sizes, stated relative to the FL run. Nothing is read from the retrain
  oracle or from forget data held by the server: the per-round curve is
  evaluated in simulations, but as a measurement only. This is what a
  deployment runs.
* ``"self_audit"`` [R], for methods whose departed client cooperates: the
  departed client kept a share of its items out of FL training
  (``audit-fraction``, :mod:`fed_unlearn.data.audit`) and reports, after
  every round, one scalar: its gap in mean answer probability between its
  trained and its never-trained items (``ctx.audit``). Stop once
  ``|gap| <= audit_tol * |gap_0|`` (``gap_0``: before unlearning); when a
  round overshoots to ``gap < -audit_tol * |gap_0|`` (its trained items now
  *less* likely than unseen ones, itself a tell), keep whichever of that
  round and the previous one has the smaller ``|gap|``. Oracle-free: only
  the client's own scalar decides.
* ``"oracle"`` [R], research only, never a default: the upper bound of an
  oracle-guided stop (our operationalisation of FOUL's T2F, see
  ``simulations.runner.T2F_DEFINITION``). Stop at the first round whose
  per-round ``forget_Q_A_Prob`` is within ``delta`` of the retrain oracle's
  level, and when a round overshoots below ``oracle - delta``, roll back to
  whichever of that round and the previous one is closer to the oracle.
  ``patience > 1`` waits for that many rounds in the band. It reads the
  oracle and the forget data, which a deployment has neither of: the pipeline
  hands it the oracle's level only when a method asks for this rule, marks the
  run ``oracle_stopped`` in ``run.json`` and adds the oracle's cost to the
  method's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fed_unlearn import adapters as ad
from fed_unlearn import seeds
from fed_unlearn.aggregation import fedavg
from fed_unlearn.journal import JournalError, UnlearnJournal
from fed_unlearn.methods.base import (
    NO_BUDGET,
    RUN_BATCH,
    ClientFailure,
    UnlearnConfig,
    UnlearnContext,
)
from fed_unlearn.protocol import LocalUpdateReply, LocalUpdateRequest
from fed_unlearn.training import NO_CAP
from fed_unlearn.types import AdapterState, ClientId

STOP_RULES = ("budget", "self_audit", "oracle")

_logger = logging.getLogger(__name__)


def check_stop_rule(stop: str) -> None:
    """Raise ``ValueError`` for an unknown stopping rule."""
    if stop == "t2f":
        raise ValueError(
            "stop='t2f' is now stop='oracle' (an oracle-guided upper bound, for "
            "research only; the oracle-free default is stop='budget')"
        )
    if stop not in STOP_RULES:
        raise ValueError(f"stop must be one of {STOP_RULES}, got {stop!r}")


@dataclass(kw_only=True)
class StopOptions(UnlearnConfig):
    """The stopping options of round-based methods (module docstring).

    Parameters
    ----------
    stop : str
        ``"budget"`` (default, oracle-free), ``"self_audit"`` (the departed
        client's own scalar; needs ``audit-fraction`` > 0 and its cooperation)
        or ``"oracle"`` (research only, an upper bound).
    audit_tol : float
        ``self_audit`` stops once the gap is within this share of the gap
        before unlearning (default: 0.1).
    """

    stop: str = "budget"
    audit_tol: float = 0.1

    def __post_init__(self) -> None:
        check_stop_rule(self.stop)
        check_positive(audit_tol=self.audit_tol)

    def round_log(self, ctx: UnlearnContext) -> RoundLog:
        """Return a :class:`RoundLog` with these options."""
        return RoundLog(ctx, self.stop, audit_tol=self.audit_tol)


def uses_oracle(options: Any) -> bool:
    """Whether a method config asks for the oracle-guided stop (``stop="oracle"``)."""
    return getattr(options, "stop", None) == "oracle"


def check_positive(**values: float) -> None:
    """Raise ``ValueError`` naming the first option that is not > 0."""
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def copy_deltas(
    replies: Mapping[ClientId, LocalUpdateReply],
    like: AdapterState,
    method: str,
    rejected: dict[ClientId, str] | None = None,
) -> dict[ClientId, tuple[AdapterState, float]]:
    """Return validated single-copy ``local-update`` deltas and client weights.

    Parameters
    ----------
    replies : Mapping[ClientId, LocalUpdateReply]
        ``ClientChannel.query`` result of a one-copy request.
    like : AdapterState
        The tensors that were sent (keys and shapes the deltas must have).
    method : str
        Method name for error messages.
    rejected : dict, optional
        When given, an invalid update is left out and recorded here (client ->
        reason) instead of raising: for steps that can go on without it.

    Returns
    -------
    dict[ClientId, tuple[AdapterState, float]]
        Client -> (delta = after - before, ``num-examples``).

    Raises
    ------
    ValueError
        A client returned nothing; ``InvalidUpdateError`` for wrong keys or
        shapes or non-finite values. Both name the client.
    """
    out: dict[ClientId, tuple[AdapterState, float]] = {}
    for cid, reply in replies.items():
        try:
            if not reply.deltas:
                raise ad.InvalidUpdateError("it returned no update")
            if len(reply.deltas) != 1:
                raise ad.InvalidUpdateError(
                    f"it returned {len(reply.deltas)} copies, not 1"
                )
            delta = reply.deltas[0]
            ad.validate_update(delta, like)
        except ad.InvalidUpdateError as exc:
            if rejected is None:
                raise ad.InvalidUpdateError(
                    f"{method}: client {cid}'s update is rejected: {exc}"
                ) from None
            rejected[cid] = str(exc)
            _logger.warning("%s: client %s's update is rejected: %s", method, cid, exc)
            continue
        out[cid] = (delta, float(reply.num_examples))
    return out


WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def wire_dtype(name: str) -> torch.dtype:
    """Return the torch dtype of a ``wire_dtype`` option.

    Raises
    ------
    ValueError
        Not one of :data:`WIRE_DTYPES`.
    """
    if name not in WIRE_DTYPES:
        allowed = tuple(WIRE_DTYPES)
        raise ValueError(f"wire_dtype must be one of {allowed}, got {name!r}")
    return WIRE_DTYPES[name]


def to_wire(state: AdapterState, dtype: torch.dtype) -> AdapterState:
    """Cast a state for sending (clients answer in the dtype they receive).

    fp16 halves the bytes of both directions; the server keeps its fp32 copy
    and applies the returned deltas (cast back to fp32 by the channel) to it.
    """
    return {k: v.to(dtype) for k, v in state.items()}


def recovery_rounds(
    ctx: Any,
    theta: AdapterState,
    rounds: int,
    log: RoundLog,
    first_round: int,
    method: str,
    dtype: torch.dtype = torch.float32,
    max_steps: int = NO_CAP,
    batch_size: int = RUN_BATCH,
    budget: float = NO_BUDGET,
    seed_offset: int = 0,
) -> AdapterState:
    """Retain recovery [R]: plain FedAvg rounds of the remaining clients.

    Each round sends the unlearned adapter to the remaining clients, which run one
    epoch of their normal FL loss (``nll``, the run's learning rate) and return
    their deltas; the server applies the ``num-examples``-weighted mean. The
    remaining clients never held the forget data, so this restores their own
    knowledge, which an unlearning step driven by the departed client alone
    damages, without teaching the forget set back (the post-training of FedOSD
    and FedEraser's calibration follow the same idea). Logged as rounds
    ``first_round + 1 ...`` with ``stage = "recovery"``.

    Parameters
    ----------
    ctx : UnlearnContext
        The request's context (its ``clients`` channel and ``remaining`` ids).
    theta : AdapterState
        Unlearned adapter.
    rounds : int
        Number of recovery rounds (0 returns ``theta`` unchanged).
    log : RoundLog
        The method's round log (curve and client compute).
    first_round : int
        Rounds already logged.
    method : str
        Method name for error messages.
    dtype : torch.dtype
        Wire dtype of the adapters and deltas (default: fp32).
    max_steps : int
        Cap on each client's local steps (default: ``NO_CAP``: one full epoch).
    batch_size : int
        Examples per local step (default: ``RUN_BATCH``: the run's).
    budget : float
        With ``max_steps`` > 0 and no ``batch_size``: each client's
        ``max_steps`` steps see this share of the examples that retraining
        would show it, ``budget`` x FL rounds x local epochs x its items
        (:func:`fed_unlearn.training.budget_batches`; default: ``NO_BUDGET``).
    seed_offset : int
        Round p's data order is the stream ``seeds.RECOVERY + seed_offset + p``
        (default: 0; a method that used ``RECOVERY + 1..k`` before passes k).

    Returns
    -------
    AdapterState
        The adapter after recovery.
    """
    for p in range(1, rounds + 1):
        if log.resumed(first_round + p) is not None:
            continue  # done before a restart: ``theta`` is already its result
        theta = recovery_step(
            ctx,
            theta,
            log,
            seeds.RECOVERY + seed_offset + p,
            method,
            dtype,
            max_steps,
            batch_size,
            budget,
        )
        log.end_round(first_round + p, theta, {"stage": "recovery"})
    return theta


def recovery_step(
    ctx: Any,
    theta: AdapterState,
    log: RoundLog,
    seed_round: int,
    method: str,
    dtype: torch.dtype = torch.float32,
    max_steps: int = NO_CAP,
    batch_size: int = RUN_BATCH,
    budget: float = NO_BUDGET,
) -> AdapterState:
    """One FedAvg round of the remaining clients (see :func:`recovery_rounds`).

    Parameters
    ----------
    ctx : UnlearnContext
        The request's context.
    theta : AdapterState
        Current adapter.
    log : RoundLog
        Round log (client compute is added; no round is logged).
    seed_round : int
        Seed stream of the clients' data order.
    method : str
        Method name for error messages.
    dtype : torch.dtype
        Wire dtype (default: fp32).
    max_steps : int
        Cap on each client's local steps (default: ``NO_CAP``: one full epoch).
    batch_size : int
        Examples per local step (default: ``RUN_BATCH``: the run's).
    budget : float
        See :func:`recovery_rounds` (default: ``NO_BUDGET``).

    Returns
    -------
    AdapterState
        ``theta`` plus the ``num-examples``-weighted mean of the clients' deltas.
    """
    request = LocalUpdateRequest(
        copies=[to_wire(theta, dtype)],
        epochs=1,
        loss="nll",
        seed_round=seed_round,
        max_steps=max_steps,
        batch_size=None if batch_size == RUN_BATCH else batch_size,
        budget=(
            budget
            if budget != NO_BUDGET and max_steps != NO_CAP and batch_size == RUN_BATCH
            else None
        ),
    )
    try:
        replies = ctx.clients.query(dict.fromkeys(ctx.remaining, request))
    except ClientFailure as exc:
        # a recovery round goes on with the clients that answered
        if not exc.replies:
            raise
        replies = exc.replies
        log.dropped.update({str(c): why for c, why in exc.failed.items()})
        _logger.warning("%s: recovery round without %s", method, sorted(exc.failed))
    log.add_compute(replies)
    # a recovery round goes on without a client whose update is invalid
    rejected: dict[ClientId, str] = {}
    parts = list(copy_deltas(replies, theta, method, rejected).values())
    if rejected:
        log.rejected.update({str(c): why for c, why in rejected.items()})
    if not parts:
        raise ad.InvalidUpdateError(
            f"{method}: every remaining client's recovery update was rejected: "
            f"{rejected}"
        )
    return ad.add(theta, fedavg([d for d, _ in parts], [w for _, w in parts]))


def loss_params(text: str) -> dict[str, float]:
    """Parse a ``loss-params`` JSON object option (``""`` = none).

    Raises
    ------
    ValueError
        Not a JSON object of numbers.
    """
    if not text:
        return {}
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"loss_params: not JSON ({exc})") from None
    if not isinstance(obj, dict) or not all(
        isinstance(v, int | float) for v in obj.values()
    ):
        raise ValueError(f"loss_params must be a JSON object of numbers: {text!r}")
    return {str(k): float(v) for k, v in obj.items()}


class RoundLog:
    """Per-round curve, client compute and the stopping decision.

    Parameters
    ----------
    ctx : UnlearnContext
        The method's context (``evaluate`` and ``forget_target`` may be None).
    stop : str
        ``"budget"``, ``"self_audit"`` or ``"oracle"`` (module docstring).
    patience : int
        Rounds in the oracle band before ``"oracle"`` stops.
    audit_tol : float
        ``"self_audit"``'s tolerance, relative to the gap before unlearning.
    """

    def __init__(
        self,
        ctx: UnlearnContext,
        stop: str,
        patience: int = 1,
        audit_tol: float = 0.1,
    ) -> None:
        check_stop_rule(stop)
        if stop == "self_audit" and ctx.audit is None:
            raise ValueError(
                "stop='self_audit' needs the departed client's self-audit: "
                "audit-fraction > 0 in the FL run and a departed client that "
                "still answers"
            )
        if stop == "oracle" and (ctx.evaluate is None or ctx.forget_target is None):
            raise ValueError(
                "stop='oracle' needs the retrain oracle's forget level and the "
                "server-side forget evaluation, which only a simulation has; use "
                "stop='budget'"
            )
        self.ctx = ctx
        self.stop = stop
        self.patience = patience
        self.curve: list[dict[str, float]] = []
        self.compute = {"local_steps": 0.0, "tokens": 0.0, "client_seconds": 0.0}
        self.in_band = 0
        self.stopped_by = "budget"
        self.rounds_log: list[dict[str, Any]] = []
        self.previous: AdapterState | None = None
        self.rolled_back = False
        self.audit_tol = audit_tol
        self.audit_gaps: list[float] = []
        self.rejected: dict[str, str] = {}  #: client -> why its update was left out
        self.dropped: dict[str, str] = {}  #: client -> why it gave no reply
        self.ended: dict[int, bool] = {}  #: round -> whether its stop rule fired
        #: the departed clients stopped answering: the round, who, why
        self.left: dict[str, Any] = {}
        #: the unlearning log (``ctx.journal``): every ended round is logged
        self.journal: UnlearnJournal | None = getattr(ctx, "journal", None)
        self.resumed_from = 0  #: the last logged round a restart went on from

    def start(self, state: AdapterState) -> AdapterState:
        """Evaluate the starting adapter (round 0); return the adapter to go on from.

        With an unlearning log that already holds rounds (a restarted server),
        nothing is evaluated: the log's state is restored and the adapter of its
        last round is returned; the method skips the rounds it holds
        (:meth:`resumed`).

        Raises
        ------
        JournalError
            The log's last entry is unreadable or does not fit ``state``, or
            its departed clients had stopped answering (``departed_left``).
        """
        if self.journal is not None and (last := self.journal.latest()) is not None:
            r, saved, log_state = last
            try:
                ad.validate_update(saved, state)
            except ad.InvalidUpdateError as exc:
                raise JournalError(
                    f"unlearning log {self.journal.root}: round {r}'s adapter does "
                    f"not fit this run ({exc})"
                ) from None
            self._restore(log_state)
            if self.left:
                raise JournalError(
                    f"unlearning log {self.journal.root}: the departed client(s) "
                    f"{sorted(self.left['clients'])} stopped answering in round "
                    f"{self.left['round']} before the restart, which a resume "
                    "cannot replay; run the command again"
                )
            self.previous = saved
            self.resumed_from = r
            _logger.info("resuming after round %d of %s", r, self.journal.root)
            return saved
        self.previous = state
        if self.stop == "self_audit":
            assert self.ctx.audit is not None
            self.audit_gaps.append(float(self.ctx.audit(state)))
        if self.ctx.evaluate is not None:
            self.curve.append({"round": 0, **self.ctx.evaluate(state)})
        return state

    def resumed(self, r: int) -> bool | None:
        """Whether round ``r`` ended before a restart, and if so its stop decision.

        Returns
        -------
        bool or None
            ``None``: round ``r`` is still to run. Otherwise the round's work is
            done (skip it) and the value is what :meth:`end_round` returned.
        """
        return self.ended.get(r) if r <= self.resumed_from else None

    def departed_left(self, exc: ClientFailure, r: int, method: str) -> bool:
        """Record that departed clients stopped answering in round ``r``.

        A departed client that stops cooperating halfway ends the unlearning
        stage: round ``r`` is dropped, the adapter stays the last complete
        round's (``r - 1``; the trained one when ``r`` is 1), and the info
        says so (``stopped_by="departed_left"``, ``departed_left`` with the
        round, the rounds completed and why each client gave no reply). Stages
        that need the remaining clients only (recovery, post-training) go on.

        Parameters
        ----------
        exc : ClientFailure
            The failure of round ``r``'s query.
        r : int
            The round that could not finish.
        method : str
            Method name for the log.

        Returns
        -------
        bool
            False when no departed client is among the failed ones (the caller
            re-raises ``exc``).
        """
        departed = set(self.ctx.departed)
        gone = {str(c): why for c, why in exc.failed.items() if c in departed}
        if not gone:
            return False
        self.stopped_by = "departed_left"
        self.left = {"round": r, "rounds_completed": r - 1, "clients": gone}
        _logger.warning(
            "%s: departed client(s) %s stopped answering in round %d; keeping the "
            "adapter of round %d%s",
            method,
            sorted(gone),
            r,
            r - 1,
            " (the trained one: nothing was unlearned)" if r == 1 else "",
        )
        return True

    def add_compute(self, replies: Mapping[ClientId, LocalUpdateReply]) -> None:
        """Add the clients' reported local work of one request."""
        for reply in replies.values():
            self.compute["local_steps"] += float(reply.local_steps)
            self.compute["tokens"] += float(reply.tokens)
            self.compute["client_seconds"] += float(reply.train_seconds)

    def end_round(
        self, r: int, state: AdapterState, extra: Mapping[str, Any] | None = None
    ) -> bool:
        """Log round ``r`` and return whether to stop.

        Parameters
        ----------
        r : int
            Round number (1-based).
        state : AdapterState
            Adapter after the round.
        extra : Mapping[str, Any], optional
            Method-specific figures of the round (logged in ``info["rounds"]``).

        Returns
        -------
        bool
            True when the stopping rule fires.

        Raises
        ------
        JournalError
            The round could not be logged (the earlier rounds' entries stay).
        """
        stop = self._end_round(r, state, extra)
        self.ended[r] = stop
        if self.journal is not None:
            assert self.previous is not None
            self.journal.write(r, self.previous, self._state())
        return stop

    def _state(self) -> dict[str, Any]:
        """Return the log's state as JSON (the adapter is logged beside it)."""
        return {
            "curve": self.curve,
            "compute": self.compute,
            "in_band": self.in_band,
            "stopped_by": self.stopped_by,
            "rounds_log": self.rounds_log,
            "rolled_back": self.rolled_back,
            "audit_gaps": self.audit_gaps,
            "rejected": self.rejected,
            "dropped": self.dropped,
            "left": self.left,
            "ended": [[r, stop] for r, stop in sorted(self.ended.items())],
        }

    def _restore(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`_state` returned."""
        self.curve = list(state["curve"])
        self.compute = dict(state["compute"])
        self.in_band = int(state["in_band"])
        self.stopped_by = str(state["stopped_by"])
        self.rounds_log = list(state["rounds_log"])
        self.rolled_back = bool(state["rolled_back"])
        self.audit_gaps = [float(x) for x in state["audit_gaps"]]
        self.rejected = dict(state["rejected"])
        self.dropped = dict(state["dropped"])
        self.left = dict(state.get("left", {}))
        self.ended = {int(r): bool(stop) for r, stop in state["ended"]}

    def _end_round(
        self, r: int, state: AdapterState, extra: Mapping[str, Any] | None
    ) -> bool:
        """Return the stopping decision of :meth:`end_round`."""
        self.rounds_log.append({"round": r, **(extra or {})})
        previous, self.previous = self.previous, state
        if self.stop == "self_audit" and not self.left:  # no departed to audit
            if self.ctx.evaluate is not None:  # the curve: a measurement only
                self.curve.append({"round": r, **self.ctx.evaluate(state)})
            return self._audit_stop(state, previous)
        if self.ctx.evaluate is None:
            return False
        point = {"round": r, **self.ctx.evaluate(state)}
        self.curve.append(point)
        target = self.ctx.forget_target
        if self.stop != "oracle" or target is None:
            return False  # the curve is a measurement: it decides nothing
        oracle, delta = target
        value = point["forget_Q_A_Prob"]
        if value < oracle - delta:
            self.stopped_by = "overshoot"
            before = self.curve[-2]["forget_Q_A_Prob"]
            if previous is not None and abs(before - oracle) < abs(value - oracle):
                self.previous = previous
                self.rolled_back = True
                self.curve.append({**self.curve[-2], "round": r, "rolled_back": 1.0})
                self.curve.pop(-2)
            return True
        self.in_band = self.in_band + 1 if abs(value - oracle) <= delta else 0
        if self.in_band >= self.patience:
            self.stopped_by = "oracle"
            return True
        return False

    def _audit_stop(self, state: AdapterState, previous: AdapterState | None) -> bool:
        """``self_audit``: the departed client's gap decides (module docstring)."""
        assert self.ctx.audit is not None and self.audit_gaps, "start() first"
        gap0 = abs(self.audit_gaps[0])
        gap = float(self.ctx.audit(state))
        self.audit_gaps.append(gap)
        self.rounds_log[-1]["audit_gap"] = gap
        tol = self.audit_tol * gap0
        if gap < -tol:
            self.stopped_by = "audit_overshoot"
            if previous is not None and abs(self.audit_gaps[-2]) < abs(gap):
                self.previous = previous
                self.rolled_back = True
                if len(self.curve) >= 2:
                    self.curve[-1] = {**self.curve[-2], "round": len(self.rounds_log)}
                    self.curve[-1]["rolled_back"] = 1.0
            return True
        if abs(gap) <= tol:
            self.stopped_by = "self_audit"
            return True
        return False

    def result(self, fallback: AdapterState) -> AdapterState:
        """Return the adapter to keep: the last round's, or the rolled-back one."""
        return self.previous if self.previous is not None else fallback

    def info(self, **more: Any) -> dict[str, Any]:
        """Return the ``UnlearnResult.info`` entries this log provides."""
        return {
            "curve": self.curve,
            "client_compute": dict(self.compute),
            "stopped_by": self.stopped_by,
            "rolled_back": self.rolled_back,
            "rounds": self.rounds_log,
            **({"audit_gaps": self.audit_gaps} if self.audit_gaps else {}),
            **({"rejected_updates": self.rejected} if self.rejected else {}),
            **({"dropped_clients": self.dropped} if self.dropped else {}),
            **({"resumed_after_round": self.resumed_from} if self.resumed_from else {}),
            **({"departed_left": self.left} if self.left else {}),
            **more,
        }
