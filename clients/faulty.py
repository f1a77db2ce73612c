"""A misbehaving ClientApp for robustness tests of the server.

It runs the real :mod:`clients.client_app` handlers and then corrupts the update of
one client, chosen by the run config keys ``x-fault-client`` (client id) and
``x-fault-kind`` (``nan`` | ``shape`` | ``keys`` | ``num-examples``), which the
run record carries (``RunConfig.extra``). Use it to check
that the server rejects and logs the bad update and that the round goes on:
``simulations.runner.simulate(cfg, steps, client_app=clients.faulty.app)``.

``x-fault-kind = "leave"`` instead makes that client stop cooperating halfway:
it trains normally in FL and answers its first ``x-fault-after`` (default 1)
``local-update`` queries, then fails every later one (a departed client that
leaves in the middle of its unlearning).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from clients import client_app as real
from clients.wire import decode_request

app = ClientApp()


def corrupt(msg: Message, reply: Message, kind: str) -> Message:
    """Return ``reply`` with its update corrupted in the way ``kind`` names."""
    state = reply.content["arrays"].to_torch_state_dict()
    metrics = dict(reply.content["metrics"])
    first = sorted(state)[0]
    if kind == "nan":
        state[first] = state[first].clone()
        state[first].view(-1)[0] = float("nan")
    elif kind == "shape":
        state[first] = torch.zeros(state[first].shape[0] + 1, *state[first].shape[1:])
    elif kind == "keys":
        state["intruder.lora_A.weight"] = torch.zeros(2, 2)
    elif kind == "num-examples":
        metrics["num-examples"] = 0
    else:
        raise ValueError(f"unknown x-fault-kind {kind!r}")
    reply.content["arrays"] = ArrayRecord(state)
    reply.content["metrics"] = MetricRecord(metrics)
    return reply


#: ``context.state`` key of the ``local-update`` queries a leaving client answered
_ANSWERED = "x-fault-answered"


def _leaves(msg: Message, context: Context) -> bool:
    """Whether this is the leaving client's query it no longer answers."""
    request, cfg = decode_request(msg)
    me = int(context.node_config["partition-id"])
    if (
        str(cfg.extra.get("x-fault-kind", "")) != "leave"
        or int(cfg.extra.get("x-fault-client", -1)) != me
        or request.kind != "local-update"
    ):
        return False
    rec = context.state.get(_ANSWERED)
    answered = int(rec["n"]) if isinstance(rec, ConfigRecord) else 0
    if answered >= int(cfg.extra.get("x-fault-after", 1)):
        return True
    context.state[_ANSWERED] = ConfigRecord({"n": answered + 1})
    return False


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Real training, then corruption for the configured client."""
    reply = real.train(msg, context)
    _, cfg = decode_request(msg)
    kind = str(cfg.extra.get("x-fault-kind", "nan"))
    if kind != "leave" and int(cfg.extra.get("x-fault-client", -1)) == int(
        context.node_config["partition-id"]
    ):
        return corrupt(msg, reply, kind)
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Unchanged evaluation."""
    return real.evaluate(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Unchanged queries, but the leaving client's fail (``x-fault-kind=leave``)."""
    if _leaves(msg, context):
        raise RuntimeError("x-fault: this client has left the federation")
    return real.query(msg, context)
