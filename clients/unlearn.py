"""Client side of the unlearning methods: one ``local-update`` query handler.

A request carries one or more adapter *copies* (``copy<k>.<tensor>`` arrays) and
asks the client to run a local objective on each, from a fresh AdamW, and to
return ``copy<k>.<tensor>`` = (after - before) for the tensors it received:

- ``q-loss = "nll"``: the ordinary FL objective on the client's own items
  (pseudo-gradients for FOUL / FedOSD's remaining clients);
- any inner unlearning loss of :mod:`fed_unlearn.losses` (``ga``, ``npo``,
  ``uce``, ...) on the client's own items, which are its forget set once it has
  asked to be forgotten (MPU, FedOSD's target, FOUL ``live``).

Tensors a copy does not carry are frozen and taken from a *base* adapter: the
request's ``base.<tensor>`` arrays, which the client also keeps in its Flower
``context.state`` so later rounds can send only the sub-network (FOUL's θ_V).

Only adapter deltas and scalar metrics leave the client; its items never do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message

from clients.task import client_id, client_items, client_model
from fed_unlearn import adapters as ad
from fed_unlearn.config import RunConfig
from fed_unlearn.data import generate_people, load_jsonl
from fed_unlearn.models import get_adapter, set_adapter
from fed_unlearn.privacy import ClientPolicy, examples_behind
from fed_unlearn.training import TrainSpec, budget_batches, derive_seed, local_train
from fed_unlearn.types import AdapterState, QAItem

log = logging.getLogger(__name__)

_COPY = re.compile(r"^copy(\d+)\.(.+)$")
_BASE_STATE = "fed-unlearn-base"
#: Seed of the public proxy retain set (fictitious people outside every client).
PROXY_SEED = 987_654


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


def _request(msg: Message) -> dict[str, Any]:
    return {k[2:]: v for k, v in msg.content["config"].items() if k.startswith("q-")}


def split_copies(
    arrays: dict[str, torch.Tensor],
) -> tuple[list[AdapterState], AdapterState]:
    """Split a request's arrays into copies ``copy<k>.*`` and ``base.*``.

    Parameters
    ----------
    arrays : dict[str, torch.Tensor]
        The message's arrays.

    Returns
    -------
    tuple[list[AdapterState], AdapterState]
        Copies in index order and the base tensors.

    Raises
    ------
    ValueError
        Keys of neither kind, or copy indices with gaps.
    """
    copies: dict[int, AdapterState] = {}
    base: AdapterState = {}
    for key, value in arrays.items():
        if key.startswith("base."):
            base[key[5:]] = value.float()
            continue
        m = _COPY.match(key)
        if m is None:
            raise ValueError(f"unexpected array {key!r} (want copy<k>.* or base.*)")
        copies.setdefault(int(m[1]), {})[m[2]] = value.float()
    if sorted(copies) != list(range(len(copies))):
        raise ValueError(f"copy indices {sorted(copies)} are not 0..m-1")
    return [copies[k] for k in range(len(copies))], base


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
    msg: Message, context: Context, cfg: RunConfig
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Run the requested local objective on each received copy; return deltas.

    Parameters
    ----------
    msg : Message
        The query (``arrays``: copies and optional base; ``q-*`` config keys:
        ``loss``, ``epochs``, ``max-steps`` (0 = no cap), ``lr`` (or ``lr-scale``
        x the run's), ``batch-size``, ``budget`` (instead of ``epochs`` and
        ``batch-size``: ``max-steps`` steps that see this share of the examples
        retraining would show this client,
        :func:`~fed_unlearn.training.budget_batches`), ``ranks`` (JSON
        ``{tensor: [rank, ...]}``: the copies carry only these rows of
        ``lora_A`` / columns of ``lora_B`` of those tensors, the base holds them
        whole, only those ranks train and their deltas come back), ``retain``,
        ``loss-params`` (JSON), ``seed-round``).
    context : Context
        Flower context (its ``state`` keeps the base adapter between requests).
    cfg : RunConfig
        The run configuration.

    Returns
    -------
    tuple[dict[str, torch.Tensor], dict[str, Any]]
        ``copy<k>.<tensor>`` deltas and the client's metrics.
    """
    from fed_unlearn.losses import get_loss, unlearn_train

    req = _request(msg)
    if "budget" in req and ("batch-size" in req or int(req.get("max-steps", 0)) < 1):
        raise ValueError(
            "a 'budget' request sizes its own batches: it needs max-steps >= 1 and "
            "no batch-size"
        )
    loss = str(req.get("loss", "nll"))
    if loss != "nll":
        get_loss(loss)  # unknown loss -> clear error before any work
    arrays = (
        msg.content["arrays"].to_torch_state_dict() if "arrays" in msg.content else {}
    )
    # deltas go back in the dtype the copies came in (fp16 wire: fp16 back)
    wire = (
        torch.float16
        if all(v.dtype == torch.float16 for k, v in arrays.items() if k[:4] == "copy")
        else torch.float32
    )
    copies, base = split_copies(arrays)
    if not copies:
        raise ValueError("local-update request carries no copy<k>.* arrays")
    cid = client_id(context.node_config)
    items = client_items(cfg, context.node_config)
    r = cfg.resolved()
    epochs = int(req.get("epochs", r.local_epochs))  # type: ignore[arg-type]
    batch_size = int(req.get("batch-size", r.batch_size))  # type: ignore[arg-type]
    max_steps = int(req.get("max-steps", 0))
    policy = ClientPolicy.from_node_config(context.node_config)
    if "budget" in req:
        batch_size, epochs = budget_batches(
            float(req["budget"]),
            int(r.num_server_rounds),  # type: ignore[arg-type]
            int(r.local_epochs),  # type: ignore[arg-type]
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
        lr=float(req["lr"])
        if "lr" in req
        else float(r.lr) * float(req.get("lr-scale", 1.0)),  # type: ignore[arg-type]
        max_length=int(r.max_length),  # type: ignore[arg-type]
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
    try:
        ranks = ad.check_ranks(json.loads(str(req.get("ranks", "{}"))), shapes)
    except json.JSONDecodeError as exc:
        raise ValueError(f"ranks is not JSON: {exc}") from exc
    params = json.loads(str(req.get("loss-params", "{}")))
    retain = _retain_items(str(req.get("retain", "none")), dict(context.node_config))
    seed_round = int(req.get("seed-round", 0))
    out: dict[str, torch.Tensor] = {}
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
        seed = derive_seed(cfg.seed, seed_round, cid, k)
        with only_trainable(model, set(copy)), only_ranks(model, ranks):
            if loss == "nll":
                stats = local_train(model, tok, prompt_fn, items, spec, seed=seed)
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
                    params=params,
                )
        after = get_adapter(model)
        for name, before in copy.items():
            now = after[name]
            if name in ranks:
                now = ad.take_ranks(now, name, ranks[name])
            out[f"copy{k}.{name}"] = (now - before).to(wire)
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
    return out, {
        "client-id": cid,
        "num-examples": len(items),
        "local-steps": steps,
        "tokens": tokens,
        "train-seconds": seconds,
        "loss": last_loss,
    }
