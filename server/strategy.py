"""Flower's Message-API strategies, wrapped to validate and record updates.

:class:`HistoryFedAvg` is Flower's ``FedAvg``; :func:`history_strategy` builds
the same wrapper around ``FedProx``, ``FedAdam``, ``FedYogi``, ``FedAdagrad`` or
``FedAvgM`` (the run's ``strategy`` key). The wrapper only chooses the clients,
sends typed ``train`` requests and screens and records the replies; the
aggregate and any server optimiser step are the Flower class's own
``aggregate_train``, and what its ``configure_train`` records for that step (the
current arrays of FedAdam & co., FedProx's μ) it records by running that
``configure_train`` itself, with its node sampling switched off.

Per round it stores the global adapter it sent, every accepted client's delta,
``num-examples`` and participation in a :class:`fed_unlearn.history.HistoryStore`.
A malformed update (wrong keys or shapes, NaN/Inf, missing ``num-examples``, a
client id that does not match the node) is rejected and logged, and the round goes
on without it. Client sampling is seeded per round over *all* clients and the
excluded ones are dropped afterwards, so the retrain oracle sees exactly the
original participation minus the departed clients.

In a dual-adapter run (FOUL-LoRA, :mod:`fed_unlearn.dual`) every train request
also carries the K-invariance prototype, which the server computes itself from
public probes under the adapter it sends (``prototype_fn``,
:func:`fed_unlearn.dual.public_prototype`); clients send none back (a reply with
a ``dual-prototype`` is refused by the protocol and the update rejected).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Iterable
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.app.constants import DEFAULT_TTL
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
)

from fed_unlearn import adapters as ad
from fed_unlearn.aggregation import product_space_aggregate
from fed_unlearn.config import STRATEGIES, ResolvedConfig
from fed_unlearn.history import HistoryStore, RoundRecord
from fed_unlearn.protocol import TrainReply, TrainRequest
from fed_unlearn.training import sample_clients
from server.channel import decode_reply, encode_request

log = logging.getLogger(__name__)


def sum_train_metrics(contents: list[RecordDict], weight_key: str) -> MetricRecord:
    """Aggregate client train metrics: sums of work, weighted mean of the loss."""
    total_n = sum(float(c["metrics"][weight_key]) for c in contents)
    out: dict[str, Any] = {"num-clients": len(contents), weight_key: int(total_n)}
    for key in ("local-steps", "tokens", "train-seconds"):
        out[key] = sum(c["metrics"].get(key, 0) for c in contents)
    for key in ("train-loss", "dual-loss-k", "dual-loss-v"):
        if all(key in c["metrics"] for c in contents):
            out[key] = sum(
                float(c["metrics"][key]) * float(c["metrics"][weight_key])
                for c in contents
            ) / max(total_n, 1.0)
    return MetricRecord(out)


#: An update whose delta is longer than this many times the round's median delta
#: is rejected (with at least three updates): one hostile or broken client must
#: not write an arbitrary step into the history later departures read.
MAX_NORM_RATIO = 10.0


def outlying_updates(deltas: dict[int, dict[str, torch.Tensor]]) -> dict[int, str]:
    """Clients whose delta is over :data:`MAX_NORM_RATIO` x the median's length.

    Parameters
    ----------
    deltas : dict[int, AdapterState]
        Client id -> its update minus the global adapter.

    Returns
    -------
    dict[int, str]
        Client id -> why it is rejected (empty with fewer than three updates or
        a zero median).
    """
    if len(deltas) < 3:
        return {}
    norms = {c: float(ad.flatten(d).norm()) for c, d in deltas.items()}
    median = statistics.median(norms.values())
    if median <= 0:
        return {}
    return {
        c: (
            f"update norm {n:.4g} is more than {MAX_NORM_RATIO:g} x the round's "
            f"median {median:.4g}"
        )
        for c, n in norms.items()
        if n > MAX_NORM_RATIO * median
    }


#: ``strategy`` key -> Flower's class.
FLOWER_STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedavgm": FedAvgM,
}
assert tuple(FLOWER_STRATEGIES) == STRATEGIES


def strategy_options(cfg: ResolvedConfig) -> dict[str, float]:
    """Return the Flower constructor arguments of the run's strategy.

    Parameters
    ----------
    cfg : ResolvedConfig
        The run (``strategy`` and its keys, :data:`fed_unlearn.config.STRATEGY_KEYS`).

    Returns
    -------
    dict[str, float]
        Keyword arguments of ``FLOWER_STRATEGIES[cfg.strategy]`` beyond the
        sampling ones (``eta_l`` is the clients' ``lr``: Flower only logs it).
    """
    name = cfg.strategy
    if name == "fedprox":
        return {"proximal_mu": cfg.proximal_mu}
    if name in ("fedadam", "fedyogi"):
        return {
            "eta": cfg.server_eta,
            "eta_l": float(cfg.lr),
            "beta_1": cfg.server_beta_1,
            "beta_2": cfg.server_beta_2,
            "tau": cfg.server_tau,
        }
    if name == "fedadagrad":
        return {"eta": cfg.server_eta, "eta_l": float(cfg.lr), "tau": cfg.server_tau}
    if name == "fedavgm":
        return {
            "server_learning_rate": cfg.server_lr,
            "server_momentum": cfg.server_momentum,
        }
    return {}


class HistoryMixin:
    """Validates updates and records history around a Flower strategy.

    Parameters
    ----------
    run : ConfigRecord
        The run record every message carries (``server.channel.run_record``).
    node_to_client : dict[int, int]
        Flower node id -> client id (partition id).
    exclude : Iterable[int]
        Clients never sampled (the departed ones, for the retrain oracle).
    history : HistoryStore
        Where rounds are recorded.
    seed : int
        Seed of client sampling.
    fraction : float
        Fraction of all clients sampled per round (default: 1.0).
    aggregation : str
        ``"fedavg"`` (Flower's factor-space FedAvg) or ``"product_svd"``.
    on_round : Callable[[int, dict[str, Any]], None], optional
        Called after each round with its figures (progress display).
    prototype_fn : Callable[[AdapterState], list[float]], optional
        Global adapter -> the dual prototype sent with it (required in, and only
        in, a dual-adapter run).
    **options : float
        The Flower strategy's own hyper-parameters (:func:`strategy_options`).

    Raises
    ------
    ValueError
        A dual-adapter run without ``prototype_fn``, or one with it otherwise.
    """

    def __init__(
        self,
        *,
        run: ConfigRecord,
        node_to_client: dict[int, int],
        exclude: Iterable[int],
        history: HistoryStore,
        seed: int,
        fraction: float = 1.0,
        aggregation: str = "fedavg",
        on_round: Callable[[int, dict[str, Any]], None] | None = None,
        prototype_fn: Callable[[dict[str, torch.Tensor]], list[float]] | None = None,
        **options: float,
    ) -> None:
        super().__init__(  # type: ignore[call-arg]
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=1,
            train_metrics_aggr_fn=sum_train_metrics,
            **options,
        )
        self.run = run
        self.node_to_client = dict(node_to_client)
        self.client_to_node = {c: n for n, c in node_to_client.items()}
        self.exclude = set(exclude)
        self.history = history
        self.seed = seed
        self.fraction = fraction
        self.aggregation = aggregation
        self.on_round = on_round
        self._global: dict[str, torch.Tensor] = {}
        self._chosen: list[int] = []  # this round's clients (configure_train)
        self.dual = bool(run.get("dual-adapter", False))
        if self.dual != (prototype_fn is not None):
            raise ValueError(
                "a dual-adapter run needs the server's prototype_fn"
                if self.dual
                else "prototype_fn is for dual-adapter runs only"
            )
        self.prototype_fn = prototype_fn
        #: The prototype of the last train request (dual-adapter runs).
        self.prototype: list[float] | None = None
        self.round_log: list[dict[str, Any]] = []

    def summary(self) -> None:
        """Log the settings (as Flower strategies do)."""
        super().summary()  # type: ignore[misc]
        log.info(
            "\t├──> %s: aggregation=%s, excluded clients=%s, history=%s",
            type(self).__name__,
            self.aggregation,
            sorted(self.exclude),
            self.history.root,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any
    ) -> Iterable[Message]:
        """Send this round's clients a ``train`` request with the global adapter.

        Raises
        ------
        ValueError
            A non-empty Flower train ``config``: every field of a round is one
            of :class:`~fed_unlearn.protocol.TrainRequest`'s.
        """
        if len(config):
            raise ValueError(
                f"HistoryFedAvg sends typed train requests; got a train config "
                f"with keys {sorted(config)}"
            )
        n = len(self.node_to_client)
        chosen = [
            c
            for c in sample_clients(self.seed, server_round, n, self.fraction)
            if c not in self.exclude
        ]
        self._chosen = chosen
        self._global = {k: v.clone() for k, v in arrays.to_torch_state_dict().items()}
        flower = self._flower_round_config(server_round, arrays, grid)
        if self.prototype_fn is not None:
            # from public probes and the adapter every client receives anyway
            self.prototype = self.prototype_fn(self._global)
        request = TrainRequest(
            self._global,
            server_round=server_round,
            dual_prototype=self.prototype,
            proximal_mu=float(flower.get("proximal-mu", 0.0)),
        )
        record = encode_request(request, self.run)
        return self._construct_messages(  # type: ignore[attr-defined]
            record, [self.client_to_node[c] for c in chosen], MessageType.TRAIN
        )

    def _flower_round_config(
        self, server_round: int, arrays: ArrayRecord, grid: Any
    ) -> ConfigRecord:
        """Run the Flower class's ``configure_train`` for what it records.

        FedAdam & co. keep the arrays they send (their server step needs them),
        FedProx writes ``proximal-mu`` into the round's config. With
        ``fraction_train`` at 0 Flower's FedAvg samples no node and sends
        nothing, so only those records happen; the config is returned.
        """
        config = ConfigRecord()
        saved, self.fraction_train = self.fraction_train, 0.0
        try:
            super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]
        finally:
            self.fraction_train = saved
        return config

    def _check_reply(self, msg: Message) -> tuple[int, dict[str, torch.Tensor], int]:
        node = msg.metadata.src_node_id
        if node not in self.node_to_client:
            raise ValueError(f"reply from unknown node {node}")
        cid = self.node_to_client[node]
        if msg.has_error():
            raise ValueError(f"client error: {msg.error.reason}")
        if "arrays" not in msg.content or "metrics" not in msg.content:
            raise ValueError("reply lacks 'arrays' or 'metrics'")
        reply = decode_reply("train", msg)
        assert isinstance(reply, TrainReply)
        n = reply.num_examples
        if n <= 0:
            raise ValueError(f"bad num-examples {n!r}")
        if reply.client_id != cid:
            raise ValueError(
                f"reported client-id {reply.client_id} != node's client {cid}"
            )
        ad.validate_update(reply.adapter, self._global)
        return cid, reply.adapter, n

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Reject bad updates, aggregate the good ones, record the round."""
        good: list[tuple[int, Message, dict[str, torch.Tensor], int]] = []
        rejected: dict[int, str] = {}
        for msg in replies:
            try:
                cid, state, n = self._check_reply(msg)
            except ValueError as exc:
                node = msg.metadata.src_node_id
                if node not in self.node_to_client:  # nobody's: not recorded
                    log.warning("round %d: dropped a reply: %s", server_round, exc)
                    continue
                cid = self.node_to_client[node]
                rejected[cid] = str(exc)
                log.warning(
                    "round %d: rejected the update of client %s: %s",
                    server_round,
                    cid,
                    exc,
                )
                continue
            good.append((cid, msg, state, n))
        answered = {g[0] for g in good} | set(rejected)
        for cid in self._chosen:
            if cid not in answered:  # Flower's round timeout passed without it
                rejected[cid] = "no reply within the round's timeout"
                log.warning("round %d: client %s did not reply", server_round, cid)
        good.sort(key=lambda g: g[0])
        for cid, why in outlying_updates(
            {g[0]: ad.sub(g[2], self._global) for g in good}
        ).items():
            rejected[cid] = why
            log.warning(
                "round %d: rejected the update of client %s: %s",
                server_round,
                cid,
                why,
            )
        good = [g for g in good if g[0] not in rejected]
        if not good:
            log.warning(
                "round %d: no valid update; the global adapter is unchanged",
                server_round,
            )
            arrays, metrics = None, None
        elif self.aggregation == "fedavg":
            # Flower's aggregate, and the server optimiser step of FedAdam & co.
            arrays, metrics = super().aggregate_train(  # type: ignore[misc]
                server_round, [g[1] for g in good]
            )
        else:
            new = product_space_aggregate(
                [g[2] for g in good], [float(g[3]) for g in good]
            )
            arrays = ArrayRecord(new)
            metrics = sum_train_metrics(
                [g[1].content for g in good],
                self.weighted_by_key,  # type: ignore[attr-defined]
            )
        rec = RoundRecord(
            round=server_round,
            global_state=self._global,
            client_deltas={
                cid: ad.sub(state, self._global) for cid, _, state, _ in good
            },
            num_examples={cid: n for cid, _, _, n in good},
            participants=[g[0] for g in good],
            rejected=rejected,
        )
        nbytes = self.history.append(rec)
        info = {
            "round": server_round,
            "participants": rec.participants,
            "rejected": rejected,
            "history-bytes": nbytes,
            **(dict(dict(metrics).items()) if metrics is not None else {}),
        }
        self.round_log.append(info)
        if self.on_round is not None:
            self.on_round(server_round, info)
        return arrays, metrics


class HistoryFedAvg(HistoryMixin, FedAvg):
    """Flower's FedAvg over LoRA adapters, validating and recording updates."""


def history_strategy(cfg: ResolvedConfig, **kwargs: Any) -> HistoryMixin:
    """Return the run's Flower strategy wrapped by :class:`HistoryMixin`.

    Parameters
    ----------
    cfg : ResolvedConfig
        The run; ``strategy`` picks the Flower class, :func:`strategy_options`
        its hyper-parameters, and ``aggregation`` / ``fraction-train`` / ``seed``
        are passed on.
    **kwargs : Any
        :class:`HistoryMixin`'s other arguments (``run``, ``node_to_client``,
        ``exclude``, ``history``, ``on_round``).

    Returns
    -------
    HistoryMixin
        ``HistoryFedAvg``, or ``History<FlowerClass>`` for another strategy.
    """
    base = FLOWER_STRATEGIES[cfg.strategy]
    cls = (
        HistoryFedAvg
        if base is FedAvg
        else type(f"History{base.__name__}", (HistoryMixin, base), {})
    )
    return cls(
        seed=cfg.seed,
        fraction=cfg.fraction_train,
        aggregation=cfg.aggregation,
        **kwargs,
        **strategy_options(cfg),
    )


def replay_server_steps(
    cfg: ResolvedConfig,
    start: dict[str, torch.Tensor],
    steps: list[dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Run the run's Flower strategy on given FedAvg steps, from ``start``.

    Round t tells a fresh instance of the strategy (same hyper-parameters) the
    current adapter θ, through its own ``configure_train`` (node sampling off),
    and hands its ``aggregate_train`` one reply θ + ``steps[t]`` of weight 1:
    Flower's FedAvg of it is θ + ``steps[t]``, and the server optimiser's step
    on that is the strategy's own (FedAdam's moments carry over the rounds).
    Under ``fedavg`` and ``fedprox`` the result is ``start + Σ steps``.

    Parameters
    ----------
    cfg : ResolvedConfig
        The run (``strategy`` and its hyper-parameters).
    start : dict[str, torch.Tensor]
        θ_0, the adapter round 1 was sent.
    steps : list[dict[str, torch.Tensor]]
        Per round, the FedAvg average of the client deltas to feed in.

    Returns
    -------
    dict[str, torch.Tensor]
        The adapter after the last round (fp32).
    """
    base = FLOWER_STRATEGIES[cfg.strategy]
    strategy = base(**strategy_options(cfg))  # type: ignore[arg-type]
    strategy.fraction_train = 0.0  # configure_train samples and sends nothing
    theta = {k: v.float().clone() for k, v in start.items()}
    for t, step in enumerate(steps, 1):
        arrays = ArrayRecord(theta)
        strategy.configure_train(t, arrays, ConfigRecord(), grid=None)  # type: ignore[arg-type]
        reply = Message(
            content=RecordDict(
                {
                    "arrays": ArrayRecord(ad.add(theta, step)),
                    "metrics": MetricRecord({"num-examples": 1}),
                }
            ),
            # a reply's metadata, with no Flower run around it
            metadata=Metadata(
                run_id=0,
                message_id="",
                src_node_id=1,
                dst_node_id=0,
                reply_to_message_id="",
                group_id=str(t),
                created_at=0.0,
                ttl=DEFAULT_TTL,
                message_type=MessageType.TRAIN,
            ),
        )
        new, _ = strategy.aggregate_train(t, [reply])
        if new is None:
            raise RuntimeError(f"{cfg.strategy} replay: round {t} gave no adapter")
        theta = {k: v.float().clone() for k, v in new.to_torch_state_dict().items()}
    return theta
