"""Unlearning receipts: an Ed25519-signed record of what the server did.

After a departure the server can hand the departed member (or an auditor) a
``receipt.json``::

    {
      "format": "fed_unlearn.receipt/1",
      "departed": [2],
      "method": "foul_server",
      "method_config": {...}, "method_config_sha256": "...",
      "run_config_sha256": "...",
      "history_sha256": "...",          # content digest of the history used
      "history_rounds": 3,
      "adapter_before_sha256": "...",   # the trained adapter as saved
      "adapter_after_sha256": "...",    # the unlearned adapter as saved
      "requested_at": "2026-...Z", "finished_at": "2026-...Z",
      "versions": {...},
      "wire_bytes": {"down": ..., "up": ..., "total": ...},
      "unlearn_rounds": 1,
      "signer": {"algorithm": "Ed25519", "public_key": "<64 hex>",
                 "key_fingerprint": "<16 hex>"},
      "signature": "<128 hex>"
    }

The signature covers the canonical JSON (sorted keys, no spaces) of every field
but ``signature``. :func:`verify_receipt` checks it and, given the files,
recomputes the hashes.

What a receipt proves: that the holder of the signing key states these facts,
and (with the files) that a given adapter and history are the ones it names. It
does not prove that the forgotten data is gone from the model: that is what the
evaluation measures, and a server cannot know it without the data. It states
only what the server knows: no retrain figures (the oracle is a measurement of
simulations, not something a deployment runs), no metric on the departed data.

Hashes are of *content*, not of files: :func:`state_digest` hashes the tensors
(sorted keys, dtype, shape, bytes) and :func:`history_digest` the history's
rounds (participants, example counts, rejections, tensors) and final adapter,
so re-encrypting the history (:func:`fed_unlearn.history.rekey`) keeps a receipt
valid.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fed_unlearn.history import HistoryStore

__all__ = [
    "RECEIPT_FORMAT",
    "build_receipt",
    "ReceiptError",
    "canonical",
    "history_digest",
    "load_signing_key",
    "new_signing_key",
    "sign_receipt",
    "state_digest",
    "verify_receipt",
]

RECEIPT_FORMAT = "fed_unlearn.receipt/1"


class ReceiptError(ValueError):
    """A receipt, its key or a file it names is invalid; the message says which."""


def canonical(obj: Any) -> bytes:
    """Canonical JSON bytes of ``obj`` (sorted keys, no whitespace)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _update_tensor(h: Any, key: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of an adapter's tensors: sorted keys, dtype, shape and bytes.

    Parameters
    ----------
    state : Mapping[str, torch.Tensor]
        The adapter (as saved, or as held in memory: the two differ in key
        names, so compare like with like).

    Returns
    -------
    str
        64 hex characters.
    """
    h = hashlib.sha256()
    for key in sorted(state):
        _update_tensor(h, key, state[key])
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """:func:`state_digest` of a safetensors file (e.g. peft's adapter file)."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        p = p / "adapter_model.safetensors"
    try:
        return state_digest(load_file(str(p)))
    except Exception as e:  # safetensors raises its own error types
        raise ReceiptError(f"{p}: cannot read the adapter ({e})") from e


def history_digest(store: HistoryStore, unlearnings: int | None = None) -> str:
    """SHA-256 of a history's content (rounds, final adapter, earlier unlearnings).

    Parameters
    ----------
    store : HistoryStore
        The store (opened with its key when encrypted); it is fully validated.
    unlearnings : int, optional
        Cover only the first this many recorded unlearnings (default: all): a
        receipt names the history as its unlearning read it.

    Returns
    -------
    str
        64 hex characters, the same for a plaintext and an encrypted copy.
    """
    h = hashlib.sha256()
    h.update(f"dtype\0{store.dtype}\0".encode())
    for r in store.rounds():
        rec = store.load(r)
        h.update(
            canonical(
                {
                    "round": r,
                    "participants": rec.participants,
                    "num_examples": {
                        str(c): n for c, n in sorted(rec.num_examples.items())
                    },
                    "rejected": {str(c): v for c, v in sorted(rec.rejected.items())},
                }
            )
        )
        for key in sorted(rec.global_state):
            _update_tensor(h, f"global/{key}", rec.global_state[key])
        for c in rec.participants:
            for key in sorted(rec.client_deltas[c]):
                _update_tensor(h, f"{c}/{key}", rec.client_deltas[c][key])
    for key, v in sorted(store.final().items()):
        _update_tensor(h, f"final/{key}", v)
    entries = store.unlearnings()
    for i, entry in enumerate(entries[:unlearnings], start=1):
        h.update(canonical({"unlearning": i, "clients": entry["clients"]}))
        for key, v in sorted(store.unlearned(i).items()):
            _update_tensor(h, f"unlearned{i}/{key}", v)
    return h.hexdigest()


def new_signing_key(path: str | Path) -> str:
    """Write a fresh Ed25519 private key (PEM, mode 0600) and ``PATH.pub``.

    Parameters
    ----------
    path : str or Path
        Private key file to create; refused if it or ``PATH.pub`` exists.

    Returns
    -------
    str
        The public key, 64 hex characters (also the content of ``PATH.pub``).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    p, pub = Path(path), Path(f"{path}.pub")
    for f in (p, pub):
        if f.exists():
            raise ReceiptError(f"{f} exists; a key file is never overwritten")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public = _public_hex(key)
    pub.write_text(public + "\n", encoding="ascii")
    return public


def _public_hex(key: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    return (
        key.public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        .hex()
    )


def load_signing_key(path: str | Path) -> Any:
    """Load an Ed25519 private key (unencrypted PEM, :func:`new_signing_key`)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    p = Path(path).expanduser()
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ReceiptError(
            f"receipt key file {p}: cannot load it ({type(e).__name__})"
        ) from e
    if not isinstance(key, Ed25519PrivateKey):
        raise ReceiptError(f"receipt key file {p}: not an Ed25519 private key")
    return key


def sign_receipt(body: Mapping[str, Any], key: Any) -> dict[str, Any]:
    """Return ``body`` with ``format``, ``signer`` and an Ed25519 ``signature``.

    Parameters
    ----------
    body : Mapping[str, Any]
        The facts (JSON-serialisable); must not hold ``signature`` or ``signer``.
    key : Ed25519PrivateKey
        From :func:`load_signing_key`.

    Returns
    -------
    dict[str, Any]
        The signed receipt.
    """
    if "signature" in body or "signer" in body:
        raise ReceiptError("a receipt body must not carry 'signature' or 'signer'")
    public = _public_hex(key)
    receipt = {
        "format": RECEIPT_FORMAT,
        **body,
        "signer": {
            "algorithm": "Ed25519",
            "public_key": public,
            "key_fingerprint": hashlib.sha256(bytes.fromhex(public)).hexdigest()[:16],
        },
    }
    receipt["signature"] = key.sign(canonical(receipt)).hex()
    return receipt


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("fed-unlearn", "flwr", "torch", "transformers", "peft"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def build_receipt(
    *,
    departed: list[int],
    method: str,
    method_config: Mapping[str, Any],
    run_config: Mapping[str, Any],
    history: HistoryStore,
    adapter_before: str | Path,
    adapter_after: str | Path,
    requested_at: str,
    finished_at: str,
    wire_bytes: Mapping[str, int],
    unlearn_rounds: int,
    key: Any,
) -> dict[str, Any]:
    """Assemble and sign the receipt of one unlearning (see the module docstring).

    Parameters
    ----------
    departed : list[int]
        The forgotten clients.
    method, method_config : str, Mapping
        The method and its resolved options.
    run_config : Mapping
        The resolved run config (hashed; paths and key files left out, so
        the hash is the same wherever the server keeps its files).
    history : HistoryStore
        The history the unlearning read.
    adapter_before, adapter_after : str or Path
        The saved trained and unlearned adapters (directory or file).
    requested_at, finished_at : str
        ISO 8601 UTC times of the forget request and of the unlearned adapter.
    wire_bytes : Mapping[str, int]
        Bytes of the unlearning's Flower messages.
    unlearn_rounds : int
        Rounds of client contact the unlearning used.
    key : Ed25519PrivateKey
        The server's signing key.

    Returns
    -------
    dict[str, Any]
        The signed receipt.
    """
    portable = {
        k: v
        for k, v in run_config.items()
        if not k.endswith(("-dir", "-path", "-file"))
    }
    body = {
        "departed": list(departed),
        "method": method,
        "method_config": dict(method_config),
        "method_config_sha256": hashlib.sha256(
            canonical(dict(method_config))
        ).hexdigest(),
        "run_config_sha256": hashlib.sha256(canonical(portable)).hexdigest(),
        "history_sha256": history_digest(history),
        "history_rounds": len(history.rounds()),
        "history_unlearnings": len(history.unlearnings()),
        "adapter_before_sha256": file_digest(adapter_before),
        "adapter_after_sha256": file_digest(adapter_after),
        "requested_at": requested_at,
        "finished_at": finished_at,
        "versions": _versions(),
        "wire_bytes": dict(wire_bytes),
        "unlearn_rounds": int(unlearn_rounds),
    }
    return sign_receipt(body, key)


def verify_receipt(
    receipt: Mapping[str, Any],
    *,
    public_key: str | None = None,
    adapter: str | Path | None = None,
    adapter_before: str | Path | None = None,
    history: HistoryStore | None = None,
) -> list[str]:
    """Check a receipt's signature and, given the files, its hashes.

    Parameters
    ----------
    receipt : Mapping[str, Any]
        A parsed ``receipt.json``.
    public_key : str, optional
        The signer's public key (64 hex) you trust; without it the embedded key
        is used, which proves integrity but not who signed.
    adapter, adapter_before : str or Path, optional
        The unlearned (trained) adapter's directory or safetensors file.
    history : HistoryStore, optional
        The history the unlearning used.

    Returns
    -------
    list[str]
        What was checked, one line each.

    Raises
    ------
    ReceiptError
        On a bad signature, a key other than ``public_key``, a malformed
        receipt, or a hash that does not match the file; the message names the
        field.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if receipt.get("format") != RECEIPT_FORMAT:
        raise ReceiptError(f"not a receipt of format {RECEIPT_FORMAT!r}")
    try:
        signer = receipt["signer"]
        pub = bytes.fromhex(signer["public_key"])
        sig = bytes.fromhex(receipt["signature"])
        verifier = Ed25519PublicKey.from_public_bytes(pub)
    except (KeyError, TypeError, ValueError) as e:
        raise ReceiptError(f"malformed signer or signature ({e})") from e
    if public_key is not None and public_key.strip().lower() != pub.hex():
        raise ReceiptError(
            "signed by another key than the one given (signer key_fingerprint "
            f"{signer.get('key_fingerprint')})"
        )
    body = {k: v for k, v in receipt.items() if k != "signature"}
    try:
        verifier.verify(sig, canonical(body))
    except InvalidSignature:
        raise ReceiptError(
            "invalid signature: the receipt was changed after it was signed"
        ) from None
    done = [
        "signature valid"
        + (" (trusted key)" if public_key else " (embedded key: integrity only)")
    ]
    if (
        receipt.get("method_config_sha256")
        != hashlib.sha256(canonical(receipt.get("method_config"))).hexdigest()
    ):
        raise ReceiptError("method_config_sha256 does not match method_config")
    checks = [
        ("adapter_after_sha256", adapter, file_digest),
        ("adapter_before_sha256", adapter_before, file_digest),
        (
            "history_sha256",
            history,
            lambda h: history_digest(h, receipt.get("history_unlearnings", 0)),
        ),
    ]
    for field, source, digest in checks:
        if source is None:
            continue
        got = digest(source)  # type: ignore[operator]
        if got != receipt.get(field):
            raise ReceiptError(
                f"{field}: {source} has digest {got}, the receipt says "
                f"{receipt.get(field)}"
            )
        done.append(f"{field} matches {source}")
    return done
