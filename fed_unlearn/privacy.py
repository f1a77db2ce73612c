"""The client's own privacy policy: what it computes for a server, whatever is asked.

A curious or compromised server can ask a client for an update behind very few
examples (``batch-size=1``, ``max-steps=1``): replaying that one step over
candidate records identifies the record it was taken on. The client therefore
checks every request against its policy before it does any work, and refuses
one below the floor with :class:`PolicyError`; Flower returns the error to the
server, whose channel raises it naming the client and the request.

The policy is the node's, not the server's: a SuperNode sets it in its node
config (``flower-supernode --node-config "min-examples=16"``), and a message
cannot lower it. The default floor is 8 examples.

What it guarantees:

- every adapter update a client returns (FL training, unlearning, recovery)
  comes from at least ``min-examples`` distinct training examples of its own;
- every aggregate metric it returns over its items (federated evaluation, the
  self-audit scalar) averages at least ``min-examples`` of them.

What it does not: it is no differential privacy. An update behind 8 examples
still carries information about them; the floor only rules out the
single-example case that makes reconstruction trivial.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Node-config key of the floor, and its default.
MIN_EXAMPLES_KEY = "min-examples"
DEFAULT_MIN_EXAMPLES = 8


class PolicyError(ValueError):
    """A request the client's privacy policy refuses (the message says why)."""


def examples_behind(n_items: int, epochs: int, batch_size: int, max_steps: int) -> int:
    """Distinct examples a local run touches.

    Parameters
    ----------
    n_items : int
        The client's training items.
    epochs, batch_size : int
        The run's epochs and examples per step.
    max_steps : int
        Cap on optimiser steps (0 = none: ``epochs`` full passes).

    Returns
    -------
    int
        ``min(n_items, visits)`` with ``visits = epochs * n_items``, capped at
        ``max_steps * batch_size`` when there is a cap.
    """
    visits = max(epochs, 0) * n_items
    if max_steps > 0:
        visits = min(visits, max_steps * max(batch_size, 0))
    return min(n_items, visits)


@dataclass(frozen=True)
class ClientPolicy:
    """A client's floor on the examples behind what it returns.

    Parameters
    ----------
    min_examples : int
        Fewest distinct examples behind any update or aggregate metric (>= 1).
    """

    min_examples: int = DEFAULT_MIN_EXAMPLES

    def __post_init__(self) -> None:
        if isinstance(self.min_examples, bool) or self.min_examples < 1:
            raise PolicyError(
                f"node config {MIN_EXAMPLES_KEY!r} must be an int >= 1, got "
                f"{self.min_examples!r}"
            )

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> ClientPolicy:
        """Read the policy from a node's config (the default floor if unset)."""
        raw = node_config.get(MIN_EXAMPLES_KEY, DEFAULT_MIN_EXAMPLES)
        try:
            value = int(raw)
        except (TypeError, ValueError):
            raise PolicyError(
                f"node config {MIN_EXAMPLES_KEY!r} must be an int >= 1, got {raw!r}"
            ) from None
        if str(raw).strip() not in (str(value), f"{value}.0"):
            raise PolicyError(
                f"node config {MIN_EXAMPLES_KEY!r} must be an int >= 1, got {raw!r}"
            )
        return cls(value)

    def check(self, what: str, examples: int) -> None:
        """Refuse ``what`` when it would rest on fewer than the floor.

        Raises
        ------
        PolicyError
            Naming the request, the examples it would rest on and the floor.
        """
        if examples < self.min_examples:
            raise PolicyError(
                f"privacy policy: refused {what}: it would rest on {examples} "
                f"example(s), below this client's floor of {self.min_examples} "
                f"(node config {MIN_EXAMPLES_KEY!r})"
            )
