"""The unlearning loop shared by every inner loss.

Mirrors :func:`fed_unlearn.training.local_train` (same tokenisation, fresh AdamW,
gradient clipping, seeded data order) with ``L = γ·L_forget + α·L_retain``.
Retain batches: one per forget step (same size, capped at the retain set's size),
drawn from seeded permutations of the retain items and reshuffled when fewer than
a batch remain — open-unlearning instead draws one retain example uniformly per
forget example [R].
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

from fed_unlearn.data.qa import PromptFn, collate
from fed_unlearn.losses.idk import idk_items
from fed_unlearn.losses.objectives import StepBatches, StepContext, get_loss
from fed_unlearn.losses.reference import LayerTap, decoder_layers, frozen_reference
from fed_unlearn.training import TrainSpec, TrainStats, _encoded, derive_seed
from fed_unlearn.types import QAItem

if TYPE_CHECKING:
    from fed_unlearn.losses.attribution_reg import AttributionRegulariser

Encoded = list[tuple[list[int], list[int]]]


class Stepper(Protocol):
    """What the loop needs of an optimiser."""

    def step(self) -> Any:
        """Update the parameters from their gradients."""
        ...

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients."""
        ...


def _retain_stream(
    n: int, size: int, generator: torch.Generator
) -> Iterator[list[int]]:
    """Yield index batches of ``size`` from successive seeded permutations."""
    order: list[int] = []
    while True:
        if len(order) < size:
            order = torch.randperm(n, generator=generator).tolist()
        batch, order = order[:size], order[size:]
        yield batch


def _to(
    batch: dict[str, torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _rmu_layer(model: torch.nn.Module, value: float) -> int:
    n = len(decoder_layers(model))
    layer = int(value)
    if layer == -1:
        return n // 2
    if not 0 <= layer < n:
        raise ValueError(f"rmu layer must be -1 or in [0, {n}), got {value}")
    return layer


def unlearn_train(
    model: torch.nn.Module,
    tokenizer: object,
    prompt_fn: PromptFn,
    forget_items: Sequence[QAItem],
    loss: str,
    spec: TrainSpec,
    seed: int,
    retain_items: Sequence[QAItem] | None = None,
    params: Mapping[str, float] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    optimizer: Callable[[list[torch.nn.Parameter]], Stepper] | None = None,
    regulariser: AttributionRegulariser | None = None,
) -> TrainStats:
    """Run an inner unlearning loss on the model's trainable adapter tensors.

    Parameters
    ----------
    model : torch.nn.Module
        Peft model with the adapter to unlearn from loaded; only parameters with
        ``requires_grad`` are optimised (callers may freeze some). Its adapter at
        the start of the call is the reference model of npo/idkdpo/undial/rmu.
    tokenizer : PreTrainedTokenizerBase
        Model tokenizer (pad token set).
    prompt_fn : PromptFn
        Prompt format.
    forget_items : Sequence[QAItem]
        The items to forget.
    loss : str
        Inner loss name (see :func:`fed_unlearn.losses.list_losses`).
    spec : TrainSpec
        Epochs, batch size, lr, weight decay, gradient clip, max length.
    seed : int
        Seed of the forget/retain order, refusal choice, RMU vector and dropout.
    retain_items : Sequence[QAItem], optional
        Retain set; ``None`` or empty omits the retain term.
    params : Mapping[str, float], optional
        Overrides of the loss's :attr:`LossSpec.defaults`.
    on_step : Callable[[int, float], None], optional
        Called after every step with ``(step, loss)``.
    optimizer : Callable, optional
        Builds the optimiser of the trainable parameters (anything with
        ``step()`` and ``zero_grad(set_to_none=...)``, e.g.
        :func:`fed_unlearn.optim.make_optimizer` wrapped in a
        :class:`~fed_unlearn.optim.MaskedOptimizer`); default: AdamW with the
        spec's learning rate and weight decay.
    regulariser : AttributionRegulariser, optional
        Adds ``λ·R`` of each forget batch to the loss (Ssiuu,
        :mod:`fed_unlearn.losses.attribution_reg`); its rows of ``A^0`` are the
        forget items' indices. Backpropagated after the inner loss, before the
        clip and the step.

    Returns
    -------
    TrainStats
        Steps, tokens of the trainable forwards (the regulariser's included),
        mean loss (with ``λ·R``) of the last epoch and wall time.

    Raises
    ------
    KeyError
        Unknown loss.
    ValueError
        No forget items, bad ``params``, or no trainable parameter.
    """
    lspec = get_loss(loss)
    hp = lspec.resolve(params)
    if not forget_items:
        raise ValueError("unlearn_train got no forget items")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (no LoRA adapter?)")
    if regulariser is not None:
        regulariser.check_items(len(forget_items))
    device = trainable[0].device
    pad = int(tokenizer.pad_token_id)  # type: ignore[attr-defined]
    forget = _encoded(tokenizer, prompt_fn, tuple(forget_items), spec.max_length)
    idk: Encoded | None = None
    if lspec.needs_idk:
        refusals = tuple(idk_items(forget_items, seed))
        idk = _encoded(tokenizer, prompt_fn, refusals, spec.max_length)
    retain: Encoded | None = None
    if lspec.uses_retain and retain_items:
        retain = _encoded(tokenizer, prompt_fn, tuple(retain_items), spec.max_length)

    tap = (
        LayerTap(model, _rmu_layer(model, hp["layer"])) if lspec.needs_hidden else None
    )
    reference = frozen_reference(model) if lspec.needs_reference else None
    ctx = StepContext(model, hp, seed, reference, tap)
    gamma, alpha = hp["gamma"], hp.get("alpha", 0.0)

    gen = torch.Generator().manual_seed(seed % 2**63)
    retain_batches = (
        _retain_stream(
            len(retain),
            min(spec.batch_size, len(retain)),
            torch.Generator().manual_seed(derive_seed(seed, 1)),
        )
        if retain
        else None
    )
    opt: Stepper = (
        torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=spec.weight_decay)
        if optimizer is None
        else optimizer(trainable)
    )
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    was_training = model.training
    t0 = time.perf_counter()
    steps = 0
    epoch_loss = 0.0
    stack = contextlib.ExitStack()
    if regulariser is not None:
        stack.enter_context(regulariser)
    try:
        with stack, torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(seed % 2**63)  # dropout, if any
            model.train()
            for _epoch in range(spec.epochs):
                total, count = 0.0, 0
                order = torch.randperm(len(forget), generator=gen).tolist()
                for s in range(0, len(order), spec.batch_size):
                    idx = order[s : s + spec.batch_size]
                    b = StepBatches(_to(collate([forget[i] for i in idx], pad), device))
                    if idk is not None:
                        b.idk = _to(collate([idk[i] for i in idx], pad), device)
                        rows = [idk[i] for i in idx] + [forget[i] for i in idx]
                        b.both = _to(collate(rows, pad), device)
                    if retain is not None and retain_batches is not None:
                        ridx = next(retain_batches)
                        b.retain = _to(collate([retain[i] for i in ridx], pad), device)
                    f_term, r_term = lspec.step(ctx, b)
                    value = gamma * f_term
                    if r_term is not None:
                        value = value + alpha * r_term
                    value.backward()
                    if regulariser is not None:
                        # after the inner loss's backward: one graph at a time
                        reg = regulariser(b.forget, idx)
                        reg.backward()
                        value = value.detach() + reg.detach()
                    torch.nn.utils.clip_grad_norm_(trainable, spec.grad_clip)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    steps += 1
                    step_loss = float(value.detach())
                    total += step_loss
                    count += 1
                    if on_step is not None:
                        on_step(steps, step_loss)
                    if spec.capped(steps):
                        break
                epoch_loss = total / max(count, 1)
                if spec.capped(steps):
                    break
    finally:
        model.train(was_training)
        if tap is not None:
            tap.remove()
    tokens = ctx.tokens + (regulariser.tokens if regulariser is not None else 0)
    return TrainStats(steps, tokens, epoch_loss, time.perf_counter() - t0)
