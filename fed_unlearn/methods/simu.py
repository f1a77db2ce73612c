"""SIMU: Selective Influence Machine Unlearning, federated on LoRA.

Paper: Agarwal, Pamnani, Hakkani-Tür, "SIMU" (arXiv 2510.07822, NeurIPS'25
COML workshop); no code released. Spec: ``shared/specs/methods.md`` §1.1 (and
§5b's attribution sketch). The optimiser follows SOUL's code
(``OPTML-Group/SOUL``).

Stage 1, critical MLP neurons [P formula, R federated placement]
    The server sends the trained adapter to every client in one ``attribution``
    request (:mod:`fed_unlearn.protocol`). Each client scores the MLP neurons
    (the input of ``down_proj``) on its own items by integrated gradients with m
    scaling steps (:mod:`fed_unlearn.attribution`: score = −Att, the attribution
    of the answers' log-likelihood [R sign]; per-position attributions summed
    over answer positions [R]) and returns one score vector per layer, summed
    over its items. The departed clients' items are the forget set D_f, the
    remaining clients' the retain set D_r: the server sums each group's vectors.
    Critical neurons: ``score >= t · max(layer)`` per layer [P threshold, R
    relative to the layer max as in DEPN]; dual neurons: critical for D_f and
    for D_r [P]. The update mask is M = critical(D_f), duals included (the
    paper's better ablation) [P]; ``exclude_duals`` gives M' = critical(D_f)
    minus critical(D_r).
Stage 2, masked second-order unlearning [P, V optimiser, R LoRA port]
    Trainable: every attention LoRA tensor (all that is not ``gate_proj``,
    ``up_proj`` or ``down_proj``), the rows of ``lora_B`` of ``gate_proj`` and
    ``up_proj`` and the columns of ``lora_A`` of ``down_proj`` of the selected
    neurons [R]. ``lora_A`` of gate/up and ``lora_B`` of down are shared by all
    neurons of the layer and stay frozen, so ``ΔW``'s rows (gate, up) and
    columns (down) of the other neurons never change; every other LoRA entry
    stays bit-identical (the client masks the gradients and restores the
    entries after every step, :class:`~fed_unlearn.optim.MaskedOptimizer`; the
    server applies the returned deltas only on the mask). Loss SIMU-GradDiff
    [V SOUL "GA+FT"]: ``−NLL_mean(D_f) + γ·NLL_mean(D_r)`` = the ``gd`` inner
    loss, γ = its ``alpha`` (default 1, open-unlearning's; SOUL used 2 with
    Sophia and 0.3 with AdamW). Optimiser: SophiaG exactly as in SOUL
    (:class:`~fed_unlearn.optim.SophiaG`: ``h`` from ``g⊙g`` every step,
    decoupled weight decay, clipped sign step; β = (0.9, 0.95), ρ = 0.04,
    bs = 5120) [V]. The departed clients run it on their own items for
    ``local_epochs`` per round, from fresh optimiser state each round [R], as
    ``local_unlearn`` does; rounds and learning rate are stated relative to the
    FL run (``lr_scale`` × its rate): an oracle-free budget stop.
Where the retain term comes from [R]
    From the inner losses' ``retain`` source, public proxy data by default
    (``retain="proxy"``; ``"local"`` for a departed node with its own non-forget
    data). SophiaG's curvature and momentum are statistics of the *combined*
    gradient of one minibatch step; a retain gradient aggregated from the
    remaining clients would cost one federated round per optimiser step, and
    interleaved FedAvg recovery rounds would move every LoRA entry (breaking
    the mask). The remaining clients' data still shape the mask through the
    dual-neuron attribution. ``interleave_recovery`` / ``recovery_rounds`` are
    available but off by default; with them on, the recovery rounds update the
    whole adapter (not only the mask).
Baselines of the paper's claim (same cells, same loss and budget)
    FO-GradDiff = ``optimizer="adamw", mask=false``; SO-GradDiff (SOUL) =
    ``optimizer="sophia", mask=false``. With ``mask=false`` no attribution runs.
Privacy
    Only the adapter, the per-layer score sums (over ≥ ``min-examples`` items of
    each client) and the deltas cross the wire. Like ``local_unlearn`` the
    departed client sees the clean adapter.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch

from fed_unlearn import attribution as attr
from fed_unlearn.adapters import neuron_axis
from fed_unlearn.methods.base import (
    ClientFailure,
    Requirement,
    UnlearnContext,
    UnlearningMethod,
    UnlearnResult,
)
from fed_unlearn.methods.mpu import InnerLossConfig
from fed_unlearn.methods.rounds import check_positive, copy_deltas
from fed_unlearn.optim import OPTIMIZERS, SOPHIA_DEFAULTS
from fed_unlearn.protocol import AttributionReply, AttributionRequest
from fed_unlearn.types import AdapterState, ClientId

#: ``...layers.<l>.mlp.<gate|up|down>_proj.lora_<A|B>...``: an MLP LoRA tensor.
_MLP = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.(gate|up|down)_proj\.lora_([AB])\b")
#: The MLP LoRA factors indexed by the neurons (module docstring): rows of B of
#: gate/up, columns of A of down. The other three are shared by all neurons.
_SLICED = {("gate", "B"), ("up", "B"), ("down", "A")}


def mlp_layout(state: AdapterState) -> dict[str, tuple[int, bool]]:
    """Map each MLP LoRA tensor of an adapter to ``(layer, sliced by neuron)``.

    Parameters
    ----------
    state : AdapterState
        The adapter (only its keys are used).

    Returns
    -------
    dict[str, tuple[int, bool]]
        Key -> decoder layer and whether its neuron rows/columns train under the
        mask (``lora_B`` of gate/up, ``lora_A`` of down) or it stays frozen
        (``lora_A`` of gate/up, ``lora_B`` of down). Attention tensors are absent.
    """
    out = {}
    for key in state:
        m = _MLP.search(key)
        if m is not None:
            out[key] = (int(m[1]), (m[2], m[3]) in _SLICED)
    return out


@dataclass(kw_only=True)
class SimuConfig(InnerLossConfig):
    """SIMU options (and those of :class:`~fed_unlearn.methods.mpu.InnerLossConfig`).

    Parameters
    ----------
    inner_loss : str
        The departed clients' loss (default: ``"gd"``, SIMU-GradDiff; its
        ``alpha`` loss param is γ).
    retain : str
        Retain term source (default: ``"proxy"``; module docstring).
    interleave_recovery : bool
        A FedAvg round of the remaining clients after each round (default:
        False: it would move every LoRA entry).
    optimizer : str
        ``"sophia"`` (SophiaG, default) or ``"adamw"``.
    mask : bool
        Stage 1 and the neuron mask (default: True). False trains every LoRA
        tensor (the FO/SO-GradDiff baselines).
    threshold : float
        t of the layer-wise relative threshold, in (0, 1] (default: 0.2, the
        middle of the spec's sweep {0.1, 0.2, 0.3}; SIMU's value unknown) [R].
    ig_steps : int
        m, integrated-gradient scaling steps (default: 10; knowledge-neuron
        code uses 20, SIMU's value is unknown) [R]. Stage 1 costs each client
        m x (decoder layers) forward/backward passes' worth of its items, e.g.
        40 epochs of its data on the 4-layer tiny model at m = 10: the
        default halves the knowledge-neuron cost.
    exclude_duals : bool
        Leave the dual neurons out of the mask (default: False, the paper's
        better ablation).
    retain_attribution : bool
        The remaining clients score their items too, for the dual neurons
        (default: True). With duals kept in the mask (the default) they only
        inform ``info["duals_per_layer"]``: False skips that cost. Needed by
        ``exclude_duals``.
    sophia_beta1, sophia_beta2, sophia_rho, sophia_bs : float
        SophiaG's β1, β2, ρ and bs (defaults: SOUL's 0.9, 0.95, 0.04, 5120).
    weight_decay : float
        Decoupled weight decay of either optimiser (default: 0.0, as FL
        training; SOUL used 0.1 on full weights, which on LoRA factors pulls
        the whole adapter towards the base model).
    """

    inner_loss: str = "gd"
    retain: str = "proxy"
    interleave_recovery: bool = False
    optimizer: str = "sophia"
    mask: bool = True
    threshold: float = 0.2
    ig_steps: int = 10
    exclude_duals: bool = False
    retain_attribution: bool = True
    sophia_beta1: float = SOPHIA_DEFAULTS["beta1"]
    sophia_beta2: float = SOPHIA_DEFAULTS["beta2"]
    sophia_rho: float = SOPHIA_DEFAULTS["rho"]
    sophia_bs: float = SOPHIA_DEFAULTS["bs"]
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"
            )
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.exclude_duals and not self.retain_attribution:
            raise ValueError(
                "exclude_duals needs the remaining clients' retain attribution "
                "(retain_attribution=true)"
            )
        if self.ig_steps < 1:
            raise ValueError(f"ig_steps must be >= 1, got {self.ig_steps}")
        for name in ("sophia_beta1", "sophia_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        check_positive(sophia_rho=self.sophia_rho, sophia_bs=self.sophia_bs)
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        super().__post_init__()

    def optimizer_params(self) -> dict[str, float]:
        """Return the ``optimizer-params`` of the local-update (Sophia's only)."""
        if self.optimizer != "sophia":
            return {}
        return {
            "beta1": self.sophia_beta1,
            "beta2": self.sophia_beta2,
            "rho": self.sophia_rho,
            "bs": self.sophia_bs,
        }


@dataclass
class NeuronMask:
    """Stage 1's outcome: what trains and the figures of the attribution.

    Parameters
    ----------
    trainable : set[str]
        Adapter keys the departed clients train (the copies carry them).
    neurons : dict[str, list[int]]
        Sliced tensor -> its selected neurons.
    masks : dict[str, torch.Tensor]
        Sliced tensor -> boolean entry mask of its shape.
    info : dict[str, Any]
        Per-layer counts of critical, dual and selected neurons.
    """

    trainable: set[str]
    neurons: dict[str, list[int]]
    masks: dict[str, torch.Tensor]
    info: dict[str, Any]


def build_mask(
    theta: AdapterState,
    forget: list[torch.Tensor],
    retain: list[torch.Tensor] | None,
    threshold: float,
    exclude_duals: bool,
) -> NeuronMask:
    """Turn summed score vectors into the LoRA entries SIMU trains.

    Parameters
    ----------
    theta : AdapterState
        The adapter.
    forget : list[torch.Tensor]
        Per-layer forget scores (summed over the departed clients).
    retain : list[torch.Tensor], optional
        Per-layer retain scores (summed over the remaining clients); ``None``
        when no remaining client answered (no duals).
    threshold : float
        t.
    exclude_duals : bool
        Leave dual neurons out.

    Returns
    -------
    NeuronMask
        The trainable keys, neuron lists, entry masks and figures.

    Raises
    ------
    ValueError
        Scores that do not fit the adapter's MLP tensors (layer or size).
    """
    crit_f = attr.critical_neurons(forget, threshold)
    duals = None
    if retain is not None:
        duals = attr.dual_neurons(crit_f, attr.critical_neurons(retain, threshold))
    selected = [
        f & ~d if exclude_duals and duals is not None else f
        for f, d in zip(crit_f, duals or crit_f, strict=True)
    ]
    layout = mlp_layout(theta)
    trainable = {k for k in theta if k not in layout}
    neurons: dict[str, list[int]] = {}
    masks: dict[str, torch.Tensor] = {}
    for key, (layer, sliced) in sorted(layout.items()):
        if layer >= len(selected):
            raise ValueError(
                f"simu: the scores cover {len(selected)} layers, but adapter tensor "
                f"{key} is in layer {layer}"
            )
        if not sliced:
            continue
        axis = neuron_axis(key)
        if theta[key].shape[axis] != selected[layer].numel():
            raise ValueError(
                f"simu: {key} has {theta[key].shape[axis]} neurons, the scores of "
                f"layer {layer} {selected[layer].numel()}"
            )
        picked = torch.nonzero(selected[layer]).flatten().tolist()
        if not picked:
            continue  # no neuron of this layer trains: the tensor stays frozen
        trainable.add(key)
        neurons[key] = picked
        shape = [1, 1]
        shape[axis] = -1
        masks[key] = selected[layer].view(shape).expand_as(theta[key]).clone()
    info: dict[str, Any] = {
        "critical_per_layer": [int(m.sum()) for m in crit_f],
        "selected_per_layer": [int(m.sum()) for m in selected],
        "neurons_per_layer": [int(m.numel()) for m in selected],
    }
    if duals is not None:
        info["duals_per_layer"] = [int(m.sum()) for m in duals]
    return NeuronMask(trainable, neurons, masks, info)


class Simu(UnlearningMethod):
    """Attribution-masked SophiaG GradDiff by the departed clients (SIMU)."""

    summary = (
        "SIMU: IG-critical MLP neurons (+ attention) unlearned with masked "
        "SophiaG GradDiff; options give FO/SO-GradDiff [P/V optimiser/R]"
    )
    requires = frozenset({Requirement.LIVE_CLIENTS, Requirement.DEPARTED_COOPERATION})
    config: SimuConfig

    def _attribute(
        self, ctx: UnlearnContext, theta: AdapterState
    ) -> tuple[NeuronMask, dict[str, Any]]:
        """Stage 1: one ``attribution`` request to every client; build the mask."""
        cfg = self.config
        assert ctx.clients is not None
        request = AttributionRequest(theta, steps=cfg.ig_steps)
        every = (*ctx.departed, *(ctx.remaining if cfg.retain_attribution else ()))
        dropped: dict[ClientId, str] = {}
        try:
            replies: dict[ClientId, AttributionReply] = ctx.clients.query(
                dict.fromkeys(every, request)
            )
        except ClientFailure as exc:
            # the duals can do without a remaining client; the forget set cannot
            if any(c not in exc.replies for c in ctx.departed):
                raise
            replies, dropped = dict(exc.replies), dict(exc.failed)
        forget = attr.sum_scores([replies[c].scores for c in ctx.departed])
        kept = [replies[c].scores for c in ctx.remaining if c in replies]
        retain = attr.sum_scores(kept) if kept else None
        mask = build_mask(theta, forget, retain, cfg.threshold, cfg.exclude_duals)
        cost: dict[str, Any] = {
            **(
                {"attribution_dropped": {str(c): w for c, w in dropped.items()}}
                if dropped
                else {}
            ),
            "attribution_passes": float(sum(r.passes for r in replies.values())),
            "attribution_seconds": float(
                sum(r.attribution_seconds for r in replies.values())
            ),
        }
        return mask, cost

    def unlearn(self, ctx: UnlearnContext) -> UnlearnResult:
        """Run stage 1 (with ``mask``) and the rounds of stage 2."""
        self.check(ctx)
        cfg = self.config
        assert ctx.clients is not None
        theta, log = cfg.begin(ctx)
        info: dict[str, Any] = {
            "optimizer": cfg.optimizer,
            "mask": cfg.mask,
            "threshold": cfg.threshold,
            "ig_steps": cfg.ig_steps,
            "exclude_duals": cfg.exclude_duals,
        }
        if cfg.mask:
            mask, cost = self._attribute(ctx, theta)
            info.update(mask.info, **cost)
        else:
            mask = NeuronMask(set(theta), {}, {}, {})
        total = sum(v.numel() for v in theta.values())
        free = sum(
            int(mask.masks[k].sum()) if k in mask.masks else theta[k].numel()
            for k in mask.trainable
        )
        info["trainable_fraction"] = free / total
        r = 0
        for r in range(1, cfg.rounds + 1):
            copy = {k: theta[k] for k in sorted(mask.trainable)}
            base = {k: v for k, v in theta.items() if k not in mask.trainable}
            request = dataclasses.replace(
                cfg.request([copy], seed_round=r),
                base=base,
                optimizer=cfg.optimizer,
                optimizer_params=cfg.optimizer_params(),
                weight_decay=cfg.weight_decay,
                neurons=mask.neurons,
            )
            replies = ctx.clients.query(dict.fromkeys(ctx.departed, request))
            log.add_compute(replies)
            parts = list(copy_deltas(replies, copy, "simu").values())
            step = cfg.merge([d for d, _ in parts], [w for _, w in parts])
            theta = {**theta}
            for k, d in step.items():
                moved = theta[k] + cfg.server_lr * d
                # entries outside the mask stay bit-identical, whatever came back
                theta[k] = (
                    torch.where(mask.masks[k], moved, theta[k])
                    if k in mask.masks
                    else moved
                )
            theta = cfg.repair(ctx, theta, log, r, "simu")
            norm = float(torch.cat([d.flatten() for d in step.values()]).norm())
            if log.end_round(r, theta, {"step_norm": norm}):
                break
        return cfg.finish(ctx, theta, log, r, "simu", **info)
