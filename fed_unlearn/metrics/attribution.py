"""MLP-neuron attribution diagnostics of unlearned models (``eval-attribution``).

The measurement behind Ssiuu's finding (Yang et al., arXiv 2509.22263 [P]):
standard unlearning leaves the neurons with positive attribution to the forget
answers intact and grows new, strongly *negative* ones that hide the answer.
For each model (original, unlearned, retrain) and every forget item, the
attribution of every MLP neuron (gradient x activation of the input of
``down_proj``, :mod:`fed_unlearn.losses.attribution_reg`) is computed; a
neuron's attribution is its mean over the forget items, ``Ā_n``. Reported per
model [R, the paper's analysis as the spec lists it]:

* ``histogram``: counts of ``Ā_n`` over ``edges`` shared by the models of a
  run (symmetric around 0, which is an edge; values beyond are counted in the
  end bins);
* ``positive_mass`` / ``negative_mass``: ``Σ_n max(Ā_n, 0)`` and
  ``Σ_n max(-Ā_n, 0)``, and ``negative_share`` = negative / (positive +
  negative);
* ``negative_neurons``: neurons with ``Ā_n < -τ``; ``turned_negative``: those
  with ``Ā_n^orig >= 0`` and ``Ā_n < -τ``, with ``τ = tau · mean_n |Ā_n^orig|``.

A measurement of the simulation's evaluator on its forget split (the server
holds the simulation's data); no method reads it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fed_unlearn.data.qa import PromptFn
from fed_unlearn.losses.attribution_reg import reference_attributions
from fed_unlearn.types import AdapterState, QAItem

#: Histogram bins (even: 0 is the middle edge).
BINS = 40


def neuron_summary(
    attributions: Mapping[str, torch.Tensor],
    tau: float,
    before: str = "original",
    bins: int = BINS,
) -> dict[str, Any]:
    """Summarise per-item attributions of several models of one run.

    Parameters
    ----------
    attributions : Mapping[str, torch.Tensor]
        Model name -> ``[items, neurons]`` attributions on the same items.
    tau : float
        τ in units of ``mean_n |Ā_n|`` of ``before`` (>= 0).
    before : str
        The model before unlearning (default: ``"original"``).
    bins : int
        Histogram bins, even (default: :data:`BINS`).

    Returns
    -------
    dict[str, Any]
        ``spec`` (items, neurons, tau, tau_abs, unit = mean |Ā^before|),
        ``edges`` and, per model, ``histogram``, ``positive_mass``,
        ``negative_mass``, ``negative_share``, ``negative_neurons`` and
        ``turned_negative``.

    Raises
    ------
    ValueError
        No ``before`` model, shapes that differ, a bad τ or an odd ``bins``.
    """
    if before not in attributions:
        raise ValueError(f"no attributions of the model before unlearning {before!r}")
    if not tau >= 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    if bins < 2 or bins % 2:
        raise ValueError(f"bins must be even and >= 2, got {bins}")
    shape = attributions[before].shape
    bad = sorted(n for n, a in attributions.items() if a.shape != shape)
    if bad:
        raise ValueError(f"attributions of {bad} do not have the shape {tuple(shape)}")
    means = {n: a.double().mean(0) for n, a in attributions.items()}
    orig = means[before]
    unit = float(orig.abs().mean())
    tau_abs = tau * unit
    span = max(float(m.abs().max()) for m in means.values()) or 1.0
    edges = torch.linspace(-span, span, bins + 1, dtype=torch.float64)
    models: dict[str, Any] = {}
    for name, m in means.items():
        idx = torch.bucketize(m, edges[1:-1], right=True)
        counts = torch.bincount(idx, minlength=bins)
        pos = float(m.clamp(min=0).sum())
        neg = float((-m).clamp(min=0).sum())
        models[name] = {
            "histogram": [int(c) for c in counts],
            "positive_mass": pos,
            "negative_mass": neg,
            "negative_share": neg / (pos + neg) if pos + neg > 0 else 0.0,
            "negative_neurons": int((m < -tau_abs).sum()),
            "turned_negative": int(((orig >= 0) & (m < -tau_abs)).sum()),
        }
    return {
        "spec": {
            "items": int(shape[0]),
            "neurons": int(shape[1]),
            "tau": float(tau),
            "tau_abs": tau_abs,
            "unit": unit,
        },
        "edges": [float(e) for e in edges],
        "models": models,
    }


def measure_attribution(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt_fn: PromptFn,
    items: Sequence[QAItem],
    adapters: Mapping[str, AdapterState],
    tau: float,
    max_length: int,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Attribute each adapter's neurons on the forget items and summarise.

    Parameters
    ----------
    model : peft.PeftModel
        The run's LoRA model (its adapter is overwritten).
    tokenizer : PreTrainedTokenizerBase
        Its tokenizer.
    prompt_fn : PromptFn
        Prompt format.
    items : Sequence[QAItem]
        The forget items.
    adapters : Mapping[str, AdapterState]
        ``original`` and the other models to measure.
    tau : float
        See :func:`neuron_summary`.
    max_length : int
        Max tokens per item.
    batch_size : int
        Items per forward (default: 8).

    Returns
    -------
    dict[str, Any]
        :func:`neuron_summary` of the adapters.
    """
    from fed_unlearn.models import set_adapter

    per_model = {}
    for name, state in adapters.items():
        set_adapter(model, state)
        per_model[name] = reference_attributions(
            model, tokenizer, prompt_fn, items, max_length, batch_size
        )
    return neuron_summary(per_model, tau)
