"""The per-round unlearning log: what a restarted server resumes from.

A resumable method (``UnlearningMethod.resume_refusal`` is ``None``) logs every
round it ends (:meth:`fed_unlearn.methods.rounds.RoundLog.end_round`) into an
:class:`UnlearnJournal`::

    root/journal.json          the run: flat config, pipeline steps, federation
    root/round_0003.safetensors  the adapter to go on from after round 3, and
                               (metadata ``log``) the round log's whole state:
                               curve, client compute, stop decisions, ...

Each entry is written to a temporary file, fsynced and renamed into place, so a
server killed at any moment leaves whole entries only. The state a round-based
method carries from one round to the next is its adapter and its round log, so
the last entry is enough to go on: a restarted method skips the rounds it holds
(``RoundLog.resumed``) and continues from its adapter. For a seeded run the
result is the uninterrupted one: every round's randomness is drawn from its own
round number (client data order, MPU's secrets with ``seed``), never from a
stream the skipped rounds would have advanced.

The adapters are stored in the clear, as the run's ``adapters/`` are.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from fed_unlearn.history import fsync_dir
from fed_unlearn.types import AdapterState

#: The unlearning log's directory inside a run directory.
UNLEARN_LOG = "unlearn-log"

#: Fault injection (run config): SIGKILL the server once this unlearning round
#: is logged. It acts after the FL phases, so it stays out of their cache key,
#: and ``fed-unlearn resume`` drops it.
KILL_ROUND_KEY = "x-fault-kill-unlearn-round"

_HEADER = "journal.json"
_ENTRY = re.compile(r"^round_(\d{4,})\.safetensors$")


class JournalError(RuntimeError):
    """An unlearning log is missing, unreadable or does not fit the run."""


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file and a rename.

    Raises
    ------
    OSError
        The write failed (the temporary file is removed; ``path`` is unchanged).
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class UnlearnJournal:
    """The per-round unlearning log of one run (module docstring).

    Parameters
    ----------
    root : Path
        Its directory (created by :meth:`start`).
    after_write : Callable[[int], None], optional
        Called with the round number once its entry is on disk (the pipeline's
        ``x-fault-kill-unlearn-round`` hook kills the server there).
    """

    def __init__(
        self, root: Path, after_write: Callable[[int], None] | None = None
    ) -> None:
        self.root = Path(root)
        self.after_write = after_write

    def start(self, header: dict[str, Any]) -> None:
        """Begin a fresh log: remove old entries, write the run's header.

        Parameters
        ----------
        header : dict[str, Any]
            JSON-serialisable description of the run (config, steps, ...).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        for _r, path in self._entries():
            path.unlink()
        write_atomic(self.root / _HEADER, json.dumps(header, indent=2).encode())

    def header(self) -> dict[str, Any]:
        """Return the run's header.

        Raises
        ------
        JournalError
            No log here, or an unreadable header.
        """
        path = self.root / _HEADER
        if not path.is_file():
            raise JournalError(f"{self.root}: no unlearning log ({_HEADER} missing)")
        try:
            obj = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise JournalError(f"{path}: unreadable ({exc})") from None
        if not isinstance(obj, dict):
            raise JournalError(f"{path}: not a JSON object")
        return obj

    def _entries(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _ENTRY.match(p.name)
            if m:
                found.append((int(m[1]), p))
        return sorted(found)

    def rounds(self) -> list[int]:
        """Return the rounds logged so far (ascending)."""
        return [r for r, _ in self._entries()]

    def write(self, r: int, state: AdapterState, log_state: dict[str, Any]) -> None:
        """Log round ``r``: the adapter to go on from and the round log's state.

        Raises
        ------
        JournalError
            The entry could not be written (disk full, ...); the earlier entries
            are intact.
        """
        blob = save_bytes(
            {k: v.detach().contiguous() for k, v in state.items()},
            metadata={"round": str(r), "log": json.dumps(log_state)},
        )
        path = self.root / f"round_{r:04d}.safetensors"
        try:
            write_atomic(path, blob)
        except OSError as exc:
            raise JournalError(
                f"unlearning log {self.root}: writing round {r} failed ({exc})"
            ) from exc
        if self.after_write is not None:
            self.after_write(r)

    def latest(self) -> tuple[int, AdapterState, dict[str, Any]] | None:
        """Return the last logged round, its adapter and log state (``None``: none).

        Raises
        ------
        JournalError
            The entry is unreadable or its metadata does not name its round.
        """
        entries = self._entries()
        if not entries:
            return None
        r, path = entries[-1]
        try:
            data = path.read_bytes()
            state = load_bytes(data)
            meta = _metadata(data)
            if meta.get("round") != str(r):
                raise ValueError(f"its metadata names round {meta.get('round')!r}")
            log_state = json.loads(meta["log"])
        except (OSError, SafetensorError, ValueError, KeyError) as exc:
            raise JournalError(
                f"unlearning log entry {path} is unreadable ({exc}); delete it to "
                "resume from the round before"
            ) from None
        return r, state, log_state


def _metadata(data: bytes) -> dict[str, str]:
    """Return the ``__metadata__`` of a safetensors blob."""
    if len(data) < 8:
        raise ValueError("truncated file")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("truncated header")
    header = json.loads(data[8 : 8 + n])
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict):
        raise ValueError("bad metadata")
    return meta
