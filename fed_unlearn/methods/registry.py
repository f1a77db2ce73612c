"""The method registry: ``register_method`` / ``get_method`` / ``list_methods``."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from fed_unlearn.methods.base import UnlearnConfig, UnlearningMethod
from fed_unlearn.values import coerce, scalar_kind


@dataclass(frozen=True)
class MethodEntry:
    """One registered method."""

    name: str
    config_cls: type[UnlearnConfig]
    method_cls: type[UnlearningMethod]


METHOD_REGISTRY: dict[str, MethodEntry] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*[a-z0-9]$")


def register_method(
    name: str, config_cls: type[UnlearnConfig], method_cls: type[UnlearningMethod]
) -> None:
    """Register a method under a lowercase snake-case name.

    Parameters
    ----------
    name : str
        Registry key (``"fed_eraser"``).
    config_cls : type[UnlearnConfig]
        Its config dataclass.
    method_cls : type[UnlearningMethod]
        Its class.

    Raises
    ------
    ValueError
        Bad or duplicate name, or classes of the wrong kind.
    """
    if not _NAME.match(name):
        raise ValueError(f"method name {name!r} must be lowercase snake_case")
    if name in METHOD_REGISTRY:
        raise ValueError(f"method {name!r} is already registered")
    if not (
        dataclasses.is_dataclass(config_cls) and issubclass(config_cls, UnlearnConfig)
    ):
        raise ValueError(
            f"{config_cls!r} must be a dataclass subclass of UnlearnConfig"
        )
    if not issubclass(method_cls, UnlearningMethod):
        raise ValueError(f"{method_cls!r} must subclass UnlearningMethod")
    method_cls.name = name
    METHOD_REGISTRY[name] = MethodEntry(name, config_cls, method_cls)


def get_method(name: str, options: dict[str, Any] | None = None) -> UnlearningMethod:
    """Instantiate a registered method with optional config overrides.

    Parameters
    ----------
    name : str
        Registry key.
    options : dict[str, Any], optional
        Config field overrides (hyphens or underscores).

    Returns
    -------
    UnlearningMethod
        The configured method.

    Raises
    ------
    KeyError
        Unknown method (the message lists the registered ones).
    ValueError
        Unknown option.
    """
    if name not in METHOD_REGISTRY:
        known = ", ".join(sorted(METHOD_REGISTRY))
        raise KeyError(f"unknown method {name!r}; registered methods: {known}")
    entry = METHOD_REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(entry.config_cls)}
    types = {f.name: f.type for f in dataclasses.fields(entry.config_cls)}
    kwargs = {}
    for key, value in (options or {}).items():
        k = key.replace("-", "_")
        if k not in fields:
            raise ValueError(
                f"method {name!r} has no option {key!r}; "
                f"options: {sorted(fields) or 'none'}"
            )
        kwargs[k] = _coerce(name, key, value, types.get(k))
    return entry.method_cls(entry.config_cls(**kwargs))


def _coerce(method: str, key: str, value: Any, annotation: Any) -> Any:
    """Coerce a CLI/TOML option value to the field's declared scalar type.

    :func:`fed_unlearn.values.coerce` with the method-option (lenient) rules, for
    fields annotated exactly ``bool``, ``int``, ``float`` or ``str``; any other
    type takes the value as given.
    """
    try:
        return coerce(value, scalar_kind(annotation, exact=True), strict=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"method {method!r} option {key!r}: bad value {value!r} ({exc})"
        ) from exc


def list_methods() -> list[tuple[str, str, list[str]]]:
    """Return ``(name, one-line summary, requirements)`` for every method."""
    return [
        (e.name, e.method_cls.summary, sorted(r.value for r in e.method_cls.requires))
        for _, e in sorted(METHOD_REGISTRY.items())
    ]
