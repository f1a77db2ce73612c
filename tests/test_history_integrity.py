"""History at rest: checksums on every file, AES-GCM encryption, rekey, disk full."""

from __future__ import annotations

import errno
import hashlib
import json

import pytest
import torch

from fed_unlearn import history as hist
from fed_unlearn.history import (
    HistoryError,
    HistoryStore,
    RoundRecord,
    key_fingerprint,
    load_key,
    new_key,
    rekey,
)


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.lora_A": torch.randn(2, 3, generator=g),
        "a.lora_B": torch.randn(3, 2, generator=g),
    }


def _record(r: int) -> RoundRecord:
    return RoundRecord(
        round=r,
        global_state=_state(r),
        client_deltas={0: _state(10 + r), 1: _state(20 + r)},
        num_examples={0: 10, 1: 12},
        participants=[0, 1],
    )


def _filled(root, key=None) -> HistoryStore:
    store = HistoryStore(root, key=key)
    store.append(_record(1))
    store.append(_record(2))
    store.set_final(_state(99))
    return store


def _flip(path, offset=-5):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _snapshot(root):
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.mark.parametrize(
    "rel",
    [
        "round_0001/client_0.safetensors",
        "round_0002/global.safetensors",
        "round_0001/meta.json",
        "final.safetensors",
        "meta.json",
    ],
)
def test_a_flipped_byte_in_any_file_is_an_error_naming_it(tmp_path, rel):
    """One bit flipped inside tensor data (or a number in a meta) changes no
    structure the loader could see; only the checksum catches it."""
    root = tmp_path / "h"
    store = _filled(root)
    path = root / rel
    if rel.endswith(".json"):
        text = path.read_text()
        # change one digit of a number the JSON still parses
        i = max(text.rfind("1"), text.rfind("2"))
        path.write_text(text[:i] + ("3" if text[i] != "3" else "4") + text[i + 1 :])
    else:
        _flip(path)
    with pytest.raises(
        HistoryError, match=rf"{rel.split('/')[-1]}.*(checksum|do not match)"
    ):
        store.validate()


def test_checksums_are_the_sha256_of_the_files(tmp_path):
    root = tmp_path / "h"
    _filled(root)
    meta = json.loads((root / "meta.json").read_text())
    rmeta = json.loads((root / "round_0002" / "meta.json").read_text())
    sha = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert rmeta["files"]["client_1.safetensors"] == sha(
        root / "round_0002" / "client_1.safetensors"
    )
    assert meta["round_meta_sha256"]["2"] == sha(root / "round_0002" / "meta.json")
    assert meta["final_sha256"] == sha(root / "final.safetensors")
    assert meta["format_version"] == 2


def test_encrypted_store_round_trips_and_hides_the_tensors(tmp_path):
    root, key = tmp_path / "h", new_key()
    _filled(root, key)
    store = HistoryStore(root, key=key)
    assert store.encrypted
    assert torch.equal(
        store.load(2).client_deltas[1]["a.lora_B"], _state(22)["a.lora_B"]
    )
    assert torch.equal(store.final()["a.lora_A"], _state(99)["a.lora_A"])
    raw = _state(22)["a.lora_B"].numpy().tobytes()
    for p in root.rglob("*"):
        if p.is_file():
            assert raw not in p.read_bytes()
            assert b"num_examples" not in p.read_bytes()
    info = json.loads((root / "encryption.json").read_text())
    assert info == {"scheme": "AES-256-GCM", "key_fingerprint": key_fingerprint(key)}
    assert key.hex() not in (root / "encryption.json").read_text()


def test_wrong_missing_or_unneeded_key_is_refused_and_changes_nothing(tmp_path):
    root, key = tmp_path / "h", new_key()
    _filled(root, key)
    before = _snapshot(root)
    with pytest.raises(HistoryError, match="wrong key"):
        HistoryStore(root, key=new_key()).load(1)
    with pytest.raises(HistoryError, match="is encrypted; give its key"):
        HistoryStore(root).rounds()
    with pytest.raises(HistoryError, match="wrong key"):
        HistoryStore(root, key=new_key()).append(_record(3))
    plain = tmp_path / "p"
    _filled(plain)
    with pytest.raises(HistoryError, match="not encrypted, but a key was given"):
        HistoryStore(plain, key=key).append(_record(3))
    assert _snapshot(root) == before


@pytest.mark.parametrize("damage", ["flip", "truncate", "move"])
def test_tampered_truncated_or_moved_encrypted_file_fails_authentication(
    tmp_path, damage
):
    root, key = tmp_path / "h", new_key()
    store = _filled(root, key)
    target = root / "round_0001" / "client_0.safetensors"
    if damage == "flip":
        _flip(target, 20)
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:20])
    else:  # a valid ciphertext of the same store, put in another place
        target.write_bytes((root / "round_0002" / "client_0.safetensors").read_bytes())
    with pytest.raises(HistoryError, match=r"client_0\.safetensors"):
        store.load(1)
    # without the checksum (which an attacker could recompute for a plaintext
    # meta), the cipher alone refuses the file
    with pytest.raises(
        HistoryError, match=r"client_0\.safetensors: (failed authentication|truncated)"
    ):
        store._codec.read(target)


def test_rekey_rotates_encrypts_and_decrypts_and_a_wrong_old_key_changes_nothing(
    tmp_path,
):
    root = tmp_path / "h"
    _filled(root)
    want = HistoryStore(root).load(2).client_deltas[0]["a.lora_A"].clone()
    k1, k2 = new_key(), new_key()
    rekey(root, None, k1)  # encrypt a plaintext store
    assert HistoryStore(root, key=k1).encrypted
    rekey(root, k1, k2)  # rotate
    with pytest.raises(HistoryError, match="wrong key"):
        HistoryStore(root, key=k1).load(2)
    before = _snapshot(root)
    with pytest.raises(HistoryError, match="wrong key"):
        rekey(root, k1, new_key())
    assert _snapshot(root) == before
    assert [p.name for p in tmp_path.iterdir()] == ["h"]  # no leftovers
    rekey(root, k2, None)  # decrypt
    store = HistoryStore(root)
    assert not store.encrypted
    assert torch.equal(store.load(2).client_deltas[0]["a.lora_A"], want)
    assert store.rounds() == [1, 2]


def test_disk_full_while_appending_keeps_the_previous_state(tmp_path, monkeypatch):
    root = tmp_path / "h"
    store = _filled(root)
    before = _snapshot(root)
    calls = {"n": 0}
    real = hist._Codec.write

    def full(self, path, data):
        calls["n"] += 1
        if calls["n"] == 2:  # the second tensor file of round 3
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, path, data)

    monkeypatch.setattr(hist._Codec, "write", full)
    with pytest.raises(
        HistoryError, match=r"writing round 3 failed.*No space.*rounds \[1, 2\]"
    ):
        store.append(_record(3))
    monkeypatch.undo()
    assert _snapshot(root) == before
    store.validate()
    store.append(_record(3))
    assert store.rounds() == [1, 2, 3]


def test_format_1_stores_are_read_without_checksums_and_are_read_only(tmp_path):
    """A store written before checksums (format 1) still loads: existing FL
    caches rely on it."""
    root = tmp_path / "h"
    _filled(root)
    meta = json.loads((root / "meta.json").read_text())
    v1 = {k: meta[k] for k in ("dtype", "schema", "rounds")}
    (root / "meta.json").write_text(json.dumps({"format_version": 1, **v1}))
    for r in (1, 2):
        p = root / f"round_{r:04d}" / "meta.json"
        rm = json.loads(p.read_text())
        rm.pop("files")
        rm["format_version"] = 1
        p.write_text(json.dumps(rm))
    store = HistoryStore(root)
    assert torch.equal(store.load(1).global_state["a.lora_A"], _state(1)["a.lora_A"])
    assert torch.equal(store.final()["a.lora_B"], _state(99)["a.lora_B"])
    with pytest.raises(HistoryError, match="format_version 1.*read-only"):
        store.append(_record(3))


def test_load_key_reads_a_file_or_the_environment_and_never_echoes_it(
    tmp_path, monkeypatch
):
    key = new_key()
    f = tmp_path / "k"
    f.write_text(key.hex() + "\n")
    assert load_key(f) == key
    monkeypatch.delenv(hist.KEY_ENV, raising=False)
    assert load_key(None) is None
    monkeypatch.setenv(hist.KEY_ENV, key.hex())
    assert load_key(None) == key
    bad = "zz" + key.hex()[2:]
    f.write_text(bad)
    with pytest.raises(HistoryError, match="64 hex characters") as e:
        load_key(f)
    assert bad not in str(e.value)
    assert len({new_key() for _ in range(8)}) == 8


def _cached_phase(tmp_path, monkeypatch, key=None):
    """A cached FL phase (history + phase.json) of a tiny config in a private
    runs root; returns the config and the phase directory."""
    from fed_unlearn.config import RunConfig
    from server.pipeline import phase_dir

    monkeypatch.setenv("FED_UNLEARN_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv(hist.KEY_ENV, raising=False)
    cfg = RunConfig(preset="tiny")
    path = phase_dir(cfg, ())
    _filled(path / "history", key)
    (path / "phase.json").write_text(json.dumps({"wall_time_s": 1.0}))
    return cfg, path


def test_a_run_reads_its_encrypted_cached_phase_with_the_key_file(
    tmp_path, monkeypatch
):
    from server.pipeline import load_phase

    key = new_key()
    cfg, path = _cached_phase(tmp_path, monkeypatch, key)
    kf = tmp_path / "key"
    kf.write_text(key.hex())
    cfg.history_key_file = str(kf)
    phase = load_phase(cfg, ())
    assert torch.equal(phase.final["a.lora_A"], _state(99)["a.lora_A"])
    assert phase.history.rounds() == [1, 2]  # the phase's store carries the key
    assert key.hex() not in repr(phase)


def test_a_cached_phase_and_a_run_that_disagree_on_encryption_is_a_clear_error(
    tmp_path, monkeypatch
):
    from server.pipeline import PipelineError, load_phase

    cfg, path = _cached_phase(tmp_path, monkeypatch)
    monkeypatch.setenv(hist.KEY_ENV, new_key().hex())
    with pytest.raises(
        PipelineError, match="not encrypted, but this run has a history key.*rekey"
    ):
        load_phase(cfg, ())
    monkeypatch.setenv(hist.KEY_ENV, "abc")
    with pytest.raises(PipelineError, match="FED_UNLEARN_HISTORY_KEY.*64 hex"):
        load_phase(cfg, ())


def test_cli_new_key_and_rekey(tmp_path, capsys):
    from simulations.cli import main

    root = tmp_path / "h"
    _filled(root)
    k1, k2 = tmp_path / "k1", tmp_path / "k2"
    assert main(["history", "new-key", str(k1)]) == 0
    assert (k1.stat().st_mode & 0o777) == 0o600
    assert main(["history", "new-key", str(k1)]) == 2  # never overwritten
    assert "never overwritten" in capsys.readouterr().err
    assert main(["history", "new-key", str(k2)]) == 0
    assert main(["history", "rekey", str(root), "--new-key-file", str(k1)]) == 0
    assert (
        main(
            [
                "history",
                "rekey",
                str(root),
                "--old-key-file",
                str(k1),
                "--new-key-file",
                str(k2),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "2 rounds, now encrypted" in out
    assert k2.read_text().strip() not in out
    assert main(["history", "rekey", str(root), "--old-key-file", str(k1)]) == 1
    assert "wrong key" in capsys.readouterr().err
    store = HistoryStore(root, key=load_key(k2))
    assert store.rounds() == [1, 2]


def test_the_unlearning_ledger_records_forgotten_clients_and_the_current_adapter(
    tmp_path,
):
    root = tmp_path / "h"
    store = _filled(root)
    assert store.current()["a.lora_A"].equal(_state(99)["a.lora_A"])
    assert store.forgotten() == []
    after = _state(7)
    assert store.record_unlearning([1], after, {"method": "foul_server"}) == 1
    assert store.forgotten() == [1]
    assert torch.equal(store.current()["a.lora_B"], after["a.lora_B"])
    before = _snapshot(root)
    with pytest.raises(HistoryError, match=r"\[1\] are already forgotten"):
        store.record_unlearning([1], _state(8), {})
    with pytest.raises(HistoryError, match=r"\[5\] never took part.*\[0, 1\]"):
        store.record_unlearning([5], _state(8), {})
    with pytest.raises(HistoryError, match="NaN"):
        store.record_unlearning(
            [0], {**_state(8), "a.lora_A": torch.full((2, 3), float("nan"))}, {}
        )
    assert _snapshot(root) == before
    assert store.record_unlearning([0], _state(8), {"method": "mpu"}) == 2
    assert store.forgotten() == [0, 1]
    assert [e["info"]["method"] for e in store.unlearnings()] == ["foul_server", "mpu"]
    # a flipped byte in an unlearned adapter is caught like any other file
    _flip(root / "unlearned_0001.safetensors")
    with pytest.raises(HistoryError, match="unlearned_0001.safetensors: checksum"):
        store.validate()


def test_rekey_keeps_the_ledger(tmp_path):
    root = tmp_path / "h"
    store = _filled(root)
    store.record_unlearning([1], _state(7), {"method": "x"})
    key = new_key()
    rekey(root, None, key)
    again = HistoryStore(root, key=key)
    assert again.forgotten() == [1]
    assert torch.equal(again.current()["a.lora_A"], _state(7)["a.lora_A"])
