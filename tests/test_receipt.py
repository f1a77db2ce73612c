"""Unlearning receipts: Ed25519 signature, content hashes, verification."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from fed_unlearn.history import HistoryStore, RoundRecord, new_key, rekey
from fed_unlearn.receipt import (
    ReceiptError,
    build_receipt,
    history_digest,
    load_signing_key,
    new_signing_key,
    state_digest,
    verify_receipt,
)


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "m.lora_A": torch.randn(2, 3, generator=g),
        "m.lora_B": torch.randn(3, 2, generator=g),
    }


@pytest.fixture
def parts(tmp_path):
    store = HistoryStore(tmp_path / "h")
    store.append(
        RoundRecord(
            round=1,
            global_state=_state(0),
            client_deltas={0: _state(1), 2: _state(2)},
            num_examples={0: 5, 2: 7},
            participants=[0, 2],
        )
    )
    store.set_final(_state(3))
    for name, seed in (("before", 3), ("after", 4)):
        (tmp_path / name).mkdir()
        save_file(_state(seed), str(tmp_path / name / "adapter_model.safetensors"))
    public = new_signing_key(tmp_path / "sign")
    receipt = build_receipt(
        departed=[2],
        method="foul_server",
        method_config={"server_lr": 0.5, "stop": "budget"},
        run_config={"seed": 0, "data-dir": "/srv/x", "num-clients": 3},
        history=store,
        adapter_before=tmp_path / "before",
        adapter_after=tmp_path / "after",
        requested_at="2026-12-01T10:00:00+00:00",
        finished_at="2026-12-01T10:01:00+00:00",
        wire_bytes={"down": 10, "up": 20, "total": 30},
        unlearn_rounds=1,
        key=load_signing_key(tmp_path / "sign"),
    )
    return tmp_path, store, public, receipt


def test_a_receipt_verifies_with_its_files_and_states_only_what_the_server_knows(parts):
    tmp, store, public, receipt = parts
    lines = verify_receipt(
        receipt,
        public_key=public,
        adapter=tmp / "after",
        adapter_before=tmp / "before",
        history=store,
    )
    assert lines[0] == "signature valid (trusted key)"
    assert len(lines) == 4
    assert receipt["departed"] == [2] and receipt["history_rounds"] == 1
    assert not any("retrain" in k or "forget" in k for k in receipt)
    assert (tmp / "sign").stat().st_mode & 0o777 == 0o600
    assert receipt["signer"]["public_key"] == public


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("departed", [1]),
        ("method", "none"),
        ("adapter_after_sha256", "0" * 64),
        ("requested_at", "2026-12-01T09:00:00+00:00"),
        ("wire_bytes", {"down": 0, "up": 0, "total": 0}),
    ],
)
def test_one_changed_field_breaks_the_signature(parts, field, value):
    *_, receipt = parts
    with pytest.raises(ReceiptError, match="invalid signature"):
        verify_receipt({**receipt, field: value})


def test_a_foreign_key_or_a_different_adapter_is_refused(parts):
    tmp, store, public, receipt = parts
    other = new_signing_key(tmp / "other")
    with pytest.raises(ReceiptError, match="another key"):
        verify_receipt(receipt, public_key=other)
    # a receipt re-signed by someone else with the embedded key swapped
    forged = {
        k: v for k, v in receipt.items() if k not in ("signature", "signer", "format")
    }
    from fed_unlearn.receipt import sign_receipt

    forged = sign_receipt({**forged, "departed": [0]}, load_signing_key(tmp / "other"))
    verify_receipt(forged)  # integrity holds for the embedded key ...
    with pytest.raises(ReceiptError, match="another key"):
        verify_receipt(forged, public_key=public)  # ... but not its origin
    with pytest.raises(ReceiptError, match=r"adapter_after_sha256: .*before"):
        verify_receipt(receipt, adapter=tmp / "before")


def test_the_history_digest_is_of_content_so_rekeying_keeps_receipts_valid(parts):
    tmp, store, public, receipt = parts
    before = history_digest(store)
    key = new_key()
    rekey(store.root, None, key)
    assert history_digest(HistoryStore(store.root, key=key)) == before
    verify_receipt(
        receipt, public_key=public, history=HistoryStore(store.root, key=key)
    )
    # a history with one example count changed is another history
    other = HistoryStore(tmp / "h2")
    rec = HistoryStore(store.root, key=key).load(1)
    rec.num_examples = {0: 5, 2: 8}
    other.append(rec)
    other.set_final(_state(3))
    with pytest.raises(ReceiptError, match="history_sha256"):
        verify_receipt(receipt, history=other)


def test_state_digest_matches_a_hand_computed_sha256():
    import hashlib

    t = torch.tensor([1.0, -2.0])
    h = hashlib.sha256()
    h.update(b"w\x00torch.float32\x00(2,)\x00")
    h.update(t.numpy().tobytes())
    assert state_digest({"w": t}) == h.hexdigest()


def test_cli_verify(parts, capsys):
    from simulations.cli import main

    tmp, store, _public, receipt = parts
    path = tmp / "receipt.json"
    path.write_text(json.dumps(receipt))
    args = ["receipt", "verify", str(path), "--public-key", str(tmp / "sign.pub")]
    assert (
        main([*args, "--adapter", str(tmp / "after"), "--history", str(store.root)])
        == 0
    )
    assert "ok: history_sha256 matches" in capsys.readouterr().out
    path.write_text(json.dumps({**receipt, "unlearn_rounds": 0}))
    assert main(args) == 1
    assert "invalid signature" in capsys.readouterr().err
    assert main(["receipt", "new-key", str(tmp / "sign")]) == 1
    assert "never overwritten" in capsys.readouterr().err
