"""The server's half of the protocol (:mod:`fed_unlearn.protocol`) over Flower.

:func:`encode_request` and :func:`decode_reply` are the only server code that
turns typed requests into Flower records and replies back into typed replies;
the discovery, the FL rounds (``server.strategy``), the federated evaluation and
the methods' :class:`FlowerChannel` all go through them. A message's content is
``config`` (the request's fields and ``kind``), ``run`` (the run config the
client needs, :func:`~fed_unlearn.protocol.encode_run`) and ``arrays`` where the
kind carries tensors. A client that fails or answers with a reply the protocol
refuses raises :class:`ChannelError` naming the client; nothing is half-applied.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, overload

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fed_unlearn.config import AnyConfig, ResolvedConfig
from fed_unlearn.methods.base import ClientFailure
from fed_unlearn.protocol import (
    AttributionReply,
    AttributionRequest,
    AuditReply,
    AuditRequest,
    LayerGramReply,
    LayerGramRequest,
    LocalUpdateReply,
    LocalUpdateRequest,
    ProtocolError,
    Reply,
    Request,
    TokenAccuracyReply,
    TokenAccuracyRequest,
    encode_run,
)
from fed_unlearn.protocol import decode_reply as decode_reply_fields
from fed_unlearn.types import ClientId
from server.grid import CountingGrid

log = logging.getLogger(__name__)


def run_record(cfg: AnyConfig) -> ConfigRecord:
    """Return the ``run`` record every request carries.

    Parameters
    ----------
    cfg : RunConfig or ResolvedConfig
        The server's run configuration.

    Returns
    -------
    ConfigRecord
        :func:`~fed_unlearn.protocol.encode_run` of ``cfg``.
    """
    return ConfigRecord(encode_run(cfg))


def encode_request(request: Request, run: ConfigRecord) -> RecordDict:
    """Encode a typed request as a message's content.

    Parameters
    ----------
    request : Request
        Any request of :mod:`fed_unlearn.protocol`.
    run : ConfigRecord
        :func:`run_record` of the run.

    Returns
    -------
    RecordDict
        ``config``, ``run`` and, where the kind carries tensors, ``arrays``.
    """
    fields, arrays = request.to_fields()
    content = RecordDict({"config": ConfigRecord(fields), "run": run})
    if arrays is not None:
        content["arrays"] = ArrayRecord(
            {k: v.detach().contiguous() for k, v in arrays.items()}
        )
    return content


def decode_reply(kind: str, msg: Message) -> Reply:
    """Decode a client's reply to a request of ``kind`` (float tensors as fp32).

    Parameters
    ----------
    kind : str
        The request's kind.
    msg : Message
        The reply (not an error reply).

    Returns
    -------
    Reply
        The typed reply.

    Raises
    ------
    ProtocolError
        Records that cannot be decoded, or what the protocol refuses.
    """
    content = msg.content
    metrics = dict(content["metrics"]) if "metrics" in content else {}
    arrays = None
    if "arrays" in content:
        try:
            state = content["arrays"].to_torch_state_dict()
        except Exception as exc:  # noqa: BLE001 - any decoding failure is a bad reply
            raise ProtocolError(
                f"{kind} reply: arrays cannot be decoded: {exc}"
            ) from exc
        arrays = {
            k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in state.items()
        }
    return decode_reply_fields(kind, metrics, arrays)


class ChannelError(ClientFailure):
    """A client did not answer a request properly.

    ``replies`` holds the replies of the clients that did answer and ``failed``
    the reason of each that did not, so a method that can go on without a
    client (a recovery round) may.
    """


class FlowerChannel:
    """Send method requests to clients over a Flower grid.

    Parameters
    ----------
    grid : CountingGrid
        The (byte-counting) grid of the run.
    cfg : ResolvedConfig
        Run configuration (its :func:`run_record` travels with every request).
    node_map : dict[int, int]
        Flower node id -> client id.
    timeout : float
        Seconds to wait for replies.
    """

    def __init__(
        self,
        grid: CountingGrid,
        cfg: ResolvedConfig,
        node_map: dict[int, int],
        timeout: float = 3600.0,
    ) -> None:
        self.grid = grid
        self.run = run_record(cfg)
        self.node_of = {cid: node for node, cid in node_map.items()}
        self.timeout = timeout
        self.requests = 0

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

    def query(self, requests: Mapping[ClientId, Request]) -> dict[ClientId, Any]:
        """Send each client its request (one message each) and collect the replies.

        Parameters
        ----------
        requests : Mapping[ClientId, Request]
            Recipient -> its typed request, all of one kind (the same object
            for a broadcast: it is encoded once).

        Returns
        -------
        dict[ClientId, Reply]
            Per client: its typed reply.

        Raises
        ------
        ChannelError
            Unknown client, mixed kinds, a failed client, a reply the protocol
            refuses, or a reply for a client not asked.
        """
        clients = list(requests)
        unknown = [c for c in clients if c not in self.node_of]
        if unknown:
            raise ChannelError(
                f"client(s) {unknown} are not connected "
                f"(connected: {sorted(self.node_of)})"
            )
        kinds = sorted({r.kind for r in requests.values()})
        if len(kinds) != 1:
            raise ChannelError(f"one query is one kind of request, got {kinds}")
        kind = kinds[0]
        encoded: dict[int, RecordDict] = {}
        msgs = []
        for cid, request in requests.items():
            if id(request) not in encoded:
                encoded[id(request)] = encode_request(request, self.run)
            msgs.append(
                Message(
                    content=RecordDict(dict(encoded[id(request)].items())),
                    message_type=MessageType.QUERY,
                    dst_node_id=self.node_of[cid],
                )
            )
        self.requests += 1
        replies = self.grid.send_and_receive(msgs, timeout=self.timeout)
        client_of = {node: cid for cid, node in self.node_of.items()}
        out: dict[ClientId, Reply] = {}
        failed: dict[ClientId, str] = {}
        for rep in replies:
            cid = client_of.get(rep.metadata.src_node_id)
            if cid is None or cid not in requests:
                raise ChannelError(
                    f"reply to {kind!r} from node {rep.metadata.src_node_id}, "
                    "which was not asked"
                )
            if rep.has_error():
                failed[cid] = f"failed the {kind!r} request: {rep.error.reason}"
                continue
            try:
                out[cid] = decode_reply(kind, rep)
            except ProtocolError as exc:
                failed[cid] = str(exc)
        for c in clients:
            if c not in out and c not in failed:
                failed[c] = (
                    f"did not answer the {kind!r} request within {self.timeout:.0f} s"
                )
        if failed:
            raise ChannelError(
                "; ".join(f"client {c} {why}" for c, why in sorted(failed.items())),
                replies=out,
                failed=failed,
            )
        return out
