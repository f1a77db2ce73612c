"""Shared types of the fed_unlearn core."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: A LoRA adapter (or a delta of one): parameter name -> tensor.
AdapterState = dict[str, torch.Tensor]

#: A client is identified by its partition id (0-based int).
ClientId = int


@dataclass(frozen=True)
class QAItem:
    """One question/answer pair of a TOFU-shaped data set.

    Parameters
    ----------
    question : str
        The question shown to the model.
    answer : str
        The ground-truth answer (what clients train on).
    paraphrased_answer : str
        A paraphrase of ``answer`` (used by the truth ratio).
    perturbed_answers : tuple[str, ...]
        Wrong answers of the same shape (used by the truth ratio and MIA).
    person : str
        Name of the (fictitious) person the item is about; ``""`` for probes.
    """

    question: str
    answer: str
    paraphrased_answer: str = ""
    perturbed_answers: tuple[str, ...] = field(default_factory=tuple)
    person: str = ""
