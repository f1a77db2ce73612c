"""``HistoryFedAvg``: Flower's Message-API FedAvg that validates and records updates.

Per round it stores the global adapter it sent, every accepted client's delta,
``num-examples`` and participation in a :class:`fed_unlearn.history.HistoryStore`.
A malformed update (wrong keys or shapes, NaN/Inf, missing ``num-examples``, a
client id that does not match the node) is rejected and logged, and the round goes
on without it. Client sampling is seeded per round over *all* clients and the
excluded ones are dropped afterwards, so the retrain oracle sees exactly the
original participation minus the departed clients.

In a dual-adapter run (FOUL-LoRA, :mod:`fed_unlearn.dual`) every client also
reports its K-only prototype (one vector, ``dual-prototype`` in its metrics); the
strategy broadcasts their ``num-examples``-weighted mean in the next round's
config. A missing, non-finite or wrongly sized prototype rejects the update.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Iterable
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg

from fed_unlearn import adapters as ad
from fed_unlearn.aggregation import product_space_aggregate
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


#: A global dual prototype is made of at least this many clients' prototypes:
#: the mean of two lets each client compute the other's exactly.
MIN_PROTOTYPE_CLIENTS = 3


def check_prototype(value: object, current: list[float] | None) -> None:
    """Validate a client's ``dual-prototype``: finite floats, the global's size.

    Raises
    ------
    ValueError
        Naming what is wrong.
    """
    if not isinstance(value, list) or not value:
        raise ValueError("dual-adapter run: the reply has no 'dual-prototype' list")
    if not all(isinstance(x, int | float) and math.isfinite(x) for x in value):
        raise ValueError("dual-prototype has a non-finite or non-numeric entry")
    if current is not None and len(value) != len(current):
        raise ValueError(
            f"dual-prototype has {len(value)} entries, the global one {len(current)}"
        )


def mean_prototype(protos: list[list[float]], weights: list[float]) -> list[float]:
    """Weighted mean of the clients' prototypes (equal sizes checked).

    Raises
    ------
    ValueError
        Prototypes of different sizes.
    """
    if len({len(p) for p in protos}) != 1:
        raise ValueError("the clients' dual-prototypes differ in size")
    t = torch.tensor(protos, dtype=torch.float64)
    w = torch.tensor(weights, dtype=torch.float64)
    return ((w[:, None] * t).sum(0) / w.sum()).tolist()


class HistoryFedAvg(FedAvg):
    """FedAvg over LoRA adapters that validates updates and records history.

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
    ) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=1,
            train_metrics_aggr_fn=sum_train_metrics,
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
        self.dual = bool(run.get("dual-adapter", False))
        self.prototype: list[float] | None = None
        self.round_log: list[dict[str, Any]] = []

    def summary(self) -> None:
        """Log the settings (as Flower strategies do)."""
        super().summary()
        log.info(
            "\t├──> HistoryFedAvg: aggregation=%s, excluded clients=%s, history=%s",
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
        self._global = {k: v.clone() for k, v in arrays.to_torch_state_dict().items()}
        request = TrainRequest(
            self._global, server_round=server_round, dual_prototype=self.prototype
        )
        record = encode_request(request, self.run)
        return self._construct_messages(
            record, [self.client_to_node[c] for c in chosen], MessageType.TRAIN
        )

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
        if self.dual:
            check_prototype(reply.dual_prototype, self.prototype)
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
                cid = self.node_to_client.get(msg.metadata.src_node_id, -1)
                rejected[cid] = str(exc)
                log.warning(
                    "round %d: rejected the update of client %s: %s",
                    server_round,
                    cid,
                    exc,
                )
                continue
            good.append((cid, msg, state, n))
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
            arrays, metrics = super().aggregate_train(
                server_round, [g[1] for g in good]
            )
        else:
            new = product_space_aggregate(
                [g[2] for g in good], [float(g[3]) for g in good]
            )
            arrays = ArrayRecord(new)
            metrics = sum_train_metrics(
                [g[1].content for g in good], self.weighted_by_key
            )
        if self.dual and len(good) >= MIN_PROTOTYPE_CLIENTS:
            self.prototype = mean_prototype(
                [list(g[1].content["metrics"]["dual-prototype"]) for g in good],
                [float(g[3]) for g in good],
            )
        elif self.dual and good:
            # from the mean of two, each client would recover the other's exact
            # prototype: keep the last one made of enough clients (or none)
            log.warning(
                "round %d: %d client prototype(s), fewer than %d; the global "
                "prototype is not updated",
                server_round,
                len(good),
                MIN_PROTOTYPE_CLIENTS,
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
