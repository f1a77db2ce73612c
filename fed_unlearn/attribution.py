"""Integrated-gradient attribution of MLP neurons, thresholds and dual neurons.

SIMU's stage 1 (spec ``methods.md`` §1.1, §5b): a *neuron* ``k`` of layer ``l`` is
one coordinate of the MLP intermediate activation, the input of ``down_proj``
(Llama: ``h = act(gate(x)) · up(x)``, ``h ∈ R^{d_ff}``).

Attribution [P formula, R pooling and batching]. For an answer loss ``L``
(:func:`answer_nll`: ``Σ_i −log p(y_i | x_i)``, the sum over the examples of a
batch of their answer-token NLL) and layer ``l``, the neuron activations at the
*answer positions* (the positions whose logits predict an answer token) are
scaled together by ``α_j = j/m``, ``j = 1..m``, every other position and layer
left as it is; one backward per ``j`` reads ``∂L/∂a`` at every neuron and position
at once (several steps per pass, as stacked copies of the batch). The right
Riemann sum of integrated gradients, summed over answer
positions and examples, is::

    Att_k^l = Σ_i Σ_t h_{k,t}^{l,i} · (1/m) Σ_j ∂L_i/∂a_{k,t}(α_j · h)

Completeness: ``Σ_k Att_k^l → L(h) − L(h with those activations zeroed)`` as
``m → ∞``. Cost: ``m`` forward/backward passes' worth of rows per layer and
batch.

Sign convention [R]: the *score* is ``−Att``, the attribution of the answer's
log-likelihood. A neuron with a large positive score raises the probability of
the answers (it is what unlearning should remove); one with a negative score
lowers it. Thresholds look at the positive side only.

Critical neurons [P, R relative threshold]: neuron ``k`` of layer ``l`` is critical
when ``score_k^l >= t · max_k' score_k'^l`` and its score is positive (a layer
whose largest score is not positive has none). Dual neurons [P]: critical for
the forget set *and* for the retain set.

Every function works on one score vector per layer (index = decoder layer),
summed over examples, which is all that a client sends (``attribution`` kind of
:mod:`fed_unlearn.protocol`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from fed_unlearn.losses.functional import IGNORE_INDEX, token_nll

__all__ = [
    "answer_nll",
    "answer_positions",
    "critical_neurons",
    "dual_neurons",
    "integrated_gradients",
    "mlp_down_projections",
    "neuron_scores",
    "sum_scores",
]

Batch = dict[str, torch.Tensor]


def answer_positions(batch: Batch) -> torch.Tensor:
    """Positions whose logits predict an answer token (``[B, T]`` bool).

    Parameters
    ----------
    batch : dict[str, torch.Tensor]
        With ``labels`` (``-100`` outside the answer).

    Returns
    -------
    torch.Tensor
        True at ``t`` where ``labels[:, t+1]`` is an answer token.
    """
    labels = batch["labels"]
    pos = torch.zeros_like(labels, dtype=torch.bool)
    pos[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return pos


def answer_nll(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """``Σ_i NLL_sum(y_i | x_i)``: the answer NLL summed over a batch's examples.

    Parameters
    ----------
    model : torch.nn.Module
        A causal LM (peft-wrapped or not).
    batch : dict[str, torch.Tensor]
        ``input_ids``, ``attention_mask`` and ``labels``.

    Returns
    -------
    torch.Tensor
        Scalar (float32).
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    nll, _ = token_nll(out.logits, batch["labels"])
    return nll.sum()


def mlp_down_projections(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Return the ``mlp.down_proj`` module of every decoder layer, in order.

    Parameters
    ----------
    model : torch.nn.Module
        Llama-style causal LM, peft-wrapped or not.

    Returns
    -------
    list[torch.nn.Module]
        One module per layer (a peft LoRA wrapper where ``down_proj`` is adapted:
        its input feeds both the base weight and the adapter).

    Raises
    ------
    ValueError
        A layer without ``mlp.down_proj``.
    """
    from fed_unlearn.losses.reference import decoder_layers

    out = []
    for i, layer in enumerate(decoder_layers(model)):
        down = getattr(getattr(layer, "mlp", None), "down_proj", None)
        if not isinstance(down, torch.nn.Module):
            raise ValueError(
                f"decoder layer {i} has no mlp.down_proj: SIMU's neurons are the "
                "input of a Llama-style MLP's down projection"
            )
        out.append(down)
    return out


def integrated_gradients(
    model: torch.nn.Module,
    modules: Sequence[torch.nn.Module],
    batches: Sequence[Batch],
    steps: int = 20,
    loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor] = answer_nll,
    positions_fn: Callable[[Batch], torch.Tensor] = answer_positions,
    steps_per_pass: int = 1,
    stats: dict[str, int] | None = None,
) -> list[torch.Tensor]:
    """Integrated gradients of ``loss_fn`` w.r.t. each module's input neurons.

    For every module (one layer at a time), the input coordinates at the
    positions ``positions_fn`` selects are scaled by ``j/steps``,
    ``j = 1..steps`` (module docstring). The scaling is batched: one
    forward/backward pass runs ``steps_per_pass`` scaling steps at once, as
    copies of the batch stacked along the batch axis (each copy's loss depends
    on its own rows only, so one backward gives every step's gradient).

    Parameters
    ----------
    model : torch.nn.Module
        The model; ``loss_fn(model, batch)`` runs it. Put in eval mode during the
        call (no dropout) and restored after.
    modules : Sequence[torch.nn.Module]
        The modules whose *input* (last dimension = neurons, ``[B, T, d]``) is
        attributed; :func:`mlp_down_projections` for SIMU.
    batches : Sequence[dict[str, torch.Tensor]]
        Batches on the model's device (iterated once per module); every value
        is a tensor whose first axis is the batch.
    steps : int
        ``m >= 1`` scaling steps (default: 20, knowledge-neuron practice).
    loss_fn : Callable, optional
        ``(model, batch) -> scalar`` summed over the batch's examples (default:
        :func:`answer_nll`).
    positions_fn : Callable, optional
        ``batch -> [B, T]`` bool positions to scale and attribute (default:
        :func:`answer_positions`).
    steps_per_pass : int
        Scaling steps per forward/backward pass (default: 1: one backward per
        step; more trades memory for fewer passes).
    stats : dict[str, int], optional
        When given, ``stats["passes"]`` counts the passes run.

    Returns
    -------
    list[torch.Tensor]
        Per module: the ``[d]`` float32 attribution ``Att`` of the loss, summed
        over positions and examples.

    Raises
    ------
    ValueError
        ``steps < 1``, ``steps_per_pass < 1``, no batches or no modules.
    """
    if steps < 1 or steps_per_pass < 1:
        raise ValueError(
            f"integrated_gradients: steps and steps_per_pass must be >= 1, got "
            f"{steps} and {steps_per_pass}"
        )
    if not batches or not modules:
        raise ValueError("integrated_gradients needs at least one batch and module")
    state: dict[str, Any] = {}

    def pre_hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        h = args[0].detach()
        pos = state["pos"].to(h.device)[..., None]
        alpha = state["alpha"].to(device=h.device, dtype=h.dtype)[:, None, None]
        hs = (h * torch.where(pos, alpha, torch.ones_like(alpha))).requires_grad_(True)
        state["h"], state["hs"] = h, hs
        return (hs, *args[1:])

    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    try:
        with torch.enable_grad():
            for module in modules:
                total: torch.Tensor | None = None
                handle = module.register_forward_pre_hook(pre_hook)
                try:
                    for batch in batches:
                        pos = positions_fn(batch)
                        rows = pos.shape[0]
                        grad_sum: torch.Tensor | None = None
                        for first in range(1, steps + 1, steps_per_pass):
                            js = torch.arange(
                                first, min(first + steps_per_pass, steps + 1)
                            )
                            c = len(js)
                            state["pos"] = pos.repeat(c, 1)
                            state["alpha"] = (js / steps).repeat_interleave(rows)
                            stacked = {
                                k: v.repeat(c, *[1] * (v.dim() - 1))
                                for k, v in batch.items()
                            }
                            loss = loss_fn(model, stacked)
                            (g,) = torch.autograd.grad(loss, state["hs"])
                            g = g.float().view(c, rows, *g.shape[1:]).sum(0)
                            grad_sum = g if grad_sum is None else grad_sum + g
                            if stats is not None:
                                stats["passes"] = stats.get("passes", 0) + 1
                        assert grad_sum is not None
                        h = state["h"][:rows].float()  # every copy's h is the same
                        mask = pos.to(grad_sum.device)[..., None]
                        att = (h * grad_sum / steps * mask).sum((0, 1))
                        total = att if total is None else total + att
                finally:
                    handle.remove()
                    state.clear()
                assert total is not None
                out.append(total.detach().cpu())
    finally:
        model.train(was_training)
    return out


def neuron_scores(
    model: torch.nn.Module,
    batches: Sequence[Batch],
    steps: int = 20,
    rows_per_pass: int = 32,
    stats: dict[str, int] | None = None,
) -> list[torch.Tensor]:
    """SIMU neuron scores of a causal LM on some batches: ``−Att`` per layer.

    Parameters
    ----------
    model : torch.nn.Module
        Llama-style causal LM (peft-wrapped or not).
    batches : Sequence[dict[str, torch.Tensor]]
        Collated Q/A batches on the model's device.
    steps : int
        Scaling steps m (default: 20).
    rows_per_pass : int
        Rows (examples x scaling steps) per forward/backward pass (default: 32):
        ``steps_per_pass = max(1, rows_per_pass // batch size)``.
    stats : dict[str, int], optional
        When given, ``stats["passes"]`` counts the passes run.

    Returns
    -------
    list[torch.Tensor]
        Per decoder layer, the ``[d_ff]`` score vector summed over the examples
        (positive = supports the answers; module docstring).
    """
    size = max(int(b["input_ids"].shape[0]) for b in batches) if batches else 1
    att = integrated_gradients(
        model,
        mlp_down_projections(model),
        batches,
        steps,
        steps_per_pass=max(1, rows_per_pass // size),
        stats=stats,
    )
    return [-a for a in att]


def _check_layers(name: str, scores: Sequence[torch.Tensor]) -> None:
    if not scores:
        raise ValueError(f"{name}: no layers")
    for i, s in enumerate(scores):
        if s.dim() != 1 or not torch.isfinite(s).all():
            raise ValueError(
                f"{name}: layer {i}'s scores must be a finite 1-D vector, got shape "
                f"{tuple(s.shape)}"
            )


def sum_scores(parts: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Sum several clients' per-layer score vectors layer by layer.

    Parameters
    ----------
    parts : Sequence[Sequence[torch.Tensor]]
        One list of per-layer vectors per client.

    Returns
    -------
    list[torch.Tensor]
        The per-layer sums.

    Raises
    ------
    ValueError
        No parts, or parts whose layer counts or sizes differ.
    """
    if not parts:
        raise ValueError("sum_scores: nothing to sum")
    shapes = [[tuple(s.shape) for s in p] for p in parts]
    if any(sh != shapes[0] for sh in shapes):
        raise ValueError(f"sum_scores: the parts' layer shapes differ: {shapes}")
    return [
        torch.stack([p[i].float() for p in parts]).sum(0) for i in range(len(parts[0]))
    ]


def critical_neurons(
    scores: Sequence[torch.Tensor], threshold: float
) -> list[torch.Tensor]:
    """Layer-wise relative threshold: ``score >= t · max(layer)`` and ``score > 0``.

    Parameters
    ----------
    scores : Sequence[torch.Tensor]
        Per-layer score vectors.
    threshold : float
        ``t`` in ``(0, 1]``.

    Returns
    -------
    list[torch.Tensor]
        Per layer, a bool vector (True = critical). A layer whose largest score
        is not positive has no critical neuron.

    Raises
    ------
    ValueError
        ``t`` outside ``(0, 1]`` or ill-formed scores.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold t must be in (0, 1], got {threshold}")
    _check_layers("critical_neurons", scores)
    out = []
    for s in scores:
        top = s.max()
        if top > 0:
            out.append((s >= threshold * top) & (s > 0))
        else:
            out.append(torch.zeros_like(s, dtype=torch.bool))
    return out


def dual_neurons(
    forget: Sequence[torch.Tensor], retain: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Neurons critical for the forget *and* the retain set (per layer).

    Parameters
    ----------
    forget, retain : Sequence[torch.Tensor]
        Per-layer bool masks of :func:`critical_neurons`.

    Returns
    -------
    list[torch.Tensor]
        Their per-layer intersection.

    Raises
    ------
    ValueError
        The two have different layer counts or sizes.
    """
    if [m.shape for m in forget] != [m.shape for m in retain]:
        raise ValueError(
            "dual_neurons: the forget and retain masks' layers differ: "
            f"{[tuple(m.shape) for m in forget]} vs {[tuple(m.shape) for m in retain]}"
        )
    return [f & r for f, r in zip(forget, retain, strict=True)]
