"""First-order attribution of MLP neurons and the Ssiuu-style regulariser.

Neuron ``n`` is a coordinate of an MLP's intermediate activation, the input
``h`` of a decoder layer's ``down_proj`` (``act(gate(x)) * up(x)`` in a Llama
block), in every layer. Its attribution to the answer of a forget item
``(x, y)`` is gradient x activation, the one-step integrated gradient
(spec ``methods.md`` §1.2) [R]::

    A_n(x, y; θ) = Σ_t h_{n,t} · ∂ log p_θ(y | x) / ∂h_{n,t}

summed over the positions ``t`` that predict an answer token
(:func:`answer_positions`), with ``log p_θ(y | x)`` the summed answer
log-likelihood. One backward of the batch's summed log-likelihood gives every
item's gradient (items of a batch do not interact), so :func:`attribution_from`
returns a ``[B, N]`` matrix of per-item, per-neuron values at the cost of one
backward to the activations.

The regulariser (Yang et al., "Erase or Hide? Suppressing Spurious Unlearning
Neurons for Robust Unlearning", arXiv 2509.22263; the exact loss is not
public, this is the spec's reconstruction [R]) penalises *new or increased
negative* attribution, so an inner loss cannot lower the forget answers'
likelihood by growing "hiding" neurons and must shrink positive influence::

    (a) "increase": R = mean_{b,n} ReLU(-A_{b,n}(θ) - ReLU(-A^0_{b,n}))
    (b) "negative": R = mean_{b,n} ReLU(-A_{b,n}(θ))

with ``A^0`` the attributions of the model before unlearning on the same items
(:func:`reference_attributions`). (a) is 0 at θ^0 and only counts negative
attribution beyond the original's negative part; (b) penalises every negative
attribution. R is divided by ``mean |A^0|`` (:func:`attribution_scale`) so
that it is a share of the original's attribution and λ does not depend on the
model's activation scale (a random tiny Llama's attributions are ~1e-3, a
trained model's much larger) [R]. Two ways to differentiate R [R]:

* ``exact=False`` (default): the detached-gradient surrogate
  ``A ≈ Σ_t h · sg(∂ log p/∂h)``; R's gradient flows through the activations
  only (one extra forward and one backward to the activations per step);
* ``exact=True``: ``∂ log p/∂h`` is taken with ``create_graph=True`` and R is
  differentiated through it too (second order; needs an attention kernel with
  double backward: the forward runs on the math SDPA kernel; an eager or
  SDPA attention, not flash-attention-2).

The regulariser adds ``λ·R`` to any inner loss of :mod:`fed_unlearn.losses`
(:func:`~fed_unlearn.losses.unlearn_train`'s ``regulariser``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fed_unlearn.data.qa import PromptFn, collate
from fed_unlearn.losses import functional as LF
from fed_unlearn.losses.reference import decoder_layers
from fed_unlearn.types import QAItem

#: Regulariser variants: (a) ``"increase"`` and (b) ``"negative"``.
VARIANTS = ("increase", "negative")
#: How :func:`attribution_from` keeps the autograd graph: ``"none"`` (a
#: measurement), ``"surrogate"`` (through ``h`` only) or ``"exact"``.
GRAPHS = ("none", "surrogate", "exact")

Batch = dict[str, torch.Tensor]


def down_projections(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Return each decoder layer's MLP ``down_proj`` (or its peft wrapper).

    Parameters
    ----------
    model : torch.nn.Module
        Peft model or plain Hugging Face causal LM with Llama-style blocks.

    Returns
    -------
    list[torch.nn.Module]
        One module per layer, in layer order.

    Raises
    ------
    ValueError
        A block without ``mlp.down_proj``.
    """
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        down = getattr(getattr(layer, "mlp", None), "down_proj", None)
        if not isinstance(down, torch.nn.Module):
            raise ValueError(
                f"decoder layer {i} of {type(layer).__name__} has no mlp.down_proj: "
                "neuron attribution needs Llama-style MLP blocks"
            )
        out.append(down)
    return out


class NeuronTap:
    """Capture the inputs of given modules (the MLP neurons) during a forward.

    A context manager: inside ``with``, :meth:`run` calls a model closure and
    returns its output and the captured ``[B, T, d_ff]`` activations, one per
    module, in the autograd graph. An activation that does not require grad
    (nothing trainable upstream) is replaced by a leaf that does, so its
    gradient can be taken; that cuts no path, since no tapped value upstream
    can influence it.

    Parameters
    ----------
    modules : Sequence[torch.nn.Module]
        Modules whose first positional input is captured
        (:func:`down_projections`).
    """

    def __init__(self, modules: Sequence[torch.nn.Module]) -> None:
        if not modules:
            raise ValueError("NeuronTap needs at least one module")
        self.modules = list(modules)
        self._handles: list[Any] = []
        self._armed = False
        self._values: list[torch.Tensor] = []

    @classmethod
    def of(cls, model: torch.nn.Module) -> NeuronTap:
        """Return a tap on every ``down_proj`` of ``model``."""
        return cls(down_projections(model))

    def _hook(self, _module: torch.nn.Module, args: tuple[Any, ...]) -> Any:
        if not self._armed:
            return None
        h = args[0]
        if not h.requires_grad:
            h = h.detach().requires_grad_(True)
        self._values.append(h)
        return (h, *args[1:])

    def __enter__(self) -> NeuronTap:
        self._handles = [m.register_forward_pre_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def run(self, fn: Callable[[], Any]) -> tuple[Any, list[torch.Tensor]]:
        """Call ``fn`` (a forward) and return its output and the activations.

        Raises
        ------
        RuntimeError
            Outside ``with``, or when a module did not run exactly once.
        """
        if not self._handles:
            raise RuntimeError("NeuronTap.run needs the tap's `with` block")
        self._armed, self._values = True, []
        try:
            out = fn()
        finally:
            self._armed = False
        values, self._values = self._values, []
        if len(values) != len(self.modules):
            raise RuntimeError(
                f"captured {len(values)} activations for {len(self.modules)} modules"
            )
        return out, values


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Return the ``[B, T]`` mask of positions that predict an answer token.

    Position ``t`` predicts token ``t + 1`` (the causal shift of
    :func:`~fed_unlearn.losses.functional.token_nll`); the last position
    predicts nothing.
    """
    pos = torch.zeros_like(labels, dtype=torch.bool)
    pos[:, :-1] = labels[:, 1:] != LF.IGNORE_INDEX
    return pos


def attribution_from(
    activations: Sequence[torch.Tensor],
    logp: torch.Tensor,
    positions: torch.Tensor,
    graph: str = "none",
) -> torch.Tensor:
    """Gradient x activation of each neuron, per item.

    Parameters
    ----------
    activations : Sequence[torch.Tensor]
        ``[B, T, n_l]`` activations in the graph of ``logp`` (one per layer).
    logp : torch.Tensor
        Scalar: the batch's summed answer log-likelihood (items independent).
    positions : torch.Tensor
        ``[B, T]`` mask of the positions summed over (:func:`answer_positions`).
    graph : str
        ``"none"``: detached result (a measurement); ``"surrogate"``: the result
        is differentiable through the activations only (the gradient is
        detached); ``"exact"``: differentiable through both (``create_graph``).

    Returns
    -------
    torch.Tensor
        ``[B, Σ_l n_l]`` attributions ``Σ_t h·∂logp/∂h`` (float32, or the
        activations' dtype when wider), layers concatenated in order.

    Raises
    ------
    ValueError
        An unknown ``graph``.
    """
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
    grads = torch.autograd.grad(
        logp,
        list(activations),
        retain_graph=graph != "none",
        create_graph=graph == "exact",
        allow_unused=True,
    )
    parts = []
    for h, g in zip(activations, grads, strict=True):
        if g is None:  # a layer after every scored position cannot matter
            g = torch.zeros_like(h)
        if graph == "surrogate":
            g = g.detach()
        elif graph == "none":
            h, g = h.detach(), g.detach()
        dt = torch.promote_types(h.dtype, torch.float32)
        mask = positions.to(dt)
        parts.append(torch.einsum("btn,btn,bt->bn", h.to(dt), g.to(dt), mask))
    return torch.cat(parts, dim=1)


def model_attribution(
    model: torch.nn.Module, batch: Batch, tap: NeuronTap, graph: str = "none"
) -> torch.Tensor:
    """Per-item attribution of every tapped neuron for one batch.

    Parameters
    ----------
    model : torch.nn.Module
        The causal LM (its mode is the caller's).
    batch : Batch
        ``input_ids``, ``attention_mask``, ``labels`` (answer-only).
    tap : NeuronTap
        An entered tap on the model's neurons.
    graph : str
        See :func:`attribution_from`.

    Returns
    -------
    torch.Tensor
        ``[B, N]`` attributions.
    """
    with torch.enable_grad():
        out, hs = tap.run(
            lambda: model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            )
        )
        logp = -LF.sequence_nll(out.logits, batch["labels"]).sum()
        return attribution_from(hs, logp, answer_positions(batch["labels"]), graph)


def reference_attributions(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_fn: PromptFn,
    items: Sequence[QAItem],
    max_length: int,
    batch_size: int = 8,
) -> torch.Tensor:
    """Attributions of the model as it is now, for every item (in order).

    Run in eval mode; the model's mode is restored. The departed client calls
    it on the adapter it received before its first unlearning step, and keeps
    the result (``A^0``) for later rounds; the evaluator calls it on each
    model it measures.

    Parameters
    ----------
    model : torch.nn.Module
        Peft model or causal LM with Llama-style MLP blocks.
    tokenizer : PreTrainedTokenizerBase
        Its tokenizer (pad token set).
    prompt_fn : PromptFn
        Prompt format.
    items : Sequence[QAItem]
        The items.
    max_length : int
        Max tokens per item (as in training).
    batch_size : int
        Items per forward (default: 8).

    Returns
    -------
    torch.Tensor
        ``[len(items), N]`` on the CPU (float32, or the model's dtype when
        wider).

    Raises
    ------
    ValueError
        No items, or a batch size below 1.
    """
    from fed_unlearn.training import _encoded

    if not items:
        raise ValueError("reference_attributions got no items")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    pad = int(tokenizer.pad_token_id)
    encoded = _encoded(tokenizer, prompt_fn, tuple(items), max_length)
    was_training = model.training
    rows = []
    try:
        model.eval()
        with NeuronTap.of(model) as tap:
            for s in range(0, len(encoded), batch_size):
                b = {
                    k: v.to(device)
                    for k, v in collate(encoded[s : s + batch_size], pad).items()
                }
                rows.append(model_attribution(model, b, tap, "none").cpu())
    finally:
        model.train(was_training)
    return torch.cat(rows, dim=0)


def attribution_scale(reference: torch.Tensor) -> float:
    """Return ``mean |A^0|``, the unit R is measured in.

    Raises
    ------
    ValueError
        An empty or all-zero (or non-finite) reference.
    """
    scale = float(reference.abs().mean()) if reference.numel() else 0.0
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(
            f"the reference attributions have no scale (mean |A^0| = {scale}): "
            "nothing to normalise the regulariser by"
        )
    return scale


def penalty_terms(
    attribution: torch.Tensor, reference: torch.Tensor | None = None
) -> torch.Tensor:
    """Elementwise Ssiuu penalty: variant (a) with a reference, else (b).

    Parameters
    ----------
    attribution : torch.Tensor
        ``A`` (any shape).
    reference : torch.Tensor, optional
        ``A^0`` of the same shape: (a) ``ReLU(-A - ReLU(-A^0))``; ``None``:
        (b) ``ReLU(-A)``.

    Returns
    -------
    torch.Tensor
        The penalty per element (R is their mean).

    Raises
    ------
    ValueError
        Shapes that differ.
    """
    if reference is None:
        return torch.relu(-attribution)
    if reference.shape != attribution.shape:
        raise ValueError(
            f"reference attributions have shape {tuple(reference.shape)}, the "
            f"attributions {tuple(attribution.shape)}"
        )
    return torch.relu(-attribution - torch.relu(-reference.to(attribution)))


@dataclass(frozen=True)
class AttributionSpec:
    """Settings of the regulariser.

    Parameters
    ----------
    weight : float
        λ > 0 on R.
    variant : str
        ``"increase"`` (a, needs ``A^0``) or ``"negative"`` (b).
    exact : bool
        Differentiate through the gradient (``create_graph``) instead of the
        detached-gradient surrogate (default: False).

    Raises
    ------
    ValueError
        λ not finite and > 0, or an unknown variant.
    """

    weight: float
    variant: str = "increase"
    exact: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(
                f"the attribution regulariser's weight must be finite and > 0, "
                f"got {self.weight}"
            )
        if self.variant not in VARIANTS:
            raise ValueError(
                f"attribution variant must be one of {VARIANTS}, got {self.variant!r}"
            )

    @property
    def needs_reference(self) -> bool:
        """Whether the variant reads ``A^0``."""
        return self.variant == "increase"


class AttributionRegulariser:
    """``λ·R`` of one forget batch, for :func:`~fed_unlearn.losses.unlearn_train`.

    A context manager (its tap lives inside ``with``). :meth:`__call__` runs one
    more trainable forward of the forget batch, takes the gradient of its
    answer log-likelihood with respect to the neurons and returns ``λ·R``,
    differentiable as :class:`AttributionSpec` says.

    Parameters
    ----------
    model : torch.nn.Module
        The peft model being unlearned.
    spec : AttributionSpec
        λ, variant, exact.
    reference : torch.Tensor
        ``[n_items, N]`` ``A^0`` of the forget items, rows in the order of the
        items :func:`~fed_unlearn.losses.unlearn_train` gets: variant (a) reads
        it; both divide R by its :func:`attribution_scale`.
    """

    def __init__(
        self, model: torch.nn.Module, spec: AttributionSpec, reference: torch.Tensor
    ) -> None:
        self.model = model
        self.spec = spec
        self.scale = attribution_scale(reference)
        self.reference = reference if spec.needs_reference else None
        self.n_items = int(reference.size(0))
        self.tap = NeuronTap.of(model)
        self.tokens = 0
        self.penalties: list[float] = []

    def __enter__(self) -> AttributionRegulariser:
        self.tap.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.tap.__exit__(*exc)

    def check_items(self, n_items: int) -> None:
        """Raise unless the reference has one row per forget item."""
        if self.n_items != n_items:
            raise ValueError(
                f"the reference attributions cover {self.n_items} items, the "
                f"forget set has {n_items}"
            )

    def mean_penalty(self) -> float:
        """Return the mean R (normalised, without λ) over the steps so far."""
        return sum(self.penalties) / len(self.penalties) if self.penalties else 0.0

    def __call__(self, batch: Batch, index: Sequence[int]) -> torch.Tensor:
        """Return ``λ·R`` of a forget batch whose rows are items ``index``.

        Parameters
        ----------
        batch : Batch
            The forget batch (labels answer-only).
        index : Sequence[int]
            Item indices of its rows (rows of the reference).

        Returns
        -------
        torch.Tensor
            Scalar, in the graph.
        """
        self.tokens += int(batch["attention_mask"].sum())
        if self.spec.exact:
            # fused attention kernels have no double backward; the math one has
            with sdpa_kernel(SDPBackend.MATH):
                att = model_attribution(self.model, batch, self.tap, "exact")
        else:
            att = model_attribution(self.model, batch, self.tap, "surrogate")
        ref = None
        if self.reference is not None:
            ref = self.reference[list(index)].to(att.device)
        r = penalty_terms(att, ref).mean() / self.scale
        self.penalties.append(float(r.detach()))
        return self.spec.weight * r
