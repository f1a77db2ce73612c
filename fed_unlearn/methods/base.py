"""Method contract: config dataclass, context, result and the abstract method.

A method declares what it needs in ``requires`` (see :class:`Requirement`); the
orchestrator builds an :class:`UnlearnContext` and :meth:`UnlearningMethod.check`
fails with a clear :class:`MissingRequirementError` when something is absent,
instead of running on a silent ``None``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Protocol, overload

from fed_unlearn.config import SERVER_OPTIMIZERS
from fed_unlearn.history import HistoryStore
from fed_unlearn.journal import UnlearnJournal
from fed_unlearn.protocol import (
    AttributionReply,
    AttributionRequest,
    AuditReply,
    AuditRequest,
    LayerGramReply,
    LayerGramRequest,
    LocalUpdateReply,
    LocalUpdateRequest,
    TokenAccuracyReply,
    TokenAccuracyRequest,
)
from fed_unlearn.types import AdapterState, ClientId

#: A method's learning-rate option (``lr``, ``post_lr``) at this value: the
#: run's ``lr`` (times the method's ``lr_scale`` where it has one). It stays a
#: method option's value; on the wire ``lr`` is then left out.
RUN_LR = 0.0

#: A method's batch-size option (``recovery_batch_size``) at this value: the
#: run's ``batch-size`` (on the wire ``batch-size`` is then left out).
RUN_BATCH = 0

#: A method's ``recovery_budget`` (or a recovery round's ``budget``) at this
#: value: no budget (the batches are the run's or ``RUN_BATCH``'s). A step cap
#: at ``fed_unlearn.training.NO_CAP`` caps nothing.
NO_BUDGET = 0.0


class Requirement(StrEnum):
    """What a method may need from the federation."""

    HISTORY = "history"  #: per-round global adapters and client deltas
    RETRAIN = "retrain"  #: the ability to re-run FL without the departed clients
    LIVE_CLIENTS = "live_clients"  #: remaining clients answer requests
    DEPARTED_COOPERATION = "departed_cooperation"  #: departed clients still answer


class MissingRequirementError(RuntimeError):
    """A method's declared requirement is not available in this context."""


class ClientFailure(RuntimeError):
    """Some clients of a query failed or did not answer.

    Parameters
    ----------
    message : str
        What happened, naming the clients.
    replies : Mapping, optional
        The replies of the clients that did answer.
    failed : Mapping, optional
        Client id -> why it gave no reply.
    """

    def __init__(
        self,
        message: str,
        replies: Mapping[ClientId, Any] | None = None,
        failed: Mapping[ClientId, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.replies = dict(replies or {})
        self.failed = dict(failed or {})


class ClientChannel(Protocol):
    """How a method talks to clients (implemented over Flower by ``server/``).

    One call is one request: the typed request of each recipient
    (:mod:`fed_unlearn.protocol`), the same object for a broadcast
    (``dict.fromkeys(clients, request)``) or one per client (MPU's copies).
    """

    @overload
    def query(
        self, requests: Mapping[ClientId, LocalUpdateRequest]
    ) -> dict[ClientId, LocalUpdateReply]: ...

    @overload
    def query(
        self, requests: Mapping[ClientId, AuditRequest]
    ) -> dict[ClientId, AuditReply]: ...

    @overload
    def query(
        self, requests: Mapping[ClientId, AttributionRequest]
    ) -> dict[ClientId, AttributionReply]: ...

    @overload
    def query(
        self, requests: Mapping[ClientId, TokenAccuracyRequest]
    ) -> dict[ClientId, TokenAccuracyReply]: ...

    @overload
    def query(
        self, requests: Mapping[ClientId, LayerGramRequest]
    ) -> dict[ClientId, LayerGramReply]: ...

    def query(self, requests: Mapping[ClientId, Any]) -> dict[ClientId, Any]:
        """Send each client its request and return its typed reply."""
        ...


@dataclass(kw_only=True)
class UnlearnConfig:
    """Base class of method configs (every knob is a dataclass field)."""


@dataclass
class UnlearnContext:
    """What the orchestrator hands to a method.

    Parameters
    ----------
    trained : AdapterState
        Final global adapter of the FL run (contains the departed contribution).
    departed : tuple[int, ...]
        Clients to forget.
    remaining : tuple[int, ...]
        Clients that stay.
    seed : int
        Run seed.
    history : HistoryStore, optional
        Per-round history of the FL run.
    retrain : Callable[[], AdapterState], optional
        Runs (or loads from cache) FL from the same init without ``departed``.
    clients : ClientChannel, optional
        Live channel to clients.
    departed_cooperates : bool
        Whether the departed clients still answer requests.
    evaluate : Callable[[AdapterState], dict[str, float]], optional
        Cheap server-side evaluation (``forget_Q_A_Prob``, ``retain_Q_A_Prob`` on
        a fixed subset) for per-round curves; simulations only.
    forget_target : tuple[float, float], optional
        ``(oracle forget_Q_A_Prob, delta)`` on that subset, for the T2F stopping
        rule (see ``simulations.runner.T2F_DEFINITION``); simulations only.
    dual_split : int
        In a dual-adapter FL run (``dual-adapter``), the first rank of the
        client-specific adapter V (= ``lora-r``); 0 for a single adapter.
    audit : Callable[[AdapterState], float], optional
        The departed clients' self-audit (``audit-fraction`` > 0 and departed
        cooperation): sends an adapter, returns their size-weighted gap in mean
        answer probability between trained and never-trained own items, for
        ``stop="self_audit"`` (:mod:`fed_unlearn.data.audit`).
    server_replay : Callable[[AdapterState, list[AdapterState]], AdapterState], optional
        Where FL stepped with a server optimiser (``strategy`` FedAdam, FedYogi,
        FedAdagrad or FedAvgM): runs that Flower strategy afresh from an adapter
        on given per-round FedAvg averages of client deltas and returns where it
        ends. ``None``: the server step is FedAvg (θ + the average).
    journal : UnlearnJournal, optional
        The per-round unlearning log of a resumable method
        (:mod:`fed_unlearn.journal`); when it already holds rounds, the method
        goes on after the last one.
    """

    trained: AdapterState
    departed: tuple[int, ...]
    remaining: tuple[int, ...]
    seed: int
    history: HistoryStore | None = None
    retrain: Callable[[], AdapterState] | None = None
    clients: ClientChannel | None = None
    departed_cooperates: bool = False
    evaluate: Callable[[AdapterState], dict[str, float]] | None = None
    forget_target: tuple[float, float] | None = None
    dual_split: int = 0
    audit: Callable[[AdapterState], float] | None = None
    server_replay: Callable[[AdapterState, list[AdapterState]], AdapterState] | None = (
        None
    )
    journal: UnlearnJournal | None = None

    def available(self) -> set[Requirement]:
        """Return the requirements this context satisfies."""
        have = set()
        if self.history is not None:
            have.add(Requirement.HISTORY)
        if self.retrain is not None:
            have.add(Requirement.RETRAIN)
        if self.clients is not None:
            have.add(Requirement.LIVE_CLIENTS)
            if self.departed_cooperates:
                have.add(Requirement.DEPARTED_COOPERATION)
        return have


@dataclass
class UnlearnResult:
    """Output of a method.

    Parameters
    ----------
    adapter : AdapterState
        The unlearned global adapter.
    rounds : int
        Communication rounds the method used (0 for server-only methods).
    info : dict[str, Any]
        Method-specific figures (logged into ``run.json``).
    """

    adapter: AdapterState
    rounds: int = 0
    info: dict[str, Any] = field(default_factory=dict)


class UnlearningMethod(ABC):
    """Abstract unlearning method.

    Subclasses set ``name`` and ``requires`` and implement :meth:`unlearn`.

    Parameters
    ----------
    config : UnlearnConfig
        The method's configuration dataclass.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    requires: ClassVar[frozenset[Requirement]] = frozenset()
    #: True for a method whose result *is* the retrain oracle: its cost is the
    #: oracle's recorded cost, and its curve the oracle's.
    is_oracle: ClassVar[bool] = False
    #: True for a method whose math assumes the history's global updates are
    #: FedAvg of the recorded client deltas: a run with another aggregation, or
    #: with a server-optimiser strategy (FedAdam, FedYogi, FedAdagrad, FedAvgM;
    #: FedProx's server step is FedAvg's), is refused when its config is
    #: validated (:meth:`check_run`).
    needs_fedavg: ClassVar[bool] = False

    def __init__(self, config: UnlearnConfig) -> None:
        self.config = config

    def needs(self) -> frozenset[Requirement]:
        """Return what this configured instance needs (default: ``requires``).

        A method whose options change what it needs (FOUL's ``mode``) overrides
        this; ``requires`` stays the needs of the default configuration.
        """
        return self.requires

    def resume_refusal(self) -> str | None:
        """Why this configured method cannot resume after a crash (``None``: it can).

        A method resumes (``fed-unlearn resume``) when all it carries from one
        round to the next is its adapter and its
        :class:`~fed_unlearn.methods.rounds.RoundLog`, and it skips the rounds
        the log holds (``RoundLog.resumed``). The base refuses; such a method
        overrides this to return ``None``.
        """
        return (
            f"method {self.name!r} does not resume from an unlearning log; run "
            "the command again"
        )

    def check_run(self, run: Mapping[str, Any]) -> None:
        """Raise if the run's flat config cannot serve this method.

        Called when the run config is validated, before any FL phase runs, so a
        method option that needs a particular FL recipe fails at once. The base
        refuses only a non-FedAvg run (``aggregation`` or ``strategy``) of a
        method with :attr:`needs_fedavg`.

        Parameters
        ----------
        run : Mapping[str, Any]
            Flat run config (``dual-adapter``, ``lora-r``, ...).

        Raises
        ------
        ValueError
            Naming the option and the missing run setting.
        """
        agg = run.get("aggregation", "fedavg")
        if self.needs_fedavg and agg != "fedavg":
            raise ValueError(
                f"{self.name} assumes FedAvg of the recorded client deltas; this "
                f"run aggregates with {agg!r} (aggregation=fedavg)"
            )
        strategy = run.get("strategy", "fedavg")
        if self.needs_fedavg and strategy in SERVER_OPTIMIZERS:
            raise ValueError(
                f"{self.name} assumes FedAvg of the recorded client deltas; this "
                f"run's strategy {strategy!r} steps with a server optimiser "
                "(strategy=fedavg or fedprox)"
            )

    def check(self, ctx: UnlearnContext) -> None:
        """Raise if the context lacks something this method requires.

        Parameters
        ----------
        ctx : UnlearnContext
            The context to check.

        Raises
        ------
        MissingRequirementError
            Naming the method and every missing requirement.
        """
        missing = sorted(r.value for r in self.needs() - ctx.available())
        if missing:
            raise MissingRequirementError(
                f"method {self.name!r} needs {', '.join(missing)}, which this run "
                "does not provide"
            )

    @abstractmethod
    def unlearn(self, ctx: UnlearnContext) -> UnlearnResult:
        """Remove the departed clients' contribution.

        Parameters
        ----------
        ctx : UnlearnContext
            Everything the method may use.

        Returns
        -------
        UnlearnResult
            The unlearned adapter and figures.
        """
