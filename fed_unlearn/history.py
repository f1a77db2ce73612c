"""Append-only, crash-safe, validated on-disk history of federated rounds.

A client's departure (unlearning) needs what the server saw: for every round the
global adapter it sent out, each participant's delta and example count. The
:class:`HistoryStore` keeps that on disk::

    root/meta.json                       format version, dtype, adapter schema
                                         (key -> shape), committed rounds, the
                                         SHA-256 of each round's meta and of
                                         final.safetensors, its own SHA-256
    root/round_0001/global.safetensors   global adapter at the start of round 1
    root/round_0001/client_<id>.safetensors   client adapter - global adapter
    root/round_0001/meta.json            num_examples, participants, rejected,
                                         the SHA-256 of each tensor file
    root/final.safetensors               global adapter after the last round
    root/unlearned_0001.safetensors      the adapter after the first recorded
                                         unlearning (float32; listed with its
                                         clients, method and time in the root
                                         meta's ``unlearnings``)
    root/encryption.json                 only in an encrypted store: scheme and
                                         key fingerprint (never the key)

**Integrity.** Every file is covered by a SHA-256 checksum recorded one level up
(tensor files in their round's meta, round metas and the final adapter in the
root meta, the root meta in itself) and checked on every load, so a flipped
byte anywhere is an error naming the file, never a silently different number.
Stores of format 1 (before checksums) are still read, without that check, and
are read-only.

**Encryption at rest** (optional). With a 32-byte ``key``, every file above
except ``encryption.json`` is AES-256-GCM encrypted (``cryptography``): a fresh
12-byte nonce per write, the file's path relative to the store as associated
data (a file moved to another place fails to decrypt), the nonce stored in front
of the ciphertext. A wrong key, a missing key, a tampered or truncated file are
each a :class:`HistoryError` naming the file. The key comes from a file or the
environment (:func:`load_key`), never from a constant; :func:`rekey` re-encrypts
a store under a new key (or encrypts or decrypts it). GCM authenticates each
file; it does not stop a whole store being replaced by an older copy of itself.

``root/meta.json`` is the commit record: a round exists once it is listed there.
A round is written into ``root/.tmp_round_NNNN``, renamed to ``round_NNNN`` and
only then listed in ``meta.json`` (rewritten via a temporary file and
``os.replace``). Leftovers of a crash (temporary dirs, a renamed but unlisted
round dir) are ignored by readers and removed by the next :meth:`~HistoryStore.append`.
A single writer per store is assumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from fed_unlearn.types import AdapterState

__all__ = [
    "FORMAT_VERSION",
    "KEY_ENV",
    "HistoryError",
    "HistoryStore",
    "RoundRecord",
    "key_fingerprint",
    "load_key",
    "new_key",
    "rekey",
]

#: Version of the on-disk layout written by this module (2: checksums).
FORMAT_VERSION = 2
#: Versions this module reads (1: before checksums, read-only).
_READABLE = (1, 2)
#: Environment variable holding the history key (64 hex characters).
KEY_ENV = "FED_UNLEARN_HISTORY_KEY"
_ENCRYPTION = "encryption.json"
_SCHEME = "AES-256-GCM"
_NONCE = 12

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}
_META = "meta.json"
_GLOBAL = "global.safetensors"
_FINAL = "final.safetensors"
_TMP_PREFIX = ".tmp_round_"
_ROUND_RE = re.compile(r"^round_(\d+)$")
_CLIENT_RE = re.compile(r"^client_(\d+)\.safetensors$")
_UNLEARNED = "unlearned_{:04d}.safetensors"


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


def fsync_dir(path: Path) -> None:
    """Flush a directory entry to disk (after a rename in it); best effort."""
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


def _meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of a root meta without its own checksum field (canonical JSON)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _schema_of(state: object, what: str) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the adapter that founds a store's schema."""
    if not isinstance(state, dict) or not state:
        raise HistoryError(f"{what}: expected a non-empty dict of tensors")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HistoryError(f"{what}: every value must be a tensor")
    return {str(k): tuple(v.shape) for k, v in state.items()}


def _dir_nbytes(path: Path) -> int:
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())


def new_key() -> bytes:
    """Return a fresh 32-byte history key from :mod:`secrets`."""
    return secrets.token_bytes(32)


def key_fingerprint(key: bytes) -> str:
    """Return a 16-hex-character fingerprint of ``key`` (safe to log and store).

    Parameters
    ----------
    key : bytes
        A 32-byte history key.

    Returns
    -------
    str
        The first 16 hex characters of SHA-256(``b"fed_unlearn history key" + key``).
    """
    return hashlib.sha256(b"fed_unlearn history key" + key).hexdigest()[:16]


def _parse_key(text: str, where: str) -> bytes:
    raw = text.strip()
    try:
        key = bytes.fromhex(raw)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise HistoryError(
            f"{where}: a history key is 64 hex characters (32 bytes); got "
            f"{len(raw)} characters that are not one"
        )
    return key


def load_key(path: str | Path | None = None, *, env: bool = True) -> bytes | None:
    """Read the history key from ``path``, else from ``$FED_UNLEARN_HISTORY_KEY``.

    Parameters
    ----------
    path : str or Path, optional
        A file holding the key as 64 hex characters (its first line).
    env : bool
        Fall back to the environment variable :data:`KEY_ENV` (default: True).

    Returns
    -------
    bytes or None
        The 32-byte key, or ``None`` when neither source is given.

    Raises
    ------
    HistoryError
        If the file cannot be read or holds no valid key. The message never
        contains the key.
    """
    if path:
        p = Path(path).expanduser()
        try:
            text = p.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as e:
            raise HistoryError(f"history key file {p}: cannot read it ({e})") from e
        return _parse_key(text.splitlines()[0] if text else "", f"history key file {p}")
    if env and os.environ.get(KEY_ENV):
        return _parse_key(os.environ[KEY_ENV], f"${KEY_ENV}")
    return None


class _Codec:
    """How a store's files are turned into bytes on disk (plain or AES-GCM)."""

    def __init__(self, root: Path, key: bytes | None) -> None:
        self.root = root
        self.key = key
        if key is not None:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            if not isinstance(key, bytes) or len(key) != 32:
                raise HistoryError("a history key must be 32 bytes")
            self._aead = AESGCM(key)

    def _aad(self, path: Path) -> bytes:
        # the final name of the file inside the store (temporary dirs map to it)
        rel = path.relative_to(self.root).as_posix()
        rel = re.sub(r"^\.tmp_round_(\d+)/", r"round_\1/", rel)
        rel = re.sub(r"(^|/)\.([^/]+)\.tmp$", r"\1\2", rel)
        return rel.encode()

    def encode(self, path: Path, data: bytes) -> bytes:
        if self.key is None:
            return data
        nonce = secrets.token_bytes(_NONCE)
        return nonce + self._aead.encrypt(nonce, data, self._aad(path))

    def decode(self, path: Path, data: bytes) -> bytes:
        if self.key is None:
            return data
        from cryptography.exceptions import InvalidTag

        if len(data) < _NONCE + 16:
            raise HistoryError(f"{path}: truncated encrypted file ({len(data)} bytes)")
        try:
            return self._aead.decrypt(data[:_NONCE], data[_NONCE:], self._aad(path))
        except InvalidTag:
            raise HistoryError(
                f"{path}: failed authentication (tampered, truncated or moved file)"
            ) from None

    def write(self, path: Path, data: bytes) -> str:
        """Write ``data`` (encoded) durably; return the SHA-256 of what is on disk."""
        blob = self.encode(path, data)
        with open(path, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        return hashlib.sha256(blob).hexdigest()

    def read(self, path: Path, sha256: str | None = None) -> bytes:
        """Read ``path``, check its checksum (when given), decode it."""
        if not path.is_file():
            raise HistoryError(f"{path}: missing file")
        try:
            blob = path.read_bytes()
        except OSError as e:
            raise HistoryError(f"{path}: cannot read ({e})") from e
        if sha256 is not None and hashlib.sha256(blob).hexdigest() != sha256:
            raise HistoryError(
                f"{path}: checksum mismatch (the file changed after it was written)"
            )
        return self.decode(path, blob)


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
    key : bytes, optional
        32-byte AES-256-GCM key (:func:`load_key`, :func:`new_key`). A new store
        written with a key is encrypted; an encrypted store needs its key to be
        read, and a plaintext store refuses one (use :func:`rekey`).
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

    def __init__(
        self, root: str | Path, dtype: str = "float32", *, key: bytes | None = None
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self._root = Path(root)
        self._requested_dtype = dtype
        self._codec = _Codec(self._root, key)

    @property
    def encrypted(self) -> bool:
        """bool: whether the store on disk is encrypted (or will be, if new)."""
        if (self._root / _ENCRYPTION).is_file():
            return True
        return self._codec.key is not None and not (self._root / _META).is_file()

    # ------------------------------------------------------------------ files
    def _check_key(self) -> None:
        """Refuse a missing, wrong or unneeded key before any file is decoded."""
        enc = self._root / _ENCRYPTION
        key = self._codec.key
        if enc.is_file():
            try:
                info = json.loads(enc.read_text(encoding="utf-8"))
                fingerprint, scheme = info["key_fingerprint"], info["scheme"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise HistoryError(f"{enc}: cannot read ({e})") from e
            if scheme != _SCHEME:
                raise HistoryError(f"{enc}: unsupported scheme {scheme!r}")
            if key is None:
                raise HistoryError(
                    f"history store {self._root} is encrypted; give its key "
                    f"(config key 'history-key-file' or ${KEY_ENV})"
                )
            if key_fingerprint(key) != fingerprint:
                raise HistoryError(
                    f"history store {self._root}: wrong key (the store's key has "
                    f"fingerprint {fingerprint}, the given one "
                    f"{key_fingerprint(key)})"
                )
        elif key is not None and (self._root / _META).is_file():
            raise HistoryError(
                f"history store {self._root} is not encrypted, but a key was "
                "given; encrypt it with `fed-unlearn history rekey`"
            )

    def _write_json(self, path: Path, obj: Any) -> str:
        """Write JSON atomically (temporary file, fsync, ``os.replace``).

        Returns the SHA-256 of the bytes on disk.
        """
        tmp = path.with_name(f".{path.name}.tmp")
        sha = self._codec.write(tmp, json.dumps(obj, indent=1).encode())
        os.replace(tmp, path)
        fsync_dir(path.parent)
        return sha

    def _read_json(self, path: Path, sha256: str | None = None) -> Any:
        data = self._codec.read(path, sha256)
        try:
            return json.loads(data.decode("utf-8"))
        except ValueError as e:
            raise HistoryError(f"{path}: cannot read JSON ({e})") from e

    def _write_root_meta(self, meta: dict[str, Any]) -> None:
        meta["meta_sha256"] = _meta_digest(meta)
        self._write_json(self._root / _META, meta)

    def _create(
        self, schema: dict[str, tuple[int, ...]], meta: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Create the store (or give an empty one its schema); return its meta."""
        meta = self._new_meta(schema) if meta is None else meta
        meta["schema"] = {k: list(v) for k, v in schema.items()}
        self._root.mkdir(parents=True, exist_ok=True)
        enc = self._root / _ENCRYPTION
        if self._codec.key is not None and not enc.is_file():
            info = {
                "scheme": _SCHEME,
                "key_fingerprint": key_fingerprint(self._codec.key),
            }
            tmp = enc.with_name(f".{enc.name}.tmp")
            tmp.write_text(json.dumps(info, indent=1), encoding="utf-8")
            os.replace(tmp, enc)
        self._write_root_meta(meta)
        return meta

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
        self._check_key()
        meta = self._read_json(path)
        if not isinstance(meta, dict):
            raise HistoryError(f"{path}: expected a JSON object")
        version = meta.get("format_version")
        if version not in _READABLE:
            raise HistoryError(
                f"{path}: unsupported format_version {version!r} "
                f"(this code reads {list(_READABLE)})"
            )
        if version >= 2:
            if meta.get("meta_sha256") != _meta_digest(meta):
                raise HistoryError(
                    f"{path}: checksum mismatch (the file changed after it was written)"
                )
            shas = meta.get("round_meta_sha256")
            if not isinstance(shas, dict) or sorted(shas, key=int) != [
                str(r) for r in meta.get("rounds") or []
            ]:
                raise HistoryError(f"{path}: round checksums do not match the rounds")
            entries = meta.setdefault("unlearnings", [])
            ok = isinstance(entries, list) and all(
                isinstance(e, dict)
                and isinstance(e.get("clients"), list)
                and all(_is_int(c) for c in e["clients"])
                and isinstance(e.get("sha256"), str)
                for e in entries
            )
            if not ok:
                raise HistoryError(f"{path}: malformed 'unlearnings' ledger")
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
        if meta["format_version"] != FORMAT_VERSION:
            raise HistoryError(
                f"history store {self._root} has format_version "
                f"{meta['format_version']} (no checksums) and is read-only"
            )
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
            "round_meta_sha256": {},
            "final_sha256": None,
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
        self,
        path: Path,
        schema: dict[str, tuple[int, ...]],
        dtype: str,
        sha256: str | None,
    ) -> AdapterState:
        """Load a safetensors file, check it against the schema, return float32."""
        data = self._codec.read(path, sha256)
        try:
            tensors = load_bytes(data)
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

    def _read_round_meta(self, meta: dict[str, Any], r: int) -> dict[str, Any]:
        """Read and check ``round_NNNN/meta.json``; keys are converted to int."""
        path = self._round_dir(r) / _META
        checked = meta["format_version"] >= 2
        raw = self._read_json(
            path, meta["round_meta_sha256"][str(r)] if checked else None
        )

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
        files = raw.get("files") if checked else None
        want = {_GLOBAL, *(f"client_{c}.safetensors" for c in parts)}
        if checked and (not isinstance(files, dict) or set(files) != want):
            raise bad("'files' must give the checksum of every tensor file")
        return {
            "participants": parts,
            "num_examples": nex,
            "rejected": rejected,
            "files": files or {},
        }

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
        tmp = self._root / f"{_TMP_PREFIX}{r:04d}"
        final_dir = self._round_dir(r)
        try:
            if meta is None or meta["schema"] is None:
                meta = self._create(schema, meta)
            self._clean_leftovers(set(rounds))
            tmp.mkdir()
            round_meta["files"] = {
                name: self._codec.write(tmp / name, save_bytes(state))
                for name, state in tensors.items()
            }
            sha = self._write_json(tmp / _META, round_meta)
            os.rename(tmp, final_dir)
            fsync_dir(self._root)
            meta["rounds"] = [*rounds, r]
            meta["round_meta_sha256"] = {**meta["round_meta_sha256"], str(r): sha}
            self._write_root_meta(meta)
        except OSError as e:
            for d in (tmp, final_dir):
                if d.is_dir() and r not in self._committed():
                    shutil.rmtree(d, ignore_errors=True)
            raise HistoryError(
                f"history store {self._root}: writing round {r} failed ({e}); "
                f"the store still holds rounds {rounds}"
            ) from e
        return _dir_nbytes(final_dir)

    def _committed(self) -> list[int]:
        try:
            return list(self._read_meta()["rounds"])
        except HistoryError:
            return []

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
        path = self._root / _FINAL
        tmp = self._root / f".{_FINAL}.tmp"
        try:
            if meta is None or meta["schema"] is None:
                meta = self._create(schema, meta)
            meta["final_sha256"] = self._codec.write(tmp, save_bytes(tensors))
            os.replace(tmp, path)
            fsync_dir(self._root)
            self._write_root_meta(meta)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise HistoryError(
                f"history store {self._root}: writing the final adapter failed ({e})"
            ) from e

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
        sha = meta["final_sha256"] if meta["format_version"] >= 2 else None
        if meta["format_version"] >= 2 and sha is None:
            raise HistoryError(f"{self._root / _META}: no checksum for {_FINAL}")
        return self._load_state(path, self._schema(meta), meta["dtype"], sha)

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
        rmeta = self._read_round_meta(meta, round)
        schema, dtype = self._schema(meta), meta["dtype"]
        shas = rmeta["files"]
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
        global_state = self._load_state(d / _GLOBAL, schema, dtype, shas.get(_GLOBAL))
        deltas = {}
        for c in rmeta["participants"]:
            name = f"client_{c}.safetensors"
            deltas[c] = self._load_state(d / name, schema, dtype, shas.get(name))
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
            out.update(self._read_round_meta(meta, r)["participants"])
        return out

    # ------------------------------------------------------------ unlearning
    def unlearnings(self) -> list[dict[str, Any]]:
        """Return the ledger of recorded unlearnings, oldest first.

        Returns
        -------
        list[dict[str, Any]]
            Per unlearning: ``clients`` (forgotten by it), ``info`` (what the
            caller recorded: method, times, ...), ``sha256`` of its adapter file.
        """
        meta = self._read_meta()
        return [dict(e) for e in meta.get("unlearnings", [])]

    def forgotten(self) -> list[int]:
        """Return every client an earlier unlearning removed (sorted)."""
        return sorted({c for e in self.unlearnings() for c in e["clients"]})

    def current(self) -> AdapterState:
        """Return the adapter a new departure starts from.

        Returns
        -------
        AdapterState
            The adapter of the latest recorded unlearning, else :meth:`final`.
        """
        entries = self._read_meta().get("unlearnings", [])
        return self.unlearned(len(entries)) if entries else self.final()

    def unlearned(self, index: int) -> AdapterState:
        """Return the adapter of the ``index``-th recorded unlearning (1-based)."""
        meta = self._read_meta()
        entries = meta.get("unlearnings", [])
        if not 1 <= index <= len(entries):
            raise HistoryError(
                f"history store {self._root} has {len(entries)} unlearning(s), "
                f"not #{index}"
            )
        return self._load_state(
            self._root / _UNLEARNED.format(index),
            self._schema(meta),
            "float32",
            entries[index - 1]["sha256"],
        )

    def record_unlearning(
        self, clients: list[int], state: AdapterState, info: dict[str, Any]
    ) -> int:
        """Append an unlearning to the ledger: the clients it removed, its adapter.

        Parameters
        ----------
        clients : list[int]
            The clients forgotten; each must have taken part and not have been
            forgotten already.
        state : AdapterState
            The unlearned adapter (stored in float32 whatever the store's dtype,
            so that the next departure starts from it exactly).
        info : dict[str, Any]
            JSON-serialisable facts to keep with it (method, times, ...).

        Returns
        -------
        int
            The unlearning's 1-based index.

        Raises
        ------
        HistoryError
            If a client never took part or is already forgotten, the adapter
            does not match the schema or is not finite, or the store is
            read-only or corrupt. Nothing is written then.
        """
        meta = self._meta_for_write()
        if meta is None or meta["schema"] is None:
            raise HistoryError(f"history store {self._root} holds no FL run yet")
        ids = list(clients)
        if not ids or not all(_is_int(c) for c in ids) or len(set(ids)) != len(ids):
            raise HistoryError(f"clients must be distinct ints, got {clients!r}")
        joined = self.clients()
        never = sorted(set(ids) - joined)
        if never:
            raise HistoryError(
                f"client(s) {never} never took part in the FL run of {self._root} "
                f"(participants: {sorted(joined)})"
            )
        done = sorted(set(ids) & set(self.forgotten()))
        if done:
            raise HistoryError(
                f"client(s) {done} are already forgotten in {self._root}"
            )
        try:
            json.dumps(info)
        except (TypeError, ValueError) as e:
            raise HistoryError(f"unlearning info is not JSON-serialisable ({e})") from e
        schema = self._schema(meta)
        wanted = self._requested_dtype
        self._requested_dtype = "float32"
        try:
            tensors = self._to_storage(state, schema, "unlearned adapter")
        finally:
            self._requested_dtype = wanted
        entries = list(meta.get("unlearnings", []))
        index = len(entries) + 1
        path = self._root / _UNLEARNED.format(index)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            sha = self._codec.write(tmp, save_bytes(tensors))
            os.replace(tmp, path)
            fsync_dir(self._root)
            entries.append({"clients": sorted(ids), "info": info, "sha256": sha})
            meta["unlearnings"] = entries
            self._write_root_meta(meta)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise HistoryError(
                f"history store {self._root}: recording the unlearning failed ({e})"
            ) from e
        return index

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
        for i in range(1, len(meta.get("unlearnings", [])) + 1):
            try:
                self.unlearned(i)
            except HistoryError as e:
                problems.append(str(e))
        if problems:
            raise HistoryError(
                f"history store {self._root} failed validation "
                f"({len(problems)} problem(s)): " + "; ".join(problems)
            )


def rekey(
    root: str | Path, old_key: bytes | None, new_key: bytes | None
) -> HistoryStore:
    """Re-encrypt a history store under ``new_key`` (or encrypt or decrypt it).

    Every round and the final adapter are loaded and verified with ``old_key``
    (``None``: a plaintext store), written into a sibling directory with
    ``new_key`` (``None``: plaintext), verified again, and only then swapped in:
    ``root`` is renamed to ``root.old-<pid>``, the new store to ``root``, and the
    old copy removed. Any error before the swap leaves ``root`` as it was.

    Parameters
    ----------
    root : str or Path
        The store.
    old_key, new_key : bytes or None
        Its current key and the one to use from now on.

    Returns
    -------
    HistoryStore
        The store at ``root``, opened with ``new_key``.

    Raises
    ------
    HistoryError
        If the store cannot be read with ``old_key`` (wrong key, tampering) or
        the copy fails; ``root`` is unchanged then.
    """
    root = Path(root)
    old = HistoryStore(root, key=old_key)
    old.validate()
    dtype = old.dtype
    fresh = root.with_name(f".{root.name}.rekey-{os.getpid()}")
    if fresh.exists():
        shutil.rmtree(fresh)
    try:
        new = HistoryStore(fresh, dtype=dtype, key=new_key)
        for r in old.rounds():
            new.append(old.load(r))
        if (root / _FINAL).is_file():
            new.set_final(old.final())
        for i, entry in enumerate(old.unlearnings(), start=1):
            new.record_unlearning(entry["clients"], old.unlearned(i), entry["info"])
        new.validate()
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    parked = root.with_name(f"{root.name}.old-{os.getpid()}")
    os.rename(root, parked)
    os.rename(fresh, root)
    shutil.rmtree(parked)
    return HistoryStore(root, dtype=dtype, key=new_key)
