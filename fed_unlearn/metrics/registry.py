"""Typed registry of evaluation metrics (open-unlearning ``unlearning_metric`` style).

A metric is a plain function registered under a unique name with the
:func:`metric` decorator::

    @metric(
        name="forget_Q_A_Prob",
        direction="closer_to_reference",
        splits=("forget",),
        needs=(("answer", "forget"),),
    )
    def forget_q_a_prob(ctx): ...

The declaration is the single source of what a metric reads: ``splits`` (checked
to be non-empty), ``needs`` (the teacher-forced scores and generations the
evaluator computes in bulk before any metric runs) and ``deps`` (other metrics
whose results it reads).  :func:`metric_needs` and :func:`metric_deps` derive the
evaluator's tables from the registry.

:mod:`fed_unlearn.metrics.definitions` registers the TOFU-style metrics on import;
the evaluator (:mod:`fed_unlearn.metrics.evaluator`) looks names up here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args

Direction = Literal["higher", "lower", "closer_to_reference"]

#: What a metric reads of a split, computed in bulk before the metrics run:
#:
#: * ``answer`` -- teacher-forced scores of the items' (prompt, answer) pairs;
#: * ``tr_para`` -- those of the truth-ratio pairs, paraphrase vs perturbed;
#: * ``tr_answer`` -- the same with the paraphrase-or-answer as correct option;
#: * ``gen`` -- greedy generations for every item;
#: * ``ref_answer`` -- the ``answer`` scores under the reference model (when one
#:   is given).
NeedKind = Literal["answer", "tr_para", "tr_answer", "gen", "ref_answer"]
#: One need: ``(kind, split)``, e.g. ``("answer", "forget")``.
Need = tuple[NeedKind, str]

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
    needs : tuple[Need, ...]
        The ``(kind, split)`` scores / generations it reads (see :data:`NeedKind`).
    deps : tuple[str, ...]
        Names of the metrics whose results it reads.
    """

    name: str
    fn: Callable[..., Any]
    direction: Direction
    needs_reference: bool = False
    splits: tuple[str, ...] = ()
    description: str = ""
    needs: tuple[Need, ...] = ()
    deps: tuple[str, ...] = ()


#: All registered metrics by name, in registration order.
METRIC_REGISTRY: dict[str, MetricSpec] = {}


def metric(
    *,
    name: str,
    direction: Direction,
    needs_reference: bool = False,
    splits: tuple[str, ...] = (),
    needs: tuple[Need, ...] = (),
    deps: tuple[str, ...] = (),
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
    needs : tuple[Need, ...]
        ``(kind, split)`` pairs of the scores / generations it reads (see
        :data:`NeedKind`), computed in bulk before any metric runs.
    deps : tuple[str, ...]
        Names of the metrics whose results it reads (``ctx.result(name)``).

    Returns
    -------
    Callable
        A decorator returning the function unchanged.

    Raises
    ------
    ValueError
        If ``name`` is already registered or empty, ``direction`` is invalid, or a
        need is not a ``(kind, split)`` pair of a known kind.
    """
    if not name:
        raise ValueError("metric name must be a non-empty string")
    if direction not in get_args(Direction):
        raise ValueError(
            f"direction must be one of {get_args(Direction)}, got {direction!r}"
        )
    if name in METRIC_REGISTRY:
        raise ValueError(f"metric {name!r} is already registered")
    for need in needs:
        if (
            not isinstance(need, tuple)
            or len(need) != 2
            or need[0] not in get_args(NeedKind)
            or not need[1]
        ):
            raise ValueError(
                f"metric {name!r}: a need is a (kind, split) pair with kind in "
                f"{get_args(NeedKind)}, got {need!r}"
            )

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
            needs=tuple(needs),
            deps=tuple(deps),
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


def metric_deps() -> dict[str, tuple[str, ...]]:
    """Return the metrics that read other metrics' results, from their declarations.

    Returns
    -------
    dict[str, tuple[str, ...]]
        Metric name -> the names in its ``deps`` (metrics without any are left
        out), in registration order.
    """
    return {n: spec.deps for n, spec in METRIC_REGISTRY.items() if spec.deps}


def metric_needs() -> dict[str, tuple[Need, ...]]:
    """Return what each metric reads in bulk, from the declarations.

    Returns
    -------
    dict[str, tuple[Need, ...]]
        Metric name -> its ``(kind, split)`` needs (metrics without any are left
        out), in registration order.
    """
    return {n: spec.needs for n, spec in METRIC_REGISTRY.items() if spec.needs}
