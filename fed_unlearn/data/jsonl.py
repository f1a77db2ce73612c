"""Loading user-provided question/answer data from JSON Lines files.

Each line holds one JSON object::

    {"question": "...", "answer": "...", "paraphrased_answer": "...",
     "perturbed_answer": ["...", "..."], "person": "..."}

``question`` and ``answer`` are required; the other fields are optional.  A data
directory holds ``client_0.jsonl``, ``client_1.jsonl``, ... and optionally
``holdout.jsonl`` and ``general.jsonl``.  Every problem raises
:class:`DataFormatError` naming the file, the line and the field.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

from fed_unlearn.data.synthetic import TofuData
from fed_unlearn.types import QAItem

_REQUIRED = ("question", "answer")
_OPTIONAL = ("paraphrased_answer", "perturbed_answer", "person")
_FIELDS = (*_REQUIRED, *_OPTIONAL)
_CLIENT_RE = re.compile(r"client_(\d+)\.jsonl")


class DataFormatError(ValueError):
    """A data file is missing, malformed or inconsistent.

    The message names the file and, where it applies, the 1-based line number and
    the offending field.
    """


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _parse_item(obj: object, where: str) -> QAItem:
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {_type_name(obj)}")
    for key in obj:
        if key not in _FIELDS:
            close = difflib.get_close_matches(str(key), _FIELDS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            allowed = ", ".join(_FIELDS)
            raise DataFormatError(
                f"{where}: unknown field '{key}'{hint}; allowed fields: {allowed}"
            )
    values: dict[str, str] = {}
    for key in _REQUIRED:
        if key not in obj:
            raise DataFormatError(f"{where}: field '{key}' is missing")
        value = obj[key]
        if not isinstance(value, str) or not value.strip():
            got = _type_name(value) if not isinstance(value, str) else "an empty string"
            raise DataFormatError(
                f"{where}: field '{key}' must be a non-empty string, got {got}"
            )
        values[key] = value
    for key in ("paraphrased_answer", "person"):
        value = obj.get(key, "")
        if not isinstance(value, str):
            raise DataFormatError(
                f"{where}: field '{key}' must be a string, got {_type_name(value)}"
            )
        values[key] = value
    raw = obj.get("perturbed_answer", [])
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise DataFormatError(
            f"{where}: field 'perturbed_answer' must be a string or a list of "
            f"strings, got {_type_name(raw)}"
        )
    for i, value in enumerate(raw):
        if not isinstance(value, str) or not value.strip():
            got = _type_name(value) if not isinstance(value, str) else "an empty string"
            raise DataFormatError(
                f"{where}: field 'perturbed_answer' element {i} must be a non-empty "
                f"string, got {got}"
            )
    return QAItem(
        question=values["question"],
        answer=values["answer"],
        paraphrased_answer=values["paraphrased_answer"],
        perturbed_answers=tuple(raw),
        person=values["person"],
    )


def _load_numbered(path: Path) -> list[tuple[int, QAItem]]:
    """Load a JSONL file, keeping the 1-based line number of every item."""
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    items: list[tuple[int, QAItem]] = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path} line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataFormatError(f"{where}: not valid UTF-8 ({exc})") from exc
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{where}: not valid JSON ({exc})") from exc
            items.append((lineno, _parse_item(obj, where)))
    if not items:
        raise DataFormatError(f"{path}: file contains no items")
    return items


def load_jsonl(path: str | Path) -> list[QAItem]:
    """Load question/answer items from a JSON Lines file.

    Parameters
    ----------
    path : str | Path
        File with one JSON object per line; blank lines are skipped.  Required
        string fields ``question`` and ``answer``; optional ``paraphrased_answer``
        (string), ``perturbed_answer`` (string or list of strings) and ``person``
        (string).  Any other field is an error.

    Returns
    -------
    list[QAItem]
        The items in file order.

    Raises
    ------
    DataFormatError
        If the file is missing, empty, or a line is malformed; the message names
        the file, the 1-based line number and the field.
    """
    return [item for _, item in _load_numbered(Path(path))]


def load_data_dir(path: str | Path, num_clients: int | None = None) -> TofuData:
    """Load a federated data set from a directory of JSON Lines files.

    Parameters
    ----------
    path : str | Path
        Directory with ``client_0.jsonl``, ``client_1.jsonl``, ... (contiguous
        from 0) and optionally ``holdout.jsonl`` and ``general.jsonl``.
    num_clients : int | None
        Expected number of client files; ``None`` accepts any number.

    Returns
    -------
    TofuData
        Client items, holdout items and general probes (missing optional files
        give empty lists).

    Raises
    ------
    DataFormatError
        If the directory or a client file is missing, the number of client files
        differs from ``num_clients``, a file is malformed, a ``.jsonl`` file has an
        unexpected name, or the same (question, answer) pair appears in two
        client files or in a client file and ``holdout.jsonl``.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataFormatError(f"{root}: data directory not found")
    found: dict[int, Path] = {}
    for file in sorted(root.glob("*.jsonl")):
        match = _CLIENT_RE.fullmatch(file.name)
        if match and str(int(match.group(1))) == match.group(1):
            found[int(match.group(1))] = file
        elif file.name not in ("holdout.jsonl", "general.jsonl"):
            raise DataFormatError(
                f"{file}: unexpected file name (expected client_<i>.jsonl with i = "
                "0, 1, ..., holdout.jsonl or general.jsonl)"
            )
    if not found:
        raise DataFormatError(f"{root}: no client files (client_0.jsonl, ...) found")
    for cid in range(max(found) + 1):
        if cid not in found:
            raise DataFormatError(
                f"{root / f'client_{cid}.jsonl'}: file is missing (client files must "
                f"be numbered contiguously from 0; found up to client_{max(found)})"
            )
    if num_clients is not None and num_clients != len(found):
        raise DataFormatError(
            f"{root}: num_clients is {num_clients} but {len(found)} client files "
            "were found"
        )

    clients: dict[int, list[QAItem]] = {}
    owner: dict[tuple[str, str], tuple[Path, int]] = {}
    for cid in sorted(found):
        file = found[cid]
        numbered = _load_numbered(file)
        for lineno, item in numbered:
            key = (item.question, item.answer)
            first = owner.setdefault(key, (file, lineno))
            if first[0] != file:
                raise DataFormatError(
                    f"{file} line {lineno}: the same question/answer pair is in "
                    f"{first[0]} line {first[1]}; clients must hold disjoint data"
                )
        clients[cid] = [item for _, item in numbered]

    holdout: list[QAItem] = []
    if (root / "holdout.jsonl").exists():
        file = root / "holdout.jsonl"
        numbered = _load_numbered(file)
        for lineno, item in numbered:
            first = owner.get((item.question, item.answer))
            if first is not None:
                raise DataFormatError(
                    f"{file} line {lineno}: the same question/answer pair is in "
                    f"{first[0]} line {first[1]}; holdout items must not be given "
                    "to any client"
                )
        holdout = [item for _, item in numbered]
    general: list[QAItem] = []
    if (root / "general.jsonl").exists():
        general = load_jsonl(root / "general.jsonl")
    return TofuData(clients=clients, holdout=holdout, general=general)


def write_jsonl(path: str | Path, items: list[QAItem]) -> Path:
    """Write question/answer items as JSON Lines that :func:`load_jsonl` reads back.

    Parameters
    ----------
    path : str | Path
        Output file (parent directories are created).
    items : list[QAItem]
        The items, written in order, one JSON object per line.

    Returns
    -------
    Path
        The file written.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for it in items:
            obj = {
                "question": it.question,
                "answer": it.answer,
                "paraphrased_answer": it.paraphrased_answer,
                "perturbed_answer": list(it.perturbed_answers),
                "person": it.person,
            }
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
    return out
