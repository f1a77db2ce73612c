"""The one coercer of configuration values (command line, TOML, Flower records).

Run-config keys (:class:`fed_unlearn.config.RunConfig`) and method options
(:func:`fed_unlearn.methods.registry.get_method`) arrive as whatever the source
holds: a TOML or Flower value of the right type, or text from ``--set`` /
``method-options``. :func:`parse_text` turns command-line text into a typed guess;
:func:`coerce` converts a value to a declared scalar type. Both rule sets share
every rule where their semantics agree; the few where they differ (a run-config
key refuses what a method option accepts) are the ``strict`` switch, so neither
accepts anything it did not before.
"""

from __future__ import annotations

from typing import Any

#: The words a boolean may be written as (any case, surrounding blanks ignored).
BOOL_WORDS: dict[str, bool] = {
    "true": True,
    "false": False,
    "1": True,
    "0": False,
    "yes": True,
    "no": False,
}

#: The scalar kinds :func:`coerce` converts to.
SCALAR_KINDS = ("int", "bool", "float", "str")


def parse_text(text: str) -> Any:
    """Parse command-line text: int, float, ``true``/``false``, else a string.

    Parameters
    ----------
    text : str
        E.g. the ``VALUE`` of ``--set KEY=VALUE``.

    Returns
    -------
    Any
        An int, a float, a bool (only the words ``true`` / ``false``) or the text
        with surrounding double quotes removed.
    """
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text.strip('"')


def scalar_kind(annotation: object, *, exact: bool = False) -> str | None:
    """Return the scalar kind of a dataclass field's annotation, if it has one.

    Parameters
    ----------
    annotation : object
        The field's type (a string under ``from __future__ import annotations``).
    exact : bool
        Only the bare names (``"int"``); otherwise also optional forms such as
        ``"int | None"``.

    Returns
    -------
    str or None
        One of :data:`SCALAR_KINDS`, or ``None`` for any other type.
    """
    want = annotation if isinstance(annotation, str) else str(annotation or "")
    for kind in SCALAR_KINDS:
        if want == kind or (not exact and want.startswith(kind)):
            return kind
    return None


def coerce(value: Any, kind: str | None, *, strict: bool = True) -> Any:
    """Convert ``value`` to the scalar ``kind``.

    Shared rules: a string is a boolean only as one of :data:`BOOL_WORDS`; a
    float is an int only when it is integral; ``int(...)`` and ``float(...)``
    convert the rest. ``strict`` (run-config keys) also refuses a bool where an
    int goes, a boolean other than ``True``/``False``/``0``/``1``/a word, and a
    string other than a string or an int (digits typed where a string goes, as
    in ``depart = 1``); lenient (method options) takes ``bool(value)``,
    ``int(True)`` and ``str(value)`` there.

    Parameters
    ----------
    value : Any
        The value as given.
    kind : str or None
        One of :data:`SCALAR_KINDS`; ``None`` returns ``value`` unchanged.
    strict : bool
        The run-config rules (default) or the method-option rules.

    Returns
    -------
    Any
        The converted value.

    Raises
    ------
    ValueError
        A value the rules refuse (the message says why, without the key).
    TypeError
        A value ``int(...)`` or ``float(...)`` cannot take.
    """
    if kind == "bool":
        if isinstance(value, str):
            word = value.strip().lower()
            if word not in BOOL_WORDS:
                raise ValueError("not a boolean")
            return BOOL_WORDS[word]
        if not strict or isinstance(value, bool):
            return bool(value)
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError("not a boolean")
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("not an integer")
        if strict and isinstance(value, bool):
            raise ValueError("a bool")
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "str":
        if not strict:
            return str(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ValueError(f"a {type(value).__name__}")
        return value
    return value
