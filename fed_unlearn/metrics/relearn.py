"""Relearning attack: how fast forgotten knowledge comes back [R].

An unlearned model that only hides the forget set relearns it from a few of its
items much faster than a model that never saw it (Lynch et al., "Eight methods to
evaluate robust unlearning in LLMs", 2024; Hu et al., "Unlearning or obfuscating?
Jogging the memory of unlearned LLMs via benign relearning", ICLR 2025). Here:

1. Split the forget set per person: the first ``fraction`` of each forgotten
   person's items (at least one) is the attacker's data; the rest are probes
   the attacker never trains on.
2. Fine-tune the adapter under test on the attack items with the clients' own
   recipe (answer-only NLL, AdamW with a fresh optimiser, seeded order) for
   ``steps`` steps, and score ``forget_Q_A_Prob`` on the probes at step 0 and
   every ``every`` steps. The runner's default rate is a fifth of the FL rate:
   at the FL rate (tiny, 12 steps) the attack disturbed the facts it did not
   train on, and the original model's probes fell from 0.29 to 0.15.
3. Do the same from the retrain oracle (which never saw the forget people) and
   from the original model. The oracle's curve is what genuine learning of the
   attack items gives; the gap of the unlearned model's probe probability after
   the attack over the oracle's, as a fraction of the gap unlearning had to
   close (original vs oracle, before any attack),

   ``relearn_gap = (p_unl^T - p_retrain^T) / (p_orig^0 - p_retrain^0)``,

   is how much of the removed knowledge the attack brings back (0: like the
   oracle, 1: the whole gap is back). The denominator is taken before the
   attack because fine-tuning on some facts of a person also disturbs the
   others: the original model's probes can fall during the attack. Our
   operationalisation; open-unlearning has no relearning metric, so the keys
   are ours (``relearn_*``).

The probes are other questions about the same people, so recovering them means
the knowledge was still in the weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fed_unlearn.data.qa import PromptFn
from fed_unlearn.metrics.quick import answer_prob
from fed_unlearn.models import set_adapter
from fed_unlearn.training import TrainSpec, local_train
from fed_unlearn.types import AdapterState, QAItem


@dataclass(frozen=True)
class RelearnSpec:
    """Settings of the relearning attack.

    Parameters
    ----------
    steps : int
        Attack optimiser steps (> 0).
    fraction : float
        Share of each forgotten person's items the attacker trains on, in (0, 1).
    every : int
        Score the probes every this many steps (default: the whole attack in 4).
    lr : float
        Attack learning rate.
    batch_size : int
        Attack batch size.
    max_length : int
        Token limit per example.
    seed : int
        Seed of the attack's data order.
    """

    steps: int
    fraction: float
    lr: float
    batch_size: int
    max_length: int
    seed: int = 0
    every: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"relearning steps must be >= 1, got {self.steps}")
        if not 0 < self.fraction < 1:
            raise ValueError(
                f"relearning fraction must be in (0, 1), got {self.fraction}"
            )
        if self.every < 0:
            raise ValueError(f"relearning 'every' must be >= 0, got {self.every}")

    def interval(self) -> int:
        """Return the steps between two probe scores."""
        return self.every or max(1, -(-self.steps // 4))


def split_attack(
    items: Sequence[QAItem], fraction: float
) -> tuple[list[QAItem], list[QAItem]]:
    """Split forget items per person into attack items and held-out probes.

    Parameters
    ----------
    items : Sequence[QAItem]
        The forget set.
    fraction : float
        Share of each person's items for the attacker (rounded, at least one and
        at most all but one).

    Returns
    -------
    tuple[list[QAItem], list[QAItem]]
        ``(attack, probes)`` in the input order.

    Raises
    ------
    ValueError
        No person has two items (nothing left to probe).
    """
    people: dict[str, list[QAItem]] = {}
    for it in items:
        people.setdefault(it.person, []).append(it)
    attack: list[QAItem] = []
    probes: list[QAItem] = []
    for group in people.values():
        if len(group) < 2:
            continue
        k = min(len(group) - 1, max(1, round(fraction * len(group))))
        attack += group[:k]
        probes += group[k:]
    if not probes:
        raise ValueError(
            "relearning attack: no forgotten person has two items (one to train "
            "on, one to probe)"
        )
    return attack, probes


def relearn_curve(
    model: Any,
    tokenizer: Any,
    prompt_fn: PromptFn,
    adapter: AdapterState,
    attack: Sequence[QAItem],
    probes: Sequence[QAItem],
    spec: RelearnSpec,
) -> list[dict[str, float]]:
    """Fine-tune ``adapter`` on the attack items; score the probes as it goes.

    Parameters
    ----------
    model : peft.PeftModel
        The LoRA model (its adapter is overwritten).
    tokenizer : PreTrainedTokenizerBase
        Its tokenizer.
    prompt_fn : PromptFn
        Prompt format.
    adapter : AdapterState
        The adapter under attack.
    attack, probes : Sequence[QAItem]
        From :func:`split_attack`.
    spec : RelearnSpec
        Settings.

    Returns
    -------
    list[dict[str, float]]
        ``{"step": s, "forget_Q_A_Prob": p}`` from step 0 to ``spec.steps``.
    """
    set_adapter(model, adapter)
    curve: list[dict[str, float]] = []

    def point(step: int) -> None:
        prob = answer_prob(model, tokenizer, prompt_fn, probes, spec.max_length)
        curve.append({"step": step, "forget_Q_A_Prob": prob})

    point(0)
    every = spec.interval()
    marks = set(range(every, spec.steps, every)) | {spec.steps}
    # one optimiser over the whole attack, enough epochs for spec.steps steps;
    # the probes are scored between steps
    per_epoch = -(-len(attack) // spec.batch_size)
    train = TrainSpec(
        epochs=-(-spec.steps // per_epoch),
        batch_size=spec.batch_size,
        lr=spec.lr,
        max_length=spec.max_length,
        max_steps=spec.steps,
    )
    local_train(
        model,
        tokenizer,
        prompt_fn,
        attack,
        train,
        spec.seed,
        lambda step, _loss: point(step) if step in marks else None,
    )
    return curve


def relearn_gap(curves: dict[str, list[dict[str, float]]]) -> float | None:
    """Return ``(p_unl^T - p_retrain^T) / (p_orig^0 - p_retrain^0)``.

    Parameters
    ----------
    curves : dict[str, list[dict[str, float]]]
        ``original``, ``retrain`` and ``unlearned`` curves of :func:`relearn_curve`.

    Returns
    -------
    float or None
        The share of the original gap that the attack brings back; ``None`` when
        the original and the oracle did not differ before the attack.
    """
    key = "forget_Q_A_Prob"
    gap = curves["original"][0][key] - curves["retrain"][0][key]
    if abs(gap) < 1e-12:
        return None
    return (curves["unlearned"][-1][key] - curves["retrain"][-1][key]) / gap
