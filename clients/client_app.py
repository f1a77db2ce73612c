"""Flower ClientApp: local LoRA training, local evaluation, method-specific queries.

Only adapter tensors, scalar metrics and configs leave the client: no text, no
tokens, no per-example gradients. Every handler rebuilds the run config from the
message (the server is the single source of truth) and reads its private data
locally (:mod:`clients.task`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.task import client_id, client_items, client_model, run_config_from_message
from fed_unlearn.config import RunConfig
from fed_unlearn.data.qa import collate, encode_qa
from fed_unlearn.models import get_adapter, set_adapter
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


def _reply(
    msg: Message, arrays: dict[str, torch.Tensor] | None, metrics: dict[str, Any]
) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = ArrayRecord(arrays)
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global adapter on this client's private items."""
    cfg = run_config_from_message(msg.content["config"])
    server_round = int(msg.content["config"]["server-round"])
    cid = client_id(context.node_config)
    items = client_items(cfg, context.node_config)
    model, tok, prompt_fn = client_model(cfg)
    set_adapter(model, msg.content["arrays"].to_torch_state_dict())
    stats = local_train(
        model,
        tok,
        prompt_fn,
        items,
        cfg.train_spec(),
        seed=derive_seed(cfg.seed, server_round, cid),
    )
    log.info(
        "client %d round %d: %d steps, loss %.4f, %.0f tok/s",
        cid,
        server_round,
        stats.steps,
        stats.loss,
        stats.tokens / max(stats.seconds, 1e-9),
    )
    return _reply(
        msg,
        get_adapter(model),
        {
            "num-examples": len(items),
            "client-id": cid,
            "train-loss": stats.loss,
            "local-steps": stats.steps,
            "tokens": stats.tokens,
            "train-seconds": stats.seconds,
        },
    )


@torch.no_grad()
def local_answer_prob(
    model: Any,
    tok: Any,
    prompt_fn: Any,
    items: list,
    max_length: int,
    batch_size: int = 16,
) -> float:
    """Mean per-token answer probability ``exp(-avg NLL)`` over local items."""
    from fed_unlearn.metrics.primitives import avg_loss

    model.eval()
    probs: list[float] = []
    for s in range(0, len(items), batch_size):
        enc = [
            encode_qa(tok, prompt_fn(it.question), it.answer, max_length)
            for it in items[s : s + batch_size]
        ]
        batch = collate(enc, int(tok.pad_token_id))
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
        probs.extend(torch.exp(-avg_loss(logits, batch["labels"])).tolist())
    return float(sum(probs) / len(probs))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation: answer probability of the adapter on local items."""
    cfg = run_config_from_message(msg.content["config"])
    cid = client_id(context.node_config)
    items = client_items(cfg, context.node_config)
    model, tok, prompt_fn = client_model(cfg)
    set_adapter(model, msg.content["arrays"].to_torch_state_dict())
    t0 = time.perf_counter()
    prob = local_answer_prob(
        model, tok, prompt_fn, items, int(cfg.resolved().max_length)
    )
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
    return None, {
        "client-id": client_id(context.node_config),
        "num-examples": len(items),
    }


QUERY_HANDLERS["hello"] = _hello


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
