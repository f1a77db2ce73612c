"""Self-audit items: a share of a client's own items kept out of FL training.

A client that may one day ask to be forgotten can keep some of its items out of
training from the start (``audit-fraction``). During unlearning it compares the
model's mean answer probability on its trained items with that on its
never-trained ones; the retrain oracle never saw either, so after a complete
removal the two are indistinguishable. Only that one scalar, the gap, crosses
the wire (``stop="self_audit"``, :mod:`fed_unlearn.methods.rounds`) [R].

The split is per person (each person keeps ``round(fraction * n)`` of their
``n`` items, at least one when ``fraction > 0`` and they have two or more), so
the never-trained items ask about the same people as the trained ones. Which
items are kept out depends only on the seed and the question text, so the
client and a simulation's evaluator agree without exchanging anything.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from fed_unlearn.types import QAItem


def check_audit_fraction(fraction: float) -> None:
    """Raise ``ValueError`` unless ``0 <= fraction < 1``."""
    if not (math.isfinite(fraction) and 0.0 <= fraction < 1.0):
        raise ValueError(f"audit-fraction must be in [0, 1), got {fraction}")


def _rank(seed: int, item: QAItem) -> str:
    return hashlib.sha256(f"audit:{seed}:{item.question}".encode()).hexdigest()


def split_audit(
    items: Sequence[QAItem], fraction: float, seed: int
) -> tuple[list[QAItem], list[QAItem]]:
    """Split a client's items into (trained, never-trained audit) items.

    Parameters
    ----------
    items : Sequence[QAItem]
        The client's items (grouped by ``person``; items without a person form
        one group).
    fraction : float
        Share of each person's items kept out of training, in ``[0, 1)``.
    seed : int
        Run seed.

    Returns
    -------
    tuple[list[QAItem], list[QAItem]]
        Both in the input order; ``(list(items), [])`` when ``fraction`` is 0.
    """
    check_audit_fraction(fraction)
    if fraction == 0.0:
        return list(items), []
    groups: dict[str, list[QAItem]] = {}
    for it in items:
        groups.setdefault(it.person, []).append(it)
    held: set[int] = set()
    for group in groups.values():
        if len(group) < 2:
            continue
        k = min(len(group) - 1, max(1, round(fraction * len(group))))
        for it in sorted(group, key=lambda it: _rank(seed, it))[:k]:
            held.add(id(it))
    return (
        [it for it in items if id(it) not in held],
        [it for it in items if id(it) in held],
    )
