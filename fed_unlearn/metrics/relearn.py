"""Relearning audit: does forgotten knowledge come back? Two scenarios [R].

An unlearned model that only hides the forget set relearns it much faster than
a model that never saw it (Lynch et al., "Eight methods to evaluate robust
unlearning in LLMs", 2024; Hu et al., "Unlearning or obfuscating? Jogging the
memory of unlearned LLMs via benign relearning", ICLR 2025; Ssiuu's two
scenarios, methods.md §4.12). Every scenario is applied to the unlearned
adapter, to the retrain oracle (which never saw the forgotten clients: its
curve is the floor, what genuine learning gives) and to the original.

(a) Benign (:func:`benign_curve`): the federation simply goes on. ``k`` more FL
    rounds of the remaining clients, each training on its own items with the
    FL recipe (:func:`fed_unlearn.training.local_train`, the ClientApp's loop,
    its seeds ``derive_seed(seed, T + r, client)`` and the strategy's client
    sample for round ``T + r``, :func:`fed_unlearn.training.sample_clients`),
    aggregated by the run's rule (:data:`fed_unlearn.aggregation.AGGREGATORS`,
    FedAvg by default, ``num-examples`` weights). The forget set's
    ``forget_Q_A_Prob`` is scored after every round. This is a measurement run
    in one process (no Flower, no wire, no update validation: the clients are
    honest by construction), so it needs all the remaining clients' data, which
    only a simulation has; same seeds give the same curve.
(b) Adversarial (:func:`relearn_curve`): a rejoining client fine-tunes on part
    of the forgotten data and is scored on the held-back part.

    1. Split the forget set per person: the first ``fraction`` of each
       forgotten person's items (at least one) is the attacker's data; the rest
       are probes the attacker never trains on.
    2. Fine-tune the adapter under test on the attack items with the clients'
       own recipe (answer-only NLL, AdamW with a fresh optimiser, seeded order)
       for ``steps`` steps, and score ``forget_Q_A_Prob`` on the probes at step
       0 and every ``every`` steps. The runner's default rate is a fifth of the
       FL rate: at the FL rate (tiny, 12 steps) the attack disturbed the facts
       it did not train on, and the original model's probes fell.

    The probes are other questions about the same people, so recovering them
    means the knowledge was still in the weights.

Two figures per scenario, from the curves (``p_m^t``: model ``m``'s score after
``t`` attack steps or rounds, ``T`` the last):

* the recovery ratio of a model (:func:`recovery_ratio`),

  ``RR_m = (p_m^T - p_m^0) / (p_orig^0 - p_m^0)``,

  the share of what unlearning removed (the original's score before the
  attack minus the model's own) that the attack brings back: 0 nothing, 1 all
  of it. This is methods.md §4.12's ratio; its reference is the original
  *before* the attack, because an attack also moves the original (fine-tuning
  on some facts of a person disturbs the others), and that would make the
  denominator depend on the attack. ``RR_retrain`` under the same attack is the
  floor: the oracle also gains by genuine learning (of the attack items in
  (b), of the remaining clients' related facts in (a)). ``None`` when the
  model scored like the original before the attack (nothing was removed, e.g.
  the method ``none``): there is nothing to recover.
* the relearn gap (:func:`relearn_gap`), the unlearned model's distance to the
  attacked oracle as a share of the original-oracle gap before the attack,

  ``relearn_gap = (p_unl^T - p_retrain^T) / (p_orig^0 - p_retrain^0)``

  (0: like the oracle, 1: the whole gap is back).

Our operationalisation; open-unlearning has no relearning metric, so the keys
are ours (``relearn_*``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fed_unlearn.aggregation import AGGREGATORS
from fed_unlearn.data.qa import PromptFn
from fed_unlearn.metrics.quick import answer_prob
from fed_unlearn.models import get_adapter, set_adapter
from fed_unlearn.training import TrainSpec, derive_seed, local_train, sample_clients
from fed_unlearn.types import AdapterState, ClientId, QAItem

#: The score of every curve point.
SCORE = "forget_Q_A_Prob"

#: The models every scenario attacks, in this order.
MODELS = ("original", "retrain", "unlearned")


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
    key = SCORE
    gap = curves["original"][0][key] - curves["retrain"][0][key]
    if abs(gap) < 1e-12:
        return None
    return (curves["unlearned"][-1][key] - curves["retrain"][-1][key]) / gap


def recovery_ratio(
    curves: Mapping[str, Sequence[Mapping[str, float]]], name: str = "unlearned"
) -> float | None:
    """Return ``RR_m = (p_m^T - p_m^0) / (p_orig^0 - p_m^0)`` (module docstring).

    Parameters
    ----------
    curves : Mapping[str, Sequence[Mapping[str, float]]]
        Curves of one scenario (``original`` and ``name`` at least), each point
        holding :data:`SCORE`, from before the attack to its end.
    name : str
        The model whose recovery is asked (``unlearned`` or ``retrain``).

    Returns
    -------
    float or None
        The share of the removed score that the attack brings back; ``None``
        when the model scored like the original before the attack.

    Raises
    ------
    ValueError
        A missing or empty curve.
    """
    for key in ("original", name):
        if not curves.get(key):
            raise ValueError(f"recovery ratio: no {key!r} curve")
    p0, pt = curves[name][0][SCORE], curves[name][-1][SCORE]
    removed = curves["original"][0][SCORE] - p0
    if abs(removed) < 1e-12:
        return None
    return (pt - p0) / removed


@dataclass(frozen=True)
class BenignSpec:
    """Settings of the benign scenario: the federation's next rounds.

    Parameters
    ----------
    rounds : int
        FL rounds after unlearning (>= 0; 0 leaves the adapter as it is).
    start_round : int
        FL rounds the federation ran before (``num-server-rounds``): the
        audit's round ``r`` is FL round ``start_round + r`` for the client
        sample and the clients' data order.
    seed : int
        The run seed.
    num_clients : int
        All clients of the federation (the sample is drawn over all of them,
        as the strategy draws it, and the departed ones are left out).
    fraction : float
        Share of clients sampled per round (``fraction-train``).
    train : TrainSpec
        The clients' local training (the run's ``train_spec``).
    aggregation : str
        A key of :data:`fed_unlearn.aggregation.AGGREGATORS` (default: fedavg).
    """

    rounds: int
    start_round: int
    seed: int
    num_clients: int
    fraction: float
    train: TrainSpec
    aggregation: str = "fedavg"

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ValueError(
                f"benign relearning rounds must be >= 0, got {self.rounds}"
            )
        if self.start_round < 0:
            raise ValueError(f"start_round must be >= 0, got {self.start_round}")
        if self.num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {self.num_clients}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.aggregation not in AGGREGATORS:
            raise ValueError(
                f"unknown aggregation {self.aggregation!r}; known: "
                f"{', '.join(sorted(AGGREGATORS))}"
            )


def benign_curve(
    model: Any,
    tokenizer: Any,
    prompt_fn: PromptFn,
    adapter: AdapterState,
    clients: Mapping[ClientId, Sequence[QAItem]],
    forget: Sequence[QAItem],
    spec: BenignSpec,
    max_length: int,
) -> tuple[list[dict[str, Any]], AdapterState]:
    """Run ``spec.rounds`` FL rounds of ``clients``; score the forget set after each.

    Parameters
    ----------
    model : peft.PeftModel
        The LoRA model (its adapter is overwritten).
    tokenizer : PreTrainedTokenizerBase
        Its tokenizer.
    prompt_fn : PromptFn
        Prompt format.
    adapter : AdapterState
        The global adapter the federation continues from (not changed).
    clients : Mapping[ClientId, Sequence[QAItem]]
        The remaining clients' training items (the departed ones absent).
    forget : Sequence[QAItem]
        The items scored after every round (the forget set).
    spec : BenignSpec
        Settings.
    max_length : int
        Token limit per scored item.

    Returns
    -------
    tuple[list[dict[str, Any]], AdapterState]
        ``{"round": r, "forget_Q_A_Prob": p, "clients": [...]}`` from round 0
        (the adapter as given) to ``spec.rounds``, and the last global adapter.

    Raises
    ------
    ValueError
        No remaining client, or one without items.
    """
    if not clients:
        raise ValueError("benign relearning: no remaining client to train")
    for c, items in clients.items():
        if not items:
            raise ValueError(f"benign relearning: client {c} has no items")
    aggregate = AGGREGATORS[spec.aggregation]
    state = {k: v.detach().clone() for k, v in adapter.items()}

    def point(r: int, chosen: list[int]) -> dict[str, Any]:
        set_adapter(model, state)
        prob = answer_prob(model, tokenizer, prompt_fn, forget, max_length)
        return {"round": r, SCORE: prob, "clients": chosen}

    curve = [point(0, [])]
    for r in range(1, spec.rounds + 1):
        server_round = spec.start_round + r
        chosen = [
            c
            for c in sample_clients(
                spec.seed, server_round, spec.num_clients, spec.fraction
            )
            if c in clients
        ]
        states, weights = [], []
        for c in chosen:  # each from the round's global adapter, as the clients do
            set_adapter(model, state)
            local_train(
                model,
                tokenizer,
                prompt_fn,
                clients[c],
                spec.train,
                seed=derive_seed(spec.seed, server_round, c),
            )
            states.append(get_adapter(model))
            weights.append(float(len(clients[c])))
        if states:  # a round that sampled only departed clients changes nothing
            state = aggregate(states, weights)
        curve.append(point(r, chosen))
    return curve, state


def attack_each(
    adapters: Mapping[str, AdapterState],
    attack: Callable[[AdapterState], list[dict[str, Any]]],
) -> dict[str, list[dict[str, Any]]]:
    """Run one scenario's ``attack`` on each adapter (identical ones once).

    Parameters
    ----------
    adapters : Mapping[str, AdapterState]
        :data:`MODELS` -> adapter.
    attack : Callable[[AdapterState], list[dict[str, Any]]]
        Adapter -> its curve (deterministic: an identical adapter, e.g. the
        method ``none``'s, gets the same curve).

    Returns
    -------
    dict[str, list[dict[str, Any]]]
        Name -> curve.
    """
    curves: dict[str, list[dict[str, Any]]] = {}
    for name, state in adapters.items():
        same = next((o for o in curves if _equal(adapters[o], state)), None)
        curves[name] = curves[same] if same is not None else attack(state)
    return curves


def scenario_figures(
    curves: Mapping[str, Sequence[Mapping[str, Any]]],
) -> dict[str, Any]:
    """Return a scenario's figures from its three curves.

    Parameters
    ----------
    curves : Mapping[str, Sequence[Mapping[str, Any]]]
        ``original``, ``retrain`` and ``unlearned`` curves.

    Returns
    -------
    dict[str, Any]
        ``final`` (name -> last score), ``recovery_ratio`` (the unlearned
        model's), ``recovery_ratio_retrain`` (the oracle's under the same
        attack: the floor) and ``relearn_gap``.
    """
    return {
        "final": {name: c[-1][SCORE] for name, c in curves.items()},
        "recovery_ratio": recovery_ratio(curves, "unlearned"),
        "recovery_ratio_retrain": recovery_ratio(curves, "retrain"),
        "relearn_gap": relearn_gap({k: list(v) for k, v in curves.items()}),
    }


def _equal(a: AdapterState, b: AdapterState) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
