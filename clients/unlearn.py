"""Client side of the unlearning methods: one ``local-update`` query handler.

A :class:`~fed_unlearn.protocol.LocalUpdateRequest` carries one or more adapter
*copies* and asks the client to run a local objective on each, from a fresh
AdamW, and to return one delta (after - before) per copy, of the tensors it
received:

- ``loss = "nll"``: the ordinary FL objective on the client's own items
  (pseudo-gradients for FOUL / FedOSD's remaining clients);
- any inner unlearning loss of :mod:`fed_unlearn.losses` (``ga``, ``npo``,
  ``uce``, ...) on the client's own items, which are its forget set once it has
  asked to be forgotten (MPU, FedOSD's target, FOUL ``live``).

Tensors a copy does not carry are frozen and taken from a *base* adapter: the
request's ``base``, which the client also keeps in its Flower ``context.state``
so later rounds can send only the sub-network (FOUL's θ_V).

A request with projection ``bases`` (``ortho_lora``) keeps the change of each
such tensor in the orthogonal complement of its basis: the client re-projects
it after every optimiser step (:class:`fed_unlearn.ortho.Projector`).

Only adapter deltas and scalar metrics leave the client; its items never do.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from flwr.app import ArrayRecord, Context

from clients.task import client_id, client_items, client_model
from fed_unlearn import adapters as ad
from fed_unlearn import seeds
from fed_unlearn.config import ResolvedConfig
from fed_unlearn.data import generate_people, load_jsonl
from fed_unlearn.models import get_adapter, set_adapter
from fed_unlearn.ortho import Projector
from fed_unlearn.privacy import ClientPolicy, examples_behind
from fed_unlearn.protocol import LocalUpdateReply, LocalUpdateRequest
from fed_unlearn.training import TrainSpec, budget_batches, derive_seed, local_train
from fed_unlearn.types import AdapterState, QAItem

log = logging.getLogger(__name__)

_BASE_STATE = "fed-unlearn-base"
#: Seed of the public proxy retain set (fictitious people outside every client).
PROXY_SEED = seeds.PROXY_DATA


def proxy_retain_items(n_people: int = 6) -> list[QAItem]:
    """Public proxy retain data every party can generate: other fictitious people.

    Parameters
    ----------
    n_people : int
        How many public people.

    Returns
    -------
    list[QAItem]
        Their Q/A items (disjoint from the federation's and the evaluation's).
    """
    return [it for p in generate_people(PROXY_SEED, n_people) for it in p.items]


@contextlib.contextmanager
def only_trainable(model: torch.nn.Module, keys: set[str]) -> Iterator[None]:
    """Freeze every LoRA parameter whose adapter key is not in ``keys``.

    Parameters
    ----------
    model : peft.PeftModel
        Adapted model.
    keys : set[str]
        Adapter keys (``get_adapter`` names) that stay trainable.
    """
    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    state = {n: p.requires_grad for n, p in lora}
    for name, param in lora:
        param.requires_grad = name.replace(".default", "") in keys
    try:
        yield
    finally:
        for name, param in lora:
            param.requires_grad = state[name]


@contextlib.contextmanager
def only_ranks(model: torch.nn.Module, ranks: dict[str, list[int]]) -> Iterator[None]:
    """Zero the gradient of every rank that ``ranks`` does not select.

    With AdamW and no weight decay, an entry whose gradient is always zero never
    moves, so only the selected rows of ``lora_A`` / columns of ``lora_B`` train.

    Parameters
    ----------
    model : peft.PeftModel
        Adapted model.
    ranks : dict[str, list[int]]
        Adapter key -> selected ranks (see :func:`fed_unlearn.adapters.check_ranks`).
    """
    handles = []
    for name, param in model.named_parameters():
        key = name.replace(".default", "")
        if key in ranks:
            mask = torch.zeros_like(param)
            mask.index_fill_(ad.rank_axis(key), torch.tensor(ranks[key]), 1.0)
            handles.append(param.register_hook(lambda g, m=mask: g * m))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _retain_items(source: str, node_config: dict[str, Any]) -> list[QAItem] | None:
    if source in ("", "none"):
        return None
    if source == "proxy":
        return proxy_retain_items()
    if source == "local":
        path = node_config.get("retain-path")
        if not path:
            raise ValueError(
                "retain source 'local' needs this SuperNode's own non-forget data "
                "(--node-config retain-path=...); a departing client's items are "
                "all in its forget set"
            )
        return load_jsonl(str(path))
    raise ValueError(f"unknown retain source {source!r}; use none, proxy or local")


def local_update(
    req: LocalUpdateRequest, context: Context, cfg: ResolvedConfig
) -> LocalUpdateReply:
    """Run the requested local objective on each received copy; return deltas.

    Parameters
    ----------
    req : LocalUpdateRequest
        The request (its fields: :mod:`fed_unlearn.protocol`). ``epochs`` and
        ``batch_size`` default to the run's; ``budget`` sizes batches instead
        (:func:`~fed_unlearn.training.budget_batches`), up to this client's
        privacy floor; ``ranks``: the copies carry only these rows of
        ``lora_A`` / columns of ``lora_B`` of those tensors, the base holds them
        whole, only those ranks train and their deltas come back.
    context : Context
        Flower context (its ``state`` keeps the base adapter between requests).
    cfg : ResolvedConfig
        The run configuration.

    Returns
    -------
    LocalUpdateReply
        One delta per copy, in the copies' dtype, and the client's figures.
    """
    from fed_unlearn.losses import get_loss, unlearn_train

    loss = req.loss
    if loss != "nll":
        get_loss(loss)  # unknown loss -> clear error before any work
    # deltas go back in the dtype the copies came in (fp16 wire: fp16 back)
    wire = (
        torch.float16
        if all(v.dtype == torch.float16 for c in req.copies for v in c.values())
        else torch.float32
    )
    copies = [{k: v.float() for k, v in c.items()} for c in req.copies]
    base = {k: v.float() for k, v in req.base.items()}
    cid = client_id(context.node_config)
    items = client_items(cfg, context.node_config)
    epochs = int(cfg.local_epochs if req.epochs is None else req.epochs)
    batch_size = int(cfg.batch_size if req.batch_size is None else req.batch_size)
    max_steps = req.max_steps
    policy = ClientPolicy.from_node_config(context.node_config)
    if req.budget is not None:
        batch_size, epochs = budget_batches(
            req.budget,
            int(cfg.num_server_rounds),
            int(cfg.local_epochs),
            len(items),
            max_steps,
        )
        # a budget lets the client size its batches: it sizes them up to its
        # own floor rather than refuse (a step never sees an item twice)
        batch_size = max(
            batch_size, min(len(items), -(-policy.min_examples // max_steps))
        )
    spec = TrainSpec(
        epochs=epochs,
        batch_size=batch_size,
        lr=req.lr if req.lr is not None else float(cfg.lr) * req.lr_scale,
        max_length=int(cfg.max_length),
        max_steps=max_steps,
    )
    policy.check(
        f"a {loss} local-update",
        examples_behind(len(items), spec.epochs, spec.batch_size, spec.max_steps),
    )
    # a refused request changes nothing: the base is kept only from here on
    if base:
        context.state[_BASE_STATE] = ArrayRecord(base)
    elif _BASE_STATE in context.state:
        base = context.state[_BASE_STATE].to_torch_state_dict()  # type: ignore[union-attr]
    model, tok, prompt_fn = client_model(cfg)
    from peft import get_peft_model_state_dict

    shapes = {k: v.shape for k, v in get_peft_model_state_dict(model).items()}
    expected = set(shapes)
    ranks = ad.check_ranks(req.ranks, shapes)
    if req.bases and ranks:
        raise ValueError("a local-update request cannot carry both ranks and bases")
    retain = _retain_items(req.retain, dict(context.node_config))
    deltas: list[AdapterState] = []
    steps = tokens = 0
    seconds = last_loss = 0.0
    for k, copy in enumerate(copies):
        unknown = sorted(set(copy) - expected)
        if unknown:
            raise ValueError(f"copy {k}: unknown adapter tensors {unknown[:3]}")
        full = dict(copy)
        missing = expected - set(copy)
        if missing:
            if not missing <= set(base):
                raise ValueError(
                    f"copy {k} lacks {len(missing)} adapter tensors and this client "
                    "holds no base adapter with them; send base.* arrays first"
                )
            full.update({n: base[n] for n in missing})
        for n, picked in ranks.items():
            # this copy carries only these ranks of n: write them into the base
            if n not in copy or n not in base:
                raise ValueError(
                    f"copy {k}: ranks of {n} need that slice in the copy and the "
                    "whole tensor in the base adapter"
                )
            full[n] = ad.put_ranks(base[n], n, picked, copy[n])
        set_adapter(model, full)
        seed = derive_seed(cfg.seed, req.seed_round, cid, k)
        project = (
            Projector(
                {
                    n.replace(".default", ""): p
                    for n, p in model.named_parameters()
                    if n.replace(".default", "") in req.bases
                },
                req.bases,
            )
            if req.bases
            else None
        )
        with only_trainable(model, set(copy)), only_ranks(model, ranks):
            if loss == "nll":
                stats = local_train(
                    model, tok, prompt_fn, items, spec, seed=seed, on_step=project
                )
            else:
                stats = unlearn_train(
                    model,
                    tok,
                    prompt_fn,
                    items,
                    loss,
                    spec,
                    seed=seed,
                    retain_items=retain,
                    params=req.loss_params,
                    on_step=project,
                )
        after = get_adapter(model)
        delta: AdapterState = {}
        for name, before in copy.items():
            now = after[name]
            if name in ranks:
                now = ad.take_ranks(now, name, ranks[name])
            delta[name] = (now - before).to(wire)
        deltas.append(delta)
        steps += stats.steps
        tokens += stats.tokens
        seconds += stats.seconds
        last_loss = stats.loss
    log.info(
        "client %d local-update (%s, %d copies): %d steps of %d examples, %.1f s",
        cid,
        loss,
        len(copies),
        steps,
        spec.batch_size,
        seconds,
    )
    return LocalUpdateReply(
        deltas,
        client_id=cid,
        num_examples=len(items),
        local_steps=steps,
        tokens=tokens,
        train_seconds=seconds,
        loss=last_loss,
    )
