"""A Grid wrapper that counts the bytes every Flower message carries."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Message


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

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def snapshot(self) -> tuple[int, int]:
        """Return ``(bytes_down, bytes_up)`` so far."""
        return self.bytes_down, self.bytes_up

    def _count_out(self, messages: Iterable[Message]) -> list[Message]:
        msgs = list(messages)
        self.bytes_down += sum(message_nbytes(m) for m in msgs)
        self.messages += len(msgs)
        return msgs

    def _count_in(self, replies: Iterable[Message]) -> list[Message]:
        got = list(replies)
        self.bytes_up += sum(message_nbytes(m) for m in got)
        return got

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Send messages, wait for replies, count both directions."""
        return self._count_in(
            self._grid.send_and_receive(self._count_out(messages), timeout=timeout)
        )

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push messages (counted)."""
        return self._grid.push_messages(self._count_out(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Pull replies (counted)."""
        return self._count_in(self._grid.pull_messages(message_ids))
