"""Flower ClientApp: local LoRA training, local evaluation, method-specific queries.

Only adapter tensors, scalar metrics and configs leave the client: no text, no
tokens, no per-example gradients. Every handler rebuilds the run config from the
message (the server is the single source of truth) and reads its private data
locally (:mod:`clients.task`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.task import (
    client_audit_items,
    client_id,
    client_items,
    client_model,
    run_config_from_message,
)
from clients.unlearn import local_update
from fed_unlearn.config import RunConfig
from fed_unlearn.dual import DualRegulariser
from fed_unlearn.metrics.quick import answer_prob
from fed_unlearn.models import get_adapter, set_adapter
from fed_unlearn.privacy import ClientPolicy, examples_behind
from fed_unlearn.training import derive_seed, local_train

log = logging.getLogger(__name__)
app = ClientApp()

#: Query kinds -> handler(msg, context, cfg) -> (arrays | None, metrics). Methods
#: that need client cooperation register their handlers here.
QUERY_HANDLERS: dict[
    str,
    Callable[
        [Message, Context, RunConfig],
        tuple[dict[str, torch.Tensor] | None, dict[str, Any]],
    ],
] = {}


def _floor(context: Context, what: str, examples: int) -> None:
    """Refuse ``what`` below this node's privacy floor (:mod:`fed_unlearn.privacy`)."""
    ClientPolicy.from_node_config(context.node_config).check(what, examples)


def _reply(
    msg: Message, arrays: dict[str, torch.Tensor] | None, metrics: dict[str, Any]
) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = ArrayRecord(arrays)
    return Message(content=content, reply_to=msg)


@contextlib.contextmanager
def local_steps_bar(
    label: str, total: int
) -> Iterator[Callable[[int, float], None] | None]:
    """Rich progress bar of local steps when the client has a terminal.

    SuperNodes started in a terminal show it; Ray simulation actors have no
    terminal and log one summary line per round instead.
    """
    if not sys.stdout.isatty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[loss]}"),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=total, loss="")
        yield lambda step, loss: bar.update(
            task, completed=step, loss=f"loss {loss:.3f}"
        )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global adapter on this client's private items."""
    cfg = run_config_from_message(msg.content["config"])
    server_round = int(msg.content["config"]["server-round"])
    cid = client_id(context.node_config)
    items = client_items(cfg, context.node_config)
    spec = cfg.train_spec()
    _floor(
        context,
        f"FL training in round {server_round}",
        examples_behind(len(items), spec.epochs, spec.batch_size, spec.max_steps),
    )
    model, tok, prompt_fn = client_model(cfg)
    set_adapter(model, msg.content["arrays"].to_torch_state_dict())
    total = spec.epochs * -(-len(items) // spec.batch_size)
    dual = cfg.dual_spec()
    reg = None
    if dual is not None:
        proto = msg.content["config"].get("dual-prototype")
        reg = DualRegulariser(
            model, dual, None if proto is None else torch.tensor(list(proto))
        )
    with (
        local_steps_bar(f"client {cid} round {server_round}", total) as on_step,
        reg if reg is not None else contextlib.nullcontext(),
    ):
        stats = local_train(
            model,
            tok,
            prompt_fn,
            items,
            spec,
            seed=derive_seed(cfg.seed, server_round, cid),
            on_step=on_step,
            regulariser=reg,
        )
    log.info(
        "client %d round %d: %d steps, loss %.4f, %.0f tok/s",
        cid,
        server_round,
        stats.steps,
        stats.loss,
        stats.tokens / max(stats.seconds, 1e-9),
    )
    metrics: dict[str, Any] = {
        "num-examples": len(items),
        "client-id": cid,
        "train-loss": stats.loss,
        "local-steps": stats.steps,
        "tokens": stats.tokens,
        "train-seconds": stats.seconds,
    }
    if reg is not None:
        # one aggregate vector of the client's data (FOUL-LoRA's K prototype)
        metrics["dual-prototype"] = reg.client_prototype()
        metrics["dual-loss-k"] = reg.last["loss_k"]
        metrics["dual-loss-v"] = reg.last["loss_v"]
    return _reply(msg, get_adapter(model), metrics)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation: answer probability of the adapter on local items."""
    cfg = run_config_from_message(msg.content["config"])
    cid = client_id(context.node_config)
    items = client_items(cfg, context.node_config)
    _floor(context, "federated evaluation", len(items))
    model, tok, prompt_fn = client_model(cfg)
    set_adapter(model, msg.content["arrays"].to_torch_state_dict())
    t0 = time.perf_counter()
    prob = answer_prob(model, tok, prompt_fn, items, int(cfg.resolved().max_length))
    return _reply(
        msg,
        None,
        {
            "num-examples": len(items),
            "client-id": cid,
            "Q_A_Prob": prob,
            "eval-seconds": time.perf_counter() - t0,
        },
    )


def _hello(
    msg: Message, context: Context, cfg: RunConfig
) -> tuple[None, dict[str, Any]]:
    items = client_items(cfg, context.node_config)
    # A node is ready when its model is loaded: the cold start then falls in the
    # discovery, not in the first round of whichever phase runs next (FL,
    # retrain or unlearning), so their wall times compare like with like.
    client_model(cfg)
    return None, {
        "client-id": client_id(context.node_config),
        "num-examples": len(items),
    }


def _audit(
    msg: Message, context: Context, cfg: RunConfig
) -> tuple[None, dict[str, Any]]:
    """Self-audit: the gap in mean answer probability, trained vs never-trained.

    Only that scalar (and the number of trained items, the FedAvg weight that
    every update carries anyway) leaves the client (:mod:`fed_unlearn.data.audit`).
    """
    trained = client_items(cfg, context.node_config)
    held = client_audit_items(cfg, context.node_config)
    if not held or not trained:
        raise ValueError(
            "self-audit: this client kept no items out of FL training "
            f"(audit-fraction={cfg.audit_fraction}, {len(trained)} trained items)"
        )
    _floor(context, "the self-audit", min(len(trained), len(held)))
    model, tok, prompt_fn = client_model(cfg)
    set_adapter(model, msg.content["arrays"].to_torch_state_dict())
    length = int(cfg.resolved().max_length)
    gap = answer_prob(model, tok, prompt_fn, trained, length) - answer_prob(
        model, tok, prompt_fn, held, length
    )
    return None, {"audit-gap": float(gap), "num-examples": len(trained)}


QUERY_HANDLERS["hello"] = _hello
QUERY_HANDLERS["audit"] = _audit
QUERY_HANDLERS["local-update"] = local_update


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Dispatch a method-specific request (``config['kind']``) to its handler."""
    config = msg.content["config"]
    kind = str(config.get("kind", ""))
    if kind not in QUERY_HANDLERS:
        raise ValueError(
            f"unknown query kind {kind!r}; known: {sorted(QUERY_HANDLERS)}"
        )
    cfg = run_config_from_message(config)
    arrays, metrics = QUERY_HANDLERS[kind](msg, context, cfg)
    return _reply(msg, arrays, metrics)
