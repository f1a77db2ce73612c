"""Append-only, crash-safe, validated on-disk history of federated rounds.

A client's departure (unlearning) needs what the server saw: for every round the
global adapter it sent out, each participant's delta and example count. The
:class:`HistoryStore` keeps that on disk::

    root/meta.json                       format version, dtype, adapter schema
                                         (key -> shape), committed rounds
    root/round_0001/global.safetensors   global adapter at the start of round 1
    root/round_0001/client_<id>.safetensors   client adapter - global adapter
    root/round_0001/meta.json            num_examples, participants, rejected
    root/final.safetensors               global adapter after the last round

``root/meta.json`` is the commit record: a round exists once it is listed there.
A round is written into ``root/.tmp_round_NNNN``, renamed to ``round_NNNN`` and
only then listed in ``meta.json`` (rewritten via a temporary file and
``os.replace``). Leftovers of a crash (temporary dirs, a renamed but unlisted
round dir) are ignored by readers and removed by the next :meth:`~HistoryStore.append`.
A single writer per store is assumed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fed_unlearn.types import AdapterState

__all__ = ["FORMAT_VERSION", "HistoryError", "HistoryStore", "RoundRecord"]

#: Version of the on-disk layout written by this module.
FORMAT_VERSION = 1

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}
_META = "meta.json"
_GLOBAL = "global.safetensors"
_FINAL = "final.safetensors"
_TMP_PREFIX = ".tmp_round_"
_ROUND_RE = re.compile(r"^round_(\d+)$")
_CLIENT_RE = re.compile(r"^client_(\d+)\.safetensors$")


class HistoryError(RuntimeError):
    """The history store is missing, inconsistent or corrupt, or misused.

    Messages name the file and the problem.
    """


@dataclass
class RoundRecord:
    """What the server saw in one round.

    Parameters
    ----------
    round : int
        Round number, 1-based and consecutive within a store.
    global_state : AdapterState
        The global adapter sent to the clients at the start of this round.
    client_deltas : dict[int, AdapterState]
        Client id -> (adapter the client returned - ``global_state``), for the
        accepted updates.
    num_examples : dict[int, int]
        Client id -> number of training examples; every participant needs an
        entry (rejected clients may have one too).
    participants : list[int]
        Clients whose update was accepted: the keys of ``client_deltas``
        (stored sorted).
    rejected : dict[int, str]
        Client id -> reason its update was rejected (may be empty).
    """

    round: int
    global_state: AdapterState
    client_deltas: dict[int, AdapterState]
    num_examples: dict[int, int]
    participants: list[int]
    rejected: dict[int, str] = field(default_factory=dict)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _round_name(r: int) -> str:
    return f"round_{r:04d}"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. directories cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: temporary file, fsync, ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise HistoryError(f"{path}: missing file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise HistoryError(f"{path}: cannot read JSON ({e})") from e


def _schema_of(state: object, what: str) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the adapter that founds a store's schema."""
    if not isinstance(state, dict) or not state:
        raise HistoryError(f"{what}: expected a non-empty dict of tensors")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HistoryError(f"{what}: every value must be a tensor")
    return {str(k): tuple(v.shape) for k, v in state.items()}


def _dir_nbytes(path: Path) -> int:
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())


class HistoryStore:
    """On-disk history of rounds (global adapters, client deltas, metadata).

    Nothing is created on construction: the first :meth:`append` or
    :meth:`set_final` creates ``root``. Readers raise :class:`HistoryError` if the
    store does not exist.

    Tensors are stored in ``dtype`` but always returned as ``float32`` (on the
    CPU). ``float16`` halves the disk use at a precision cost: about 3 decimal
    digits, and values below ~6e-5 in magnitude (small deltas) lose relative
    precision; values beyond ±65504 cannot be stored and make :meth:`append`
    fail.

    Parameters
    ----------
    root : str or Path
        Directory of the store.
    dtype : str
        Storage dtype for a new store, ``"float32"`` or ``"float16"``. An
        existing store keeps the dtype recorded in its ``meta.json`` (readers
        need not know it); writing to it with a different ``dtype`` raises
        :class:`HistoryError`.

    Raises
    ------
    ValueError
        If ``dtype`` is not supported.
    """

    def __init__(self, root: str | Path, dtype: str = "float32") -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self._root = Path(root)
        self._requested_dtype = dtype

    def __repr__(self) -> str:
        return f"HistoryStore({str(self._root)!r}, dtype={self._requested_dtype!r})"

    # ------------------------------------------------------------------ paths
    @property
    def root(self) -> Path:
        """Path: directory of the store."""
        return self._root

    @property
    def dtype(self) -> str:
        """str: storage dtype (that of ``meta.json`` if the store exists)."""
        meta_path = self._root / _META
        if meta_path.is_file():
            return str(self._read_meta()["dtype"])
        return self._requested_dtype

    def _round_dir(self, r: int) -> Path:
        return self._root / _round_name(r)

    # ------------------------------------------------------------------- meta
    def _read_meta(self) -> dict[str, Any]:
        """Read and check ``root/meta.json``."""
        if not self._root.is_dir():
            raise HistoryError(f"history store {self._root} does not exist")
        path = self._root / _META
        if not path.is_file():
            raise HistoryError(
                f"history store {self._root} has no {_META} (not a history store, "
                "or nothing was ever written to it)"
            )
        meta = _read_json(path)
        if not isinstance(meta, dict):
            raise HistoryError(f"{path}: expected a JSON object")
        if meta.get("format_version") != FORMAT_VERSION:
            raise HistoryError(
                f"{path}: unsupported format_version {meta.get('format_version')!r} "
                f"(this code reads {FORMAT_VERSION})"
            )
        if meta.get("dtype") not in _DTYPES:
            raise HistoryError(f"{path}: unsupported dtype {meta.get('dtype')!r}")
        schema = meta.get("schema")
        if schema is not None:
            ok = isinstance(schema, dict) and all(
                isinstance(v, list) and all(_is_int(d) and d >= 0 for d in v)
                for v in schema.values()
            )
            if not ok:
                raise HistoryError(f"{path}: malformed adapter schema")
        rounds = meta.get("rounds")
        if not isinstance(rounds, list) or rounds != list(range(1, len(rounds) + 1)):
            raise HistoryError(
                f"{path}: 'rounds' must list consecutive rounds 1..n, got {rounds!r}"
            )
        if rounds and schema is None:
            raise HistoryError(f"{path}: rounds recorded but no adapter schema")
        return meta

    def _schema(self, meta: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        if meta["schema"] is None:
            raise HistoryError(f"history store {self._root} holds no adapter yet")
        return {k: tuple(v) for k, v in meta["schema"].items()}

    def _meta_for_write(self) -> dict[str, Any] | None:
        """Meta of an existing store (checked for dtype), or ``None`` for a new one."""
        if not (self._root / _META).is_file():
            if self._root.is_dir():
                content = [
                    e.name
                    for e in os.scandir(self._root)
                    if _ROUND_RE.match(e.name) or e.name == _FINAL
                ]
                if content:
                    raise HistoryError(
                        f"history store {self._root} has no {_META} but holds "
                        f"{sorted(content)[:3]}; refusing to write over it"
                    )
            return None
        meta = self._read_meta()
        if meta["dtype"] != self._requested_dtype:
            raise HistoryError(
                f"history store {self._root} stores {meta['dtype']}, but this "
                f"HistoryStore was opened with dtype={self._requested_dtype!r}"
            )
        return meta

    def _new_meta(self, schema: dict[str, tuple[int, ...]]) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "dtype": self._requested_dtype,
            "schema": {k: list(v) for k, v in schema.items()},
            "rounds": [],
        }

    # ---------------------------------------------------------------- tensors
    def _to_storage(
        self, state: object, schema: dict[str, tuple[int, ...]], what: str
    ) -> dict[str, torch.Tensor]:
        """Check ``state`` against ``schema`` and convert it to the storage dtype."""
        if not isinstance(state, dict):
            raise HistoryError(f"{what}: expected a dict of tensors")
        missing, extra = set(schema) - set(state), set(state) - set(schema)
        if missing or extra:
            raise HistoryError(
                f"{what}: keys differ from the adapter schema (missing: "
                f"{sorted(missing)[:3]}, unexpected: {sorted(extra)[:3]})"
            )
        dt = _DTYPES[self._requested_dtype]
        out: dict[str, torch.Tensor] = {}
        for key, shape in schema.items():
            t = state[key]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise HistoryError(f"{what}: {key!r} is not a floating tensor ({got})")
            if tuple(t.shape) != shape:
                raise HistoryError(
                    f"{what}: {key!r} has shape {tuple(t.shape)}, expected {shape}"
                )
            conv = t.detach().to(device="cpu", dtype=dt, copy=True).contiguous()
            if not bool(torch.isfinite(conv).all()):
                n_bad = int((~torch.isfinite(t.detach())).sum())
                if n_bad:
                    raise HistoryError(f"{what}: {key!r} has {n_bad} NaN/Inf value(s)")
                raise HistoryError(
                    f"{what}: {key!r} overflows {self._requested_dtype} (max |x| = "
                    f"{float(t.detach().abs().max()):.4g})"
                )
            out[key] = conv
        return out

    def _load_state(
        self, path: Path, schema: dict[str, tuple[int, ...]], dtype: str
    ) -> AdapterState:
        """Load a safetensors file, check it against the schema, return float32."""
        if not path.is_file():
            raise HistoryError(f"{path}: missing file")
        try:
            tensors = load_file(str(path))
        except Exception as e:  # safetensors raises its own (Rust) error types
            raise HistoryError(
                f"{path}: cannot read safetensors file ({type(e).__name__}: {e})"
            ) from e
        missing, extra = set(schema) - set(tensors), set(tensors) - set(schema)
        if missing or extra:
            raise HistoryError(
                f"{path}: keys differ from the adapter schema (missing: "
                f"{sorted(missing)[:3]}, unexpected: {sorted(extra)[:3]})"
            )
        want = _DTYPES[dtype]
        out: AdapterState = {}
        for key, shape in schema.items():
            t = tensors[key]
            if t.dtype != want:
                raise HistoryError(
                    f"{path}: {key!r} has dtype {t.dtype}, the store holds {dtype}"
                )
            if tuple(t.shape) != shape:
                raise HistoryError(
                    f"{path}: {key!r} has shape {tuple(t.shape)}, expected {shape}"
                )
            n_bad = int((~torch.isfinite(t)).sum())
            if n_bad:
                raise HistoryError(f"{path}: {key!r} has {n_bad} NaN/Inf value(s)")
            out[key] = t.to(torch.float32)
        return out

    # ----------------------------------------------------------- round meta
    def _check_record(self, rec: RoundRecord) -> dict[str, Any]:
        """Check the non-tensor part of ``rec``; return the round meta to write."""
        if not isinstance(rec, RoundRecord):
            raise HistoryError(f"expected a RoundRecord, got {type(rec).__name__}")
        r = rec.round
        if not _is_int(r) or r < 1:
            raise HistoryError(f"round must be an int >= 1, got {r!r}")
        ids = list(rec.client_deltas)
        if not all(_is_int(c) and c >= 0 for c in ids):
            raise HistoryError(f"round {r}: client ids must be ints >= 0, got {ids}")
        parts = list(rec.participants)
        if len(set(parts)) != len(parts) or set(parts) != set(ids):
            raise HistoryError(
                f"round {r}: participants {parts} must be the keys of client_deltas "
                f"{sorted(ids)} without duplicates"
            )
        rejected = dict(rec.rejected)
        if not all(_is_int(c) and c >= 0 for c in rejected):
            raise HistoryError(f"round {r}: rejected client ids must be ints >= 0")
        if not all(isinstance(v, str) for v in rejected.values()):
            raise HistoryError(f"round {r}: rejection reasons must be strings")
        both = set(rejected) & set(parts)
        if both:
            raise HistoryError(
                f"round {r}: clients {sorted(both)} are both participants and rejected"
            )
        nex = dict(rec.num_examples)
        no_count = set(parts) - set(nex)
        if no_count:
            raise HistoryError(
                f"round {r}: num_examples lacks participants {sorted(no_count)}"
            )
        stray = set(nex) - set(parts) - set(rejected)
        if stray:
            raise HistoryError(
                f"round {r}: num_examples has clients {sorted(stray)} that neither "
                "participated nor were rejected"
            )
        if not all(_is_int(n) and n >= 0 for n in nex.values()):
            raise HistoryError(f"round {r}: num_examples must be ints >= 0")
        return {
            "format_version": FORMAT_VERSION,
            "round": r,
            "participants": sorted(parts),
            "num_examples": {str(c): int(nex[c]) for c in sorted(nex)},
            "rejected": {str(c): rejected[c] for c in sorted(rejected)},
        }

    def _read_round_meta(self, r: int) -> dict[str, Any]:
        """Read and check ``round_NNNN/meta.json``; keys are converted to int."""
        path = self._round_dir(r) / _META
        raw = _read_json(path)

        def bad(msg: str) -> HistoryError:
            return HistoryError(f"{path}: {msg}")

        if not isinstance(raw, dict):
            raise bad("expected a JSON object")
        if raw.get("round") != r:
            raise bad(f"records round {raw.get('round')!r}, expected {r}")
        parts = raw.get("participants")
        if (
            not isinstance(parts, list)
            or not all(_is_int(c) and c >= 0 for c in parts)
            or parts != sorted(set(parts))
        ):
            raise bad(f"'participants' must be sorted unique ids, got {parts!r}")
        try:
            nex = {int(c): n for c, n in dict(raw.get("num_examples", None)).items()}
            rejected = {int(c): v for c, v in dict(raw.get("rejected", None)).items()}
        except (TypeError, ValueError) as e:
            raise bad(f"malformed num_examples/rejected ({e})") from e
        if not all(_is_int(n) and n >= 0 for n in nex.values()):
            raise bad("num_examples must be ints >= 0")
        if not all(isinstance(v, str) for v in rejected.values()):
            raise bad("rejection reasons must be strings")
        if set(parts) - set(nex):
            lacking = sorted(set(parts) - set(nex))
            raise bad(f"no num_examples for participants {lacking}")
        if set(parts) & set(rejected):
            raise bad(f"clients {sorted(set(parts) & set(rejected))} are rejected too")
        return {"participants": parts, "num_examples": nex, "rejected": rejected}

    # ---------------------------------------------------------------- writing
    def append(self, rec: RoundRecord) -> int:
        """Record one round (append-only, atomic).

        Parameters
        ----------
        rec : RoundRecord
            The round; its number must be the next one (1 for an empty store).
            The first round fixes the adapter schema (keys and shapes of
            ``rec.global_state``); all later tensors must match it.

        Returns
        -------
        int
            Bytes written for this round (size of its files on disk).

        Raises
        ------
        HistoryError
            If the round already exists or is not the next consecutive round, the
            record is inconsistent (participants vs deltas, num_examples, ids),
            a tensor does not match the schema, is not floating, contains
            NaN/Inf or overflows the storage dtype, or the store is corrupt or
            has another dtype. Nothing is written in these cases.
        """
        round_meta = self._check_record(rec)
        r = rec.round
        meta = self._meta_for_write()
        rounds: list[int] = [] if meta is None else list(meta["rounds"])
        if r in rounds:
            raise HistoryError(
                f"round {r} is already recorded in {self._root}; the history is "
                "append-only"
            )
        if r != len(rounds) + 1:
            raise HistoryError(
                f"round {r} is not the next round of {self._root} (expected "
                f"{len(rounds) + 1})"
            )
        if meta is None or meta["schema"] is None:
            schema = _schema_of(rec.global_state, "global_state")
        else:
            schema = self._schema(meta)
        tensors = {_GLOBAL: self._to_storage(rec.global_state, schema, "global_state")}
        for c in round_meta["participants"]:
            tensors[f"client_{c}.safetensors"] = self._to_storage(
                rec.client_deltas[c], schema, f"client_deltas[{c}]"
            )

        # ---- validated: from here on, write.
        if meta is None or meta["schema"] is None:
            meta = self._new_meta(schema) if meta is None else meta
            meta["schema"] = {k: list(v) for k, v in schema.items()}
            self._root.mkdir(parents=True, exist_ok=True)
            _write_json(self._root / _META, meta)
        self._clean_leftovers(set(rounds))
        tmp = self._root / f"{_TMP_PREFIX}{r:04d}"
        tmp.mkdir()
        for name, state in tensors.items():
            save_file(state, str(tmp / name))
            _fsync_file(tmp / name)
        _write_json(tmp / _META, round_meta)
        final_dir = self._round_dir(r)
        os.rename(tmp, final_dir)
        _fsync_dir(self._root)
        meta["rounds"] = [*rounds, r]
        _write_json(self._root / _META, meta)
        return _dir_nbytes(final_dir)

    def _clean_leftovers(self, committed: set[int]) -> None:
        """Remove temporary dirs and round dirs not committed in ``meta.json``."""
        for e in os.scandir(self._root):
            m = _ROUND_RE.match(e.name)
            orphan = m is not None and int(m.group(1)) not in committed
            if e.is_dir() and (e.name.startswith(_TMP_PREFIX) or orphan):
                shutil.rmtree(e.path)

    def set_final(self, state: AdapterState) -> None:
        """Record (or replace) the final global adapter after the last round.

        Parameters
        ----------
        state : AdapterState
            The final global adapter; must match the adapter schema (it defines
            the schema if no round was recorded yet).

        Raises
        ------
        HistoryError
            If ``state`` does not match the schema, is not floating, contains
            NaN/Inf or overflows the storage dtype, or the store is corrupt or has
            another dtype.
        """
        meta = self._meta_for_write()
        if meta is None or meta["schema"] is None:
            schema = _schema_of(state, "final state")
        else:
            schema = self._schema(meta)
        tensors = self._to_storage(state, schema, "final state")
        if meta is None or meta["schema"] is None:
            meta = self._new_meta(schema) if meta is None else meta
            meta["schema"] = {k: list(v) for k, v in schema.items()}
            self._root.mkdir(parents=True, exist_ok=True)
            _write_json(self._root / _META, meta)
        path = self._root / _FINAL
        tmp = self._root / f".{_FINAL}.tmp"
        save_file(tensors, str(tmp))
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(self._root)

    # ---------------------------------------------------------------- reading
    def final(self) -> AdapterState:
        """Load the final global adapter.

        Returns
        -------
        AdapterState
            ``float32`` CPU tensors in schema order.

        Raises
        ------
        HistoryError
            If the store does not exist, :meth:`set_final` was never called, or
            the file is corrupt or does not match the schema.
        """
        meta = self._read_meta()
        path = self._root / _FINAL
        if not path.is_file():
            raise HistoryError(
                f"history store {self._root} has no final adapter ({_FINAL}); "
                "set_final() was never called"
            )
        return self._load_state(path, self._schema(meta), meta["dtype"])

    def rounds(self) -> list[int]:
        """Return the committed round numbers.

        Returns
        -------
        list[int]
            ``[1, 2, ..., n]`` (empty if no round was recorded yet).

        Raises
        ------
        HistoryError
            If the store or its ``meta.json`` is missing or corrupt.
        """
        return list(self._read_meta()["rounds"])

    def _check_round(self, meta: dict[str, Any], r: int) -> Path:
        if r not in meta["rounds"]:
            raise HistoryError(
                f"unknown round {r!r}; {self._root} has rounds {meta['rounds']}"
            )
        d = self._round_dir(r)
        if not d.is_dir():
            raise HistoryError(f"{d}: round {r} is recorded but its directory is gone")
        return d

    def load(self, round: int) -> RoundRecord:
        """Load and validate one round.

        Parameters
        ----------
        round : int
            A committed round number.

        Returns
        -------
        RoundRecord
            With ``float32`` CPU tensors (whatever the storage dtype), clients in
            sorted order.

        Raises
        ------
        HistoryError
            If the round is unknown, a file is missing, truncated or corrupt, a
            tensor's keys, shape or dtype do not match the store, a tensor has
            NaN/Inf, or the round meta is inconsistent with the client files.
        """
        meta = self._read_meta()
        d = self._check_round(meta, round)
        rmeta = self._read_round_meta(round)
        schema, dtype = self._schema(meta), meta["dtype"]
        files: set[int] = set()
        for e in os.scandir(d):
            if e.name.startswith("client_"):
                m = _CLIENT_RE.match(e.name)
                if m is None:
                    raise HistoryError(f"{e.path}: unexpected file in round {round}")
                files.add(int(m.group(1)))
        if files != set(rmeta["participants"]):
            raise HistoryError(
                f"{d / _META}: participants {rmeta['participants']} do not match the "
                f"client files for {sorted(files)}"
            )
        global_state = self._load_state(d / _GLOBAL, schema, dtype)
        deltas = {
            c: self._load_state(d / f"client_{c}.safetensors", schema, dtype)
            for c in rmeta["participants"]
        }
        return RoundRecord(
            round=round,
            global_state=global_state,
            client_deltas=deltas,
            num_examples=rmeta["num_examples"],
            participants=list(rmeta["participants"]),
            rejected=rmeta["rejected"],
        )

    def round_nbytes(self, round: int) -> int:
        """Disk size of one round (all files of its directory).

        Parameters
        ----------
        round : int
            A committed round number.

        Returns
        -------
        int
            Bytes on disk (tensors, safetensors headers and the round meta).

        Raises
        ------
        HistoryError
            If the round is unknown or its directory is missing.
        """
        return _dir_nbytes(self._check_round(self._read_meta(), round))

    def clients(self) -> set[int]:
        """Every client that ever participated (had an update accepted).

        Returns
        -------
        set[int]
            Union of the participants of all rounds (rejected clients excluded).

        Raises
        ------
        HistoryError
            If the store or a round meta is missing or corrupt.
        """
        meta = self._read_meta()
        out: set[int] = set()
        for r in meta["rounds"]:
            self._check_round(meta, r)
            out.update(self._read_round_meta(r)["participants"])
        return out

    def validate(self) -> None:
        """Load every round and the final adapter; report all problems.

        Raises
        ------
        HistoryError
            Listing every problem found (missing/corrupt files, schema, dtype or
            meta mismatches, NaN/Inf).
        """
        meta = self._read_meta()
        problems: list[str] = []
        for r in meta["rounds"]:
            try:
                self.load(r)
            except HistoryError as e:
                problems.append(str(e))
        if (self._root / _FINAL).exists():
            try:
                self.final()
            except HistoryError as e:
                problems.append(str(e))
        if problems:
            raise HistoryError(
                f"history store {self._root} failed validation "
                f"({len(problems)} problem(s)): " + "; ".join(problems)
            )
