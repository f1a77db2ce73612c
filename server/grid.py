"""A Grid wrapper that counts the bytes every Flower message carries.

With ``$FED_UNLEARN_WIRE_AUDIT`` set to a file, it also appends one JSON line per
message to that file: direction, message type, and per record its keys with the
value types (array dtypes and shapes, list lengths), so that a test can check
what crossed the wire (``tests/test_methods_e2e.py``). Config strings are kept;
no tensor value is.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Error, Message
from flwr.common.constant import SUPERLINK_NODE_ID

AUDIT_ENV = "FED_UNLEARN_WIRE_AUDIT"


def describe(msg: Message, direction: str) -> dict[str, Any]:
    """Describe what a message carries, without tensor values (one audit line).

    Parameters
    ----------
    msg : Message
        A Flower message.
    direction : str
        ``"down"`` (server to client) or ``"up"``.

    Returns
    -------
    dict[str, Any]
        ``direction``, ``type``, ``error`` and per record name its entries:
        arrays as ``[dtype, shape]``, metrics and configs as
        ``[type, value-or-length]`` (strings and scalars of configs kept).
    """
    out: dict[str, Any] = {
        "direction": direction,
        "type": str(msg.metadata.message_type),
        "error": msg.has_error(),
        "records": {},
    }
    if not msg.has_content():
        return out
    content = msg.content
    for name, rec in content.array_records.items():
        out["records"][name] = {
            "kind": "arrays",
            "entries": {k: [a.dtype, list(a.shape)] for k, a in rec.items()},
        }
    for kind, records in (
        ("config", content.config_records),
        ("metrics", content.metric_records),
    ):
        for name, rec in records.items():
            entries = {}
            for k, v in rec.items():
                if isinstance(v, list):
                    entries[k] = ["list", len(v), sorted({type(x).__name__ for x in v})]
                elif isinstance(v, bytes):
                    entries[k] = ["bytes", len(v)]
                else:
                    entries[k] = [type(v).__name__, v if kind == "config" else None]
            out["records"][name] = {"kind": kind, "entries": entries}
    return out


def record_nbytes(content: Any) -> int:
    """Bytes of a message's RecordDict: raw array bytes plus serialised records.

    Parameters
    ----------
    content : flwr.app.RecordDict
        Message content.

    Returns
    -------
    int
        Payload size in bytes.
    """
    total = 0
    for rec in content.array_records.values():
        total += sum(len(arr.data) for arr in rec.values())
    for rec in list(content.config_records.values()) + list(
        content.metric_records.values()
    ):
        total += len(rec.deflate())
    return total


def message_nbytes(msg: Message) -> int:
    """Payload bytes of one message (0 for an error reply without content)."""
    return record_nbytes(msg.content) if msg.has_content() else 0


class CountingGrid:
    """Delegate to a Flower ``Grid`` and count bytes sent to / received from nodes.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        The real grid.

    Attributes
    ----------
    bytes_down, bytes_up : int
        Payload bytes server -> clients and clients -> server.
    messages : int
        Messages sent.
    """

    def __init__(self, grid: Any) -> None:
        self._grid = grid
        self.bytes_down = 0
        self.bytes_up = 0
        self.messages = 0
        self._pushed: dict[str, int] = {}  # pushed, not yet answered: id -> node

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def snapshot(self) -> tuple[int, int]:
        """Return ``(bytes_down, bytes_up)`` so far."""
        return self.bytes_down, self.bytes_up

    def _count_out(self, messages: Iterable[Message]) -> list[Message]:
        msgs = list(messages)
        self.bytes_down += sum(message_nbytes(m) for m in msgs)
        self.messages += len(msgs)
        _audit(msgs, "down")
        return msgs

    def _count_in(
        self, replies: Iterable[Message], asked: Mapping[str, int]
    ) -> list[Message]:
        got = list(replies)
        self.bytes_up += sum(message_nbytes(m) for m in got)
        _audit(got, "up")
        return attribute_replies(got, asked)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Send messages, wait for replies, count both directions."""
        msgs = self._count_out(messages)
        replies = self._grid.send_and_receive(msgs, timeout=timeout)
        return self._count_in(replies, destinations(msgs))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push messages (counted)."""
        msgs = self._count_out(messages)
        ids = list(self._grid.push_messages(msgs))
        self._pushed.update(destinations(msgs))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Pull replies (counted)."""
        replies = self._count_in(self._grid.pull_messages(message_ids), self._pushed)
        for rep in replies:  # answered: its destination is no longer needed
            self._pushed.pop(rep.metadata.reply_to_message_id, None)
        return replies


def destinations(messages: Iterable[Message]) -> dict[str, int]:
    """Message id -> destination node of sent messages (ids set by the push)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in messages}


def attribute_replies(
    replies: Iterable[Message], asked: Mapping[str, int]
) -> list[Message]:
    """Give the SuperLink's error replies for a lost node that node's id.

    When a SuperNode stops sending heartbeats (killed, cut off), the SuperLink
    answers the messages it still holds for it with a ``NODE_UNAVAILABLE`` error
    whose source is the SuperLink itself, not the node. Replaced here by the
    same error from that node (the destination of the message it answers), with
    the node named in the reason: every consumer (the strategy, the channel,
    discovery, the federated evaluation) then knows whose reply failed.

    Parameters
    ----------
    replies : Iterable[Message]
        Replies as the grid returned them.
    asked : Mapping[str, int]
        Id of each message they answer -> its destination node
        (:func:`destinations`).

    Returns
    -------
    list[Message]
        The replies, in order, with those errors re-attributed.
    """
    out = []
    for rep in replies:
        node = asked.get(rep.metadata.reply_to_message_id)
        if (
            rep.metadata.src_node_id == SUPERLINK_NODE_ID
            and rep.has_error()
            and node is not None
        ):
            why = f"the SuperLink answered for node {node}: {rep.error.reason}"
            meta = copy.copy(rep.metadata)
            # Metadata has no setter for its source; Flower sets ids so itself
            meta.__dict__["_src_node_id"] = node
            rep = Message(error=Error(rep.error.code, why), metadata=meta)
        out.append(rep)
    return out


def _audit(msgs: list[Message], direction: str) -> None:
    path = os.environ.get(AUDIT_ENV)
    if not path or not msgs:
        return
    with open(path, "a", encoding="utf-8") as f:
        for m in msgs:
            f.write(json.dumps(describe(m, direction), default=str) + "\n")
