"""Flower ClientApp: local LoRA training, local evaluation, method-specific queries.

Only adapter tensors, scalar metrics and configs leave the client: no text, no
tokens, no per-example gradients (:mod:`fed_unlearn.protocol`). Every handler
gets its typed request and the run config the message carries (the server is
the single source of truth; :mod:`clients.wire` decodes both), reads its private
data locally (:mod:`clients.task`) and returns a typed reply.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.task import (
    client_audit_items,
    client_id,
    client_items,
    client_model,
    node_data_version,
    reads_node_data,
)
from clients.unlearn import layer_grams, local_update, neuron_attribution
from clients.wire import decode_request, encode_reply
from fed_unlearn.config import ResolvedConfig
from fed_unlearn.dual import DualRegulariser
from fed_unlearn.metrics.quick import answer_prob, token_accuracy
from fed_unlearn.models import get_adapter, set_adapter
from fed_unlearn.privacy import ClientPolicy, examples_behind
from fed_unlearn.protocol import (
    AuditReply,
    AuditRequest,
    EvaluateReply,
    EvaluateRequest,
    HelloReply,
    HelloRequest,
    ProtocolError,
    Reply,
    Request,
    TokenAccuracyReply,
    TokenAccuracyRequest,
    TrainReply,
    TrainRequest,
)
from fed_unlearn.training import (
    ProximalTerm,
    Regulariser,
    SumOfRegularisers,
    derive_seed,
    local_train,
)

log = logging.getLogger(__name__)
app = ClientApp()
R = TypeVar("R", bound=Request)

#: Query kinds -> handler(request, context, cfg) -> reply. Methods that need
#: client cooperation register their handlers here.
QUERY_HANDLERS: dict[str, Callable[[Any, Context, ResolvedConfig], Reply]] = {}


def _floor(context: Context, what: str, examples: int) -> None:
    """Refuse ``what`` below this node's privacy floor (:mod:`fed_unlearn.privacy`)."""
    ClientPolicy.from_node_config(context.node_config).check(what, examples)


def _decode(msg: Message, want: type[R]) -> tuple[R, ResolvedConfig]:
    """Decode ``msg``, refusing a request of another kind than the handler's."""
    request, cfg = decode_request(msg)
    if not isinstance(request, want):
        raise ProtocolError(
            f"this handler answers {getattr(want, 'kind', want)!r} requests, got "
            f"{request.kind!r}"
        )
    return request, cfg


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
    request, cfg = _decode(msg, TrainRequest)
    server_round = request.server_round
    cid = client_id(context.node_config)
    items = client_items(cfg, context.node_config)
    spec = cfg.train_spec()
    _floor(
        context,
        f"FL training in round {server_round}",
        examples_behind(len(items), spec.epochs, spec.batch_size, spec.max_steps),
    )
    model, tok, prompt_fn = client_model(cfg)
    set_adapter(model, request.adapter)
    total = spec.epochs * -(-len(items) // spec.batch_size)
    dual = cfg.dual_spec()
    reg = None
    if dual is not None:
        proto = request.dual_prototype
        reg = DualRegulariser(
            model, dual, None if proto is None else torch.tensor(proto)
        )
    terms: list[Regulariser] = [] if reg is None else [reg]
    if request.proximal_mu > 0:
        terms.append(ProximalTerm(model, request.proximal_mu))
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
            regulariser=(
                None
                if not terms
                else terms[0]
                if len(terms) == 1
                else SumOfRegularisers(*terms)
            ),
        )
    log.info(
        "client %d round %d: %d steps, loss %.4f, %.0f tok/s",
        cid,
        server_round,
        stats.steps,
        stats.loss,
        stats.tokens / max(stats.seconds, 1e-9),
    )
    dual_figures: dict[str, Any] = {}
    if reg is not None:
        # two scalars over all of the round's batches; no vector of the data
        losses = reg.mean_losses()
        dual_figures = {
            "dual_loss_k": losses["loss_k"],
            "dual_loss_v": losses["loss_v"],
        }
    reply = TrainReply(
        get_adapter(model),
        num_examples=len(items),
        client_id=cid,
        train_loss=stats.loss,
        local_steps=stats.steps,
        tokens=stats.tokens,
        train_seconds=stats.seconds,
        **dual_figures,
    )
    return encode_reply(msg, reply)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation: answer probability of the adapter on local items."""
    request, cfg = _decode(msg, EvaluateRequest)
    cid = client_id(context.node_config)
    items = client_items(cfg, context.node_config)
    _floor(context, "federated evaluation", len(items))
    model, tok, prompt_fn = client_model(cfg)
    set_adapter(model, request.adapter)
    t0 = time.perf_counter()
    prob = answer_prob(model, tok, prompt_fn, items, int(cfg.max_length))
    reply = EvaluateReply(
        q_a_prob=prob,
        eval_seconds=time.perf_counter() - t0,
        num_examples=len(items),
        client_id=cid,
    )
    return encode_reply(msg, reply)


def _hello(request: HelloRequest, context: Context, cfg: ResolvedConfig) -> HelloReply:
    """Discovery: this node's client id, number of items and data source."""
    del request  # a hello has no fields
    items = client_items(cfg, context.node_config)
    # A node is ready when its model is loaded: the cold start then falls in the
    # discovery, not in the first round of whichever phase runs next (FL,
    # retrain or unlearning), so their wall times compare like with like.
    client_model(cfg)
    return HelloReply(
        client_id=client_id(context.node_config),
        num_examples=len(items),
        local_data=reads_node_data(context.node_config),
        data_version=node_data_version(context.node_config),
    )


def _audit(request: AuditRequest, context: Context, cfg: ResolvedConfig) -> AuditReply:
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
    set_adapter(model, request.adapter)
    length = int(cfg.max_length)
    gap = answer_prob(model, tok, prompt_fn, trained, length) - answer_prob(
        model, tok, prompt_fn, held, length
    )
    return AuditReply(audit_gap=float(gap), num_examples=len(trained))


def _token_accuracy(
    request: TokenAccuracyRequest, context: Context, cfg: ResolvedConfig
) -> TokenAccuracyReply:
    """PGA's early stop: the adapter's mean token accuracy on this client's items.

    One scalar over all of its items (and their number, the FedAvg weight every
    update carries anyway) leaves the client.
    """
    items = client_items(cfg, context.node_config)
    _floor(context, "the token accuracy", len(items))
    model, tok, prompt_fn = client_model(cfg)
    set_adapter(model, request.adapter)
    acc = token_accuracy(model, tok, prompt_fn, items, int(cfg.max_length))
    return TokenAccuracyReply(token_accuracy=acc, num_examples=len(items))


QUERY_HANDLERS["hello"] = _hello
QUERY_HANDLERS["audit"] = _audit
QUERY_HANDLERS["local-update"] = local_update
QUERY_HANDLERS["attribution"] = neuron_attribution
QUERY_HANDLERS["token-accuracy"] = _token_accuracy
QUERY_HANDLERS["layer-grams"] = layer_grams


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Dispatch a method-specific request (its ``kind``) to its handler."""
    request, cfg = decode_request(msg)
    if request.kind not in QUERY_HANDLERS:
        raise ProtocolError(
            f"unknown query kind {request.kind!r}; known: {sorted(QUERY_HANDLERS)}"
        )
    return encode_reply(msg, QUERY_HANDLERS[request.kind](request, context, cfg))
