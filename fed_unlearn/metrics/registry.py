"""Typed registry of evaluation metrics (open-unlearning ``unlearning_metric`` style).

A metric is a plain function registered under a unique name with the
:func:`metric` decorator::

    @metric(name="forget_Q_A_Prob", direction="closer_to_reference")
    def forget_q_a_prob(ctx): ...

The evaluator (:mod:`fed_unlearn.metrics.evaluator`) registers the TOFU-style
metrics on import and looks names up here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

Direction = Literal["higher", "lower", "closer_to_reference"]

_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric.

    Parameters
    ----------
    name : str
        Unique metric name (open-unlearning key, e.g. ``"forget_Q_A_Prob"``).
    fn : Callable[..., Any]
        The function computing it.
    direction : {"higher", "lower", "closer_to_reference"}
        Which way is better: higher, lower, or as close as possible to the value of
        the reference (retrained) model.
    needs_reference : bool
        Whether the metric cannot be computed without reference logs / a reference
        model.
    splits : tuple[str, ...]
        Data splits the metric reads (checked to be non-empty by the evaluator).
    description : str
        First line of ``fn``'s docstring.
    """

    name: str
    fn: Callable[..., Any]
    direction: Direction
    needs_reference: bool = False
    splits: tuple[str, ...] = ()
    description: str = ""


#: All registered metrics by name, in registration order.
METRIC_REGISTRY: dict[str, MetricSpec] = {}


def metric(
    *,
    name: str,
    direction: Direction,
    needs_reference: bool = False,
    splits: tuple[str, ...] = (),
) -> Callable[[_F], _F]:
    """Register a function as a metric.

    Parameters
    ----------
    name : str
        Unique name.
    direction : {"higher", "lower", "closer_to_reference"}
        Which way is better.
    needs_reference : bool
        Whether reference logs / a reference model are required.
    splits : tuple[str, ...]
        Data splits the metric reads.

    Returns
    -------
    Callable
        A decorator returning the function unchanged.

    Raises
    ------
    ValueError
        If ``name`` is already registered, empty, or ``direction`` is invalid.
    """
    if not name:
        raise ValueError("metric name must be a non-empty string")
    if direction not in get_args(Direction):
        raise ValueError(
            f"direction must be one of {get_args(Direction)}, got {direction!r}"
        )
    if name in METRIC_REGISTRY:
        raise ValueError(f"metric {name!r} is already registered")

    def decorator(fn: _F) -> _F:
        if name in METRIC_REGISTRY:
            raise ValueError(f"metric {name!r} is already registered")
        doc = (fn.__doc__ or "").strip().splitlines()
        METRIC_REGISTRY[name] = MetricSpec(
            name=name,
            fn=fn,
            direction=direction,
            needs_reference=needs_reference,
            splits=tuple(splits),
            description=doc[0] if doc else "",
        )
        return fn

    return decorator


def list_metrics() -> list[str]:
    """Return the registered metric names, sorted.

    Returns
    -------
    list[str]
        Sorted names.
    """
    return sorted(METRIC_REGISTRY)


def get_metric(name: str) -> MetricSpec:
    """Look a metric up by name.

    Parameters
    ----------
    name : str
        A registered name.

    Returns
    -------
    MetricSpec
        Its spec.

    Raises
    ------
    ValueError
        If ``name`` is unknown; the message lists the valid names.
    """
    try:
        return METRIC_REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown metric {name!r}; valid names: {', '.join(list_metrics())}"
        ) from None
