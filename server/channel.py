"""The :class:`~fed_unlearn.methods.ClientChannel` of a Flower run.

Methods talk to clients through ``query(clients, kind, arrays, config)``; here that
becomes one Flower ``QUERY`` message per client (counted by the grid wrapper), the
request's own keys travelling as ``q-<key>`` entries of the message's config
beside the run config, and the reply's ``arrays`` / ``metrics`` records coming
back. A client that fails or answers without the expected records raises
:class:`ChannelError` naming the client; nothing is half-applied.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fed_unlearn.config import RunConfig
from fed_unlearn.types import AdapterState, ClientId
from server.grid import CountingGrid

log = logging.getLogger(__name__)

#: Prefix of request keys inside a query message's config.
QUERY_PREFIX = "q-"


class ChannelError(RuntimeError):
    """A client did not answer a request properly."""


class FlowerChannel:
    """Send method requests to clients over a Flower grid.

    Parameters
    ----------
    grid : CountingGrid
        The (byte-counting) grid of the run.
    cfg : RunConfig
        Run configuration (sent with every request so clients rebuild it).
    node_map : dict[int, int]
        Flower node id -> client id.
    timeout : float
        Seconds to wait for replies.
    """

    def __init__(
        self,
        grid: CountingGrid,
        cfg: RunConfig,
        node_map: dict[int, int],
        timeout: float = 3600.0,
    ) -> None:
        self.grid = grid
        self.cfg = cfg
        self.node_of = {cid: node for node, cid in node_map.items()}
        self.timeout = timeout
        self.requests = 0

    def query(
        self,
        clients: Sequence[ClientId],
        kind: str,
        arrays: AdapterState | dict[ClientId, AdapterState] | None,
        config: dict[str, Any],
    ) -> dict[ClientId, tuple[AdapterState | None, dict[str, float]]]:
        """Send one request to each client and collect the replies.

        Parameters
        ----------
        clients : Sequence[ClientId]
            Recipients.
        kind : str
            Handler name on the client (``clients.client_app.QUERY_HANDLERS``).
        arrays : AdapterState or dict[ClientId, AdapterState], optional
            Tensors to send: the same to everyone, or one state per client.
        config : dict[str, Any]
            Request parameters (scalars or strings).

        Returns
        -------
        dict[ClientId, tuple[AdapterState | None, dict[str, float]]]
            Per client: returned tensors (or ``None``) and metrics.

        Raises
        ------
        ChannelError
            Unknown client, a failed client, or a reply for a client not asked.
        """
        unknown = [c for c in clients if c not in self.node_of]
        if unknown:
            raise ChannelError(
                f"client(s) {unknown} are not connected "
                f"(connected: {sorted(self.node_of)})"
            )
        base = {**self.cfg.to_flat(), "kind": kind}
        for key, value in config.items():
            base[f"{QUERY_PREFIX}{key}"] = value
        record_cfg = ConfigRecord(base)
        per_client = (
            isinstance(arrays, dict)
            and bool(arrays)
            and all(isinstance(k, int) for k in arrays)
        )
        msgs = []
        for cid in clients:
            content = RecordDict({"config": record_cfg})
            state = arrays.get(cid) if per_client else arrays  # type: ignore[union-attr]
            if state is not None:
                content["arrays"] = ArrayRecord(
                    {k: v.detach().contiguous() for k, v in state.items()}  # type: ignore[union-attr]
                )
            msgs.append(
                Message(
                    content=content,
                    message_type=MessageType.QUERY,
                    dst_node_id=self.node_of[cid],
                )
            )
        self.requests += 1
        replies = self.grid.send_and_receive(msgs, timeout=self.timeout)
        client_of = {node: cid for cid, node in self.node_of.items()}
        out: dict[ClientId, tuple[AdapterState | None, dict[str, float]]] = {}
        for rep in replies:
            cid = client_of.get(rep.metadata.src_node_id)
            if cid is None or cid not in clients:
                raise ChannelError(
                    f"reply to {kind!r} from node {rep.metadata.src_node_id}, "
                    "which was not asked"
                )
            if rep.has_error():
                raise ChannelError(
                    f"client {cid} failed the {kind!r} request: {rep.error.reason}"
                )
            content = rep.content
            metrics = dict(content["metrics"]) if "metrics" in content else {}
            got: AdapterState | None = None
            if "arrays" in content:
                got = {
                    k: v.float() if isinstance(v, torch.Tensor) else v
                    for k, v in content["arrays"].to_torch_state_dict().items()
                }
            out[cid] = (got, metrics)
        missing = [c for c in clients if c not in out]
        if missing:
            raise ChannelError(
                f"client(s) {missing} did not answer the {kind!r} request "
                f"within {self.timeout:.0f} s"
            )
        return out
