"""The client's half of the protocol (:mod:`fed_unlearn.protocol`) over Flower.

:func:`decode_request` and :func:`encode_reply` are the only client code that
reads a message's records or builds a reply's: every handler of
:mod:`clients.client_app` gets a typed request and the run config, and returns a
typed reply.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fed_unlearn.config import ResolvedConfig
from fed_unlearn.protocol import ProtocolError, Reply, Request, decode_run
from fed_unlearn.protocol import decode_request as decode_request_fields


def decode_request(msg: Message) -> tuple[Request, ResolvedConfig]:
    """Decode a message from the server into its typed request and run config.

    Parameters
    ----------
    msg : Message
        The request (its ``config``, ``run`` and optional ``arrays`` records).

    Returns
    -------
    tuple[Request, ResolvedConfig]
        The request and the validated run configuration, resolved: the one
        place on the client where preset values are filled in.

    Raises
    ------
    ProtocolError
        A missing record, or what the protocol refuses (naming key and kind).
    fed_unlearn.config.ConfigError
        A bad run config.
    """
    content = msg.content
    for name in ("config", "run"):
        if name not in content:
            raise ProtocolError(f"the message has no {name!r} record")
    arrays = content["arrays"].to_torch_state_dict() if "arrays" in content else None
    request = decode_request_fields(dict(content["config"]), arrays)
    return request, decode_run(dict(content["run"])).resolved(method_defaults=False)


def encode_reply(msg: Message, reply: Reply) -> Message:
    """Encode a typed reply to ``msg``.

    Parameters
    ----------
    msg : Message
        The request answered.
    reply : Reply
        The typed reply.

    Returns
    -------
    Message
        ``metrics`` (the reply's fields) and, where it returns tensors,
        ``arrays``.
    """
    fields, arrays = reply.to_fields()
    content = RecordDict({"metrics": MetricRecord(fields)})  # type: ignore[arg-type]
    if arrays is not None:
        content["arrays"] = ArrayRecord(arrays)
    return Message(content=content, reply_to=msg)
