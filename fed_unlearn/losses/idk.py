"""Refusal answers for IdkDPO / IdkNLL.

open-unlearning samples the refusal uniformly from ``data/idk.jsonl`` (a file
downloaded separately). We ship our own hand-written list instead and pick one
per forget item deterministically from the call's seed [R].
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from fed_unlearn.types import QAItem

#: Hand-written "I don't know"-style answers (our own wording).
IDK_ANSWERS: tuple[str, ...] = (
    "I'm not sure about that.",
    "I don't know.",
    "I have no information about that.",
    "I'm afraid I can't answer that.",
    "I don't have that information.",
    "That is something I don't know.",
    "I can't say for certain.",
    "I'm not able to answer that question.",
    "Sorry, I don't know the answer to that.",
    "I have no idea.",
    "I'm unsure; I don't have details on that.",
    "That's not something I have knowledge of.",
    "I couldn't tell you.",
    "Unfortunately, I don't know.",
    "I lack the information to answer that.",
    "I'm not familiar with that.",
    "I can't recall anything about that.",
    "That is beyond what I know.",
    "I don't have an answer to that.",
    "I'm not in a position to answer that.",
)


def idk_items(items: Sequence[QAItem], seed: int) -> list[QAItem]:
    """Replace each item's answer by a refusal drawn from :data:`IDK_ANSWERS`.

    Parameters
    ----------
    items : Sequence[QAItem]
        Forget items (questions are kept).
    seed : int
        Seed of a private :class:`random.Random`; item ``i`` gets the ``i``-th draw.

    Returns
    -------
    list[QAItem]
        Items with the same questions and refusal answers.
    """
    rng = random.Random(int(seed))
    return [dataclasses.replace(it, answer=rng.choice(IDK_ANSWERS)) for it in items]
