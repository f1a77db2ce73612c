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

An ``attribution`` request (SIMU's stage 1) returns the client's neuron scores,
one vector per layer summed over its items (:func:`neuron_attribution`). A
:class:`~fed_unlearn.protocol.LayerGramRequest` (SFU) asks a remaining client
for one Gram matrix per adapted layer, summed over every token of its items
(:func:`layer_grams`).

With ``attribution-weight`` (Ssiuu) the inner loss gets the attribution
regulariser (:mod:`fed_unlearn.losses.attribution_reg`). Its reference
attributions A^0 (per item and neuron) are computed by the client from the
adapter of the request that says ``attribution-reference = 1`` (the first,
carrying the pre-unlearning adapter), before its first step, and kept in
``context.state`` for the later rounds; they never leave the client.

A request with projection ``bases`` (``ortho_lora``) keeps the change of each
such tensor in the orthogonal complement of its basis: the client re-projects
it after every optimiser step (:class:`fed_unlearn.ortho.Projector`).

Only adapter deltas, scalar metrics and those sums leave the client; its items
never do.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
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
from fed_unlearn.optim import MaskedOptimizer, entry_grad_masks, make_optimizer
from fed_unlearn.ortho import Projector
from fed_unlearn.privacy import ClientPolicy, examples_behind
from fed_unlearn.protocol import (
    AttributionReply,
    AttributionRequest,
    LayerGramReply,
    LayerGramRequest,
    LocalUpdateReply,
    LocalUpdateRequest,
)
from fed_unlearn.subspace import layer_input_grams
from fed_unlearn.training import TrainSpec, budget_batches, derive_seed, local_train
from fed_unlearn.types import AdapterState, QAItem

log = logging.getLogger(__name__)

_BASE_STATE = "fed-unlearn-base"
_ATTRIBUTION_STATE = "fed-unlearn-attribution-reference"
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


def neuron_masks(
    model: torch.nn.Module, neurons: dict[str, list[int]]
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Boolean masks of the selected neurons' entries of some LoRA parameters.

    Parameters
    ----------
    model : peft.PeftModel
        Adapted model.
    neurons : dict[str, list[int]]
        Adapter key -> neuron indices along :func:`fed_unlearn.adapters.neuron_axis`
        (rows of ``lora_B``, columns of ``lora_A``).

    Returns
    -------
    dict[torch.nn.Parameter, torch.Tensor]
        Parameter -> mask of its shape, True on the selected rows/columns.
    """
    out: dict[torch.nn.Parameter, torch.Tensor] = {}
    for name, param in model.named_parameters():
        key = name.replace(".default", "")
        if key in neurons:
            mask = torch.zeros_like(param, dtype=torch.bool)
            index = torch.tensor(neurons[key], device=param.device)
            mask.index_fill_(ad.neuron_axis(key), index, True)
            out[param] = mask
    return out


def neuron_attribution(
    req: AttributionRequest, context: Context, cfg: ResolvedConfig
) -> AttributionReply:
    """SIMU stage 1: integrated-gradient neuron scores on this client's items.

    The scores of every item are summed into one ``[d_ff]`` vector per layer
    (:func:`fed_unlearn.attribution.neuron_scores`): no per-item value leaves
    the client, and a client below its ``min-examples`` floor refuses.

    Parameters
    ----------
    req : AttributionRequest
        The adapter, the scaling steps and the batch size.
    context : Context
        Flower context (node config: data, privacy floor).
    cfg : ResolvedConfig
        The run configuration.

    Returns
    -------
    AttributionReply
        The per-layer score sums and the client's figures.
    """
    from fed_unlearn.attribution import neuron_scores
    from fed_unlearn.data.qa import collate
    from fed_unlearn.training import _encoded

    cid = client_id(context.node_config)
    items = client_items(cfg, context.node_config)
    ClientPolicy.from_node_config(context.node_config).check(
        "a neuron attribution", len(items)
    )
    model, tok, prompt_fn = client_model(cfg)
    set_adapter(model, req.adapter)
    device = next(p for p in model.parameters()).device
    size = int(cfg.batch_size if req.batch_size is None else req.batch_size)
    encoded = _encoded(tok, prompt_fn, tuple(items), int(cfg.max_length))
    pad = int(tok.pad_token_id)  # type: ignore[attr-defined]
    batches = [
        {k: v.to(device) for k, v in collate(encoded[s : s + size], pad).items()}
        for s in range(0, len(encoded), size)
    ]
    t0 = time.perf_counter()
    stats: dict[str, int] = {}
    scores = neuron_scores(model, batches, req.steps, stats=stats)
    seconds = time.perf_counter() - t0
    log.info(
        "client %d attribution: %d items, %d layers, m=%d, %.1f s",
        cid,
        len(items),
        len(scores),
        req.steps,
        seconds,
    )
    return AttributionReply(
        scores,
        client_id=cid,
        num_examples=len(items),
        passes=stats["passes"],
        attribution_seconds=seconds,
    )


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


def _attribution_regulariser(
    req: LocalUpdateRequest,
    context: Context,
    model: torch.nn.Module,
    tok: Any,
    prompt_fn: Any,
    items: list[QAItem],
    spec: TrainSpec,
) -> Any:
    """Build the request's attribution regulariser on the loaded adapter.

    ``attribution-reference = 1``: A^0 is computed now, from the adapter just
    loaded (before any step), and kept in ``context.state``; otherwise the kept
    A^0 is used.

    Raises
    ------
    ValueError
        No kept A^0 (no earlier reference request), or one of another size.
    """
    from fed_unlearn.losses.attribution_reg import (
        AttributionRegulariser,
        AttributionSpec,
        reference_attributions,
    )

    assert req.attribution_weight is not None
    aspec = AttributionSpec(
        weight=req.attribution_weight,
        variant=req.attribution_variant or "increase",
        exact=bool(req.attribution_exact),
    )
    if req.attribution_reference:
        ref = reference_attributions(
            model, tok, prompt_fn, items, spec.max_length, spec.batch_size
        )
        context.state[_ATTRIBUTION_STATE] = ArrayRecord({"reference": ref})
    elif _ATTRIBUTION_STATE in context.state:
        kept = context.state[_ATTRIBUTION_STATE].to_torch_state_dict()  # type: ignore[union-attr]
        ref = kept["reference"]
    else:
        raise ValueError(
            "the attribution regulariser needs reference attributions, and this "
            "client holds none: its first request must say attribution-reference=1"
        )
    return AttributionRegulariser(model, aspec, ref)


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
    elif req.optimizer != "adamw" or req.optimizer_params or req.neurons:
        raise ValueError(
            "a local-update's optimizer, optimizer-params and neurons apply to an "
            "inner unlearning loss, not to loss 'nll'"
        )
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
        **({} if req.weight_decay is None else {"weight_decay": req.weight_decay}),
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
    neurons = ad.check_ranks(req.neurons, shapes, ad.neuron_axis, "neurons")
    if set(neurons) & set(ranks):
        raise ValueError(
            f"a tensor cannot be sliced by ranks and neurons at once: "
            f"{sorted(set(neurons) & set(ranks))[:3]}"
        )
    if req.bases and (ranks or neurons):
        raise ValueError(
            "a local-update request cannot carry bases with ranks or neurons"
        )
    retain = _retain_items(req.retain, dict(context.node_config))
    deltas: list[AdapterState] = []
    steps = tokens = 0
    seconds = last_loss = 0.0
    penalty: float | None = None
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
        outside = sorted(set(neurons) - set(copy))
        if outside:
            raise ValueError(
                f"copy {k}: neurons of {outside[:3]} select entries of tensors the "
                "copy does not carry (those are frozen)"
            )
        set_adapter(model, full)
        seed = derive_seed(cfg.seed, req.seed_round, cid, k)
        masks = neuron_masks(model, neurons)
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
        t_ref = time.perf_counter()
        regulariser = (
            None
            if req.attribution_weight is None
            else _attribution_regulariser(
                req, context, model, tok, prompt_fn, items, spec
            )
        )
        seconds += time.perf_counter() - t_ref
        with (
            only_trainable(model, set(copy)),
            only_ranks(model, ranks),
            entry_grad_masks(masks),
        ):
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
                    optimizer=lambda params, m=masks: MaskedOptimizer(
                        make_optimizer(
                            req.optimizer,
                            params,
                            spec.lr,
                            spec.weight_decay,
                            req.optimizer_params,
                        ),
                        m,
                    ),
                    regulariser=regulariser,
                    on_step=project,
                )
        if regulariser is not None:
            penalty = regulariser.mean_penalty()
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
        attribution_penalty=penalty,
    )


def layer_grams(
    req: LayerGramRequest, context: Context, cfg: ResolvedConfig
) -> LayerGramReply:
    """Per adapted layer, the scaled Gram matrix of this client's layer inputs.

    The client forwards (no gradient) the first ``max_items`` of its items (all
    when 0) with the received adapter and sums ``lambda_i x_i x_i^T`` over every
    non-padding token, ``lambda_i ~ U(0, 1]`` drawn from a seed of ``secrets``
    that never leaves it (:func:`fed_unlearn.subspace.layer_input_grams`). Only
    the sums over at least ``min-examples`` items travel: no representation of a
    single token or item does.

    Parameters
    ----------
    req : LayerGramRequest
        The request (its adapter and ``max_items``).
    context : Context
        Flower context (its node config holds the privacy floor).
    cfg : ResolvedConfig
        The run configuration.

    Returns
    -------
    LayerGramReply
        ``lora_A`` key -> ``d_in x d_in`` matrix, the items and tokens behind.
    """
    items = client_items(cfg, context.node_config)
    if req.max_items:
        items = items[: req.max_items]
    ClientPolicy.from_node_config(context.node_config).check(
        "the layer-input Gram matrices", len(items)
    )
    model, tok, prompt_fn = client_model(cfg)
    set_adapter(model, req.adapter)
    gen = torch.Generator().manual_seed(secrets.randbits(63))
    grams, tokens = layer_input_grams(
        model, tok, prompt_fn, items, int(cfg.max_length), gen
    )
    log.info(
        "client %s layer-grams: %d layers over %d items (%d tokens)",
        client_id(context.node_config),
        len(grams),
        len(items),
        tokens,
    )
    return LayerGramReply(grams, num_examples=len(items), tokens=tokens)
