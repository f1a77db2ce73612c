"""Registry of the inner unlearning losses and their per-step objectives.

Every loss is ``L = γ·L_forget + α·L_retain`` (open-unlearning @ d3d7cf9 [V]);
``L_retain = NLL_mean`` of a retain batch (RMU: the activation distance to the
reference), and it is simply left out when no retain batch is given. Sources,
equations and quirks:

* ``ga`` — Gradient Ascent (``GradAscent``) [V]: ``L_forget = -NLL_mean(D_f)``;
  never a retain term. Unbounded: collapses utility fast.
* ``gd`` — Gradient Difference (``GradDiff``, retain NLL) [V]: GA + ``α·NLL_mean(D_r)``.
* ``npo`` — NPO (Zhang et al. 2024; ``NPO``) [V]:
  ``-(2/β)·mean log σ(-β·(log π_θ(y|x) - log π_ref(y|x)))`` with sequence sums;
  β = 0.1.
* ``simnpo`` — SimNPO (Fan et al. 2024; ``SimNPO``) [V]:
  ``-(2/β)·mean log σ(β·(NLL_sum/|y| - δ))``; β = 4.5, δ = 0, γ = 0.125 (the
  open-unlearning default; MPU's client uses γ = 1). ``|y|`` counts the scored
  answer tokens after the shift (open-unlearning divides by the unshifted label
  count, identical unless the prompt was truncated away).
* ``idkdpo`` — IdkDPO (TOFU's IDK + DPO; ``DPO`` trainer) [V]: DPO scaled by
  ``2/β`` with win = a refusal from :data:`IDK_ANSWERS` (ours; open-unlearning
  reads ``data/idk.jsonl``) and lose = the true answer; β = 0.1.
* ``idknll`` — IdkNLL [R] (TOFU's "IDK" baseline, no trainer in
  open-unlearning): ``NLL_mean(y_idk | q_f)``.
* ``undial`` — UnDIAL (Dong et al. 2024; ``UNDIAL``) [V]: self-distillation onto
  ``q = softmax(z_ref - β·onehot(y_t))``, loss ``mean_t -Σ_v q_v log p_θ(v)`` over
  answer tokens. β = 10 and α = 1 as MPU's client; open-unlearning's standalone
  config uses α = 0 (no retain term) — pass ``{"alpha": 0}`` to match it.
* ``wga`` — Weighted Gradient Ascent (Wang et al. 2025) [V]:
  ``-mean_t[sg(p_t^β)·ℓ_t]``; β = 1.
* ``satimp`` — SatImp (Yang et al. 2025) [V]:
  ``-mean_t[sg(p_t^β1·(1-p_t)^β2)·ℓ_t]``; β1 = 5, β2 = 1, γ = 1 as MPU's client
  (open-unlearning's standalone default is γ = 0.1).
* ``rmu`` — RMU (Li et al. 2024, WMDP; ``RMU``) [V loss, R LoRA variant]:
  ``L_forget = D(H^l_θ(x_f), u)``, ``L_retain = D(H^l_θ(x_r), H^l_ref(x_r))`` with
  :func:`~fed_unlearn.losses.functional.masked_mse` ``D`` on the answer tokens and
  ``u = c·r/‖r‖``, ``r ~ U[0,1)^d`` drawn once per call from its seed; c = 2.
  ``layer = -1`` means ``num_hidden_layers // 2`` (open-unlearning hard-codes
  ``model.layers.7`` for 16-layer models). Only LoRA tensors of layers ≤ l can
  move (the forward stops after layer l). c and α need per-model tuning.
* ``uce`` — Unlearning Cross-Entropy (FedOSD, Pan et al. AAAI-25) [V code, R
  token mapping]: ``mean_t -log(1 - p_t/2)``, bounded in ``[0, log 2]``;
  forget-only.

The reference model (npo, idkdpo, undial, rmu) is the adapter at the start of the
call [R] (see :mod:`fed_unlearn.losses.reference`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fed_unlearn.losses import functional as LF
from fed_unlearn.losses.reference import FrozenReference, LayerTap

Batch = dict[str, torch.Tensor]


@dataclass
class StepBatches:
    """The batches of one optimiser step.

    Parameters
    ----------
    forget : dict[str, torch.Tensor]
        Forget batch (true answers).
    retain : dict[str, torch.Tensor] or None
        Retain batch, or ``None`` to omit the retain term.
    idk : dict[str, torch.Tensor] or None
        Same forget questions with refusal answers (IdkDPO / IdkNLL).
    both : dict[str, torch.Tensor] or None
        Refusal rows followed by true-answer rows in one padded batch (IdkDPO).
    """

    forget: Batch
    retain: Batch | None = None
    idk: Batch | None = None
    both: Batch | None = None


class StepContext:
    """What a loss needs during one call: model, reference, tap, parameters.

    Parameters
    ----------
    model : torch.nn.Module
        Peft model (train mode).
    params : dict[str, float]
        Resolved loss parameters.
    seed : int
        Seed of the call (RMU control vector).
    reference : FrozenReference, optional
        Reference model, when the loss needs one.
    tap : LayerTap, optional
        Hidden-state tap (RMU).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        params: dict[str, float],
        seed: int,
        reference: FrozenReference | None = None,
        tap: LayerTap | None = None,
    ) -> None:
        self.model = model
        self.params = params
        self.seed = seed
        self.reference = reference
        self.tap = tap
        self.tokens = 0
        self._control: torch.Tensor | None = None

    def _call(self, batch: Batch) -> Any:
        return self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )

    def logits(self, batch: Batch) -> torch.Tensor:
        """Run the trainable forward (counts the batch's tokens)."""
        self.tokens += int(batch["attention_mask"].sum())
        return self._call(batch).logits

    def ref_logits(self, batch: Batch) -> torch.Tensor:
        """Run the reference forward (no grad)."""
        assert self.reference is not None
        return self.reference.run(lambda: self._call(batch)).logits.detach()

    def hidden(self, batch: Batch, reference: bool = False) -> torch.Tensor:
        """Return the tapped hidden state, trainable or under the reference."""
        assert self.tap is not None
        tap = self.tap
        if reference:
            assert self.reference is not None
            return self.reference.run(lambda: tap(lambda: self._call(batch))).detach()
        self.tokens += int(batch["attention_mask"].sum())
        return tap(lambda: self._call(batch))

    def control(self, dim: int) -> torch.Tensor:
        """Return the RMU control vector (drawn once per call)."""
        if self._control is None:
            self._control = LF.rmu_control_vector(
                dim, self.params["steering_coeff"], self.seed
            )
        return self._control


Terms = tuple[torch.Tensor, torch.Tensor | None]
StepFn = Callable[[StepContext, StepBatches], Terms]


def _retain_nll(ctx: StepContext, b: StepBatches) -> torch.Tensor | None:
    if b.retain is None:
        return None
    return LF.mean_nll(ctx.logits(b.retain), b.retain["labels"])


def _ga(ctx: StepContext, b: StepBatches) -> Terms:
    return LF.ga_loss(ctx.logits(b.forget), b.forget["labels"]), None


def _gd(ctx: StepContext, b: StepBatches) -> Terms:
    forget = LF.ga_loss(ctx.logits(b.forget), b.forget["labels"])
    return forget, _retain_nll(ctx, b)


def _npo(ctx: StepContext, b: StepBatches) -> Terms:
    labels = b.forget["labels"]
    ref = -LF.sequence_nll(ctx.ref_logits(b.forget), labels)
    cur = -LF.sequence_nll(ctx.logits(b.forget), labels)
    return LF.npo_loss(cur, ref, ctx.params["beta"]), _retain_nll(ctx, b)


def _simnpo(ctx: StepContext, b: StepBatches) -> Terms:
    labels = b.forget["labels"]
    nll = LF.sequence_nll(ctx.logits(b.forget), labels)
    forget = LF.simnpo_loss(
        nll, LF.answer_lengths(labels), ctx.params["beta"], ctx.params["delta"]
    )
    return forget, _retain_nll(ctx, b)


def _idkdpo(ctx: StepContext, b: StepBatches) -> Terms:
    assert b.both is not None
    n = b.forget["input_ids"].size(0)
    labels = b.both["labels"]
    ref = -LF.sequence_nll(ctx.ref_logits(b.both), labels)
    cur = -LF.sequence_nll(ctx.logits(b.both), labels)
    forget = LF.dpo_loss(cur[:n], ref[:n], cur[n:], ref[n:], ctx.params["beta"])
    return forget, _retain_nll(ctx, b)


def _idknll(ctx: StepContext, b: StepBatches) -> Terms:
    assert b.idk is not None
    return LF.mean_nll(ctx.logits(b.idk), b.idk["labels"]), _retain_nll(ctx, b)


def _undial(ctx: StepContext, b: StepBatches) -> Terms:
    labels = b.forget["labels"]
    ref = ctx.ref_logits(b.forget)
    forget = LF.undial_loss(ctx.logits(b.forget), ref, labels, ctx.params["beta"])
    return forget, _retain_nll(ctx, b)


def _wga(ctx: StepContext, b: StepBatches) -> Terms:
    forget = LF.wga_loss(ctx.logits(b.forget), b.forget["labels"], ctx.params["beta"])
    return forget, _retain_nll(ctx, b)


def _satimp(ctx: StepContext, b: StepBatches) -> Terms:
    p = ctx.params
    logits = ctx.logits(b.forget)
    forget = LF.satimp_loss(logits, b.forget["labels"], p["beta1"], p["beta2"])
    return forget, _retain_nll(ctx, b)


def _rmu(ctx: StepContext, b: StepBatches) -> Terms:
    # reference forward first: no graph may see the in-place adapter swap
    ref_h = ctx.hidden(b.retain, reference=True) if b.retain is not None else None
    h_f = ctx.hidden(b.forget)
    u = ctx.control(h_f.size(-1)).to(h_f.device)
    forget = LF.masked_mse(h_f, u, b.forget["labels"] != LF.IGNORE_INDEX)
    if b.retain is None or ref_h is None:
        return forget, None
    h_r = ctx.hidden(b.retain)
    retain = LF.masked_mse(h_r, ref_h, b.retain["labels"] != LF.IGNORE_INDEX)
    return forget, retain


def _uce(ctx: StepContext, b: StepBatches) -> Terms:
    return LF.uce_token_loss(ctx.logits(b.forget), b.forget["labels"]), None


@dataclass(frozen=True)
class LossSpec:
    """One inner unlearning loss.

    Parameters
    ----------
    name : str
        Registry key.
    summary : str
        One line with the provenance tag.
    needs_reference : bool
        Uses the frozen start-of-call adapter as reference model.
    uses_retain : bool
        Adds ``α·L_retain`` when a retain batch is given.
    defaults : dict[str, float]
        Parameters and their defaults (``gamma``, ``alpha``, ``beta``, ...).
    step : StepFn
        ``(ctx, batches) -> (L_forget, L_retain or None)`` (internal).
    needs_idk : bool
        Needs the refusal-answer copies of the forget items (internal).
    needs_hidden : bool
        Needs a decoder-layer tap (internal).
    """

    name: str
    summary: str
    needs_reference: bool
    uses_retain: bool
    defaults: dict[str, float]
    step: StepFn = field(repr=False, compare=False)
    needs_idk: bool = False
    needs_hidden: bool = False

    def resolve(self, params: Mapping[str, float] | None = None) -> dict[str, float]:
        """Merge ``params`` over the defaults.

        Parameters
        ----------
        params : Mapping[str, float], optional
            Overrides of individual keys.

        Returns
        -------
        dict[str, float]
            All parameters of this loss.

        Raises
        ------
        ValueError
            Unknown key, non-finite value, or β ≤ 0 where it divides.
        """
        out = dict(self.defaults)
        for key, value in (params or {}).items():
            if key not in self.defaults:
                raise ValueError(
                    f"unknown parameter {key!r} for inner loss {self.name!r}; "
                    f"valid: {', '.join(sorted(self.defaults)) or '(none)'}"
                )
            try:
                val = float(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"parameter {key!r} of {self.name!r} must be a number, "
                    f"got {value!r}"
                ) from None
            if not math.isfinite(val):
                raise ValueError(f"parameter {key!r} of {self.name!r} must be finite")
            out[key] = val
        if self.name in ("npo", "simnpo", "idkdpo") and out["beta"] <= 0:
            raise ValueError(f"beta of {self.name!r} must be > 0, got {out['beta']}")
        return out


def _spec(
    name: str,
    summary: str,
    step: StepFn,
    *,
    ref: bool = False,
    retain: bool = True,
    **extra: Any,
) -> LossSpec:
    flags = {k: extra.pop(k) for k in ("needs_idk", "needs_hidden") if k in extra}
    defaults = {"gamma": 1.0, **({"alpha": 1.0} if retain else {}), **extra}
    return LossSpec(
        name,
        summary,
        ref,
        retain,
        {k: float(v) for k, v in defaults.items()},
        step,
        **flags,
    )


LOSSES: dict[str, LossSpec] = {
    s.name: s
    for s in (
        _spec(
            "ga",
            "gradient ascent: -NLL_mean(forget), no retain term [V open-unlearning]",
            _ga,
            retain=False,
        ),
        _spec(
            "gd",
            "gradient difference: -NLL_mean(forget) + α·NLL_mean(retain) [V]",
            _gd,
        ),
        _spec(
            "npo",
            "NPO: (2/β)·log(1+(π/π_ref)^β), ref = start adapter, β=0.1 [V]",
            _npo,
            ref=True,
            beta=0.1,
        ),
        _spec(
            "simnpo",
            "SimNPO: -(2/β)·log σ(β·(NLL/|y| - δ)), β=4.5, δ=0, γ=0.125 [V]",
            _simnpo,
            beta=4.5,
            delta=0.0,
            gamma=0.125,
        ),
        _spec(
            "idkdpo",
            "IdkDPO: DPO with refusal as win, true answer as lose, β=0.1 [V]",
            _idkdpo,
            ref=True,
            beta=0.1,
            needs_idk=True,
        ),
        _spec(
            "idknll",
            "IdkNLL: NLL of refusals on forget questions + retain NLL [R]",
            _idknll,
            needs_idk=True,
        ),
        _spec(
            "undial",
            "UnDIAL: distil onto softmax(z_ref - β·onehot(y)), β=10 (MPU) [V]",
            _undial,
            ref=True,
            beta=10.0,
        ),
        _spec(
            "wga",
            "WGA: -mean sg(p^β)·CE on forget tokens, β=1 [V]",
            _wga,
            beta=1.0,
        ),
        _spec(
            "satimp",
            "SatImp: -mean sg(p^β1·(1-p)^β2)·CE, β1=5, β2=1, γ=1 (MPU) [V]",
            _satimp,
            beta1=5.0,
            beta2=1.0,
        ),
        _spec(
            "rmu",
            "RMU: steer layer-l activations to c·u, keep retain ones, c=2 [V/R LoRA]",
            _rmu,
            ref=True,
            steering_coeff=2.0,
            layer=-1.0,
            needs_hidden=True,
        ),
        _spec(
            "uce",
            "UCE (FedOSD): mean -log(1 - p/2) per answer token, forget-only [V/R]",
            _uce,
            retain=False,
        ),
    )
}


def get_loss(name: str) -> LossSpec:
    """Look up an inner loss by name.

    Parameters
    ----------
    name : str
        Registry key (see :data:`LOSSES`).

    Returns
    -------
    LossSpec
        The loss.

    Raises
    ------
    KeyError
        Unknown name (the message lists the known ones).
    """
    try:
        return LOSSES[name]
    except KeyError:
        raise KeyError(
            f"unknown inner loss {name!r}; known: {', '.join(sorted(LOSSES))}"
        ) from None


def list_losses() -> list[tuple[str, str]]:
    """Names and one-line summaries of all inner losses, sorted by name.

    Returns
    -------
    list[tuple[str, str]]
        ``(name, summary)`` pairs.
    """
    return sorted((s.name, s.summary) for s in LOSSES.values())
