"""Local LoRA training of a client (answer-only causal-LM loss).

The same function is used by the Flower ClientApp, the benchmarks and the tests, so
there is exactly one training loop. Only adapter tensors have ``requires_grad``.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fed_unlearn.data.qa import PromptFn, collate, encode_qa
from fed_unlearn.types import QAItem

#: A step cap (``max_steps``, ``max-steps`` on the wire, ``local_steps`` of a
#: method) at this value caps nothing.
NO_CAP = 0


@dataclass(frozen=True)
class TrainSpec:
    """Hyper-parameters of a client's local training.

    Parameters
    ----------
    epochs : int
        Local epochs per round (default: 2).
    batch_size : int
        Examples per step (default: 8).
    lr : float
        AdamW learning rate, fresh optimiser every round (default: 2e-3).
    weight_decay : float
        AdamW weight decay (default: 0.0).
    grad_clip : float
        Global gradient-norm clip (default: 1.0).
    max_length : int
        Max tokens per example (default: 128).
    max_steps : int
        Stop after this many optimiser steps, mid-epoch if need be (default:
        :data:`NO_CAP`; the spec's "E local steps" of a FOUL pseudo-gradient).
    """

    epochs: int = 2
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_length: int = 128
    max_steps: int = NO_CAP

    def __post_init__(self) -> None:
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        for name in ("epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def capped(self, steps: int) -> bool:
        """Return whether ``steps`` optimiser steps reach ``max_steps``."""
        return NO_CAP < self.max_steps <= steps


@dataclass
class TrainStats:
    """What local training did (reported in the client's metrics).

    Parameters
    ----------
    steps : int
        Optimiser steps.
    tokens : int
        Non-padding tokens processed (forward + backward).
    loss : float
        Mean loss of the last epoch.
    seconds : float
        Wall time.
    """

    steps: int
    tokens: int
    loss: float
    seconds: float


def encode_items(
    tokenizer: object, prompt_fn: PromptFn, items: Sequence[QAItem], max_length: int
) -> list[tuple[list[int], list[int]]]:
    """Encode question/answer items for training.

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
        Model tokenizer.
    prompt_fn : PromptFn
        Prompt format of the model.
    items : Sequence[QAItem]
        Items to encode.
    max_length : int
        Token limit per example.

    Returns
    -------
    list[tuple[list[int], list[int]]]
        ``(input_ids, labels)`` per item.
    """
    return [
        encode_qa(tokenizer, prompt_fn(it.question), it.answer, max_length)
        for it in items
    ]


_ENCODED: weakref.WeakKeyDictionary[
    Any, dict[tuple[str, tuple[QAItem, ...], int], list[tuple[list[int], list[int]]]]
] = weakref.WeakKeyDictionary()


def _encoded(
    tokenizer: object, prompt_fn: PromptFn, items: tuple[QAItem, ...], max_length: int
) -> list[tuple[list[int], list[int]]]:
    """Encode once per tokenizer: a client trains on the same items every round."""
    per_tok = _ENCODED.setdefault(tokenizer, {})
    key = (getattr(prompt_fn, "__qualname__", ""), items, max_length)
    if key not in per_tok:
        if len(per_tok) >= 8:
            per_tok.pop(next(iter(per_tok)))
        per_tok[key] = encode_items(tokenizer, prompt_fn, items, max_length)
    return per_tok[key]


def make_batches(
    encoded: Sequence[tuple[list[int], list[int]]],
    batch_size: int,
    pad_id: int,
    generator: torch.Generator,
) -> list[dict[str, torch.Tensor]]:
    """Shuffle (seeded) and collate one epoch of batches.

    Parameters
    ----------
    encoded : Sequence[tuple[list[int], list[int]]]
        Encoded items.
    batch_size : int
        Batch size.
    pad_id : int
        Padding token id.
    generator : torch.Generator
        Seeded generator for the permutation.

    Returns
    -------
    list[dict[str, torch.Tensor]]
        Batches (right padding).
    """
    order = torch.randperm(len(encoded), generator=generator).tolist()
    return [
        collate([encoded[i] for i in order[s : s + batch_size]], pad_id)
        for s in range(0, len(order), batch_size)
    ]


class Regulariser(Protocol):
    """An extra loss term of local training (dual adapters, FedProx)."""

    def __call__(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Return the term for this batch (a scalar with a graph)."""
        ...

    def start_epoch(self) -> None:
        """Start a local epoch."""
        ...


class ProximalTerm:
    """FedProx's proximal term (μ/2)·‖θ - θ_global‖² over the trainable parameters.

    Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020,
    eq. (2); Flower's ``FedProx`` sends μ and leaves the term to the client.

    Parameters
    ----------
    model : torch.nn.Module
        The client's model with the round's global adapter loaded: its
        trainable parameters now are θ_global.
    mu : float
        μ >= 0.
    """

    def __init__(self, model: torch.nn.Module, mu: float) -> None:
        if not (math.isfinite(mu) and mu >= 0):
            raise ValueError(f"proximal mu must be finite and >= 0, got {mu}")
        self.mu = mu
        params = [p for p in model.parameters() if p.requires_grad]
        self.anchor = [p.detach().clone() for p in params]

    def __call__(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Return (μ/2)·Σ_p ‖p - p_global‖² (``batch`` is not read)."""
        params = [p for p in model.parameters() if p.requires_grad]
        pairs = zip(params, self.anchor, strict=True)
        squares = torch.stack([((p - a) ** 2).sum() for p, a in pairs])
        return 0.5 * self.mu * squares.sum()

    def start_epoch(self) -> None:
        """Nothing per epoch."""


class SumOfRegularisers:
    """The sum of several :class:`Regulariser` terms."""

    def __init__(self, *terms: Regulariser) -> None:
        self.terms = terms

    def __call__(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Return Σ of the terms."""
        return torch.stack([t(model, batch) for t in self.terms]).sum()

    def start_epoch(self) -> None:
        """Start an epoch of every term."""
        for t in self.terms:
            t.start_epoch()


def train_steps(
    model: torch.nn.Module,
    batches_per_epoch: Callable[[int], list[dict[str, torch.Tensor]]],
    spec: TrainSpec,
    on_step: Callable[[int, float], None] | None = None,
    regulariser: Regulariser | None = None,
) -> TrainStats:
    """Run ``spec.epochs`` epochs of AdamW on the trainable (adapter) parameters.

    Parameters
    ----------
    model : torch.nn.Module
        Peft model; only parameters with ``requires_grad`` are optimised.
    batches_per_epoch : Callable[[int], list[dict[str, torch.Tensor]]]
        Epoch index -> its batches.
    spec : TrainSpec
        Hyper-parameters.
    on_step : Callable[[int, float], None], optional
        Called after every step with (step, loss), e.g. for a progress bar.
    regulariser : Regulariser, optional
        Extra loss added to each batch's NLL (a dual-adapter run's K/V
        regularisers, whose hooks must be active; FedProx's
        :class:`ProximalTerm`). The reported loss is the NLL.

    Returns
    -------
    TrainStats
        Steps, tokens, last-epoch loss and wall time.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (no LoRA adapter?)")
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    was_training = model.training
    model.train()
    t0 = time.perf_counter()
    steps = tokens = 0
    epoch_loss = 0.0
    try:
        for epoch in range(spec.epochs):
            total, count = 0.0, 0
            for batch in batches_per_epoch(epoch):
                out = model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    labels=batch["labels"],
                )
                loss = out.loss
                if regulariser is not None:
                    loss = loss + regulariser(model, batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                steps += 1
                tokens += int(batch["attention_mask"].sum())
                total += float(out.loss.detach())
                count += 1
                if on_step is not None:
                    on_step(steps, float(out.loss.detach()))
                if spec.capped(steps):
                    break
            epoch_loss = total / max(count, 1)
            if spec.capped(steps):
                break
    finally:
        model.train(was_training)
    return TrainStats(steps, tokens, epoch_loss, time.perf_counter() - t0)


def local_train(
    model: torch.nn.Module,
    tokenizer: object,
    prompt_fn: PromptFn,
    items: Sequence[QAItem],
    spec: TrainSpec,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
    regulariser: Regulariser | None = None,
) -> TrainStats:
    """Train the model's LoRA adapter on a client's items.

    Parameters
    ----------
    model : torch.nn.Module
        Peft model with the round's global adapter already loaded.
    tokenizer : PreTrainedTokenizerBase
        Model tokenizer.
    prompt_fn : PromptFn
        Prompt format.
    items : Sequence[QAItem]
        The client's private training items.
    spec : TrainSpec
        Hyper-parameters.
    seed : int
        Seed of the data order (derive it from run seed, round and client id).
    on_step : Callable[[int, float], None], optional
        Progress callback.
    regulariser : Regulariser, optional
        See :func:`train_steps`.

    Returns
    -------
    TrainStats
        What was done.
    """
    if not items:
        raise ValueError("local_train got no items")
    encoded = _encoded(tokenizer, prompt_fn, tuple(items), spec.max_length)
    pad = int(tokenizer.pad_token_id)  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(seed)
    return train_steps(
        model,
        lambda _epoch: make_batches(encoded, spec.batch_size, pad, gen),
        spec,
        on_step,
        regulariser,
    )


def derive_seed(*parts: int) -> int:
    """Combine integers into one 63-bit seed (stable across processes).

    Parameters
    ----------
    *parts : int
        E.g. run seed, round, client id.

    Returns
    -------
    int
        A deterministic seed.
    """
    import hashlib

    blob = ",".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") >> 1


def budget_batches(
    budget: float, fl_rounds: int, fl_epochs: int, n_items: int, steps: int
) -> tuple[int, int]:
    """Size a capped local run as a share of what retraining costs the client.

    Retraining from scratch makes a client that takes part in every round see
    ``fl_rounds * fl_epochs * n_items`` examples. A run of ``steps`` optimiser
    steps that is to cost ``budget`` of that sees ``ceil(budget * that)``
    examples, so each step takes ``ceil(examples / steps)`` of them (at most
    ``n_items``: a step never sees an item twice), and the run needs
    ``ceil(steps / ceil(n_items / batch))`` epochs to reach its ``steps``.

    Parameters
    ----------
    budget : float
        Share of retraining's examples, > 0 (e.g. 1/12).
    fl_rounds, fl_epochs : int
        The FL recipe: server rounds and local epochs per round.
    n_items : int
        The client's number of training items.
    steps : int
        Optimiser steps of the run (> 0).

    Returns
    -------
    tuple[int, int]
        ``(batch_size, epochs)`` for :class:`TrainSpec` (with ``max_steps=steps``).

    Raises
    ------
    ValueError
        A budget that is not a finite positive number, or a count below 1.
    """
    if not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget must be a finite number > 0, got {budget}")
    for name, value in (
        ("fl_rounds", fl_rounds),
        ("fl_epochs", fl_epochs),
        ("n_items", n_items),
        ("steps", steps),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    # rounded first, so that 1/12 of 360 is 30 and not 31
    examples = math.ceil(round(budget * fl_rounds * fl_epochs * n_items, 9))
    batch = min(n_items, max(1, math.ceil(examples / steps)))
    return batch, math.ceil(steps / math.ceil(n_items / batch))
